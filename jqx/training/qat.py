"""Quantization-aware training: fake-quantized forward, straight-through backward.

``fake_quantized(fn, recipe)`` runs an unmodified model (any function of a
params tree: linen ``apply``, an nnx ``merge``-and-call, plain jnp) with the
weights that ``jqx.quantize`` would select replaced, in the forward pass, by
their quantize-then-dequantize value under the recipe (int8, int4 group-wise,
fp8, fp4, nf4, ...). The backward pass is the clipped straight-through
estimator: the gradient passes unchanged where the rounding was not clamped
and is zero where the value fell outside the format's range.

Two ways to get the scale:

- round to nearest (default): the scale is recomputed from the weight every
  step exactly as ``jqx.quantize`` does (absmax or min/max per block), and is
  not trained. Nothing is ever clamped (the scale follows the block's own
  maximum), so the weight gradient is the plain STE.
- LSQ (``lsq=True``, Esser et al., "Learned Step Size Quantization"): the
  scale is a trainable pytree beside the params (``init_scales``), and its
  gradient is scaled by ``g = 1 / sqrt(n * qmax)`` with ``n`` the number of
  weights sharing the scale. Zero points (``scheme="zero_point"`` recipes)
  stay frozen at their initial value.

``convert(params, recipe, scales)`` turns the trained weights into real
QArrays whose ``jqx.quantized`` forward equals the fake-quant forward bit for
bit: each matmul of a selected weight runs, in the QAT forward,
``jqx.ops.dot_general`` on the same QArray that ``convert`` builds (found with
``jqx.transform.map_dots``), and its backward is the plain matmul VJP at the
fake-quantized weight ``QArray.dequantize()`` (STE).

Example:
    >>> import jax, jax.numpy as jnp, jqx
    >>> params = {"dense": {"kernel": jnp.linspace(-1.0, 1.0, 64).reshape(8, 8)}}
    >>> f = jqx.qat.fake_quantized(lambda p, x: x @ p["dense"]["kernel"], jqx.int4_weight_only(4))
    >>> g = jax.grad(lambda p: f(p, jnp.ones((2, 8))).sum())(params)
    >>> g["dense"]["kernel"].shape
    (8, 8)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jqx.core import formats as _formats
from jqx.core.numerics import _blocked, absmax_scale, code_range, encode_codes, make_qarray
from jqx.core.qarray import ActSpec, QArray, is_qarray
from jqx.core.tree import path_str
from jqx.recipes.apply import select
from jqx.recipes.base import RTN, Recipe

__all__ = [
    "fake_quantized",
    "fake_quant_weight",
    "fake_quant_weight_lsq",
    "fake_quant_activation",
    "init_scales",
    "convert",
    "lsq_grad_scale",
]

Scales = dict  # {path: {"scale": array, "zero_point": array (zero_point recipes only)}}


# --------------------------------------------------------------------------- checks


def _check_recipe(r: Any, where: str) -> RTN:
    if not isinstance(r, Recipe):
        raise TypeError(
            f"{where} must be a jqx recipe (e.g. jqx.int4_weight_only(group_size=32)), got "
            f"{type(r).__name__}: {r!r}"
        )
    if type(r) is not RTN:
        raise NotImplementedError(
            f"{where}={r.name!r} is an algorithm recipe ({type(r).__name__}); QAT trains with "
            "round-to-nearest recipes (int8/int4/fp8/fp4/nf4 *_weight_only, or the dynamic "
            "activation ones). Train with the base recipe, then run the algorithm on the "
            "converted weights if you still want it."
        )
    if r.needs_calibration:
        raise NotImplementedError(
            f"{where}={r.name!r} needs a static activation scale from calibration; QAT supports "
            "weight-only recipes and dynamic activation recipes (e.g. "
            "jqx.int8_dynamic_activation_int8_weight()). Calibrate after jqx.qat.convert."
        )
    if r.act is not None and r.act.kind != "dynamic":
        raise NotImplementedError(
            f"{where}={r.name!r} has act.kind={r.act.kind!r}; QAT fake-quantizes only dynamic "
            "activations ('dynamic'). Use a weight-only or dynamic-activation recipe."
        )
    return r


def _selected(params, recipe, filter_fn) -> dict[str, RTN]:
    chosen = select(params, recipe, filter_fn)
    return {p: _check_recipe(r, f"recipe for {p}") for p, _, r in chosen}


def _block_of(recipe: RTN, w, path=None) -> tuple[int, ...]:
    if recipe.fmt.is_wide_float:
        return tuple(w.shape)
    return recipe.weight_granularity().resolve(w.shape, path)


def _qrange(recipe: RTN) -> tuple[float, float]:
    return code_range(recipe.fmt, recipe.symmetric_range)


def lsq_grad_scale(recipe: RTN, block: tuple[int, ...]) -> float:
    """The LSQ gradient scale ``1 / sqrt(n * qmax)`` for one scale.

    ``n`` is the number of weights sharing the scale (the block size) and
    ``qmax`` the largest positive code (``fmt.max`` for float and table formats).

    Example:
        >>> import jqx
        >>> round(jqx.qat.lsq_grad_scale(jqx.int8_weight_only(), (16, 1)), 6)
        0.022184
    """
    return 1.0 / math.sqrt(math.prod(block) * _qrange(recipe)[1])


# --------------------------------------------------------------------------- weight fake quant


def _build_qarray(w, recipe: RTN, block, s, z) -> QArray:
    """Codes of ``w`` under scale ``s`` (and zero point ``z``), both per block,
    as the QArray ``convert`` returns. ``s`` is rounded to the recipe's scale
    dtype first, so the fake forward sees the scale that will be stored."""
    fmt = recipe.fmt
    sdt = jnp.dtype(recipe.scale_dtype)
    nblocks = tuple(a // b for a, b in zip(w.shape, block, strict=True))
    s = jnp.asarray(s).reshape(nblocks).astype(sdt)
    if z is not None:
        z = jnp.asarray(z).reshape(nblocks).astype(sdt)
    if fmt.is_wide_float:
        codes = _formats.encode(w, fmt)
    else:
        ones = (1,) * len(nblocks)  # the blocked view (n0, 1, n1, 1, ...)
        sb = _blocked(s.astype(jnp.float32), ones)
        zb = None if z is None else _blocked(z.astype(jnp.float32), ones)
        codes = encode_codes(w, fmt, block, sb, zb, recipe.symmetric_range)
    return make_qarray(
        codes,
        s,
        z,
        fmt=fmt,
        shape=w.shape,
        dtype=w.dtype,
        block=block,
        act=recipe.act,
        scale_dtype=sdt,
    )


def _inside_and_edge(w, q: QArray, recipe: RTN):
    """Per element (blocked view): whether the clamp left the rounded value
    alone, and the clamped grid value ``c - z`` used where it did not."""
    lo, hi = _qrange(recipe)
    fmt = recipe.fmt
    wb = q.blocked(w.astype(jnp.float32))
    s = q.expand(q.scale.astype(jnp.float32))
    v = wb / s
    if fmt.kind == "int":
        z = 0.0 if q.zero_point is None else q.expand(q.zero_point.astype(jnp.float32))
        r = jnp.round(v) + z
        inside = (r >= lo) & (r <= hi)
        edge = jnp.where(r < lo, lo, hi) - z
    else:
        inside = jnp.abs(v) <= hi
        edge = jnp.where(v < 0, lo, hi)
    return v, inside, edge


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _fq_rtn(w, recipe: RTN, path):
    return recipe.quantize_weight(w, path=path).dequantize()


def _fq_rtn_fwd(w, recipe, path):
    q = recipe.quantize_weight(w, path=path)
    if recipe.fmt.is_wide_float:
        return q.dequantize(), jnp.ones(w.shape, bool)
    _, inside, _ = _inside_and_edge(w, q, recipe)
    return q.dequantize(), inside.reshape(w.shape)


def _fq_rtn_bwd(recipe, path, inside, g):
    return (jnp.where(inside, g, jnp.zeros_like(g)),)


_fq_rtn.defvjp(_fq_rtn_fwd, _fq_rtn_bwd)


def fake_quant_weight(w: jax.Array, recipe: RTN, path: str | None = None) -> jax.Array:
    """Round-to-nearest fake quant of one weight with the clipped STE.

    The value is exactly ``recipe.quantize_weight(w).dequantize()``; the
    gradient is ``g`` where the clamp was inactive and 0 elsewhere.

    Example:
        >>> import jax.numpy as jnp, jqx
        >>> w = jnp.array([[0.1, -0.4], [0.3, 0.2]])
        >>> bool(jnp.all(jqx.qat.fake_quant_weight(w, jqx.int8_weight_only())
        ...      == jqx.int8_weight_only().quantize_weight(w).dequantize()))
        True
    """
    _check_recipe(recipe, "recipe")
    return _fq_rtn(w, recipe, path)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _fq_lsq(w, s, z, recipe: RTN, block):
    return _build_qarray(w, recipe, block, s, z).dequantize()


def _fq_lsq_fwd(w, s, z, recipe, block):
    q = _build_qarray(w, recipe, block, s, z)
    out = q.dequantize()
    if recipe.fmt.is_wide_float:
        return out, (jnp.ones(w.shape, bool), jnp.zeros(w.shape, jnp.float32), s, z)
    v, inside, edge = _inside_and_edge(w, q, recipe)
    # d w_hat / d s: round(v) - v where the clamp is inactive (STE through the
    # rounding), the clamped code (minus zero point) where it is active.
    grid = q.blocked(q.values())
    if q.zero_point is not None:
        grid = grid - q.expand(q.zero_point.astype(jnp.float32))
    ds = jnp.where(inside, grid - v, edge)
    return out, (inside.reshape(w.shape), ds, s, z)


def _fq_lsq_bwd(recipe, block, res, g):
    inside, ds, s, z = res
    gw = jnp.where(inside, g, jnp.zeros_like(g))
    if recipe.fmt.is_wide_float:
        gs = jnp.zeros_like(s)
    else:
        gb = _blocked(g.astype(jnp.float32), block)
        red = tuple(range(1, gb.ndim, 2))
        gs = jnp.sum(gb * ds, axis=red) * lsq_grad_scale(recipe, block)
        gs = gs.reshape(s.shape).astype(s.dtype)
    gz = None if z is None else jnp.zeros_like(z)
    return gw, gs, gz


_fq_lsq.defvjp(_fq_lsq_fwd, _fq_lsq_bwd)


def fake_quant_weight_lsq(
    w: jax.Array, scale: jax.Array, recipe: RTN, zero_point: jax.Array | None = None
) -> jax.Array:
    """LSQ fake quant of one weight with a learned per-block ``scale``.

    Forward: ``(clamp(round(w / s) + z) - z) * s`` per block (the value of the
    QArray ``convert`` builds). Backward: clipped STE for ``w``; for ``s`` the
    LSQ gradient ``g * sum(dL/dw_hat * (round(v) - v))`` inside the range and
    ``g * sum(dL/dw_hat * (clamped code - z))`` outside, with
    ``g = lsq_grad_scale``. ``zero_point`` gets no gradient.

    Example:
        >>> import jax, jax.numpy as jnp, jqx
        >>> w = jnp.array([[0.3], [-0.7]])
        >>> r = jqx.int8_weight_only()
        >>> jax.grad(lambda s: jqx.qat.fake_quant_weight_lsq(w, s, r).sum())(jnp.full((1, 1), 0.01)).shape
        (1, 1)
    """
    _check_recipe(recipe, "recipe")
    block = _block_of(recipe, w)
    nblocks = tuple(a // b for a, b in zip(w.shape, block, strict=True))
    if tuple(scale.shape) != nblocks:
        raise ValueError(
            f"scale has shape {tuple(scale.shape)} but a {tuple(w.shape)} weight under "
            f"{recipe.name} (block {block}) needs {nblocks}; make scales with "
            "jqx.qat.init_scales(params, recipe)."
        )
    return _fq_lsq(w, scale, zero_point, recipe, block)


# --------------------------------------------------------------------------- activations


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _fq_act(x, spec: ActSpec, axes: tuple[int, ...]):
    fmt = _formats.get(spec.format)
    xf = x.astype(jnp.float32)
    s = absmax_scale(xf, axes if spec.granularity == "per_token" else None, fmt)
    return (_formats.decode(_formats.encode(xf / s, fmt), fmt, jnp.float32) * s).astype(x.dtype)


def _fq_act_fwd(x, spec, axes):
    return _fq_act(x, spec, axes), None


def _fq_act_bwd(spec, axes, _, g):
    # The dynamic scale comes from the tensor itself: nothing is clamped.
    return (g,)


_fq_act.defvjp(_fq_act_fwd, _fq_act_bwd)


def fake_quant_activation(x: jax.Array, spec: ActSpec, contracting_axes=(-1,)) -> jax.Array:
    """Dynamic activation fake quant (per token = per row of the matmul, i.e.
    one scale over ``contracting_axes``; or per tensor), STE gradient.

    Example:
        >>> import jax.numpy as jnp, jqx
        >>> x = jnp.array([[1.0, -2.0], [0.5, 0.25]])
        >>> [round(v, 4) for v in jqx.qat.fake_quant_activation(x, jqx.ActSpec("dynamic", "int8"))[1].tolist()]
        [0.5, 0.252]
    """
    axes = tuple(sorted(a % x.ndim for a in contracting_axes))
    return _fq_act(x, spec, axes)


# --------------------------------------------------------------------------- the transform


def init_scales(
    params, recipe: RTN | Mapping[str, RTN | None], filter_fn: Callable | None = None
) -> Scales:
    """LSQ scales initialised from round-to-nearest (the scales ``jqx.quantize``
    would store): ``{path: {"scale": s}}`` (plus ``"zero_point"`` for
    zero-point recipes, which stays frozen). A plain dict pytree: give it to
    optax beside the params and checkpoint it with them.

    Example:
        >>> import jax.numpy as jnp, jqx
        >>> s = jqx.qat.init_scales({"d": {"kernel": jnp.ones((64, 8))}}, jqx.int4_weight_only(32))
        >>> s["d/kernel"]["scale"].shape
        (2, 8)
    """
    out = {}
    for p, leaf, r in select(params, recipe, filter_fn):
        _check_recipe(r, f"recipe for {p}")
        q = r.quantize_weight(leaf, path=p)
        entry = {"scale": q.scale.astype(jnp.float32)}
        if q.zero_point is not None:
            entry["zero_point"] = q.zero_point.astype(jnp.float32)
        out[p] = entry
    return out


def _lookup_scale(scales, p):
    if scales is None or p not in scales:
        have = list(scales)[:4] if scales else []
        raise ValueError(
            f"scales has no entry for {p!r} (it has {have}...); build the scales from the same "
            "params and recipe with jqx.qat.init_scales(params, recipe, filter_fn)."
        )
    e = scales[p]
    return e["scale"], e.get("zero_point")


def _fake_params(params, sel: dict[str, RTN], scales, act_default):
    """The params with each selected weight replaced by its fake-quant value
    (STE gradient), and ``{path: QArray}`` of the same quantization (no
    gradient) for the matmuls to run on."""
    qarrays: dict[str, QArray] = {}

    def f(path, leaf):
        p = path_str(path)
        if p not in sel:
            return leaf
        r = sel[p]
        if scales is None:
            out = _fq_rtn(leaf, r, p)
            q = r.quantize_weight(jax.lax.stop_gradient(leaf), path=p)
        else:
            s, z = _lookup_scale(scales, p)
            out = fake_quant_weight_lsq(leaf, s, r, z)
            sg = jax.lax.stop_gradient
            q = _build_qarray(
                sg(leaf), r, _block_of(r, leaf, p), sg(s), None if z is None else sg(z)
            )
        qarrays[p] = q.replace(act=act_default(r))
        return out

    new = jax.tree_util.tree_map_with_path(f, params, is_leaf=is_qarray)
    return new, qarrays


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _exact_dot(lhs, rhs, q, dimension_numbers, precision, preferred_element_type, w_is_lhs):
    from jqx import ops as _ops  # noqa: PLC0415 (training sits above ops)

    a, b = (q, rhs) if w_is_lhs else (lhs, q)
    return _ops.dot_general(a, b, dimension_numbers, precision, preferred_element_type)


def _exact_dot_fwd(lhs, rhs, q, dn, precision, pet, w_is_lhs):
    return _exact_dot(lhs, rhs, q, dn, precision, pet, w_is_lhs), (lhs, rhs)


def _exact_dot_bwd(dn, precision, pet, w_is_lhs, res, g):
    lhs, rhs = res
    y, vjp = jax.vjp(
        lambda a, b: jax.lax.dot_general(a, b, dn, precision=precision, preferred_element_type=pet),
        lhs,
        rhs,
    )
    gl, gr = vjp(g.astype(y.dtype))
    return gl, gr, None


_exact_dot.defvjp(_exact_dot_fwd, _exact_dot_bwd)


def fake_quantized(
    fn: Callable,
    recipe: RTN | Mapping[str, RTN | None],
    *,
    argnum: int = 0,
    quantize_activations: bool = False,
    filter_fn: Callable[[str, Any], bool] | None = None,
    lsq: bool = False,
) -> Callable:
    """Wraps ``fn`` so the selected weights of its params are fake-quantized.

    Every matmul that uses a selected weight (found with
    ``jqx.transform.map_dots``) computes its forward value with
    ``jqx.ops.dot_general`` on the very QArray that :func:`convert` returns,
    so the QAT forward equals the ``jqx.quantized`` forward bit for bit; its
    backward is the matmul's own VJP at the fake-quantized weight (and, with
    activations quantized, the unquantized activation: STE). Any other use of
    the weight sees the fake-quant value ``QArray.dequantize()``.

    Args:
      fn: any function taking a params pytree at positional ``argnum``
        (a linen ``apply``, ``lambda state, x: nnx.merge(gdef, state)(x)``, ...).
      recipe: a recipe or rules ``{regex: recipe_or_None}``, selected exactly as
        ``jqx.quantize`` selects (``jqx.tree.select``).
      argnum: which positional argument of ``fn`` holds the params.
      quantize_activations: also quantize the other operand of those matmuls
        as the recipe's ``act`` spec says (dynamic per-token int8 for
        weight-only recipes). Off: weight-only fake quant, even for a recipe
        with an ``act`` spec.
      filter_fn: ``(path, leaf) -> bool``, as in ``jqx.quantize``.
      lsq: learned step size. The returned function then takes the scales
        (``init_scales``) as an extra first positional argument.

    Returns:
      ``g(*args, **kw)`` (or ``g(scales, *args, **kw)`` with ``lsq=True``),
      same outputs as ``fn``; works under ``jit``/``grad``.

    Example:
        >>> import jax, jax.numpy as jnp, optax, jqx
        >>> p = {"l": {"kernel": jnp.ones((8, 4)) / 8}}
        >>> apply = lambda p, x: x @ p["l"]["kernel"]
        >>> f = jqx.qat.fake_quantized(apply, jqx.int4_weight_only(group_size=4), lsq=True)
        >>> s = jqx.qat.init_scales(p, jqx.int4_weight_only(group_size=4))
        >>> loss = lambda p, s: jnp.mean((f(s, p, jnp.ones((2, 8))) - 1.0) ** 2)
        >>> gp, gs = jax.grad(loss, argnums=(0, 1))(p, s)
        >>> gs["l/kernel"]["scale"].shape
        (2, 4)
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}; pass e.g. model.apply.")
    if isinstance(recipe, Recipe):
        _check_recipe(recipe, "recipe")

    def act_default(r: RTN):
        if not quantize_activations:
            return None
        return r.act or ActSpec("dynamic", "int8", "per_token")

    def run(scales, args, kw):
        if not -len(args) <= argnum < len(args):
            raise ValueError(
                f"argnum={argnum} but the function got {len(args)} positional arguments; pass "
                "the params positionally and set argnum to their position."
            )
        params = args[argnum]
        sel = _selected(params, recipe, filter_fn)
        new_args = list(args)
        new_args[argnum], qarrays = _fake_params(params, sel, scales, act_default)
        if not sel:
            return fn(*new_args, **kw)
        from jqx import transform as _transform  # noqa: PLC0415 (training sits above it)

        def rule(path, lhs, rhs, dimension_numbers, precision, preferred_element_type, w_is_lhs):
            return _exact_dot(
                lhs,
                rhs,
                qarrays[path],
                dimension_numbers,
                precision,
                preferred_element_type,
                w_is_lhs,
            )

        return _transform.map_dots(fn, list(sel), rule, argnum=argnum)(*new_args, **kw)

    if lsq:

        @functools.wraps(fn)
        def g_lsq(scales, *args, **kw):
            return run(scales, args, kw)

        return g_lsq

    @functools.wraps(fn)
    def g(*args, **kw):
        return run(None, args, kw)

    return g


