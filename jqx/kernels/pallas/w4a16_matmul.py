"""W4A16: bf16/f16 activations x 4-bit weights, scaled after the tile's dot (Pallas/Triton).

Weight layout is jqx's QArray layout, used as is (no weight preparation step): a (K, N)
weight is stored as ``packed_w`` (K, ceil(N/2)) uint8, two codes per byte along N (the
last axis), low nibble = even column. Codes are uint4 0..15 with group-wise zero points,
``w = (code - zero) * scale``, or two's-complement int4 nibbles (``signed=True``, no zero
point). ``scales``/``zeros`` are (K // group_size, N).

In the tile, the packed (block_k, block_n/2) bytes are split into low and high nibbles,
and each half is multiplied with x as it is: the codes are small integers, exact in x's
dtype, so ``tl.dot`` computes ``x @ codes`` with no rounding of the weight, accumulating
in f32. The group's scale and zero point are then applied to the (block_m, block_n/2)
f32 partial sums, ``(x @ c) * s - sum(x) * (z * s)``, instead of to every weight
element. The low half gives the even output columns and the high half the odd ones,
interleaved once per output tile instead of once per weight tile. (Until the first
GPU timings, the tile dequantized every weight to x's dtype and interleaved the nibbles
with a join: 0.8-0.96x the bf16 dot at decode sizes on an H200,
docs/benchmarks/gpu.md.)
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from . import _common as c

_X_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
_SCALE_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
_OUT_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes and launch parameters of :func:`w4a16_matmul`.

    Attributes:
      block_m: rows of x per program (power of two >= 16; M is masked, never padded).
      block_n: output columns per program (power of two >= 32: each nibble half feeds a
        dot of block_n / 2 >= 16 columns).
      block_k: reduction tile (power of two >= 16); it must divide ``group_size`` or be a
        multiple of it; a tile of several groups runs one dot per group.
      split_k: number of programs sharing one output tile's K range (partials in f32,
        summed by XLA); more parallelism for decode-sized M.
      num_warps: Triton warps per program.
      num_stages: Triton software-pipelining stages.
    """

    block_m: int = 16
    block_n: int = 64
    block_k: int = 128
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3

    @classmethod
    def get_default(cls, m: int, k: int, n: int, group_size: int) -> BlockSizes:
        """Defaults from the H200 tile sweep (docs/benchmarks/gpu.md).

        Decode rows (M <= 16) stream the weight: 128-column tiles split four ways along
        K (the fastest of nine tilings at K = N = 4096 and 8192, M = 1 and 16: more
        programs keep more loads in flight). Larger M takes taller tiles and splits K
        only while there are fewer than 128 programs.

        Example:
            >>> BlockSizes.get_default(1, 4096, 4096, 128)
            BlockSizes(block_m=16, block_n=128, block_k=128, split_k=4, num_warps=4, num_stages=3)
        """
        bm = min(max(c.next_pow2(m), 16), 128)
        bn = 128 if m <= 16 else (64 if m <= 64 else 128)
        bn = min(bn, max(32, c.next_pow2(n)))
        bk = _pick_block_k(128 if m <= 64 else 64, group_size, k)
        n_tiles = c.cdiv(m, bm) * c.cdiv(n, bn)
        nk = c.cdiv(k, bk)
        split = 1
        if m <= 16:
            while split < 4 and nk % (2 * split) == 0:
                split *= 2
        else:
            while n_tiles * split < 128 and nk % (2 * split) == 0 and split < 8:
                split *= 2
        return cls(
            block_m=bm,
            block_n=bn,
            block_k=bk,
            split_k=split,
            num_warps=4 if m <= 64 else 8,
            num_stages=3,
        )


def _pick_block_k(pref: int, group_size: int, k: int) -> int:
    if c.is_pow2(group_size):
        return min(pref, max(16, c.next_pow2(k)))
    # Non-power-of-two group (e.g. per-channel, group_size == K): largest dividing tile.
    return c.largest_pow2_divisor(group_size, pref)


