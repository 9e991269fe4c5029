"""``jqx.quantized(fn)``: run any JAX function on a parameter tree holding QArrays.

The transform traces ``fn`` to a jaxpr with every QArray replaced by a float
placeholder of its logical shape, then re-evaluates that jaxpr (at trace
time, once per outer ``jit`` trace) with the real QArrays:

- a ``dot_general`` with a QArray operand goes to :func:`jqx.ops.dot_general`;
- the weight is followed through ``convert_element_type`` (Flax's
  ``promote_dtype``) and ``transpose`` (tied embeddings): a transposed weight
  is never materialised, the dimension numbers are remapped instead;
- ``jit``/``pjit`` and ``custom_jvp``/``custom_vjp`` calls are inlined,
  ``remat`` is re-applied with ``jax.checkpoint``, ``scan`` is re-run with
  stacked QArrays sliced per step (Flax ``nn.scan`` / ``nnx.scan``);
- any other use of a QArray (``cond``, ``while``, elementwise math, ...) sees
  ``q.dequantize()``;
- attention written ``softmax(s) @ v`` is computed as ``(exp(s - max) @ v) / sum``
  where that is valid and measured faster (``jqx.ops.policy(softmax_reorder=...)``;
  docs/guide/run.md#attention), a small one on CPU in one native pass
  (:func:`jqx.ops.attention.softmax_dot`).

The same interpreter serves calibration and QAT through
:func:`capture_inputs` (record the inputs of the matmuls of chosen weights)
and :func:`map_dots` (replace those matmuls by a rule).

Example:
    >>> import jax, jax.numpy as jnp, jqx
    >>> params = {"w": jnp.ones((8, 4))}
    >>> q = jqx.quantize(params, jqx.int8_weight_only(), filter_fn=lambda p, x: x.ndim == 2)
    >>> f = jax.jit(jqx.quantized(lambda p, x: x @ p["w"]))
    >>> f(q, jnp.ones((2, 8))).shape
    (2, 4)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jcore

from jqx.core import formats as _formats
from jqx.core.qarray import is_qarray
from jqx.core.tree import path_str

__all__ = ["quantized", "map_dots", "capture_inputs", "DotRule"]

# rule(path, x, w, dimension_numbers, precision, preferred_element_type, w_is_lhs) -> result
DotRule = Callable[..., jax.Array]

_P = jcore.primitives


# --------------------------------------------------------------------------- tracked weights


@dataclasses.dataclass(frozen=True)
class _W:
    """A weight seen through a chain of cheap views: ``view = transpose(base, perm)``
    cast to ``dtype``. ``base`` is a QArray or a float array (a params leaf the
    caller asked to track by ``path``)."""

    base: Any
    path: str | None = None
    perm: tuple[int, ...] = ()
    dtype: Any = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.base.shape[p] for p in self.perm)

    def materialize(self) -> jax.Array:
        b = self.base
        v = b.dequantize() if is_qarray(b) else b
        v = v.astype(self.dtype)
        if self.perm != tuple(range(len(self.perm))):
            v = jnp.transpose(v, self.perm)
        return v

    def slice_leading(self) -> _W:
        """After ``lax.scan`` slices the children of ``base`` along axis 0, fix the
        static metadata (shape, block) and the view."""
        b = self.base
        if is_qarray(b):
            b = b.replace(shape=tuple(b.shape[1:]), block=tuple(b.block[1:]))
            if b.super_block is not None:
                b = b.replace(super_block=tuple(b.super_block[1:]))
        return _W(b, self.path, tuple(p - 1 for p in self.perm[1:]), self.dtype)


jax.tree_util.register_dataclass(_W, data_fields=["base"], meta_fields=["path", "perm", "dtype"])


def _is_w(x) -> bool:
    return isinstance(x, _W)


def _scan_sliceable(w: _W, length: int) -> bool:
    """A stacked weight can be sliced per scan step when the stacked axis is the
    view's leading axis, untouched by the view, and (for a QArray) every child
    carries that axis with one block per layer."""
    if not w.perm or w.perm[0] != 0 or w.base.shape[0] != length:
        return False
    b = w.base
    if not is_qarray(b):
        return True
    if b.block[0] != 1 or (b.super_block is not None and b.super_block[0] != 1):
        return False
    children = ("qvalue", "scale", "zero_point", "in_scale", "act_scale")
    for name in children + ("qhigh", "super_scale", "super_zero"):
        c = getattr(b, name)
        if c is not None and (c.ndim == 0 or c.shape[0] != length):
            return False
    return True


# --------------------------------------------------------------------------- context


class _Ctx:
    """Interpretation state: which weight paths get ``rule``, the default
    backend, and the records (path, array) produced in forward order."""

    def __init__(
        self,
        rule: DotRule | None,
        paths: frozenset,
        backend: str | None,
        capture: bool = False,
        act_matmuls: str | None = None,
        softmax_reorder: bool = False,
        float_dots: bool = False,
        epilogues: bool = False,
    ):
        self.rule = rule
        self.paths = paths
        self.backend = backend
        self.capture = capture
        self.act_matmuls = act_matmuls
        self.softmax_reorder = softmax_reorder
        # Float products (no QArray operand) go to jqx.ops.float_dot_general, which may
        # run them on the native float32 GEMM.
        self.float_dots = float_dots
        # A product's bias add and exact GELU go to jqx.ops with it (dense epilogues).
        self.epilogues = epilogues
        self.records: list[tuple[str, jax.Array]] = []

    def child(self) -> _Ctx:
        return _Ctx(
            self.rule,
            self.paths,
            self.backend,
            self.capture,
            self.act_matmuls,
            self.softmax_reorder,
            self.float_dots,
            self.epilogues,
        )


def _default_dot(backend):
    def dot(x_or_w_lhs, rhs, dimension_numbers, precision, preferred_element_type, **epilogue):
        from jqx import ops  # noqa: PLC0415 (ops imports nothing from here; lazy keeps import light)

        return ops.dot_general(
            x_or_w_lhs,
            rhs,
            dimension_numbers,
            precision=precision,
            preferred_element_type=preferred_element_type,
            backend=backend,
            **epilogue,
        )

    return dot


# --------------------------------------------------------------------------- interpreter


def _read(env, v):
    return v.val if isinstance(v, jcore.Literal) else env[v]


def _mat(x):
    return x.materialize() if _is_w(x) else x


def _eval_jaxpr(ctx: _Ctx, jaxpr, consts, args) -> list:
    env: dict = {}
    for v, x in zip(jaxpr.constvars, consts, strict=True):
        env[v] = x
    for v, x in zip(jaxpr.invars, args, strict=True):
        env[v] = x
    if ctx.softmax_reorder or ctx.float_dots or ctx.epilogues:
        plan = _plan(jaxpr, ctx.softmax_reorder, ctx.float_dots, ctx.backend, ctx.epilogues)
    else:
        plan = _NO_PLAN
    for i, eqn in enumerate(jaxpr.eqns):
        if i in plan.folded:  # computed with its epilogue's last eqn
            continue
        ep = plan.epilogues.get(i)
        mlp = plan.mlps.get(i)
        if mlp is not None:
            _mlp_step(ctx, jaxpr.eqns, mlp, plan, env)
        elif ep is not None:
            _epilogue_step(ctx, jaxpr.eqns, ep, plan, env)
        else:
            _step(ctx, i, eqn, plan, env)
    return [_read(env, v) for v in jaxpr.outvars]


def _step(ctx: _Ctx, i: int, eqn, plan, env) -> None:
    """Runs eqn ``i`` of a planned jaxpr, its outputs into ``env``."""
    invals = [_read(env, v) for v in eqn.invars]
    m = plan.matches.get(i)
    if m is not None:
        with eqn.ctx.manager:
            outs = _softmax_step(ctx, eqn, invals, m, env)
    elif any(_is_w(x) for x in invals) or (
        ctx.act_matmuls is not None and eqn.primitive.name in _ACT_MATMUL_PRIMS
    ):
        with eqn.ctx.manager:
            outs = _eval_eqn(ctx, eqn, invals)
    elif i in plan.calls:  # a call holding a softmax-then-matmul or a float product
        with eqn.ctx.manager:
            outs = _eval_eqn(ctx, eqn, invals)
    elif i in plan.float_dots:
        with eqn.ctx.manager:
            outs = [_float_dot(ctx, eqn, invals)]
    else:
        with eqn.ctx.manager:
            ans = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
        outs = ans if eqn.primitive.multiple_results else [ans]
    for v, x in zip(eqn.outvars, outs, strict=True):
        if not isinstance(v, jcore.DropVar):
            env[v] = x


def _eval_closed(ctx, closed, args):
    return _eval_jaxpr(ctx, closed.jaxpr, closed.consts, args)


def _eval_eqn(ctx: _Ctx, eqn, invals) -> list:
    prim = eqn.primitive
    p = eqn.params
    name = prim.name
    if name == "dot_general" and not any(_is_w(x) for x in invals):
        return [_act_dot(ctx, eqn, invals)]
    if name == "dot_general":
        return [_dot(ctx, eqn, invals)]
    if name == "conv_general_dilated":
        y = _conv(ctx, eqn, invals)
        if y is not None:
            return [y]
    if name == "rev":
        w = _rev_weight(eqn, invals)
        if w is not None:
            return [w]
    if name == "convert_element_type":
        (w,) = invals
        return [dataclasses.replace(w, dtype=jnp.dtype(p["new_dtype"]))]
    if name == "transpose":
        (w,) = invals
        return [dataclasses.replace(w, perm=tuple(w.perm[i] for i in p["permutation"]))]
    if name == "copy" or name == "copy_p":
        return list(invals)
    if name in ("jit", "pjit", "closed_call", "core_call"):
        inner = p.get("jaxpr", p.get("call_jaxpr"))
        if isinstance(inner, jcore.ClosedJaxpr):
            return _eval_closed(ctx, inner, invals)
        return _eval_jaxpr(ctx, inner, (), invals)
    if name in ("custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"):
        # The custom rule was written for float operands; the primal computation
        # is what a quantized forward pass needs.
        inner = p["call_jaxpr"] if "call_jaxpr" in p else p["fun_jaxpr"]
        return _eval_closed(ctx, inner, invals)
    if name in ("remat", "remat2", "checkpoint"):
        return _remat(ctx, eqn, invals)
    if name == "scan":
        return _scan(ctx, eqn, invals)
    if name == "gather":
        y = _gather_rows(eqn, invals)
        if y is not None:
            return [y]
    # Everything else (cond, while, elementwise, gather, ...): the dequantized value.
    vals = [_mat(x) for x in invals]
    ans = prim.bind(*vals, **prim.get_bind_params(p))
    return ans if prim.multiple_results else [ans]


# Primitives entered without a weight operand when activation matmuls are
# quantized: the matmul itself and the calls that may hold one (jnp.einsum is
# a jit). remat and scan bodies without weights stay float.
_ACT_MATMUL_PRIMS = frozenset(
    {
        "dot_general",
        "jit",
        "pjit",
        "closed_call",
        "core_call",
        "custom_jvp_call",
        "custom_vjp_call",
        "custom_vjp_call_jaxpr",
    }
)


def _act_dot(ctx: _Ctx, eqn, invals):
    """A matmul with no QArray operand, under ``activation_matmuls``."""
    lhs, rhs = invals
    p = eqn.params
    floating = all(jnp.issubdtype(jnp.result_type(a), jnp.floating) for a in (lhs, rhs))
    if not floating:
        return eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(p))
    from jqx import ops  # noqa: PLC0415

    y = ops.dynamic_dot_general(
        lhs, rhs, p["dimension_numbers"], p.get("preferred_element_type"), fmt=ctx.act_matmuls
    )
    return y.astype(eqn.outvars[0].aval.dtype)


# --------------------------------------------------------------------------- softmax, then matmul
#
# Attention written the ordinary way, ``softmax(s) @ v``, traces to
#   e = exp(s - max(s)); t = reduce_sum(e, A); p = div(e, broadcast(t)); y = dot_general(p, v)
# with the dot contracting exactly the softmax axes A. Then y == dot_general(e, v) / t (t
# broadcast onto y's dims), which divides the dot's output instead of the whole score
# tensor in front of the dot; the speed-up is measured in docs/guide/run.md#attention.
# It rounds differently from the program as written (within the bound stated there),
# so jqx.ops.policy(softmax_reorder=False) turns it off.


@dataclasses.dataclass(frozen=True)
class _SoftmaxMatch:
    """Where the rewrite applies in one jaxpr: the dividing eqn, the dot that is the
    only consumer of its output, which dot operand that is, and the row sums."""

    div: int
    dot: int
    operand: int
    axes: tuple[int, ...]
    total: Any  # the reduce_sum's output var: e summed over ``axes``
    scores: Any = None  # s where exp's input is s - max(s) over ``axes``, else None
    chain: Any = None  # _ScoreChain where s is a dot of q and k then elementwise steps


@dataclasses.dataclass(frozen=True)
class _ScoreChain:
    """Scores ``s = steps(dot_general(q, k, dn))``: the dot's operands and dimension
    numbers, and the steps in program order, each ``(kind, atom...)``: ``("mul", c)``,
    ``("div", c)``, ``("add", bias)``, ``("where", mask, fill)``, ``("where_not",
    mask, fill)`` for ``where(mask, fill, s)``, or ``("transpose", permutation)``."""

    q: Any
    k: Any
    dn: Any
    steps: tuple


@dataclasses.dataclass(frozen=True)
class _Plan:
    matches: dict  # eqn index -> _SoftmaxMatch (both the div and the dot)
    calls: frozenset  # indices of call eqns whose inner jaxpr holds a match or float dot
    float_dots: frozenset = frozenset()  # dot_generals for the native float32 GEMM
    epilogues: dict = dataclasses.field(default_factory=dict)  # last eqn -> _Epilogue
    folded: frozenset = frozenset()  # the epilogues' and MLPs' other eqns
    mlps: dict = dataclasses.field(default_factory=dict)  # last eqn -> _Mlp


_NO_PLAN = _Plan({}, frozenset())
# Calls whose body the plan enters (a remat body is re-run under jax.checkpoint, _remat).
_CALLS = ("jit", "pjit", "closed_call", "core_call", "checkpoint", "remat", "remat2")
# The dtypes whose rounding bound docs/guide/run.md#attention states and the tests check.
_BOUNDED_FLOATS = (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64))


@dataclasses.dataclass(frozen=True)
class _Deferred:
    """The normalised probabilities, not yet computed: the div eqn and its operands."""

    eqn: Any
    invals: list
    numer: Any
    total: Any

    def compute(self):
        e = self.eqn
        return e.primitive.bind(*self.invals, **e.primitive.get_bind_params(e.params))


def _inner_jaxpr(eqn):
    inner = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
    return inner.jaxpr if isinstance(inner, jcore.ClosedJaxpr) else inner


def _softmax_match(eqns, i, producer, uses, outvars) -> _SoftmaxMatch | None:
    """The match whose normalising div is ``eqns[i]``, or None where the rewrite is not
    valid: the probabilities used anywhere but one dot (returned, summed, masked or
    dropped out after the softmax), a denominator that is not the sum of the numerator
    over the contracted axes, or a dtype whose rounding bound is not stated."""
    div = eqns[i]
    num, den = div.invars
    p = div.outvars[0]
    if not all(isinstance(v, jcore.Var) for v in (num, den, p)) or p in outvars:
        return None
    if jnp.dtype(p.aval.dtype) not in _BOUNDED_FLOATS or len(uses.get(p, ())) != 1:
        return None
    k, operand = uses[p][0]
    dot = eqns[k]
    if dot.primitive.name != "dot_general" or dot.outvars[0].aval.dtype != p.aval.dtype:
        return None
    if num not in producer or eqns[producer[num]].primitive.name != "exp":
        return None
    if den not in producer:
        return None
    bcast = eqns[producer[den]]
    if bcast.primitive.name not in ("broadcast_in_dim", "reshape") or not isinstance(
        bcast.invars[0], jcore.Var
    ):
        return None
    total = bcast.invars[0]
    if total not in producer:
        return None
    rsum = eqns[producer[total]]
    if rsum.primitive.name != "reduce_sum" or rsum.invars[0] is not num:
        return None
    axes = tuple(sorted(rsum.params["axes"]))
    keep = tuple(d for d in range(len(p.aval.shape)) if d not in axes)
    shape, dshape = p.aval.shape, den.aval.shape
    if len(dshape) != len(shape) or any(dshape[d] != shape[d] for d in keep):
        return None
    if bcast.primitive.name == "reshape":
        # A reshape of the sums can only insert unit axes, in order.
        if any(dshape[d] != 1 for d in axes) or bcast.params.get("dimensions") is not None:
            return None
    elif tuple(bcast.params["broadcast_dimensions"]) != keep:
        return None
    (lc, rc), _ = dot.params["dimension_numbers"]
    if tuple(sorted(lc if operand == 0 else rc)) != axes:
        return None
    scores = _softmax_scores(eqns, producer, eqns[producer[num]], axes)
    chain = _score_chain(eqns, producer, scores, axes) if scores is not None else None
    return _SoftmaxMatch(i, k, operand, axes, total, scores, chain)


def _score_chain(eqns, producer, s, axes) -> _ScoreChain | None:
    """``s`` as a float32 ``dot_general`` of q and k (the softmax over the last axis)
    followed by at most four elementwise steps: a multiply or divide by a scalar, an add
    of a tensor of the scores' rank, a ``jnp.where`` with a scalar fill (its ``jit`` call
    named ``_where``); and up to two transposes between them
    (``jax.nn.dot_product_attention`` transposes its scores); else None. Whether the
    kernel takes the layout is :func:`jqx.ops.attention.scores_route`'s to say."""
    shape = s.aval.shape
    if not axes or tuple(axes) != (len(shape) - 1,):
        return None

    def scalar(a):
        return getattr(a, "aval", None) is not None and a.aval.shape == ()

    steps = []
    x = s
    for _ in range(7):
        if not isinstance(x, jcore.Var) or x not in producer:
            return None
        e = eqns[producer[x]]
        name = e.primitive.name
        shape = x.aval.shape  # the scores' layout at this step
        if name == "transpose" and sum(st[0] == "transpose" for st in steps) < 2:
            steps.append(("transpose", tuple(e.params["permutation"])))
            x = e.invars[0]
            continue
        if name == "dot_general":
            if jnp.dtype(x.aval.dtype) != jnp.float32 or any(
                jnp.dtype(a.aval.dtype) != jnp.float32 for a in e.invars
            ):
                return None
            q, k = e.invars
            return _ScoreChain(q, k, e.params["dimension_numbers"], tuple(reversed(steps)))
        if sum(st[0] != "transpose" for st in steps) == 4:
            return None
        if name in ("mul", "div"):
            a, b = e.invars
            if name == "mul" and scalar(a) and not scalar(b):
                a, b = b, a
            if not scalar(b) or getattr(a.aval, "shape", None) != shape:
                return None
            steps.append((name, b))
            x = a
        elif name == "add":
            a, b = e.invars
            full = [getattr(u.aval, "shape", None) == shape for u in (a, b)]
            if full[1] and not full[0]:
                a, b = b, a
            elif full[0] and full[1]:
                # Both full: the one a dot (or a step) made carries the scores.
                made = [
                    isinstance(u, jcore.Var)
                    and u in producer
                    and eqns[producer[u]].primitive.name in ("dot_general", "mul", "div", "add")
                    for u in (a, b)
                ]
                if made == [False, True]:
                    a, b = b, a
                elif made != [True, False]:
                    return None
            elif not full[0]:
                return None
            steps.append(("add", b))
            x = a
        elif name in ("jit", "pjit") and _is_jnp_where(e):
            c, a, b = e.invars  # jnp.where(c, a, b): c nonzero keeps a
            moves = _where_transposes(e)  # under vmap the call may transpose the scores
            if 0 in moves or len(moves) > 1:
                return None

            seen = [getattr(u.aval, "shape", None) for u in (a, b)]  # as the select sees them
            for j, perm in moves.items():
                seen[j - 1] = tuple(seen[j - 1][d] for d in perm)
            c = _small_mask(eqns, producer, c)
            if seen[0] == shape and scalar(b) and set(moves) <= {1}:
                steps.append(("where", c, b))
                x = a
            elif seen[1] == shape and scalar(a) and set(moves) <= {2}:
                steps.append(("where_not", c, a))
                x = b
            else:
                return None
            if moves:  # the scores' own transpose, before the select
                steps.append(("transpose", next(iter(moves.values()))))
        else:
            return None
    return None


