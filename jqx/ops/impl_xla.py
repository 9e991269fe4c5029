"""XLA formulations of quantized products (adapters; the dispatcher picks among them).

Every formulation here is plain ``lax`` code, correct on every platform, except
``xla.scaled_matmul`` (``jax.nn.scaled_matmul``), which lowers on CUDA only. Which one runs
for a given shape on a given platform is decided in ``jqx.ops.dispatch`` only; see
docs/internals/dispatch.md for the measurements behind each choice.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jqx.core import formats as _formats
from jqx.core.numerics import (
    TWO_LEVEL_STEP,
    quantize_activation,
    quantize_activation_blocks,
    two_level_scales,
)
from jqx.core.qarray import QArray
from jqx.ops.problem import (
    Implementation,
    Problem,
    activation_codes,
    decoded,
    n_free,
    w8a8_product,
    w_out_scale,
    x_out_scale,
)

_F32 = np.dtype(np.float32)
_FLOATS = (np.dtype(np.float32), np.dtype(jnp.bfloat16), np.dtype(np.float16))


def dequantize_dot(x: jax.Array, q: QArray, p: Problem) -> jax.Array:
    """``x . q.dequantize()`` in the compute dtype (16-bit dots accumulate in f32)."""
    cdt = p.compute_dtype
    y = lax.dot_general(
        x.astype(cdt),
        q.dequantize(cdt),
        p.dimension_numbers,
        precision=p.precision,
        preferred_element_type=p.accumulate_dtype,
    )
    return y.astype(p.out_dtype)


class DequantizeDot(Implementation):
    """Dequantize the weight, then one float dot: always correct, never the fastest
    where another formulation applies."""

    name = "xla.dequantize_dot"

    def supports(self, p: Problem) -> bool:
        return p.kind in ("weight_only", "dequantize")

    def run(self, x, q, p):
        return dequantize_dot(x, q, p)


class DecodedDot(Implementation):
    """Weight-only, scale constant along the contraction: the dot runs on the decoded
    codes (``codes - zero_point``, exact in the compute dtype), then the output columns
    are scaled."""

    name = "xla.decoded_dot"

    def supports(self, p: Problem) -> bool:
        fmt = p.fmt
        # Table formats (nf4/fp4) decode to non-dyadic values: not exact in 16 bits.
        exact = p.compute_dtype == _F32 or fmt.kind != "table"
        return p.kind == "weight_only" and p.const_along_k and exact and not fmt.is_wide_float

    def run(self, x, q, p):
        (_, wc), (_, wb) = p.dimension_numbers
        n_xfree, _ = n_free(p)
        cdt = p.compute_dtype
        y = lax.dot_general(
            x.astype(cdt),
            decoded(q, cdt),
            p.dimension_numbers,
            precision=p.precision,
            preferred_element_type=p.accumulate_dtype,
        )
        y = y.astype(jnp.float32) * w_out_scale(q.scale.astype(jnp.float32), wc, wb, n_xfree)
        return y.astype(p.out_dtype)


def two_level_split(
    x: jax.Array, q: QArray, p: Problem, int_dot: Callable[[jax.Array, tuple], jax.Array]
) -> jax.Array:
    """``x . W`` for an int8 per-channel weight with x split into two int8 levels,
    ``x = s1*q1 + s2*q2 + r`` (:func:`jqx.core.numerics.two_level_scales`: ``s2 = s1 *
    2^-8``, ``|r| <= max|x_row| / 32511`` per element, about 2^-15 of the row's
    absmax, far below the int8 weight's own error). Both levels share one exact integer
    product ``int_dot(both, dimension_numbers) -> float32``, combined as ``((sum1 +
    sum2 * 2^-8) * s1) * w_scale``: every rounding is the same whether or not XLA
    fuses a multiply into an add, so the native kernel (``native.two_level_matmul``)
    gives the same bits under any compilation."""
    (xc, wc), _ = p.dimension_numbers
    n_xfree, n_wfree = n_free(p)
    fmt = _formats.get("int8")
    xf = x.astype(jnp.float32)
    s1, s2 = two_level_scales(xf, tuple(xc))
    q1, _ = quantize_activation(xf, fmt, scale=s1)
    q2, _ = quantize_activation(xf - q1.astype(jnp.float32) * s1, fmt, scale=s2)
    both = jnp.stack([q1, q2])
    acc = int_dot(both, ((tuple(a + 1 for a in xc), tuple(wc)), ((), ())))
    y = (acc[0] + acc[1] * TWO_LEVEL_STEP) * x_out_scale(s1, xc, (), n_wfree)
    y = y * w_out_scale(q.scale.astype(jnp.float32), wc, (), n_xfree)
    return y.astype(p.out_dtype)


class TwoLevelInt8(Implementation):
    """int8 weight-only, per output channel: the activations split into two int8 levels
    and one int8 x int8 -> int32 dot, instead of converting the weight to float."""

    name = "xla.two_level_int8"

    def supports(self, p: Problem) -> bool:
        return (
            p.kind == "weight_only"
            and p.weight_format == "int8"
            and not p.zero_point
            and not p.batched
            and p.const_along_k
            and p.compute_dtype == _F32
            and p.precision is None
        )

    def run(self, x, q, p):
        def int_dot(both, dn):
            return lax.dot_general(both, q.qvalue, dn, preferred_element_type=jnp.int32).astype(
                jnp.float32
            )

        return two_level_split(x, q, p, int_dot)


@dataclasses.dataclass(frozen=True, repr=False)
class Int32Dot(Implementation):
    """W8A8 int8: int8 codes x int8 codes -> int32 ``dot_general``, rescaled in float32.
    ``pad_single_row``: a single row is padded to two (the dispatcher asks for it where
    one-row int8 dots fall off the fast path)."""

    pad_single_row: bool = False

    @property
    def name(self) -> str:  # type: ignore[override]
        return "xla.int32_dot_padded" if self.pad_single_row else "xla.int32_dot"

    def supports(self, p: Problem) -> bool:
        if self.pad_single_row:
            return p.int8_codes and not p.batched and p.rows == 1
        return p.int8_codes

    def run(self, x, q, p):
        (xc, wc), _ = p.dimension_numbers

        def codes_dot(codes):
            if not self.pad_single_row:
                return lax.dot_general(
                    codes, q.qvalue, p.dimension_numbers, preferred_element_type=jnp.int32
                ).astype(jnp.float32)
            two = jnp.concatenate([codes[None], jnp.zeros_like(codes)[None]], axis=0)
            dn2 = ((tuple(a + 1 for a in xc), tuple(wc)), ((), ()))
            acc = lax.dot_general(two, q.qvalue, dn2, preferred_element_type=jnp.int32)
            return acc[0].astype(jnp.float32)

        return w8a8_product(x, q, p, codes_dot)


class Bf16Dot(Implementation):
    """W8A8 with codes exact in bfloat16 (int8 codes; fp8 codes against a float weight):
    a bf16 x bf16 -> float32 dot. Products are exact and sums are float32, so for int8
    the result equals the int32 dot converted to float32 while partial sums stay below
    2^24 (always for K <= 1040); beyond that a partial sum may round by 1 part in 2^24,
    the rounding the int32 path's final conversion applies too."""

    name = "xla.bf16_dot"

    def supports(self, p: Problem) -> bool:
        fp8_codes = (
            p.kind == "w8a8"
            and p.const_along_k
            and not p.zero_point
            and p.fmt.kind == "float"
            and p.act_format.startswith("fp8")
        )
        return p.int8_codes or fp8_codes

    def run(self, x, q, p):
        def codes_dot(codes):
            return lax.dot_general(
                codes.astype(jnp.bfloat16),
                q.qvalue.astype(jnp.bfloat16),
                p.dimension_numbers,
                preferred_element_type=jnp.float32,
            )

        return w8a8_product(x, q, p, codes_dot)


class DecodedF32Dot(Implementation):
    """W8A8 with other code formats: both operands' decoded codes in a float32 dot."""

    name = "xla.decoded_f32_dot"

    def supports(self, p: Problem) -> bool:
        return p.kind == "w8a8" and p.const_along_k and not p.zero_point

    def run(self, x, q, p):
        act_fmt = _formats.get(p.act_format)

        def codes_dot(codes):
            return lax.dot_general(
                _formats.decode(codes, act_fmt, jnp.float32),
                decoded(q, jnp.float32),
                p.dimension_numbers,
                precision=p.precision,
                preferred_element_type=jnp.float32,
            )

        return w8a8_product(x, q, p, codes_dot)


class SimulatedW8A8(Implementation):
    """W8A8 whose weight scales vary along the contraction (or carry a zero point): no
    integer dot can use them, so the activations are quantized and decoded, and the
    product runs as dequantize-then-dot (exact simulation of the quantized product)."""

    name = "xla.simulated_w8a8"

    def supports(self, p: Problem) -> bool:
        return p.kind == "w8a8"

    def run(self, x, q, p):
        codes, s = activation_codes(x, q, p)
        xh = _formats.decode(codes, _formats.get(p.act_format), jnp.float32) * s
        return dequantize_dot(xh, q, dataclasses.replace(p, compute_dtype=_F32))


class LlmInt8(Implementation):
    """LLM.int8(): jqx.recipes.llm_int8's decomposition for ``x (..., K) . W (K, N)``."""

    name = "xla.llm_int8"

    def supports(self, p: Problem) -> bool:
        return p.kind == "llm_int8"

    def run(self, x, q, p):
        from jqx.recipes.llm_int8 import llm_int8_matmul  # noqa: PLC0415

        xc = p.dimension_numbers[0][0]
        y = llm_int8_matmul(jnp.moveaxis(x, xc[0], -1), q, out_dtype=p.out_dtype)
        return y.astype(p.out_dtype)


class GGUFQ8(Implementation):
    """GGUF block weights with per-block int8 activations (``act.granularity ==
    "per_block"``): ``x`` rounded per block of 32 along K as llama.cpp rounds it
    (:func:`jqx.core.numerics.quantize_activation_blocks`), then the dequantized product."""

    name = "xla.gguf_q8"

    def supports(self, p: Problem) -> bool:
        return p.kind == "gguf_q8"

    def run(self, x, q, p):
        xc = p.dimension_numbers[0][0][0]
        xl = jnp.moveaxis(x, xc, -1)
        codes, d = quantize_activation_blocks(xl, 32)
        xr = codes.astype(jnp.float32).reshape(d.shape + (32,)) * d.astype(jnp.float32)[..., None]
        xr = xr.reshape(xl.shape)
        y = dequantize_dot(jnp.moveaxis(xr, -1, xc).astype(p.compute_dtype), q.replace(act=None), p)
        if p.gguf_kind == "Q4_1":
            # Q8_1 stores each block's sum as float16(d * sum(codes)) with the float32 d;
            # the minimum term m * sum(x_hat) above used float16(d) * sum(codes).
            csum = codes.astype(jnp.float32).reshape(d.shape + (32,)).sum(-1)
            d32 = jnp.max(jnp.abs(xl.astype(jnp.float32)).reshape(csum.shape + (32,)), -1) / 127.0
            s16 = (d32 * csum).astype(jnp.float16).astype(jnp.float32)
            delta = s16 - d.astype(jnp.float32) * csum  # (..., K/32)
            y = y + jnp.einsum("...b,nb->...n", delta, q.zero_point.astype(jnp.float32)).astype(
                y.dtype
            )
        return y


class MXEmulated(Implementation):
    """MX activations (``act.granularity == "mx"``): ``x`` rounded per block of 32 along
    K through its MX format, then a float32 dot with the dequantized weight at HIGHEST
    precision. MX values and their pairwise products are exact in float32, so this is
    the block-scaled dot up to float32 accumulation (the emulation for backends without
    MX hardware)."""

    name = "xla.mx_emulated"

    def supports(self, p: Problem) -> bool:
        return p.kind == "mx"

    def run(self, x, q, p):
        from jqx.core.mx import fake_quant_mx  # noqa: PLC0415

        xc = p.dimension_numbers[0][0][0]
        xh = fake_quant_mx(x, p.act_format, axis=xc)
        pf = dataclasses.replace(p, compute_dtype=_F32, precision=lax.Precision.HIGHEST)
        return dequantize_dot(xh, q.replace(act=None), pf)


# MX element formats with a jnp dtype that jax.nn.scaled_matmul takes.
_SCALED_DTYPES = {
    "fp8_e4m3": jnp.float8_e4m3fn,
    "fp8_e5m2": jnp.float8_e5m2,
    "fp4_e2m1": jnp.float4_e2m1fn,
}


def _scaled_pair(weight_format: str | None, act_format: str | None) -> bool:
    """Element formats of both operands that one block-scaled dot takes: FP8 with FP8
    (E4M3 or E5M2 on either side, MXFP8) or FP4 E2M1 with FP4 E2M1 (MXFP4)."""
    fp8 = ("fp8_e4m3", "fp8_e5m2")
    return (weight_format in fp8 and act_format in fp8) or weight_format == act_format == "fp4_e2m1"


class ScaledMatmul(Implementation):
    """MX activations with an MX weight of the same element family, as one
    ``jax.nn.scaled_matmul`` (XLA's block-scaled dot: cuDNN's MX kernels on Blackwell
    GPUs). ``x`` is rounded per block of 32 along K exactly as ``xla.mx_emulated``
    rounds it, and both operands go in as their MX elements and E8M0 scales, so it
    computes the same product. It lowers on CUDA only (XLA:CPU has no rule for it); the
    dispatcher picks it where the hardware runs it (docs/guide/mx.md)."""

    name = "xla.scaled_matmul"

    def supports(self, p: Problem) -> bool:
        if p.kind != "mx" or p.batched or p.extensions or p.in_scale:
            return False
        (xc, wc), _ = p.dimension_numbers
        if len(xc) != 1 or len(wc) != 1 or len(p.weight_shape) != 2:
            return False
        blocks_along_k = p.block[wc[0]] == 32 and p.block[1 - wc[0]] == 1
        return (
            blocks_along_k
            and p.scale_dtype == np.dtype(jnp.float8_e8m0fnu)
            and _scaled_pair(p.weight_format, p.act_format)
        )

    def run(self, x, q, p):
        a, b, sa, sb, lead = scaled_operands(x, q, p)
        y = jax.nn.scaled_matmul(a, b, sa, sb, preferred_element_type=jnp.float32)
        return y.reshape(lead + (b.shape[1],)).astype(p.out_dtype)


def scaled_operands(x: jax.Array, q: QArray, p: Problem):
    """The operands :class:`ScaledMatmul` hands to ``jax.nn.scaled_matmul``: ``(a, b,
    a_scales, b_scales, lead)`` with ``a (1, M, K)`` and ``b (1, N, K)`` in their MX
    element dtypes, E8M0 scales ``(1, M, K/32)`` and ``(1, N, K/32)``, and ``lead`` the
    shape of ``x``'s free dims (the result is ``(1, M, N)``)."""
    from jqx.core.mx import mx_blocks  # noqa: PLC0415

    (xc, wc), _ = p.dimension_numbers
    xl = jnp.moveaxis(x, xc[0], -1)
    lead = tuple(xl.shape[:-1])
    k = xl.shape[-1]
    vals, sbits = mx_blocks(xl.reshape(-1, k), p.act_format)
    a = vals.astype(_SCALED_DTYPES[p.act_format]).reshape(1, -1, k)
    sa = jax.lax.bitcast_convert_type(sbits, jnp.float8_e8m0fnu)[None]
    # The weight's grid values are exact in its element dtype: a lossless cast.
    dt = _SCALED_DTYPES[p.weight_format]
    w = q.qvalue if q.qvalue.dtype == dt else q.values().astype(dt)
    b = jnp.moveaxis(w, wc[0], -1)[None]
    sb = jnp.moveaxis(q.scale, wc[0], -1)[None]
    return a, b, sa, sb, lead


DEQUANTIZE_DOT = DequantizeDot()
MX_EMULATED = MXEmulated()
SCALED_MATMUL = ScaledMatmul()
DECODED_DOT = DecodedDot()
TWO_LEVEL_INT8 = TwoLevelInt8()
INT32_DOT = Int32Dot()
INT32_DOT_PADDED = Int32Dot(pad_single_row=True)
BF16_DOT = Bf16Dot()
DECODED_F32_DOT = DecodedF32Dot()
SIMULATED_W8A8 = SimulatedW8A8()
LLM_INT8 = LlmInt8()
GGUF_Q8 = GGUFQ8()

ALL = (
    DEQUANTIZE_DOT,
    DECODED_DOT,
    TWO_LEVEL_INT8,
    INT32_DOT,
    INT32_DOT_PADDED,
    BF16_DOT,
    DECODED_F32_DOT,
    SIMULATED_W8A8,
    LLM_INT8,
    GGUF_Q8,
    MX_EMULATED,
    SCALED_MATMUL,
)
