"""HQQ: half-quadratic quantization (Badri & Shaji, 2023), calibration-free.

Round to nearest picks each group's zero point from its min and max. HQQ
instead minimises the weight reconstruction error under an lp norm with
p < 1 (robust to the few large errors of outlier weights), by half-quadratic
splitting with an auxiliary error variable ``W_e`` and alternating:

    W_q = clamp(round(W / S + Z))                     (codes)
    W_e = shrink_p(W - (W_q - Z) S, beta)             (proximal step of |.|^p)
    Z   = mean(W_q - (W - W_e) / S)                   (closed-form zero point)
    beta *= kappa

with ``shrink_p(x, beta) = sign(x) relu(|x| - |x|^(p-1) / beta)`` and the
paper's defaults p=0.7, beta=10, kappa=1.01, 20 iterations, stopping early
once the mean |W - W_hat| stops decreasing. ``optimize_scale=True`` also refits
``S`` (with ``Z``) per group by least squares against ``W - W_e``.

By default jqx runs the ``hqq`` library's optimiser (``Quantizer.quantize`` with
its defaults, ``optimize_weights_proximal_legacy``): the min-max scale, the
*unrounded* zero point ``Z = qmin - min / S`` as the start, the whole tensor's
mean |error| as the stopping rule, and the zero point after the last step. (The
library keeps ``beta`` fixed; jqx multiplies it by ``kappa`` each step as the
paper does: ``kappa=1.0`` is the library exactly.) Two options keep jqx's
earlier behaviour: ``round_zero=True`` starts from round to nearest (same ``S``,
rounded ``Z``: exactly ``jqx.quantize_array(..., scheme="zero_point")``), the
AutoAWQ-style start, which ends with a larger weight error on the same weight;
``keep_best=True`` returns, per group, the iterate with the lowest lp objective
``sum |W - W_hat|^p`` seen (the start included), so the result is never worse
than its start in that objective. ``benchmarks/hqq_vs_library.py`` measures them
against the library. The zero point stays a float (as in HQQ). All groups are
optimised at once in one jit-compiled loop.

Example:
    >>> import jax, jqx
    >>> w = jax.random.normal(jax.random.key(0), (128, 64)) * 0.02
    >>> q = jqx.quantize({"kernel": w}, jqx.hqq(bits=4, group_size=64))["kernel"]
    >>> q.format, q.scale.shape
    ('uint4', (2, 64))
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jqx.core.numerics import (
    check_finite,
    check_group_divides,
    check_group_size,
    encode_int,
    make_qarray,
)
from jqx.core.qarray import QArray
from jqx.recipes import grid as _grid
from jqx.recipes.base import Recipe, build

__all__ = ["HQQ", "hqq", "hqq_quantize", "hqq_optimize", "lp_objective", "shrink_lp"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class HQQ(_grid.IntGridRecipe, Recipe):
    """HQQ weight-only recipe and settings (paper defaults); build it with :func:`hqq`.

    Calibration-free: works with ``jqx.quantize``. The fields are the
    arguments of :func:`hqq`.

    Example:
        >>> r = HQQ(bits=3, group_size=32)
        >>> r.name, r.format, r.needs_calibration
        ('hqq(bits=3, group_size=32)', 'uint4', False)
    """

    bits: int = 4
    group_size: int | None = 64
    axis: int = -2
    lp_norm: float = 0.7
    beta: float = 10.0
    kappa: float = 1.01
    iters: int = 20
    early_stop: bool = True
    optimize_scale: bool = False
    round_zero: bool = False
    keep_best: bool = False

    def __post_init__(self):
        _grid.int_grid(self.bits, False, who="hqq")
        check_group_size(self.group_size, who="hqq")
        if isinstance(self.axis, bool) or not isinstance(self.axis, int):
            raise ValueError(f"hqq: axis={self.axis!r} must be an int (Flax kernels: -2).")
        if not 0.0 < float(self.lp_norm) <= 1.0:
            raise ValueError(f"hqq: lp_norm={self.lp_norm!r} must be in (0, 1] (paper: 0.7).")
        if not float(self.beta) > 0 or not float(self.kappa) >= 1.0:
            raise ValueError(
                f"hqq: beta={self.beta!r} must be > 0 and kappa={self.kappa!r} >= 1 "
                "(paper: beta=10, kappa=1.01)."
            )
        if isinstance(self.iters, bool) or not isinstance(self.iters, int) or self.iters < 0:
            raise ValueError(f"hqq: iters={self.iters!r} must be an int >= 0 (paper: 20).")
        for f in ("lp_norm", "beta", "kappa"):
            object.__setattr__(self, f, float(getattr(self, f)))

    @property
    def name(self) -> str:
        return f"hqq(bits={self.bits}, group_size={self.group_size})"

    def quantize_weight(self, w: jax.Array, path: str | None = None, stats: Any = None) -> QArray:
        """HQQ on one weight (statistics are not used)."""
        return hqq_quantize(w, self, path=path, act=self.act)


def hqq(**kw) -> HQQ:
    """HQQ weight-only quantization with zero points (uint codes), keyword arguments only.

    Args:
      bits: 2, 3, 4 (default) or 8.
      group_size: elements along ``axis`` sharing a scale/zero (default 64);
        None = the whole axis.
      axis: the grouped axis (default -2: the input axis of a Flax kernel).
      lp_norm, beta, kappa, iters, early_stop: the optimiser (paper defaults
        0.7, 10.0, 1.01, 20, True).
      optimize_scale: also refit the scale (least squares) at each step
        (default False).
      round_zero: start from round-to-nearest's rounded zero point (the
        AutoAWQ-style start) instead of the ``hqq`` library's float zero point
        (default False, as the library).
      keep_best: return, per group, the iterate with the lowest lp objective
        (never worse than the start in that objective; lower mean |error|, higher
        squared error than the library's) instead of the library's last iterate
        (default False). ``optimize_scale=True`` always keeps the best.

    Returns:
      An :class:`HQQ` recipe (calibration-free: apply it with ``jqx.quantize``).

    Example:
        >>> import jqx
        >>> jqx.hqq(bits=4, group_size=64).needs_calibration
        False
    """
    return build(HQQ, "hqq", kw)


def shrink_lp(x: jax.Array, beta: float | jax.Array, p: float) -> jax.Array:
    """Generalised soft-thresholding, the proximal operator HQQ uses for |x|^p."""
    ax = jnp.abs(x)
    if p == 1.0:
        return jnp.sign(x) * jnp.maximum(ax - 1.0 / beta, 0.0)
    # |x|^(p-1) is inf at 0; the shrink there is 0 anyway.
    t = jnp.where(ax > 0, jnp.power(jnp.where(ax > 0, ax, 1.0), p - 1.0), jnp.inf) / beta
    return jnp.sign(x) * jnp.maximum(ax - t, 0.0)


def lp_objective(err: jax.Array, p: float, axis: int = -1) -> jax.Array:
    """``sum |err|^p`` over ``axis``."""
    return jnp.sum(jnp.power(jnp.abs(err), p), axis=axis)


def _library_loop(wg, s, z, recon, recipe: HQQ):
    """The ``hqq`` library's loop (``optimize_weights_proximal_legacy``): each step
    measures the whole tensor's mean |error| at the current zero point, then updates
    the zero point; the first step that does not lower that error is the last one
    (its update is kept), and the codes are rounded at the final zero point."""
    p = float(recipe.lp_norm)

    def step(i, c):
        z, best_err, beta, active = c
        q, r = recon(s, z)
        we = shrink_lp(wg - r, beta, p)
        z_new = jnp.mean(q - (wg - we) / s, axis=1, keepdims=True)
        err = jnp.mean(jnp.abs(wg - r))
        z = jnp.where(active, z_new, z)
        still = active & ((err < best_err) if recipe.early_stop else True)
        return z, jnp.minimum(best_err, err), beta * recipe.kappa, still

    init = (z, jnp.float32(jnp.inf), jnp.float32(recipe.beta), jnp.bool_(True))
    z, _, _, _ = lax.fori_loop(0, recipe.iters, step, init)
    q, r = recon(s, z)
    return q, s, z, r


@functools.partial(jax.jit, static_argnames=("grid", "recipe"))
def hqq_optimize(wg: jax.Array, grid: _grid.IntGrid, recipe: HQQ):
    """Optimises rows of groups ``wg`` (G, g) (one group per row).

    Returns ``(codes, scale (G, 1), zero (G, 1), w_hat)``.
    """
    wg = wg.astype(jnp.float32)
    p = float(recipe.lp_norm)
    # The start: min-max scale with the hqq library's unrounded zero point, or (round_zero)
    # exactly round to nearest (the integer zero point added after rounding).
    start = dataclasses.replace(grid, float_zero=not recipe.round_zero)
    s, z = _grid.group_params(wg, start, axis=1)
    q0 = _grid.encode(wg, s, z, start)

    def recon(s, z):
        q = encode_int(wg, s, z, qmin=grid.qmin, qmax=grid.qmax, float_zero=True)
        return q, _grid.dequant(q, s, z)

    if not recipe.keep_best and not recipe.optimize_scale:
        return _library_loop(wg, s, z, recon, recipe)
    r0 = _grid.dequant(q0, s, z)
    obj0 = lp_objective(wg - r0, p)
    err0 = jnp.mean(jnp.abs(wg - r0))

    def step(i, c):
        s, z, best_s, best_z, best_obj, prev_err, beta, active = c
        q, r = recon(s, z)
        we = shrink_lp(wg - r, beta, p)
        target = wg - we
        if recipe.optimize_scale:
            qm = jnp.mean(q, axis=1, keepdims=True)
            tm = jnp.mean(target, axis=1, keepdims=True)
            cov = jnp.mean((q - qm) * (target - tm), axis=1, keepdims=True)
            var = jnp.mean((q - qm) ** 2, axis=1, keepdims=True)
            a = jnp.where(var > 0, cov / jnp.where(var > 0, var, 1.0), 0.0)
            ok = a > 0
            s_new = jnp.where(ok, a, s)
            z_new = jnp.where(ok, qm - tm / s_new, z)
        else:
            s_new = s
            z_new = jnp.mean(q - target / s, axis=1, keepdims=True)
        _, r_new = recon(s_new, z_new)
        obj = lp_objective(wg - r_new, p)[:, None]
        err = jnp.mean(jnp.abs(wg - r_new))
        better = (obj < best_obj) & active
        best_s = jnp.where(better, s_new, best_s)
        best_z = jnp.where(better, z_new, best_z)
        best_obj = jnp.where(better, obj, best_obj)
        # The paper's early stop: the whole tensor's mean |error| stopped improving.
        still = active & ((err < prev_err) if recipe.early_stop else True)
        s = jnp.where(active, s_new, s)
        z = jnp.where(active, z_new, z)
        return (
            s,
            z,
            best_s,
            best_z,
            best_obj,
            jnp.where(active, err, prev_err),
            beta * recipe.kappa,
            still,
        )

    init = (s, z, s, z, obj0[:, None], err0, jnp.float32(recipe.beta), jnp.bool_(True))
    _, _, bs, bz, _, _, _, _ = lax.fori_loop(0, recipe.iters, step, init)
    q, r = recon(bs, bz)
    moved = jnp.any(bz != z, axis=1, keepdims=True) | jnp.any(bs != s, axis=1, keepdims=True)
    q = jnp.where(moved, q, q0)
    return q, bs, bz, jnp.where(moved, r, r0)


def hqq_quantize(w: jax.Array, recipe: HQQ = HQQ(), *, path: str | None = None, act=None) -> QArray:
    """Quantizes ``w`` with HQQ: groups of ``recipe.group_size`` along ``recipe.axis``.

    Args:
      w: float array of any rank >= 1 (Flax kernels: axis -2 is the input axis).
      recipe: the :class:`HQQ` settings.
      path: the weight's name, for error messages.
      act: ActSpec recorded on the result.

    Returns:
      A zero-point QArray (uint4 for 2-4 bits, uint8 for 8 bits) with block
      ``group_size`` along ``axis``.

    Example:
        >>> import jax
        >>> w = jax.random.normal(jax.random.key(0), (64, 16))
        >>> hqq_quantize(w, HQQ(group_size=32)).block
        (32, 1)
    """
    if not isinstance(recipe, HQQ):
        raise TypeError(
            f"hqq_quantize: recipe must be a jqx.HQQ (e.g. jqx.hqq(bits=4)), got "
            f"{type(recipe).__name__}: {recipe!r}"
        )
    w = jnp.asarray(w)
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise TypeError(f"hqq: {path or 'the weight'} has dtype {w.dtype}; only float weights.")
    if w.ndim == 0:
        raise NotImplementedError("hqq: scalars are not supported; quantize arrays of rank >= 1.")
    if not -w.ndim <= recipe.axis < w.ndim:
        raise ValueError(
            f"hqq: axis={recipe.axis} is out of range for {path or 'the weight'} with shape "
            f"{tuple(w.shape)}; use an axis in [{-w.ndim}, {w.ndim - 1}] (Flax kernels: -2)."
        )
    check_finite(w, path, who="hqq")
    ax = recipe.axis % w.ndim
    g = check_group_divides(recipe.group_size, w.shape[ax], axis=ax, path=path, who="hqq")
    grid = recipe.grid
    wm = jnp.moveaxis(w, ax, -1)
    moved = wm.shape
    q, s, z, _ = hqq_optimize(wm.reshape(-1, g), grid, recipe)
    codes = jnp.moveaxis(q.reshape(moved), -1, ax)
    nb_moved = moved[:-1] + (moved[-1] // g,)
    scale = jnp.moveaxis(s.reshape(nb_moved), -1, ax)
    zero = jnp.moveaxis(z.reshape(nb_moved), -1, ax)
    block = tuple(g if i == ax else 1 for i in range(w.ndim))
    return make_qarray(
        codes, scale, zero, fmt=grid.format, shape=w.shape, dtype=w.dtype, block=block, act=act
    )
