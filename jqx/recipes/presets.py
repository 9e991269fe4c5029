"""Recipes: what a quantized weight looks like, named as the ecosystem knows them.

A recipe is a frozen dataclass. ``Recipe.quantize_weight(w, path)`` turns one
float weight into a :class:`jqx.QArray`. Weight granularity is stated along
the weight's reduction axis (``axis``, default -2: the ``in`` axis of a Flax
kernel ``(in, out)``, also for scanned kernels ``(layers, in, out)``):
``group_size=None`` is per output channel, an int is group-wise.

Example:
    >>> import jqx
    >>> jqx.int4_weight_only(group_size=32).format
    'uint4'
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jqx.core import formats as _formats
from jqx.core.numerics import Granularity, _check_scale_dtype, per_group, quantize_array
from jqx.core.qarray import ActSpec, QArray

__all__ = [
    "Recipe",
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


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How to quantize a weight (and, via ``act``, its matmul's activations).

    Attributes:
      name: the constructor that made it (for reports).
      format: weight format name.
      scheme: ``"absmax"`` or ``"zero_point"``.
      group_size: group size along ``axis``; None = per-channel.
      axis: the weight's reduction axis (default -2).
      granularity: overrides ``group_size``/``axis`` when given.
      symmetric_range, convention, scale_dtype: see :func:`jqx.quantize_array`.
      act: activation spec, None for weight-only.
    """

    name: str = "weight_only"
    format: str = "int8"
    scheme: str = "absmax"
    group_size: int | None = None
    axis: int = -2
    granularity: Granularity | None = None
    symmetric_range: bool = False
    convention: str = "jqx"
    scale_dtype: str = "float32"
    act: ActSpec | None = None

    @property
    def needs_calibration(self) -> bool:
        """Recipes that need activation statistics (static activation scales,
        GPTQ, AWQ, SmoothQuant) are applied with ``jqx.calibrate``."""
        return self.act is not None and self.act.kind == "static"

    @property
    def stats_needed(self) -> tuple[str, ...]:
        """Statistics (see ``jqx.calibration.stats.STAT_NAMES``) ``jqx.calibrate`` gathers
        for this recipe; min/max are always gathered."""
        return ("hist",) if self.needs_calibration else ()

    @property
    def sequential(self) -> bool:
        """Quantize layers in forward order, each calibrated on the outputs of
        the already-quantized earlier layers (GPTQ)."""
        return False

    def __post_init__(self):
        fmt = _formats.get(self.format)
        object.__setattr__(self, "format", fmt.name)
        if self.scheme not in ("absmax", "zero_point"):
            raise ValueError(
                f"scheme={self.scheme!r} is not supported; use 'absmax' or 'zero_point'."
            )
        if self.scheme == "zero_point" and fmt.kind != "int":
            raise ValueError(
                f"scheme='zero_point' needs an integer format, got format={fmt.name!r}; use "
                "scheme='absmax' for float and table formats."
            )
        if self.group_size is not None and (
            isinstance(self.group_size, bool)
            or not isinstance(self.group_size, (int, np.integer))
            or self.group_size <= 0
        ):
            raise ValueError(
                f"group_size={self.group_size!r} must be a positive int (e.g. 32, 64, 128) or None"
                " for per-channel."
            )
        if self.convention not in ("jqx", "torchao"):
            raise ValueError(
                f"convention={self.convention!r} is not supported; use 'jqx' or 'torchao'."
            )
        _check_scale_dtype(self.scale_dtype)
        if self.granularity is not None and not isinstance(self.granularity, Granularity):
            raise TypeError(
                f"granularity={self.granularity!r} is not a jqx.Granularity; use jqx.per_tensor(),"
                " per_channel(axis), per_token(), per_group(group_size, axis) or per_block(shape)."
            )
        if self.act is not None and not isinstance(self.act, ActSpec):
            raise TypeError(f"act={self.act!r} must be a jqx.ActSpec or None.")

    @property
    def fmt(self) -> _formats.Format:
        return _formats.get(self.format)

    def weight_granularity(self) -> Granularity:
        return self.granularity or per_group(self.group_size, self.axis)

    def quantize_weight(self, w: jax.Array, path: str | None = None, stats: Any = None) -> QArray:
        """Quantizes one weight (round to nearest)."""
        return quantize_array(
            w,
            self.format,
            scheme=self.scheme,
            granularity=self.weight_granularity(),
            symmetric_range=self.symmetric_range,
            convention=self.convention,
            scale_dtype=jnp.dtype(self.scale_dtype),
            act=self.act,
            path=path,
        )

    def replace(self, **kw) -> Recipe:
        return dataclasses.replace(self, **kw)


_FIELDS = tuple(f.name for f in dataclasses.fields(Recipe))


def _make(ctor: str, kw: dict, **fixed) -> Recipe:
    """Builds a Recipe, turning an unknown or clashing keyword into an error that
    lists the accepted ones (instead of dataclass' bare TypeError)."""
    accepted = [f for f in _FIELDS if f not in fixed and f != "name"]
    bad = [k for k in kw if k not in accepted]
    if bad:
        raise TypeError(
            f"{ctor}() got unexpected keyword argument(s) {', '.join(repr(k) for k in bad)}; "
            f"accepted keywords: {', '.join(accepted)}."
        )
    return Recipe(**fixed, **kw)


