"""W8A8: int8 x int8 -> int32 matmul with scales in the epilogue (Pallas/Triton).

``int8_matmul`` takes already-quantized activations; ``int8_matmul_dynamic`` quantizes
bf16/f16/f32 activations per token (absmax -> scale -> int8, ties to even) with a
prologue kernel: one program per block of rows streams its rows once to find the absmax
and writes int8 codes (half the bytes of bf16) plus the (M, 1) scale, so the activations
are read from HBM once in high precision and the scale is never a separate XLA pass.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from . import _common as c

_OUT_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
_X_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
INT8_QMAX = 127


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of :func:`int8_matmul` (all powers of two >= 16).

    Attributes:
      block_m: rows per program (M is masked, not padded).
      block_n: columns per program (N is masked).
      block_k: reduction tile (K is masked).
      num_warps: Triton warps per program.
      num_stages: Triton pipelining stages.
      quant_block_m: rows per program of the activation quantizer (dynamic variant).
      quant_block_k: columns streamed per step by the quantizer.
    """

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    num_warps: int = 8
    num_stages: int = 3
    quant_block_m: int = 16
    quant_block_k: int = 512

    @classmethod
    def get_default(cls, m: int, k: int, n: int) -> BlockSizes:
        """Heuristic defaults (not tuned: one H200 run measured them, docs/benchmarks/gpu.md).

        Example:
            >>> BlockSizes.get_default(1024, 4096, 4096).block_m
            128
        """
        bm = min(max(c.next_pow2(m), 16), 128)
        bn = min(128, max(16, c.next_pow2(n)))
        bk = min(128 if m <= 64 else 64, max(16, c.next_pow2(k)))
        return cls(
            block_m=bm,
            block_n=bn,
            block_k=bk,
            num_warps=4 if bm <= 32 else 8,
            num_stages=3,
            quant_block_m=16,
            quant_block_k=min(512, max(16, c.next_pow2(k))),
        )


def _check_blocks(bs: BlockSizes) -> None:
    for name in ("block_m", "block_n", "block_k", "quant_block_m", "quant_block_k"):
        c.check_block(f"block_sizes.{name}", getattr(bs, name))


def _as_bias(bias, n):
    if bias is None:
        return None
    c.require_dtype("bias", bias.dtype, (jnp.float32, jnp.bfloat16, jnp.float16))
    if bias.shape not in ((n,), (1, n)):
        raise ValueError(f"bias has shape {bias.shape}; expected ({n},) or (1, {n}).")
    return bias.reshape(1, n).astype(jnp.float32)


def int8_matmul(
    x_q: jax.Array,
    w_q: jax.Array,
    x_scale: jax.Array,
    w_scale: jax.Array,
    bias: jax.Array | None = None,
    *,
    out_dtype: jnp.dtype = jnp.bfloat16,
    block_sizes: BlockSizes | None = None,
    interpret: bool | None = None,
    w_layout: Literal["kn", "nk"] = "kn",
) -> jax.Array:
    """``(x_q @ w_q) * x_scale * w_scale + bias`` with int32 accumulation.

    Shapes: any M, K, N; all edges are masked in the kernel (zero fill), nothing padded.

    Precision: the int8 products are summed exactly in int32 (no overflow for K < 2**17);
    the epilogue converts to f32, multiplies by both scales and adds the bias in f32, then
    casts once to ``out_dtype``.

    Args:
      x_q: (M, K) int8 activations.
      w_q: (K, N) int8 weights.
      x_scale: per-token (M, 1) or (M,) scale, or a per-tensor scalar; f32/bf16/f16.
      w_scale: per-channel (1, N) or (N,) scale, or a per-tensor scalar.
      bias: optional (N,) or (1, N).
      out_dtype: bfloat16, float16 or float32.
      block_sizes: tiles; defaults from :meth:`BlockSizes.get_default`.
      interpret: None = interpret mode off-GPU, native Triton on GPU.
      w_layout: ``"kn"``: w_q is (K, N); ``"nk"``: w_q is (N, K), K contiguous (what
        Hopper's 8-bit tensor-core instructions read without a transpose).

    Returns:
      (M, N) array of ``out_dtype``.

    Raises:
      NotImplementedError: unsupported dtypes, scale layouts or block sizes.

    Example:
        >>> import jax.numpy as jnp
        >>> x = jnp.ones((2, 32), jnp.int8); w = jnp.full((32, 16), 2, jnp.int8)
        >>> int8_matmul(x, w, jnp.full((2, 1), 0.5), jnp.ones((16,)), out_dtype=jnp.float32)[0, 0]
        Array(32., dtype=float32)
    """
    c.require_dtype("x_q", x_q.dtype, (jnp.int8,))
    c.require_dtype("w_q", w_q.dtype, (jnp.int8,))
    c.require_dtype("out_dtype", out_dtype, _OUT_DTYPES)
    m, k, n = c.check_matmul_operands(x_q, w_q, "x_q", "w_q", w_layout)
    xs = c.as_row_scale("x_scale", x_scale, m)
    ws = c.as_col_scale("w_scale", w_scale, n)
    b = _as_bias(bias, n)
    bs = block_sizes or BlockSizes.get_default(m, k, n)
    _check_blocks(bs)
    kernel = functools.partial(
        c.scaled_matmul_kernel,
        m=m,
        k=k,
        n=n,
        bm=bs.block_m,
        bn=bs.block_n,
        bk=bs.block_k,
        acc_dtype=jnp.int32,
        has_bias=b is not None,
        w_nk=w_layout == "nk",
    )
    args = (x_q, w_q, xs, ws) + ((b,) if b is not None else ())
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        grid=(c.cdiv(m, bs.block_m), c.cdiv(n, bs.block_n)),
        interpret=c.resolve_interpret(interpret),
        compiler_params=c.compiler_params(bs.num_warps, bs.num_stages),
        name="int8_matmul",
    )(*args)


