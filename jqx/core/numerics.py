"""Quantize / dequantize math on single arrays (framework-free).

The formulas (DESIGN.md), with round half to even throughout:

- absmax (symmetric): ``S = max|x| / qmax``; ``q = clamp(round(x / S))``.
- zero_point (asymmetric): ``S = (max - min) / (qmax - qmin)``;
  ``Z = round(qmin - min / S)``; ``q = clamp(round(x / S) + Z)``;
  ``x_hat = (q - Z) * S``.
- float and table formats: ``S = max|x| / fmt.max``; ``x / S`` rounded onto
  the format grid (ties to even, saturating).

Edge cases: a block whose values are all equal (all-zero included) gets
``S = |c|`` (1 for zero) so that it reconstructs exactly; NaN/Inf raise
(under ``jit`` the block's scale is NaN instead, and ``checkify`` turns it into
the same error; see :func:`check_finite_flag`). Scales near float32's limit
divide without underflow (:func:`div_by_scale`).

``convention="torchao"`` reproduces torchao/qwix: symmetric int scales use
``max|x| / ((qmax - qmin) / 2)`` (127.5 for int8) and asymmetric ranges are
widened to include zero, with the zero point clamped into [qmin, qmax].

Example:
    >>> import jax.numpy as jnp, jqx
    >>> q = jqx.quantize_array(jnp.array([[-1.0, 0.5], [0.25, 2.0]]), "int8")
    >>> q.codes().tolist()
    [[-64, 32], [16, 127]]
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from jqx.core import formats as _formats
from jqx.core.qarray import ActSpec, QArray, pack_4bit, pack_bits, pack_codes

__all__ = [
    "attention_kernel_contraction",
    "Granularity",
    "per_tensor",
    "per_channel",
    "per_token",
    "per_group",
    "per_block",
    "quantize_array",
    "dequantize_array",
    "fake_quant",
    "quantize_activation",
    "compute_scale",
]

Scheme = Literal["absmax", "zero_point"]
Convention = Literal["jqx", "torchao"]


# --------------------------------------------------------------------------- validation
# One text per mistake: every layer (recipes, algorithms, QAT) raises through these.

_COMMON_GROUPS = (8, 16, 32, 64, 96, 128, 256)


def check_scheme(scheme: str, fmt: _formats.Format) -> None:
    """``scheme`` is ``absmax`` or ``zero_point``, and zero points need an integer format."""
    if scheme not in ("absmax", "zero_point"):
        raise ValueError(f"scheme={scheme!r} is not supported; use 'absmax' or 'zero_point'.")
    if scheme == "zero_point" and fmt.kind != "int":
        raise ValueError(
            f"scheme='zero_point' needs an integer format, got format={fmt.name!r}; use "
            "scheme='absmax' for float and table formats."
        )


def check_convention(convention: str) -> None:
    if convention not in ("jqx", "torchao"):
        raise ValueError(f"convention={convention!r} is not supported; use 'jqx' or 'torchao'.")


def check_group_size(group_size, who: str | None = None) -> None:
    """``group_size`` is a positive int or None (one group spanning the axis)."""
    if group_size is not None and (
        isinstance(group_size, bool)
        or not isinstance(group_size, (int, np.integer))
        or group_size <= 0
    ):
        pre = f"{who}: " if who else ""
        raise ValueError(
            f"{pre}group_size={group_size!r} must be a positive int (e.g. 32, 64, 128) or None "
            "for per-channel."
        )


def check_group_divides(
    group_size: int | None,
    size: int,
    *,
    axis: int | str,
    path: str | None = None,
    who: str | None = None,
) -> int:
    """The effective group size along an axis of length ``size`` (``None`` = the
    whole axis); raises with divisors to use when it does not divide.

    Example:
        >>> check_group_divides(None, 384, axis=0)
        384
    """
    check_group_size(group_size, who)
    if size == 0:
        where = f" of {path}" if path else ""
        raise ValueError(
            f"axis {axis}{where} has size 0: there is nothing to quantize. Exclude this leaf "
            "with a rule mapping its path to None, or a filter_fn that rejects it."
        )
    g = size if group_size is None else int(group_size)
    if size % g:
        where = f" of {path}" if path else ""
        pre = f"{who}: " if who else ""
        divs = [d for d in _COMMON_GROUPS if size % d == 0 and d < size][-4:]
        divs = divs or [d for d in range(1, size + 1) if size % d == 0][-4:]
        raise ValueError(
            f"{pre}group_size={group_size} does not divide axis {axis}{where} (size {size}); use "
            f"a divisor such as {', '.join(str(d) for d in divs)}, or group_size=None for "
            "per-channel."
        )
    return g


def check_finite(x, path: str | None = None, who: str | None = None) -> None:
    """Raises on NaN/Inf in a concrete array; for a traced one see :func:`check_finite_flag`.

    Example:
        >>> import jax.numpy as jnp
        >>> check_finite(jnp.array([1.0, jnp.nan]), "params/dense/kernel")
        Traceback (most recent call last):
        ...
        ValueError: params/dense/kernel contains NaN or Inf; ...
    """
    check_finite_flag(jnp.all(jnp.isfinite(x)), path, who)


def check_finite_flag(finite, path: str | None = None, who: str | None = None) -> None:
    """Raises the NaN/Inf error when the flag ``finite`` is False.

    A concrete flag raises ``ValueError`` here. A traced flag (inside ``jit``)
    cannot stop the trace: there the affected scales carry NaN, and this adds a
    ``checkify`` check with the same message, which
    ``jax.experimental.checkify.checkify(f, errors=checkify.user_checks)`` turns
    into an error (docs/guide/quantize.md, "NaN, Inf and extreme values"); plain
    ``jit`` drops it.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from jax.experimental import checkify
        >>> f = checkify.checkify(jax.jit(lambda x: check_finite(x, "w")),
        ...                       errors=checkify.user_checks)
        >>> err, _ = f(jnp.array([jnp.inf]))
        >>> err.get().startswith("w contains NaN or Inf")
        True
    """
    if isinstance(finite, jax.core.Tracer):
        # checkify formats the message with str.format: escape braces from the path.
        msg = not_finite_message(path, who).replace("{", "{{").replace("}", "}}")
        checkify.debug_check(finite, msg)
    elif not bool(finite):
        raise_not_finite(path, who)


def check_granularity(granularity) -> None:
    """``granularity`` is a :class:`Granularity` or None."""
    if granularity is not None and not isinstance(granularity, Granularity):
        raise TypeError(
            f"granularity={granularity!r} is not a jqx.Granularity; use jqx.per_tensor(), "
            "per_channel(axis), per_token(), per_group(group_size, axis) or per_block(shape)."
        )


def not_finite_message(path: str | None = None, who: str | None = None) -> str:
    """The text of the NaN/Inf error (eager ``ValueError`` and ``checkify`` check alike)."""
    pre = f"{who}: " if who else ""
    return (
        f"{pre}{path or 'the input array'} contains NaN or Inf; quantizing it would give "
        "garbage. Fix the weights (e.g. jnp.nan_to_num) or exclude this leaf with a rule "
        "mapping its path to None."
    )


def raise_not_finite(path: str | None = None, who: str | None = None):
    """The NaN/Inf error (for callers that computed the finiteness flag themselves)."""
    raise ValueError(not_finite_message(path, who))


def check_not_empty(shape: Sequence[int], path: str | None = None) -> None:
    """Raises when ``shape`` has a zero-size axis: such an array has nothing to quantize.

    Example:
        >>> check_not_empty((4, 0), "params/dense/kernel")
        Traceback (most recent call last):
        ...
        ValueError: params/dense/kernel has shape (4, 0): axis 1 has size 0, so there is ...
    """
    shape = tuple(int(d) for d in shape)
    if 0 in shape:
        raise ValueError(
            f"{path or 'the input array'} has shape {shape}: axis {shape.index(0)} has size 0, "
            "so there is nothing to quantize. Exclude this leaf with a rule mapping its path "
            "to None, or a filter_fn that rejects it."
        )


# --------------------------------------------------------------------------- granularity


def _norm_axis(axis: int, ndim: int, what: str, path: str | None) -> int:
    if not -ndim <= axis < ndim:
        where = f" of {path}" if path else ""
        raise ValueError(
            f"{what}={axis} is out of range for an array{where} with {ndim} dims; "
            f"use an axis in [{-ndim}, {ndim - 1}]."
        )
    return axis % ndim


@dataclasses.dataclass(frozen=True)
class Granularity:
    """Which elements share a scale. Resolves to per-axis block sizes.

    kind: ``tensor`` | ``channel`` (one scale per index of ``axes``) |
    ``token`` (one scale per row: all axes but the last) | ``group``
    (``group_size`` consecutive elements along ``axis``, every other axis
    per-index; ``group_size=None`` is the whole axis) | ``block`` (explicit
    block shape).
    """

    kind: Literal["tensor", "channel", "token", "group", "block"]
    axes: tuple[int, ...] = ()
    group_size: int | None = None
    block_shape: tuple[int, ...] = ()

    def __post_init__(self):
        kinds = ("tensor", "channel", "token", "group", "block")
        if self.kind not in kinds:
            raise ValueError(
                f"Granularity kind={self.kind!r} is not supported; use one of {', '.join(kinds)} "
                "(or the constructors jqx.per_tensor/per_channel/per_token/per_group/per_block)."
            )

    def resolve(self, shape: Sequence[int], path: str | None = None) -> tuple[int, ...]:
        shape = tuple(int(s) for s in shape)
        nd = len(shape)
        where = f" of {path}" if path else ""
        if self.kind == "tensor" or nd == 0:
            return shape
        if self.kind == "channel":
            keep = {_norm_axis(a, nd, "axis", path) for a in self.axes}
            return tuple(1 if i in keep else s for i, s in enumerate(shape))
        if self.kind == "token":
            return tuple(1 for _ in shape[:-1]) + (shape[-1],)
        if self.kind == "group":
            ax = _norm_axis(self.axes[0], nd, "axis", path)
            g = check_group_divides(self.group_size, shape[ax], axis=ax, path=path)
            return tuple(g if i == ax else 1 for i in range(nd))
        if self.kind == "block":
            if len(self.block_shape) != nd:
                raise ValueError(
                    f"block={self.block_shape} has {len(self.block_shape)} dims but the array"
                    f"{where} has shape {shape}; give one block size per axis."
                )
            for i, (s, b) in enumerate(zip(shape, self.block_shape, strict=True)):
                if b <= 0 or s % b:
                    raise ValueError(
                        f"block={self.block_shape}: {b} does not divide axis {i}{where} (size {s});"
                        " use block sizes that divide the shape."
                    )
            return tuple(int(b) for b in self.block_shape)
        raise ValueError(f"unknown granularity kind {self.kind!r}")


def per_tensor() -> Granularity:
    """One scale for the whole array."""
    return Granularity("tensor")


def per_channel(axis: int | Sequence[int] = -1) -> Granularity:
    """One scale per index of ``axis`` (an int or a tuple of axes).

    For a Flax kernel ``(in, out)``, ``per_channel(-1)`` is per output channel.
    """
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    return Granularity("channel", axes=axes)


def per_token() -> Granularity:
    """One scale per row of an activation ``(..., features)``."""
    return Granularity("token")


def per_group(group_size: int | None, axis: int = -2) -> Granularity:
    """Groups of ``group_size`` along ``axis``; every other axis per-index.

    With ``group_size=None`` the whole axis is one group: for weights this is
    per-channel that also keeps stacked (scanned) layers apart.
    """
    check_group_size(group_size)
    return Granularity("group", axes=(axis,), group_size=group_size)


def per_block(block_shape: Sequence[int]) -> Granularity:
    """Explicit block shape (e.g. 2-D blocks ``(128, 128)``)."""
    return Granularity("block", block_shape=tuple(int(b) for b in block_shape))


def is_conv_kernel(path: str | None, ndim: int) -> bool:
    """Whether a leaf is a Flax convolution kernel ``(*window, in, out)``, as its path
    tells: a ``kernel`` with ndim >= 3 under a module whose name contains ``conv`` (any
    case: linen's ``Conv_0`` / ``ConvTranspose_1``, nnx attributes such as ``conv1``).

    Example:
        >>> is_conv_kernel("params/Conv_0/kernel", 4), is_conv_kernel("params/Dense_0/kernel", 3)
        (True, False)
    """
    parts = (path or "").split("/")
    return ndim >= 3 and len(parts) >= 2 and parts[-1] == "kernel" and "conv" in parts[-2].lower()


def attention_kernel_contraction(path: str | None, ndim: int) -> int:
    """How many leading axes of a Flax attention projection kernel are contracted:
    ``query`` / ``key`` / ``value`` kernels ``(in, heads, head_dim)`` contract 1, the
    ``out`` kernel ``(heads, head_dim, out)`` contracts 2 (linen's
    ``MultiHeadDotProductAttention`` and nnx's ``MultiHeadAttention``, as their
    ``DenseGeneral`` / ``LinearGeneral`` paths tell); 0 for any other leaf.

    A 2-D kernel's reduction axis is -2; these 3-D ones need their own, or per-channel
    scales would vary along a contracted axis (the heads) and no integer matmul could
    factor them out.

    Example:
        >>> attention_kernel_contraction("params/attn/query/kernel", 3)
        1
        >>> attention_kernel_contraction("params/attn/out/kernel", 3)
        2
        >>> attention_kernel_contraction("params/Dense_0/kernel", 3)
        0
    """
    parts = (path or "").split("/")
    if ndim != 3 or len(parts) < 2 or parts[-1] != "kernel":
        return 0
    return {"query": 1, "key": 1, "value": 1, "out": 2}.get(parts[-2], 0)


def conv_kernel_block(
    shape: Sequence[int], group_size: int | None = None, path: str | None = None
) -> tuple[int, ...]:
    """The block shape of a conv kernel ``(*window, in, out)``: one scale per output
    channel (the block covers the window and every input channel), or with
    ``group_size`` one scale per (group of input channels, output channel), shared
    over the window. Sharing over the window keeps a W8A8 convolution exact on integer
    codes (the scale factors out of the window sum) and the scales small.

    Raises:
      ValueError: ``group_size`` does not divide the input channels; the message says
        which group sizes this kernel accepts.

    Example:
        >>> conv_kernel_block((3, 3, 16, 32)), conv_kernel_block((3, 3, 16, 32), 8)
        ((3, 3, 16, 1), (3, 3, 8, 1))
    """
    shape = tuple(int(s) for s in shape)
    check_group_size(group_size)
    cin = shape[-2]
    if group_size is not None and cin % int(group_size):
        divs = [d for d in range(1, cin + 1) if cin % d == 0 and d < cin][-4:]
        window = "x".join(str(s) for s in shape[:-2])
        where = f"{path} " if path else ""
        raise ValueError(
            f"group_size={group_size} does not divide the {cin} input channels of the conv "
            f"kernel {where}(shape {shape}: window {window}, in {cin}, out {shape[-1]}). "
            "Group-wise quantization of a conv kernel groups its input channels (axis "
            f"{len(shape) - 2}), one scale per (group, output channel) shared over the window, "
            f"so group_size must divide {cin}: use "
            + (f"{', '.join(str(d) for d in divs)} or " if divs else "")
            + "group_size=None (one scale per output channel); rules give layers different "
            "recipes, e.g. {'Conv_0': jqx.int8_weight_only(), '.*': recipe}."
        )
    return shape[:-2] + (cin if group_size is None else int(group_size), 1)


# --------------------------------------------------------------------------- core math


_TINY = float(np.finfo(np.float32).tiny)
_MAX = float(np.finfo(np.float32).max)
# Above this a scale's reciprocal is subnormal (see div_by_scale).
_BIG_SCALE = 2.0**100


def nan_max(x: jax.Array, axis=None, keepdims: bool = False) -> jax.Array:
    """``jnp.max`` that keeps a NaN visible: a NaN counts as ``+inf``.

    XLA:CPU's vectorised max reduction drops NaN at some shapes (rows of 130 floats
    from 40 rows on, of 384 from 16; openxla/xla#21461), so a block holding a NaN
    would get a finite scale and its NaN would quietly become a number. Read as
    ``+inf``, it makes the result non-finite on every platform, which every scale
    formula treats as a block that is not finite. The block maxima of the scale
    formulas here, of MX and NVFP4, of the GPTQ/HQQ grid and of the KV caches go
    through here (or :func:`nan_min`).

    Example:
        >>> import jax.numpy as jnp
        >>> nan_max(jnp.array([[1.0, jnp.nan], [2.0, 3.0]]), axis=1).tolist()
        [inf, 3.0]
    """
    return jnp.max(jnp.where(jnp.isnan(x), jnp.inf, x), axis=axis, keepdims=keepdims)


def nan_min(x: jax.Array, axis=None, keepdims: bool = False) -> jax.Array:
    """``jnp.min`` with a NaN counted as ``-inf`` (see :func:`nan_max`).

    Example:
        >>> import jax.numpy as jnp
        >>> nan_min(jnp.array([1.0, jnp.nan])).tolist()
        -inf
    """
    return jnp.min(jnp.where(jnp.isnan(x), -jnp.inf, x), axis=axis, keepdims=keepdims)


def hadamard_block(n: int) -> int:
    """The size of :func:`hadamard_rotate`'s blocks for a last axis of ``n``: the largest
    power of two that divides ``n`` (1 for odd ``n``: no rotation).

    Example:
        >>> hadamard_block(64), hadamard_block(96), hadamard_block(7)
        (64, 32, 1)
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"hadamard_block: n={n!r} must be a positive int (an axis length).")
    return int(n) & -int(n)


