"""Calibration: quantize params with statistics of each weight's matmul input.

``jqx.calibrate(fn, params, batches, recipe)`` runs ``fn(params, *batch)``
over the calibration batches through ``jqx.transform.capture_inputs``; for
every selected weight the rows ``x`` that multiply it (``x @ W``) stream into
a :class:`jqx.calibration.stats.StatsAccumulator`, and the finished
:class:`jqx.calibration.stats.LayerStats` go to ``recipe.quantize_weight(w, path=...,
stats=...)``. For static activation quantization
(``jqx.int8_static_activation_int8_weight()``) an observer turns the
statistics into a clip value ``c`` and the QArray gets
``act_scale = [c / fmt.max]`` (float32, shape ``(1,)``).

Observers (``observer=``):

- ``"minmax"``: ``c = max(|min x|, |max x|)`` over all batches.
- ``"moving_average_minmax"`` (alias ``"ema"``): per-batch min and max are
  averaged with an exponential moving average, ``m <- momentum * m +
  (1 - momentum) * batch_value`` (``momentum=0.9`` by default, first batch
  initialises), then ``c = max(|m_min|, |m_max|)``.
- ``"percentile"``: ``c`` = the ``percentile``-th percentile (default 99.99)
  of ``|x|``, read from the streamed histogram (2048 bins).
- ``"mse"``: the ``c`` that minimises the expected squared error of
  quantizing ``x`` with scale ``c / qmax`` over the ``|x|`` histogram:
  clipped values cost ``(|x| - c)^2``, values rounding to zero ``x^2`` and the
  rest the uniform rounding noise ``step^2 / 12``.

Sequential recipes (``recipe.sequential``, e.g. GPTQ) quantize layers in
forward order: layer ``i``'s statistics are gathered with layers ``0..i-1``
already replaced by their dequantized quantized values, so ``fn`` needs no
wrapping. This costs one pass over the batches per layer. A stacked weight
used inside ``scan`` (its records are ``(L, rows, K)``) is the exception: all
its slices are calibrated in the same pass, with the weights before the scan
already substituted but the earlier slices of the same stack still in float.

Stacked weights in general: each slice ``w[i]`` gets its own statistics and
its own ``recipe.quantize_weight(w[i], path=f"{path}[{i}]", stats=...)``
call; the per-slice QArrays are stacked along a new leading axis (block size
1 there, static ``act_scale`` of shape ``(L, 1)``).

Example:
    >>> import jax, jax.numpy as jnp, jqx
    >>> params = {"kernel": jax.random.normal(jax.random.key(0), (16, 8))}
    >>> fn = lambda p, x: x @ p["kernel"]
    >>> batches = [jax.random.normal(jax.random.key(i), (4, 16)) for i in range(2)]
    >>> q = jqx.calibrate(fn, params, batches, jqx.int8_static_activation_int8_weight(),
    ...                   progress=False)
    >>> q["kernel"].act_scale.shape
    (1,)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jqx.calibration.stats import (
    NON_FINITE_FIX,
    LayerStats,
    NonFiniteActivations,
    StatsAccumulator,
)
from jqx.core import formats as _formats
from jqx.core.qarray import QArray, is_qarray
from jqx.core.tree import path_str
from jqx.ops import layout as _layout
from jqx.recipes.apply import select
from jqx.recipes.base import Recipe

__all__ = ["calibrate", "OBSERVERS", "observe_clip"]

#: Observer names accepted by :func:`calibrate` (``"ema"`` is an alias).
OBSERVERS = ("minmax", "moving_average_minmax", "percentile", "mse")
_ALIASES = {"ema": "moving_average_minmax", "moving_average": "moving_average_minmax"}
_OBSERVER_STATS = {
    "minmax": (),
    "moving_average_minmax": (),
    "percentile": ("hist",),
    "mse": ("hist",),
}


def _observer_name(observer: str) -> str:
    name = _ALIASES.get(observer, observer)
    if name not in OBSERVERS:
        raise ValueError(
            f"observer={observer!r} is not supported; use one of {OBSERVERS} (or 'ema' for the "
            "moving average)."
        )
    return name


def _hist_or_fail(stats: LayerStats, observer: str):
    if stats.hist is None or stats.hist_edges is None:
        raise ValueError(
            f"observer={observer!r} needs the |x| histogram of {stats.path}; gather it with "
            "StatsAccumulator(k, need=('hist',))."
        )
    return np.asarray(stats.hist, np.float64), np.asarray(stats.hist_edges, np.float64)


def _mse_clip(hist: np.ndarray, edges: np.ndarray, qmax: float) -> float:
    centres = 0.5 * (edges[:-1] + edges[1:])
    total = hist.sum()
    if total == 0 or edges[-1] <= 0:
        return float(edges[-1])
    # Candidates: every bin's upper edge from 1% of the range up.
    cands = edges[1:][edges[1:] >= 0.01 * edges[-1]]
    best_c, best = float(edges[-1]), math.inf
    for chunk in np.array_split(cands, max(1, len(cands) // 256)):
        c = chunk[:, None]
        step = c / qmax
        x = centres[None, :]
        err = np.where(
            x > c,
            (x - c) ** 2,
            np.where(x < step / 2, x**2, step**2 / 12.0),
        )
        cost = err @ hist
        i = int(np.argmin(cost))
        if cost[i] < best:
            best, best_c = float(cost[i]), float(chunk[i])
    return best_c


def observe_clip(
    stats: LayerStats,
    observer: str = "minmax",
    *,
    percentile: float = 99.99,
    momentum: float = 0.9,
    qmax: float = 127.0,
) -> float:
    """The activation clip value ``c`` an observer picks from one layer's statistics.

    Args:
      stats: the layer's :class:`jqx.calibration.stats.LayerStats` (``percentile`` and
        ``mse`` need its ``hist``).
      observer: one of :data:`OBSERVERS` (see the module docstring).
      percentile: for ``"percentile"``, in (0, 100].
      momentum: for ``"moving_average_minmax"``, in [0, 1).
      qmax: largest code of the activation format (127 for int8), for ``"mse"``.

    Returns:
      ``c > 0``; the static activation scale is ``c / qmax``.

    Example:
        >>> import jax.numpy as jnp
        >>> from jqx.calibration.stats import StatsAccumulator
        >>> acc = StatsAccumulator(2)
        >>> acc.update(jnp.array([[1.0, -3.0]]))
        >>> observe_clip(acc.result("w"), "minmax")
        3.0
    """
    name = _observer_name(observer)
    if name == "minmax":
        c = max(abs(stats.min), abs(stats.max))
    elif name == "moving_average_minmax":
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum={momentum!r} must be in [0, 1) (default 0.9).")
        hist = stats.minmax_history or [(stats.min, stats.max)]
        mn, mx = hist[0]
        for bmin, bmax in hist[1:]:
            mn = momentum * mn + (1.0 - momentum) * bmin
            mx = momentum * mx + (1.0 - momentum) * bmax
        c = max(abs(mn), abs(mx))
    elif name == "percentile":
        if not 0.0 < percentile <= 100.0:
            raise ValueError(
                f"percentile={percentile!r} must be in (0, 100], e.g. 99.99 (the 99.99th "
                "percentile of |x|)."
            )
        h, edges = _hist_or_fail(stats, observer)
        cdf = np.cumsum(h)
        if cdf[-1] == 0:
            c = 0.0
        else:
            target = percentile / 100.0 * cdf[-1]
            i = int(np.searchsorted(cdf, target - 1e-9 * cdf[-1]))
            i = min(i, len(h) - 1)
            # Interpolate inside the bin that crosses the target.
            before = cdf[i - 1] if i > 0 else 0.0
            frac = (target - before) / h[i] if h[i] > 0 else 1.0
            c = float(edges[i] + min(max(frac, 0.0), 1.0) * (edges[i + 1] - edges[i]))
            c = min(c, max(abs(stats.min), abs(stats.max)))
    else:  # mse
        h, edges = _hist_or_fail(stats, observer)
        c = _mse_clip(h, edges, qmax)
    c = float(c)
    return c if c > 0 and math.isfinite(c) else 1.0


# --------------------------------------------------------------------------- calibrate


def _as_args(batch) -> tuple:
    if isinstance(batch, tuple):
        return batch
    if isinstance(batch, list):
        return tuple(batch)
    return (batch,)


def _call_args(params, batch, argnum: int) -> tuple:
    args = list(_as_args(batch))
    if not 0 <= argnum <= len(args):
        raise ValueError(
            f"argnum={argnum} is out of range for a batch of {len(args)} argument(s); params "
            f"are inserted at position argnum among fn's positional arguments (0..{len(args)})."
        )
    args.insert(argnum, params)
    return tuple(args)


def _row_mask_of(row_mask, batch, i: int):
    """The flat bool mask ``row_mask(*batch)`` (None without a row_mask)."""
    if row_mask is None:
        return None
    m = np.asarray(row_mask(*_as_args(batch)))
    if m.dtype != np.bool_:
        ok = np.issubdtype(m.dtype, np.number) and bool(np.all((m == 0) | (m == 1)))
        if not ok:
            raise ValueError(
                f"row_mask returned a {m.dtype} array with values other than 0/1 for calibration "
                f"batch {i} (shapes {_shapes(batch)}); it must return a bool or 0/1 array with "
                "one entry per token row, e.g. row_mask=lambda ids, mask: mask."
            )
    return m.reshape(-1).astype(bool)


def _set_leaves(params, values: Mapping[str, Any]):
    def f(path, leaf):
        return values.get(path_str(path), leaf)

    return jax.tree_util.tree_map_with_path(f, params, is_leaf=is_qarray)


def _k_of(w) -> int:
    # Flax convention: (..., K, N), contraction axis -2; 1-D weights contract
    # their only axis.
    return int(w.shape[-2]) if w.ndim >= 2 else int(w.shape[0])


def _shapes(batch) -> list:
    return [tuple(getattr(a, "shape", ())) for a in _as_args(batch)]


def _progress(it, total, desc, enabled):
    if not enabled:
        return it
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency, but calibration must not need it
        return it
    return tqdm(it, total=total, desc=desc, leave=False)


class _Gatherer:
    """Accumulators for a set of weights; one per slice for stacked (scan) records."""

    def __init__(self, chosen, need_of, full_stats_for_first_only: bool = False):
        self.chosen = {p: (w, r) for p, w, r in chosen}
        self.masked = 0  # inputs a row mask was applied to
        self.need_of = need_of
        # Sequential mode: only the first layer's statistics from this pass are
        # used; the others are re-gathered after upstream quantization.
        self.first_only = full_stats_for_first_only
        self.acc: dict[str, Any] = {}
        self.order: list[str] = []

    def feed(self, records: Mapping[str, list], batch_index: int, batch, mask=None):
        for path, xs in records.items():
            if path not in self.chosen:
                continue
            w, _ = self.chosen[path]
            need = self.need_of[path]
            if path not in self.acc:
                if self.first_only and self.order:
                    need = ()
                self.order.append(path)
            for x in xs:
                x = jnp.asarray(x)
                stacked = x.ndim == 3
                if stacked:
                    n = x.shape[0]
                    accs = self.acc.setdefault(
                        path, [StatsAccumulator(x.shape[-1], need) for _ in range(n)]
                    )
                    if not isinstance(accs, list) or len(accs) != n:
                        raise ValueError(
                            f"{path} is used both inside and outside a scan (or by scans of "
                            "different lengths); calibrate it with a rule mapping it to None."
                        )
                else:
                    accs = self.acc.setdefault(path, StatsAccumulator(x.shape[-1], need))
                    if isinstance(accs, list):
                        raise ValueError(
                            f"{path} is used both inside and outside a scan; calibrate it with a "
                            "rule mapping it to None."
                        )
                expected = accs[0].k if isinstance(accs, list) else accs.k
                if x.shape[-1] != expected:
                    raise ValueError(
                        f"calibration batch {batch_index} (shapes {_shapes(batch)}): the input "
                        f"of {path} has feature size {x.shape[-1]}, but earlier batches gave "
                        f"{expected}; every batch must have the same feature sizes."
                    )
                m = mask if mask is not None and mask.shape[0] == x.shape[-2] else None
                self.masked += m is not None
                try:
                    if stacked:
                        for i, a in enumerate(accs):
                            a.update(x[i], m)
                    else:
                        accs.update(x, m)
                except NonFiniteActivations:
                    raise ValueError(
                        f"calibration batch {batch_index}: the input of {path} contains NaN "
                        f"or Inf; {NON_FINITE_FIX}"
                    ) from None

    def stats(self, path):
        a = self.acc.get(path)
        if a is None:
            return None
        if isinstance(a, list):
            return [s.result(f"{path}[{i}]") for i, s in enumerate(a)]
        return a.result(path)


# Sequential mode quantizes weights that read the same input (attention's
# query/key/value, a gated MLP's gate/up) after one shared statistics pass:
# their inputs do not depend on each other, so the result is the same as one
# pass per weight, with fewer passes. Tests switch it off to compare.
_GROUP_SHARED_INPUTS = True


def _same_inputs(rec: Mapping[str, list], a: str, b: str) -> bool:
    """Whether weights ``a`` and ``b`` read identical (non-scanned) inputs in
    this batch's records."""
    xa, xb = rec.get(a), rec.get(b)
    if not xa or not xb or len(xa) != len(xb):
        return False
    for u, v in zip(xa, xb, strict=True):
        u, v = jnp.asarray(u), jnp.asarray(v)
        if u.shape != v.shape or u.ndim == 3 or not bool(jnp.array_equal(u, v)):
            return False
    return True


