"""Mixed-precision training: dtype policies and loss scaling as optax wrappers.

A :class:`Policy` says in which dtype parameters are stored (the f32 "master
weights"), in which the forward/backward pass computes, and in which outputs
are returned; it casts at the boundary of an unmodified model function.

Loss scaling keeps small float16 gradients from flushing to zero: the loss
is multiplied by a scale ``S`` before differentiation and the gradients are
divided by ``S`` afterwards (in float32). With *dynamic* scaling ``S`` starts
at ``2**15``, doubles after ``period=2000`` consecutive finite steps and
halves (never below ``min_scale=1``) when a gradient overflows. A step whose
gradient (or update) holds an Inf or NaN is skipped: the parameters and the
inner optimizer state are left bit-for-bit unchanged.

bfloat16 has float32's exponent range, so it needs no loss scaling: a
bf16-compute policy defaults to ``loss_scale="none"`` (scale 1, non-finite
steps still skipped). float16 defaults to ``"dynamic"``.

Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from jqx import mixed_precision as mp
    >>> policy = mp.get_policy("params=float32,compute=float16,output=float32")
    >>> policy.loss_scale
    'dynamic'
    >>> params = {"w": jnp.ones((4, 2))}
    >>> def loss_fn(p, x):
    ...     p, x = policy.cast_to_compute((p, x))
    ...     return jnp.mean(jnp.square(x @ p["w"])).astype(jnp.float32)
    >>> opt = policy.wrap_optimizer(optax.sgd(0.1))   # = mp.dynamic_loss_scale(optax.sgd(0.1))
    >>> state = opt.init(params)
    >>> loss, grads = mp.value_and_grad(loss_fn)(state, params, jnp.full((3, 4), 0.1))
    >>> updates, state = opt.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)
    >>> float(mp.loss_scale(state)), int(state.loss_scale.counter)
    (32768.0, 1)

The design follows DeepMind's jmp (policies, ``all_finite``, ``select_tree``,
``DynamicLossScale``) and optax's ``apply_if_finite`` (a wrapper whose state
holds the inner state); unlike ``apply_if_finite``, the wrapper also owns the
loss scale, so the whole recipe is one ``GradientTransformation`` whose state
is a pytree that jits and checkpoints.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

__all__ = [
    "Policy",
    "get_policy",
    "LossScaleState",
    "MixedPrecisionState",
    "static_loss_scale",
    "dynamic_loss_scale",
    "no_loss_scale",
    "scale_loss",
    "unscale_grads",
    "value_and_grad",
    "loss_scale",
    "all_finite",
    "select_tree",
]

LossScaleKind = Literal["none", "static", "dynamic"]

_DTYPE_NAMES = {
    "float32": jnp.float32,
    "f32": jnp.float32,
    "fp32": jnp.float32,
    "full": jnp.float32,
    "single": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "bf16": jnp.bfloat16,
    "float16": jnp.float16,
    "f16": jnp.float16,
    "fp16": jnp.float16,
    "half": jnp.float16,
}
_KEYS = {
    "params": "param_dtype",
    "param": "param_dtype",
    "p": "param_dtype",
    "compute": "compute_dtype",
    "c": "compute_dtype",
    "output": "output_dtype",
    "o": "output_dtype",
    "loss_scale": "loss_scale",
    "ls": "loss_scale",
}
_PRESETS = {
    "float32": ("float32", "float32", "float32"),
    "f32": ("float32", "float32", "float32"),
    "full": ("float32", "float32", "float32"),
    "bfloat16": ("float32", "bfloat16", "float32"),
    "bf16": ("float32", "bfloat16", "float32"),
    "mixed_bfloat16": ("float32", "bfloat16", "float32"),
    "float16": ("float32", "float16", "float32"),
    "f16": ("float32", "float16", "float32"),
    "fp16": ("float32", "float16", "float32"),
    "mixed_float16": ("float32", "float16", "float32"),
}


def _to_dtype(value: Any, what: str) -> jnp.dtype:
    if isinstance(value, str):
        key = value.strip().lower()
        if key not in _DTYPE_NAMES:
            raise ValueError(
                f"{what}={value!r} is not a supported dtype; accepted: float32 (f32), "
                "bfloat16 (bf16), float16 (f16/half)."
            )
        return jnp.dtype(_DTYPE_NAMES[key])
    try:
        dt = jnp.dtype(value)
    except TypeError:
        raise TypeError(
            f"{what} must be a dtype or a dtype name, got {type(value).__name__}: {value!r}."
        ) from None
    if dt not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(f"{what}={dt.name} is not supported; use float32, bfloat16 or float16.")
    return dt


def _cast_tree(tree, dtype):
    def cast(x):
        if isinstance(x, (jax.Array, jnp.ndarray)) or hasattr(x, "dtype"):
            if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype:
                return jnp.asarray(x).astype(dtype)
        return x

    return jax.tree.map(cast, tree)


@dataclasses.dataclass(frozen=True)
class Policy:
    """Which dtype parameters are stored, computed and returned in.

    Only floating leaves are cast (integer token ids, masks and QArray codes
    pass through). ``loss_scale`` defaults to ``"dynamic"`` for a float16
    compute dtype and ``"none"`` otherwise (bf16 and f32 do not underflow).

    Attributes:
      param_dtype: storage dtype of the parameters (keep float32 master weights).
      compute_dtype: dtype of the forward and backward pass.
      output_dtype: dtype the wrapped function returns.
      loss_scale: ``"none"``, ``"static"`` or ``"dynamic"`` (None: by compute dtype).

    Example:
        >>> import jax.numpy as jnp
        >>> p = Policy(jnp.float32, jnp.bfloat16, jnp.float32)
        >>> p.loss_scale, p.cast_to_compute(jnp.ones(2)).dtype.name
        ('none', 'bfloat16')
    """

    param_dtype: Any = jnp.float32
    compute_dtype: Any = jnp.float32
    output_dtype: Any = jnp.float32
    loss_scale: LossScaleKind | None = None

    def __post_init__(self):
        for name in ("param_dtype", "compute_dtype", "output_dtype"):
            object.__setattr__(self, name, _to_dtype(getattr(self, name), name))
        ls = self.loss_scale
        if ls is None:
            ls = "dynamic" if self.compute_dtype == jnp.dtype(jnp.float16) else "none"
        if ls not in ("none", "static", "dynamic"):
            raise ValueError(
                f"loss_scale={ls!r} is not accepted; use 'none', 'static' or 'dynamic'."
            )
        object.__setattr__(self, "loss_scale", ls)

    def cast_to_param(self, tree):
        """Floating leaves of ``tree`` cast to ``param_dtype``."""
        return _cast_tree(tree, self.param_dtype)

    def cast_to_compute(self, tree):
        """Floating leaves of ``tree`` cast to ``compute_dtype``."""
        return _cast_tree(tree, self.compute_dtype)

    def cast_to_output(self, tree):
        """Floating leaves of ``tree`` cast to ``output_dtype``."""
        return _cast_tree(tree, self.output_dtype)

    def with_output_dtype(self, dtype) -> Policy:
        """A copy with another output dtype (e.g. float32 logits for the loss)."""
        return dataclasses.replace(self, output_dtype=dtype)

    def apply(self, fn: Callable) -> Callable:
        """Wraps ``fn(params, *inputs)``: casts everything to compute, the result to output.

        Example:
            >>> import jax.numpy as jnp
            >>> f = get_policy("bf16").apply(lambda p, x: x @ p)
            >>> f(jnp.ones((2, 2)), jnp.ones((1, 2))).dtype.name
            'float32'
        """

        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            args, kwargs = self.cast_to_compute((args, kwargs))
            return self.cast_to_output(fn(*args, **kwargs))

        return wrapped

    def wrap_optimizer(
        self, optimizer: optax.GradientTransformation, *, scale: float = 2.0**15, **dynamic_kw
    ):
        """The optimizer wrapped with this policy's loss scaling.

        ``"dynamic"`` -> :func:`dynamic_loss_scale` (``scale`` is its start,
        ``dynamic_kw`` its period/factor/min_scale), ``"static"`` ->
        :func:`static_loss_scale` with ``scale``, ``"none"`` -> :func:`no_loss_scale`.
        """
        if self.loss_scale == "dynamic":
            return dynamic_loss_scale(optimizer, initial_scale=scale, **dynamic_kw)
        if dynamic_kw:
            raise ValueError(
                f"{sorted(dynamic_kw)} only apply to loss_scale='dynamic', this policy has {self.loss_scale!r}."
            )
        if self.loss_scale == "static":
            return static_loss_scale(optimizer, scale)
        return no_loss_scale(optimizer)

    def __str__(self) -> str:
        return (
            f"params={self.param_dtype.name},compute={self.compute_dtype.name},"
            f"output={self.output_dtype.name},loss_scale={self.loss_scale}"
        )


def get_policy(spec: str | Policy) -> Policy:
    """Parses ``"params=float32,compute=bfloat16,output=float32"`` into a :class:`Policy`.

    Keys: ``params``/``p``, ``compute``/``c``, ``output``/``o``, optional
    ``loss_scale``/``ls`` (none|static|dynamic); omitted dtypes are float32.
    Presets: ``"float32"``, ``"bfloat16"``/``"mixed_bfloat16"``,
    ``"float16"``/``"mixed_float16"`` (f32 params and output, 16-bit compute).

    Example:
        >>> get_policy("p=f32,c=f16,o=f32").compute_dtype.name
        'float16'
        >>> get_policy("bf16").loss_scale
        'none'
    """
    if isinstance(spec, Policy):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"spec must be a str or Policy, got {type(spec).__name__}: {spec!r}.")
    s = spec.strip().lower()
    if s in _PRESETS:
        p, c, o = _PRESETS[s]
        return Policy(p, c, o)
    fields: dict[str, Any] = {}
    for part in filter(None, (x.strip() for x in s.split(","))):
        if "=" not in part:
            raise ValueError(
                f"policy spec {spec!r}: part {part!r} is not key=value; write e.g. "
                "'params=float32,compute=bfloat16,output=float32' or a preset "
                f"({', '.join(sorted(_PRESETS))})."
            )
        key, val = (t.strip() for t in part.split("=", 1))
        if key not in _KEYS:
            raise ValueError(
                f"policy spec {spec!r}: unknown key {key!r}; accepted: params (p), compute (c), "
                "output (o), loss_scale (ls)."
            )
        if _KEYS[key] in fields:
            raise ValueError(f"policy spec {spec!r} sets {_KEYS[key]} twice.")
        fields[_KEYS[key]] = val
    if not fields:
        raise ValueError(
            f"policy spec {spec!r} is empty; write e.g. 'params=float32,compute=bfloat16,output=float32'."
        )
    return Policy(**fields)


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["scale", "counter", "skipped"], meta_fields=[]
)
@dataclasses.dataclass(frozen=True)
class LossScaleState:
    """Loss-scale state (a pytree of scalars).

    Attributes:
      scale: float32 scalar, the current loss scale S.
      counter: int32, consecutive finite steps since the last change of S.
      skipped: int32, total steps skipped for a non-finite gradient.
    """

    scale: jax.Array
    counter: jax.Array
    skipped: jax.Array


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["loss_scale", "inner_state"], meta_fields=[]
)
@dataclasses.dataclass(frozen=True)
class MixedPrecisionState:
    """State of a loss-scaling wrapper: the :class:`LossScaleState` and the inner optimizer's state."""

    loss_scale: LossScaleState
    inner_state: Any


