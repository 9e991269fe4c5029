"""Quantize / dequantize math on single arrays (framework-free).

The formulas (DESIGN.md), with round half to even throughout:

- absmax (symmetric): ``S = max|x| / qmax``; ``q = clamp(round(x / S))``.
- zero_point (asymmetric): ``S = (max - min) / (qmax - qmin)``;
  ``Z = round(qmin - min / S)``; ``q = clamp(round(x / S) + Z)``;
  ``x_hat = (q - Z) * S``.
- float and table formats: ``S = max|x| / fmt.max``; ``x / S`` rounded onto
  the format grid (ties to even, saturating).

Edge cases: a block whose values are all equal (all-zero included) gets
``S = |c|`` (1 for zero) so that it reconstructs exactly; NaN/Inf raise.

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

from jqx.core import formats as _formats
from jqx.core.qarray import ActSpec, QArray, pack_4bit

__all__ = [
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
            g = shape[ax] if self.group_size is None else int(self.group_size)
            if g <= 0 or shape[ax] % g:
                common = (8, 16, 32, 64, 96, 128, 256)
                divs = [d for d in common if shape[ax] % d == 0 and d < shape[ax]][-4:]
                divs = divs or [d for d in range(1, shape[ax] + 1) if shape[ax] % d == 0][-4:]
                raise ValueError(
                    f"group_size={self.group_size} does not divide axis {ax}{where} "
                    f"(size {shape[ax]}); use a divisor such as "
                    f"{', '.join(str(d) for d in divs)}, or group_size=None for per-channel."
                )
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
    if group_size is not None and (
        not isinstance(group_size, (int, np.integer)) or group_size <= 0
    ):
        raise ValueError(f"group_size={group_size!r} must be a positive int or None.")
    return Granularity("group", axes=(axis,), group_size=group_size)


def per_block(block_shape: Sequence[int]) -> Granularity:
    """Explicit block shape (e.g. 2-D blocks ``(128, 128)``)."""
    return Granularity("block", block_shape=tuple(int(b) for b in block_shape))


# --------------------------------------------------------------------------- core math


_TINY = float(np.finfo(np.float32).tiny)


def _blocked(x: jax.Array, block: tuple[int, ...]) -> jax.Array:
    dims = []
    for s, b in zip(x.shape, block, strict=True):
        dims += [s // b, b]
    return x.reshape(dims)


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

    The seed formulas (see the module docstring), plus two guards: a constant
    block gets ``S = |c|`` (1 for all-zero) so it reconstructs exactly, and a
    scale below float32's smallest normal is raised to it (XLA:CPU flushes
    subnormals to zero, which would divide by zero).

    Example:
        >>> import jax.numpy as jnp, jqx
        >>> s, z = compute_scale(jnp.array([[-1.0, 4.0]]), jqx.formats.get("uint4"), (1, 2),
        ...                      "zero_point")
        >>> round(float(s.ravel()[0]), 6), float(z.ravel()[0])
        (0.333333, 3.0)
    """
    xb = _blocked(x.astype(jnp.float32), block)
    red = tuple(range(1, xb.ndim, 2))
    mx = jnp.max(xb, axis=red, keepdims=True)
    mn = jnp.min(xb, axis=red, keepdims=True)
    constant = mx == mn
    cabs = jnp.abs(mx)
    const_scale = jnp.where(cabs > 0, cabs, 1.0)
    qmin = fmt.qmin_symmetric if symmetric_range else fmt.qmin
    qmax = fmt.qmax
    if scheme == "absmax":
        amax = jnp.maximum(jnp.abs(mx), jnp.abs(mn))
        if fmt.kind == "int":
            if convention == "torchao":
                denom = (qmax - qmin) / 2.0
            else:
                denom = qmax
        else:
            denom = fmt.max
        s = jnp.maximum(amax / denom, _TINY)
        s = jnp.where(constant, const_scale, s)
        return s, None
    if scheme == "zero_point":
        if fmt.kind != "int":
            raise ValueError(
                f"scheme='zero_point' needs an integer format, got format={fmt.name!r}; use "
                "scheme='absmax' for float and table formats."
            )
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
        z = jnp.round(qmin - mn / s)
        if convention == "torchao":
            z = jnp.clip(z, qmin, qmax)
        return s, z
    raise ValueError(f"scheme={scheme!r} is not supported; use 'absmax' or 'zero_point'.")


def _encode_blocked(xb, s, z, fmt, symmetric_range):
    if fmt.kind == "int":
        qmin = fmt.qmin_symmetric if symmetric_range else fmt.qmin
        q = jnp.round(xb / s)
        if z is not None:
            q = q + z
        q = jnp.clip(q, qmin, fmt.qmax)
        return _formats.encode(q, fmt)
    return _formats.encode(xb / s, fmt)


