"""AWQ: activation-aware weight quantization (Lin et al., 2023).

A few input channels carry large activations; their weight rows matter more.
AWQ scales weight row ``j`` of a kernel ``W`` (K, N) by ``s_j`` before
round-to-nearest and divides the activations by ``s_j`` at run time, so the
important rows get a finer grid:

1. Scale search: ``s = mean|x|^alpha`` (clamped at 1e-4, normalised by
   ``sqrt(max(s) min(s))``) for ``alpha`` in a grid of 20 values
   ``0, 0.05, ..., 0.95``; keep the one with the lowest output error
   ``mean((x W - x Q(W s) / s)^2)`` on the calibration sample.
2. Clipping search on the scaled weight: per group and output channel, the
   max |w| is shrunk by ``1 - i/20`` for ``i < 10``; keep the ratio with the
   lowest error of that group's partial output ``(x/s)_g (Q(clip(W s)) - W s)_g``.
3. Stored as an ordinary group-wise QArray of ``clip(W s)`` with
   ``in_scale = s`` (shape (K, 1)): ``dequantize()`` divides by it, and the
   quantized matmul divides the activations by it.

Example:
    >>> import jax
    >>> x = jax.random.normal(jax.random.key(0), (128, 64))
    >>> w = jax.random.normal(jax.random.key(1), (64, 32))
    >>> q = awq_quantize(w, x, AWQ(bits=4, group_size=32))
    >>> q.in_scale.shape
    (64, 1)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jqx.core.numerics import check_finite, check_group_divides, check_group_size, make_qarray
from jqx.core.qarray import QArray
from jqx.recipes import grid as _grid
from jqx.recipes.base import Recipe, build

__all__ = ["AWQ", "awq", "awq_quantize", "awq_search_scale"]

_HI = lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True, kw_only=True)
class AWQ(_grid.IntGridRecipe, Recipe):
    """AWQ weight-only recipe and settings; build it with :func:`awq`.

    Needs ``jqx.calibrate`` (statistics ``mean_abs`` and ``sample``). The
    fields are the arguments of :func:`awq`; the defaults are the paper's (20
    alphas, clip shrink up to 50% in steps of 5%).

    Example:
        >>> r = AWQ(bits=4, group_size=64, sym=True)
        >>> r.name, r.format, r.scheme
        ('awq(bits=4, group_size=64)', 'int4', 'absmax')
    """

    bits: int = 4
    group_size: int | None = 128
    sym: bool = False
    n_grid: int = 20
    max_shrink: float = 0.5
    clip: bool = True
    max_rows_scale: int = 2048
    max_rows_clip: int = 512

    def __post_init__(self):
        _grid.int_grid(self.bits, self.sym, who="awq")
        check_group_size(self.group_size, who="awq")
        if isinstance(self.n_grid, bool) or not isinstance(self.n_grid, int) or self.n_grid < 1:
            raise ValueError(f"awq: n_grid={self.n_grid!r} must be a positive int (paper: 20).")
        if not 0.0 <= float(self.max_shrink) < 1.0:
            raise ValueError(f"awq: max_shrink={self.max_shrink!r} must be in [0, 1) (paper: 0.5).")
        object.__setattr__(self, "max_shrink", float(self.max_shrink))
        for f in ("max_rows_scale", "max_rows_clip"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(
                    f"awq: {f}={v!r} must be a positive int (calibration rows used by the search)."
                )

    @property
    def name(self) -> str:
        return f"awq(bits={self.bits}, group_size={self.group_size})"

    @property
    def needs_calibration(self) -> bool:
        return True

    @property
    def stats_needed(self) -> tuple[str, ...]:
        return ("mean_abs", "sample")

    def quantize_weight(self, w: jax.Array, path: str | None = None, stats: Any = None) -> QArray:
        """AWQ on one kernel from its LayerStats (``sample`` rows and ``mean_abs``)."""
        if stats is None or getattr(stats, "sample", None) is None:
            raise ValueError(
                f"awq needs the calibration statistic 'sample' for {path or 'this weight'}; run "
                "it with jqx.calibrate(fn, params, batches, jqx.awq(...))."
            )
        return awq_quantize(w, stats.sample, self, mean_abs=stats.mean_abs, path=path, act=self.act)


def awq(**kw) -> AWQ:
    """AWQ weight-only quantization (activation-aware scales + clip search),
    keyword arguments only.

    Args:
      bits: 2, 3, 4 (default) or 8.
      group_size: rows of K sharing a scale (default 128); None = per output channel.
      sym: absmax codes instead of zero points (default False).
      n_grid: alphas searched (``i / n_grid``) and clip step (``1 / n_grid``);
        default 20.
      max_shrink: largest clip shrink ratio searched (default 0.5).
      clip: run the clipping search (default True).
      max_rows_scale, max_rows_clip: calibration rows used by the scale and
        the clip search (default 2048 and 512).

    Returns:
      An :class:`AWQ` recipe (apply it with ``jqx.calibrate``).

    Example:
        >>> import jqx
        >>> jqx.awq(bits=4, group_size=128).stats_needed
        ('mean_abs', 'sample')
    """
    return build(AWQ, "awq", kw)


@functools.partial(jax.jit, static_argnames=("grid", "g", "n_grid"))
def _search_scale(w, x, mean_abs, grid, g, n_grid):
    y = jnp.matmul(x, w, precision=_HI)
    ma = jnp.maximum(mean_abs.astype(jnp.float32), 0.0)

    def scales(alpha):
        s = jnp.maximum(jnp.power(jnp.maximum(ma, 1e-30), alpha), 1e-4)
        s = jnp.where(alpha == 0, jnp.ones_like(s), s)
        return s / jnp.sqrt(jnp.max(s) * jnp.min(s))

    def loss(alpha):
        s = scales(alpha)
        _, _, _, wq = _grid.rtn_codes(w * s[:, None], grid, g)
        d = jnp.matmul(x, wq / s[:, None], precision=_HI) - y
        return jnp.mean(d * d)

    alphas = jnp.arange(n_grid, dtype=jnp.float32) / n_grid
    losses = lax.map(loss, alphas)
    best = jnp.argmin(losses)
    return scales(alphas[best]), alphas[best], losses


@functools.partial(jax.jit, static_argnames=("grid", "g", "n_grid", "max_shrink"))
def _search_clip(w, x, grid, g, n_grid, max_shrink):
    """Per (group, output channel) clip of the (already scaled) weight ``w``."""
    k, n = w.shape
    ng = k // g
    xg = x.reshape(x.shape[0], ng, g)
    wg = w.reshape(ng, g, n)
    org_max = jnp.max(jnp.abs(wg), axis=1)  # (G, N)

    def err(i):
        mv = org_max * (1.0 - i / n_grid)
        cur = jnp.clip(wg, -mv[:, None, :], mv[:, None, :])
        _, _, _, q = _grid.rtn_codes(cur.reshape(k, n), grid, g)
        d = q.reshape(ng, g, n) - wg
        out = jnp.einsum("rGg,GgN->rGN", xg, d, precision=_HI)
        return jnp.mean(out * out, axis=0)

    steps = jnp.arange(int(max_shrink * n_grid), dtype=jnp.float32)
    errs = lax.map(err, steps)  # (S, G, N)
    best = jnp.argmin(errs, axis=0)
    return org_max * (1.0 - steps[best] / n_grid)


def _check_recipe(recipe, who: str) -> AWQ:
    if not isinstance(recipe, AWQ):
        raise TypeError(
            f"{who}: recipe must be a jqx.AWQ (e.g. jqx.awq(bits=4)), got "
            f"{type(recipe).__name__}: {recipe!r}"
        )
    return recipe


def awq_search_scale(
    w: jax.Array, x: jax.Array, mean_abs: jax.Array | None = None, recipe: AWQ | None = None
) -> tuple[jax.Array, float]:
    """The AWQ input-channel scales ``s`` (K,) and the chosen alpha.

    Example:
        >>> import jax.numpy as jnp
        >>> s, alpha = awq_search_scale(jnp.ones((8, 4)), jnp.ones((16, 8)), recipe=AWQ(group_size=4))
        >>> s.shape
        (8,)
    """
    recipe = _check_recipe(recipe or AWQ(), "awq_search_scale")
    w = _grid.check_kernel(w, "awq", None)
    g = check_group_divides(recipe.group_size, w.shape[0], axis=0, who="awq")
    x = jnp.asarray(x, jnp.float32)
    ma = jnp.mean(jnp.abs(x), axis=0) if mean_abs is None else jnp.asarray(mean_abs, jnp.float32)
    s, a, _ = _search_scale(
        w.astype(jnp.float32),
        x[: recipe.max_rows_scale],
        ma,
        recipe.grid,
        g,
        recipe.n_grid,
    )
    return s, float(a)


def awq_quantize(
    w: jax.Array,
    x: jax.Array,
    recipe: AWQ = AWQ(),
    *,
    mean_abs: jax.Array | None = None,
    path: str | None = None,
    act=None,
) -> QArray:
    """Quantizes one kernel ``w`` (K, N) with AWQ on calibration rows ``x`` (rows, K).

    Args:
      w: float kernel used as ``x @ w``.
      x: calibration input rows (a sample is enough; ``recipe.max_rows_*`` cap it).
      recipe: the :class:`AWQ` settings.
      mean_abs: per-input-channel mean |x| over all calibration rows (K,);
        computed from ``x`` when None.
      path: the weight's name, for error messages.
      act: ActSpec recorded on the result.

    Returns:
      A group-wise QArray of the scaled, clipped weight with ``in_scale`` (K, 1).

    Example:
        >>> import jax.numpy as jnp
        >>> q = awq_quantize(jnp.ones((8, 4)), jnp.ones((16, 8)), AWQ(group_size=4))
        >>> float(abs(q.dequantize() - 1.0).max()) < 1e-6
        True
    """
    recipe = _check_recipe(recipe, "awq_quantize")
    w = _grid.check_kernel(w, "awq", path)
    k, n = w.shape
    x = jnp.asarray(x)
    if x.ndim != 2 or x.shape[1] != k:
        raise ValueError(
            f"awq: calibration rows have shape {tuple(x.shape)} but the weight"
            f"{' ' + path if path else ''} has K={k} inputs; expected (rows, {k}). The "
            "calibration data's feature size must match the weight's input size."
        )
    if mean_abs is not None and tuple(jnp.shape(mean_abs)) != (k,):
        raise ValueError(f"awq: mean_abs has shape {tuple(jnp.shape(mean_abs))}; expected ({k},).")
    check_finite(w, path, who="awq")
    grid = recipe.grid
    g = check_group_divides(recipe.group_size, k, axis=0, path=path, who="awq")
    wf = w.astype(jnp.float32)
    xf = x.astype(jnp.float32)
    ma = jnp.mean(jnp.abs(xf), axis=0) if mean_abs is None else jnp.asarray(mean_abs, jnp.float32)
    s, _, _ = _search_scale(wf, xf[: recipe.max_rows_scale], ma, grid, g, recipe.n_grid)
    ws = wf * s[:, None]
    if recipe.clip and int(recipe.max_shrink * recipe.n_grid) > 0:
        mv = _search_clip(
            ws, xf[: recipe.max_rows_clip] / s, grid, g, recipe.n_grid, float(recipe.max_shrink)
        )
        mv = jnp.repeat(mv, g, axis=0)
        ws = jnp.clip(ws, -mv, mv)
    codes, sc, zp, _ = jax.jit(_grid.rtn_codes, static_argnums=(1, 2))(ws, grid, g)
    return make_qarray(
        codes,
        sc,
        zp,
        fmt=grid.format,
        shape=w.shape,
        dtype=w.dtype,
        block=(g, 1),
        in_scale=s[:, None],
        act=act,
    )