def _jit_or_eager(g):
    """``jax.jit(g)`` (one compile per batch shape, reused across batches and, in
    sequential mode, across layers); eager ``g`` when the batch holds arguments
    jit cannot take (e.g. strings), which only costs speed."""
    jg = jax.jit(g)
    state = {"jit": True}

    def call(*args):
        if state["jit"]:
            try:
                return jg(*args)
            except TypeError as e:
                if "not a valid JAX type" not in str(e):
                    raise
                state["jit"] = False
        return g(*args)

    return call


def _run(g, params, batch, argnum, i, order_hint, ks=()):
    try:
        return g(*_call_args(params, batch, argnum))
    except (TypeError, ValueError) as e:
        if "calibration batch" in str(e):
            raise
        if order_hint:
            where = (
                f"the first quantized layer is {order_hint[0]} (expects inputs of size "
                f"{order_hint[1]}); "
            )
        else:
            sizes = {a.shape[-1] for a in _as_args(batch) if getattr(a, "ndim", 0) >= 1}
            odd = [f"{p} (input size {k})" for p, k in ks if k not in sizes]
            where = (
                f"selected weights whose input size matches no last axis {sorted(sizes)} of the "
                f"batch: {', '.join(odd)}; "
                if odd
                else ""
            )
        raise ValueError(
            f"calibration batch {i} (argument shapes {_shapes(batch)}) does not fit fn: {where}"
            f"{type(e).__name__}: {e}. Give batches shaped like fn's inputs (params are passed "
            f"as positional argument {argnum})."
        ) from e