# What jnp.where's jit call (named "_where") holds: its select and the broadcasts,
# casts and comparison (a non-bool condition != 0) around it, and, where vmap batched
# the call (jax.nn.dot_product_attention's masks), a transpose of an operand.
_WHERE_PRIMS = frozenset(
    {"select_n", "broadcast_in_dim", "convert_element_type", "ne", "transpose"}
)


def _is_jnp_where(eqn) -> bool:
    """Whether a call eqn is ``jnp.where(c, a, b)``: named ``_where``, three operands,
    one ``select_n`` and nothing but broadcasts and casts beside it, transposes only of
    operands as they enter the select (:func:`_where_transposes`), and the condition
    broadcast as numpy broadcasts (trailing axes aligned), as the steps read it."""
    inner = _inner_jaxpr(eqn)
    if eqn.params.get("name") != "_where" or len(eqn.invars) != 3 or inner is None:
        return False
    names = [x.primitive.name for x in inner.eqns]
    if names.count("select_n") != 1 or not set(names) <= _WHERE_PRIMS:
        return False
    if names.count("transpose") != len(_where_transposes(eqn)):
        return False
    made = {v: x for x in inner.eqns for v in x.outvars}
    v = next(x for x in inner.eqns if x.primitive.name == "select_n").invars[0]
    while v is not inner.invars[0]:  # the condition's way into the select
        x = made.get(v) if isinstance(v, jcore.Var) else None
        if x is None or x.primitive.name not in ("broadcast_in_dim", "ne", "convert_element_type"):
            return False
        if x.primitive.name == "broadcast_in_dim":
            lo = len(x.outvars[0].aval.shape) - len(x.invars[0].aval.shape)
            if tuple(x.params["broadcast_dimensions"]) != tuple(
                range(lo, len(x.outvars[0].aval.shape))
            ):
                return False
        v = x.invars[0]
    return True