def hadamard_rotate(x: jax.Array) -> jax.Array:
    """``x`` times the block-diagonal orthonormal Hadamard matrix along its last axis
    (blocks of :func:`hadamard_block` of its length, each Sylvester's matrix of that
    order divided by its square root). The matrix is symmetric and orthogonal, so the
    rotation is its own inverse and keeps dot products:
    ``rot(q) . rot(k) = q . k``, ``rot(rot(x)) = x`` (up to float32 rounding).

    It spreads a few large channels over all of a block's channels. The fp8 KV cache
    stores its keys and values rotated (:func:`jqx.ops.attention.kv_write`), which
    cuts E4M3's error in the attention scores (docs/guide/llm.md).

    Example:
        >>> import jax.numpy as jnp
        >>> hadamard_rotate(jnp.array([4.0, 0.0, 0.0, 0.0])).tolist()
        [2.0, 2.0, 2.0, 2.0]
    """
    d = x.shape[-1]
    b = hadamard_block(d)
    if b == 1:
        return x
    # The fast Walsh-Hadamard transform: log2(b) butterfly stages of sums and
    # differences, one elementwise fusion on XLA (a decode step's rotations as 64 x 64
    # dots cost a library call each), then one scaling by 1/sqrt(b).
    lead = x.shape[:-1]
    y = x
    h = 1
    while h < b:
        y = y.reshape(*lead, d // (2 * h), 2, h)
        lo, hi = y[..., 0, :], y[..., 1, :]
        y = jnp.stack([lo + hi, lo - hi], axis=-2)
        h *= 2
    return y.reshape(x.shape) * jnp.asarray(1.0 / np.sqrt(b), x.dtype)


def keep_nan_rows(x: jax.Array, s: jax.Array, axes) -> jax.Array:
    """A static activation scale ``s`` made NaN for the rows of ``x`` (reduced over
    ``axes``, kept as size-1 dims) that hold a NaN.

    int8 has no NaN code (XLA converts NaN to 0), so under a given scale a NaN input
    would otherwise leave a static product finite. A dynamic scale needs no such
    step: :func:`absmax_scale` already turns those rows' scale to ``inf``.

    Example:
        >>> import jax.numpy as jnp
        >>> x = jnp.array([[1.0, jnp.nan], [2.0, 3.0]])
        >>> keep_nan_rows(x, jnp.array([[0.5]]), -1).ravel().tolist()
        [nan, 0.5]
    """
    return jnp.where(jnp.any(jnp.isnan(x), axis=axes, keepdims=True), jnp.nan, s)


def div_by_scale(x: jax.Array, s: jax.Array) -> jax.Array:
    """``x / s`` that stays right for scales near float32's limit.

    XLA:CPU divides by multiplying with the reciprocal and flushes subnormals,
    so for ``s`` above about ``1 / tiny`` (8.5e37) a plain ``x / s`` is 0.
    Scaling both by the same power of two is exact and keeps the reciprocal
    normal; small ``x`` that underflow there round to code 0 either way.

    Example:
        >>> import jax.numpy as jnp
        >>> div_by_scale(jnp.array([1e38, -2e38]), jnp.array(1e38)).tolist()
        [1.0, -2.0]
    """
    c = jnp.where(s > _BIG_SCALE, 2.0**-64, 1.0).astype(jnp.float32)
    return (x * c) / (s * c)


def _blocked(x: jax.Array, block: tuple[int, ...]) -> jax.Array:
    dims = []
    for s, b in zip(x.shape, block, strict=True):
        dims += [s // b, b]
    return x.reshape(dims)


def scale_from_minmax(
    mn: jax.Array,
    mx: jax.Array,
    *,
    qmin: float,
    qmax: float,
    scheme: Scheme = "absmax",
    denom: float | None = None,
    convention: Convention = "jqx",
    round_zero: bool = True,
) -> tuple[jax.Array, jax.Array | None]:
    """The seed formulas from a block's min and max: the one home of scale and zero point.

    Every scale and zero point in jqx (round to nearest, GPTQ, HQQ's start,
    AWQ, QAT's initial scales) comes from here.

    - ``scheme="absmax"``: ``S = max(|mn|, |mx|) / denom`` with ``denom``
      ``qmax`` for integer grids (the default), ``(qmax - qmin) / 2`` with
      ``convention="torchao"``, or the format's largest magnitude for float and
      table formats (pass it as ``denom``). No zero point.
    - ``scheme="zero_point"``: ``S = (mx - mn) / (qmax - qmin)``,
      ``Z = round(qmin - mn / S)``; ``convention="torchao"`` widens the range
      to include 0 and clamps ``Z`` into ``[qmin, qmax]``. ``round_zero=False``
      leaves ``Z = qmin - mn / S`` unrounded (a float zero point, added before
      rounding: ``encode_int(..., float_zero=True)``), so ``mn`` and ``mx`` land
      exactly on codes ``qmin`` and ``qmax``.

    Guards: a constant block gets ``S = |c|`` (1 for all-zero), so it
    reconstructs exactly; a scale below float32's smallest normal is raised to
    it (XLA:CPU flushes subnormals, which would divide by zero); ``mx - mn`` is
    formed without overflow near float32's limit; a block holding NaN or Inf
    gets a NaN scale (and zero point), so its NaN reaches every output.

    Args:
      mn, mx: per-block minimum and maximum (any broadcastable shapes).
      qmin, qmax: the code range.
      scheme: ``"absmax"`` or ``"zero_point"``.
      denom: the absmax divisor (see above); default ``qmax``.
      convention: ``"jqx"`` or ``"torchao"``.
      round_zero: round the zero point to an integer (default; see above).

    Returns:
      ``(scale, zero_point)`` as float32 (``zero_point`` None for absmax).

    Example:
        >>> import jax.numpy as jnp
        >>> s, z = scale_from_minmax(jnp.array(-1.0), jnp.array(4.0), qmin=0, qmax=15,
        ...                          scheme="zero_point")
        >>> round(float(s), 6), float(z)
        (0.333333, 3.0)
        >>> _, z = scale_from_minmax(jnp.array(-1.1), jnp.array(4.0), qmin=0, qmax=15,
        ...                          scheme="zero_point", round_zero=False)
        >>> round(float(z), 4)
        3.2353
    """
    mn = jnp.asarray(mn, jnp.float32)
    mx = jnp.asarray(mx, jnp.float32)
    # max/min propagate NaN and keep +-inf: a block with either gets a NaN scale,
    # so everything that reads it (dequantize, matmul outputs) is NaN, never garbage.
    finite = jnp.isfinite(mn) & jnp.isfinite(mx)
    constant = mx == mn
    cabs = jnp.abs(mx)
    const_scale = jnp.where(cabs > 0, cabs, 1.0)
    if scheme == "absmax":
        if denom is None:
            denom = (qmax - qmin) / 2.0 if convention == "torchao" else qmax
        amax = jnp.maximum(jnp.abs(mx), jnp.abs(mn))
        s = jnp.maximum(amax / denom, _TINY)
        s = jnp.where(constant, const_scale, s)
        return jnp.where(finite, s, jnp.nan), None
    if scheme == "zero_point":
        if convention == "torchao":
            mn = jnp.minimum(mn, 0.0)
            mx = jnp.maximum(mx, 0.0)
            constant = mx == mn
        d = qmax - qmin
        rng = mx - mn
        # mx - mn overflows to inf when both ends are near float32 max.
        s = jnp.where(jnp.isfinite(rng), rng / d, mx / d - mn / d)
        s = jnp.maximum(s, _TINY)
        s = jnp.where(constant, const_scale, s)
        s = jnp.where(finite, s, jnp.nan)
        z = qmin - div_by_scale(mn, s)
        if round_zero:
            z = jnp.round(z)
        if convention == "torchao":
            z = jnp.clip(z, qmin, qmax)
        return s, z
    raise ValueError(f"scheme={scheme!r} is not supported; use 'absmax' or 'zero_point'.")


def compute_scale(
    x: jax.Array,
    fmt: _formats.Format,
    block: tuple[int, ...],
    scheme: Scheme = "absmax",
    *,
    symmetric_range: bool = False,
    convention: Convention = "jqx",
) -> tuple[jax.Array, jax.Array | None]:
    """Scale (and zero point) per block, in the blocked view ``(n0, 1, n1, 1, ...)``.

    :func:`scale_from_minmax` on each block's min and max, with the code range
    of ``fmt`` (the sign-magnitude range with ``symmetric_range``).

    Example:
        >>> import jax.numpy as jnp, jqx
        >>> s, z = compute_scale(jnp.array([[-1.0, 4.0]]), jqx.formats.get("uint4"), (1, 2),
        ...                      "zero_point")
        >>> round(float(s.ravel()[0]), 6), float(z.ravel()[0])
        (0.333333, 3.0)
    """
    check_scheme(scheme, fmt)
    xb = _blocked(x.astype(jnp.float32), block)
    red = tuple(range(1, xb.ndim, 2))
    mx = nan_max(xb, axis=red, keepdims=True)
    mn = nan_min(xb, axis=red, keepdims=True)
    qmin, qmax = code_range(fmt, symmetric_range)
    denom = None if fmt.kind == "int" else fmt.max
    return scale_from_minmax(
        mn, mx, qmin=qmin, qmax=qmax, scheme=scheme, denom=denom, convention=convention
    )


def code_range(fmt: _formats.Format, symmetric_range: bool = False) -> tuple[float, float]:
    """``(qmin, qmax)`` of ``fmt``'s codes; signed ints lose their lowest code
    with ``symmetric_range`` (sign-magnitude range). Float and table formats:
    ``(-max, max)``.

    Example:
        >>> import jqx
        >>> code_range(jqx.formats.get("int8"), symmetric_range=True)
        (-127.0, 127.0)
    """
    if fmt.kind == "int":
        return float(fmt.qmin_symmetric if symmetric_range else fmt.qmin), float(fmt.qmax)
    return -float(fmt.max), float(fmt.max)


def encode_int(
    x: jax.Array,
    s: jax.Array,
    z: jax.Array | None,
    *,
    qmin: float,
    qmax: float,
    float_zero: bool = False,
    near_limit: bool = True,
) -> jax.Array:
    """Integer codes (as float32) of ``x`` under scale ``s`` and zero point ``z``:
    ``clamp(round(x / s) + z)``, round half to even.

    An integer zero point is added after rounding (the seed formula); a float
    zero point (HQQ, ``float_zero=True``) before rounding. ``near_limit=False``
    skips the guards for scales near float32's limit (:func:`div_by_scale`, and
    a code range that keeps ``(q - z) * s`` finite): only for callers that
    checked ``s <= 2**100`` themselves.

    Example:
        >>> import jax.numpy as jnp
        >>> encode_int(jnp.array([0.5, 1.5, 9.0]), jnp.array(1.0), None, qmin=-8, qmax=7).tolist()
        [0.0, 2.0, 7.0]
    """
    xs = div_by_scale(x, s) if near_limit else x / s
    if z is None:
        return jnp.clip(jnp.round(xs), qmin, qmax)
    q = jnp.round(xs + z) if float_zero else jnp.round(xs) + z
    if not near_limit:
        return jnp.clip(q, qmin, qmax)
    lo, hi = _finite_code_range(s, z, qmin, qmax)
    return jnp.clip(q, lo, hi)


def _finite_code_range(s, z, qmin: float, qmax: float):
    """Per-block code range whose ``(q - z) * s`` stays finite: near float32's limit
    the zero point shifts the grid, and its outermost point can round past the largest
    finite value. Elsewhere this is ``(qmin, qmax)``."""
    lim = jnp.floor(div_by_scale(jnp.float32(_MAX), s))
    lim = jnp.where(jnp.isfinite(lim * s), lim, lim - 1)
    return jnp.maximum(qmin, jnp.ceil(z - lim)), jnp.minimum(qmax, jnp.floor(z + lim))


def absmax_scale(x: jax.Array, axes, fmt: str | _formats.Format) -> jax.Array:
    """Dynamic activation scale: ``max|x|`` over ``axes`` (kept as size-1 dims)
    divided by the format's largest magnitude; an all-zero row gets scale 1, a row
    holding NaN or inf gets ``inf`` (:func:`nan_max`), so its products are NaN.

    ``axes=None`` reduces over everything (per tensor; the result has ``x``'s
    rank with all dims 1). Per token is ``axes=-1`` (or the contraction axes).

    Example:
        >>> import jax.numpy as jnp
        >>> absmax_scale(jnp.array([[1.0, -254.0], [0.0, 0.0]]), -1, "int8").ravel().tolist()
        [2.0, 1.0]
    """
    fmt = _formats.get(fmt)
    xf = jnp.abs(x.astype(jnp.float32))
    if axes is None:
        amax = nan_max(xf).reshape((1,) * x.ndim)
    else:
        amax = nan_max(xf, axis=axes, keepdims=True)
    s = amax / fmt.max
    # Only an all-zero row gets 1; a row holding NaN or inf gets inf (nan_max): its
    # codes are 0 (a NaN's included) and its products NaN.
    return jnp.where(s == 0, 1.0, s).astype(jnp.float32)


# The second level's step of the two-level split: 2^-8 of the first's.
TWO_LEVEL_STEP = 2.0**-8


def two_level_scales(x: jax.Array, axes) -> tuple[jax.Array, jax.Array]:
    """The scales ``(s1, s2)`` of int8 weight-only's two-level activation split,
    ``x = s1*q1 + s2*q2 + r`` with int8 ``q1``, ``q2`` (``jqx.ops``' two-level
    products): ``s1`` is :func:`absmax_scale` over ``axes`` rounded up to 16
    significant bits, ``s2 = s1 * 2^-8``.

    Both choices make the split's float arithmetic exact where a compiler may fuse a
    multiply into an add (XLA:CPU does, depending on the program around it): ``q1 *
    s1`` is exact (8 by 16 bits), so ``x - q1 * s1`` rounds once, fused or not; and
    a level-2 sum times ``2^-8`` is exact, so ``sum1 + sum2 * 2^-8`` rounds once too.
    ``|r| <= s2 / 2`` (``<= s2`` where ``x / s1`` is an exact tie), ``s2 <= max|x| /
    32511``.

    Example:
        >>> import jax.numpy as jnp
        >>> s1, s2 = two_level_scales(jnp.array([[1.0, -127.0]]), -1)
        >>> float(s1[0, 0]), float(s2[0, 0])
        (1.0, 0.00390625)
    """
    s = absmax_scale(x, axes, "int8")
    bits = jax.lax.bitcast_convert_type(s, jnp.uint32)
    bits = (bits + jnp.uint32(0xFF)) & jnp.uint32(0xFFFFFF00)  # inf and NaN stay
    s1 = jax.lax.bitcast_convert_type(bits, jnp.float32)
    return s1, s1 * TWO_LEVEL_STEP


def _encode_blocked(xb, s, z, fmt, symmetric_range, near_limit=True):
    if fmt.kind == "int":
        qmin, qmax = code_range(fmt, symmetric_range)
        codes = encode_int(xb, s, z, qmin=qmin, qmax=qmax, near_limit=near_limit)
        return _formats.encode(codes, fmt)
    return _formats.encode(div_by_scale(xb, s) if near_limit else xb / s, fmt)


def encode_codes(x, fmt, block, s, z, symmetric_range=False, near_limit=True) -> jax.Array:
    """Stored codes of ``x`` (logical shape, not packed) under a per-block scale
    ``s`` and zero point ``z`` given in the blocked view (n0, 1, n1, 1, ...);
    ``near_limit`` as in :func:`encode_int`."""
    xb = _blocked(x.astype(jnp.float32), block)
    return _encode_blocked(xb, s, z, fmt, symmetric_range, near_limit).reshape(x.shape)


def make_qarray(
    codes: jax.Array,
    scale: jax.Array,
    zero_point: jax.Array | None = None,
    *,
    fmt: str | _formats.Format,
    shape: Sequence[int],
    dtype,
    block: Sequence[int],
    in_scale: jax.Array | None = None,
    act_scale: jax.Array | None = None,
    act: ActSpec | None = None,
    scale_dtype=jnp.float32,
    zero_kind: Literal["code", "min"] = "code",
    code_bits: int | None = None,
    super_scale: jax.Array | None = None,
    super_zero: jax.Array | None = None,
    super_block: Sequence[int] | None = None,
    g_idx: jax.Array | None = None,
) -> QArray:
    """The one place a :class:`QArray` is built from codes and scales.

    Args:
      codes: codes in the logical ``shape``: either already stored codes (the
        format's storage dtype, e.g. from :func:`jqx.formats.encode`) or exact
        code values in any dtype (e.g. float32 integers from a GPTQ loop), which
        are encoded here. 4-bit codes are packed two per byte here, FP6 codes
        four per three bytes (:func:`jqx.core.qarray.pack_codes`).
      scale, zero_point: per block, any shape with ``prod(shape // block)``
        elements; stored as ``scale_dtype``.
      fmt: the format of the codes.
      shape, dtype: the logical array's shape and dtype.
      block: per-axis block sizes (``scale.shape == shape // block``).
      in_scale: per-input-channel factor (AWQ/SmoothQuant), stored as float32.
      act_scale, act: the static activation scale and the activation spec.
      scale_dtype: dtype of the stored scale and zero point (with two-level
        scales: of ``super_scale`` and ``super_zero``).
      zero_kind: ``"code"`` (``zero_point`` is subtracted from the codes before
        scaling) or ``"min"`` (a float minimum added after scaling, as in GGUF).
      code_bits: 5 or 6 for codes wider than 4 bits in the ``int8``/``uint8``
        container: stored as a 4-bit low plane (``qvalue``) and a high-bit plane
        (``qhigh``); None otherwise.
      super_scale, super_zero, super_block: two-level scales: ``scale`` (and
        ``zero_point`` when ``super_zero`` is given) are integer codes per block,
        kept in their dtype; ``super_scale`` (``super_zero``) has one float per
        ``super_block``, stored as ``scale_dtype``.
      g_idx: the group of each index of the group axis (the one axis whose block is
        above 1), stored as int32; checked by :func:`check_g_idx`. None: index ``i``
        is in group ``i // block``.

    Example:
        >>> import jax.numpy as jnp
        >>> q = make_qarray(jnp.array([[3.0, -2.0]]), jnp.array(0.5), fmt="int4", shape=(1, 2),
        ...                 dtype="float32", block=(1, 2))
        >>> q.qvalue.shape, q.dequantize().tolist()
        ((1, 1), [[1.5, -1.0]])
    """
    fmt = _formats.get(fmt)
    shape = tuple(int(s) for s in shape)
    block = tuple(int(b) for b in block)
    qhigh = None
    if isinstance(codes, np.ndarray) and codes.dtype == fmt.dtype and code_bits is None:
        # stored codes from the host (a file's): packed with numpy, no compile per shape
        codes = jnp.asarray(pack_codes(codes, fmt))
    else:
        codes = jnp.asarray(codes)
        if codes.dtype != jnp.dtype(fmt.dtype):
            codes = _formats.encode(codes, fmt)
        if code_bits is not None:
            codes, qhigh = _split_code_planes(codes, fmt, code_bits)
        else:
            codes = pack_codes(codes, fmt)
    nb = tuple(s // b for s, b in zip(shape, block, strict=True))
    _check_layout_extensions(zero_kind, zero_point, super_scale, super_zero, super_block, scale)
    two_level_zero = super_zero is not None
    if super_scale is not None:
        super_block = tuple(int(b) for b in super_block)
        ns = _super_blocks(shape, block, super_block)
        scale = jnp.asarray(scale).reshape(nb)
        super_scale = jnp.asarray(super_scale).reshape(ns).astype(scale_dtype)
        if two_level_zero:
            super_zero = jnp.asarray(super_zero).reshape(ns).astype(scale_dtype)
    else:
        scale = jnp.asarray(scale).reshape(nb).astype(scale_dtype)
        super_block = None
    if zero_point is not None:
        zero_point = jnp.asarray(zero_point).reshape(nb)
        if not two_level_zero:
            zero_point = zero_point.astype(scale_dtype)
    if g_idx is not None:
        if super_scale is not None:
            raise ValueError(
                "g_idx with super_scale: a group index per row is not supported with "
                "two-level scales; pass one of them."
            )
        g_idx = check_g_idx(g_idx, shape, block)
    return stored_qarray(
        g_idx=g_idx,
        qvalue=codes,
        scale=scale,
        zero_point=zero_point,
        in_scale=None if in_scale is None else jnp.asarray(in_scale).astype(jnp.float32),
        act_scale=act_scale,
        qhigh=qhigh,
        super_scale=super_scale,
        super_zero=super_zero,
        format=fmt.name,
        shape=shape,
        dtype=dtype,
        block=block,
        act=act,
        zero_kind=zero_kind,
        code_bits=code_bits,
        super_block=super_block,
    )


def stored_qarray(
    *,
    qvalue: jax.Array,
    scale: jax.Array,
    zero_point: jax.Array | None = None,
    in_scale: jax.Array | None = None,
    act_scale: jax.Array | None = None,
    qhigh: jax.Array | None = None,
    super_scale: jax.Array | None = None,
    super_zero: jax.Array | None = None,
    g_idx: jax.Array | None = None,
    format: str,
    shape: Sequence[int],
    dtype,
    block: Sequence[int],
    act: ActSpec | None = None,
    zero_kind: Literal["code", "min"] = "code",
    code_bits: int | None = None,
    super_block: Sequence[int] | None = None,
    code_layout: Literal["plain", "vnni"] = "plain",
) -> QArray:
    """A :class:`QArray` from children already in their stored form (packed codes,
    per-block scales in their stored dtype), e.g. read back from a checkpoint.
    :func:`make_qarray` builds the children from codes and scales and ends here; the
    static fields are normalised (tuples, dtype and format names) in this one place.

    Example:
        >>> import jax.numpy as jnp
        >>> q = stored_qarray(qvalue=jnp.array([[2, -1]], jnp.int8), scale=jnp.array([[0.5]]),
        ...                   format="int8", shape=(1, 2), dtype="float32", block=(1, 2))
        >>> q.dequantize().tolist()
        [[1.0, -0.5]]
    """
    return QArray(
        qvalue=qvalue,
        scale=scale,
        zero_point=zero_point,
        in_scale=in_scale,
        act_scale=act_scale,
        format=_formats.get(format).name,
        shape=tuple(int(n) for n in shape),
        dtype=jnp.dtype(dtype).name,
        block=tuple(int(b) for b in block),
        act=act,
        zero_kind=zero_kind,
        code_bits=None if code_bits is None else int(code_bits),
        super_block=None if super_block is None else tuple(int(b) for b in super_block),
        qhigh=qhigh,
        super_scale=super_scale,
        super_zero=super_zero,
        g_idx=g_idx,
        code_layout=code_layout,
    )


def check_g_idx(
    g_idx, shape: Sequence[int], block: Sequence[int], name: str = "g_idx"
) -> jax.Array:
    """``g_idx`` as int32 after checking that it is a group map for a QArray of this
    ``shape`` and ``block``: one block axis above 1 (the group axis), ``g_idx`` 1-D with
    one entry per index of that axis, and (when concrete) every entry in ``[0,
    groups)``.

    Raises:
      ValueError: the message names ``name``, what it got and what is accepted.

    Example:
        >>> import numpy as np
        >>> check_g_idx(np.array([1, 0, 1, 0]), (3, 4), (1, 2)).tolist()
        [1, 0, 1, 0]
    """
    shape, block = tuple(int(s) for s in shape), tuple(int(b) for b in block)
    big = [i for i, b in enumerate(block) if b > 1]
    if len(big) > 1:
        raise ValueError(
            f"{name}: a group index needs groups along one axis; block {block} of shape "
            f"{shape} groups along axes {big}. Use a block with one size above 1, e.g. (1, 128)."
        )
    ax = big[-1] if big else len(shape) - 1
    groups = shape[ax] // block[ax]
    g = jnp.asarray(g_idx)
    if g.ndim != 1 or g.shape[0] != shape[ax] or not jnp.issubdtype(g.dtype, jnp.integer):
        raise ValueError(
            f"{name} must be a 1-D integer array with one group index per index of axis {ax} "
            f"(size {shape[ax]}) of shape {shape}; got shape {tuple(g.shape)}, dtype {g.dtype}."
        )
    if not isinstance(g, jax.core.Tracer):
        gn = np.asarray(g)
        bad = np.flatnonzero((gn < 0) | (gn >= groups))
        if bad.size:
            raise ValueError(
                f"{name} is not a valid group map: entry {int(bad[0])} is {int(gn[bad[0]])}, "
                f"but there are {groups} groups (axis {ax} of size {shape[ax]}, group size "
                f"{block[ax]}); every entry must lie in [0, {groups})."
            )
    return g.astype(jnp.int32)


def _split_code_planes(codes, fmt: _formats.Format, code_bits) -> tuple[jax.Array, jax.Array]:
    """5- and 6-bit codes (in their 8-bit container) as a packed low-nibble plane and
    a packed high-bit plane (two's complement bits for signed codes)."""
    if code_bits not in (5, 6) or fmt.kind != "int" or fmt.bits != 8:
        raise ValueError(
            f"code_bits={code_bits!r} with format={fmt.name!r}: codes of 5 or 6 bits live in "
            "the int8 or uint8 container; use code_bits=5 or 6 with fmt='int8' or 'uint8' "
            "(4- and 8-bit codes need no code_bits)."
        )
    half = 1 << (code_bits - 1)
    lo, hi = (-half, half - 1) if fmt.signed else (0, 2 * half - 1)
    codes = jnp.clip(codes, lo, hi)
    low = (codes & 0xF).astype(jnp.uint8)
    high = ((codes >> 4) & ((1 << (code_bits - 4)) - 1)).astype(jnp.uint8)
    return pack_4bit(low), pack_bits(high, code_bits - 4)


def _check_layout_extensions(zero_kind, zero_point, super_scale, super_zero, super_block, scale):
    if zero_kind not in ("code", "min"):
        raise ValueError(
            f"zero_kind={zero_kind!r} is not supported; use 'code' (zero point subtracted "
            "from the codes) or 'min' (float minimum added after scaling)."
        )
    if zero_kind == "min" and zero_point is None:
        raise ValueError("zero_kind='min' needs the minimum: pass it as zero_point.")
    if super_zero is not None and (zero_point is None or super_scale is None):
        raise ValueError(
            "super_zero scales integer zero_point codes in a two-level layout: pass "
            "zero_point (the codes) and super_scale with super_block as well."
        )
    if super_scale is not None:
        if super_block is None:
            raise ValueError("super_scale needs super_block (the super-block size per axis).")
        named = [("scale", scale)]
        if super_zero is not None:
            named.append(("zero_point", zero_point))
        for name, c in named:
            dt = jnp.asarray(c).dtype
            # NVFP4's block scales are FP8 E4M3 codes under a float32 per-tensor scale.
            if not (jnp.issubdtype(dt, jnp.integer) or dt == jnp.float8_e4m3fn):
                raise TypeError(
                    f"with super_scale, {name} holds integer (or FP8 E4M3) codes per block; "
                    f"got dtype {dt}. Pass the codes (e.g. uint8) and the float factor as "
                    "super_scale."
                )


def _super_blocks(shape, block, super_block) -> tuple[int, ...]:
    """``shape // super_block`` after checking that blocks tile each super-block."""
    ok = len(super_block) == len(shape) and all(
        sb > 0 and sb % b == 0 and s % sb == 0
        for s, b, sb in zip(shape, block, super_block, strict=False)
    )
    if not ok:
        raise ValueError(
            f"super_block={super_block} must have one size per axis of shape {shape}, be a "
            f"multiple of block={block} and divide the shape (e.g. block (1, 32) with "
            "super_block (1, 256))."
        )
    return tuple(s // sb for s, sb in zip(shape, super_block, strict=True))


@functools.partial(
    jax.jit,
    static_argnames=(
        "fmt_name",
        "block",
        "scheme",
        "symmetric_range",
        "convention",
        "scale_dtype",
        "act",
    ),
)
def _quantize_core(x, fmt_name, block, scheme, symmetric_range, convention, scale_dtype, act):
    fmt = _formats.get(fmt_name)
    common = dict(fmt=fmt, shape=x.shape, dtype=x.dtype, block=block, act=act)
    if fmt.is_wide_float:
        # encode() clips before the cast, so a value beyond the format's max
        # saturates instead of becoming inf.
        nb = tuple(s // b for s, b in zip(x.shape, block, strict=True))
        finite = jnp.all(jnp.isfinite(x))
        # The unit scale turns NaN with the input, as the seed formats' scales do.
        unit = jnp.where(finite, jnp.ones(nb), jnp.nan)
        return make_qarray(_formats.encode(x, fmt), unit, scale_dtype=scale_dtype, **common), finite
    s, z = compute_scale(
        x, fmt, block, scheme, symmetric_range=symmetric_range, convention=convention
    )
    # A block holding NaN/Inf has a NaN scale (scale_from_minmax): no second pass over x.
    finite = jnp.all(jnp.isfinite(s))
    if jnp.dtype(scale_dtype) != jnp.float32:
        # Round a narrow stored scale up, so the largest value still fits the grid.
        sr = s.astype(scale_dtype)
        s = jnp.where(
            sr.astype(jnp.float32) < s, jnp.nextafter(sr, jnp.asarray(jnp.inf, sr.dtype)), sr
        )
    s = s.astype(scale_dtype)
    # Quantize with the scale as stored, so dequantization sees the same number.
    s32 = s.astype(jnp.float32)

    def encode(near_limit):
        return lambda: encode_codes(x, fmt, block, s32, z, symmetric_range, near_limit)

    # The guards for scales near float32's limit cost a pass: run them only when needed.
    q = jax.lax.cond(jnp.any(s32 > _BIG_SCALE), encode(True), encode(False))
    return make_qarray(q, s, z, scale_dtype=scale_dtype, **common), finite


def _check_float_input(x, path):
    where = f" at {path}" if path else ""
    if not jnp.issubdtype(x.dtype, jnp.floating):
        fix = (
            f"Exclude this leaf with a rule mapping it to None (e.g. {{{path!r}: None}}) or a "
            "filter_fn that rejects it."
            if path
            else "Cast it to a float dtype first (e.g. x.astype(jnp.float32))."
        )
        raise TypeError(
            f"only floating-point arrays can be quantized; got dtype={x.dtype}{where}. {fix}"
        )


_SCALE_DTYPES = ("float32", "bfloat16", "float16")


def check_scale_dtype(scale_dtype) -> np.dtype:
    try:
        dt = jnp.dtype(scale_dtype)
    except TypeError:
        dt = None
    if dt is None or dt.name not in _SCALE_DTYPES:
        raise ValueError(
            f"scale_dtype={scale_dtype!r} is not supported; use one of {', '.join(_SCALE_DTYPES)} "
            "(float32 is the default)."
        )
    return dt


def quantize_array(
    x: jax.Array,
    fmt: str | _formats.Format = "int8",
    *,
    scheme: Scheme = "absmax",
    granularity: Granularity | None = None,
    symmetric_range: bool = False,
    convention: Convention = "jqx",
    scale_dtype=jnp.float32,
    act: ActSpec | None = None,
    path: str | None = None,
) -> QArray:
    """Quantizes one array.

    Args:
      x: floating-point array.
      fmt: format name or :class:`jqx.formats.Format`.
      scheme: ``"absmax"`` (symmetric) or ``"zero_point"`` (asymmetric, ints only).
      granularity: a :class:`Granularity` (default per-tensor).
      symmetric_range: clamp signed ints to [-qmax, qmax] (sign-magnitude range).
      convention: ``"jqx"`` (the formulas above) or ``"torchao"`` (torchao/qwix).
      scale_dtype: dtype scales and zero points are stored in.
      act: activation spec recorded on the result (see :class:`ActSpec`).
      path: name used in error messages.

    Returns:
      A :class:`QArray`.

    Example:
        >>> import jax.numpy as jnp
        >>> q = quantize_array(jnp.arange(8.0).reshape(2, 4), "uint4", scheme="zero_point",
        ...                    granularity=per_token())
        >>> jnp.round(q.dequantize(), 4).tolist()
        [[0.0, 1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0]]
    """
    fmt = _formats.get(fmt)
    x = jnp.asarray(x)
    _check_float_input(x, path)
    check_scheme(scheme, fmt)
    check_convention(convention)
    scale_dtype = check_scale_dtype(scale_dtype)
    check_granularity(granularity)
    check_not_empty(x.shape, path)
    block = (granularity or per_tensor()).resolve(x.shape, path)
    if fmt.is_wide_float:
        block = tuple(x.shape)  # a plain cast: one unit scale
    q, finite = _quantize_core(
        x, fmt.name, block, scheme, bool(symmetric_range), convention, scale_dtype, act
    )
    check_finite_flag(finite, path)
    return q


def dequantize_array(q: QArray, dtype=None) -> jax.Array:
    """``q.dequantize(dtype)``."""
    return q.dequantize(dtype)


# --------------------------------------------------------------------------- fake quant


def fake_quant(
    x: jax.Array,
    fmt: str | _formats.Format = "int8",
    *,
    scheme: Scheme = "absmax",
    granularity: Granularity | None = None,
    symmetric_range: bool = False,
    convention: Convention = "jqx",
) -> jax.Array:
    """Quantize-then-dequantize with a straight-through gradient.

    The forward value equals ``quantize_array(x, ...).dequantize()``; the
    gradient with respect to ``x`` is the identity (the scale is computed
    from ``x`` itself, so no value is clipped). For clipped STE with learned
    scales see ``jqx.qat``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> jax.grad(lambda x: fake_quant(x, "int4").sum())(jnp.ones(3)).tolist()
        [1.0, 1.0, 1.0]
    """
    fmt = _formats.get(fmt)
    block = (granularity or per_tensor()).resolve(x.shape)
    return _fake_quant(x, fmt.name, block, scheme, symmetric_range, convention)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4, 5))
def _fake_quant(x, fmt_name, block, scheme, symmetric_range, convention):
    return _fq_value(x, fmt_name, block, scheme, symmetric_range, convention)


def _fq_value(x, fmt_name, block, scheme, symmetric_range, convention):
    fmt = _formats.get(fmt_name)
    if fmt.is_wide_float:
        return _formats.encode(x, fmt).astype(x.dtype)
    s, z = compute_scale(
        x, fmt, block, scheme, symmetric_range=symmetric_range, convention=convention
    )
    xb = _blocked(x.astype(jnp.float32), block)
    codes = _encode_blocked(xb, s, z, fmt, symmetric_range)
    v = _formats.decode(codes, fmt, jnp.float32)
    if z is not None:
        v = v - z
    return (v * s).reshape(x.shape).astype(x.dtype)


def _fq_fwd(x, fmt_name, block, scheme, symmetric_range, convention):
    return _fq_value(x, fmt_name, block, scheme, symmetric_range, convention), None


def _fq_bwd(fmt_name, block, scheme, symmetric_range, convention, _, g):
    return (g,)


_fake_quant.defvjp(_fq_fwd, _fq_bwd)


# --------------------------------------------------------------------------- activations


def quantize_activation(
    x: jax.Array,
    fmt: str | _formats.Format = "int8",
    granularity: Literal["per_token", "per_tensor"] = "per_token",
    scale: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Dynamic (or static, when ``scale`` is given) symmetric activation quantizer.

    Usable inside jit. Returns ``(codes, scale)``: int8 or fp8 codes with the
    shape of ``x`` and a float32 scale of shape ``x.shape[:-1] + (1,)``
    (per-token) or ``(1,) * x.ndim`` (per-tensor); ``x ~= codes * scale``.

    Example:
        >>> import jax.numpy as jnp
        >>> q, s = quantize_activation(jnp.array([[1.0, -2.0], [0.5, 0.25]]))
        >>> q.tolist(), s.ravel().tolist()
        ([[64, -127], [127, 64]], [0.015748031437397003, 0.003937007859349251])
    """
    fmt = _formats.get(fmt)
    xf = x.astype(jnp.float32)
    if scale is None:
        if granularity not in ("per_token", "per_tensor"):
            raise ValueError(
                f"granularity={granularity!r} is not supported; use 'per_token' or 'per_tensor'."
            )
        scale = absmax_scale(xf, -1 if granularity == "per_token" else None, fmt)
    else:
        scale = jnp.asarray(scale, jnp.float32)
    return _formats.encode(div_by_scale(xf, scale), fmt), scale


def quantize_activation_blocks(x: jax.Array, block: int = 32) -> tuple[jax.Array, jax.Array]:
    """int8 codes of ``x`` per block of ``block`` along its last axis, the way llama.cpp
    rounds a matmul's activations for its quantized weights (Q8_0 / Q8_1): ``d =
    max|x| / 127`` stored in float16, codes ``round(x * 127 / max|x|)`` (ties to even;
    the reciprocal of the float32 ``max|x|``, as its AVX2 path multiplies). A zero
    block gets ``d = 0`` and zero codes.

    Returns:
      ``(codes, d)``: int8 codes with the shape of ``x``, and float16 ``d`` of shape
      ``x.shape[:-1] + (x.shape[-1] // block,)``; ``x ~= codes * d`` per block.

    Raises:
      ValueError: the last axis is not a multiple of ``block``.

    Example:
        >>> import jax.numpy as jnp
        >>> c, d = quantize_activation_blocks(jnp.array([[1.0, -2.0, 0.5, 0.0]]), block=4)
        >>> c.tolist(), d.tolist()
        ([[64, -127, 32, 0]], [[0.0157470703125]])
    """
    k = x.shape[-1]
    if k % block:
        raise ValueError(
            f"quantize_activation_blocks: the last axis ({k}) is not a multiple of block={block}; "
            "per-block activation quantization needs whole blocks."
        )
    xb = x.astype(jnp.float32).reshape(x.shape[:-1] + (k // block, block))
    amax = nan_max(jnp.abs(xb), axis=-1)
    inv = jnp.where(amax > 0, 127.0 / jnp.where(amax > 0, amax, 1.0), 0.0)
    codes = jnp.round(xb * inv[..., None]).astype(jnp.int8).reshape(x.shape)
    return codes, (amax / 127.0).astype(jnp.float16)