def _encode_codes(x, fmt, block, s, z, symmetric_range) -> jax.Array:
    """Stored codes of ``x`` (packed when 4-bit) under a per-block scale ``s``
    and zero point ``z`` given in the blocked view (n0, 1, n1, 1, ...)."""
    q = _encode_blocked(_blocked(x.astype(jnp.float32), block), s, z, fmt, symmetric_range)
    q = q.reshape(x.shape)
    return pack_4bit(q) if fmt.packed else q


@functools.partial(
    jax.jit,
    static_argnames=("fmt_name", "block", "scheme", "symmetric_range", "convention", "scale_dtype"),
)
def _quantize_core(x, fmt_name, block, scheme, symmetric_range, convention, scale_dtype):
    fmt = _formats.get(fmt_name)
    finite = jnp.all(jnp.isfinite(x))
    if fmt.is_wide_float:
        # encode() clips before the cast, so a value beyond the format's max
        # saturates instead of becoming inf.
        q = _formats.encode(x, fmt)
        return (
            q,
            jnp.ones(tuple(s // b for s, b in zip(x.shape, block, strict=True)), scale_dtype),
            None,
            finite,
        )
    s, z = compute_scale(
        x, fmt, block, scheme, symmetric_range=symmetric_range, convention=convention
    )
    if jnp.dtype(scale_dtype) != jnp.float32:
        # Round a narrow stored scale up, so the largest value still fits the grid.
        sr = s.astype(scale_dtype)
        s = jnp.where(
            sr.astype(jnp.float32) < s, jnp.nextafter(sr, jnp.asarray(jnp.inf, sr.dtype)), sr
        )
    s = s.astype(scale_dtype)
    # Quantize with the scale as stored, so dequantization sees the same number.
    sf = s.astype(jnp.float32)
    q = _encode_codes(x, fmt, block, sf, z, symmetric_range)
    nblocks = tuple(sz // b for sz, b in zip(x.shape, block, strict=True))
    s = s.reshape(nblocks)
    if z is not None:
        z = z.reshape(nblocks).astype(scale_dtype)
    return q, s, z, finite


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


def _check_scale_dtype(scale_dtype) -> np.dtype:
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
    if scheme not in ("absmax", "zero_point"):
        raise ValueError(f"scheme={scheme!r} is not supported; use 'absmax' or 'zero_point'.")
    if convention not in ("jqx", "torchao"):
        raise ValueError(f"convention={convention!r} is not supported; use 'jqx' or 'torchao'.")
    scale_dtype = _check_scale_dtype(scale_dtype)
    if granularity is not None and not isinstance(granularity, Granularity):
        raise TypeError(
            f"granularity={granularity!r} is not a jqx.Granularity; use jqx.per_tensor(), "
            "per_channel(axis), per_token(), per_group(group_size, axis) or per_block(shape)."
        )
    if scheme == "zero_point" and fmt.kind != "int":
        raise ValueError(
            f"scheme='zero_point' needs an integer format, got format={fmt.name!r}; use "
            "scheme='absmax' for float and table formats."
        )
    block = (granularity or per_tensor()).resolve(x.shape, path)
    if fmt.is_wide_float:
        block = tuple(x.shape)  # a plain cast: one unit scale
    q, s, z, finite = _quantize_core(
        x, fmt.name, block, scheme, bool(symmetric_range), convention, scale_dtype
    )
    if not isinstance(finite, jax.core.Tracer) and not bool(finite):
        where = path or "the input array"
        raise ValueError(
            f"{where} contains NaN or Inf; quantizing it would give garbage. Fix the weights "
            "(e.g. jnp.nan_to_num) or exclude this leaf with a rule mapping its path to None."
        )
    return QArray(
        qvalue=q,
        scale=s,
        zero_point=z,
        in_scale=None,
        act_scale=None,
        format=fmt.name,
        shape=tuple(x.shape),
        dtype=jnp.dtype(x.dtype).name,
        block=block,
        act=act,
    )


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
        if granularity == "per_token":
            amax = jnp.max(jnp.abs(xf), axis=-1, keepdims=True)
        elif granularity == "per_tensor":
            amax = jnp.max(jnp.abs(xf)).reshape((1,) * x.ndim)
        else:
            raise ValueError(
                f"granularity={granularity!r} is not supported; use 'per_token' or 'per_tensor'."
            )
        scale = amax / fmt.max
        scale = jnp.where(scale > 0, scale, 1.0)
    else:
        scale = jnp.asarray(scale, jnp.float32)
    return _formats.encode(xf / scale, fmt), scale
