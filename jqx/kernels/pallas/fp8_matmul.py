"""FP8: E4M3 x E4M3 matmul with f32 accumulation and scales in the epilogue (Pallas/Triton).

On Hopper (sm_90) Triton issues fp8 tensor-core MMAs for this dot; older GPUs without
fp8 MMA will fail at Triton compile time, so dispatch only picks it where measured.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from . import _common as c

_OUT_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
FP8_DTYPES = (jnp.float8_e4m3fn,)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of :func:`fp8_matmul` (all powers of two >= 16).

    Attributes:
      block_m: rows per program (M is masked, not padded).
      block_n: columns per program (N is masked).
      block_k: reduction tile (K is masked).
      num_warps: Triton warps per program.
      num_stages: Triton pipelining stages.
    """

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    num_warps: int = 8
    num_stages: int = 3

    @classmethod
    def get_default(cls, m: int, k: int, n: int) -> BlockSizes:
        """Heuristic defaults (not tuned: one H200 run measured them, docs/benchmarks/gpu.md).

        Example:
            >>> BlockSizes.get_default(1, 4096, 4096).block_m
            16
        """
        bm = min(max(c.next_pow2(m), 16), 128)
        bn = min(128, max(16, c.next_pow2(n)))
        bk = min(128 if m <= 64 else 64, max(32, c.next_pow2(k)))
        return cls(block_m=bm, block_n=bn, block_k=bk, num_warps=4 if bm <= 32 else 8, num_stages=3)


def fp8_matmul(
    x_q: jax.Array,
    w_q: jax.Array,
    x_scale: jax.Array,
    w_scale: jax.Array,
    *,
    out_dtype: jnp.dtype = jnp.bfloat16,
    block_sizes: BlockSizes | None = None,
    interpret: bool | None = None,
    w_layout: Literal["kn", "nk"] = "kn",
) -> jax.Array:
    """``(x_q @ w_q) * x_scale * w_scale`` for float8_e4m3fn operands.

    Shapes: any M, K, N; all edges are masked in the kernel (zero fill), nothing padded.

    Precision: the E4M3 products are exact in the tensor core and summed in f32 (Hopper's
    fp8 MMA accumulates with reduced internal precision, about 2**-13 relative per
    K-tile, like every fp8 GEMM on that chip); scales are applied in f32 once per
    output element, then one cast to ``out_dtype``.

    Args:
      x_q: (M, K) float8_e4m3fn activations.
      w_q: (K, N) float8_e4m3fn weights.
      x_scale: per-tensor (scalar, (1,), (1, 1)) or per-row (M,)/(M, 1); f32/bf16/f16.
      w_scale: per-tensor or per-column (N,)/(1, N).
      out_dtype: bfloat16, float16 or float32.
      block_sizes: tiles; defaults from :meth:`BlockSizes.get_default`.
      interpret: None = interpret mode off-GPU, native Triton on GPU.
      w_layout: ``"kn"``: w_q is (K, N); ``"nk"``: w_q is (N, K), K contiguous (what
        Hopper's 8-bit tensor-core instructions read without a transpose).

    Returns:
      (M, N) array of ``out_dtype``.

    Raises:
      NotImplementedError: operands not both float8_e4m3fn, bad scale layout or tiles.

    Example:
        >>> import jax.numpy as jnp
        >>> x = jnp.ones((2, 32), jnp.float8_e4m3fn); w = jnp.ones((32, 16), jnp.float8_e4m3fn)
        >>> fp8_matmul(x, w, jnp.float32(0.5), jnp.float32(2.0), out_dtype=jnp.float32)[0, 0]
        Array(32., dtype=float32)
    """
    c.require_dtype("x_q", x_q.dtype, FP8_DTYPES)
    c.require_dtype("w_q", w_q.dtype, FP8_DTYPES)
    c.require_dtype("out_dtype", out_dtype, _OUT_DTYPES)
    m, k, n = c.check_matmul_operands(x_q, w_q, "x_q", "w_q", w_layout)
    xs = c.as_row_scale("x_scale", x_scale, m)
    ws = c.as_col_scale("w_scale", w_scale, n)
    bs = block_sizes or BlockSizes.get_default(m, k, n)
    for name in ("block_m", "block_n", "block_k"):
        c.check_block(f"block_sizes.{name}", getattr(bs, name))
    kernel = functools.partial(
        c.scaled_matmul_kernel,
        m=m,
        k=k,
        n=n,
        bm=bs.block_m,
        bn=bs.block_n,
        bk=bs.block_k,
        acc_dtype=jnp.float32,
        has_bias=False,
        w_nk=w_layout == "nk",
    )
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        grid=(c.cdiv(m, bs.block_m), c.cdiv(n, bs.block_n)),
        interpret=c.resolve_interpret(interpret),
        compiler_params=c.compiler_params(bs.num_warps, bs.num_stages),
        name="fp8_matmul",
    )(x_q, w_q, xs, ws)


def fp8_matmul_reference(
    x_q: jax.Array,
    w_q: jax.Array,
    x_scale: jax.Array,
    w_scale: jax.Array,
    *,
    out_dtype: jnp.dtype = jnp.bfloat16,
    w_layout: Literal["kn", "nk"] = "kn",
) -> jax.Array:
    """Plain-jnp reference: upcast the codes to f32, HIGHEST-precision dot, f32 scales.

    Example:
        >>> import jax.numpy as jnp
        >>> x = jnp.ones((2, 32), jnp.float8_e4m3fn); w = jnp.ones((32, 16), jnp.float8_e4m3fn)
        >>> fp8_matmul_reference(x, w, jnp.float32(1), jnp.float32(1), out_dtype=jnp.float32)[0, 0]
        Array(32., dtype=float32)
    """
    m, _, n = c.check_matmul_operands(x_q, w_q, "x_q", "w_q", w_layout)
    w = w_q.astype(jnp.float32)
    acc = jnp.dot(x_q.astype(jnp.float32), w if w_layout == "kn" else w.T, precision="highest")
    out = acc * c.as_row_scale("x_scale", x_scale, m) * c.as_col_scale("w_scale", w_scale, n)
    return out.astype(out_dtype)