def _stack(qs: list[QArray]) -> QArray:
    """Stacks per-slice QArrays of a scanned weight along a new leading axis
    (block size 1 there: each slice keeps its own scales)."""
    q0 = qs[0]
    kids = {}
    for f in ("qvalue", "scale", "zero_point", "in_scale", "act_scale"):
        v = getattr(q0, f)
        kids[f] = None if v is None else jnp.stack([getattr(q, f) for q in qs])
    return q0.replace(**kids, shape=(len(qs),) + tuple(q0.shape), block=(1,) + tuple(q0.block))


def _quantize_one(path, w, r: Recipe, stats, observer, percentile, momentum):
    if stats is None and r.needs_calibration:
        raise ValueError(
            f"recipe {r.name!r} for {path} needs calibration statistics, but no calibration rows "
            "reached this weight (it feeds no dot_general of fn); map it to None in the rules "
            "or choose a recipe that needs no data for it."
        )
    if isinstance(stats, list):
        # A stacked weight used inside scan: one slice per step, each with its own stats.
        if w.shape[0] != len(stats):
            raise ValueError(
                f"{path} has leading axis {w.shape[0]} but was scanned over {len(stats)} steps; "
                "a scanned weight must be stacked along its first axis."
            )
        return _stack(
            [
                _quantize_one(f"{path}[{i}]", w[i], r, s, observer, percentile, momentum)
                for i, s in enumerate(stats)
            ]
        )
    q = r.quantize_weight(w, path=path, stats=stats)
    act = getattr(q, "act", None)
    if act is not None and act.kind == "static":
        qmax = _formats.get(act.format).max
        c = observe_clip(stats, observer, percentile=percentile, momentum=momentum, qmax=qmax)
        q = q.replace(act_scale=jnp.asarray([c / qmax], jnp.float32))
    return q