def _w4a16_kernel(
    x_ref,
    w_ref,
    s_ref,
    *rest,
    m,
    k,
    n,
    n_packed,
    group_size,
    signed,
    has_zeros,
    bm,
    bn,
    bk,
    nk_per_split,
    split_k,
    dot_precision,
):
    """One (bm, bn) output tile: the even (low-nibble) and odd (high-nibble) columns are
    two (bm, bn/2) accumulators, each fed by a dot of x with the raw codes of one nibble
    (small integers, exact in x's dtype); the group's scale and zero point are applied to
    the dot's f32 result, ``(x @ c) * s - sum(x) * (z * s)``, not to every weight. The two
    halves are interleaved back into output columns once, at the store."""
    if has_zeros:
        z_ref, o_ref = rest
    else:
        (o_ref,) = rest
    i = pl.program_id(0)
    j = pl.program_id(1)
    s_id = pl.program_id(2)
    half = bn // 2
    n_groups = k // group_size
    # Depth of one dot: a whole group or a part of one, so a dot sees a single scale row.
    sk = min(bk, group_size)
    n_sub = bk // sk
    mask_m = m % bm != 0
    mask_n = n % bn != 0 or n_packed * 2 != n
    mask_k = k % bk != 0

    rows = i * bm + jnp.arange(bm)
    cols = j * bn + jnp.arange(bn)
    pcols = j * half + jnp.arange(half)
    row_ok = rows < m
    col_ok = cols < n
    pcol_ok = pcols < n_packed
    f32 = jnp.float32

    def group_rows(ref, g):
        """Group ``g``'s scales (or zeros) for the even and the odd columns, (1, half) f32
        each: one contiguous (1, bn) load, split in registers."""
        msk = None
        if mask_n or mask_k:
            msk = col_ok[None, :]
            if mask_k:
                msk = msk & (g < n_groups)
        v = pl_triton.load(
            ref.at[pl.ds(g, 1), pl.ds(j * bn, bn)],
            mask=msk,
            other=0.0 if msk is not None else None,
        )
        return jnp.unstack(v.astype(f32).reshape(1, half, 2), axis=-1)

    def body(t, carry):
        acc_lo, acc_hi = carry
        for u in range(n_sub):
            k0 = (s_id * nk_per_split + t) * bk + u * sk
            k_ok = (k0 + jnp.arange(sk)) < k
            xmask = None
            if mask_m or mask_k:
                xmask = row_ok[:, None] & k_ok[None, :]
            x = pl_triton.load(
                x_ref.at[pl.ds(i * bm, bm), pl.ds(k0, sk)],
                mask=xmask,
                other=0 if xmask is not None else None,
            )
            wmask = None
            if mask_n or mask_k:
                wmask = k_ok[:, None] & pcol_ok[None, :]
            p = pl_triton.load(
                w_ref.at[pl.ds(k0, sk), pl.ds(j * half, half)],
                mask=wmask,
                other=0 if wmask is not None else None,
            )
            if signed:
                # Arithmetic shifts on int8 sign-extend the two's-complement nibbles.
                lo = (p << 4).astype(jnp.int8) >> 4
                hi = p.astype(jnp.int8) >> 4
            else:
                lo = p & 0xF
                hi = p >> 4
            g = k0 // group_size
            s_lo, s_hi = group_rows(s_ref, g)
            dims = (((1,), (0,)), ((), ()))
            d_lo = lax.dot_general(
                x, lo.astype(x.dtype), dims, precision=dot_precision, preferred_element_type=f32
            )
            d_hi = lax.dot_general(
                x, hi.astype(x.dtype), dims, precision=dot_precision, preferred_element_type=f32
            )
            acc_lo = acc_lo + d_lo * s_lo
            acc_hi = acc_hi + d_hi * s_hi
            if has_zeros:
                xsum = jnp.sum(x.astype(f32), axis=1, keepdims=True)
                z_lo, z_hi = group_rows(z_ref, g)
                acc_lo = acc_lo - xsum * (z_lo * s_lo)
                acc_hi = acc_hi - xsum * (z_hi * s_hi)
        return acc_lo, acc_hi

    zero = jnp.zeros((bm, half), f32)
    acc_lo, acc_hi = lax.fori_loop(0, nk_per_split, body, (zero, zero))
    # Even and odd columns back in order, once per tile (a Triton join).
    out = jnp.stack([acc_lo, acc_hi], axis=-1).reshape(bm, bn)
    omask = None
    if mask_m or mask_n:
        omask = row_ok[:, None] & col_ok[None, :]
    if split_k == 1:
        pl_triton.store(
            o_ref.at[pl.ds(i * bm, bm), pl.ds(j * bn, bn)], out.astype(o_ref.dtype), mask=omask
        )
    else:
        pl_triton.store(o_ref.at[s_id, pl.ds(i * bm, bm), pl.ds(j * bn, bn)], out, mask=omask)