def _all_true(eqns, producer, v) -> bool:
    """Whether ``v`` is a broadcast (of broadcasts) of the literal ``True``."""
    while isinstance(v, jcore.Var) and v in producer:
        e = eqns[producer[v]]
        if e.primitive.name != "broadcast_in_dim":
            return False
        v = e.invars[0]
    return isinstance(v, jcore.Literal) and v.aval.dtype == jnp.bool_ and bool(v.val)


def _small_mask(eqns, producer, c):
    """A where step's mask without ``and``s with all-true tensors (how
    ``jax.nn.dot_product_attention`` combines its masks: ``ones_like(scores) & mask``):
    the smaller operand, which broadcasts the same way (numpy's rules), so the kernel
    reads the mask at stride 0 instead of a whole scores-sized tensor."""
    while isinstance(c, jcore.Var) and c in producer:
        e = eqns[producer[c]]
        if e.primitive.name != "and" or len(e.invars) != 2:
            break
        x, y = e.invars
        if _all_true(eqns, producer, y):
            x, y = y, x
        if not _all_true(eqns, producer, x) or getattr(y.aval, "dtype", None) != jnp.bool_:
            break
        big, small = c.aval.shape, y.aval.shape
        if len(small) > len(big) or any(
            n not in (1, m) for n, m in zip(small[::-1], big[::-1], strict=False)
        ):
            break
        c = y
    return c


def _where_transposes(eqn) -> dict:
    """``{operand index: permutation}`` for each transpose in a ``_where`` call that takes
    one of the call's operands straight into the select (the only transposes
    :func:`_is_jnp_where` allows)."""
    inner = _inner_jaxpr(eqn)
    sel = next(x for x in inner.eqns if x.primitive.name == "select_n")
    args = {v: j for j, v in enumerate(inner.invars)}
    out = {}
    for x in inner.eqns:
        u = x.invars[0] if x.primitive.name == "transpose" else None
        if isinstance(u, jcore.Var) and u in args and x.outvars[0] in sel.invars[1:]:
            out[args[u]] = tuple(x.params["permutation"])
    return out


def _softmax_scores(eqns, producer, exp, axes):
    """The scores ``s`` when exp's input is ``s - max(s)`` over ``axes`` as
    ``jax.nn.softmax`` traces it (``reduce_max``, optionally ``max(-inf, .)``,
    ``broadcast_in_dim``, optionally ``stop_gradient``, ``sub``); else None. The maximum
    may also be taken before a transpose that made ``s`` and transposed after it, as
    ``jax.nn.dot_product_attention`` without a bias or mask traces (the same values)."""

    def made_by(v, *names):
        if not isinstance(v, jcore.Var) or v not in producer:
            return None
        e = eqns[producer[v]]
        return e if e.primitive.name in names else None

    x = exp.invars[0]
    sub = made_by(x, "sub")
    if sub is None:
        return None
    s, m = sub.invars
    e = made_by(m, "stop_gradient")
    e = made_by(e.invars[0] if e is not None else m, "broadcast_in_dim")
    if e is None:
        return None
    keep = tuple(d for d in range(len(x.aval.shape)) if d not in axes)
    if tuple(e.params["broadcast_dimensions"]) != keep:
        return None
    top = e.invars[0]
    moved = made_by(top, "transpose")  # the maximum of s's transposed operand, moved
    if moved is not None:
        top = moved.invars[0]
    e = made_by(top, "max")
    if e is not None:  # jnp.max(..., initial=-inf): max(-inf, reduce_max(s))
        lit = [a for a in e.invars if isinstance(a, jcore.Literal)]
        var = [a for a in e.invars if not isinstance(a, jcore.Literal)]
        if len(lit) != 1 or len(var) != 1 or not np.all(np.asarray(lit[0].val) == -np.inf):
            return None
        top = var[0]
    e = made_by(top, "reduce_max")
    if e is None:
        return None
    if moved is None:
        return s if e.invars[0] is s and tuple(sorted(e.params["axes"])) == axes else None
    # s = transpose(s0, perm) and the maximum reduce_max(s0) over perm's images of
    # ``axes``, transposed into s's order of the kept axes.
    t = made_by(s, "transpose")
    if t is None or e.invars[0] is not t.invars[0]:
        return None
    perm = t.params["permutation"]
    if tuple(sorted(e.params["axes"])) != tuple(sorted(perm[a] for a in axes)):
        return None
    left = sorted(perm[d] for d in keep)  # the maximum's axes, s0's order
    if [left[j] for j in moved.params["permutation"]] != [perm[d] for d in keep]:
        return None
    return s


def _native_float_dot(eqn, backend) -> bool:
    """Whether ``eqn`` is a float product the native float32 GEMM takes (the dispatcher's
    choice, from the avals): only those, and the calls holding one, are planned."""
    if eqn.primitive.name != "dot_general":
        return False
    from jqx.ops import dispatch  # noqa: PLC0415 (as in _default_dot)

    lhs, rhs = (v.aval for v in eqn.invars)
    p = eqn.params
    choice = dispatch.choose_float_dot(
        lhs, rhs, p["dimension_numbers"], p.get("preferred_element_type"), backend
    )
    return choice == "native"