def _quantize_rows_kernel(x_ref, *out_refs, m, k, bm, bk, write_codes):
    if write_codes:
        q_ref, s_ref = out_refs
    else:
        (s_ref,) = out_refs
    i = pl.program_id(0)
    rows = i * bm + jnp.arange(bm)
    row_ok = rows < m
    mask_m, mask_k = m % bm != 0, k % bk != 0
    nk = c.cdiv(k, bk)

    def tile_mask(k0):
        if not (mask_m or mask_k):
            return None
        return row_ok[:, None] & ((k0 + jnp.arange(bk)) < k)[None, :]

    def load(t):
        msk = tile_mask(t * bk)
        x = pl_triton.load(
            x_ref.at[pl.ds(i * bm, bm), pl.ds(t * bk, bk)],
            mask=msk,
            other=None if msk is None else jnp.zeros((), x_ref.dtype),
        )
        return x.astype(jnp.float32), msk

    def amax_body(t, amax):
        x, _ = load(t)
        return jnp.maximum(amax, jnp.max(jnp.abs(x), axis=1))

    amax = lax.fori_loop(0, nk, amax_body, jnp.zeros((bm,), jnp.float32))
    # An all-zero row gets scale 1 (finite; it reconstructs exactly).
    scale = jnp.where(amax == 0.0, 1.0, amax / INT8_QMAX)

    def quant_body(t, carry):
        x, msk = load(t)
        q = c.round_half_even(x / scale[:, None])
        q = jnp.clip(q, -INT8_QMAX, INT8_QMAX).astype(jnp.int8)
        pl_triton.store(q_ref.at[pl.ds(i * bm, bm), pl.ds(t * bk, bk)], q, mask=msk)
        return carry

    if write_codes:
        lax.fori_loop(0, nk, quant_body, 0)
    pl_triton.store(
        s_ref.at[pl.ds(i * bm, bm), pl.ds(0, 1)],
        scale[:, None],
        mask=row_ok[:, None] if mask_m else None,
    )


def quantize_rows(
    x: jax.Array, *, block_sizes: BlockSizes | None = None, interpret: bool | None = None
) -> tuple[jax.Array, jax.Array]:
    """Per-token absmax int8 quantization of (M, K) activations as one Pallas kernel.

    ``scale = max|x_row| / 127`` (1.0 for an all-zero row), ``q = clip(round(x / scale),
    -127, 127)`` rounding ties to even. Each program streams its block of rows twice
    (absmax, then quantize); the second read is served from L2 for tiles this size.

    Args:
      x: (M, K) bfloat16, float16 or float32.
      block_sizes: uses ``quant_block_m``/``quant_block_k``.
      interpret: None = interpret mode off-GPU, native Triton on GPU.

    Returns:
      ``(q, scale)``: (M, K) int8 and (M, 1) float32.

    Example:
        >>> import jax.numpy as jnp
        >>> q, s = quantize_rows(jnp.array([[1.0, -2.0]], jnp.float32))
        >>> q.tolist(), round(float(s[0, 0]) * 127, 6)
        ([[64, -127]], 2.0)
    """
    if x.ndim != 2:
        raise NotImplementedError(f"x has shape {x.shape}; quantize_rows takes (M, K).")
    c.require_dtype("x", x.dtype, _X_DTYPES)
    m, k = x.shape
    bs = block_sizes or BlockSizes.get_default(m, k, 128)
    _check_blocks(bs)
    return _row_quantizer_call(x, bs, interpret, write_codes=True)