def calibrate(
    fn: Callable,
    params,
    batches: Iterable,
    recipe: Recipe | Mapping[str, Recipe | None],
    *,
    filter_fn: Callable[[str, Any], bool] | None = None,
    observer: str = "minmax",
    percentile: float = 99.99,
    momentum: float = 0.9,
    argnum: int = 0,
    progress: bool = True,
    row_mask: Callable[..., Any] | None = None,
    prepack: bool | None = None,
):
    """Quantizes ``params`` using statistics of each weight's matmul input.

    Args:
      fn: the float model, called as ``fn(params, *batch)`` (params inserted
        at position ``argnum``), e.g. ``model.apply``.
      params: the float parameter tree (``argnum``-th argument of ``fn``).
      batches: an iterable of batches; a batch is a tuple of the remaining
        positional arguments, or a single array.
      recipe: a recipe or rules ``{regex_on_path: recipe_or_None}`` as in
        :func:`jqx.quantize` (recipes that need no calibration are allowed and
        receive the statistics too).
      filter_fn: ``(path, leaf) -> bool`` restricting the weights.
      observer: how static activation scales are chosen: ``"minmax"``,
        ``"moving_average_minmax"`` (``"ema"``), ``"percentile"`` or ``"mse"``.
      percentile: percentile of ``|x|`` for ``observer="percentile"``.
      momentum: EMA momentum for ``observer="moving_average_minmax"``.
      argnum: position of ``params`` among ``fn``'s positional arguments.
      progress: show tqdm progress bars (batches; layers in sequential mode).
      row_mask: ``row_mask(*batch) -> mask`` with one bool (or 0/1) entry per
        token row, e.g. ``lambda ids, mask: mask`` for padded text: rows where
        it is false (padding) are left out of every statistic (GPTQ's
        Hessian, AWQ/SmoothQuant channel statistics, observers). It applies
        to each matmul input with ``mask.size`` rows (inputs shaped like the
        batch's tokens); inputs with another row count (e.g. a pooled
        ``(batch, K)``) are counted whole. A warning says so when it applied
        to no input.
      prepack: as in :func:`jqx.quantize`: ``None`` (default) stores the int8
        weights (static W8A8, SmoothQuant, int8 weight-only) in the native GEMM's
        panels where it runs, ``True`` packs them anyway, ``False`` keeps the
        plain layout.

    Returns:
      ``params`` with the selected weights replaced by QArrays.

    Raises:
      ValueError: no batches; a batch that does not fit ``fn`` or whose
        feature size changes; a static-activation weight that no matmul uses.

    Example:
        >>> import jax, jax.numpy as jnp, jqx
        >>> p = {"kernel": jax.random.normal(jax.random.key(0), (16, 8))}
        >>> xs = [jax.random.normal(jax.random.key(1), (4, 16))]
        >>> q = jqx.calibrate(lambda p, x: x @ p["kernel"], p, xs,
        ...                   jqx.int8_static_activation_int8_weight(), observer="mse",
        ...                   progress=False)
        >>> bool(q["kernel"].act_scale[0] > 0)
        True
    """
    from jqx import transform as _transform  # transform sits above calibrate's math

    _layout.check_prepack("jqx.calibrate", prepack)
    observer = _observer_name(observer)
    chosen = select(params, recipe, filter_fn)
    if not chosen:
        warnings.warn(
            "jqx.calibrate: no weight was selected (the recipe/rules/filter_fn matched nothing); "
            "params are returned unchanged.",
            stacklevel=2,
        )
    need_of = {}
    for p, _, r in chosen:
        need = set(getattr(r, "stats_needed", ()) or ())
        if r.act is not None and r.act.kind == "static":
            need |= set(_OBSERVER_STATS[observer])
        need_of[p] = tuple(sorted(need))
    paths = [p for p, _, _ in chosen]
    sequential = any(getattr(r, "sequential", False) for _, _, r in chosen)

    if sequential:
        batches = list(batches)
        if not batches:
            raise ValueError(
                "jqx.calibrate got no calibration batches (batches is empty); pass an iterable "
                "of at least one batch, e.g. [x0, x1] or [(x0, mask0), ...]."
            )
    out: dict[str, QArray] = {}
    ks = [(p, _k_of(w)) for p, w, _ in chosen]
    cap = _transform.capture_inputs(fn, paths, argnum=argnum)
    # jit returns the records' dict with sorted keys; the forward order (first
    # use) is read while tracing and restored after every call.
    first_use: list[str] = []

    def traced(*args):
        out, rec = cap(*args)
        if not first_use:
            first_use.extend(rec)
        return out, rec

    jg = _jit_or_eager(traced)

    def g(*args):
        out, rec = jg(*args)
        rank = {p: i for i, p in enumerate(first_use)}
        return out, dict(sorted(rec.items(), key=lambda kv: rank.get(kv[0], len(rank))))

    # Pass 1 (all weights at once; for sequential recipes it also fixes the order).
    gat = _Gatherer(chosen, need_of, full_stats_for_first_only=sequential)
    n = 0
    order_hint = None
    total = len(batches) if hasattr(batches, "__len__") else None
    masks = []  # per batch, kept for the sequential passes
    same: dict[tuple[str, str], bool] = {}  # neighbours in order with equal inputs
    for i, batch in enumerate(_progress(batches, total, "calibrate", progress)):
        _, rec = _run(g, params, batch, argnum, i, order_hint, ks)
        masks.append(_row_mask_of(row_mask, batch, i))
        gat.feed(rec, i, batch, masks[-1])
        if sequential and _GROUP_SHARED_INPUTS:
            for a, b in zip(gat.order, gat.order[1:], strict=False):
                # Equal on every batch (a pair first seen after batch 0 is not trusted).
                seen = same.get((a, b), i == 0)
                same[(a, b)] = seen and _same_inputs(rec, a, b)
        if order_hint is None and gat.order:
            first = gat.order[0]
            order_hint = (first, _k_of(gat.chosen[first][0]))
        n += 1
    if n == 0:
        raise ValueError(
            "jqx.calibrate got no calibration batches (batches is empty); pass an iterable of at "
            "least one batch, e.g. [x0, x1] or [(x0, mask0), ...]."
        )

    if row_mask is not None and chosen and gat.masked == 0:
        warnings.warn(
            "jqx.calibrate: row_mask was given but no selected weight's input has one row per "
            "mask entry, so no row was left out; return a mask shaped like the batch's token "
            "positions (e.g. (batch, seq)).",
            stacklevel=2,
        )
    if not sequential:
        for p, w, r in chosen:
            out[p] = _quantize_one(p, w, r, gat.stats(p), observer, percentile, momentum)
        return _layout.pack_default(_set_leaves(params, out), prepack)

    # Sequential (GPTQ-style): forward order, earlier layers substituted by their
    # dequantized values so that fn runs unchanged.
    order = gat.order + [p for p in paths if p not in gat.order]
    current = params
    by_path = {p: (w, r) for p, w, r in chosen}
    groups: list[list[str]] = []  # consecutive weights reading the same input
    for p in order:
        if groups and same.get((groups[-1][-1], p), False):
            groups[-1].append(p)
        else:
            groups.append([p])
    first = True
    for group in _progress(groups, len(groups), "calibrate layers", progress):
        lead = group[0]
        w, r = by_path[lead]
        if isinstance(gat.acc.get(lead), list) and getattr(r, "sequential", False):
            warnings.warn(
                f"jqx.calibrate: {lead} is a stacked weight used inside scan; its {w.shape[0]} "
                "slices are calibrated in one pass (layers before the scan are already "
                "quantized, earlier slices of the same stack are not).",
                stacklevel=2,
            )
        need = tuple(sorted({s for m in group for s in need_of[m]}))
        if lead not in gat.acc or (first and set(need) <= set(need_of[lead])):
            acc = gat.acc.get(lead)  # nothing upstream changed yet (or never used)
        else:
            # The same compiled capture for every layer: only the values change.
            one = _Gatherer([(lead, w, r)], {lead: need})
            for i, batch in enumerate(batches):
                _, rec = _run(g, current, batch, argnum, i, order_hint, ks)
                one.feed({lead: rec.get(lead, [])}, i, batch, masks[i])
            acc = one.acc.get(lead)
        first = False
        for p in group:  # a group's members read the lead's input: the same statistics
            wp, rp = by_path[p]
            if acc is None:
                stats = None
            elif isinstance(acc, list):
                stats = [a.result(f"{p}[{i}]") for i, a in enumerate(acc)]
            else:
                stats = acc.result(p)
            q = _quantize_one(p, wp, rp, stats, observer, percentile, momentum)
            out[p] = q
            current = _set_leaves(current, {p: q.dequantize(jnp.dtype(wp.dtype))})
    return _layout.pack_default(_set_leaves(params, out), prepack)