def _ls_state(state) -> LossScaleState:
    if isinstance(state, MixedPrecisionState):
        return state.loss_scale
    if isinstance(state, LossScaleState):
        return state
    raise TypeError(
        "expected the state of a jqx.mixed_precision loss-scaling optimizer (MixedPrecisionState) "
        f"or a LossScaleState, got {type(state).__name__}. If the wrapper sits inside optax.chain, "
        "pass the chain state's element that belongs to it, or make the wrapper the outermost one."
    )


def loss_scale(state) -> jax.Array:
    """The current loss scale (float32 scalar) of a wrapper state."""
    return _ls_state(state).scale


def all_finite(tree) -> jax.Array:
    """True (bool scalar) when every floating leaf of ``tree`` is finite.

    Example:
        >>> bool(all_finite({"a": jnp.ones(2), "b": jnp.array([1.0, jnp.inf])}))
        False
    """
    leaves = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree.leaves(tree)
        if jnp.issubdtype(jnp.result_type(x), jnp.inexact)
    ]
    if not leaves:
        return jnp.array(True)
    return jnp.all(jnp.stack(leaves))


def select_tree(pred: jax.Array, on_true, on_false):
    """``on_true`` if ``pred`` else ``on_false``, leaf by leaf, exactly (no arithmetic)."""
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def scale_loss(loss: jax.Array, state) -> jax.Array:
    """``loss * S`` in the loss's dtype (compute the loss in float32 so it cannot overflow).

    Example:
        >>> opt = dynamic_loss_scale(optax.sgd(0.1)); s = opt.init({"w": jnp.zeros(2)})
        >>> float(scale_loss(jnp.float32(2.0), s))
        65536.0
    """
    return loss * _ls_state(state).scale.astype(loss.dtype)


