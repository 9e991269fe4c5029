"""What one quantized product is, in static facts, and the terms every implementation shares.

:class:`Problem` is the record that ``jqx.ops.dot_general`` hands to the dispatcher
(``jqx.ops.dispatch.choose``) and that each implementation's ``supports`` reads: shapes,
formats, layout and dtypes, never arrays, so a decision costs nothing at run time and is
made once per trace. :class:`Implementation` is the adapter interface. The functions
below are the pieces of the product's definition that several implementations reuse:
the activation codes a W8A8 weight asks for, the output rescale, decoded weight codes.

See docs/internals/dispatch.md.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp
import numpy as np

from jqx.core import formats as _formats
from jqx.core.numerics import absmax_scale, keep_nan_rows, quantize_activation
from jqx.core.qarray import QArray

Kind = Literal["weight_only", "w8a8", "llm_int8", "dequantize", "gguf_q8", "mx"]
DimensionNumbers = tuple[tuple[tuple[int, ...], tuple[int, ...]], tuple[tuple[int, ...], ...]]

_F32 = np.dtype(np.float32)
_16_BIT = (np.dtype(jnp.bfloat16), np.dtype(np.float16))


@dataclasses.dataclass(frozen=True)
class Problem:
    """One ``x . W`` product with a quantized weight ``W``, described by static facts.

    Attributes:
      kind: what is computed: ``"weight_only"`` (``x . dequantize(W)``), ``"w8a8"``
        (``quantize(x) . dequantize(W)``, the activations quantized as ``W.act`` says),
        ``"llm_int8"`` (the LLM.int8() decomposition) or ``"dequantize"`` (``x .
        dequantize(W)`` with an ``in_scale`` that is not a function of the contraction
        index alone, so it cannot move onto ``x``).
        ``"mx"``: ``x`` quantized per block of 32 along K to an MX format (``W.act``
        with granularity ``"mx"``), times ``dequantize(W)``.
      dimension_numbers: ``((x_contract, w_contract), (x_batch, w_batch))``, x first.
      x_shape: the activation's shape.
      rows: elements of ``x`` per contraction (product of its batch and free dims).
      k: contraction size (product of the contracted dims).
      n: product of the weight's free dims.
      weight_format: ``W.format``.
      weight_shape: ``W.shape``.
      block: ``W.block``.
      scale_shape, scale_dtype: of ``W.scale``.
      zero_shape, zero_dtype: of ``W.zero_point`` (None when it has none).
      in_scale: ``W`` stores an ``in_scale``.
      act_format, act_kind, act_granularity: ``W.act``'s fields (None for weight-only).
      compute_dtype: the dtype the float dots take ``x`` in (x's float dtype, else f32).
      out_dtype: the result's dtype.
      precision: ``precision`` as given to ``dot_general``.
      gguf_kind: ``"Q4_0"``, ``"Q4_1"`` or ``"Q8_0"`` when ``W`` is stored in that GGUF
        block layout (``(N, K)``, blocks of 32 along K, float16 scales), else None.
      extensions: ``W.extensions`` (layout extensions such as ``"g_idx"``).
      code_layout: ``W.code_layout``: ``"plain"``, ``"vnni"`` (int8 codes in the native
        GEMM's panels) or ``"kn"`` (a stored transpose, seen here only when contracted
        otherwise than as ``x @ W.T``); implementations that do not list it in
        ``layouts`` get the weight unpacked.
    """

    kind: Kind
    dimension_numbers: DimensionNumbers
    x_shape: tuple[int, ...]
    rows: int
    k: int
    n: int
    weight_format: str
    weight_shape: tuple[int, ...]
    block: tuple[int, ...]
    scale_shape: tuple[int, ...]
    scale_dtype: np.dtype
    zero_shape: tuple[int, ...] | None
    zero_dtype: np.dtype | None
    in_scale: bool
    act_format: str | None
    act_kind: str | None
    act_granularity: str | None
    compute_dtype: np.dtype
    out_dtype: np.dtype
    precision: Any
    gguf_kind: str | None = None
    extensions: tuple[str, ...] = ()
    code_layout: str = "plain"

    @property
    def fmt(self) -> _formats.Format:
        return _formats.get(self.weight_format)

    @property
    def weight_size(self) -> int:
        return math.prod(self.weight_shape)

    @property
    def zero_point(self) -> bool:
        return self.zero_shape is not None

    @property
    def batched(self) -> bool:
        return bool(self.dimension_numbers[1][0])

    @property
    def const_along_k(self) -> bool:
        """Scale and zero point are constant along the contraction (one block covers it)."""
        wc = self.dimension_numbers[0][1]
        return all(self.block[a] == self.weight_shape[a] for a in wc)

    @property
    def plain(self) -> bool:
        """``x (..., K, ...) . W (K, N)``: one contracted dim, W 2-D contracted on axis 0,
        no batch dims (x's other dims are rows)."""
        (xc, wc), (xb, wb) = self.dimension_numbers
        return not xb and not wb and len(xc) == 1 and wc == (0,) and len(self.weight_shape) == 2

    @property
    def plain_2d(self) -> bool:
        """``x (M, K) . W (K, N)``: :attr:`plain` with a 2-D x contracted on its last axis."""
        return self.plain and len(self.x_shape) == 2 and self.dimension_numbers[0][0] == (1,)

    @property
    def int8_codes(self) -> bool:
        """W8A8 whose product is int8 activation codes times int8 weight codes."""
        return (
            self.kind == "w8a8"
            and self.const_along_k
            and not self.zero_point
            and self.weight_format == "int8"
            and self.act_format == "int8"
        )

    @property
    def accumulate_dtype(self) -> np.dtype:
        """16-bit float dots accumulate and return float32 (faster and more exact on
        XLA:CPU than a 16-bit result)."""
        return _F32 if self.compute_dtype in _16_BIT else self.compute_dtype


class Implementation:
    """A way to compute a :class:`Problem`: an adapter, with no policy of its own.

    ``supports`` says what the implementation can compute (layout, formats, dtypes),
    never whether it is the fastest choice: that is the dispatcher's question. ``run``
    gets the activations (already divided by the weight's ``in_scale``, except for kind
    ``"dequantize"``) and the weight (its ``in_scale`` then removed).
    """

    name: ClassVar[str] = "?"
    # The weight code layouts ``run`` reads (QArray.code_layout); for any other,
    # jqx.ops.dot_general hands ``run`` the weight unpacked to "plain".
    layouts: ClassVar[tuple[str, ...]] = ("plain",)
    # True: where ``supports`` accepted a weight whose second-level scale (NVFP4's per
    # tensor) was folded for the description, ``run`` gets the weight as stored, with
    # ``super_scale``, and applies the two levels itself (the same float32 scales).
    reads_super_scale: ClassVar[bool] = False
    # True: ``run`` also takes ``bias=`` (float32 (N,)) and ``activation=``
    # (jqx.ops.matmul.FLOAT_ACTIVATIONS' names) and applies them inside the kernel, as
    # ``run_epilogue`` asks; else jqx.ops applies XLA's add and activation to ``run``'s
    # result.
    epilogue: ClassVar[bool] = False

    def supports(self, p: Problem) -> bool:
        raise NotImplementedError

    def run(self, x: jax.Array, q: QArray, p: Problem) -> jax.Array:
        raise NotImplementedError

    def run_epilogue(self, x, q: QArray, p: Problem, bias, activation) -> jax.Array:
        """``activation(run(x, q, p) + bias)`` computed by the kernel (``epilogue``)."""
        if not self.epilogue:
            raise NotImplementedError(f"{self.name} has no epilogue")
        return self.run(x, q, p, bias=bias, activation=activation)

    def __repr__(self) -> str:
        return f"<jqx.ops implementation {self.name}>"


# --------------------------------------------------------------------------- shared terms


def w_out_scale(s: jax.Array, wc, wb, n_xfree: int) -> jax.Array:
    """A per-block weight array (1 along the contraction dims ``wc``) laid out to
    broadcast against the output (batch, x free, w free)."""
    nd = s.ndim
    wfree = [i for i in range(nd) if i not in wc and i not in wb]
    keep = list(wb) + wfree
    s = jnp.transpose(s, keep + list(wc))
    s = s.reshape(s.shape[: len(keep)])
    return s.reshape(s.shape[: len(wb)] + (1,) * n_xfree + s.shape[len(wb) :])


def x_out_scale(s: jax.Array, xc, xb, n_wfree: int) -> jax.Array:
    """A per-row activation scale (1 along the contraction dims ``xc``) laid out to
    broadcast against the output (batch, x free, w free)."""
    nd = s.ndim
    xfree = [i for i in range(nd) if i not in xc and i not in xb]
    keep = list(xb) + xfree
    s = jnp.transpose(s, keep + list(xc))
    return s.reshape(s.shape[: len(keep)] + (1,) * n_wfree)


def n_free(p: Problem) -> tuple[int, int]:
    """(x's free dims, w's free dims)."""
    (xc, wc), (xb, wb) = p.dimension_numbers
    return len(p.x_shape) - len(xc) - len(xb), len(p.weight_shape) - len(wc) - len(wb)


def decoded(q: QArray, dtype) -> jax.Array:
    """``codes - zero_point`` (no scale) in ``dtype``: exact for 8-bit ints, 4-bit codes
    and fp8 in float32 and bfloat16 (table formats are exact in float32)."""
    v = q.values()
    if q.zero_point is not None:
        v = (q.blocked(v) - q.expand(q.zero_point.astype(jnp.float32))).reshape(q.shape)
    return v.astype(dtype)


def activation_codes(x: jax.Array, q: QArray, p: Problem) -> tuple[jax.Array, jax.Array]:
    """The activation codes and float32 scale that ``q.act`` asks for: a static scale,
    or the dynamic absmax per token (one scale per index of x's non-contracted dims) or
    per tensor. The scale has x's rank with 1 on the contracted dims."""
    fmt = _formats.get(p.act_format)
    xf = x.astype(jnp.float32)
    xc = p.dimension_numbers[0][0]
    if p.act_kind == "static":
        # A row holding NaN gets a NaN scale: its int8 codes cannot carry the NaN.
        s = keep_nan_rows(xf, q.act_scale.astype(jnp.float32).reshape((1,) * xf.ndim), tuple(xc))
    else:
        s = absmax_scale(xf, tuple(xc) if p.act_granularity == "per_token" else None, fmt)
    return quantize_activation(xf, fmt, scale=s)


def w8a8_product(
    x: jax.Array,
    q: QArray,
    p: Problem,
    codes_dot: Callable[[jax.Array], jax.Array],
) -> jax.Array:
    """The W8A8 product: x's codes (as ``q.act`` says) times the weight codes by
    ``codes_dot(codes) -> float32`` (an exact codes product in ``p``'s dimension
    numbers), then both scales."""
    (xc, wc), (xb, wb) = p.dimension_numbers
    n_xfree, n_wfree = n_free(p)
    codes, xs = activation_codes(x, q, p)
    y = codes_dot(codes)
    y = y * x_out_scale(xs, xc, xb, n_wfree)
    y = y * w_out_scale(q.scale.astype(jnp.float32), wc, wb, n_xfree)
    return y.astype(p.out_dtype)
