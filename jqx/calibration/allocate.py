"""Bits where they matter: ``jqx.allocate`` picks a format per weight under a byte budget.

For every selected weight and every candidate recipe, :func:`allocate` measures the
*sensitivity*: how much the model's output moves away from the float model's when only
that weight is quantized with that candidate (mean KL divergence of the output
distributions for ``metric="kl"``, relative squared error for ``metric="mse"``), on
calibration batches. Assuming the increases add up, choosing one candidate per weight
to minimise the total under a byte budget is a multiple-choice knapsack; it is solved
greedily on the lower convex hull of each weight's (bytes, sensitivity) points: every
weight starts at its smallest candidate, and the upgrade that buys the most
sensitivity per extra byte is taken next while it fits (the Lagrangian solution, up to
the last weight that no longer fits).

The result is an :class:`Allocation`: ``rules`` for :func:`jqx.quantize` (or
:func:`jqx.calibrate`, when a candidate needs data), and a report of what went where.
The guide ``docs/guide/llm.md`` (section "Bits where they matter") compares it with
llama.cpp's fixed mixed-type rules.

Example:
    >>> import jax, jax.numpy as jnp, jqx
    >>> k = jax.random.split(jax.random.key(0), 3)
    >>> params = {"a": {"kernel": jax.random.normal(k[0], (64, 64))},
    ...           "b": {"kernel": jax.random.normal(k[1], (64, 16))}}
    >>> fn = lambda p, x: jnp.tanh(x @ p["a"]["kernel"]) @ p["b"]["kernel"]
    >>> xs = [jax.random.normal(k[2], (32, 64))]
    >>> cands = {"int4": jqx.int4_weight_only(group_size=32), "int8": jqx.int8_weight_only()}
    >>> plan = jqx.allocate(fn, params, xs, cands, bits_per_weight=6.0, progress=False)
    >>> abs(plan.bits_per_weight - 6.0) < 2.0, sorted(plan.choice)
    (True, ['a/kernel', 'b/kernel'])
    >>> q = jqx.quantize(params, plan.rules)
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jqx.calibration.engine import _as_args, _call_args, _progress, _set_leaves, calibrate
from jqx.core.qarray import is_qarray
from jqx.core.tree import path_str
from jqx.recipes.apply import select
from jqx.recipes.base import Recipe

__all__ = ["allocate", "Allocation", "METRICS"]

#: Output distances :func:`allocate` can measure.
METRICS = ("kl", "mse")


@dataclasses.dataclass(frozen=True)
class Allocation:
    """What :func:`allocate` returns.

    Attributes:
      rules: ``{"^path$": recipe}`` for every selected weight, in the order they were
        measured: pass them to :func:`jqx.quantize` (or :func:`jqx.calibrate`).
      choice: path -> the chosen candidate's name.
      candidates: name -> recipe.
      sensitivity: path -> candidate name -> output distance with only that weight
        quantized with that candidate (the quantity summed and minimised).
      nbytes: path -> candidate name -> the weight's bytes in that candidate.
      numel: path -> the weight's element count.
      budget_bytes: the budget the choice respects.
      metric: ``"kl"`` or ``"mse"``.
    """

    rules: dict[str, Recipe]
    choice: dict[str, str]
    candidates: dict[str, Recipe]
    sensitivity: dict[str, dict[str, float]]
    nbytes: dict[str, dict[str, int]]
    numel: dict[str, int]
    budget_bytes: int
    metric: str

    @property
    def total_bytes(self) -> int:
        """Bytes of the selected weights under the chosen candidates."""
        return sum(self.nbytes[p][c] for p, c in self.choice.items())

    @property
    def bits_per_weight(self) -> float:
        """``8 * total_bytes / elements`` over the selected weights (scales included)."""
        return 8.0 * self.total_bytes / max(1, sum(self.numel.values()))

    @property
    def predicted(self) -> float:
        """The sum of the chosen candidates' sensitivities (the additive estimate the
        choice minimises; the measured distance of the whole quantized model differs)."""
        return float(sum(self.sensitivity[p][c] for p, c in self.choice.items()))

    def uniform(self, name: str) -> tuple[int, float]:
        """``(bytes, predicted distance)`` of giving every weight candidate ``name``."""
        if name not in self.candidates:
            raise ValueError(
                f"uniform: name={name!r} is not a candidate; the candidates are "
                f"{sorted(self.candidates)}."
            )
        b = sum(self.nbytes[p][name] for p in self.choice)
        return b, float(sum(self.sensitivity[p][name] for p in self.choice))

    def counts(self) -> dict[str, int]:
        """Candidate name -> how many weights got it."""
        out = {n: 0 for n in self.candidates}
        for c in self.choice.values():
            out[c] += 1
        return out

    def table(self) -> str:
        """A Markdown table: one row per weight (path, choice, bytes, sensitivity of
        every candidate), then the totals against the budget."""
        names = list(self.candidates)
        head = "| weight | choice | bytes | " + " | ".join(f"{self.metric} {n}" for n in names)
        lines = [head + " |", "|---|---|---|" + "---|" * len(names)]
        for p, c in self.choice.items():
            sens = " | ".join(f"{self.sensitivity[p][n]:.3g}" for n in names)
            lines.append(f"| {p} | {c} | {self.nbytes[p][c]} | {sens} |")
        lines.append(
            f"\n{len(self.choice)} weights: {self.total_bytes} bytes "
            f"({self.bits_per_weight:.3f} bits per weight) for a budget of {self.budget_bytes}; "
            f"predicted {self.metric} {self.predicted:.4g}; "
            + ", ".join(f"{n}: {k}" for n, k in self.counts().items())
        )
        return "\n".join(lines)


def _candidates(candidates) -> dict[str, Recipe]:
    if isinstance(candidates, Recipe):
        candidates = [candidates]
    if isinstance(candidates, Mapping):
        items = list(candidates.items())
    elif isinstance(candidates, Sequence) and not isinstance(candidates, str):
        items = [(getattr(r, "name", repr(r)), r) for r in candidates]
    else:
        raise TypeError(
            f"candidates={candidates!r} must be a dict {{name: recipe}} or a list of jqx "
            "recipes, e.g. {'int4': jqx.int4_weight_only(group_size=32), "
            "'int8': jqx.int8_weight_only()}."
        )
    if not items:
        raise ValueError(
            "candidates is empty; give at least one recipe, e.g. {'int4': "
            "jqx.int4_weight_only(group_size=32), 'int8': jqx.int8_weight_only()}."
        )
    out: dict[str, Recipe] = {}
    for name, r in items:
        if not isinstance(r, Recipe):
            raise TypeError(
                f"candidates[{name!r}] must be a jqx recipe (e.g. jqx.int8_weight_only()), got "
                f"{type(r).__name__}: {r!r}."
            )
        if name in out:
            raise ValueError(
                f"candidates: two recipes are named {name!r}; pass a dict {{name: recipe}} "
                "with distinct names."
            )
        out[str(name)] = r
    return out


def _distance(metric: str):
    def kl(ref, out):
        p = jax.nn.log_softmax(ref.astype(jnp.float32), axis=-1)
        q = jax.nn.log_softmax(out.astype(jnp.float32), axis=-1)
        return jnp.mean(jnp.sum(jnp.exp(p) * (p - q), axis=-1))

    def mse(ref, out):
        ref, out = ref.astype(jnp.float32), out.astype(jnp.float32)
        return jnp.mean((out - ref) ** 2) / jnp.maximum(jnp.mean(ref * ref), 1e-30)

    return jax.jit(kl if metric == "kl" else mse)


def _hull(points: list[tuple[int, float, str]]) -> list[tuple[int, float, str]]:
    """The lower convex hull of (bytes, distance) points from the smallest candidate on:
    dominated points (more bytes, no less distance) and points above the hull dropped,
    so that successive upgrades have falling distance saved per byte."""
    pts = sorted(points, key=lambda t: (t[0], t[1]))
    kept: list[tuple[int, float, str]] = []
    for b, s, n in pts:
        if kept and s >= kept[-1][1]:
            continue  # dominated: more bytes for no gain
        if kept and b == kept[-1][0]:
            kept.pop()
        while len(kept) >= 2:
            (b0, s0, _), (b1, s1, _) = kept[-2], kept[-1]
            # drop the middle point when it lies on or above the segment (b0,s0)-(b,s)
            if (s0 - s1) * (b - b0) <= (s0 - s) * (b1 - b0):
                kept.pop()
            else:
                break
        kept.append((b, s, n))
    return kept


def choose(
    sensitivity: Mapping[str, Mapping[str, float]],
    nbytes: Mapping[str, Mapping[str, int]],
    budget_bytes: int,
) -> dict[str, str]:
    """One candidate per weight minimising the summed sensitivity with total bytes at
    most ``budget_bytes`` (greedy on the convex hulls; see the module docstring).

    Raises:
      ValueError: the budget is below the sum of every weight's smallest candidate.

    Example:
        >>> choose({"a": {"4": 1.0, "8": 0.1}, "b": {"4": 0.5, "8": 0.4}},
        ...        {"a": {"4": 10, "8": 20}, "b": {"4": 10, "8": 20}}, 30)
        {'a': '8', 'b': '4'}
    """
    hulls = {
        p: _hull([(int(nbytes[p][n]), float(s), n) for n, s in sens.items()])
        for p, sens in sensitivity.items()
    }
    floor = sum(h[0][0] for h in hulls.values())
    if budget_bytes < floor:
        raise ValueError(
            f"budget of {budget_bytes} bytes is below {floor} bytes, what every weight in its "
            "smallest candidate needs; raise the budget (bits_per_weight or budget_bytes) or "
            "add a smaller candidate."
        )
    level = {p: 0 for p in hulls}
    spent = floor
    heap: list[tuple[float, int, str]] = []
    order = {p: i for i, p in enumerate(hulls)}

    def push(p):
        h, i = hulls[p], level[p]
        if i + 1 < len(h):
            gain = (h[i][1] - h[i + 1][1]) / max(1, h[i + 1][0] - h[i][0])
            heapq.heappush(heap, (-gain, order[p], p))

    for p in hulls:
        push(p)
    while heap:
        _, _, p = heapq.heappop(heap)
        h, i = hulls[p], level[p]
        extra = h[i + 1][0] - h[i][0]
        if spent + extra > budget_bytes:
            continue  # this weight's next step does not fit; others may
        spent += extra
        level[p] = i + 1
        push(p)
    return {p: hulls[p][level[p]][2] for p in hulls}


def allocate(
    fn: Callable,
    params,
    batches: Iterable,
    candidates: Mapping[str, Recipe] | Sequence[Recipe],
    *,
    bits_per_weight: float | None = None,
    budget_bytes: int | None = None,
    filter_fn: Callable[[str, Any], bool] | None = None,
    metric: str = "kl",
    argnum: int = 0,
    progress: bool = True,
) -> Allocation:
    """Chooses a candidate recipe per weight to minimise the output error under a budget.

    Args:
      fn: the float model, called as ``fn(params, *batch)`` (params at ``argnum``); for
        ``metric="kl"`` it returns logits (the distributions are over the last axis).
      params: the float parameter tree.
      batches: calibration batches as for :func:`jqx.calibrate` (at least one).
      candidates: ``{name: recipe}`` or a list of recipes (named by ``recipe.name``).
        Candidates that need calibration (GPTQ, AWQ) are calibrated on ``batches`` one
        weight at a time.
      bits_per_weight: the budget as bits per element of the selected weights (scales
        and zero points count), e.g. ``4.5``.
      budget_bytes: the budget in bytes of the selected weights (give one of the two).
      filter_fn: ``(path, leaf) -> bool`` choosing the weights (default: as
        :func:`jqx.quantize`, matmul ``kernel`` leaves).
      metric: ``"kl"`` (mean KL divergence of the output distributions from the float
        model's, as llama.cpp's perplexity tool reports) or ``"mse"`` (squared output
        error relative to the output's mean square).
      argnum: position of ``params`` among ``fn``'s arguments.
      progress: a tqdm progress bar over the weights.

    Returns:
      An :class:`Allocation` (``rules`` for :func:`jqx.quantize`, ``table()`` report).

    Raises:
      ValueError: no batches, no or both budgets, a budget below what the smallest
        candidates need, an unknown ``metric``, no weight selected.
      TypeError: a candidate that is not a jqx recipe.

    Example:
        >>> import jax, jax.numpy as jnp, jqx
        >>> p = {"d": {"kernel": jax.random.normal(jax.random.key(0), (64, 8))}}
        >>> xs = [jax.random.normal(jax.random.key(1), (16, 64))]
        >>> plan = jqx.allocate(lambda p, x: x @ p["d"]["kernel"], p, xs,
        ...                     [jqx.int8_weight_only()], bits_per_weight=9, progress=False)
        >>> plan.choice["d/kernel"] == jqx.int8_weight_only().name
        True
    """
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r} is not supported; use one of {METRICS}.")
    if (bits_per_weight is None) == (budget_bytes is None):
        raise ValueError(
            f"give exactly one budget: bits_per_weight (e.g. 4.5) or budget_bytes (got "
            f"bits_per_weight={bits_per_weight!r}, budget_bytes={budget_bytes!r})."
        )
    budget = bits_per_weight if budget_bytes is None else budget_bytes
    if isinstance(budget, bool) or not isinstance(budget, int | float) or not budget > 0:
        name = "bits_per_weight" if budget_bytes is None else "budget_bytes"
        raise ValueError(f"{name}={budget!r} must be a positive number.")
    cands = _candidates(candidates)
    batches = list(batches)
    if not batches:
        raise ValueError(
            "jqx.allocate got no calibration batches (batches is empty): sensitivities are "
            "measured on data; pass at least one batch shaped like fn's inputs, e.g. [x0]."
        )
    first = next(iter(cands.values()))
    chosen = select(params, first, filter_fn)
    if not chosen:
        raise ValueError(
            "jqx.allocate: no weight was selected (by default only 'kernel' leaves with ndim "
            ">= 2); pass a filter_fn that accepts the weights to allocate."
        )
    paths = [p for p, _, _ in chosen]
    numel = {p: int(np.prod(w.shape)) for p, w, _ in chosen}
    total = sum(numel.values())
    budget_b = int(budget_bytes) if budget_bytes is not None else int(bits_per_weight * total / 8)

    dist = _distance(metric)
    run = jax.jit(lambda prm, *a: fn(*_call_args(prm, a, argnum)))
    from jqx.transform import quantized as _quantized  # noqa: PLC0415  (a layer below)

    run_q = jax.jit(lambda prm, *a: _quantized(fn)(*_call_args(prm, a, argnum)))
    refs = [run(params, *_as_args(b)) for b in batches]

    sens: dict[str, dict[str, float]] = {p: {} for p in paths}
    sizes: dict[str, dict[str, int]] = {p: {} for p in paths}
    for p, w, _ in _progress(chosen, len(chosen), "allocate: sensitivity", progress):

        def only(path, leaf, _p=p):
            return path == _p

        for name, r in cands.items():
            if r.needs_calibration:
                qp = calibrate(
                    fn,
                    params,
                    batches,
                    r,
                    filter_fn=only,
                    argnum=argnum,
                    progress=False,
                    prepack=False,
                )
                q = _leaf(qp, p)
            else:
                q = r.quantize_weight(w, path=p)
            sizes[p][name] = int(q.nbytes)
            if q.act is None:
                trial = _set_leaves(params, {p: q.dequantize(jnp.dtype(w.dtype))})
                outs = [run(trial, *_as_args(b)) for b in batches]
            else:  # activations quantized too: run the quantized matmul itself
                trial = _set_leaves(params, {p: q})
                outs = [run_q(trial, *_as_args(b)) for b in batches]
            d = [float(dist(ref, out)) for ref, out in zip(refs, outs, strict=True)]
            sens[p][name] = float(np.mean(d)) if all(map(math.isfinite, d)) else math.inf
    floor = sum(min(b.values()) for b in sizes.values())
    if budget_b < floor:
        given = (
            f"bits_per_weight={bits_per_weight!r}"
            if budget_bytes is None
            else f"budget_bytes={budget_bytes!r}"
        )
        raise ValueError(
            f"{given} is below what the smallest candidates need: {floor} bytes, "
            f"{8 * floor / total:.3f} bits per weight over {len(paths)} weights; raise the "
            "budget to at least that or add a smaller candidate (e.g. a larger group size)."
        )
    choice = choose(sens, sizes, budget_b)
    rules = {"^" + re.escape(p) + "$": cands[choice[p]] for p in paths}
    return Allocation(
        rules=rules,
        choice=choice,
        candidates=cands,
        sensitivity=sens,
        nbytes=sizes,
        numel=numel,
        budget_bytes=budget_b,
        metric=metric,
    )


def _leaf(tree, path: str):
    for pth, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_qarray)[0]:
        if path_str(pth) == path:
            return leaf
    raise KeyError(path)