def weight_only(fmt: str = "int8", *, group_size: int | None = None, **kw) -> Recipe:
    """Weight-only quantization to any format (round to nearest).

    Example:
        >>> weight_only("fp4_e3m0", group_size=32).format
        'fp4_e3m0'
    """
    return _make(
        "weight_only",
        kw,
        name=f"{_formats.get(fmt).name}_weight_only",
        format=fmt,
        group_size=group_size,
    )


def int8_weight_only(*, group_size: int | None = None, **kw) -> Recipe:
    """int8 absmax, per output channel (torchao ``int8_weight_only``).

    Example:
        >>> int8_weight_only().format, int8_weight_only().group_size
        ('int8', None)
    """
    return _make(
        "int8_weight_only", kw, name="int8_weight_only", format="int8", group_size=group_size
    )


def int4_weight_only(
    group_size: int | None = 128, *, use_hqq: bool = False, scheme: str = "zero_point", **kw
) -> Recipe:
    """4-bit group-wise with zero points (uint4 codes), like torchao's
    ``int4_weight_only``. ``use_hqq=True`` optimises the zero points with HQQ.
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
        from jqx.recipes.hqq import hqq  # noqa: PLC0415 (same layer; avoids a cycle)

        return hqq(bits=4, group_size=group_size, **kw)
    return _make(
        "int4_weight_only",
        kw,
        name="int4_weight_only",
        format=fmt,
        scheme=scheme,
        group_size=group_size,
    )


def fp8_weight_only(fmt: str = "fp8_e4m3", *, group_size: int | None = None, **kw) -> Recipe:
    """FP8 (E4M3 by default) absmax, per output channel.

    Example:
        >>> fp8_weight_only("e5m2").format
        'fp8_e5m2'
    """
    f = _formats.get(fmt)
    if f.name not in ("fp8_e4m3", "fp8_e5m2"):
        raise ValueError(f"fp8_weight_only(fmt={fmt!r}): use 'fp8_e4m3' or 'fp8_e5m2'.")
    return _make(
        "fp8_weight_only", kw, name="fp8_weight_only", format=f.name, group_size=group_size
    )


def fp4_weight_only(fmt: str = "e2m1", *, group_size: int | None = 32, **kw) -> Recipe:
    """FP4 (E2M1, E1M2 or E3M0) absmax, group-wise (32 by default, as MXFP4).

    Example:
        >>> fp4_weight_only("e1m2").format
        'fp4_e1m2'
    """
    f = _formats.get(fmt)
    if f.name not in ("fp4_e2m1", "fp4_e1m2", "fp4_e3m0"):
        raise ValueError(f"fp4_weight_only(fmt={fmt!r}): use 'e2m1', 'e1m2' or 'e3m0'.")
    return _make(
        "fp4_weight_only",
        kw,
        name=f"fp4_weight_only({f.name})",
        format=f.name,
        group_size=group_size,
    )


def nf4_weight_only(group_size: int | None = 64, **kw) -> Recipe:
    """NF4 (QLoRA) absmax, group-wise (64 by default, as bitsandbytes).

    Example:
        >>> nf4_weight_only().group_size
        64
    """
    return _make("nf4_weight_only", kw, name="nf4_weight_only", format="nf4", group_size=group_size)


def int8_dynamic_activation_int8_weight(*, act_granularity: str = "per_token", **kw) -> Recipe:
    """W8A8 int8: per-channel int8 weights, activations quantized per token at
    run time; int8 x int8 -> int32 matmul.

    Example:
        >>> int8_dynamic_activation_int8_weight().act.granularity
        'per_token'
    """
    return _make(
        "int8_dynamic_activation_int8_weight",
        kw,
        name="int8_dynamic_activation_int8_weight",
        format="int8",
        act=ActSpec("dynamic", "int8", act_granularity),
    )


def fp8_dynamic_activation_fp8_weight(*, act_granularity: str = "per_token", **kw) -> Recipe:
    """W8A8 FP8 E4M3: per-channel weights, per-token dynamic activations.

    Example:
        >>> fp8_dynamic_activation_fp8_weight().act.format
        'fp8_e4m3'
    """
    return _make(
        "fp8_dynamic_activation_fp8_weight",
        kw,
        name="fp8_dynamic_activation_fp8_weight",
        format="fp8_e4m3",
        act=ActSpec("dynamic", "fp8_e4m3", act_granularity),
    )


def int8_static_activation_int8_weight(**kw) -> Recipe:
    """W8A8 int8 with a per-tensor activation scale fixed by ``jqx.calibrate``.

    Example:
        >>> int8_static_activation_int8_weight().needs_calibration
        True
    """
    return _make(
        "int8_static_activation_int8_weight",
        kw,
        name="int8_static_activation_int8_weight",
        format="int8",
        act=ActSpec("static", "int8", "per_tensor"),
    )


def llm_int8(threshold: float = 6.0, **kw) -> Recipe:
    """LLM.int8(): vector-wise int8 plus 16-bit outlier columns (|x| >= threshold).

    Example:
        >>> llm_int8().act.threshold
        6.0
    """
    if not threshold > 0:
        raise ValueError(
            f"llm_int8(threshold={threshold!r}): the threshold must be > 0 (paper: 6.0)."
        )
    return _make(
        "llm_int8",
        kw,
        name="llm_int8",
        format="int8",
        act=ActSpec("llm_int8", "int8", "per_token", float(threshold)),
    )
