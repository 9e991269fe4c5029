"""Shared pieces of the algorithms: integer grids, group parameters, QArray assembly.

Grids. The algorithms quantize to ``bits`` in {2, 3, 4, 8}. Codes narrower
than the storage container keep the container's format and use a sub-range
of it, so the result is an ordinary :class:`jqx.QArray` that
``dequantize()`` decodes unchanged:

========  ====================  ======================  ==========================
bits      sym (absmax)          asym (zero point)       container
========  ====================  ======================  ==========================
8         int8, [-128, 127]     uint8, [0, 255]         one byte per code
4         int4, [-8, 7]         uint4, [0, 15]          two codes per uint8
3         int4, [-4, 3]         uint4, [0, 7]           4-bit container
2         int4, [-2, 1]         uint4, [0, 3]           4-bit container
========  ====================  ======================  ==========================

A 3-bit QArray therefore reports ``format='uint4'`` (or ``'int4'``) and takes
4 bits per code in memory; only the range of codes is 3-bit.

The scale formulas are the seed formulas of DESIGN.md with this range:
absmax ``S = max|x| / qmax``; zero point ``S = (max - min) / (qmax - qmin)``,
``Z = round(qmin - min / S)``; a constant group gets ``S = |c|`` (1 for 0).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jqx.core import formats as _formats
from jqx.core.qarray import ActSpec, QArray, pack_4bit

SUPPORTED_BITS = (2, 3, 4, 8)


@dataclasses.dataclass(frozen=True)
class IntGrid:
    """An integer code range inside a storage format."""

    bits: int
    sym: bool
    format: str
    qmin: float
    qmax: float


def int_grid(bits: int, sym: bool, *, who: str = "bits") -> IntGrid:
    """The grid for ``bits`` codes, symmetric (absmax) or with a zero point."""
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise ValueError(
            f"{who}={bits!r} is not supported; use one of {SUPPORTED_BITS} (2/3-bit codes are "
            "stored in the 4-bit container with a narrower code range)."
        )
    if bits == 8:
        return IntGrid(
            8, sym, "int8" if sym else "uint8", -128.0 if sym else 0.0, 127.0 if sym else 255.0
        )
    if sym:
        return IntGrid(bits, True, "int4", -float(2 ** (bits - 1)), float(2 ** (bits - 1) - 1))
    return IntGrid(bits, False, "uint4", 0.0, float(2**bits - 1))


def group_params(wg: jax.Array, grid: IntGrid, axis: int = 0) -> tuple[jax.Array, jax.Array | None]:
    """Scale (and zero point) of the values of ``wg`` reduced over ``axis`` (keepdims)."""
    wg = wg.astype(jnp.float32)
    mx = jnp.max(wg, axis=axis, keepdims=True)
    mn = jnp.min(wg, axis=axis, keepdims=True)
    constant = mx == mn
    cabs = jnp.abs(mx)
    const_scale = jnp.where(cabs > 0, cabs, 1.0)
    if grid.sym:
        s = jnp.maximum(jnp.abs(mx), jnp.abs(mn)) / grid.qmax
        return jnp.where(constant | (s == 0), const_scale, s), None
    s = (mx - mn) / (grid.qmax - grid.qmin)
    s = jnp.where(constant | (s == 0), const_scale, s)
    return s, jnp.round(grid.qmin - mn / s)


#: Range shrink factors tried by :func:`search_group_params` (1.0 first).
CLIP_SEARCH_STEPS = 100
CLIP_SEARCH_MAX_SHRINK = 0.8
CLIP_SEARCH_NORM = 2.4


def search_group_params(
    wg: jax.Array, grid: IntGrid, axis: int = 0
) -> tuple[jax.Array, jax.Array | None]:
    """Like :func:`group_params`, with the range shrunk to minimise the error.

    Tries ``p = 1, 0.99, ..., 0.21`` (``CLIP_SEARCH_STEPS`` steps up to
    ``CLIP_SEARCH_MAX_SHRINK``) on ``[p * min, p * max]`` and keeps, per
    group, the scale (and zero point) with the least ``sum |w - w_hat|^2.4``
    over the group, as the reference GPTQ's ``--mse`` option does. ``p = 1``
    is among the candidates, so no group ends worse than :func:`group_params`
    by this measure.

    Example:
        >>> import jax.numpy as jnp
        >>> w = jnp.array([[-1.0], [0.02], [0.05], [0.1], [0.2], [0.3], [0.4], [8.0]])
        >>> g = int_grid(2, sym=False)
        >>> s0, _ = group_params(w, g); s1, _ = search_group_params(w, g)
        >>> bool(s1[0, 0] < s0[0, 0])
        True
    """
    wg = wg.astype(jnp.float32)
    n_try = int(CLIP_SEARCH_MAX_SHRINK * CLIP_SEARCH_STEPS)
    ps = 1.0 - jnp.arange(n_try, dtype=jnp.float32) / CLIP_SEARCH_STEPS

    def err_of(p):
        s, z = group_params(wg * p, grid, axis)
        q = quant_codes(wg, s, z, grid)
        e = jnp.sum(jnp.abs(dequant(q, s, z) - wg) ** CLIP_SEARCH_NORM, axis=axis, keepdims=True)
        return e, s, (jnp.zeros_like(s) if z is None else z)

    errs, ss, zs = jax.lax.map(err_of, ps)
    best = jnp.argmin(errs, axis=0)[None]
    s = jnp.take_along_axis(ss, best, axis=0)[0]
    z = jnp.take_along_axis(zs, best, axis=0)[0]
    return s, (None if grid.sym else z)


def quant_codes(
    w: jax.Array, s: jax.Array, z: jax.Array | None, grid: IntGrid, *, float_zero: bool = False
) -> jax.Array:
    """Integer codes (as float32) of ``w`` on the grid (round half to even, clamped).

    An integer zero point is added after rounding (the seed formula, so ties
    match ``jqx.quantize_array``); a float zero point (HQQ) before rounding.
    """
    if float_zero and z is not None:
        return jnp.clip(jnp.round(w / s + z), grid.qmin, grid.qmax)
    q = jnp.round(w / s)
    if z is not None:
        q = q + z
    return jnp.clip(q, grid.qmin, grid.qmax)


def dequant(q: jax.Array, s: jax.Array, z: jax.Array | None) -> jax.Array:
    return (q - z) * s if z is not None else q * s


def check_kernel(w, who: str, path: str | None) -> jax.Array:
    """Only 2-D Flax kernels ``(K, N)`` (``x @ W``) are supported by the
    calibrated algorithms."""
    w = jnp.asarray(w)
    where = f" at {path}" if path else ""
    if w.ndim != 2:
        raise NotImplementedError(
            f"{who}: weight{where} has shape {tuple(w.shape)}; only 2-D kernels (K, N) used as "
            "x @ W (contraction axis 0) are supported. Exclude this leaf with a rule "
            "(e.g. {'<path>': None}) or quantize it with a round-to-nearest recipe."
        )
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise TypeError(f"{who}: weight{where} has dtype {w.dtype}; only floating-point weights.")
    return w


def check_group(k: int, group_size: int | None, who: str, path: str | None) -> int:
    """The effective group size along K (``None`` = the whole axis)."""
    if group_size is None:
        return k
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"{who}: group_size={group_size!r} must be a positive int or None.")
    if k % group_size:
        where = f" of {path}" if path else ""
        divs = [d for d in (16, 32, 64, 96, 128, 256) if k % d == 0 and d < k]
        raise ValueError(
            f"{who}: group_size={group_size} does not divide the input size K={k}{where}; use a "
            f"divisor such as {', '.join(map(str, divs)) or k}, or group_size=None for per-channel."
        )
    return group_size


def check_finite(w, who: str, path: str | None) -> None:
    if not isinstance(w, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(w))):
        raise ValueError(
            f"{who}: {path or 'the weight'} contains NaN or Inf; fix the weights (e.g. "
            "jnp.nan_to_num) or exclude this leaf with a rule mapping its path to None."
        )


def build_qarray(
    codes: jax.Array,
    scale: jax.Array,
    zero: jax.Array | None,
    grid: IntGrid,
    *,
    shape: tuple[int, ...],
    dtype,
    block: tuple[int, ...],
    in_scale: jax.Array | None = None,
    act: ActSpec | None = None,
) -> QArray:
    """An ordinary QArray from integer codes (float or int array in the grid range),
    per-block ``scale``/``zero`` of shape ``shape // block``."""
    fmt = _formats.get(grid.format)
    q = _formats.encode(codes.astype(jnp.float32), fmt)
    if fmt.packed:
        q = pack_4bit(q)
    nb = tuple(s // b for s, b in zip(shape, block, strict=True))
    return QArray(
        qvalue=q,
        scale=scale.reshape(nb).astype(jnp.float32),
        zero_point=None if zero is None else zero.reshape(nb).astype(jnp.float32),
        in_scale=None if in_scale is None else in_scale.astype(jnp.float32),
        act_scale=None,
        format=fmt.name,
        shape=tuple(int(s) for s in shape),
        dtype=jnp.dtype(dtype).name,
        block=tuple(int(b) for b in block),
        act=act,
    )


def rtn_codes(w: jax.Array, grid: IntGrid, group_size: int):
    """Round to nearest, group-wise along axis 0 of a (K, N) weight.

    Returns ``(codes (K, N), scale (K//g, N), zero (K//g, N) | None, w_hat)``.
    """
    k, n = w.shape
    wg = w.astype(jnp.float32).reshape(k // group_size, group_size, n)
    s, z = group_params(wg, grid, axis=1)
    q = quant_codes(wg, s, z, grid)
    w_hat = dequant(q, s, z).reshape(k, n)
    return q.reshape(k, n), s[:, 0], None if z is None else z[:, 0], w_hat


def rtn_quantize(
    w: jax.Array, bits: int = 4, group_size: int | None = 128, sym: bool = False
) -> QArray:
    """Round-to-nearest baseline on the same grid as GPTQ/AWQ (also 2/3 bits).

    For 4 and 8 bits this equals ``jqx.quantize_array`` with the matching
    format and ``per_group(group_size)``.

    Example:
        >>> import jax.numpy as jnp
        >>> rtn_quantize(jnp.ones((8, 4)), bits=3, group_size=4).format
        'uint4'
    """
    w = check_kernel(w, "rtn_quantize", None)
    grid = int_grid(bits, sym)
    g = check_group(w.shape[0], group_size, "rtn_quantize", None)
    q, s, z, _ = jax.jit(rtn_codes, static_argnums=(1, 2))(w, grid, g)
    return build_qarray(q, s, z, grid, shape=w.shape, dtype=w.dtype, block=(g, 1))
