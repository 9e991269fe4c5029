"""Shared pieces of the algorithms: integer grids and group parameters.

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

Containers and ranges come from :func:`jqx.formats.int_container`; scales,
zero points and codes from :mod:`jqx.core.numerics` (the seed formulas of
DESIGN.md with this range, and their guards), and the QArray from
:func:`jqx.core.numerics.make_qarray`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jqx.core import formats as _formats
from jqx.core.numerics import (
    check_group_divides,
    encode_int,
    make_qarray,
    nan_max,
    nan_min,
    scale_from_minmax,
)
from jqx.core.qarray import QArray


@dataclasses.dataclass(frozen=True)
class IntGrid:
    """An integer code range inside a storage format."""

    bits: int
    sym: bool
    format: str
    qmin: float
    qmax: float
    float_zero: bool = False  # zero points left unrounded (added before rounding)


def int_grid(bits: int, sym: bool, *, who: str | None = None, float_zero: bool = False) -> IntGrid:
    """The grid for ``bits`` codes, symmetric (absmax) or with a zero point;
    container and range from :func:`jqx.formats.int_container`. ``float_zero``:
    the zero points stay unrounded (:func:`jqx.core.numerics.scale_from_minmax`'s
    ``round_zero=False``); a symmetric grid has none, so it is False there.

    Example:
        >>> g = int_grid(3, sym=False)
        >>> g.format, g.qmin, g.qmax
        ('uint4', 0.0, 7.0)
    """
    try:
        fmt, qmin, qmax = _formats.int_container(bits, signed=sym)
    except ValueError as e:
        pre = f"{who}: " if who else ""
        raise ValueError(
            f"{pre}{e} 2/3-bit codes are stored in the 4-bit container with a narrower code range."
        ) from None
    return IntGrid(bits, sym, fmt.name, float(qmin), float(qmax), bool(float_zero) and not sym)


class IntGridRecipe:
    """Facts every integer-grid recipe (GPTQ, HQQ, AWQ) derives from its ``bits``
    and ``sym`` fields (a recipe without ``sym`` always uses a zero point)."""

    @property
    def grid(self) -> IntGrid:
        """The integer grid of the codes (container format and code range)."""
        return int_grid(self.bits, getattr(self, "sym", False))

    @property
    def format(self) -> str:
        return self.grid.format

    @property
    def scheme(self) -> str:
        return "absmax" if getattr(self, "sym", False) else "zero_point"


def group_params(wg: jax.Array, grid: IntGrid, axis: int = 0) -> tuple[jax.Array, jax.Array | None]:
    """Scale (and zero point) of the values of ``wg`` reduced over ``axis``
    (keepdims): :func:`jqx.core.numerics.scale_from_minmax` on the grid's range."""
    wg = wg.astype(jnp.float32)
    return scale_from_minmax(
        nan_min(wg, axis=axis, keepdims=True),
        nan_max(wg, axis=axis, keepdims=True),
        qmin=grid.qmin,
        qmax=grid.qmax,
        scheme="absmax" if grid.sym else "zero_point",
        round_zero=not grid.float_zero,
    )


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
        q = encode(wg, s, z, grid)
        e = jnp.sum(jnp.abs(dequant(q, s, z) - wg) ** CLIP_SEARCH_NORM, axis=axis, keepdims=True)
        return e, s, (jnp.zeros_like(s) if z is None else z)

    errs, ss, zs = jax.lax.map(err_of, ps)
    best = jnp.argmin(errs, axis=0)[None]
    s = jnp.take_along_axis(ss, best, axis=0)[0]
    z = jnp.take_along_axis(zs, best, axis=0)[0]
    return s, (None if grid.sym else z)


def encode(w: jax.Array, s: jax.Array, z: jax.Array | None, grid: IntGrid) -> jax.Array:
    """Codes (float32) of ``w`` on ``grid`` with scale ``s`` and zero point ``z``: a
    float zero point (``grid.float_zero``) is added before rounding, an integer one after."""
    return encode_int(w, s, z, qmin=grid.qmin, qmax=grid.qmax, float_zero=grid.float_zero)


def dequant(q: jax.Array, s: jax.Array, z: jax.Array | None) -> jax.Array:
    """``(q - z) * s`` (``q * s`` without a zero point): the inverse of
    :func:`jqx.core.numerics.encode_int` on the grid."""
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


def rtn_codes(w: jax.Array, grid: IntGrid, group_size: int):
    """Round to nearest, group-wise along axis 0 of a (K, N) weight.

    Returns ``(codes (K, N), scale (K//g, N), zero (K//g, N) | None, w_hat)``.
    """
    k, n = w.shape
    wg = w.astype(jnp.float32).reshape(k // group_size, group_size, n)
    s, z = group_params(wg, grid, axis=1)
    q = encode(wg, s, z, grid)
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
    grid = int_grid(bits, sym, who="rtn_quantize")
    g = check_group_divides(group_size, w.shape[0], axis=0, who="rtn_quantize")
    q, s, z, _ = jax.jit(rtn_codes, static_argnums=(1, 2))(w, grid, g)
    return make_qarray(q, s, z, fmt=grid.format, shape=w.shape, dtype=w.dtype, block=(g, 1))