def _row_quantizer_call(x, bs, interpret, *, write_codes):
    m, k = x.shape
    kernel = functools.partial(
        _quantize_rows_kernel,
        m=m,
        k=k,
        bm=bs.quant_block_m,
        bk=bs.quant_block_k,
        write_codes=write_codes,
    )
    scale_shape = jax.ShapeDtypeStruct((m, 1), jnp.float32)
    out_shape = (jax.ShapeDtypeStruct((m, k), jnp.int8), scale_shape)
    return pl.pallas_call(
        kernel,
        out_shape=out_shape if write_codes else scale_shape,
        grid=(c.cdiv(m, bs.quant_block_m),),
        interpret=c.resolve_interpret(interpret),
        compiler_params=c.compiler_params(4, 2),
        name="int8_quantize_rows" if write_codes else "int8_row_scales",
    )(x)


def int8_matmul_dynamic(
    x: jax.Array,
    w_q: jax.Array,
    w_scale: jax.Array,
    bias: jax.Array | None = None,
    *,
    out_dtype: jnp.dtype = jnp.bfloat16,
    block_sizes: BlockSizes | None = None,
    interpret: bool | None = None,
    fuse: Literal["prologue", "inline"] = "prologue",
    w_layout: Literal["kn", "nk"] = "kn",
) -> jax.Array:
    """W8A8 with dynamic per-token activation quantization, two ways (``fuse``):

    - ``"prologue"``: :func:`quantize_rows` (one Pallas kernel: absmax and int8 codes, x
      read from HBM once in high precision) then :func:`int8_matmul` on the int8 codes.
    - ``"inline"``: a scale-only kernel (absmax per row, writes M floats), then the matmul
      reads x in high precision and quantizes each tile in registers before the int8 dot,
      so the int8 activations never go to HBM (x tiles are re-read per N tile, mostly
      from L2). Which is faster per shape is for the GPU benchmark to say.

    Both give bit-identical results.

    Precision: as :func:`int8_matmul`, plus the activation rounding error (at most half a
    step, ``max|x_row| / 254``, per element).

    Args:
      x: (M, K) bfloat16, float16 or float32 activations.
      w_q: (K, N) int8 weights.
      w_scale: per-channel (1, N) or (N,) scale, or per-tensor.
      bias: optional (N,) or (1, N).
      out_dtype: bfloat16, float16 or float32.
      block_sizes: tiles for both kernels.
      interpret: None = interpret mode off-GPU, native Triton on GPU.
      w_layout: ``"kn"``: w_q is (K, N); ``"nk"``: w_q is (N, K), K contiguous (what
        Hopper's 8-bit tensor-core instructions read without a transpose).
      fuse: ``"prologue"`` or ``"inline"`` (see above).

    Returns:
      (M, N) array of ``out_dtype``.

    Raises:
      NotImplementedError: unsupported dtypes, scale layouts, block sizes or ``fuse``.

    Example:
        >>> import jax.numpy as jnp
        >>> x = jnp.ones((2, 32), jnp.bfloat16); w = jnp.full((32, 16), 2, jnp.int8)
        >>> int8_matmul_dynamic(x, w, jnp.ones((16,)), out_dtype=jnp.float32)[0, 0]
        Array(64., dtype=float32)
    """
    c.require_dtype("x", x.dtype, _X_DTYPES)
    c.require_dtype("w_q", w_q.dtype, (jnp.int8,))
    m, k, n = c.check_matmul_operands(x, w_q, "x", "w_q", w_layout)
    bs = block_sizes or BlockSizes.get_default(m, k, n)
    if fuse == "prologue":
        x_q, x_scale = quantize_rows(x, block_sizes=bs, interpret=interpret)
        return int8_matmul(
            x_q,
            w_q,
            x_scale,
            w_scale,
            bias,
            out_dtype=out_dtype,
            block_sizes=bs,
            interpret=interpret,
            w_layout=w_layout,
        )
    if fuse != "inline":
        raise NotImplementedError(f"fuse={fuse!r} is not supported; use 'prologue' or 'inline'.")
    c.require_dtype("out_dtype", out_dtype, _OUT_DTYPES)
    _check_blocks(bs)
    x_scale = _row_quantizer_call(x, bs, interpret, write_codes=False)
    ws = c.as_col_scale("w_scale", w_scale, n)
    b = _as_bias(bias, n)
    kernel = functools.partial(
        c.scaled_matmul_kernel,
        m=m,
        k=k,
        n=n,
        bm=bs.block_m,
        bn=bs.block_n,
        bk=bs.block_k,
        acc_dtype=jnp.int32,
        has_bias=b is not None,
        w_nk=w_layout == "nk",
        quantize_x=True,
    )
    args = (x, w_q, x_scale, ws) + ((b,) if b is not None else ())
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        grid=(c.cdiv(m, bs.block_m), c.cdiv(n, bs.block_n)),
        interpret=c.resolve_interpret(interpret),
        compiler_params=c.compiler_params(bs.num_warps, bs.num_stages),
        name="int8_matmul_inline_quant",
    )(*args)


