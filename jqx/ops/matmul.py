"""Quantized matmuls: what ``jqx.ops.dot_general`` computes.

Same semantics as ``jax.lax.dot_general`` on the dequantized value (within the
quantization error), honouring the weight's activation spec ``q.act`` and its
``in_scale``. This module states the product (normalises the dimension numbers, moves a
weight on the left to the right, divides ``in_scale`` out of the activations, decides
what is computed) as a :class:`~jqx.ops.problem.Problem` and asks the dispatcher
(:func:`jqx.ops.dispatch.choose`) once which implementation runs it. How each
implementation is chosen: docs/internals/dispatch.md.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jqx.core import formats as _formats
from jqx.core.numerics import absmax_scale, quantize_activation
from jqx.core.qarray import (
    QArray,
    fold_super_scale,
    foldable_super_scale,
    is_qarray,
    vnni_split,
)
from jqx.ops import dispatch
from jqx.ops.problem import DimensionNumbers, Problem, w_out_scale, x_out_scale

__all__ = [
    "FLOAT_ACTIVATIONS",
    "dot_general",
    "dynamic_dot_general",
    "explain",
    "float_dot_general",
]


def dot_general(
    lhs,
    rhs,
    dimension_numbers,
    precision=None,
    preferred_element_type=None,
    *,
    backend: str | None = None,
    bias=None,
    activation: str | None = None,
) -> jax.Array:
    """``lax.dot_general`` where either operand may be a :class:`jqx.QArray`.

    Args:
      lhs, rhs: arrays or QArrays (usually the weight is ``rhs``, as in ``x @ W``).
      dimension_numbers: as for ``lax.dot_general``: ``((lhs_contract,
        rhs_contract), (lhs_batch, rhs_batch))``.
      precision: passed to the float dots.
      preferred_element_type: output dtype; default the float operand's dtype.
      backend: which implementations may run: ``None`` (the measured choice for this
        platform and shape), ``"xla"`` (XLA formulations only), ``"native"`` (the native
        CPU kernels where they compute the product; raises where they are unavailable)
        or ``"pallas"`` (the Pallas kernels where they compute the product). Products a
        kernel does not compute run on XLA. See docs/internals/dispatch.md.
      bias: None, or an array of the shape of rhs's free dims (a Dense layer's bias),
        added to the product (``jqx.quantized`` passes the one a program adds).
      activation: None, ``"gelu"`` (``jax.nn.gelu(approximate=False)``),
        ``"gelu_tanh"`` (``jax.nn.gelu``'s tanh form) or ``"relu"``, applied after the
        bias. On a kernel that applies both as it stores its outputs (the AVX512-VNNI
        W8A8 and int8 weight-only GEMM, float32 output) they run there, the add and
        ReLU bit for bit and the GELU within :func:`float_dot_general`'s bound
        (``policy(epilogue=False)``: XLA's ops after it); elsewhere they are XLA's add
        and activation on the product, as a program writes them.

    Returns:
      The product, with ``lax.dot_general``'s output layout (batch dims, lhs
      free dims, rhs free dims), then the bias and activation where given.

    Raises:
      ValueError: an unknown ``backend`` or ``activation``, a ``bias`` whose shape is
        not rhs's free dims, or contracting dims of different sizes.
      RuntimeError: ``backend="native"`` where the native kernels cannot run.

    Example:
        >>> import jax.numpy as jnp, jqx
        >>> w = jqx.int8_dynamic_activation_int8_weight().quantize_weight(jnp.ones((8, 4)))
        >>> y = jqx.ops.dot_general(jnp.ones((3, 8)), w, (((1,), (0,)), ((), ())))
        >>> y.shape, y.dtype
        ((3, 4), dtype('float32'))
    """
    _check_backend(backend)
    dn = _normalise(dimension_numbers)
    _check_epilogue("dot_general", rhs, dn, bias, activation)
    bias = None if bias is None else jnp.asarray(bias)
    lq, rq = is_qarray(lhs), is_qarray(rhs)
    if not lq and not rq:
        y = lax.dot_general(
            lhs, rhs, dn, precision=precision, preferred_element_type=preferred_element_type
        )
        return _apply_epilogue(y, bias, activation)
    if lq and rq:
        lhs = lhs.dequantize()  # keep one side quantized; weight x weight is rare
        lq = False
    if rq:
        x = jnp.asarray(lhs)
        return _x_dot_w(x, rhs, dn, precision, preferred_element_type, backend, bias, activation)
    # Weight on the left: compute x . W and move W's free dims in front of x's.
    x = jnp.asarray(rhs)
    y = _x_dot_w(x, lhs, _swapped(dn), precision, preferred_element_type, backend)
    return _apply_epilogue(jnp.transpose(y, _weight_first(dn, lhs.ndim, x.ndim)), bias, activation)


# float_dot_general's activations: the function each names, applied by XLA's route.
FLOAT_ACTIVATIONS = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
}


def float_dot_general(
    lhs,
    rhs,
    dimension_numbers,
    precision=None,
    preferred_element_type=None,
    *,
    backend: str | None = None,
    bias=None,
    activation: str | None = None,
) -> jax.Array:
    """``lax.dot_general`` of two float arrays, on the faster of XLA's dot and the native
    float32 GEMM (:func:`jqx.ops.dispatch.choose_float_dot`), optionally followed by a
    dense layer's bias and activation.

    :func:`jqx.quantized` sends every product without a QArray operand here (with the
    bias add and ``jax.nn.gelu``, either form, it finds right after one). The native
    GEMM (``jqx.native.f32_matmul``) takes float32 products laid out as one matrix
    product (``x @ W``: no batch dims, lhs contracting its last axes, rhs its first) of
    enough rows; it sums each output as one fused multiply-add chain over k, within the
    same bound as XLA's dot, ``gamma_K sum_k |x_k w_k|`` (``gamma_K = K u / (1 - K u)``,
    ``u = 2^-24``), though not always XLA's bits (XLA's order depends on the shape).
    Everything else, and ``policy(f32_kernel=False)`` or ``backend="xla"``, is
    ``lax.dot_general`` itself. Differentiable (the tangents are XLA's).

    ``bias`` and ``activation`` make the result ``activation(product + bias)``. On the
    native GEMM both run inside it, on each output block while it is in cache
    (``policy(epilogue=False)``: XLA's ops after it): the add is XLA's add bit for
    bit; ``"gelu"`` is ``jax.nn.gelu(approximate=False)``'s trace, ``(0.5 f) *
    erfc((-f) * 0.70710677)``, with every multiply rounded as there and erfc within 8
    ulps of the exact erfc of its float argument (XLA's erfc: up to ~70 ulps in the
    tail; docs/internals/native-kernels.md); ``"gelu_tanh"`` is ``jax.nn.gelu``'s tanh
    form (``approximate=True``, flax's default) as traced, tanh within 2 ulps;
    ``"relu"`` is ``jax.nn.relu``, bit for bit. On XLA they are ``y + bias`` and the
    activation (``jax.nn.gelu(y, approximate=...)``, ``jax.nn.relu(y)``), the program's
    own ops.

    Args:
      lhs, rhs: float arrays.
      dimension_numbers: as for ``lax.dot_general``.
      precision: passed to XLA's dot (the native GEMM is float32 either way).
      preferred_element_type: output dtype, as for ``lax.dot_general``.
      backend: ``None`` (the measured choice), ``"native"`` (the GEMM for every product
        it takes, any size), ``"xla"`` or ``"pallas"`` (XLA's dot).
      bias: None, or an array of the shape of the product's last dims, rhs's free dims
        (a ``Dense`` layer's bias): added to every output row.
      activation: None, ``"gelu"`` (``jax.nn.gelu(approximate=False)``),
        ``"gelu_tanh"`` (``jax.nn.gelu(approximate=True)``) or ``"relu"``
        (``jax.nn.relu``).

    Returns:
      ``lax.dot_general``'s result (then the bias and activation): its shape and dtype.

    Raises:
      ValueError: an unknown ``backend`` or ``activation``, or a ``bias`` whose shape is
        not rhs's free dims.

    Example:
        >>> import jax.numpy as jnp, jqx
        >>> x, w = jnp.ones((64, 384)), jnp.full((384, 8), 0.5)
        >>> jqx.ops.float_dot_general(x, w, (((1,), (0,)), ((), ())))[0, :2].tolist()
        [192.0, 192.0]
        >>> y = jqx.ops.float_dot_general(
        ...     x, w, (((1,), (0,)), ((), ())), bias=jnp.full((8,), -192.0), activation="gelu")
        >>> y[0, :2].tolist()
        [0.0, 0.0]
    """
    dn = _normalise(dimension_numbers)
    tail = _check_epilogue("float_dot_general", rhs, dn, bias, activation)
    bias = None if bias is None else jnp.asarray(bias)
    route = dispatch.choose_float_dot(lhs, rhs, dn, preferred_element_type, backend)
    if route == "xla":
        y = lax.dot_general(
            lhs, rhs, dn, precision=precision, preferred_element_type=preferred_element_type
        )
        return _apply_epilogue(y, bias, activation)
    c = len(dn[0][0])
    if bias is None and activation is None:
        return _native_f32_dot(lhs, rhs, c)
    if not dispatch.current_policy().epilogue or (
        bias is not None and jnp.dtype(bias.dtype) != jnp.float32
    ):
        return _apply_epilogue(_native_f32_dot(lhs, rhs, c), bias, activation)
    b = None if bias is None else jnp.reshape(bias, (math.prod(tail),))
    return _native_f32_dense(lhs, rhs, b, c, activation)


def mlp(
    x,
    w1,
    w2,
    *,
    bias1=None,
    activation: str | None = None,
    bias2=None,
    backend: str | None = None,
) -> jax.Array:
    """Two dense layers, ``activation(x @ w1 + bias1) @ w2 + bias2``: a transformer's
    feed-forward block. Either weight may be a :class:`jqx.QArray`.

    The result is that of :func:`dot_general` (or, for a float weight,
    :func:`float_dot_general`) called twice, each with its bias and activation, bit for
    bit. Where both weights are int8 (in the native GEMM's panels, as
    :func:`jqx.quantize` packs them on a CPU with AVX512-VNNI, or plain), both W8A8 with
    the same activation quantization (dynamic per token, or static) or both int8
    weight-only, the dispatcher sends both products to the AVX512-VNNI GEMM, and x has
    at least ``policy().mlp_kernel_min_rows`` rows, both layers run in one call
    (``native.w8a8_mlp``): each chunk of rows goes through both on one thread, its
    hidden rows kept in cache. Likewise two float32 weights whose products both go to
    the native float32 GEMM (:func:`float_dot_general`'s choice) run as one
    ``native.f32_mlp`` call (differentiable: the tangents are XLA's). The hidden
    activations (rows x F floats) are never written to an array, which saves their
    memory traffic and XLA's buffer for them (:func:`jqx.quantized` runs every such
    Dense -> activation -> Dense chain this way; ``policy(mlp_kernel=False)`` turns it
    off).

    Args:
      x: the activations, (..., K).
      w1: the first weight, (K, F): an array or a QArray.
      w2: the second weight, (F, N).
      bias1: None, or the first layer's bias, (F,).
      activation: None, ``"gelu"``, ``"gelu_tanh"`` or ``"relu"`` (as
        :func:`dot_general`'s), between the layers.
      bias2: None, or the second layer's bias, (N,).
      backend: as :func:`dot_general`'s, for both products.

    Returns:
      (..., N).

    Raises:
      ValueError: weights that are not 2-D or whose sizes do not chain (x's K, w1's F,
        w2's N), a bias of the wrong shape, an unknown activation or backend.

    Example:
        >>> import jax.numpy as jnp, jqx
        >>> spec = jqx.int8_dynamic_activation_int8_weight()
        >>> w1 = spec.quantize_weight(jnp.ones((8, 16)))
        >>> w2 = spec.quantize_weight(jnp.ones((16, 4)))
        >>> y = jqx.ops.mlp(jnp.ones((3, 8)), w1, w2, activation="relu")
        >>> y.shape, round(float(y[0, 0]), 3)
        ((3, 4), 128.0)
    """
    _check_backend(backend)
    shapes = [tuple(w.shape) if is_qarray(w) else jnp.shape(w) for w in (w1, w2)]
    kx = jnp.shape(x)[-1] if jnp.ndim(x) else None
    if (
        len(shapes[0]) != 2
        or len(shapes[1]) != 2
        or shapes[0][0] != kx
        or shapes[1][0] != shapes[0][1]
    ):
        raise ValueError(
            f"jqx.ops.mlp: x {tuple(jnp.shape(x))}, w1 {shapes[0]} and w2 {shapes[1]} do not "
            "chain: w1 must be (K, F) for x's last dim K, and w2 (F, N); transpose Flax "
            "kernels stored (out, in)."
        )
    dn1 = (((jnp.ndim(x) - 1,), (0,)), ((), ()))
    _check_epilogue("jqx.ops.mlp", w1, dn1, bias1, activation)
    _check_epilogue("jqx.ops.mlp", w2, dn1, bias2, None)
    if _mlp_float_kernel(x, w1, w2, bias1, bias2, backend):
        b1, b2 = (None if b is None else jnp.asarray(b) for b in (bias1, bias2))
        x = jnp.asarray(x)
        y = _native_f32_mlp(x.reshape(-1, shapes[0][0]), w1, w2, b1, b2, activation)
        return y.reshape(*x.shape[:-1], shapes[1][1])
    fused = _mlp_kernel_args(x, w1, w2, bias1, bias2, backend)
    if fused is not None:
        from jqx.kernels.cpu import native  # noqa: PLC0415 (dispatch imports it already)

        (s1, s2, act) = fused
        b1 = None if bias1 is None else jnp.asarray(bias1, jnp.float32)
        b2 = None if bias2 is None else jnp.asarray(bias2, jnp.float32)
        rows = jnp.asarray(x).reshape(-1, shapes[0][0]).astype(jnp.float32)
        y = native.w8a8_mlp(
            rows,
            w1.qvalue,
            s1,
            w2.qvalue,
            s2,
            act=act,
            bias1=b1,
            activation=activation,
            bias2=b2,
        )
        return y.reshape(*jnp.shape(x)[:-1], shapes[1][1])

    def dense(v, w, b, a):
        dn = (((jnp.ndim(v) - 1,), (0,)), ((), ()))
        if is_qarray(w):
            return dot_general(v, w, dn, backend=backend, bias=b, activation=a)
        return float_dot_general(v, w, dn, backend=backend, bias=b, activation=a)

    return dense(dense(x, w1, bias1, activation), w2, bias2, None)


def _mlp_fusable(x, bias1, bias2, backend) -> bool:
    """What both of :func:`mlp`'s one-call routes need: the policy's ``mlp_kernel`` and
    ``epilogue``, no ``"xla"`` or ``"pallas"`` backend, float32 x and biases, and at
    least ``mlp_kernel_min_rows`` rows."""
    pol = dispatch.current_policy()
    if not (pol.mlp_kernel and pol.epilogue) or backend in ("xla", "pallas"):
        return False
    f32 = jnp.dtype(jnp.float32)
    if any(b is not None and jnp.dtype(jnp.result_type(b)) != f32 for b in (x, bias1, bias2)):
        return False
    return math.prod(jnp.shape(x)[:-1]) >= pol.mlp_kernel_min_rows


def _mlp_float_kernel(x, w1, w2, bias1, bias2, backend) -> bool:
    """Whether :func:`mlp`'s two float products both go to the native float32 GEMM with
    their epilogues there, from ``mlp_kernel_min_rows`` rows: then one
    ``native.f32_mlp`` call gives their bits."""
    if is_qarray(w1) or is_qarray(w2) or not _mlp_fusable(x, bias1, bias2, backend):
        return False
    shape = tuple(jnp.shape(x))
    dn = (((len(shape) - 1,), (0,)), ((), ()))
    h = jax.ShapeDtypeStruct((*shape[:-1], jnp.shape(w1)[1]), jnp.result_type(x))
    x = jax.ShapeDtypeStruct(shape, jnp.result_type(x))
    return all(
        dispatch.choose_float_dot(a, w, dn, None, backend) == "native"
        for a, w in ((x, w1), (h, w2))
    )


@functools.partial(jax.custom_jvp, nondiff_argnums=(5,))
def _native_f32_mlp(x, w1, w2, b1, b2, activation):
    """``native.f32_mlp`` on (rows, K) x: :func:`mlp`'s two float products in one call
    (their bits); the tangents are XLA's dots, adds and activation."""
    from jqx.kernels.cpu import native  # noqa: PLC0415 (dispatch imports it already)

    return native.f32_mlp(x, w1, w2, bias1=b1, activation=activation, bias2=b2)


@_native_f32_mlp.defjvp
def _native_f32_mlp_jvp(activation, primals, tangents):
    def ref(x, w1, w2, b1, b2):
        return _apply_epilogue(_apply_epilogue(x @ w1, b1, activation) @ w2, b2, None)

    _, dy = jax.jvp(ref, primals, tangents)
    return _native_f32_mlp(*primals, activation), dy


def _mlp_kernel_args(x, w1, w2, bias1, bias2, backend):
    """``(w1 scales, w2 scales, act)`` for ``native.w8a8_mlp`` where :func:`mlp`'s two
    products would each run on the same AVX512-VNNI kernel family with the bias and
    activation in its epilogue (so one fused call gives their bits), else None."""
    if not (is_qarray(w1) and is_qarray(w2)) or not _mlp_fusable(x, bias1, bias2, backend):
        return None
    f32 = jnp.dtype(jnp.float32)
    shape = tuple(jnp.shape(x))
    from jqx.ops import impl_native  # noqa: PLC0415 (dispatch imports it already)

    h_shape = (*shape[:-1], w1.shape[1])
    impls = []
    for xs, q in ((shape, w1), (h_shape, w2)):
        if q.code_layout not in ("plain", "vnni") or q.in_scale is not None:
            return None
        p = describe(xs, f32, q, (((len(xs) - 1,), (0,)), ((), ())))
        if jnp.dtype(p.out_dtype) != f32:
            return None
        impls.append((dispatch.choose(p, backend), p))
    (i1, p1), (i2, p2) = impls
    if i1 is impl_native.TWO_LEVEL_VNNI and i2 is impl_native.TWO_LEVEL_VNNI:
        act = "two_level"
    elif i1 is impl_native.W8A8_VNNI and i2 is impl_native.W8A8_VNNI:
        kinds = {(p.act_kind, p.act_granularity) for p in (p1, p2)}
        if kinds == {("dynamic", "per_token")}:
            act = "per_token"
        elif {k for k, _ in kinds} == {"static"}:
            act = tuple(q.act_scale.astype(jnp.float32).reshape(1) for q in (w1, w2))
        else:
            return None
    else:
        return None
    return impl_native.column_scales(w1), impl_native.column_scales(w2), act


def _check_epilogue(name: str, rhs, dn, bias, activation) -> tuple[int, ...]:
    """rhs's free dims (the product's last dims), after checking ``bias`` has that shape
    and ``activation`` is known (errors name ``name``)."""
    if activation is not None and activation not in FLOAT_ACTIVATIONS:
        raise ValueError(
            f"{name}: activation={activation!r} must be None or one of "
            f"{sorted(FLOAT_ACTIVATIONS)}; apply other activations to the result."
        )
    (_, rc), (_, rb) = dn
    shape = tuple(rhs.shape) if is_qarray(rhs) else jnp.shape(rhs)
    tail = tuple(d for i, d in enumerate(shape) if i not in rc and i not in rb)
    if bias is not None and tuple(jnp.shape(bias)) != tail:
        raise ValueError(
            f"{name}: bias has shape {tuple(jnp.shape(bias))}, but a bias is one value per "
            f"output column, rhs's free dims {tail}; reshape it, or add it to the result."
        )
    return tail


def _apply_epilogue(y, bias, activation):
    """XLA's route: ``y + bias``, then the activation, as a program writes them."""
    if bias is not None:
        y = y + bias
    if activation is not None:
        y = FLOAT_ACTIVATIONS[activation](y)
    return y


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _native_f32_dot(lhs: jax.Array, rhs: jax.Array, c: int) -> jax.Array:
    """``lhs`` (free..., K...) times ``rhs`` (K..., free...) over the ``c`` contracted
    axes, on the native float32 GEMM (the 2-D views copy nothing)."""
    return _native_f32_call(lhs, rhs, None, c, None)


def _native_f32_call(lhs, rhs, bias, c, activation):
    from jqx.kernels.cpu import native  # noqa: PLC0415 (dispatch imports it already)

    lead, k = lhs.shape[: lhs.ndim - c], math.prod(lhs.shape[lhs.ndim - c :])
    tail = rhs.shape[c:]
    y = native.f32_matmul(
        lhs.reshape(math.prod(lead), k), rhs.reshape(k, math.prod(tail)), bias, activation
    )
    return y.reshape(*lead, *tail)


def _contract_last(lhs, c):
    return ((tuple(range(lhs.ndim - c, lhs.ndim)), tuple(range(c))), ((), ()))


@_native_f32_dot.defjvp
def _native_f32_dot_jvp(c, primals, tangents):
    lhs, rhs = primals
    dl, dr = tangents
    dn = _contract_last(lhs, c)
    return _native_f32_dot(lhs, rhs, c), lax.dot_general(dl, rhs, dn) + lax.dot_general(lhs, dr, dn)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4))
def _native_f32_dense(lhs, rhs, bias, c: int, activation: str | None) -> jax.Array:
    """``activation(lhs . rhs + bias)`` (bias flattened to (N,), or None) on the native
    GEMM, the bias and activation in its epilogue."""
    return _native_f32_call(lhs, rhs, bias, c, activation)


@_native_f32_dense.defjvp
def _native_f32_dense_jvp(c, activation, primals, tangents):
    # The reference's tangents: XLA's dot, add and activation.
    lhs, rhs, bias = primals
    tail = rhs.shape[c:]

    def ref(lhs, rhs, bias):
        y = lax.dot_general(lhs, rhs, _contract_last(lhs, c))
        return _apply_epilogue(y, None if bias is None else bias.reshape(tail), activation)

    _, dy = jax.jvp(ref, primals, tangents)
    return _native_f32_dense(lhs, rhs, bias, c, activation), dy


def explain(
    lhs,
    rhs,
    dimension_numbers,
    precision=None,
    preferred_element_type=None,
    *,
    backend: str | None = None,
) -> str:
    """The name of the implementation :func:`dot_general` would run for these operands.

    Takes :func:`dot_general`'s arguments (only shapes and dtypes are read; nothing is
    computed) and asks the dispatcher under the current :func:`jqx.ops.policy`. Names
    are listed in docs/internals/dispatch.md: ``"xla.*"`` (XLA formulations),
    ``"native.*"`` (native CPU kernels), ``"pallas.*"``, or ``"lax.dot_general"`` when no
    operand is quantized.

    Raises:
      RuntimeError: ``backend="native"`` where the native kernels cannot run.

    Example:
        >>> import jax.numpy as jnp, jqx
        >>> q = jqx.int4_weight_only(group_size=32).quantize_weight(jnp.ones((64, 8)))
        >>> jqx.ops.explain(jnp.ones((2, 64)), q, (((1,), (0,)), ((), ())), backend="xla")
        'xla.dequantize_dot'
        >>> jqx.ops.explain(jnp.ones((2, 64)), q, (((1,), (0,)), ((), ())), backend="pallas")
        'pallas.w4a16'
    """
    _check_backend(backend)
    dn = _normalise(dimension_numbers)
    lq, rq = is_qarray(lhs), is_qarray(rhs)
    if not lq and not rq:
        return "lax.dot_general"
    if lq and rq:
        lhs, lq = jax.ShapeDtypeStruct(lhs.shape, lhs.dtype), False
    x, q, dn = (lhs, rhs, dn) if rq else (rhs, lhs, _swapped(dn))
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
        x = jnp.asarray(x)
    shape = tuple(x.shape)
    q, dn, _, _ = _oriented(
        shape, np.dtype(x.dtype), q, dn, precision, preferred_element_type, backend
    )
    flat = _flatten_contraction(shape, q, dn)
    if flat is not None:
        shape, q, dn, _ = flat
    p = describe(shape, np.dtype(x.dtype), q, dn, precision, preferred_element_type)
    return dispatch.choose(p, backend).name


# --------------------------------------------------------------------------- the product


def _check_backend(backend) -> None:
    if backend not in dispatch.BACKENDS:
        raise ValueError(
            f"backend={backend!r} is not supported; use None (the measured choice), 'xla', "
            "'native' (jqx's CPU kernels) or 'pallas'."
        )


def _normalise(dimension_numbers) -> DimensionNumbers:
    (lc, rc), (lb, rb) = dimension_numbers
    return ((tuple(lc), tuple(rc)), (tuple(lb), tuple(rb)))


def _swapped(dn: DimensionNumbers) -> DimensionNumbers:
    """The dimension numbers of ``x . W`` for a product given as ``W . x``."""
    (wc, xc), (wb, xb) = dn
    return ((xc, wc), (xb, wb))


def _weight_first(dn: DimensionNumbers, w_ndim: int, x_ndim: int) -> list[int]:
    """The permutation from ``x . W``'s output layout to ``W . x``'s."""
    (wc, xc), (wb, xb) = dn
    nb = len(xb)
    x_free = x_ndim - len(xc) - len(xb)
    w_free = w_ndim - len(wc) - len(wb)
    return (
        list(range(nb)) + [nb + x_free + i for i in range(w_free)] + [nb + i for i in range(x_free)]
    )


def _out_dtype(x_dtype, pet) -> np.dtype:
    if pet is not None:
        return np.dtype(pet)
    return np.dtype(x_dtype) if jnp.issubdtype(x_dtype, jnp.floating) else np.dtype(np.float32)


def _compute_dtype(x_dtype) -> np.dtype:
    """Dtype the float dots take x in: x's float dtype (bf16/f16 inputs are multiplied
    in 16 bits with a float32 result), else float32."""
    return np.dtype(x_dtype) if jnp.issubdtype(x_dtype, jnp.floating) else np.dtype(np.float32)


def _in_scale_on_contraction(q: QArray, wc) -> bool:
    """The stored in_scale is a function of the contraction index alone (so it can
    divide x instead of the weight)."""
    shape = (1,) * (q.ndim - q.in_scale.ndim) + tuple(q.in_scale.shape)
    return all(shape[a] == 1 for a in range(q.ndim) if a not in wc)


def gguf_layout(q: QArray) -> str | None:
    """The GGUF block layout ``q`` is stored in, or None: ``"Q4_0"``, ``"Q4_1"`` or
    ``"Q8_0"`` (``jqx.load_gguf``'s weights: ``(N, K)``, blocks of 32 along K, float16
    block scales). These layouts run on the native block kernels at decode sizes and
    accept per-block int8 activations (``ActSpec(granularity="per_block")``).

    Example:
        >>> import jax.numpy as jnp, jqx
        >>> jqx.ops.gguf_layout(jqx.int8_weight_only().quantize_weight(jnp.ones((4, 64)))) is None
        True
    """
    if q.ndim != 2 or tuple(q.block) != (1, 32) or q.shape[1] % 32:
        return None
    if q.act is not None and q.act.granularity != "per_block":
        return None
    if (
        q.in_scale is not None
        or q.qhigh is not None
        or q.super_scale is not None
        or q.g_idx is not None
    ):
        return None
    n, k = q.shape
    if q.scale.dtype != jnp.float16 or tuple(q.scale.shape) != (n, k // 32):
        return None
    codes = tuple(q.qvalue.shape)
    if q.zero_point is None and q.zero_kind == "code":
        if q.format == "int8" and codes == (n, k):
            return "Q8_0"
        if q.format == "int4" and codes == (n, k // 2):
            return "Q4_0"
        return None
    if (
        q.format == "uint4"
        and q.zero_kind == "min"
        and q.zero_point.dtype == jnp.float16
        and tuple(q.zero_point.shape) == (n, k // 32)
        and codes == (n, k // 2)
    ):
        return "Q4_1"
    return None


def describe(
    x_shape: tuple[int, ...],
    x_dtype,
    q: QArray,
    dn: DimensionNumbers,
    precision=None,
    preferred_element_type=None,
) -> Problem:
    """The :class:`Problem` for ``x . q`` (x of ``x_shape``/``x_dtype``), after checking
    that the operands define one."""
    (xc, wc), (xb, wb) = dn
    if len(xc) != len(wc) or any(x_shape[a] != q.shape[b] for a, b in zip(xc, wc, strict=True)):
        raise ValueError(
            f"jqx.ops.dot_general: contracting dims {tuple(xc)} of the activation "
            f"{tuple(x_shape)} do not match dims {tuple(wc)} of the quantized weight {q.shape} "
            f"({q.format}); check the weight's orientation (Flax kernels are (in, out))."
        )
    act = q.act
    gguf_kind = gguf_layout(q)
    if act is not None and act.granularity == "per_block":
        if gguf_kind is None or tuple(wc) != (1,) or xb or wb:
            raise NotImplementedError(
                f"jqx.ops.dot_general: per-block int8 activations (act={act}) run with GGUF "
                f"block layouts (Q4_0, Q4_1, Q8_0 from jqx.load_gguf) used as x @ W.T; got the "
                f"weight {q.shape} ({q.format}, block {q.block}) with dimension_numbers {dn}. "
                "Use act=None or a per_token activation spec."
            )
        kind = "gguf_q8"
    elif act is not None and act.granularity == "mx":
        if len(xc) != 1 or x_shape[xc[0]] % 32:
            raise ValueError(
                f"jqx.ops.dot_general: MX activations (act={act}) are quantized per block of "
                f"32 along one contracted dim; got contracting dims {tuple(xc)} of the "
                f"activation {tuple(x_shape)}. Contract one dim whose size is a multiple of 32."
            )
        kind = "mx"
    elif q.extensions:
        # Layouts no fast path reads (float minimum, two-level scales, split code
        # planes, e.g. GGUF imports): only q.dequantize() knows them.
        if act is not None:
            raise NotImplementedError(
                f"jqx.ops.dot_general: the weight {q.shape} ({q.format}, layout extensions "
                f"{q.extensions}) carries an activation spec ({act}); activation quantization "
                "is supported only on plain QArrays. Use it weight-only (act=None)."
            )
        kind = "dequantize"
    elif q.in_scale is not None and not _in_scale_on_contraction(q, wc):
        kind = "dequantize"
    elif act is None:
        kind = "weight_only"
    elif act.kind == "llm_int8":
        kind = "llm_int8"
        _check_llm_int8(q, dn)
    else:
        kind = "w8a8"
        _check_static_scale(q)
    return Problem(
        kind=kind,
        dimension_numbers=dn,
        x_shape=tuple(x_shape),
        rows=math.prod(x_shape[i] for i in range(len(x_shape)) if i not in xc),
        k=math.prod(x_shape[i] for i in xc),
        n=math.prod(q.shape[i] for i in range(q.ndim) if i not in wc and i not in wb),
        weight_format=q.format,
        weight_shape=tuple(q.shape),
        block=tuple(q.block),
        scale_shape=tuple(q.scale.shape),
        scale_dtype=np.dtype(q.scale.dtype),
        zero_shape=None if q.zero_point is None else tuple(q.zero_point.shape),
        zero_dtype=None if q.zero_point is None else np.dtype(q.zero_point.dtype),
        in_scale=q.in_scale is not None,
        act_format=None if act is None else _formats.get(act.format).name,
        act_kind=None if act is None else act.kind,
        act_granularity=None if act is None else act.granularity,
        compute_dtype=_compute_dtype(x_dtype),
        out_dtype=_out_dtype(x_dtype, preferred_element_type),
        precision=precision,
        gguf_kind=gguf_kind,
        extensions=tuple(q.extensions),
        code_layout=q.code_layout,
    )


def _check_static_scale(q: QArray) -> None:
    if q.act.kind != "static":
        return
    if q.act_scale is None:
        raise ValueError(
            f"QArray {q.shape} has a static activation spec (act={q.act}) but act_scale is "
            "None: its activation scale was never calibrated. Run jqx.calibrate(fn, params, "
            "batches, recipe) to set it, or use a dynamic recipe such as "
            "jqx.int8_dynamic_activation_int8_weight()."
        )
    if q.act_scale.size != 1:
        raise NotImplementedError(
            f"QArray {q.shape} has act_scale of shape {tuple(q.act_scale.shape)} (one static "
            "scale per stacked layer); it is applied per layer when the stacked weight is "
            "scanned (nn.scan / nnx.scan / lax.scan under jqx.quantized). Used directly, it "
            "needs a single scale: slice the layer first or use a dynamic recipe."
        )


def _check_llm_int8(q: QArray, dn: DimensionNumbers) -> None:
    """LLM.int8() is defined for x (..., K) . W (K, N), W int8 per output channel."""
    (_, wc), (xb, wb) = dn
    if xb or wb or len(wc) != 1 or q.ndim != 2 or q.block != (q.shape[0], 1) or q.format != "int8":
        raise NotImplementedError(
            f"LLM.int8() matmul supports a 2-D int8 weight (K, N) quantized per output channel "
            f"contracted on one axis without batch dims; got weight {q.shape} block {q.block} "
            f"format {q.format} with dimension_numbers {dn}. Quantize it with jqx.llm_int8() and "
            "use it as x @ W or x @ W.T."
        )
    if wc[0] == 1:  # W used transposed (x @ W.T): the stored layout is (N, K)
        raise NotImplementedError(
            f"LLM.int8() with the weight {q.shape} contracted on its last axis (x @ W.T) is not "
            "supported; store the weight as (K, N)."
        )


def _divide_in_scale(x: jax.Array, q: QArray, p: Problem) -> jax.Array:
    """``x / in_scale`` along the contraction (in_scale is a function of it alone)."""
    (xc, wc), _ = p.dimension_numbers
    ins = q.in_scale.astype(jnp.float32)
    ins = ins.reshape((1,) * (q.ndim - ins.ndim) + ins.shape)
    ins = ins.reshape([ins.shape[a] for a in sorted(wc)])
    # order the remaining (contraction) axes as x's contraction axes appear in x
    pairs = sorted(zip(xc, wc, strict=True))
    perm = [sorted(wc).index(w) for _, w in pairs]
    ins = jnp.transpose(ins, perm)
    shape = [1] * x.ndim
    for i, (xa, _) in enumerate(pairs):
        shape[xa] = ins.shape[i]
    return (x.astype(jnp.float32) / ins.reshape(shape)).astype(p.compute_dtype)


def _merge_axes(q: QArray, n: int) -> QArray | None:
    """``q`` (contracted ``shape[:n]``, free ``shape[n:]``) as a 2-D ``(K, N)`` QArray
    with the same codes and scales, or None where a merge would split a block. Flax's
    attention kernels ``(in, heads, head_dim)`` and ``(heads, head_dim, out)`` then run
    on the 2-D kernels (the codes and scales are only reshaped: the product is the
    same)."""
    if q.extensions or q.in_scale is not None or q.packed or q.super_block is not None:
        return None
    if q.code_layout == "vnni" and vnni_split(tuple(q.shape), tuple(q.block)) != n:
        return None  # contracted otherwise than packed: the product unpacks it
    shape, block = tuple(q.shape), tuple(q.block)

    def merged(axes) -> int | None:
        # Row-major merging keeps each block together when every axis after the first
        # is whole in its block, or every axis before the last has blocks of 1.
        sizes, blocks = [shape[a] for a in axes], [block[a] for a in axes]
        if len(axes) == 1:
            return blocks[0]
        if all(b == s for b, s in zip(blocks[1:], sizes[1:], strict=True)):
            return blocks[0] * math.prod(sizes[1:])
        if all(b == 1 for b in blocks[:-1]):
            return blocks[-1]
        return None

    bk, bn = merged(range(n)), merged(range(n, q.ndim))
    if bk is None or bn is None:
        return None
    k, m = math.prod(shape[:n]), math.prod(shape[n:])
    zero = q.zero_point
    return q.replace(
        # "vnni" codes are already the (K, N) panels of this merge.
        qvalue=q.qvalue if q.code_layout == "vnni" else q.qvalue.reshape(k, m),
        scale=_merge_leaves(q.scale, shape, block, n),
        zero_point=None if zero is None else _merge_leaves(zero, shape, block, n),
        shape=(k, m),
        block=(bk, bn),
    )


def _merge_leaves(a: jax.Array, shape, block, n: int) -> jax.Array:
    """A scale / zero-point array of blocks over ``shape`` reshaped to the 2-D merge."""
    grid = [s // b for s, b in zip(shape, block, strict=True)]
    a = jnp.broadcast_to(a, grid) if a.ndim == len(grid) else a.reshape(grid)
    return a.reshape(math.prod(grid[:n]), math.prod(grid[n:]))


def _flatten_contraction(x_shape, q: QArray, dn: DimensionNumbers):
    """``x . q`` with ``q``'s leading contracted axes merged into one K and its free axes
    into one N (no batch dims; x's contracted axes consecutive and in q's order), or
    None. Returns ``(x2_shape, q2, dn2, out_shape)``."""
    (xc, wc), (xb, wb) = dn
    n = len(wc)
    if xb or wb or tuple(wc) != tuple(range(n)) or (n == 1 and q.ndim <= 2):
        return None
    if q.ndim == n or tuple(xc) != tuple(range(xc[0], xc[0] + n)):
        return None
    q2 = _merge_axes(q, n)
    if q2 is None:
        return None
    xs = list(x_shape)
    x_free = [d for i, d in enumerate(xs) if i not in xc]
    x2 = (*xs[: xc[0]], math.prod(xs[xc[0] : xc[0] + n]), *xs[xc[0] + n :])
    return x2, q2, (((xc[0],), (0,)), ((), ())), (*x_free, *q.shape[n:])


def _vnni_transposed(q: QArray, dn: DimensionNumbers):
    """A ``"vnni"``-packed ``(out, in)`` weight contracted on its last axis, as the
    ``(in, out)`` weight contracted on axis 0 that its panels already hold (scales
    transposed, codes untouched), or None."""
    (xc, wc), (xb, wb) = dn
    if q.code_layout != "vnni" or q.ndim != 2 or tuple(wc) != (1,) or xb or wb:
        return None
    if vnni_split(tuple(q.shape), tuple(q.block)) != -1:
        return None
    return q._vnni_in_out_view(), ((tuple(xc), (0,)), ((), ()))


def _oriented(x_shape, x_dtype, q: QArray, dn: DimensionNumbers, precision, pet, backend):
    """:func:`_orient`, then a weight-only second-level scale (NVFP4's per tensor)
    folded into the block scales (the values ``dequantize`` gives), so the 4-bit kernels
    and XLA's weight-only paths take it instead of dequantizing it whole. Returns
    ``(q, dn, order, unfolded)``: ``unfolded`` is the weight before that fold (None when
    nothing was folded), for an implementation that reads the two levels as stored
    (``Implementation.reads_super_scale``)."""
    q, dn, order = _orient(x_shape, x_dtype, q, dn, precision, pet, backend)
    if q.act is None and q.code_layout == "plain" and foldable_super_scale(q):
        return fold_super_scale(q), dn, order, q
    return q, dn, order, None


def _orient(x_shape, x_dtype, q: QArray, dn: DimensionNumbers, precision, pet, backend):
    """``(q, dn)``, or a packed ``(out, in)`` weight as the ``(in, out)`` product its
    panels hold when an implementation that reads them runs that (the same product;
    ``x @ W.T``'s output layout is ``x @ W``'s). Elsewhere the weight keeps its
    orientation, so XLA computes it exactly as it would the unpacked weight. A ``"kn"``
    weight contracted on its input axis is always its ``(in, out)`` view. Returns
    ``(q, dn, order)``: ``order`` (or None) is the order in which x's contracted inputs
    meet the view's rows."""
    (xc, wc), (xb, wb) = dn
    if q.code_layout == "kn" and tuple(wc) == (1,) and not xb and not wb:
        # Children already hold the (in, out) transpose: x @ W.T is x @ view, no copy
        # (with act_order, x's inputs taken in the stored order: g_idx).
        return q._kn_view(), ((tuple(xc), (0,)), ((), ())), q.g_idx
    tr = _vnni_transposed(q, dn)
    if tr is None:
        return q, dn, None
    qt, dnt = tr
    p = describe(tuple(x_shape), x_dtype, qt, dnt, precision, pet)
    if qt.code_layout in dispatch.choose(p, backend).layouts:
        return qt, dnt, None
    return q, dn, None


def _x_dot_w(
    x: jax.Array,
    q: QArray,
    dn: DimensionNumbers,
    precision,
    pet,
    backend,
    bias=None,
    activation: str | None = None,
):
    q, dn, order, unfolded = _oriented(x.shape, x.dtype, q, dn, precision, pet, backend)
    if order is not None:
        x = jnp.take(x, order, axis=dn[0][0][0])
    flat = _flatten_contraction(x.shape, q, dn)
    if flat is not None:
        x2, q2, dn2, out_shape = flat
        y = _x_dot_w(x.reshape(x2), q2, dn2, precision, pet, backend).reshape(out_shape)
        return _apply_epilogue(y, bias, activation)
    p = describe(tuple(x.shape), x.dtype, q, dn, precision, pet)
    impl = dispatch.choose(p, backend)
    if unfolded is not None and impl.reads_super_scale:
        # The kernel widens the stored block scales and applies the second level
        # itself: the same float32 scales, no folded copy written per call.
        q = unfolded
    if p.in_scale and p.kind != "dequantize":
        x, q = _divide_in_scale(x, q, p), q.replace(in_scale=None)
    if q.code_layout not in impl.layouts:
        # Only the native GEMM reads the panels; every other path gets the codes back
        # in their (K, N) layout (one reshape and transpose per call).
        q = q.with_code_layout("plain")
    if bias is None and activation is None:
        return impl.run(x, q, p)
    f32 = jnp.dtype(jnp.float32)
    inside = (
        impl.epilogue
        and dispatch.current_policy().epilogue
        and jnp.dtype(p.out_dtype) == f32
        and (bias is None or (jnp.dtype(bias.dtype) == f32 and bias.size == q.shape[1]))
    )
    if inside:  # the kernel adds the bias and applies the activation as it stores
        b = None if bias is None else jnp.reshape(bias, (q.shape[1],))
        return impl.run_epilogue(x, q, p, b, activation)
    return _apply_epilogue(impl.run(x, q, p), bias, activation)


# --------------------------------------------------------------------------- activation x activation


def _absmax_codes(x: jax.Array, axes, fmt: _formats.Format):
    """Symmetric codes of ``x`` with one scale per index of the non-``axes`` dims."""
    return quantize_activation(x, fmt, scale=absmax_scale(x, tuple(axes), fmt))


def dynamic_dot_general(
    lhs: jax.Array,
    rhs: jax.Array,
    dimension_numbers,
    preferred_element_type=None,
    *,
    fmt: str = "int8",
) -> jax.Array:
    """A matmul of two activations with both operands quantized on the fly.

    Each operand gets one absmax scale per row, i.e. per index of its batch
    and free dims (constant along the contraction), so the product is an
    integer (or fp8) dot followed by an outer-product rescale. This is what
    ``jqx.quantized(fn, activation_matmuls="int8")`` runs for matmuls with no
    weight operand (attention's ``q @ k^T`` and ``p @ v``), as qwix's
    ``.*`` rules do.

    Args:
      lhs, rhs: float arrays.
      dimension_numbers: as for ``jax.lax.dot_general``.
      preferred_element_type: output dtype (default: ``lhs``'s float dtype).
      fmt: ``"int8"`` or ``"fp8_e4m3"``.

    Returns:
      The approximate product, error at most ``s_l/2 * sum|rhs| + s_r/2 * sum|lhs|``
      (plus the second-order term) per output element.

    Example:
        >>> import jax.numpy as jnp, jqx
        >>> a = jnp.array([[1.0, 2.0], [3.0, -4.0]])
        >>> y = jqx.ops.dynamic_dot_general(a, a, (((1,), (0,)), ((), ())))
        >>> bool(jnp.allclose(y, a @ a, atol=0.1))
        True
    """
    f = _formats.get(fmt)
    if f.name not in ("int8", "fp8_e4m3"):
        raise ValueError(
            f"dynamic_dot_general(fmt={fmt!r}): activation matmuls are quantized to 'int8' or "
            "'fp8_e4m3'."
        )
    lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
    (lc, rc), (lb, rb) = dimension_numbers
    out_dtype = _out_dtype(lhs.dtype, preferred_element_type)
    lq, ls = _absmax_codes(lhs, lc, f)
    rq, rs = _absmax_codes(rhs, rc, f)
    if f.name == "int8":
        acc = lax.dot_general(lq, rq, dimension_numbers, preferred_element_type=jnp.int32)
        y = acc.astype(jnp.float32)
    else:
        y = lax.dot_general(
            lq.astype(jnp.bfloat16),
            rq.astype(jnp.bfloat16),
            dimension_numbers,
            preferred_element_type=jnp.float32,
        )
    n_lfree = lhs.ndim - len(lc) - len(lb)
    n_rfree = rhs.ndim - len(rc) - len(rb)
    y = y * x_out_scale(ls, lc, lb, n_rfree)
    y = y * w_out_scale(rs, rc, rb, n_lfree)
    return y.astype(out_dtype)