def _validate(x, packed_w, scales, zeros, group_size, signed, out_dtype):
    if x.ndim != 2:
        raise NotImplementedError(
            f"x has shape {x.shape}; w4a16_matmul takes a 2-D (M, K) activation. Reshape "
            "leading axes into M first."
        )
    c.require_dtype("x", x.dtype, _X_DTYPES)
    c.require_dtype("packed_w", packed_w.dtype, (jnp.uint8,))
    c.require_dtype("scales", scales.dtype, _SCALE_DTYPES)
    c.require_dtype("out_dtype", out_dtype, _OUT_DTYPES)
    m, k = x.shape
    if packed_w.ndim != 2 or packed_w.shape[0] != k:
        raise ValueError(
            f"packed_w has shape {packed_w.shape}; expected (K, ceil(N/2)) with K={k} from x "
            "(4-bit codes packed two per byte along N, as in jqx's QArray)."
        )
    if scales.ndim != 2:
        raise ValueError(f"scales has shape {scales.shape}; expected (K // group_size, N).")
    n = scales.shape[1]
    if packed_w.shape[1] != c.cdiv(n, 2):
        raise ValueError(
            f"packed_w has {packed_w.shape[1]} packed columns but scales has N={n} columns; "
            f"expected ceil(N/2)={c.cdiv(n, 2)}."
        )
    if not isinstance(group_size, int) or group_size <= 0 or k % group_size != 0:
        raise NotImplementedError(
            f"group_size={group_size!r} does not divide K={k}; supported: a positive divisor of "
            "K (32, 64, 128 are the tuned ones). Use backend='xla' for other layouts."
        )
    if not c.is_pow2(group_size) and c.largest_pow2_divisor(group_size, 128) < c.MIN_DOT_TILE:
        raise NotImplementedError(
            f"group_size={group_size} is not supported: it must be a power of two >= 16 or a "
            "multiple of 16 (e.g. per-channel with K % 16 == 0). Use backend='xla'."
        )
    if scales.shape[0] != k // group_size:
        raise ValueError(
            f"scales has shape {scales.shape}; expected ({k // group_size}, {n}) for K={k}, "
            f"group_size={group_size}."
        )
    if zeros is not None:
        if signed:
            raise NotImplementedError(
                "signed=True takes no zero points (int4 two's-complement codes are symmetric); "
                "pass zeros=None, or signed=False for uint4 codes with zero points."
            )
        if zeros.shape != scales.shape:
            raise ValueError(
                f"zeros has shape {zeros.shape}; expected scales' shape {scales.shape}."
            )
        c.require_dtype("zeros", zeros.dtype, _SCALE_DTYPES)
    return m, k, n


def w4a16_matmul(
    x: jax.Array,
    packed_w: jax.Array,
    scales: jax.Array,
    zeros: jax.Array | None = None,
    *,
    group_size: int,
    signed: bool = False,
    out_dtype: jnp.dtype | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """``x @ dequantize(W)`` with 4-bit weights decoded inside the Triton tile.

    Shapes: any M, K, N. M, N and K edges are **masked** in the kernel (nothing is
    padded, so the weights are never copied). ``K % group_size == 0``.

    Precision: the weight is never rounded. ``tl.dot`` multiplies x by the raw codes
    (exact in bf16/f16/f32) and accumulates in f32; each group's partial sum is then
    scaled in f32, ``(x @ c) * s - sum(x) * (z * s)``. So the result is the f32 product
    of x with the f32-dequantized weight, up to the order of the f32 sums (the
    reference below computes exactly that). For f32 activations the dot runs with
    ``precision=HIGHEST`` (IEEE f32, not TF32). With split-K, partial sums are f32 and
    added by XLA.

    Args:
      x: (M, K) activations, bfloat16, float16 or float32.
      packed_w: (K, ceil(N/2)) uint8, two codes per byte along N, low nibble = even column.
      scales: (K // group_size, N) float32/bfloat16/float16.
      zeros: optional zero points, same shape as ``scales`` (uint4 codes only).
      group_size: rows of K sharing one scale (32/64/128, or K for per-channel).
      signed: codes are two's-complement int4 nibbles (-8..7), no zero points.
      out_dtype: bfloat16, float16 or float32; defaults to x's dtype.
      block_sizes: tiles; defaults from :meth:`BlockSizes.get_default`.
      interpret: None = interpret mode off-GPU, native Triton on GPU.

    Returns:
      (M, N) array of ``out_dtype``.

    Raises:
      NotImplementedError: unsupported dtype, group size or block size (use XLA instead).

    Example:
        >>> import jax.numpy as jnp
        >>> x = jnp.ones((1, 64), jnp.bfloat16)
        >>> w = jnp.full((64, 8), 0x11, jnp.uint8)  # every code is 1
        >>> s = jnp.full((2, 16), 0.5, jnp.float32)
        >>> w4a16_matmul(x, w, s, group_size=32, out_dtype=jnp.float32)[0, :2]
        Array([32., 32.], dtype=float32)
    """
    out_dtype = jnp.dtype(x.dtype if out_dtype is None else out_dtype)
    m, k, n = _validate(x, packed_w, scales, zeros, group_size, signed, out_dtype)
    bs = block_sizes or BlockSizes.get_default(m, k, n, group_size)
    for name in ("block_m", "block_k"):
        c.check_block(f"block_sizes.{name}", getattr(bs, name))
    c.check_block("block_sizes.block_n", bs.block_n, minimum=2 * c.MIN_DOT_TILE)
    if not (
        group_size % bs.block_k == 0 or (bs.block_k % group_size == 0 and c.is_pow2(group_size))
    ):
        raise NotImplementedError(
            f"block_sizes.block_k={bs.block_k} with group_size={group_size}: block_k must divide "
            "group_size, or be a multiple of a power-of-two group_size."
        )
    nk = c.cdiv(k, bs.block_k)
    if bs.split_k < 1 or nk % bs.split_k != 0:
        raise NotImplementedError(
            f"block_sizes.split_k={bs.split_k} must be >= 1 and divide the {nk} K tiles."
        )
    interpret = c.resolve_interpret(interpret)
    dot_precision = lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    kernel = functools.partial(
        _w4a16_kernel,
        m=m,
        k=k,
        n=n,
        n_packed=packed_w.shape[1],
        group_size=group_size,
        signed=signed,
        has_zeros=zeros is not None,
        bm=bs.block_m,
        bn=bs.block_n,
        bk=bs.block_k,
        nk_per_split=nk // bs.split_k,
        split_k=bs.split_k,
        dot_precision=dot_precision,
    )
    grid = (c.cdiv(m, bs.block_m), c.cdiv(n, bs.block_n), bs.split_k)
    if bs.split_k == 1:
        out_shape = jax.ShapeDtypeStruct((m, n), out_dtype)
    else:
        out_shape = jax.ShapeDtypeStruct((bs.split_k, m, n), jnp.float32)
    args = (x, packed_w, scales) + ((zeros,) if zeros is not None else ())
    out = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=grid,
        interpret=interpret,
        compiler_params=c.compiler_params(bs.num_warps, bs.num_stages),
        name="w4a16_matmul",
    )(*args)
    if bs.split_k > 1:
        out = jnp.sum(out, axis=0).astype(out_dtype)
    return out


