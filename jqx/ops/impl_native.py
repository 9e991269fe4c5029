"""The native CPU kernels (``jqx.kernels.cpu.native``) as implementations (adapters).

``supports`` says which products a kernel can compute; whether the kernels are
available (built, loaded, not switched off by ``JQX_NATIVE=0``) and whether a product is
big enough to pay for them is the dispatcher's decision (``jqx.ops.dispatch``; see
docs/internals/dispatch.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jqx.core import formats as _formats
from jqx.core.qarray import QArray, fold_super_scale
from jqx.kernels.cpu import native as _kernels
from jqx.ops.impl_xla import TWO_LEVEL_INT8, two_level_split
from jqx.ops.problem import Implementation, Problem, w8a8_product

_WIDENED = (np.dtype(np.float32), np.dtype(jnp.bfloat16), np.dtype(np.float16))


def _rows(x, xc: int, n: int, kernel) -> jax.Array:
    """``kernel`` on x as (rows, K), back in dot_general's output layout (x's free
    dims, then N)."""
    c = jnp.moveaxis(x, xc, -1)
    return kernel(c.reshape(-1, c.shape[-1])).reshape(*c.shape[:-1], n)


def _kernel_scale(scale: jax.Array, read: tuple) -> jax.Array:
    """Block scales as a decode kernel reads them: in a dtype of ``read`` (the kernel's
    ``*_SCALE_DTYPES``) as stored, widened in the kernel; any other widened to float32
    here."""
    if jnp.dtype(scale.dtype) in [jnp.dtype(d) for d in read]:
        return scale
    return scale.astype(jnp.float32)


def column_scales(q: QArray) -> jax.Array:
    """An int8 weight's per-column scales as the VNNI kernels take them
    (``native.w8a8_matmul_vnni``, ``two_level_matmul``, ``w8a8_mlp``): float32 (N,)."""
    n = q.shape[1]
    return jnp.broadcast_to(q.scale.astype(jnp.float32), (1, n)).reshape(n)


def _int8_gemm(codes, q: QArray, xc: int) -> jax.Array:
    """int32 ``codes . q.qvalue`` through the VNNI GEMM (``q``'s codes in either layout:
    the ``"vnni"`` panels skip the per-call packing)."""
    n = q.shape[1]
    return _rows(codes, xc, n, lambda c: _kernels.int8_matmul(c, q.qvalue, n=n))


class Int8Gemm(Implementation):
    """W8A8 int8 on the AVX512-VNNI int8 GEMM (exact int32 sums)."""

    name = "native.int8_gemm"
    layouts = ("plain", "vnni")

    def supports(self, p: Problem) -> bool:
        return p.int8_codes and p.plain and p.rows >= 1

    def run(self, x, q, p):
        xc = p.dimension_numbers[0][0][0]
        return w8a8_product(x, q, p, lambda codes: _int8_gemm(codes, q, xc).astype(jnp.float32))


class W8A8Fused(Implementation):
    """W8A8 int8 with the activation quantization inside the kernel (AVX2,
    ``native.w8a8_matmul``; with ``vnni=True`` the AVX512-VNNI GEMM's tiles,
    ``native.w8a8_matmul_vnni``): each row's scale, codes and exact int32 products in
    one pass over the row, rescaled as the XLA path rescales, so the result equals
    ``xla.int32_dot``'s bit for bit (finite activations)."""

    def __init__(self, vnni: bool = False):
        self.vnni = vnni
        self.name = "native.w8a8_vnni" if vnni else "native.w8a8_fused"
        # The VNNI call takes the weight packed ahead; the AVX2 one reads (K, N).
        self.layouts = ("plain", "vnni") if vnni else ("plain",)
        self.epilogue = vnni  # the VNNI kernel applies a bias and GELU as it stores

    def supports(self, p: Problem) -> bool:
        if not (p.int8_codes and p.plain and p.rows >= 1):
            return False
        if p.act_kind == "static":
            return True
        return p.act_kind == "dynamic" and p.act_granularity in ("per_token", "per_tensor")

    def run(self, x, q, p, **epilogue):  # epilogue: bias=, activation= (VNNI only)
        xc = p.dimension_numbers[0][0][0]
        n = q.shape[1]
        ws = column_scales(q)
        if p.act_kind == "static":
            act = q.act_scale.astype(jnp.float32).reshape(1)
        else:
            # Per tensor: the kernel's one scale over (rows, K) covers all of x.
            act = p.act_granularity

        matmul = _kernels.w8a8_matmul_vnni if self.vnni else _kernels.w8a8_matmul

        def kernel(rows):
            return matmul(rows.astype(jnp.float32), q.qvalue, ws, act=act, **epilogue)

        return _rows(x, xc, n, kernel).astype(p.out_dtype)


