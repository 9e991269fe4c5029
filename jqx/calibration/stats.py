"""Streaming statistics of a weight's matmul input (framework-free).

``jqx.calibrate`` feeds every calibration batch's input rows ``x`` (shape
``(rows, K)``, K = the weight's contraction size) into one
:class:`StatsAccumulator` per quantized weight; the algorithms (GPTQ, AWQ,
SmoothQuant, static activation scales) read the finished :class:`LayerStats`.
Nothing holds more than one batch of activations at a time, except the
bounded row ``sample`` (AWQ's search data).

Example:
    >>> import jax.numpy as jnp
    >>> acc = StatsAccumulator(k=2, need=("xtx", "absmax"))
    >>> acc.update(jnp.array([[1.0, -2.0], [3.0, 0.5]]))
    >>> st = acc.result("w")
    >>> st.absmax.tolist(), st.n
    ([3.0, 2.0], 2)
    >>> acc.update(jnp.array([[9.0, 9.0], [0.0, 1.0]]), mask=[False, True])  # row 0: padding
    >>> acc.result("w").absmax.tolist(), acc.result("w").n
    ([3.0, 2.0], 3)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from jqx.core.numerics import nan_max, nan_min

__all__ = ["LayerStats", "StatsAccumulator", "STAT_NAMES"]

#: What an accumulator can gather. ``minmax`` is always gathered.
STAT_NAMES = ("xtx", "absmax", "mean_abs", "sample", "hist")


@dataclasses.dataclass
class LayerStats:
    """Statistics of the rows ``x`` that multiply one weight (``x @ W``).

    Attributes:
      path: the weight's path.
      n: rows seen.
      k: contraction size.
      min, max: global min/max of x (floats).
      minmax_history: per-batch (min, max) pairs (for moving-average observers).
      xtx: sum over rows of x^T x, (K, K) float32 (GPTQ: H = 2 xtx / n).
      absmax: per-input-channel max |x|, (K,) (SmoothQuant).
      mean_abs: per-input-channel mean |x|, (K,) (AWQ).
      sample: up to ``max_sample_rows`` rows, (rows, K) (AWQ's search).
      hist, hist_edges: histogram of |x| (percentile and MSE observers).
    """

    path: str
    n: int
    k: int
    min: float
    max: float
    minmax_history: list
    xtx: jax.Array | None = None
    absmax: jax.Array | None = None
    mean_abs: jax.Array | None = None
    sample: jax.Array | None = None
    hist: np.ndarray | None = None
    hist_edges: np.ndarray | None = None


@jax.jit
def _xtx(x):
    x = x.astype(jnp.float32)
    return jnp.matmul(x.T, x, precision=jax.lax.Precision.HIGHEST)


NON_FINITE_FIX = (
    "static scales and GPTQ's Hessian from them would be garbage. Check the float model "
    "on these batches (jnp.isfinite) or leave the offending batches out."
)


class NonFiniteActivations(ValueError):
    """A calibration batch's activations hold NaN or Inf (the engine names the batch
    and the layer)."""


class StatsAccumulator:
    """Accumulates :class:`LayerStats` over batches of rows.

    Args:
      k: contraction size.
      need: which of ``STAT_NAMES`` to gather.
      max_sample_rows: cap on the kept row sample.
      hist_bins: bins of the |x| histogram; its range grows by re-binning.
      seed: for the row sample.
    """

    def __init__(
        self,
        k: int,
        need: Iterable[str] = (),
        *,
        max_sample_rows: int = 4096,
        hist_bins: int = 2048,
        seed: int = 0,
    ):
        need = tuple(need)
        bad = [n for n in need if n not in STAT_NAMES]
        if bad:
            raise ValueError(f"unknown statistics {bad}; choose from {STAT_NAMES}.")
        self.k, self.need = int(k), set(need)
        self.n = 0
        self.min, self.max = np.inf, -np.inf
        self.history: list = []
        self.xtx = self.absmax = self.sum_abs = None
        self.sample: list = []
        self.sample_rows = 0
        self.max_sample_rows = max_sample_rows
        self.hist_bins = hist_bins
        self.hist = None
        self.hist_max = 0.0
        self._rng = np.random.default_rng(seed)

    def update(self, x: jax.Array, mask=None) -> None:
        """Adds the rows of ``x`` (rows, K); with ``mask`` (rows,) only the rows
        where it is true (e.g. not padding) count, in every statistic."""
        x = jnp.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.k:
            raise ValueError(
                f"calibration rows have shape {tuple(x.shape)}, expected (rows, {self.k}); the "
                "batch's feature size does not match the weight's input size."
            )
        if mask is not None:
            m = np.asarray(mask).reshape(-1).astype(bool)
            if m.shape[0] != x.shape[0]:
                raise ValueError(
                    f"mask has {m.shape[0]} entries for {x.shape[0]} calibration rows; give one "
                    "entry per row."
                )
            if not m.any():
                return
            if not m.all():
                x = x[np.flatnonzero(m)]
        xf = x.astype(jnp.float32)
        # nan_min / nan_max: XLA:CPU's own min and max drop a NaN at many shapes.
        bmin, bmax = float(nan_min(xf)), float(nan_max(xf))
        if not (np.isfinite(bmin) and np.isfinite(bmax)):
            raise NonFiniteActivations(
                f"calibration activations contain NaN or Inf; {NON_FINITE_FIX}"
            )
        self.history.append((bmin, bmax))
        self.min, self.max = min(self.min, bmin), max(self.max, bmax)
        self.n += x.shape[0]
        if "xtx" in self.need:
            v = _xtx(xf)
            self.xtx = v if self.xtx is None else self.xtx + v
        if "absmax" in self.need:
            v = jnp.max(jnp.abs(xf), axis=0)
            self.absmax = v if self.absmax is None else jnp.maximum(self.absmax, v)
        if "mean_abs" in self.need:
            v = jnp.sum(jnp.abs(xf), axis=0)
            self.sum_abs = v if self.sum_abs is None else self.sum_abs + v
        if "sample" in self.need and self.sample_rows < self.max_sample_rows:
            take = min(self.max_sample_rows - self.sample_rows, x.shape[0])
            idx = np.sort(self._rng.choice(x.shape[0], size=take, replace=False))
            self.sample.append(xf[idx])
            self.sample_rows += take
        if "hist" in self.need:
            a = np.abs(np.asarray(xf)).ravel()
            amax = float(a.max()) if a.size else 0.0
            if self.hist is None:
                self.hist_max = amax if amax > 0 else 1.0
                self.hist = np.zeros(self.hist_bins, np.float64)
            elif amax > self.hist_max:
                # Re-bin the old counts onto the wider range (counts move to the
                # bin holding their old centre).
                new_max = amax
                centres = (np.arange(self.hist_bins) + 0.5) * self.hist_max / self.hist_bins
                idx = np.minimum(
                    (centres / new_max * self.hist_bins).astype(int), self.hist_bins - 1
                )
                rebinned = np.zeros_like(self.hist)
                np.add.at(rebinned, idx, self.hist)
                self.hist, self.hist_max = rebinned, new_max
            h, _ = np.histogram(a, bins=self.hist_bins, range=(0.0, self.hist_max))
            self.hist += h

    def result(self, path: str) -> LayerStats:
        if self.n == 0:
            raise ValueError(f"no calibration rows reached {path}; give at least one batch.")
        return LayerStats(
            path=path,
            n=self.n,
            k=self.k,
            min=float(self.min),
            max=float(self.max),
            minmax_history=list(self.history),
            xtx=self.xtx,
            absmax=self.absmax,
            mean_abs=None if self.sum_abs is None else self.sum_abs / self.n,
            sample=jnp.concatenate(self.sample, 0) if self.sample else None,
            hist=self.hist,
            hist_edges=None
            if self.hist is None
            else np.linspace(0.0, self.hist_max, self.hist_bins + 1),
        )
