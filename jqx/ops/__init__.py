"""Quantized matmuls: ``jqx.ops.dot_general`` with QArray operands.

Same semantics as ``jax.lax.dot_general`` on the dequantized value (within
the quantization error), honouring the weight's activation spec ``q.act`` and
its ``in_scale``. The XLA formulation of each path was picked by measurement
on a 2-core XLA:CPU (``python benchmarks/ops.py``, see docs/sections/transform.md):

- weight-only, scale constant along the contraction (per output channel): the
  dot runs on the decoded codes (``codes - zero_point``, exact in the compute
  dtype) and the output columns are scaled afterwards;
- weight-only, group-wise (int4/uint4, fp4, nf4 groups along K):
  dequantize-then-dot; a grouped ``(G, M, g) x (G, g, N)`` dot followed by a
  scaled sum over G measured 4-5x slower at M >= 256 and no faster at small M;
- W8A8 int8 (dynamic, static, LLM.int8()): int8 x int8 -> int32
  ``dot_general`` (faster than the f32 dot for M >= 2; a single row is padded
  to two), rescaled in float32; from 1024 rows on (e.g. 32 x 128 tokens) the
  same int8 codes go through a bf16 x bf16 -> f32 dot instead (exact
  products, f32 accumulation): XLA:CPU's bf16 dot measured 10-30% faster
  than its int8 one at those sizes (``benchmarks/w8a8_profile.py``);
- W8A8 fp8: both operands' fp8 codes are exactly representable in bfloat16, so
  the dot runs in bfloat16 with float32 accumulation (exact products; measured
  ~2x faster than the f32 dot at M=256, while the native fp8 dot is no faster
  than f32);
- anything else (scales that vary along the contraction in a layout the fast
  paths do not cover): dequantize-then-dot, always correct.

``backend="pallas"`` sends 2-D matmuls to the kernels in ``pallas_kernels``
(imported lazily); a kernel raising NotImplementedError falls back to XLA.
``backend=None`` asks ``pallas_kernels.dispatch.choose`` on GPU and uses XLA on
CPU.

Example:
    >>> import jax.numpy as jnp, jqx
    >>> w = jqx.int8_weight_only().quantize_weight(jnp.ones((8, 4)))
    >>> DN = (((1,), (0,)), ((), ()))
    >>> jqx.ops.dot_general(jnp.ones((2, 8)), w, DN).tolist()[0]
    [8.0, 8.0, 8.0, 8.0]
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from jqx.core import formats as _formats
from jqx.core.numerics import quantize_activation
from jqx.core.qarray import QArray, is_qarray
from jqx.kernels.cpu import native as _native
from jqx.ops import pallas_table as _pallas_table

__all__ = ["dot_general", "dynamic_dot_general"]

_BACKENDS = (None, "xla", "pallas")


def dot_general(
    lhs,
    rhs,
    dimension_numbers,
    precision=None,
    preferred_element_type=None,
    *,
    backend: str | None = None,
) -> jax.Array:
    """``lax.dot_general`` where either operand may be a :class:`jqx.QArray`.

    Args:
      lhs, rhs: arrays or QArrays (usually the weight is ``rhs``, as in ``x @ W``).
      dimension_numbers: as for ``lax.dot_general``: ``((lhs_contract,
        rhs_contract), (lhs_batch, rhs_batch))``.
      precision: passed to the float dots.
      preferred_element_type: output dtype; default the float operand's dtype.
      backend: ``None`` (auto: XLA on CPU, the measured winner on GPU),
        ``"xla"`` or ``"pallas"``.

    Returns:
      The product, with ``lax.dot_general``'s output layout (batch dims, lhs
      free dims, rhs free dims). Bias is not added (Flax adds it).

    Example:
        >>> import jax.numpy as jnp, jqx
        >>> w = jqx.int8_dynamic_activation_int8_weight().quantize_weight(jnp.ones((8, 4)))
        >>> y = jqx.ops.dot_general(jnp.ones((3, 8)), w, (((1,), (0,)), ((), ())))
        >>> y.shape, y.dtype
        ((3, 4), dtype('float32'))
    """
    if backend not in _BACKENDS:
        raise ValueError(
            f"backend={backend!r} is not supported; use None (auto), 'xla' or 'pallas'."
        )
    (lc, rc), (lb, rb) = dimension_numbers
    dn = ((tuple(lc), tuple(rc)), (tuple(lb), tuple(rb)))
    lq, rq = is_qarray(lhs), is_qarray(rhs)
    if not lq and not rq:
        return lax.dot_general(
            lhs, rhs, dn, precision=precision, preferred_element_type=preferred_element_type
        )
    if lq and rq:
        lhs = lhs.dequantize()  # keep one side quantized; weight x weight is rare
        lq = False
    if rq:
        return _x_dot_w(lhs, rhs, dn, precision, preferred_element_type, backend)
    # Weight on the left: compute x . W and move W's free dims in front of x's.
    (wc, xc), (wb, xb) = dn
    y = _x_dot_w(rhs, lhs, ((xc, wc), (xb, wb)), precision, preferred_element_type, backend)
    nb = len(xb)
    x_free = rhs.ndim - len(xc) - len(xb)
    w_free = len(lhs.shape) - len(wc) - len(wb)
    perm = (
        list(range(nb)) + [nb + x_free + i for i in range(w_free)] + [nb + i for i in range(x_free)]
    )
    return jnp.transpose(y, perm)


# --------------------------------------------------------------------------- helpers


def _out_dtype(x, pet):
    if pet is not None:
        return jnp.dtype(pet)
    return jnp.dtype(x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else jnp.dtype(jnp.float32)


def _compute_dtype(x):
    """Dtype the float dot runs in: x's float dtype (bf16/f16 inputs are
    multiplied in 16 bits with a float32 result, as DESIGN.md advises)."""
    return jnp.dtype(x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else jnp.dtype(jnp.float32)


def _const_along(q: QArray, axes: Sequence[int]) -> bool:
    """The block covers the whole axis for each of ``axes``: scale/zero point are
    constant along them."""
    return all(q.block[a] == q.shape[a] for a in axes)


def _w_out_scale(s: jax.Array, wc, wb, n_xfree: int) -> jax.Array:
    """A per-block weight array (1 along the contraction dims ``wc``) laid out to
    broadcast against the output (batch, x free, w free)."""
    nd = s.ndim
    wfree = [i for i in range(nd) if i not in wc and i not in wb]
    keep = list(wb) + wfree
    s = jnp.transpose(s, keep + list(wc))
    s = s.reshape(s.shape[: len(keep)])
    return s.reshape(s.shape[: len(wb)] + (1,) * n_xfree + s.shape[len(wb) :])


def _x_out_scale(s: jax.Array, xc, xb, n_wfree: int) -> jax.Array:
    """A per-row activation scale (1 along the contraction dims ``xc``) laid out
    to broadcast against the output (batch, x free, w free)."""
    nd = s.ndim
    xfree = [i for i in range(nd) if i not in xc and i not in xb]
    keep = list(xb) + xfree
    s = jnp.transpose(s, keep + list(xc))
    s = s.reshape(s.shape[: len(keep)] + (1,) * n_wfree)
    return s


def _divide_in_scale(x, q: QArray, xc, wc):
    """``x / in_scale`` along the contraction; None when the stored in_scale is
    not a pure function of the contraction index (then dequantize instead)."""
    ins = q.in_scale.astype(jnp.float32)
    ins = ins.reshape((1,) * (q.ndim - ins.ndim) + ins.shape)
    for a in range(q.ndim):
        if a not in wc and ins.shape[a] != 1:
            return None
    ins = ins.reshape([ins.shape[a] for a in sorted(wc)])
    # order the remaining (contraction) axes as x's contraction axes appear in x
    pairs = sorted(zip(xc, wc, strict=True))
    perm = [sorted(wc).index(w) for _, w in pairs]
    ins = jnp.transpose(ins, perm)
    shape = [1] * x.ndim
    for i, (xa, _) in enumerate(pairs):
        shape[xa] = ins.shape[i]
    xf = x.astype(jnp.float32) / ins.reshape(shape)
    return xf.astype(_compute_dtype(x))


def _decoded(q: QArray, dtype) -> jax.Array:
    """``codes - zero_point`` (no scale) in ``dtype``: exact for 8-bit ints,
    4-bit codes and fp8 in float32 and bfloat16 (table formats are exact in
    float32)."""
    v = q.values()
    if q.zero_point is not None:
        v = (q.blocked(v) - q.expand(q.zero_point.astype(jnp.float32))).reshape(q.shape)
    return v.astype(dtype)


def _dequantized_no_in_scale(q: QArray, dtype) -> jax.Array:
    return q.replace(in_scale=None).dequantize(dtype)


def _act_scale_dyn(xf, xc, fmt, granularity):
    amax = jnp.max(
        jnp.abs(xf), axis=tuple(xc) if granularity == "per_token" else None, keepdims=True
    )
    if granularity != "per_token":
        amax = amax.reshape((1,) * xf.ndim)
    s = amax / fmt.max
    return jnp.where(s > 0, s, 1.0).astype(jnp.float32)


def _quantize_x(xf, q: QArray, xc):
    """Activation codes and scale (shape of x with 1 on the contraction dims, or
    all ones per tensor) for a W8A8 weight."""
    act = q.act
    fmt = _formats.get(act.format)
    if act.kind == "static":
        if q.act_scale is None:
            raise ValueError(
                f"QArray {q.shape} has a static activation spec (act={act}) but act_scale is "
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
        s = q.act_scale.astype(jnp.float32).reshape((1,) * xf.ndim)
    else:
        s = _act_scale_dyn(xf, xc, fmt, act.granularity)
    codes, s = quantize_activation(xf, fmt, scale=s)
    return codes, s


def _pad_single_row(xq, xc, xb):
    """int8 dots with one row fall off XLA:CPU's fast path: pad to two rows.
    Returns (padded, dims shift) or (xq, 0) when not needed."""
    free = [i for i in range(xq.ndim) if i not in xc and i not in xb]
    if xb or math.prod(xq.shape[i] for i in free) != 1:
        return xq, False
    xq2 = jnp.concatenate([xq[None], jnp.zeros_like(xq)[None]], axis=0)
    return xq2, True


# Many-row int8 W8A8: XLA:CPU's bf16 x bf16 -> f32 dot (AVX512-BF16) beats its
# int8 x int8 -> int32 dot at >= 1024 rows (0.57-0.64x vs 0.68-0.87x the f32
# dot at MiniLM's 4096-row layers; benchmarks/w8a8_profile.py). Below that the
# per-call int8 -> bf16 weight conversion is not amortised (at K = N = 4096,
# M = 256 the int32 dot wins, 0.67x vs 0.82x).
_W8A8_BF16_MIN_ROWS = 1024


def _w8a8_in_bf16(x, xc) -> bool:
    """Run an int8 x int8 W8A8 product as a bf16 dot with f32 accumulation.

    int8 codes are exact in bfloat16 and their products (|p| <= 127^2) exact
    in float32, so the result equals the int32 dot converted to float32 while
    partial sums stay below 2^24 in magnitude (always for K <= 1040); beyond
    that, a partial sum may round by 1 part in 2^24, the same rounding the
    int32 -> float32 conversion of the int32 path applies to its result.
    """
    rows = math.prod(x.shape[i] for i in range(x.ndim) if i not in xc)
    return rows >= _W8A8_BF16_MIN_ROWS


# int8 W8A8 on a CPU with AVX512-VNNI: jqx.native's int8 GEMM. Measured
# against XLA's int32 dot (single rows padded to two) and its bf16 dot, ratios
# to the f32 dot (benchmarks/ops.py, benchmarks/w8a8_profile.py): K = N =
# 4096: M = 1 0.20x vs 4.91x (the unpacked decode path), M = 16 0.54x vs
# 1.38x, M = 256 0.30x vs 0.78x, M = 1024 0.25x vs 0.68x; MiniLM's 4096-row
# layers 0.21-0.28x vs 0.50-0.76x.
# Tiny products lose to the per-call packing and threads (64 x 384 x 1536:
# 1.28x vs 0.82x), hence a floor on the work or on the weight's size.
_NATIVE = True  # tests and benchmarks switch it off to compare with XLA
_NATIVE_MIN_WORK = 1 << 26  # rows * K * N multiply-adds
_NATIVE_MIN_WEIGHT = 1 << 22  # K * N: XLA's int8 dot is slow at few rows
# Up to 6 rows the kernel reads the weight in place (no packing), so it pays
# from smaller weights on: M = 1, K = N = 1024 0.62x the f32 dot vs 0.78x on
# XLA; K = N = 384 0.78x vs 1.05x, but there both are launch overhead.
_NATIVE_DECODE_ROWS = 6
_NATIVE_MIN_WEIGHT_DECODE = 1 << 18


def _native_plain(q: QArray, dn) -> bool:
    """The native kernels take plain 2-D products: one contraction dim, the
    weight (K, N) contracted on axis 0, no batch dims (and ``_NATIVE`` on)."""
    (xc, wc), (xb, wb) = dn
    return _NATIVE and not xb and not wb and len(xc) == 1 and tuple(wc) == (0,) and q.ndim == 2


def _native_here() -> bool:
    """On the CPU backend with the kernels built (builds them on first use)."""
    return jax.default_backend() == "cpu" and _native.available()


def _native_rows(x, xc: int, n: int, kernel) -> jax.Array:
    """``kernel`` on x as (rows, K), back in dot_general's output layout (x's
    free dims, then N)."""
    c = jnp.moveaxis(x, xc, -1)
    return kernel(c.reshape(-1, c.shape[-1])).reshape(*c.shape[:-1], n)


def _w8a8_native_ok(x, q: QArray, dn, row_factor: int = 1) -> bool:
    """A plain 2-D product big enough to pay, on CPU, with the kernel built.
    ``row_factor``: the kernel will see that many times x's rows (2 for the
    two-level split)."""
    if not _native_plain(q, dn):
        return False
    (xc, _), _ = dn
    rows = row_factor * math.prod(x.shape[i] for i in range(x.ndim) if i != xc[0])
    k, n = q.shape
    decode = rows <= _NATIVE_DECODE_ROWS and k * n >= _NATIVE_MIN_WEIGHT_DECODE
    if rows * k * n < _NATIVE_MIN_WORK and k * n < _NATIVE_MIN_WEIGHT and not decode:
        return False
    return _native_here()


def _w8a8_native(codes, q: QArray, xc: int) -> jax.Array:
    """int32 ``codes @ q.qvalue`` through the native kernel."""
    return _native_rows(codes, xc, q.shape[1], lambda c: _native.int8_matmul(c, q.qvalue))


# --------------------------------------------------------------------------- main path


def _x_dot_w(x, q: QArray, dn, precision, pet, backend):
    (xc, wc), (xb, wb) = dn
    x = jnp.asarray(x)
    if len(xc) != len(wc) or any(x.shape[a] != q.shape[b] for a, b in zip(xc, wc, strict=True)):
        raise ValueError(
            f"jqx.ops.dot_general: contracting dims {tuple(xc)} of the activation "
            f"{tuple(x.shape)} do not match dims {tuple(wc)} of the quantized weight {q.shape} "
            f"({q.format}); check the weight's orientation (Flax kernels are (in, out))."
        )
    out_dtype = _out_dtype(x, pet)
    n_xfree = x.ndim - len(xc) - len(xb)
    n_wfree = q.ndim - len(wc) - len(wb)

    if backend == "pallas" or backend is None:
        y = _maybe_pallas(x, q, dn, out_dtype, forced=backend == "pallas")
        if y is not None:
            return y

    if q.in_scale is not None:
        xs = _divide_in_scale(x, q, xc, wc)
        if xs is None:
            return _fallback(x, q, dn, precision, out_dtype)
        x = xs

    act = q.act
    if act is None:
        return _weight_only(x, q, dn, precision, out_dtype, n_xfree)
    if act.kind == "llm_int8":
        return _llm_int8(x, q, dn, precision, out_dtype)
    # dynamic / static W8A8
    if not _const_along(q, wc) or q.zero_point is not None:
        # Scales vary along K: no integer dot can use them; simulate exactly.
        xf = x.astype(jnp.float32)
        codes, s = _quantize_x(xf, q, xc)
        xh = _formats.decode(codes, _formats.get(act.format), jnp.float32) * s
        return _fallback(xh, q, dn, precision, out_dtype)
    xf = x.astype(jnp.float32)
    codes, xs = _quantize_x(xf, q, xc)
    wfmt = q.fmt
    if wfmt.name == "int8" and act.format == "int8":
        y = _int8_codes_dot(x, codes, q, dn)
    elif wfmt.kind == "float" and act.format.startswith("fp8"):
        # fp8 (and bf16) codes are exact in bfloat16; products exact, f32 accumulation.
        y = lax.dot_general(
            codes.astype(jnp.bfloat16),
            q.qvalue.astype(jnp.bfloat16),
            dn,
            preferred_element_type=jnp.float32,
        )
    else:
        xh = _formats.decode(codes, _formats.get(act.format), jnp.float32)
        y = lax.dot_general(
            xh,
            _decoded(q, jnp.float32),
            dn,
            precision=precision,
            preferred_element_type=jnp.float32,
        )
    y = y * _x_out_scale(xs, xc, xb, n_wfree)
    y = y * _w_out_scale(q.scale.astype(jnp.float32), wc, wb, n_xfree)
    return y.astype(out_dtype)


def _int8_codes_dot(x, codes, q: QArray, dn) -> jax.Array:
    """The exact product of int8 activation codes with an int8 weight, as
    float32, by the fastest formulation measured for its shape."""
    (xc, wc), (xb, _) = dn
    if _w8a8_native_ok(x, q, dn):
        # AVX512-VNNI int8 GEMM (jqx.native): exact int32 sums, 0.2-0.6x the f32 dot.
        return _w8a8_native(codes, q, xc[0]).astype(jnp.float32)
    if _w8a8_in_bf16(x, xc):
        # int8 codes are exact in bfloat16: exact products, f32 accumulation.
        return lax.dot_general(
            codes.astype(jnp.bfloat16),
            q.qvalue.astype(jnp.bfloat16),
            dn,
            preferred_element_type=jnp.float32,
        )
    codes2, padded = _pad_single_row(codes, xc, xb)
    dn2 = ((tuple(a + 1 for a in xc), wc), ((), ())) if padded else dn
    acc = lax.dot_general(codes2, q.qvalue, dn2, preferred_element_type=jnp.int32)
    if padded:
        acc = acc[0]
    return acc.astype(jnp.float32)


def _fallback(x, q, dn, precision, out_dtype):
    """Dequantize-then-dot (in_scale already applied to x when present)."""
    cdt = _compute_dtype(x)
    w = _dequantized_no_in_scale(q, cdt)
    return lax.dot_general(
        x.astype(cdt), w, dn, precision=precision, preferred_element_type=out_dtype
    ).astype(out_dtype)


# Small-M int8 weight-only: converting a large int8 weight to float costs more
# than the matmul itself (3.5x the f32 dot at M=16, K=N=4096), while two int8
# dots on a two-level split of the activations cost ~1.2x. Measured crossover
# (benchmarks/ops.py): with XLA's int32 dot the split loses above a few
# hundred rows. On jqx.native's VNNI GEMM it wins at every row count
# (K = N = 4096: M = 1 0.24x, M = 16 0.68x the f32 dot), so there the split
# is used whenever the product is big enough for the native kernel.
_TWO_LEVEL_MAX_ROWS = 64
_TWO_LEVEL_MIN_WEIGHT = 1 << 20


def _int8_two_level(x, q, dn, out_dtype, n_xfree):
    """``x @ W`` for an int8 per-channel weight with x split exactly enough into
    two int8 levels: ``x = s1*q1 + s2*q2 + r`` with ``s2 = s1/254`` and
    ``|r| <= s2/2 = max|x_row| / 64516`` per element (about 2^-16 of the row's
    absmax, far below the int8 weight error). Both levels share one int8 x
    int8 -> int32 dot."""
    (xc, wc), _ = dn
    xf = x.astype(jnp.float32)
    s1 = _act_scale_dyn(xf, xc, _formats.get("int8"), "per_token")
    q1 = jnp.clip(jnp.round(xf / s1), -127, 127)
    s2 = s1 / 254.0
    q2 = jnp.clip(jnp.round((xf - q1 * s1) / s2), -127, 127)
    both = jnp.stack([q1, q2]).astype(jnp.int8)
    dn2 = ((tuple(a + 1 for a in xc), tuple(wc)), ((), ()))
    if _w8a8_native_ok(both, q, dn2):
        # Both levels in one VNNI GEMM (exact, like the int32 dot below).
        acc = _w8a8_native(both, q, xc[0] + 1).astype(jnp.float32)
    else:
        acc = lax.dot_general(both, q.qvalue, dn2, preferred_element_type=jnp.int32)
        acc = acc.astype(jnp.float32)
    y = acc[0] * _x_out_scale(s1, xc, (), q.ndim - len(wc)) + acc[1] * _x_out_scale(
        s2, xc, (), q.ndim - len(wc)
    )
    y = y * _w_out_scale(q.scale.astype(jnp.float32), wc, (), n_xfree)
    return y.astype(out_dtype)


# 4-bit weight-only at decode-sized M on CPU: jqx.native's w4 kernel reads the
# packed codes in place (f32 FMA, group zero/scale applied once per group).
# K = N = 4096, g128: M = 1 ~0.4-0.7x the f32 dot, M = 16 ~1.7x, where
# dequantize-then-dot took ~5x and ~3.9x; it pays from 2^18 weight elements on.
_W4_NATIVE_MIN_WEIGHT = 1 << 18


def _w4_native_ok(x, q: QArray, dn, rows: int, cdt) -> bool:
    """A plain 2-D product with a packed 4-bit (K, N) weight, scaled in groups
    along K only, at <= native.W4_MAX_ROWS rows, on CPU, kernel built."""
    if not _native_plain(q, dn):
        return False
    k, n = q.shape
    # bf16/f16 activations are widened to f32 (exact); the weight is then not
    # rounded to 16 bits, so the result is closer to x @ W than XLA's 16-bit dot.
    wide = cdt in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if not (q.fmt.packed and q.fmt.bits == 4) or not wide:
        return False
    g = q.block[0]
    if q.block[1] != 1 or k % g or q.scale.shape != (k // g, n) or q.in_scale is not None:
        return False
    if q.zero_point is not None and q.zero_point.shape != q.scale.shape:
        return False
    if rows > _native.W4_MAX_ROWS or rows == 0 or k * n < _W4_NATIVE_MIN_WEIGHT:
        return False
    return _native_here()


def _w4_native(x, q: QArray, xc: int, out_dtype) -> jax.Array:
    """``x @ q`` through the native 4-bit kernel."""
    n = q.shape[1]
    table = _formats.decode(jnp.arange(16, dtype=jnp.uint8), q.fmt, jnp.float32)
    zero = None if q.zero_point is None else q.zero_point.astype(jnp.float32)
    scale = q.scale.astype(jnp.float32)

    def kernel(rows):
        return _native.w4_matmul(
            rows.astype(jnp.float32), q.qvalue, table, scale, zero, n=n, group_size=q.block[0]
        )

    return _native_rows(x, xc, n, kernel).astype(out_dtype)


def _weight_only(x, q, dn, precision, out_dtype, n_xfree):
    (xc, wc), (xb, wb) = dn
    cdt = _compute_dtype(x)
    rows = math.prod(x.shape[i] for i in range(x.ndim) if i not in xc)
    if _w4_native_ok(x, q, dn, rows, cdt):
        return _w4_native(x, q, xc[0], out_dtype)
    if (
        q.format == "int8"
        and q.zero_point is None
        and not xb
        and _const_along(q, wc)
        and (
            (rows <= _TWO_LEVEL_MAX_ROWS and q.size >= _TWO_LEVEL_MIN_WEIGHT)
            # On the native VNNI GEMM the split pays at every row count.
            or _w8a8_native_ok(x, q, dn, row_factor=2)
        )
        and cdt == jnp.dtype(jnp.float32)
        and precision is None
    ):
        return _int8_two_level(x, q, dn, out_dtype, n_xfree)
    acc_dt = jnp.float32 if cdt in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) else cdt
    fmt = q.fmt
    # Table formats (nf4/fp4) decode to non-dyadic values: not exact in 16 bits.
    exact_in_cdt = cdt == jnp.dtype(jnp.float32) or fmt.kind != "table"
    if _const_along(q, wc) and exact_in_cdt and not fmt.is_wide_float:
        w = _decoded(q, cdt)
        y = lax.dot_general(x, w, dn, precision=precision, preferred_element_type=acc_dt)
        y = y.astype(jnp.float32) * _w_out_scale(q.scale.astype(jnp.float32), wc, wb, n_xfree)
        return y.astype(out_dtype)
    w = _dequantized_no_in_scale(q, cdt)
    y = lax.dot_general(x.astype(cdt), w, dn, precision=precision, preferred_element_type=acc_dt)
    return y.astype(out_dtype)


def _llm_int8(x, q, dn, precision, out_dtype):
    """LLM.int8() via jqx.algorithms.llm_int8 for the canonical layout
    (x (..., K) @ W (K, N)); other layouts are moved into it."""
    from jqx.recipes.llm_int8 import llm_int8_matmul  # noqa: PLC0415

    (xc, wc), (xb, wb) = dn
    if xb or wb or len(wc) != 1 or q.ndim != 2 or q.block != (q.shape[0], 1) or q.format != "int8":
        raise NotImplementedError(
            f"LLM.int8() matmul supports a 2-D int8 weight (K, N) quantized per output channel "
            f"contracted on one axis without batch dims; got weight {q.shape} block {q.block} "
            f"format {q.format} with dimension_numbers {dn}. Quantize it with jqx.llm_int8() and "
            "use it as x @ W or x @ W.T."
        )
    qq = q
    if wc[0] == 1:  # W used transposed (x @ W.T): the stored layout is (N, K)
        raise NotImplementedError(
            f"LLM.int8() with the weight {q.shape} contracted on its last axis (x @ W.T) is not "
            "supported; store the weight as (K, N)."
        )
    xm = jnp.moveaxis(x, xc[0], -1)
    # in_scale was already divided out of x by the caller.
    y = llm_int8_matmul(xm, qq.replace(in_scale=None), out_dtype=out_dtype)
    return y.astype(out_dtype)


# --------------------------------------------------------------------------- pallas hook


def _maybe_pallas(x, q: QArray, dn, out_dtype, forced: bool):
    """Runs a Pallas kernel for a 2-D (M, K) x (K, N) matmul when asked
    (``forced``) or when dispatch measured it faster on this device; None means
    "use XLA"."""
    (xc, wc), (xb, wb) = dn
    plain = (
        x.ndim == 2
        and q.ndim == 2
        and tuple(xc) == (1,)
        and tuple(wc) == (0,)
        and not xb
        and not wb
        and q.in_scale is None
    )
    platform = jax.default_backend()
    if not forced:
        if platform == "cpu" or not plain:
            return None
    elif not plain:
        return None  # layouts the kernels do not take: XLA
    try:
        import jqx.kernels.pallas as pk  # noqa: PLC0415
    except ImportError as e:
        if forced:
            raise ImportError(
                "backend='pallas' needs the pallas_kernels package (shipped next to jqx in the "
                "source tree); use backend='xla' or None."
            ) from e
        return None
    m, k = x.shape
    n = q.shape[1]
    act, fmt = q.act, q.fmt
    if act is None and fmt.name in ("uint4", "int4") and q.block[1] == 1:
        op = "w4a16"
    elif (
        act is not None
        and act.kind == "dynamic"
        and fmt.name == "int8"
        and act.format == "int8"
        and act.granularity == "per_token"
        and q.block == (k, 1)
    ):
        op = "int8_dynamic"
    elif (
        act is not None
        and act.kind == "dynamic"
        and fmt.name == "fp8_e4m3"
        and act.format == "fp8_e4m3"
        and q.block == (k, 1)
    ):
        op = "fp8"
    else:
        return None
    if not forced:
        kind = jax.devices()[0].device_kind
        if _pallas_table.choose(op, m, k, n, platform, kind) != "pallas":
            return None
    kdt = (
        out_dtype
        if out_dtype in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        else jnp.dtype(jnp.float32)
    )
    try:
        if op == "w4a16":
            y = pk.w4a16_matmul(
                x,
                q.qvalue,
                q.scale,
                q.zero_point,
                group_size=q.block[0],
                signed=fmt.name == "int4",
                out_dtype=kdt,
            )
        elif op == "int8_dynamic":
            y = pk.int8_matmul_dynamic(x, q.qvalue, q.scale.reshape(1, n), out_dtype=kdt)
        else:
            xq, xs = quantize_activation(x, "fp8_e4m3", "per_token")
            y = pk.fp8_matmul(xq, q.qvalue, xs, q.scale.reshape(1, n), out_dtype=kdt)
    except NotImplementedError:
        return None
    return y.astype(out_dtype)


# --------------------------------------------------------------------------- activation x activation


def _absmax_codes(x: jax.Array, axes: Sequence[int], fmt: _formats.Format):
    """Symmetric codes of ``x`` with one scale per index of the non-``axes`` dims."""
    xf = x.astype(jnp.float32)
    s = _act_scale_dyn(xf, axes, fmt, "per_token")
    return _formats.encode(xf / s, fmt), s


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
        >>> import jax.numpy as jnp
        >>> a = jnp.array([[1.0, 2.0], [3.0, -4.0]])
        >>> y = dynamic_dot_general(a, a, (((1,), (0,)), ((), ())))
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
    out_dtype = _out_dtype(lhs, preferred_element_type)
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
    y = y * _x_out_scale(ls, lc, lb, n_rfree)
    y = y * _w_out_scale(rs, rc, rb, n_lfree)
    return y.astype(out_dtype)