def _plan(jaxpr, softmax: bool, float_dots: bool, backend=None, epilogues: bool = False) -> _Plan:
    """Finds every valid softmax-then-matmul in ``jaxpr`` (with ``softmax``), every
    float ``dot_general`` for the native float32 GEMM (with ``float_dots``), every
    float32 product's dense epilogue (with ``epilogues``), and the calls holding any
    (one linear pass)."""
    eqns = jaxpr.eqns
    producer: dict = {}
    uses: dict = {}
    for i, e in enumerate(eqns):
        for j, v in enumerate(e.invars):
            if isinstance(v, jcore.Var):
                uses.setdefault(v, []).append((i, j))
        for v in e.outvars:
            producer[v] = i
    outvars = {v for v in jaxpr.outvars if isinstance(v, jcore.Var)}
    matches: dict = {}
    calls = []
    dots = []
    products = []  # float32 dot_generals: their epilogues are looked for
    for i, e in enumerate(eqns):
        name = e.primitive.name
        if name == "dot_general" and jnp.dtype(e.outvars[0].aval.dtype) == jnp.float32:
            products.append(i)
        if name == "div" and softmax:
            m = _softmax_match(eqns, i, producer, uses, outvars)
            if m is not None:
                matches[m.div] = m
                matches[m.dot] = m
        elif name in _CALLS and _inner_jaxpr(e) is not None:
            inner = _plan(_inner_jaxpr(e), softmax, float_dots, backend, epilogues)
            if inner.matches or inner.calls or inner.float_dots or inner.epilogues or inner.mlps:
                calls.append(i)
        elif float_dots and _native_float_dot(e, backend):
            dots.append(i)
    dots = [i for i in dots if i not in matches]
    found = {}
    for i in products if epilogues else ():
        ep = _epilogue(eqns, i, producer, uses, outvars) if i not in matches else None
        if ep is not None:
            found[ep.last] = ep
    mlps = _mlps(eqns, found, uses, outvars)
    for m in mlps.values():
        for ep in (m.first, m.second):
            if ep is not None:
                found.pop(ep.last)
    if not matches and not calls and not dots and not found and not mlps:
        return _NO_PLAN
    folded = frozenset(j for ep in found.values() for j in ep.chain)
    folded |= frozenset(j for m in mlps.values() for j in m.chain)
    return _Plan(matches, frozenset(calls), frozenset(dots), found, folded, mlps)


def _softmax_step(ctx: _Ctx, eqn, invals, m: _SoftmaxMatch, env) -> list:
    """The div of a match defers; its dot runs on the numerator and divides after."""
    if eqn.primitive.name == "div":
        if any(_is_w(x) for x in invals):
            return _eval_eqn(ctx, eqn, invals)
        return [_Deferred(eqn, invals, invals[0], env[m.total])]
    d = invals[m.operand]
    other = invals[1 - m.operand]
    if not isinstance(d, _Deferred) or _is_w(other) or ctx.act_matmuls is not None:
        # A weight operand goes to jqx.ops, activation_matmuls quantizes p as written.
        invals = [x.compute() if isinstance(x, _Deferred) else x for x in invals]
        if any(_is_w(x) for x in invals) or ctx.act_matmuls is not None:
            return _eval_eqn(ctx, eqn, invals)
        return [eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))]
    from jqx.ops import attention, dispatch  # noqa: PLC0415 (as in _default_dot)

    dn = eqn.params["dimension_numbers"]
    kw = {
        "precision": eqn.params.get("precision"),
        "preferred_element_type": eqn.params.get("preferred_element_type"),
    }
    backend = "xla" if ctx.backend == "xla" else None
    if m.chain is not None and backend is None:
        y = _scores_step(m.chain, other, dn, m.operand, env, kw)
        if y is not None:
            return [y]
    s = env.get(m.scores) if m.scores is not None else None
    if (
        s is not None
        and not _is_w(s)
        and dispatch.choose_softmax_dot(s, other, backend) == "native"
    ):
        # The native kernel from the scores: the exps and probabilities XLA would have
        # computed are unused (XLA drops them), and none is written.
        return [attention.softmax_dot(s, other, dn, m.operand, backend="native", **kw)]
    return [attention.normalised_dot(d.numer, d.total, other, dn, m.operand, **kw)]


def _scores_step(c: _ScoreChain, other, dn, operand, env, kw):
    """Attention from q and k on the native kernel (:func:`jqx.ops.attention.
    scores_softmax_dot`) where the dispatcher sends it there and the operands fit; else
    None (the caller goes on from the scores XLA computed)."""
    from jqx.ops import attention  # noqa: PLC0415 (as in _default_dot)

    q, k = _read(env, c.q), _read(env, c.k)
    if _is_w(q) or _is_w(k):
        return None
    steps = []
    for kind, *atoms in c.steps:
        if kind == "transpose":
            steps.append((kind, atoms[0]))
            continue
        vals = [_read(env, a) for a in atoms]
        if any(_is_w(v) for v in vals):
            return None
        if kind == "where_not":  # where(c, fill, s): the score stays where c is 0
            cond = jnp.asarray(vals[0])
            steps.append(("where", cond == jnp.zeros((), cond.dtype), vals[1]))
        else:
            steps.append((kind, *vals))
    if attention.scores_route(q, k, other, c.dn, dn, operand, steps) != "native":
        return None
    return attention.scores_softmax_dot(q, k, other, c.dn, dn, operand, steps=steps, **kw)


def _float_dot(ctx: _Ctx, eqn, invals, bias=None, activation=None):
    """A float32 product with no QArray operand: XLA's dot or the native float32 GEMM
    (:func:`jqx.ops.float_dot_general` decides), with the epilogue's bias and activation
    where one was planned."""
    from jqx import ops  # noqa: PLC0415 (as in _default_dot)

    p = eqn.params
    y = ops.float_dot_general(
        *invals,
        p["dimension_numbers"],
        precision=p.get("precision"),
        preferred_element_type=p.get("preferred_element_type"),
        backend=ctx.backend,
        bias=bias,
        activation=activation,
    )
    return y.astype(eqn.outvars[0].aval.dtype)


# --------------------------------------------------------------------------- dense epilogues
#
# A Dense layer traces to ``y = dot_general(x, W); f = add(y, reshape(b))`` and, with
# ``jax.nn.gelu(f, approximate=False)``, to
#   g = mul 0.5 f; h = neg f; i = mul h 0.70710677; j = erfc i; out = mul g j,
# with ``jax.nn.gelu(f)`` (the tanh form, flax's default) to
#   b = integer_pow[y=3] f; c = mul 0.044715 b; d = add f c; e = mul 0.7978846 d;
#   t = tanh e; g = add 1.0 t; h = mul 0.5 g; out = mul f h,
# with ``jax.nn.relu(f)`` to a custom_jvp call of ``max(f, 0.0)`` (inside a jit).
# Where y and each step's output feed only the next step, the whole chain runs as one
# jqx.ops.float_dot_general(x, W, bias=b, activation=...) at its last eqn: on the native
# float32 GEMM the bias and GELU are applied to each output block while it is in cache
# (the add bit for bit, the GELU within the bound float_dot_general states); on XLA they
# are the same ops as written.


@dataclasses.dataclass(frozen=True)
class _Epilogue:
    """A float dot ``dot`` whose output only feeds ``+ bias`` (then, with ``activation``,
    the GELU's trace), computed whole at eqn ``last``; ``chain``: the others (the dot
    included), which do not run on their own."""

    dot: int
    last: int
    chain: tuple[int, ...]
    bias: Any  # the var whose value, reshaped to rhs's free dims, is the bias
    tail: tuple[int, ...]  # rhs's free dims: the bias's shape
    activation: str | None


def _only_use(v, uses, outvars):
    """The (eqn, operand) index of ``v``'s single use, or None."""
    us = uses.get(v, ())
    return us[0] if len(us) == 1 and v not in outvars else None


def _scalar_op(eqn, name: str, v, value: float) -> bool:
    """Whether ``eqn`` is ``name`` (``mul``, ``add``) of ``v`` and the float32 literal
    ``value``, in either order."""
    if eqn.primitive.name != name or len(eqn.invars) != 2 or v not in eqn.invars:
        return False
    c = eqn.invars[1 - eqn.invars.index(v)]
    if not isinstance(c, jcore.Literal) or np.shape(c.val) != ():
        return False
    return np.float32(c.val) == np.float32(value)


def _gelu_erf(eqns, f, uses, outvars):
    """``(last, eqns)`` where ``f`` feeds only ``jax.nn.gelu(f, approximate=False)``'s
    trace (module comment), else None."""
    us = uses.get(f, ())
    if len(us) != 2 or f in outvars:
        return None
    by = {eqns[j].primitive.name: j for j, _ in us}
    if set(by) != {"mul", "neg"} or not _scalar_op(eqns[by["mul"]], "mul", f, 0.5):
        return None
    g = eqns[by["mul"]].outvars[0]
    steps = [by["mul"], by["neg"]]
    v = eqns[by["neg"]].outvars[0]
    for want in ("mul", "erfc", "mul"):
        u = _only_use(v, uses, outvars)
        if u is None or eqns[u[0]].primitive.name != want:
            return None
        e = eqns[u[0]]
        if want == "mul" and len(steps) == 2 and not _scalar_op(e, "mul", v, 0.7071067690849304):
            return None
        if want == "mul" and len(steps) == 4:  # the last: g times erfc's output
            if sorted(map(id, e.invars)) != sorted((id(g), id(v))):
                return None
            if _only_use(g, uses, outvars) != (u[0], e.invars.index(g)):
                return None
            return u[0], tuple(steps)
        steps.append(u[0])
        v = e.outvars[0]
    return None