def unscale_grads(grads, state):
    """``grads / S`` computed in float32 and returned in each gradient's dtype.

    Example:
        >>> opt = static_loss_scale(optax.sgd(0.1), 8.0); s = opt.init({"w": jnp.zeros(2)})
        >>> unscale_grads({"w": jnp.full(2, 4.0)}, s)["w"].tolist()
        [0.5, 0.5]
    """
    inv = 1.0 / _ls_state(state).scale

    def f(g):
        if not jnp.issubdtype(g.dtype, jnp.floating):
            return g
        return (g.astype(jnp.float32) * inv).astype(g.dtype)

    return jax.tree.map(f, grads)


def value_and_grad(fun: Callable, *, has_aux: bool = False) -> Callable:
    """Like ``jax.value_and_grad`` with loss scaling: ``g(state, params, *args)``.

    Differentiates ``scale_loss(fun(params, *args), state)`` with respect to
    ``params`` and returns ``(loss, grads)`` with the *unscaled* loss and the
    *unscaled* gradients, ready for the wrapper's ``update``. Non-finite
    gradients come back as they are (the wrapper then skips the step).

    Example:
        >>> opt = static_loss_scale(optax.sgd(0.1), 1024.0); s = opt.init(jnp.ones(2))
        >>> loss, g = value_and_grad(lambda p: jnp.sum(p * p))(s, jnp.ones(2))
        >>> float(loss), g.tolist()
        (2.0, [2.0, 2.0])
    """

    def scaled(params, state, *args, **kwargs):
        out = fun(params, *args, **kwargs)
        loss, aux = out if has_aux else (out, None)
        return scale_loss(loss, state), (loss, aux)

    grad_fn = jax.grad(scaled, has_aux=True)

    def g(state, params, *args, **kwargs):
        grads, (loss, aux) = grad_fn(params, state, *args, **kwargs)
        grads = unscale_grads(grads, state)
        return ((loss, aux), grads) if has_aux else (loss, grads)

    return g