def convert(
    params,
    recipe: RTN | Mapping[str, RTN | None],
    scales: Scales | None = None,
    *,
    filter_fn: Callable[[str, Any], bool] | None = None,
):
    """Trained float weights (and learned LSQ scales) -> a tree of QArrays.

    Without ``scales`` this is ``jqx.quantize(params, recipe, filter_fn,
    prepack=False)`` (round to nearest, the same math the QAT forward ran). With
    ``scales`` each selected weight is encoded with its learned scale (and frozen
    zero point). Either way ``QArray.dequantize()`` equals the fake-quant forward
    value bit for bit, and the codes are in the plain layout, so the quantized
    forward equals the fake-quant one too; ``jqx.prepack`` the result for CPU
    serving (packed int8 weight-only products run the native GEMM's two-level
    activation split, within its bound of the plain ones).

    Example:
        >>> import jax.numpy as jnp, jqx
        >>> p = {"l": {"kernel": jnp.ones((8, 4))}}
        >>> jqx.qat.convert(p, jqx.int8_weight_only())["l"]["kernel"].format
        'int8'
    """
    if scales is None:
        from jqx.recipes.apply import quantize  # noqa: PLC0415

        for p, _, r in select(params, recipe, filter_fn):
            _check_recipe(r, f"recipe for {p}")
        return quantize(params, recipe, filter_fn)
    sel = _selected(params, recipe, filter_fn)

    def f(path, leaf):
        p = path_str(path)
        if p not in sel:
            return leaf
        r = sel[p]
        s, z = _lookup_scale(scales, p)
        return _build_qarray(leaf, r, _block_of(r, leaf, p), s, z)

    return jax.tree_util.tree_map_with_path(f, params, is_leaf=is_qarray)