def _gelu_tanh(eqns, f, uses, outvars):
    """``(last, eqns)`` where ``f`` feeds only ``jax.nn.gelu(f)``'s tanh-form trace
    (module comment), else None."""
    us = uses.get(f, ())
    if len(us) != 3 or f in outvars:
        return None
    first = [j for j, _ in us if eqns[j].primitive.name == "integer_pow"]
    if len(first) != 1 or eqns[first[0]].params.get("y") != 3:
        return None
    steps = [first[0]]
    v = eqns[first[0]].outvars[0]
    # (primitive, the other operand: a float32 literal's value, or f itself)
    for want, other in (
        ("mul", 0.044714998453855515),
        ("add", f),
        ("mul", 0.7978845834732056),
        ("tanh", None),
        ("add", 1.0),
        ("mul", 0.5),
        ("mul", f),
    ):
        u = _only_use(v, uses, outvars)
        if u is None or eqns[u[0]].primitive.name != want:
            return None
        e = eqns[u[0]]
        if other is f:
            if len(e.invars) != 2 or e.invars[1 - u[1]] is not f:
                return None
        elif other is not None and not _scalar_op(e, want, v, other):
            return None
        steps.append(u[0])
        v = e.outvars[0]
    if sorted(j for j, _ in us) != sorted((steps[0], steps[2], steps[-1])):
        return None
    return steps[-1], tuple(steps[:-1])


def _relu(eqns, f, uses, outvars):
    """``(last, ())`` where ``f``'s one use is ``jax.nn.relu(f)``: a ``custom_jvp_call``
    whose body, through ``jit`` calls of one eqn each, is ``max(f, 0.0)``; else None."""
    u = _only_use(f, uses, outvars)
    if u is None:
        return None
    e, v = eqns[u[0]], f
    while e.primitive.name in ("custom_jvp_call", "jit", "pjit"):
        inner = _inner_jaxpr(e)
        if inner is None or len(e.invars) != 1 or e.invars[0] is not v:
            return None
        if len(inner.eqns) != 1 or len(inner.invars) != 1 or len(inner.outvars) != 1:
            return None
        v, e = inner.invars[0], inner.eqns[0]
        if e.outvars[0] is not inner.outvars[0]:
            return None
    return (u[0], ()) if _scalar_op(e, "max", v, 0.0) else None


def _bias_var(eqns, producer, b, out_shape, tail):
    """The var holding a Dense bias of shape ``tail`` that ``b`` (an add's operand)
    broadcasts onto the product's rows, or None: ``b`` itself where its shape is 1s then
    ``tail``, the operand of a ``broadcast_in_dim`` onto the last dims."""
    if not isinstance(b, jcore.Var) or jnp.dtype(b.aval.dtype) != jnp.float32:
        return None
    nl = len(out_shape) - len(tail)
    shape = tuple(b.aval.shape)
    if len(shape) == len(out_shape) and shape[nl:] == tail and all(d == 1 for d in shape[:nl]):
        return b
    e = eqns[producer[b]] if b in producer else None
    if e is None or e.primitive.name != "broadcast_in_dim" or shape != tuple(out_shape):
        return None
    v = e.invars[0]
    dims = tuple(e.params["broadcast_dimensions"])
    if not isinstance(v, jcore.Var) or tuple(v.aval.shape) != tail:
        return None
    return v if dims == tuple(range(nl, len(out_shape))) else None


def _epilogue(eqns, i, producer, uses, outvars) -> _Epilogue | None:
    """The epilogue of float dot ``eqns[i]`` (module comment), or None."""
    dot = eqns[i]
    y = dot.outvars[0]
    u = _only_use(y, uses, outvars)
    if u is None or eqns[u[0]].primitive.name != "add":
        return None
    k = u[0]
    add = eqns[k]
    other = add.invars[1 - u[1]]
    if other is y:
        return None
    (_, rc), (_, rb) = dot.params["dimension_numbers"]
    rhs = dot.invars[1].aval.shape
    tail = tuple(d for j, d in enumerate(rhs) if j not in rc and j not in rb)
    bias = _bias_var(eqns, producer, other, y.aval.shape, tail)
    f = add.outvars[0]
    if bias is None or f.aval.shape != y.aval.shape or f.aval.dtype != y.aval.dtype:
        return None
    for activation, match in (("gelu", _gelu_erf), ("gelu_tanh", _gelu_tanh), ("relu", _relu)):
        found = match(eqns, f, uses, outvars)
        if found is not None:
            last, steps = found
            return _Epilogue(i, last, tuple(sorted((i, k, *steps))), bias, tail, activation)
    return _Epilogue(i, k, (i,), bias, tail, None)


def _epilogue_step(ctx: _Ctx, eqns, ep: _Epilogue, plan, env) -> None:
    """A planned epilogue at its last eqn: one product with bias and activation (a float
    product, or x times a QArray weight as laid out); else (a weight on the left, a
    transposed or traced weight, activation matmuls quantized) its eqns in turn."""
    dot = eqns[ep.dot]
    invals = [_read(env, v) for v in dot.invars]
    bias = _read(env, ep.bias)
    last = eqns[ep.last]
    floats = not any(_is_w(v) for v in (*invals, bias))
    if ctx.act_matmuls is None and (floats or _weight_epilogue(ctx, dot, invals, bias)):
        b = jnp.reshape(bias, ep.tail)
        p = dot.params
        with last.ctx.manager:
            if floats:
                y = _float_dot(ctx, dot, invals, b, ep.activation)
            else:  # x . QArray, the kernel's epilogue where it has one (jqx.ops)
                y = _default_dot(ctx.backend)(
                    invals[0],
                    invals[1].base,
                    p["dimension_numbers"],
                    p.get("precision"),
                    p.get("preferred_element_type"),
                    bias=b,
                    activation=ep.activation,
                )
        env[last.outvars[0]] = y.astype(last.outvars[0].aval.dtype)
        return
    for j in (*ep.chain, ep.last):
        _step(ctx, j, eqns[j], plan, env)


def _weight_epilogue(ctx: _Ctx, dot, invals, bias) -> bool:
    """Whether ``dot`` is float32 ``x . W`` for a QArray weight W as stored (not
    transposed, no rule of its own): then jqx.ops computes it with the bias and
    activation, in the kernel's epilogue where it has one, and the result has the
    program's dtype."""
    x, w = invals
    if _is_w(x) or _is_w(bias) or not _stored_qarray(ctx, w):
        return False
    return jnp.dtype(jnp.result_type(x)) == jnp.float32 and _float32_product(dot)


def _stored_qarray(ctx: _Ctx, w) -> bool:
    """Whether ``w`` is a QArray weight as stored: not transposed, no rule of its own."""
    return (
        _is_w(w)
        and is_qarray(w.base)
        and w.perm == tuple(range(len(w.perm)))
        and not (ctx.rule is not None and w.path in ctx.paths)
    )


def _float32_product(dot) -> bool:
    """Whether ``dot`` computes and returns float32 (no other preferred element type)."""
    pet = dot.params.get("preferred_element_type")
    f32 = jnp.dtype(jnp.float32)
    return (pet is None or jnp.dtype(pet) == f32) and jnp.dtype(dot.outvars[0].aval.dtype) == f32


# --------------------------------------------------------------------------- MLPs
#
# A transformer's feed-forward block: a Dense layer with its epilogue (bias, then
# optionally an activation), whose output feeds only a second float32 product
# ``h . W2`` (then, optionally, its bias). Both are ``x @ W`` (x's last axis against a
# 2-D weight's first). Where both weights are float arrays, or QArrays as stored, the
# pair runs as one jqx.ops.mlp call at the last eqn: one native call where both
# products run on the native float32 GEMM or both on the AVX512-VNNI kernel, else the
# two products with their epilogues, as _epilogue_step computes them.


@dataclasses.dataclass(frozen=True)
class _Mlp:
    """Dense ``first`` (an _Epilogue) feeding only dot ``dot2`` and its bias-only
    epilogue ``second`` (or None), computed whole at eqn ``last``; ``chain``: the
    others."""

    first: _Epilogue
    links: tuple[int, ...]  # copies between the two (a no-op dropout's, flax's)
    dot2: int
    second: _Epilogue | None
    last: int
    chain: tuple[int, ...]


def _plain_dense(eqn) -> bool:
    """Whether dot ``eqn`` contracts its lhs's last axis with a 2-D rhs's first, with
    no batch dims."""
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lhs, rhs = eqn.invars
    return (
        len(rhs.aval.shape) == 2
        and tuple(lc) == (len(lhs.aval.shape) - 1,)
        and tuple(rc) == (0,)
        and not lb
        and not rb
    )


