"""FP8 training with delayed scaling (E4M3 forward, E5M2 gradients).

``delayed_scaling(fn)`` runs an unmodified model (any function of a params
tree) with every matmul that uses a selected weight (default: the ``kernel``
leaves ``jqx.quantize`` selects) done the FP8 way (as Transformer Engine and
Flax's ``Fp8DotGeneralOp`` do):

- the matmul's input and the weight are quantized to E4M3 with per-tensor
  scales, the product runs on the quantized values;
- the gradient arriving at the matmul's output is quantized to E5M2 before
  it flows into the two backward matmuls;
- each of the three tensors keeps an amax history (default length 1024) and
  its scale is computed from the history of *earlier* steps (delayed
  scaling): ``scale = fmt_max / (max(history) * 2^margin)``; a tensor is
  quantized as ``clip(x * scale)`` -> fp8 and dequantized as ``q / scale``.

The matmuls are found by the jaxpr interpreter (``jqx.transform.map_dots``),
so linen, nnx and plain-jnp models need no change. On CPU the FP8 math is
emulated: values are quantized to the fp8 grid (``jnp.float8_e4m3fn`` /
``float8_e5m2`` casts) and dequantized, and the matmul runs in the weight's
dtype. This is numerically what an FP8 GEMM computes (the products of fp8
values are exact in float32); on a GPU, XLA fuses the same
quantize-dequantize pattern into FP8 GEMMs.

State: a plain dict ``{path: {"input_scale", "input_amax_history",
"kernel_scale", "kernel_amax_history", "output_grad_scale",
"output_grad_amax_history"}}`` (scales shape ``(1,)``, histories
``(history_len,)``), passed as the first argument of the wrapped function.
The new state comes out as the *gradient* with respect to that argument
(Flax's "overwrite with gradient" convention; it is the only way to return
the output-gradient amax, which only exists in the backward pass):

Example:
    >>> import jax, jax.numpy as jnp, jqx
    >>> params = {"l": {"kernel": jnp.ones((8, 4)) / 8}}
    >>> f = jqx.fp8.delayed_scaling(lambda p, x: x @ p["l"]["kernel"])
    >>> state = jqx.fp8.init_state(params, history_len=16)
    >>> loss = lambda p, s, x: jnp.sum(f(s, p, x) ** 2)
    >>> grads, state = jax.grad(loss, argnums=(0, 1))(params, state, jnp.ones((2, 8)))
    >>> float(state["l/kernel"]["kernel_amax_history"][0])  # this step's weight amax
    0.125
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jqx.core import formats as _formats
from jqx.recipes.apply import select
from jqx.recipes.base import RTN

__all__ = [
    "init_state",
    "delayed_scaling",
    "fp8_dot_general",
    "multiplier_from_history",
    "update_amax_history",
    "fake_quant",
]

E4M3 = jnp.float8_e4m3fn
E5M2 = jnp.float8_e5m2
_ROLES = ("input", "kernel", "output_grad")


def _fmt_max(dtype) -> float:
    return _formats.get(jnp.dtype(dtype).name).max


# --------------------------------------------------------------------------- scaling math


def multiplier_from_history(
    amax_history: jax.Array, scale: jax.Array, fp8_dtype, margin: int = 0
) -> jax.Array:
    """Delayed scale from an amax history: ``fmt_max / (max(history) * 2^margin)``.

    Where the history's max is 0 or not finite, the old scale is kept.

    Example:
        >>> import jax.numpy as jnp
        >>> multiplier_from_history(jnp.array([2.0, 4.0]), jnp.ones(1), jnp.float8_e4m3fn).tolist()
        [112.0]
    """
    amax = jnp.max(amax_history, axis=0)
    sf = (_fmt_max(fp8_dtype) / amax) / (2.0**margin)
    ok = (amax > 0.0) & jnp.isfinite(amax)
    return jnp.where(ok, sf, scale).astype(scale.dtype)


def update_amax_history(x: jax.Array, amax_history: jax.Array) -> jax.Array:
    """Rolls the history and writes ``max|x|`` at index 0 (Flax's layout: index
    0 is the newest entry; only the max over the history matters).

    Example:
        >>> import jax.numpy as jnp
        >>> update_amax_history(jnp.array([-3.0, 1.0]), jnp.array([1.0, 2.0, 0.0])).tolist()
        [3.0, 0.0, 1.0]
    """
    amax = jnp.max(jnp.abs(x)).astype(amax_history.dtype)
    return jnp.roll(amax_history, shift=-1, axis=0).at[0].set(amax)


def fake_quant(x: jax.Array, fp8_dtype, scale: jax.Array) -> jax.Array:
    """Quantize to ``fp8_dtype`` with multiplicative ``scale`` (saturating) and
    dequantize back to ``x.dtype``.

    The arithmetic is ``x / (1 / scale)`` then ``* (1 / scale)``: the same
    floating-point operations as Flax's ``fp8_ops.qdq``, which stores the
    inverse scale, so the two agree bit for bit.

    Example:
        >>> import jax.numpy as jnp
        >>> fake_quant(jnp.array([0.3, 1000.0]), jnp.float8_e4m3fn, jnp.ones(1)).tolist()
        [0.3125, 448.0]
    """
    cdt = x.dtype
    inv = (1.0 / scale).astype(jnp.float32)
    dmax = jnp.asarray(_fmt_max(fp8_dtype), cdt)
    q = jnp.clip(x / jnp.broadcast_to(inv.astype(cdt), x.shape), -dmax, dmax).astype(fp8_dtype)
    return q.astype(cdt) * jnp.broadcast_to(inv.astype(cdt), x.shape)


def _update(x, fp8_dtype, scale, hist, margin):
    new_scale = multiplier_from_history(hist, scale, fp8_dtype, margin)
    return new_scale, update_amax_history(x, hist)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 4))
def _in_qdq(fp8_dtype, x, scale, hist, margin):
    new_scale, _ = _update(x, fp8_dtype, scale, hist, margin)
    return fake_quant(x, fp8_dtype, new_scale)


def _in_qdq_fwd(fp8_dtype, x, scale, hist, margin):
    new_scale, new_hist = _update(x, fp8_dtype, scale, hist, margin)
    return fake_quant(x, fp8_dtype, new_scale), (new_scale, new_hist)


def _in_qdq_bwd(fp8_dtype, margin, res, g):
    new_scale, new_hist = res
    # The "gradient" of the state is its new value (overwrite-with-gradient).
    return g, new_scale, new_hist


_in_qdq.defvjp(_in_qdq_fwd, _in_qdq_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 4))
def _out_qdq(fp8_dtype, y, scale, hist, margin):
    return y


def _out_qdq_fwd(fp8_dtype, y, scale, hist, margin):
    return y, (scale, hist)


def _out_qdq_bwd(fp8_dtype, margin, res, g):
    scale, hist = res
    new_scale, new_hist = _update(g, fp8_dtype, scale, hist, margin)
    return fake_quant(g, fp8_dtype, new_scale), new_scale, new_hist


_out_qdq.defvjp(_out_qdq_fwd, _out_qdq_bwd)


def fp8_dot_general(
    x: jax.Array,
    w: jax.Array,
    dimension_numbers,
    meta: dict,
    *,
    precision=None,
    preferred_element_type=None,
    w_is_lhs: bool = False,
    margin: int = 0,
    fwd_dtype=E4M3,
    bwd_dtype=E5M2,
) -> jax.Array:
    """One FP8 matmul with delayed scaling; ``meta`` is one entry of the state.

    ``x`` is cast to the weight's dtype (the compute dtype, as Flax does);
    ``x`` and ``w`` are quantized to ``fwd_dtype``, the output gradient to
    ``bwd_dtype``. Differentiate with respect to ``meta`` to get its update.

    Example:
        >>> import jax.numpy as jnp, jqx
        >>> meta = jqx.fp8.init_state({"k": {"kernel": jnp.ones((2, 2))}}, history_len=4)["k/kernel"]
        >>> jqx.fp8.fp8_dot_general(jnp.ones((1, 2)), jnp.ones((2, 2)), (((1,), (0,)), ((), ())),
        ...                         meta).tolist()
        [[2.0, 2.0]]
    """
    cdt = w.dtype
    x = x.astype(cdt)
    xq = _in_qdq(fwd_dtype, x, meta["input_scale"], meta["input_amax_history"], margin)
    wq = _in_qdq(fwd_dtype, w, meta["kernel_scale"], meta["kernel_amax_history"], margin)
    lhs, rhs = (wq, xq) if w_is_lhs else (xq, wq)
    y = jax.lax.dot_general(
        lhs,
        rhs,
        dimension_numbers,
        precision=precision,
        preferred_element_type=preferred_element_type,
    )
    return _out_qdq(
        bwd_dtype, y, meta["output_grad_scale"], meta["output_grad_amax_history"], margin
    )


# --------------------------------------------------------------------------- the transform


def _paths(params, filter_fn) -> list[str]:
    # Same selection as jqx.quantize; the recipe only decides "which leaves".
    return [p for p, _, _ in select(params, RTN(), filter_fn)]


def init_state(
    params, *, filter_fn: Callable[[str, Any], bool] | None = None, history_len: int = 1024
) -> dict:
    """Fresh FP8 state (unit scales, zero histories) for the selected weights.

    Args:
      params: the params pytree (the same one given to the wrapped function).
      filter_fn: ``(path, leaf) -> bool``; default: ``kernel`` leaves with
        ndim >= 2 (``jqx.tree.default_filter``).
      history_len: amax history length (Transformer Engine / Flax: 1024).

    Example:
        >>> import jax.numpy as jnp, jqx
        >>> s = jqx.fp8.init_state({"d": {"kernel": jnp.ones((4, 4))}}, history_len=8)
        >>> sorted(s["d/kernel"])[:2], s["d/kernel"]["input_amax_history"].shape
        (['input_amax_history', 'input_scale'], (8,))
    """
    if not isinstance(history_len, (int, np.integer)) or history_len < 1:
        raise ValueError(f"history_len={history_len!r} must be a positive int (default 1024).")
    out = {}
    for p in _paths(params, filter_fn):
        e = {}
        for role in _ROLES:
            e[f"{role}_scale"] = jnp.ones((1,), jnp.float32)
            e[f"{role}_amax_history"] = jnp.zeros((int(history_len),), jnp.float32)
        out[p] = e
    return out


def delayed_scaling(
    fn: Callable,
    *,
    argnum: int = 0,
    filter_fn: Callable[[str, Any], bool] | None = None,
    margin: int = 0,
    fwd_dtype=E4M3,
    bwd_dtype=E5M2,
) -> Callable:
    """Wraps ``fn`` so the matmuls of its selected weights run in FP8.

    Args:
      fn: any function taking the params at positional ``argnum``.
      argnum: position of the params among ``fn``'s arguments.
      filter_fn: which weights (as in :func:`init_state`; use the same one).
      margin: scales are divided by ``2^margin`` (headroom against growth).
      fwd_dtype, bwd_dtype: forward (input, weight) and gradient fp8 dtypes.

    Returns:
      ``g(state, *args, **kw)`` with ``fn``'s outputs. Under ``jax.grad`` with
      respect to ``state`` the "gradient" is the updated state: replace the
      state by it every step, and do not hand it to the optimizer. Each
      selected weight must feed one matmul per call (a weight used twice, or a
      stacked weight inside ``scan``, would add its state updates up): exclude
      such leaves with ``filter_fn``.

    Example:
        >>> import jax, jax.numpy as jnp, flax.linen as nn, jqx
        >>> m = nn.Dense(4)
        >>> v = m.init(jax.random.key(0), jnp.ones((1, 8)))
        >>> state = jqx.fp8.init_state(v)
        >>> f = jqx.fp8.delayed_scaling(m.apply)
        >>> jax.jit(f)(state, v, jnp.ones((2, 8))).shape
        (2, 4)
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}; pass e.g. model.apply.")
    for name, dt in (("fwd_dtype", fwd_dtype), ("bwd_dtype", bwd_dtype)):
        if jnp.dtype(dt) not in (jnp.dtype(E4M3), jnp.dtype(E5M2)):
            raise ValueError(
                f"{name}={dt!r} is not an fp8 dtype; use jnp.float8_e4m3fn or jnp.float8_e5m2."
            )

    def g(state, *args, **kw):
        if not -len(args) <= argnum < len(args):
            raise ValueError(
                f"argnum={argnum} but the function got {len(args)} positional arguments; pass "
                "the params positionally and set argnum to their position."
            )
        paths = _paths(args[argnum], filter_fn)
        missing = [p for p in paths if p not in state]
        if missing:
            raise ValueError(
                f"the fp8 state has no entry for {missing[:3]} (it has {list(state)[:3]}); "
                "build it with jqx.fp8.init_state(params, filter_fn=...) using the same "
                "params and filter_fn."
            )
        if not paths:
            return fn(*args, **kw)
        used: dict[str, int] = {}

        def rule(path, lhs, rhs, dimension_numbers, precision, preferred_element_type, w_is_lhs):
            used[path] = used.get(path, 0) + 1
            if used[path] > 1:
                raise ValueError(
                    f"{path} feeds more than one matmul; its FP8 state would be updated twice "
                    "per step. Exclude it with filter_fn (e.g. lambda p, leaf: "
                    f"jqx.tree.default_filter(p, leaf) and p != {path!r})."
                )
            x, w = (rhs, lhs) if w_is_lhs else (lhs, rhs)
            return fp8_dot_general(
                x,
                w,
                dimension_numbers,
                state[path],
                precision=precision,
                preferred_element_type=preferred_element_type,
                w_is_lhs=w_is_lhs,
                margin=margin,
                fwd_dtype=fwd_dtype,
                bwd_dtype=bwd_dtype,
            )

        from jqx import transform as _transform  # noqa: PLC0415 (training sits above it)

        return _transform.map_dots(fn, paths, rule, argnum=argnum)(*args, **kw)

    return functools.wraps(fn)(g)