class TwoLevelInt8(Implementation):
    """int8 weight-only per channel: the two-level split of the activations (see
    ``impl_xla.two_level_split``) in XLA, both levels in one VNNI GEMM call (up to
    ``native_decode_rows`` code rows the GEMM reads a plain weight in place)."""

    name = "native.two_level_int8"
    layouts = ("plain", "vnni")

    def supports(self, p: Problem) -> bool:
        return TWO_LEVEL_INT8.supports(p) and p.plain and p.rows >= 1

    def run(self, x, q, p):
        xc = p.dimension_numbers[0][0][0]

        def int_dot(both, _dn):
            # ``both`` stacks the two levels in front of x's dims: x's axis moved by one.
            return _int8_gemm(both, q, xc + 1).astype(jnp.float32)

        return two_level_split(x, q, p, int_dot)


class TwoLevelVnni(TwoLevelInt8):
    """The two-level split inside the VNNI kernel (``native.two_level_matmul``): each
    row split, both levels' exact int32 sums and the rescale in one pass over the
    row, so the result equals ``xla.two_level_int8``'s (and ``native.two_level_int8``'s)
    bit for bit. A plain weight is packed per call."""

    name = "native.two_level_vnni"
    epilogue = True  # a bias and GELU as the kernel stores

    def run(self, x, q, p, **epilogue):  # epilogue: bias=, activation=
        xc = p.dimension_numbers[0][0][0]
        n = q.shape[1]
        ws = column_scales(q)

        def kernel(rows):
            return _kernels.two_level_matmul(rows.astype(jnp.float32), q.qvalue, ws, **epilogue)

        return _rows(x, xc, n, kernel).astype(p.out_dtype)