def _mlps(eqns, found: dict, uses, outvars) -> dict:
    """The MLPs among the planned epilogues ``found`` (module comment), by last eqn."""
    by_dot = {ep.dot: ep for ep in found.values()}
    out = {}
    taken = set()  # epilogues in an MLP already: a chain of three Dense layers pairs once
    for ep in sorted(found.values(), key=lambda e: e.dot):
        if ep.dot in taken or not _plain_dense(eqns[ep.dot]):
            continue
        u = _only_use(eqns[ep.last].outvars[0], uses, outvars)
        links = []
        while u is not None and _is_copy(eqns[u[0]]):
            links.append(u[0])
            u = _only_use(eqns[u[0]].outvars[0], uses, outvars)
        if u is None or u[1] != 0 or eqns[u[0]].primitive.name != "dot_general":
            continue
        d2 = u[0]
        e2 = eqns[d2]
        if not _plain_dense(e2) or jnp.dtype(e2.outvars[0].aval.dtype) != jnp.float32:
            continue
        second = by_dot.get(d2)
        if second is not None and second.activation is not None:
            continue  # the kernel's second layer adds a bias only
        taken.update((ep.dot, d2))
        last = second.last if second is not None else d2
        chain = (*ep.chain, ep.last, *links, *(second.chain if second is not None else (d2,)))
        out[last] = _Mlp(
            ep, tuple(links), d2, second, last, tuple(sorted(j for j in chain if j != last))
        )
    return out


def _is_copy(eqn) -> bool:
    """Whether ``eqn`` returns its one operand unchanged: ``copy``, or a
    ``convert_element_type`` to the operand's own dtype."""
    if len(eqn.invars) != 1 or not isinstance(eqn.invars[0], jcore.Var):
        return False
    if eqn.primitive.name in ("copy", "copy_p"):
        return True
    return (
        eqn.primitive.name == "convert_element_type"
        and jnp.dtype(eqn.params["new_dtype"]) == jnp.dtype(eqn.invars[0].aval.dtype)
        and not eqn.params.get("sharding")
    )


def _mlp_step(ctx: _Ctx, eqns, m: _Mlp, plan, env) -> None:
    """A planned MLP at its last eqn: one jqx.ops.mlp call where both weights are
    float arrays, or QArrays as stored (no rule of their own), and activation matmuls
    are not quantized; else its two epilogues (or the second dot alone) in turn."""
    d1, d2 = eqns[m.first.dot], eqns[m.dot2]
    x, w1 = (_read(env, v) for v in d1.invars)
    w2 = _read(env, d2.invars[1])
    b1 = _read(env, m.first.bias)
    b2 = _read(env, m.second.bias) if m.second is not None else None
    last = eqns[m.last]
    floats = not any(_is_w(v) for v in (x, w1, w2, b1, b2))
    quantized = (
        not any(_is_w(v) for v in (x, b1, b2))
        and _stored_qarray(ctx, w1)
        and _stored_qarray(ctx, w2)
    )
    if (
        ctx.act_matmuls is None
        and (floats or quantized)
        and jnp.dtype(jnp.result_type(x)) == jnp.float32
        and _float32_product(d1)
        and _float32_product(d2)
    ):
        from jqx import ops  # noqa: PLC0415 (as in _default_dot)

        with last.ctx.manager:
            y = ops.mlp(
                x,
                w1 if floats else w1.base,
                w2 if floats else w2.base,
                bias1=jnp.reshape(b1, m.first.tail),
                activation=m.first.activation,
                bias2=None if b2 is None else jnp.reshape(b2, m.second.tail),
                backend=ctx.backend,
            )
        env[last.outvars[0]] = y.astype(last.outvars[0].aval.dtype)
        return
    _epilogue_step(ctx, eqns, m.first, plan, env)
    for j in m.links:
        _step(ctx, j, eqns[j], plan, env)
    if m.second is not None:
        _epilogue_step(ctx, eqns, m.second, plan, env)
    else:
        _step(ctx, m.dot2, d2, plan, env)


def _dot(ctx: _Ctx, eqn, invals):
    lhs, rhs = invals
    p = eqn.params
    (lc, rc), (lb, rb) = p["dimension_numbers"]
    out_aval = eqn.outvars[0].aval
    if _is_w(lhs) and _is_w(rhs):
        # Two weights multiplied together: keep the rhs quantized, dequantize the lhs.
        lhs = lhs.materialize()
    w_is_lhs = _is_w(lhs)
    w, x = (lhs, rhs) if w_is_lhs else (rhs, lhs)
    wc, wb = (lc, lb) if w_is_lhs else (rc, rb)
    perm = w.perm
    # Express the dot on the untransposed base: remap the weight's dims, then
    # permute the weight's free output dims back into the view's order.
    wc2 = tuple(perm[i] for i in wc)
    wb2 = tuple(perm[i] for i in wb)
    view_free = [i for i in range(len(perm)) if i not in wc and i not in wb]
    want = [perm[i] for i in view_free]
    have = sorted(want)
    nb = len(lb)
    x_free = x.ndim - len(wc) - len(wb)
    if w_is_lhs:
        dn = ((wc2, rc), (wb2, rb))
        block_start = nb
    else:
        dn = ((lc, wc2), (lb, wb2))
        block_start = nb + x_free
    out_perm = list(range(nb + x_free + len(want)))
    for j, d in enumerate(want):
        out_perm[block_start + j] = block_start + have.index(d)

    base = w.base
    if not is_qarray(base):
        base = base.astype(w.dtype)
    pet = p.get("preferred_element_type")
    prec = p.get("precision")
    if w.path is not None and w.path in ctx.paths and ctx.rule is not None:
        ops_ = (base, x) if w_is_lhs else (x, base)
        y = ctx.rule(w.path, *ops_, dn, prec, pet, w_is_lhs)
        if ctx.capture:  # the rule returned (result, record)
            y, rec = y
            ctx.records.append((w.path, rec))
    elif is_qarray(base):
        ops_ = (base, x) if w_is_lhs else (x, base)
        y = _default_dot(ctx.backend)(*ops_, dn, prec, pet)
    else:
        ops_ = (base, x) if w_is_lhs else (x, base)
        y = lax.dot_general(*ops_, dn, precision=prec, preferred_element_type=pet)
    if out_perm != sorted(out_perm):
        y = jnp.transpose(y, out_perm)
    if y.dtype != out_aval.dtype:
        y = y.astype(out_aval.dtype)
    return y


def _conv(ctx: _Ctx, eqn, invals):
    """A convolution whose kernel (rhs) is a tracked weight: a QArray kernel goes to
    :func:`jqx.ops.conv_general_dilated` (a transposed view is folded into the
    dimension numbers); under :func:`capture_inputs` the input pixels are recorded as
    ``(rows, channels)``. None: the generic path (dequantize, float conv)."""
    lhs, rhs = invals
    if _is_w(lhs) or not _is_w(rhs):
        return None
    capture = ctx.capture and rhs.path is not None and rhs.path in ctx.paths
    if not is_qarray(rhs.base) and not capture:
        return None
    p = eqn.params
    dn = p["dimension_numbers"]
    kw = dict(
        lhs_dilation=p["lhs_dilation"],
        rhs_dilation=p["rhs_dilation"],
        dimension_numbers=lax.ConvDimensionNumbers(
            dn.lhs_spec, tuple(rhs.perm[a] for a in dn.rhs_spec), dn.out_spec
        ),
        feature_group_count=p["feature_group_count"],
        batch_group_count=p["batch_group_count"],
        precision=p["precision"],
        preferred_element_type=p["preferred_element_type"],
    )
    if capture:
        # Calibration sees the pixels entering the conv, one row per (sample, position).
        x_perm = (dn.lhs_spec[0], *dn.lhs_spec[2:], dn.lhs_spec[1])
        rows = jnp.transpose(lhs, x_perm).reshape(-1, lhs.shape[x_perm[-1]])
        ctx.records.append((rhs.path, rows))
    base = rhs.base
    if is_qarray(base):
        from jqx import ops  # noqa: PLC0415 (as in _default_dot)

        if base.dtype != jnp.dtype(rhs.dtype).name:
            base = base.replace(dtype=jnp.dtype(rhs.dtype).name)
        y = ops.conv_general_dilated(
            lhs, base, p["window_strides"], p["padding"], backend=ctx.backend, **kw
        )
    else:
        y = lax.conv_general_dilated(
            lhs, base.astype(rhs.dtype), p["window_strides"], p["padding"], **kw
        )
    return y.astype(eqn.outvars[0].aval.dtype)


def _rev_weight(eqn, invals):
    """``rev`` of a tracked kernel (``lax.conv_transpose(..., transpose_kernel=True)``
    flips the window): a QArray's codes and per-block arrays flip together, so the
    kernel stays quantized. None: the generic path."""
    (w,) = invals
    if not _is_w(w):
        return None
    dims = tuple(w.perm[d] for d in eqn.params["dimensions"])
    if not is_qarray(w.base):  # a tracked float kernel keeps its path (calibration)
        return dataclasses.replace(w, base=lax.rev(w.base, dims))
    q = w.base
    if q.extensions or q.in_scale is not None or (q.packed and q.ndim - 1 in dims):
        return None
    if q.code_layout != "plain":  # panels (jqx.prepack): the generic path dequantizes
        return None
    if q.qvalue.ndim != q.ndim:  # stacked (vmapped) children
        return None
    kids = {
        name: lax.rev(getattr(q, name), dims)
        for name in ("qvalue", "scale", "zero_point")
        if getattr(q, name) is not None
    }
    return dataclasses.replace(w, base=q.replace(**kids))


