"""Round-to-nearest presets: the recipes named as the ecosystem knows them.

Each constructor builds a :class:`jqx.RTN` (see :mod:`jqx.recipes.base`);
``int4_weight_only(use_hqq=True)`` builds a :class:`jqx.HQQ`. Weight
granularity is stated along the weight's reduction axis (``axis``, default
-2: the ``in`` axis of a Flax kernel ``(in, out)``, also for scanned kernels
``(layers, in, out)``): ``group_size=None`` is per output channel, an int is
group-wise.

Example:
    >>> import jqx
    >>> jqx.int4_weight_only(group_size=32).format
    'uint4'
"""

from __future__ import annotations

from jqx.core import formats as _formats
from jqx.core.qarray import ActSpec
from jqx.recipes.base import RTN, build
from jqx.recipes.hqq import HQQ, hqq

__all__ = [
    "weight_only",
    "int8_weight_only",
    "int4_weight_only",
    "fp8_weight_only",
    "fp4_weight_only",
    "nf4_weight_only",
    "int8_dynamic_activation_int8_weight",
    "fp8_dynamic_activation_fp8_weight",
    "int8_static_activation_int8_weight",
    "llm_int8",
]


def weight_only(fmt: str = "int8", *, group_size: int | None = None, **kw) -> RTN:
    """Weight-only quantization to any format (round to nearest).

    Example:
        >>> weight_only("fp4_e3m0", group_size=32).format
        'fp4_e3m0'
    """
    return build(
        RTN,
        "weight_only",
        kw,
        name=f"{_formats.get(fmt).name}_weight_only",
        format=fmt,
        group_size=group_size,
    )


def int8_weight_only(*, group_size: int | None = None, **kw) -> RTN:
    """int8 absmax, per output channel (torchao ``int8_weight_only``).

    Example:
        >>> int8_weight_only().format, int8_weight_only().group_size
        ('int8', None)
    """
    return build(
        RTN, "int8_weight_only", kw, name="int8_weight_only", format="int8", group_size=group_size
    )


def int4_weight_only(
    group_size: int | None = 128, *, use_hqq: bool = False, scheme: str = "zero_point", **kw
) -> RTN | HQQ:
    """4-bit group-wise with zero points (uint4 codes), like torchao's
    ``int4_weight_only``. ``use_hqq=True`` optimises the zero points with HQQ
    (an :class:`jqx.HQQ` recipe; ``kw`` then go to :func:`jqx.hqq`).
    ``scheme="absmax"`` uses signed int4 codes instead.

    Example:
        >>> int4_weight_only(group_size=64).format, int4_weight_only(scheme="absmax").format
        ('uint4', 'int4')
    """
    if scheme not in ("absmax", "zero_point"):
        raise ValueError(
            f"int4_weight_only(scheme={scheme!r}) is not supported; use 'zero_point' (uint4 codes "
            "with zero points, the default) or 'absmax' (signed int4 codes)."
        )
    fmt = "uint4" if scheme == "zero_point" else "int4"
    if use_hqq:
        return hqq(bits=4, group_size=group_size, **kw)
    return build(
        RTN,
        "int4_weight_only",
        kw,
        name="int4_weight_only",
        format=fmt,
        scheme=scheme,
        group_size=group_size,
    )


def fp8_weight_only(fmt: str = "fp8_e4m3", *, group_size: int | None = None, **kw) -> RTN:
    """FP8 (E4M3 by default) absmax, per output channel.

    Example:
        >>> fp8_weight_only("e5m2").format
        'fp8_e5m2'
    """
    f = _formats.get(fmt)
    if f.name not in ("fp8_e4m3", "fp8_e5m2"):
        raise ValueError(f"fp8_weight_only(fmt={fmt!r}): use 'fp8_e4m3' or 'fp8_e5m2'.")
    return build(
        RTN, "fp8_weight_only", kw, name="fp8_weight_only", format=f.name, group_size=group_size
    )


def fp4_weight_only(fmt: str = "e2m1", *, group_size: int | None = 32, **kw) -> RTN:
    """FP4 (E2M1, E1M2 or E3M0) absmax, group-wise (32 by default, as MXFP4).

    Example:
        >>> fp4_weight_only("e1m2").format
        'fp4_e1m2'
    """
    f = _formats.get(fmt)
    if f.name not in ("fp4_e2m1", "fp4_e1m2", "fp4_e3m0"):
        raise ValueError(f"fp4_weight_only(fmt={fmt!r}): use 'e2m1', 'e1m2' or 'e3m0'.")
    return build(
        RTN,
        "fp4_weight_only",
        kw,
        name=f"fp4_weight_only({f.name})",
        format=f.name,
        group_size=group_size,
    )


def nf4_weight_only(group_size: int | None = 64, **kw) -> RTN:
    """NF4 (QLoRA) absmax, group-wise (64 by default, as bitsandbytes).

    Example:
        >>> nf4_weight_only().group_size
        64
    """
    return build(
        RTN, "nf4_weight_only", kw, name="nf4_weight_only", format="nf4", group_size=group_size
    )


def int8_dynamic_activation_int8_weight(*, act_granularity: str = "per_token", **kw) -> RTN:
    """W8A8 int8: per-channel int8 weights, activations quantized per token at
    run time; int8 x int8 -> int32 matmul.

    Example:
        >>> int8_dynamic_activation_int8_weight().act.granularity
        'per_token'
    """
    return build(
        RTN,
        "int8_dynamic_activation_int8_weight",
        kw,
        name="int8_dynamic_activation_int8_weight",
        format="int8",
        act=ActSpec("dynamic", "int8", act_granularity),
    )


def fp8_dynamic_activation_fp8_weight(*, act_granularity: str = "per_token", **kw) -> RTN:
    """W8A8 FP8 E4M3: per-channel weights, per-token dynamic activations.

    Example:
        >>> fp8_dynamic_activation_fp8_weight().act.format
        'fp8_e4m3'
    """
    return build(
        RTN,
        "fp8_dynamic_activation_fp8_weight",
        kw,
        name="fp8_dynamic_activation_fp8_weight",
        format="fp8_e4m3",
        act=ActSpec("dynamic", "fp8_e4m3", act_granularity),
    )


def int8_static_activation_int8_weight(**kw) -> RTN:
    """W8A8 int8 with a per-tensor activation scale fixed by ``jqx.calibrate``.

    Example:
        >>> int8_static_activation_int8_weight().needs_calibration
        True
    """
    return build(
        RTN,
        "int8_static_activation_int8_weight",
        kw,
        name="int8_static_activation_int8_weight",
        format="int8",
        act=ActSpec("static", "int8", "per_tensor"),
    )


def llm_int8(threshold: float = 6.0, **kw) -> RTN:
    """LLM.int8(): vector-wise int8 plus 16-bit outlier columns (|x| >= threshold).

    Example:
        >>> llm_int8().act.threshold
        6.0
    """
    if not threshold > 0:
        raise ValueError(
            f"llm_int8(threshold={threshold!r}): the threshold must be > 0 (paper: 6.0)."
        )
    return build(
        RTN,
        "llm_int8",
        kw,
        name="llm_int8",
        format="int8",
        act=ActSpec("llm_int8", "int8", "per_token", float(threshold)),
    )