def quantize_rows_reference(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Plain-jnp per-token absmax int8 quantization (same formula as :func:`quantize_rows`).

    Example:
        >>> import jax.numpy as jnp
        >>> quantize_rows_reference(jnp.array([[1.0, -2.0]], jnp.float32))[0].tolist()
        [[64, -127]]
    """
    xf = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(xf), axis=1, keepdims=True)
    scale = jnp.where(amax == 0.0, 1.0, amax / INT8_QMAX)
    q = jnp.clip(jnp.round(xf / scale), -INT8_QMAX, INT8_QMAX).astype(jnp.int8)
    return q, scale


def int8_matmul_reference(
    x_q: jax.Array,
    w_q: jax.Array,
    x_scale: jax.Array,
    w_scale: jax.Array,
    bias: jax.Array | None = None,
    *,
    out_dtype: jnp.dtype = jnp.bfloat16,
    w_layout: Literal["kn", "nk"] = "kn",
) -> jax.Array:
    """Plain-jnp reference: exact int32 dot, then f32 scales and bias.

    Example:
        >>> import jax.numpy as jnp
        >>> x = jnp.ones((2, 32), jnp.int8); w = jnp.full((32, 16), 2, jnp.int8)
        >>> int8_matmul_reference(x, w, jnp.ones((2, 1)), jnp.ones((16,)),
        ...                       out_dtype=jnp.float32)[1, 3]
        Array(64., dtype=float32)
    """
    m, _, n = c.check_matmul_operands(x_q, w_q, "x_q", "w_q", w_layout)
    dims = (((1,), (0,)) if w_layout == "kn" else ((1,), (1,)), ((), ()))
    acc = lax.dot_general(x_q, w_q, dims, preferred_element_type=jnp.int32)
    out = acc.astype(jnp.float32) * c.as_row_scale("x_scale", x_scale, m)
    out = out * c.as_col_scale("w_scale", w_scale, n)
    if bias is not None:
        out = out + _as_bias(bias, n)
    return out.astype(out_dtype)


def int8_matmul_dynamic_reference(
    x: jax.Array,
    w_q: jax.Array,
    w_scale: jax.Array,
    bias: jax.Array | None = None,
    *,
    out_dtype: jnp.dtype = jnp.bfloat16,
    w_layout: Literal["kn", "nk"] = "kn",
) -> jax.Array:
    """Plain-jnp reference of :func:`int8_matmul_dynamic`.

    Example:
        >>> import jax.numpy as jnp
        >>> x = jnp.ones((2, 32), jnp.float32); w = jnp.full((32, 16), 2, jnp.int8)
        >>> int8_matmul_dynamic_reference(x, w, jnp.ones((16,)), out_dtype=jnp.float32)[0, 0]
        Array(64., dtype=float32)
    """
    x_q, x_scale = quantize_rows_reference(x)
    return int8_matmul_reference(
        x_q, w_q, x_scale, w_scale, bias, out_dtype=out_dtype, w_layout=w_layout
    )