def _gather_rows(eqn, invals):
    """Embedding lookup (``jnp.take(table, ids, axis=0)``, ``table[ids]``) on a
    QArray with one scale per row block: gather the codes and scales of the
    selected rows and decode only those, instead of dequantizing the table."""
    w, idx = invals
    if not _is_w(w) or _is_w(idx) or not is_qarray(w.base):
        return None
    q, p = w.base, eqn.params
    dn = p["dimension_numbers"]
    if (
        q.ndim != 2
        or q.code_layout == "kn"  # a stored transpose: the generic path dequantizes it
        or w.perm != (0, 1)
        or q.block[0] != 1
        or (q.super_block is not None and q.super_block[0] != 1)
        or q.in_scale is not None
        or tuple(dn.collapsed_slice_dims) != (0,)
        or tuple(dn.start_index_map) != (0,)
        or tuple(dn.operand_batching_dims)
        or tuple(dn.offset_dims) != (idx.ndim - 1,)
        or tuple(p["slice_sizes"]) != (1, q.shape[1])
    ):
        return None

    def take(a, fill):
        return lax.gather(
            a,
            idx,
            dn,
            (1, a.shape[1]),
            indices_are_sorted=p["indices_are_sorted"],
            unique_indices=p["unique_indices"],
            mode=p["mode"],
            fill_value=fill,
        )

    lead = tuple(idx.shape[:-1])
    if q.code_layout == "vnni":  # jqx.prepack's panels: rows read out of them
        ids = jnp.clip(idx[..., 0], 0, q.shape[0] - 1)  # out of range: the scale's fill
        codes = q.row_codes(ids)
    else:
        codes = take(q.qvalue, 0)
    rows = q.replace(
        qvalue=codes,
        code_layout="plain",
        scale=take(q.scale, p.get("fill_value")),
        zero_point=None if q.zero_point is None else take(q.zero_point, p.get("fill_value")),
        act_scale=None,
        shape=lead + (q.shape[1],),
        block=(1,) * len(lead) + (q.block[1],),
    )
    if q.qhigh is not None:  # GGUF's 5- and 6-bit codes (jqx.io.gguf)
        rows = rows.replace(qhigh=take(q.qhigh, 0))
    if q.super_scale is not None:  # two-level scales: integer codes, float super-scales
        two_level_zero = q.super_zero is not None
        rows = rows.replace(
            scale=take(q.scale, 0),
            zero_point=take(q.zero_point, 0) if two_level_zero else rows.zero_point,
            super_scale=take(q.super_scale, p.get("fill_value")),
            super_zero=take(q.super_zero, p.get("fill_value")) if two_level_zero else None,
            super_block=(1,) * len(lead) + (q.super_block[1],),
        )
    return rows.dequantize(w.dtype)


def _pack_records(ctx: _Ctx, store: list):
    """Records made inside a nested trace leave it as outputs; their paths go
    to ``store`` (the nested function is traced exactly once)."""
    store.append([pth for pth, _ in ctx.records])
    return [r for _, r in ctx.records]


def _remat(ctx: _Ctx, eqn, invals):
    p = eqn.params
    inner = p["jaxpr"]
    store: list = []

    def f(vals):
        sub = ctx.child()
        outs = _eval_jaxpr(sub, inner, (), vals)
        return [_mat(o) for o in outs], _pack_records(sub, store)

    outs, recs = jax.checkpoint(f, prevent_cse=p.get("prevent_cse", True), policy=p.get("policy"))(
        list(invals)
    )
    ctx.records.extend(zip(store[0], recs, strict=True))
    return outs


def _split_shared(w: _W, length: int):
    """Per-weight factors that do not carry the stacked axis (an ``in_scale``
    stored as ``(K, 1)``, a per-tensor ``act_scale`` of shape ``(1,)``) apply to
    every layer: keep them out of the scanned operand and re-attach per step."""
    b = w.base
    if not is_qarray(b):
        return w, {}
    shared = {}
    for name in ("in_scale", "act_scale"):
        c = getattr(b, name)
        if c is None:
            continue
        if name == "in_scale":
            carries = c.ndim == b.ndim and c.shape[0] == length
        else:
            carries = length > 1 and c.ndim >= 1 and c.shape[0] == length
        if not carries:
            shared[name] = c
    if not shared:
        return w, {}
    return dataclasses.replace(w, base=b.replace(**{k: None for k in shared})), shared


def _join_shared(w, shared: dict):
    if not shared:
        return w
    return dataclasses.replace(w, base=w.base.replace(**shared))


def _scan(ctx: _Ctx, eqn, invals):
    p = eqn.params
    nc, ncar, length = p["num_consts"], p["num_carry"], p["length"]
    consts = list(invals[:nc])
    init = [_mat(x) for x in invals[nc : nc + ncar]]
    xs = list(invals[nc + ncar :])
    split = [_split_shared(x, length) if _is_w(x) else (x, {}) for x in xs]
    xs = [x for x, _ in split]
    shared = [c for _, c in split]
    sliced = [_is_w(x) and _scan_sliceable(x, length) for x in xs]
    xs = [x if s else _mat(_join_shared(x, c)) for x, s, c in zip(xs, sliced, shared, strict=True)]
    closed = p["jaxpr"]
    store: list = []

    def body(carry, x_t):
        x_t = [
            _join_shared(x.slice_leading(), c) if s else x
            for x, s, c in zip(x_t, sliced, shared, strict=True)
        ]
        sub = ctx.child()
        outs = _eval_closed(sub, closed, consts + list(carry) + x_t)
        outs = [_mat(o) for o in outs]
        return outs[:ncar], (outs[ncar:], _pack_records(sub, store))

    carry, (ys, recs) = lax.scan(
        body, init, xs, length=length, reverse=p["reverse"], unroll=p.get("unroll", 1)
    )
    ctx.records.extend(zip(store[0], recs, strict=True))
    return list(carry) + list(ys)


# --------------------------------------------------------------------------- entry points


def _is_dynamic(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic))


def _interpret(fn, ctx_factory, argnum: int | None, paths: frozenset):
    """Returns ``g(*args, **kw) -> (out, ctx)``."""

    def g(*args, **kwargs):
        leaves, treedef = jax.tree_util.tree_flatten_with_path((args, kwargs), is_leaf=is_qarray)
        specs, dyn_idx, static = [], [], {}
        leaf_paths: list[str | None] = []
        for i, (kp, leaf) in enumerate(leaves):
            pth = None
            if (
                argnum is not None
                and len(kp) >= 2
                and kp[0] == jax.tree_util.SequenceKey(0)
                and kp[1] == jax.tree_util.SequenceKey(argnum)
            ):
                pth = path_str(kp[2:])
            leaf_paths.append(pth)
            if is_qarray(leaf):
                specs.append(jax.ShapeDtypeStruct(leaf.shape, jnp.dtype(leaf.dtype)))
                dyn_idx.append(i)
            elif _is_dynamic(leaf):
                specs.append(
                    jax.ShapeDtypeStruct(
                        np.shape(leaf), leaf.dtype, weak_type=getattr(leaf, "weak_type", False)
                    )
                )
                dyn_idx.append(i)
            else:
                static[i] = leaf
        out_tree_box = []

        def flat_fn(*dyn):
            full = [None] * len(leaves)
            for i, v in static.items():
                full[i] = v
            for i, v in zip(dyn_idx, dyn, strict=True):
                full[i] = v
            a, k = jax.tree_util.tree_unflatten(treedef, full)
            out = fn(*a, **k)
            out_leaves, out_tree = jax.tree_util.tree_flatten(out)
            out_tree_box.append(out_tree)
            return out_leaves

        closed = jax.make_jaxpr(flat_fn)(*specs)
        out_tree = out_tree_box[-1]
        vals = []
        for i in dyn_idx:
            leaf = leaves[i][1]
            pth = leaf_paths[i]
            if is_qarray(leaf):
                vals.append(_W(leaf, pth, tuple(range(len(leaf.shape))), jnp.dtype(leaf.dtype)))
            elif pth is not None and pth in paths:
                leaf = jnp.asarray(leaf)
                vals.append(_W(leaf, pth, tuple(range(leaf.ndim)), leaf.dtype))
            else:
                vals.append(leaf)
        ctx = ctx_factory()
        outs = _eval_closed(ctx, closed, vals)
        # A QArray returned untouched stays a QArray; any other view is materialised.
        outs = [
            o.base
            if _is_w(o)
            and is_qarray(o.base)
            and o.perm == tuple(range(len(o.perm)))
            and o.dtype == jnp.dtype(o.base.dtype)
            else _mat(o)
            for o in outs
        ]
        return jax.tree_util.tree_unflatten(out_tree, outs), ctx

    return g