class _Config(NamedTuple):
    initial_scale: float
    dynamic: bool
    period: int
    factor: float
    min_scale: float


def _wrap(inner: optax.GradientTransformation, cfg: _Config) -> optax.GradientTransformation:
    # Extra keyword args (e.g. value=loss for optax.contrib optimizers) pass through.
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        return MixedPrecisionState(
            loss_scale=LossScaleState(
                scale=jnp.asarray(cfg.initial_scale, jnp.float32),
                counter=jnp.zeros((), jnp.int32),
                skipped=jnp.zeros((), jnp.int32),
            ),
            inner_state=inner.init(params),
        )

    def update_fn(grads, state, params=None, **extra):
        if not isinstance(state, MixedPrecisionState):
            _ls_state(state)  # raises the explanatory TypeError
        new_updates, new_inner = inner.update(grads, state.inner_state, params, **extra)
        ok = jnp.logical_and(all_finite(grads), all_finite(new_updates))
        # x + (-0.0) == x bit for bit for every x (also +0.0 and -0.0), so a skipped
        # step's params are untouched by optax.apply_updates.
        updates = jax.tree.map(lambda u: jnp.where(ok, u, jnp.full_like(u, -0.0)), new_updates)
        inner_state = select_tree(ok, new_inner, state.inner_state)
        ls = state.loss_scale
        skipped = ls.skipped + jnp.where(ok, 0, 1).astype(jnp.int32)
        if cfg.dynamic:
            counter = jnp.where(ok, ls.counter + 1, 0).astype(jnp.int32)
            grow = counter >= cfg.period
            grown = ls.scale * jnp.float32(cfg.factor)
            grown = jnp.where(jnp.isfinite(grown), grown, ls.scale)
            shrunk = jnp.maximum(ls.scale / jnp.float32(cfg.factor), jnp.float32(cfg.min_scale))
            scale = jnp.where(ok, jnp.where(grow, grown, ls.scale), shrunk)
            counter = jnp.where(grow, 0, counter).astype(jnp.int32)
        else:
            scale = ls.scale
            counter = jnp.where(ok, ls.counter + 1, 0).astype(jnp.int32)
        return updates, MixedPrecisionState(LossScaleState(scale, counter, skipped), inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_inner(optimizer):
    if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        raise TypeError(
            f"optimizer must be an optax.GradientTransformation (e.g. optax.adamw(1e-3)), got {type(optimizer).__name__}."
        )


def dynamic_loss_scale(
    optimizer: optax.GradientTransformation,
    initial_scale: float = 2.0**15,
    period: int = 2000,
    factor: float = 2.0,
    min_scale: float = 1.0,
) -> optax.GradientTransformation:
    """Wraps ``optimizer`` with dynamic loss scaling and skipping of non-finite steps.

    ``update`` takes the *unscaled* gradients (from :func:`value_and_grad`, or
    :func:`unscale_grads` of the gradients of :func:`scale_loss`). If any
    gradient or update is non-finite, the returned updates are ``-0.0`` (so
    ``optax.apply_updates`` leaves every parameter bit-identical), the inner
    state is kept, and the scale is divided by ``factor`` (floor
    ``min_scale``); after ``period`` consecutive finite steps it is multiplied
    by ``factor``.

    Args:
      optimizer: the inner optax transformation.
      initial_scale: starting scale (2**15).
      period: finite steps before the scale grows (2000).
      factor: growth and back-off factor (2).
      min_scale: the scale never goes below this (1).

    Example:
        >>> opt = dynamic_loss_scale(optax.sgd(1e-3))
        >>> state = opt.init({"w": jnp.zeros(3)})
        >>> _, state = opt.update({"w": jnp.array([1.0, jnp.nan, 0.0])}, state, {"w": jnp.zeros(3)})
        >>> float(loss_scale(state)), int(state.loss_scale.skipped)
        (16384.0, 1)
    """
    _check_inner(optimizer)
    if not (isinstance(period, int) and period >= 1):
        raise ValueError(
            f"period={period!r} must be a positive int (steps between scale increases), e.g. 2000."
        )
    if not factor > 1.0:
        raise ValueError(f"factor={factor!r} must be > 1, e.g. 2.0.")
    if not (min_scale > 0 and initial_scale >= min_scale):
        raise ValueError(
            f"need 0 < min_scale <= initial_scale, got min_scale={min_scale!r}, initial_scale={initial_scale!r}."
        )
    return _wrap(
        optimizer, _Config(float(initial_scale), True, period, float(factor), float(min_scale))
    )


def static_loss_scale(
    optimizer: optax.GradientTransformation, scale: float
) -> optax.GradientTransformation:
    """Wraps ``optimizer`` with a fixed loss scale; non-finite steps are skipped as in :func:`dynamic_loss_scale`.

    Example:
        >>> opt = static_loss_scale(optax.sgd(0.1), 128.0)
        >>> float(loss_scale(opt.init({"w": jnp.zeros(2)})))
        128.0
    """
    _check_inner(optimizer)
    if not (isinstance(scale, (int, float)) and scale > 0 and scale < float("inf")):
        raise ValueError(
            f"scale={scale!r} must be a finite positive number, e.g. 128.0 or 2.0**15."
        )
    return _wrap(optimizer, _Config(float(scale), False, 1, 1.0, float(scale)))


def no_loss_scale(optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
    """Scale 1 (bf16 and f32 need none), still skipping non-finite steps; same state layout.

    Example:
        >>> float(loss_scale(no_loss_scale(optax.sgd(0.1)).init(jnp.zeros(2))))
        1.0
    """
    return static_loss_scale(optimizer, 1.0)