def w4a16_matmul_reference(
    x: jax.Array,
    packed_w: jax.Array,
    scales: jax.Array,
    zeros: jax.Array | None = None,
    *,
    group_size: int,
    signed: bool = False,
    out_dtype: jnp.dtype | None = None,
) -> jax.Array:
    """Plain-jnp reference with the kernel's arithmetic: the f32-dequantized weight times x
    in f32 (HIGHEST precision), rounded once to ``out_dtype``.

    Example:
        >>> import jax.numpy as jnp
        >>> x = jnp.ones((1, 64), jnp.bfloat16)
        >>> w = jnp.full((64, 8), 0x11, jnp.uint8)
        >>> s = jnp.full((2, 16), 0.5, jnp.float32)
        >>> w4a16_matmul_reference(x, w, s, group_size=32, out_dtype=jnp.float32)[0, 0]
        Array(32., dtype=float32)
    """
    out_dtype = jnp.dtype(x.dtype if out_dtype is None else out_dtype)
    w = dequantize_w4(packed_w, scales, zeros, group_size=group_size, signed=signed)
    y = jnp.dot(x.astype(jnp.float32), w, precision=lax.Precision.HIGHEST)
    return y.astype(out_dtype)


def dequantize_w4(
    packed_w: jax.Array,
    scales: jax.Array,
    zeros: jax.Array | None = None,
    *,
    group_size: int,
    signed: bool = False,
) -> jax.Array:
    """The f32 (K, N) weight that ``packed_w``/``scales``/``zeros`` encode (plain jnp).

    Example:
        >>> import jax.numpy as jnp
        >>> dequantize_w4(jnp.full((32, 1), 0x21, jnp.uint8), jnp.ones((1, 2)), group_size=32)[0]
        Array([1., 2.], dtype=float32)
    """
    n = scales.shape[1]
    p = packed_w.astype(jnp.int32)
    lo, hi = p & 0xF, (p >> 4) & 0xF
    if signed:
        lo, hi = (lo ^ 8) - 8, (hi ^ 8) - 8
    codes = jnp.stack([lo, hi], axis=-1).reshape(p.shape[0], -1)[:, :n].astype(jnp.float32)
    s = jnp.repeat(scales.astype(jnp.float32), group_size, axis=0)
    if zeros is not None:
        codes = codes - jnp.repeat(zeros.astype(jnp.float32), group_size, axis=0)
    return codes * s