def quantized(
    fn: Callable, *, backend: str | None = None, activation_matmuls: str | None = None
) -> Callable:
    """Makes ``fn`` accept QArray leaves anywhere in its arguments.

    Matmuls (``dot_general``, so ``@``, ``jnp.dot``, ``einsum``, Flax layers)
    with a QArray operand run through :func:`jqx.ops.dot_general` on the
    quantized codes; any other use of a QArray sees ``q.dequantize()``. The
    interpretation happens while tracing: under ``jax.jit`` it costs nothing
    per call and does not cause retracing.

    Args:
      fn: any function of arrays (a plain function, ``model.apply`` of
        flax.linen, or a function that ``nnx.merge``s a State).
      backend: passed to :func:`jqx.ops.dot_general`: ``None`` (the measured choice),
        ``"xla"``, ``"native"`` or ``"pallas"`` (see docs/internals/dispatch.md).
      activation_matmuls: ``None`` (default: matmuls without a QArray operand
        stay float), or ``"int8"`` / ``"fp8_e4m3"``: every matmul with no QArray
        operand (attention's ``q @ k^T`` and ``p @ v``, and any float weight left
        unquantized) runs with both operands quantized per row on the fly
        (:func:`jqx.ops.dynamic_dot_general`), as qwix's ``.*`` rules do.

    Attention written ``softmax(s) @ v`` (``jax.nn.softmax`` then ``einsum``, as in
    ``flax.linen.MultiHeadDotProductAttention``) is computed as
    ``(exp(s - max) @ v) / sum`` where the probabilities feed only that matmul and
    the platform's measurements favour it (XLA:CPU; there a native kernel computes
    small ones in one pass, :func:`jqx.ops.attention.softmax_dot`). That rounds differently
    from the program as written, within the bound in docs/guide/run.md#attention;
    ``with jqx.ops.policy(softmax_reorder=False):`` around the first call keeps
    the attention exactly as written.

    Float32 products with no QArray operand (a model's float weights, or layers left
    unquantized) run through :func:`jqx.ops.float_dot_general`: on CPU, from 2048 rows,
    on jqx's native float32 GEMM, faster than XLA's dot and within the same rounding
    bound, though not always its bits; ``jqx.ops.policy(f32_kernel=False)`` or
    ``backend="xla"`` keeps XLA's dot (docs/guide/run.md#float-products).

    Returns:
      A function with the signature of ``fn``.

    Example:
        >>> import jax, jax.numpy as jnp, jqx
        >>> import flax.linen as nn
        >>> m = nn.Dense(4)
        >>> v = m.init(jax.random.key(0), jnp.ones((1, 8)))
        >>> qv = jqx.quantize(v, jqx.int8_weight_only())
        >>> jax.jit(jqx.quantized(m.apply))(qv, jnp.ones((2, 8))).shape
        (2, 4)
    """
    if backend not in (None, "xla", "native", "pallas"):
        raise ValueError(
            f"backend={backend!r} is not supported; use None (the measured choice), 'xla', "
            "'native' (jqx's CPU kernels) or 'pallas'."
        )
    if activation_matmuls is not None:
        activation_matmuls = _formats.get(activation_matmuls).name
        if activation_matmuls not in ("int8", "fp8_e4m3"):
            raise ValueError(
                f"activation_matmuls={activation_matmuls!r} is not supported; use None, 'int8' "
                "or 'fp8_e4m3'."
            )

    def ctx_factory() -> _Ctx:
        from jqx.ops import dispatch  # noqa: PLC0415 (as in _default_dot)

        # Read while tracing, like every dispatcher choice (jqx.ops.policy).
        reorder = dispatch.reorder_softmax()
        return _Ctx(
            None,
            frozenset(),
            backend,
            act_matmuls=activation_matmuls,
            softmax_reorder=reorder,
            float_dots=dispatch.float_kernel_possible(backend),
            epilogues=dispatch.epilogue_possible(backend),
        )

    inner = _interpret(fn, ctx_factory, None, frozenset())

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        return inner(*args, **kwargs)[0]

    return wrapped


def _check_paths(paths) -> frozenset:
    if isinstance(paths, str):
        paths = [paths]
    paths = list(paths)
    for p in paths:
        if not isinstance(p, str):
            raise TypeError(
                f"paths must be strings as jqx.tree.path_str writes them (e.g. "
                f"'params/Dense_0/kernel'), got {type(p).__name__}: {p!r}"
            )
    return frozenset(paths)


def _check_found(paths: frozenset, args, argnum: int, what: str):
    if argnum >= len(args):
        raise ValueError(
            f"{what}: argnum={argnum} but the function was called with {len(args)} positional "
            "arguments; pass the params tree positionally or set argnum."
        )
    have = {
        path_str(kp)
        for kp, _ in jax.tree_util.tree_flatten_with_path(args[argnum], is_leaf=is_qarray)[0]
    }
    missing = sorted(paths - have)
    if missing:
        raise ValueError(
            f"{what}: path(s) {missing} are not leaves of positional argument {argnum}. Paths "
            f"look like {sorted(have)[:4]}; write them as jqx.tree.path_str does."
        )


def map_dots(fn: Callable, paths: Sequence[str], rule: DotRule, *, argnum: int = 0) -> Callable:
    """Replaces every ``dot_general`` that uses a params leaf at ``paths`` by ``rule``.

    ``rule(path, lhs, rhs, dimension_numbers, precision, preferred_element_type,
    w_is_lhs) -> result`` receives the weight in its stored layout (a
    transpose applied in ``fn`` is folded into ``dimension_numbers`` and undone
    on the result), cast to the dtype the matmul uses (a QArray weight is passed
    as the QArray). The weight is ``lhs`` when ``w_is_lhs``, else ``rhs``.
    QArray leaves elsewhere are handled as in :func:`quantized`.

    Args:
      fn: the function, e.g. ``model.apply``.
      paths: ``jqx.tree.path_str`` paths of leaves of positional argument ``argnum``.
      rule: the replacement.
      argnum: which positional argument holds the params.

    Example:
        >>> import jax, jax.numpy as jnp, jqx
        >>> def rule(path, x, w, dn, precision, pet, w_is_lhs):
        ...     return 2.0 * jax.lax.dot_general(x, w, dn, preferred_element_type=pet)
        >>> f = jqx.transform.map_dots(lambda p, x: x @ p["w"], ["w"], rule)
        >>> f({"w": jnp.ones((3, 2))}, jnp.ones((1, 3))).tolist()
        [[6.0, 6.0]]
    """
    pset = _check_paths(paths)
    inner = _interpret(fn, lambda: _Ctx(rule, pset, None), argnum, pset)

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        _check_found(pset, args, argnum, "map_dots")
        return inner(*args, **kwargs)[0]

    return wrapped


def _rows_k(
    x: jax.Array, x_contract: Sequence[int], w_contract: Sequence[int], x_batch
) -> jax.Array:
    """The other operand as (rows, K): K ordered as the weight's contracting dims."""
    order = sorted(range(len(w_contract)), key=lambda i: w_contract[i])
    xc = [x_contract[i] for i in order]
    rest = [i for i in range(x.ndim) if i not in x_contract]
    # batch dims first, then the free dims: all of them are rows.
    rest = list(x_batch) + [i for i in rest if i not in x_batch]
    xt = jnp.transpose(x, rest + xc)
    k = int(np.prod([x.shape[i] for i in xc])) if xc else 1
    return xt.reshape(-1, k)


def capture_inputs(fn: Callable, paths: Sequence[str], *, argnum: int = 0) -> Callable:
    """Records the inputs of the matmuls that use the params leaves at ``paths``.

    Returns ``g(*args, **kw) -> (out, {path: [x2d, ...]})`` where each ``x2d``
    is the other operand of one ``dot_general`` using the weight, as
    ``(rows, K)`` with K the product of the weight's contracting dims in the
    weight's axis order. Inside ``scan`` over a stacked weight ``(L, K, N)``
    the record is ``(L, rows, K)``. The dict is ordered by first use in the
    forward pass. Matmuls inside ``cond``/``while`` are not recorded.

    Args:
      fn: the function, e.g. ``model.apply``.
      paths: ``jqx.tree.path_str`` paths of leaves of positional argument ``argnum``.
      argnum: which positional argument holds the params.

    Example:
        >>> import jax.numpy as jnp, jqx
        >>> g = jqx.transform.capture_inputs(lambda p, x: x @ p["w"], ["w"])
        >>> out, rec = g({"w": jnp.ones((3, 2))}, jnp.ones((4, 3)))
        >>> rec["w"][0].shape
        (4, 3)
    """
    pset = _check_paths(paths)

    def rule(path, lhs, rhs, dn, precision, pet, w_is_lhs):
        (lc, rc), (lb, rb) = dn
        if w_is_lhs:
            w, x, xc, wc, xb = lhs, rhs, rc, lc, rb
        else:
            w, x, xc, wc, xb = rhs, lhs, lc, rc, lb
        rec = _rows_k(x, xc, wc, xb)
        if is_qarray(w):
            y = _default_dot(None)(lhs, rhs, dn, precision, pet)
        else:
            y = lax.dot_general(lhs, rhs, dn, precision=precision, preferred_element_type=pet)
        return y, rec

    inner = _interpret(fn, lambda: _Ctx(rule, pset, None, capture=True), argnum, pset)

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        _check_found(pset, args, argnum, "capture_inputs")
        out, ctx = inner(*args, **kwargs)
        recs: dict[str, list] = {}
        for pth, r in ctx.records:
            recs.setdefault(pth, []).append(r)
        return out, recs

    return wrapped