class W4(Implementation):
    """Packed 4-bit weight-only (any 4-bit format, grouped along K) for up to
    ``W4_MAX_ROWS`` rows, read in place. bf16/f16 activations are widened to f32
    (exact); the weight is then not rounded to 16 bits, so the result is closer to
    ``x . W`` than a 16-bit XLA dot."""

    name = "native.w4"

    def supports(self, p: Problem) -> bool:
        # An in_scale (AWQ's) has already divided x when run is called (Problem).
        if p.kind != "weight_only" or not p.plain:
            return False
        fmt = p.fmt
        if not (fmt.packed and fmt.bits == 4) or p.compute_dtype not in _WIDENED:
            return False
        k, n = p.weight_shape
        g = p.block[0]
        if p.block[1] != 1 or k % g or p.scale_shape != (k // g, n):
            return False
        if p.zero_point and p.zero_shape != p.scale_shape:
            return False
        return 1 <= p.rows <= _kernels.W4_MAX_ROWS

    reads_super_scale = True

    def run(self, x, q, p):
        xc = p.dimension_numbers[0][0][0]
        n = q.shape[1]
        table = _formats.decode(jnp.arange(16, dtype=jnp.uint8), q.fmt, jnp.float32)
        zero = None if q.zero_point is None else q.zero_point.astype(jnp.float32)
        scale2 = None
        if q.super_scale is not None and q.super_block[0] == q.shape[0]:
            # NVFP4: E4M3 block scales read as stored, times the per-tensor scale (one,
            # or one per column of tensors stacked along N) in the kernel, rounded once
            # as QArray.dequantize's two-level scales.
            scale2 = q.super_scale.astype(jnp.float32)
            if scale2.size != 1:
                scale2 = jnp.repeat(scale2.reshape(-1), q.super_block[1])
        elif q.super_scale is not None:  # second-level blocks that split K: folded here
            q = fold_super_scale(q)
        scale = _kernel_scale(q.scale, _kernels.W4_SCALE_DTYPES)

        def kernel(rows):
            return _kernels.w4_matmul(
                rows.astype(jnp.float32),
                q.qvalue,
                table,
                scale,
                zero,
                n=n,
                group_size=q.block[0],
                scale2=scale2,
            )

        return _rows(x, xc, n, kernel).astype(p.out_dtype)


class Fp8WeightOnly(Implementation):
    """FP8 (E4M3 / E5M2) weight-only, per channel or grouped along K (MXFP8's E8M0
    scales read as stored, widened in the kernel), for up to ``W4_MAX_ROWS`` rows, read
    in place (``native.fp8_matmul``). bf16/f16 activations are widened to f32 (exact)."""

    name = "native.fp8"

    def supports(self, p: Problem) -> bool:
        # An in_scale has already divided x when run is called (Problem).
        if p.kind != "weight_only" or not p.plain or p.zero_shape is not None:
            return False
        if p.weight_format not in ("fp8_e4m3", "fp8_e5m2") or p.compute_dtype not in _WIDENED:
            return False
        k, n = p.weight_shape
        g = p.block[0]
        if p.block[1] != 1 or k % g or p.scale_shape != (k // g, n):
            return False
        return 1 <= p.rows <= _kernels.W4_MAX_ROWS

    def run(self, x, q, p):
        xc = p.dimension_numbers[0][0][0]
        n = q.shape[1]
        scale = _kernel_scale(q.scale, _kernels.FP8_SCALE_DTYPES)

        def kernel(rows):
            return _kernels.fp8_matmul(
                rows.astype(jnp.float32), q.qvalue, scale, group_size=q.block[0]
            )

        return _rows(x, xc, n, kernel).astype(p.out_dtype)


# LLM.int8() at decode sizes gathers the rows of at most this many outlier features for
# the 16-bit product (more: the dense product over all K, as XLA's path).
LLM_INT8_MAX_OUTLIERS = 32


class LlmInt8Decode(Implementation):
    """LLM.int8() for up to ``W4_MAX_ROWS`` rows: the int8 part on the VNNI GEMM (the
    XLA path's codes, its exact int32 sums and rescale: bit-identical), the outlier part
    over the gathered rows of the outlier features only (at most
    ``LLM_INT8_MAX_OUTLIERS``, else over all K) instead of a 16-bit product with the
    whole dequantized weight (:func:`jqx.recipes.llm_int8.llm_int8_matmul`)."""

    name = "native.llm_int8"

    def supports(self, p: Problem) -> bool:
        if p.kind != "llm_int8" or not p.plain or p.compute_dtype not in _WIDENED:
            return False
        (xc, wc), (xb, wb) = p.dimension_numbers
        if xb or wb or len(xc) != 1 or tuple(wc) != (0,) or len(p.weight_shape) != 2:
            return False
        return 1 <= p.rows <= _kernels.W4_MAX_ROWS

    def run(self, x, q, p):
        from jqx.recipes.llm_int8 import llm_int8_matmul  # noqa: PLC0415

        xc = p.dimension_numbers[0][0][0]
        n = q.shape[1]
        return llm_int8_matmul(
            jnp.moveaxis(x, xc, -1),
            q,
            out_dtype=p.out_dtype,
            int8_dot=lambda codes: _kernels.int8_matmul(codes, q.qvalue, n=n),
            max_outliers=LLM_INT8_MAX_OUTLIERS,
        )


class GGUFBlocks(Implementation):
    """GGUF block layouts (Q4_0, Q4_1, Q8_0: ``W`` stored ``(N, K)`` with blocks of 32
    along K and float16 scales, used as ``x @ W.T``) on the AVX2 kernels, for up to
    ``GGUF_MAX_ROWS`` rows (decode). Weight-only (``q8=False``): ``x`` stays float32,
    per block the kernel sums ``q * x``, then applies the block's scale (and minimum).
    ``q8=True`` (problems of kind ``gguf_q8``): ``x`` rounded per block of 32 as
    llama.cpp rounds it, integer dot products per block, float32 across blocks."""

    def __init__(self, q8: bool):
        self.q8 = q8
        self.name = "native.gguf_q8" if q8 else "native.gguf"

    def supports(self, p: Problem) -> bool:
        if p.gguf_kind is None or (p.kind == "gguf_q8") != self.q8:
            return False
        if p.compute_dtype not in _WIDENED:
            return False
        (xc, wc), (xb, wb) = p.dimension_numbers
        if xb or wb or len(xc) != 1 or tuple(wc) != (1,):
            return False
        return 1 <= p.rows <= _kernels.GGUF_MAX_ROWS

    def run(self, x, q, p):
        xc = p.dimension_numbers[0][0][0]
        minimum = q.zero_point if p.gguf_kind == "Q4_1" else None
        matmul = _kernels.gguf_matmul_q8 if self.q8 else _kernels.gguf_matmul

        def kernel(rows):
            return matmul(rows.astype(jnp.float32), q.qvalue, q.scale, minimum, kind=p.gguf_kind)

        return _rows(x, xc, q.shape[0], kernel).astype(p.out_dtype)


INT8_GEMM = Int8Gemm()
W8A8_FUSED = W8A8Fused()  # in conv_int8.cc's AVX2 library: its own availability, not in ALL
W8A8_VNNI = W8A8Fused(vnni=True)  # in int8_gemm.cc, with INT8_GEMM
TWO_LEVEL = TwoLevelInt8()
TWO_LEVEL_VNNI = TwoLevelVnni()  # in int8_gemm.cc, with INT8_GEMM
W4_DECODE = W4()
FP8_DECODE = Fp8WeightOnly()
LLM_INT8_DECODE = LlmInt8Decode()
GGUF_BLOCKS = GGUFBlocks(q8=False)
GGUF_BLOCKS_Q8 = GGUFBlocks(q8=True)

ALL = (
    INT8_GEMM,
    TWO_LEVEL,
    W4_DECODE,
    FP8_DECODE,
    LLM_INT8_DECODE,
)  # backend="native": the first that supports
# The AVX2 kernel has its own availability (it needs no AVX512): kept apart from ALL.
GGUF = (GGUF_BLOCKS, GGUF_BLOCKS_Q8)
