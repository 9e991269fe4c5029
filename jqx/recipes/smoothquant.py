"""SmoothQuant (Xiao et al., 2023): move activation outliers into the weights.

Per input channel ``j`` of a kernel ``W`` (K, N) used as ``y = x @ W``:

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

(``max|X_j|`` over the calibration rows, ``max|W_j|`` over row ``j`` of W).
Then ``x @ W == (x / s) @ (s W)`` exactly; the smoothed weight ``s W`` is
quantized to int8 per output channel (W8A8 with dynamic per-token int8
activations) and ``s`` is stored as the QArray's ``in_scale`` (K, 1): the
quantized matmul divides the activations by it before quantizing them, and
``dequantize()`` divides the weight back.

Channels whose calibration max is 0 (never active) or whose weight row is 0
keep ``s_j = 1`` (the reference clamps to 1e-5, which would blow such an
input up by 1e5 if it ever became active).

Example:
    >>> import jax.numpy as jnp
    >>> s = smoothquant_scales(jnp.array([4.0, 1.0]), jnp.ones((2, 3)), alpha=0.5)
    >>> s.tolist()
    [2.0, 1.0]
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jqx.core.numerics import per_group, quantize_array
from jqx.core.qarray import ActSpec, QArray
from jqx.recipes import grid as _grid
from jqx.recipes.base import Recipe, build

__all__ = ["SmoothQuant", "smoothquant", "smoothquant_scales", "smoothquant_quantize"]


def _check_alpha(alpha):
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smoothquant: alpha={alpha!r} must be a float in [0, 1] (paper: 0.5).")


def smoothquant_scales(act_absmax: jax.Array, w: jax.Array, alpha: float = 0.5) -> jax.Array:
    """``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)`` per input channel, (K,).

    Example:
        >>> import jax.numpy as jnp
        >>> smoothquant_scales(jnp.array([9.0]), jnp.array([[4.0]]), alpha=0.5).tolist()
        [1.5]
    """
    _check_alpha(alpha)
    w = _grid.check_kernel(w, "smoothquant", None)
    a = jnp.asarray(act_absmax, jnp.float32)
    if a.shape != (w.shape[0],):
        raise ValueError(
            f"smoothquant: activation absmax has shape {tuple(a.shape)} but the weight has "
            f"K={w.shape[0]} inputs; expected ({w.shape[0]},). The calibration data's feature "
            "size must match the weight's input size."
        )
    wmax = jnp.max(jnp.abs(w.astype(jnp.float32)), axis=1)
    ok = (a > 0) & (wmax > 0)
    s = jnp.power(jnp.where(ok, a, 1.0), alpha) / jnp.power(jnp.where(ok, wmax, 1.0), 1.0 - alpha)
    return jnp.where(ok, s, 1.0)


def smoothquant_quantize(
    w: jax.Array,
    act_absmax: jax.Array,
    alpha: float = 0.5,
    *,
    act: ActSpec | None = ActSpec("dynamic", "int8", "per_token"),
    path: str | None = None,
) -> QArray:
    """Smooths ``w`` with the calibration absmax and quantizes ``s W`` to int8
    per output channel, with ``in_scale = s`` and W8A8 activations.

    Example:
        >>> import jax.numpy as jnp
        >>> q = smoothquant_quantize(jnp.ones((4, 2)), jnp.array([1.0, 2.0, 3.0, 4.0]))
        >>> q.act.kind, q.in_scale.shape
        ('dynamic', (4, 1))
    """
    w = _grid.check_kernel(w, "smoothquant", path)
    s = smoothquant_scales(act_absmax, w, alpha)
    ws = (w.astype(jnp.float32) * s[:, None]).astype(w.dtype)
    q = quantize_array(
        ws, "int8", scheme="absmax", granularity=per_group(None, -2), act=act, path=path
    )
    return q.replace(in_scale=s[:, None].astype(jnp.float32))


@dataclasses.dataclass(frozen=True, kw_only=True)
class SmoothQuant(Recipe):
    """SmoothQuant W8A8 recipe and settings; build it with :func:`smoothquant`.

    int8 weights per output channel, dynamic int8 activations; needs
    ``jqx.calibrate`` (statistic ``absmax``).

    Example:
        >>> r = SmoothQuant(alpha=0.8)
        >>> r.name, r.format, r.act.granularity
        ('smoothquant(alpha=0.8)', 'int8', 'per_token')
    """

    alpha: float = 0.5
    act_granularity: str = "per_token"

    def __post_init__(self):
        _check_alpha(self.alpha)
        object.__setattr__(self, "alpha", float(self.alpha))
        ActSpec("dynamic", "int8", self.act_granularity)  # checks act_granularity

    @property
    def format(self) -> str:
        return "int8"

    @property
    def scheme(self) -> str:
        return "absmax"

    @property
    def name(self) -> str:
        return f"smoothquant(alpha={self.alpha})"

    @property
    def act(self) -> ActSpec:
        return ActSpec("dynamic", "int8", self.act_granularity)

    @property
    def needs_calibration(self) -> bool:
        return True

    @property
    def stats_needed(self) -> tuple[str, ...]:
        return ("absmax",)

    def quantize_weight(self, w: jax.Array, path: str | None = None, stats: Any = None) -> QArray:
        """Smooth + int8 one kernel from its LayerStats (``absmax``)."""
        if stats is None or getattr(stats, "absmax", None) is None:
            raise ValueError(
                f"smoothquant needs the calibration statistic 'absmax' for {path or 'this weight'};"
                " run it with jqx.calibrate(fn, params, batches, jqx.smoothquant(...))."
            )
        return smoothquant_quantize(w, stats.absmax, self.alpha, act=self.act, path=path)


def smoothquant(**kw) -> SmoothQuant:
    """SmoothQuant + W8A8 int8 (per-channel weights, dynamic int8 activations),
    keyword arguments only.

    Args:
      alpha: migration strength (0: plain W8A8, 1: all difficulty to weights);
        default 0.5.
      act_granularity: ``"per_token"`` (default) or ``"per_tensor"`` dynamic
        activation scales.

    Returns:
      A :class:`SmoothQuant` recipe (apply it with ``jqx.calibrate``).

    Example:
        >>> import jqx
        >>> jqx.smoothquant(alpha=0.5).stats_needed
        ('absmax',)
    """
    return build(SmoothQuant, "smoothquant", kw)
