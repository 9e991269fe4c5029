// jqx_softmax_dot (gguf_gemv.cc, AVX2) and jqx_softmax_dot_avx512 (int8_gemm.cc):
// attention's softmax and its product with the values in one pass,
//
//   y[g, q, :] = (sum_k e[g, q, k] v[g, k, :]) / sum_k e[g, q, k],
//   e[g, q, k] = exp(s[g, q, k] - max_k s[g, q, k])
//
// for scores s (G, Q, K) float32, v (G, K, D) float32, y (G, Q, D) float32: softmax(s)
// @ v (jqx.ops.attention.softmax_dot; jqx.quantized sends ``jax.nn.softmax`` then
// ``einsum`` here on CPU). Per chunk of kSdChunkRows rows of one g: each row's maximum,
// then its exps (SoftmaxExp, about 1 ulp) of s - max (the bits jax.nn.softmax
// exponentiates) go to a thread-local buffer with their float32 sum, then register
// tiles of kSdRows rows x
// two vectors of D run the product over k (one FMA chain per output, k ascending;
// every loaded v vector serves the tile's rows, every broadcast exp two vectors) and
// divide by the row's sum as they leave the registers. The probabilities are never
// written, nor the shifted scores; s and v are read once per chunk (v stays in cache
// across a g's chunks; a row of s, twice, from L1).
// Chunks split rows only, so the result does not depend on the number of threads.
//
// One body for both instruction sets: the kernel is a template over a vector type
// (SdAvx2: eight floats; SdAvx512: sixteen, defined where the including file is
// compiled for AVX512F). The exp is Cephes' single-precision range reduction and
// polynomial, the same operations for both widths (and for gguf_gemv.cc's decode
// attention, which calls ExpNonPositiveT<SdAvx2>), and each output's FMA chain is the
// same; only the row sums add their lanes in another order (both within the bound).

#ifndef JQX_KERNELS_CPU_SOFTMAX_DOT_H_
#define JQX_KERNELS_CPU_SOFTMAX_DOT_H_

#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#include <algorithm>
#include <string>
#include <vector>

#include "pool.h"
#include "xla/ffi/api/ffi.h"

namespace {

struct SdAvx2 {
  using V = __m256;
  using M = __m256i;  // lane mask
  static constexpr int64_t kLanes = 8;
  static M Mask(int64_t n) {  // the first n (0..8) lanes
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)),
                              _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static V Load(const float* p) { return _mm256_loadu_ps(p); }
  static V LoadN(const float* p, M m) { return _mm256_maskload_ps(p, m); }  // off lanes 0
  static V LoadNOr(const float* p, M m, float fill) {  // off lanes ``fill``
    return _mm256_blendv_ps(_mm256_set1_ps(fill), _mm256_maskload_ps(p, m),
                            _mm256_castsi256_ps(m));
  }
  static void Store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static void StoreN(float* p, M m, V v) { _mm256_maskstore_ps(p, m, v); }
  static V Keep(V v, M m) { return _mm256_and_ps(v, _mm256_castsi256_ps(m)); }
  // a where m != 0 (or NaN), else b.
  static V SelectNonZero(V m, V a, V b) {
    return _mm256_blendv_ps(b, a, _mm256_cmp_ps(m, _mm256_setzero_ps(), _CMP_NEQ_UQ));
  }
  static V Zero() { return _mm256_setzero_ps(); }
  static V Set(float f) { return _mm256_set1_ps(f); }
  static V Bcast(const float* p) { return _mm256_broadcast_ss(p); }
  static V Add(V a, V b) { return _mm256_add_ps(a, b); }
  static V Sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V Mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V Div(V a, V b) { return _mm256_div_ps(a, b); }
  static V Max(V a, V b) { return _mm256_max_ps(a, b); }  // b when either is NaN
  static V Fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V Fnma(V a, V b, V c) { return _mm256_fnmadd_ps(a, b, c); }
  static V Round(V a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static V Pow2(V n) {  // 2^n for integral n in [-126, 127]
    const __m256i e = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
    return _mm256_castsi256_ps(_mm256_slli_epi32(e, 23));
  }
  static V ZeroBelow(V p, V x, float lo) {  // p where !(x < lo) (NaN kept), else 0
    return _mm256_and_ps(p, _mm256_cmp_ps(x, _mm256_set1_ps(lo), _CMP_NLT_UQ));
  }
  static unsigned NonZeroBits(V v) {  // bit i: lane i != 0 (or NaN)
    return static_cast<unsigned>(
        _mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_NEQ_UQ)));
  }
  static unsigned AboveBits(V v, float beta) {  // bit i: lane i > beta (or NaN)
    return static_cast<unsigned>(
        _mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_set1_ps(beta), _CMP_NLE_UQ)));
  }
  static float Sum(V v) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
  }
  static float HMax(V v) {  // a NaN lane may or may not survive (the row is NaN anyway)
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
  }
};

#ifdef __AVX512F__
struct SdAvx512 {
  using V = __m512;
  using M = __mmask16;
  static constexpr int64_t kLanes = 16;
  static M Mask(int64_t n) { return static_cast<M>(n >= 16 ? 0xFFFF : (1u << n) - 1); }
  static V Load(const float* p) { return _mm512_loadu_ps(p); }
  static V LoadN(const float* p, M m) { return _mm512_maskz_loadu_ps(m, p); }
  static V LoadNOr(const float* p, M m, float fill) {
    return _mm512_mask_loadu_ps(_mm512_set1_ps(fill), m, p);
  }
  static void Store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static void StoreN(float* p, M m, V v) { _mm512_mask_storeu_ps(p, m, v); }
  static V Keep(V v, M m) { return _mm512_maskz_mov_ps(m, v); }
  // a where m != 0 (or NaN), else b.
  static V SelectNonZero(V m, V a, V b) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(m, _mm512_setzero_ps(), _CMP_NEQ_UQ), b, a);
  }
  static V Zero() { return _mm512_setzero_ps(); }
  static V Set(float f) { return _mm512_set1_ps(f); }
  static V Bcast(const float* p) { return _mm512_set1_ps(*p); }
  static V Add(V a, V b) { return _mm512_add_ps(a, b); }
  static V Sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V Mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V Div(V a, V b) { return _mm512_div_ps(a, b); }
  static V Max(V a, V b) { return _mm512_max_ps(a, b); }  // b when either is NaN
  static V Fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V Fnma(V a, V b, V c) { return _mm512_fnmadd_ps(a, b, c); }
  static V Round(V a) {
    return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  static V Pow2(V n) {
    const __m512i e = _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127));
    return _mm512_castsi512_ps(_mm512_slli_epi32(e, 23));
  }
  static V ZeroBelow(V p, V x, float lo) {
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(lo), _CMP_NLT_UQ), p);
  }
  static unsigned NonZeroBits(V v) {
    return _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_NEQ_UQ);
  }
  static unsigned AboveBits(V v, float beta) {
    return _mm512_cmp_ps_mask(v, _mm512_set1_ps(beta), _CMP_NLE_UQ);
  }
  static float Sum(V v) {  // the same pairwise order as SdAvx2::Sum on each half
    const __m256 lo = _mm512_castps512_ps256(v);
    const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
    return SdAvx2::Sum(_mm256_add_ps(lo, hi));
  }
  // out[c * ldo + j] = in[j * ldi + c] for a 16 x 16 block (16 rows of 16 floats in,
  // their columns out): unpacks within 128-bit lanes, then two lane shuffles.
  static void Transpose16(const float* in, int64_t ldi, float* out, int64_t ldo) {
    __m512 r[16], t[16];
    for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(in + i * ldi);
    for (int i = 0; i < 8; ++i) {
      t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
      t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; ++i) {
      const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
      const __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
      r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
      r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
      r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
      r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
    }
    for (int i = 0; i < 4; ++i) {
      t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
      t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xdd);
      t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
      t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xdd);
    }
    for (int i = 0; i < 8; ++i) {
      _mm512_storeu_ps(out + i * ldo, _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88));
      _mm512_storeu_ps(out + (i + 8) * ldo, _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd));
    }
  }
  static float HMax(V v) {
    const __m256 lo = _mm512_castps512_ps256(v);
    const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
    return SdAvx2::HMax(_mm256_max_ps(lo, hi));
  }
};
#endif

// exp(x) for x <= 0 (a softmax's shifted scores), Cephes' single-precision range
// reduction and polynomial (about 1 ulp). Inputs below -87 give exp(-87) (~1.6e-38,
// next to a largest term of 1), which keeps 2^n a normal float; a NaN stays NaN.
template <class T>
inline typename T::V ExpNonPositiveT(typename T::V x) {
  using V = typename T::V;
  x = T::Max(T::Set(-87.0f), x);  // x second: a NaN score stays NaN
  const V n = T::Round(T::Mul(x, T::Set(1.44269504088896341f)));
  // r = x - n ln2, with ln2 split in two so that n * hi is exact.
  V r = T::Fnma(n, T::Set(0.693359375f), x);
  r = T::Fnma(n, T::Set(-2.12194440e-4f), r);
  V p = T::Set(1.9875691500e-4f);
  p = T::Fma(p, r, T::Set(1.3981999507e-3f));
  p = T::Fma(p, r, T::Set(8.3334519073e-3f));
  p = T::Fma(p, r, T::Set(4.1665795894e-2f));
  p = T::Fma(p, r, T::Set(1.6666665459e-1f));
  p = T::Fma(p, r, T::Set(5.0000001201e-1f));
  p = T::Fma(p, T::Mul(r, r), T::Add(r, T::Set(1.0f)));
  return T::Mul(p, T::Pow2(n));
}

// The softmax's exp: ExpNonPositiveT, and 0 below -87 (where exp is under 1.7e-38, a
// subnormal or 0 in float32): a masked key (finfo.min or -inf scores) gets no weight,
// as in XLA. NaN stays NaN.
template <class T>
inline typename T::V SoftmaxExp(typename T::V x) {
  return T::ZeroBelow(ExpNonPositiveT<T>(x), x, -87.0f);
}

constexpr int64_t kSdRows = 4;
constexpr int64_t kSdChunkRows = 16;

struct SoftmaxDotJob {
  const float* s;
  const float* v;
  float* y;
  int64_t Q, K, D, qblocks;
};

thread_local std::vector<float> t_sd_exp;

// The largest of a row's K scores and ``floor`` (the scores past K, where a caller cut
// the row: all ``floor``). A NaN score may or may not survive (its exp makes the row
// NaN anyway).
template <class T>
inline float RowMax(const float* s, int64_t K, float floor) {
  using V = typename T::V;
  constexpr int64_t L = T::kLanes;
  const int64_t tail = K % L;
  V mx = T::Set(floor);
  int64_t k = 0;
  for (; k + L <= K; k += L) mx = T::Max(mx, T::Load(s + k));
  if (tail) mx = T::Max(mx, T::LoadNOr(s + k, T::Mask(tail), floor));
  return T::HMax(mx);
}

// The exps exp(s - m) of one row's K scores into e, and their sum.
template <class T>
inline float RowExpsFrom(const float* s, int64_t K, float max, float* e) {
  using V = typename T::V;
  constexpr int64_t L = T::kLanes;
  const int64_t tail = K % L;
  const V m = T::Set(max);
  V acc = T::Zero();
  int64_t k = 0;
  for (; k + L <= K; k += L) {
    const V p = SoftmaxExp<T>(T::Sub(T::Load(s + k), m));
    T::Store(e + k, p);
    acc = T::Add(acc, p);
  }
  if (tail) {
    // Masked-off lanes load 0: zeroed before they reach the sum.
    const typename T::M mt = T::Mask(tail);
    const V x = T::Sub(T::LoadN(s + k, mt), m);
    const V p = T::Keep(SoftmaxExp<T>(x), mt);
    T::StoreN(e + k, mt, p);
    acc = T::Add(acc, p);
  }
  return T::Sum(acc);
}

// The exps exp(s - max(s)) of one row of scores s into e (K floats), and their sum.
// s - max is one IEEE subtraction, as in jax.nn.softmax, so the exps' inputs are the
// bits XLA's softmax exponentiates. A NaN (or +inf) in the row makes its exps, and so
// its outputs, NaN whichever lane the maximum keeps; a row of -inf gives NaN too
// (-inf - -inf), as jax.nn.softmax does.
template <class T>
inline float RowExps(const float* s, int64_t K, float* e) {
  return RowExpsFrom<T>(s, K, RowMax<T>(s, K, -INFINITY), e);
}

// y rows [0, R) (R <= kSdRows, row stride ldy), columns [d0, d0 + 2 lanes) cut at D,
// from the rows' exps e (row stride lde) of keys [kfrom, K) and sums.
template <class T, int R>
inline void SoftmaxDotTile(const float* e, int64_t lde, int64_t kfrom, int64_t K, const float* v,
                           int64_t D, int64_t d0, const float* sums, float* y, int64_t ldy) {
  using V = typename T::V;
  constexpr int64_t L = T::kLanes;
  const typename T::M m0 = T::Mask(std::min<int64_t>(L, std::max<int64_t>(0, D - d0)));
  const typename T::M m1 = T::Mask(std::min<int64_t>(L, std::max<int64_t>(0, D - d0 - L)));
  const bool full = d0 + 2 * L <= D;
  V acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = T::Zero();
  const float* vk = v + kfrom * D + d0;
  for (int64_t k = kfrom; k < K; ++k, vk += D) {
    const V v0 = full ? T::Load(vk) : T::LoadN(vk, m0);
    const V v1 = full ? T::Load(vk + L) : T::LoadN(vk + L, m1);
    for (int r = 0; r < R; ++r) {
      const V p = T::Bcast(e + r * lde + k);
      acc[r][0] = T::Fma(p, v0, acc[r][0]);
      acc[r][1] = T::Fma(p, v1, acc[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) {
    const V t = T::Set(sums[r]);
    float* yr = y + r * ldy + d0;
    if (full) {
      T::Store(yr, T::Div(acc[r][0], t));
      T::Store(yr + L, T::Div(acc[r][1], t));
    } else {
      T::StoreN(yr, m0, T::Div(acc[r][0], t));
      T::StoreN(yr + L, m1, T::Div(acc[r][1], t));
    }
  }
}

template <class T>
void SoftmaxDotChunk(const void* ctx, int64_t c) {
  const SoftmaxDotJob& j = *static_cast<const SoftmaxDotJob*>(ctx);
  const int64_t g = c / j.qblocks;
  const int64_t q0 = (c % j.qblocks) * kSdChunkRows;
  const int64_t rows = std::min(j.Q - q0, kSdChunkRows);
  if (t_sd_exp.size() < static_cast<size_t>(rows * j.K))
    t_sd_exp.resize(static_cast<size_t>(rows * j.K));
  float* e = t_sd_exp.data();
  float sums[kSdChunkRows];
  const float* sr = j.s + (g * j.Q + q0) * j.K;
  for (int64_t r = 0; r < rows; ++r) sums[r] = RowExps<T>(sr + r * j.K, j.K, e + r * j.K);
  const float* v = j.v + g * j.K * j.D;
  float* y = j.y + (g * j.Q + q0) * j.D;
  for (int64_t r = 0; r < rows; r += kSdRows) {
    const int64_t rr = std::min(kSdRows, rows - r);
    const float* er = e + r * j.K;
    float* yr = y + r * j.D;
    for (int64_t d0 = 0; d0 < j.D; d0 += 2 * T::kLanes) {
      switch (rr) {
        case 4: SoftmaxDotTile<T, 4>(er, j.K, 0, j.K, v, j.D, d0, sums + r, yr, j.D); break;
        case 3: SoftmaxDotTile<T, 3>(er, j.K, 0, j.K, v, j.D, d0, sums + r, yr, j.D); break;
        case 2: SoftmaxDotTile<T, 2>(er, j.K, 0, j.K, v, j.D, d0, sums + r, yr, j.D); break;
        default: SoftmaxDotTile<T, 1>(er, j.K, 0, j.K, v, j.D, d0, sums + r, yr, j.D); break;
      }
    }
  }
}

// The FFI body (checks, the empty cases, the pool), for either vector type.
template <class T>
xla::ffi::Error SoftmaxDotBody(xla::ffi::Buffer<xla::ffi::F32> s,
                               xla::ffi::Buffer<xla::ffi::F32> v,
                               xla::ffi::ResultBuffer<xla::ffi::F32> y,
                               xla::ffi::ThreadPool xla_pool) {
  // (..., Q, K), (..., K, D) and (..., Q, D) with the same leading dims, flattened into
  // G: a call under jax.vmap (vmap_method="broadcast_all") adds a leading axis.
  const auto xd = s.dimensions();
  const auto vd = v.dimensions();
  const auto yd = y->dimensions();
  const size_t r = xd.size();
  bool ok = r >= 3 && vd.size() == r && yd.size() == r;
  int64_t G = 1;
  for (size_t i = 0; ok && i + 2 < r; ++i) {
    ok = vd[i] == xd[i] && yd[i] == xd[i];
    G *= xd[i];
  }
  if (!ok || vd[r - 2] != xd[r - 1] || yd[r - 2] != xd[r - 2] || yd[r - 1] != vd[r - 1])
    return xla::ffi::Error::InvalidArgument(
        "jqx_softmax_dot: s (G, Q, K), v (G, K, D) and y (G, Q, D) do not agree");
  const int64_t Q = xd[r - 2], K = xd[r - 1], D = vd[r - 1];
  if (G == 0 || Q == 0 || D == 0) return xla::ffi::Error::Success();
  float* out = y->typed_data();
  if (K == 0) {  // an empty softmax: 0 / 0
    std::fill(out, out + G * Q * D, NAN);
    return xla::ffi::Error::Success();
  }
  const int64_t qblocks = (Q + kSdChunkRows - 1) / kSdChunkRows;
  const SoftmaxDotJob job{s.typed_data(), v.typed_data(), out, Q, K, D, qblocks};
  const int64_t chunks = G * qblocks;
  XlaPoolScope xla_scope(xla_pool, G * Q > kXlaPoolRows);
  // Under about 2^16 multiply-adds the pool's wake-up costs more than it saves.
  if (G * Q * K * (D + 8) < (int64_t{1} << 16)) {
    for (int64_t c = 0; c < chunks; ++c) SoftmaxDotChunk<T>(&job, c);
  } else {
    GetPool()->Run(SoftmaxDotChunk<T>, &job, chunks);
  }
  return xla::ffi::Error::Success();
}

// ---------------------------------------------------------------- the scores too
//
// jqx_scores_softmax_dot (AVX2) and jqx_scores_softmax_dot_avx512: attention from q and
// k, its scores never written. For each batch index g (up to kAtMaxBatch batch dims)
// and query row i:
//
//   s[i, j] = ops(sum_d q[g, i, d] k[g, j, d])   one FMA chain over d = 0..D-1, from 0
//   y[g, i, :] = sum_j exp(s[i, j] - max_j s[i, :]) v[g, j, :] / sum_j exp(...)
//
// ops: the program's elementwise steps between its dot and its softmax, in its order,
// each one float32 operation as XLA's: kAtMul s * c, kAtDiv s / c (c = scale[0]), kAtAdd
// s + bias[g, i, j], kAtWhere (mask[g, i, j] != 0 ? s : fill). q, k, v, bias, mask and y
// are read and written through element strides (attrs), so the program's layouts (e.g.
// (b, t, h, d) projections) need no transposes; bias and mask broadcast through stride
// 0. Per chunk (g, a range of query rows): k's rows for g are packed transposed
// (D x Tk, padded to whole vectors) and v's (Tk x Dv); then per kSdRows rows, the
// scores (register tiles of rows x kAtBlocks vectors of keys), the ops, RowExps and
// SoftmaxDotTile as softmax_dot's. Keys that the last step (a where, or an additive
// bias after the scale) masks at either end of every row of a tile are skipped where
// that is exact (AttentionRows: causal attention computes about half the scores).
// Chunks split rows only: the bits do not depend on the number of threads.

constexpr int kAtMaxBatch = 4;
constexpr int64_t kAtChunksPerThread = 8;  // chunks per thread, at least (where rows allow)
constexpr int64_t kAtMul = 1, kAtDiv = 2, kAtAdd = 3, kAtWhere = 4;

struct AtOperand {
  const float* p;
  int64_t b[kAtMaxBatch];  // element strides of the batch dims
  int64_t row, col;        // of the (query or key) row and of the column (d, or key)
};

struct AttentionJob {
  int nb;
  int64_t bsz[kAtMaxBatch];
  int64_t Tq, Tk, D, Dv, qblocks, chunk_rows;
  AtOperand q, k, v, bias, mask, y;
  int64_t ops[4];
  int nops;
  float scale, fill;
  // Trailing masked keys that may be skipped (AttentionRows): kAtSkipWhere where the
  // last step is the where (fill below +inf); kAtSkipAdd where it is the add and every
  // step before it a mul or div (scale_abs: the factor's magnitude, 1 without one).
  int skip;
  double scale_abs;
};

constexpr int kAtSkipNone = 0, kAtSkipWhere = 1, kAtSkipAdd = 2;

thread_local std::vector<float> t_at_buf;

inline int64_t AtOffset(const AtOperand& o, const int64_t* idx, int nb) {
  int64_t off = 0;
  for (int d = 0; d < nb; ++d) off += idx[d] * o.b[d];
  return off;
}

// Scores of R rows of q (row stride qrow, column stride qcol) against keys [c0, c0 + NB
// vectors) of the packed kt (D rows of ldk floats) into s (row stride lds).
template <class T, int R, int NB>
inline void ScoreTile(const float* q, int64_t qrow, int64_t qcol, const float* kt, int64_t ldk,
                      int64_t D, int64_t c0, float* s, int64_t lds) {
  using V = typename T::V;
  constexpr int64_t L = T::kLanes;
  V acc[R][NB];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < NB; ++b) acc[r][b] = T::Zero();
  const float* kd = kt + c0;
  for (int64_t d = 0; d < D; ++d, kd += ldk) {
    V kv[NB];
    for (int b = 0; b < NB; ++b) kv[b] = T::Load(kd + b * L);
    for (int r = 0; r < R; ++r) {
      const V x = T::Set(q[r * qrow + d * qcol]);
      for (int b = 0; b < NB; ++b) acc[r][b] = T::Fma(x, kv[b], acc[r][b]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < NB; ++b) T::Store(s + r * lds + c0 + b * L, acc[r][b]);
}

// One row's broadcast operand (bias or mask) at key block k0: its lanes, with stride 0
// (one value), 1 (a vector, the tail masked) or any other (gathered).
template <class T>
inline typename T::V AtRowVector(const float* p, int64_t col, int64_t k0, int64_t Tk) {
  constexpr int64_t L = T::kLanes;
  if (col == 0) return T::Set(p[0]);
  const int64_t n = std::min<int64_t>(L, Tk - k0);
  if (col == 1) return n == L ? T::Load(p + k0) : T::LoadN(p + k0, T::Mask(n));
  alignas(64) float tmp[L] = {};
  for (int64_t j = 0; j < n; ++j) tmp[j] = p[(k0 + j) * col];
  return T::Load(tmp);
}

// [first, last + 1) of a row's keys: those a mask or bias keeps (AttentionRows), or
// the rows of v holding an inf or a NaN.
struct AtKeys {
  int64_t lo, hi;
};

// [first, last + 1) of the keys of a row (key stride col, 0 when broadcast) that
// ``keep(x)`` keeps; {0, 0} when it keeps none. ``bits(v)`` is keep on a vector of L
// keys, bit i for lane i. Whole vectors are read from both ends where col is 1.
template <class T, class Bits, class Keep>
inline AtKeys AtRowKeptKeys(const float* row, int64_t col, int64_t Tk, Bits bits, Keep keep) {
  constexpr int64_t L = T::kLanes;
  if (col == 0) return keep(row[0]) ? AtKeys{0, Tk} : AtKeys{0, 0};
  int64_t hi = 0, k = Tk;
  if (col == 1) {  // whole vectors from the end
    for (; k >= L && hi == 0; k -= L) {
      const unsigned b = bits(T::Load(row + k - L));
      if (b) hi = k - L + 32 - __builtin_clz(b);
    }
  }
  while (hi == 0 && k-- > 0)
    if (keep(row[k * col])) hi = k + 1;
  if (hi == 0) return {0, 0};
  int64_t lo = 0;
  if (col == 1) {  // whole vectors from the start
    for (; lo + L <= hi; lo += L) {
      const unsigned b = bits(T::Load(row + lo));
      if (b) return {lo + __builtin_ctz(b), hi};
    }
  }
  while (!keep(row[lo * col])) ++lo;  // stops at hi - 1 at the latest
  return {lo, hi};
}

// The keys a row's mask keeps: nonzero or NaN, as the where step reads it.
template <class T>
inline AtKeys AtKeptKeys(const float* row, int64_t col, int64_t Tk) {
  return AtRowKeptKeys<T>(
      row, col, Tk, [](typename T::V v) { return T::NonZeroBits(v); },
      [](float x) { return !(x == 0.0f); });
}

// The keys whose bias in a row is above beta (or NaN).
template <class T>
inline AtKeys AtBiasKeptKeys(const float* row, int64_t col, int64_t Tk, float beta) {
  return AtRowKeptKeys<T>(
      row, col, Tk, [beta](typename T::V v) { return T::AboveBits(v, beta); },
      [beta](float x) { return !(x <= beta); });
}

// Whether row t of the packed values vp (Tk x Dv) holds an inf or a NaN.
template <class T>
inline bool AtNonFiniteRow(const float* vp, int64_t t, int64_t Dv) {
  using V = typename T::V;
  constexpr int64_t L = T::kLanes;
  const float* r = vp + t * Dv;
  V z = T::Zero();  // x - x: 0 for a finite x, NaN for inf and NaN
  int64_t d = 0;
  for (; d + L <= Dv; d += L) z = T::Add(z, T::Sub(T::Load(r + d), T::Load(r + d)));
  if (d < Dv) {
    const typename T::M mt = T::Mask(Dv - d);
    z = T::Add(z, T::Sub(T::LoadN(r + d, mt), T::LoadN(r + d, mt)));
  }
  return !(T::Sum(z) == 0.0f);
}

// [first, last + 1) of the rows of vp holding an inf or a NaN; {Tk, 0} when none does.
template <class T>
inline AtKeys AtNonFiniteRows(const float* vp, int64_t Tk, int64_t Dv) {
  int64_t hi = Tk;
  while (hi > 0 && !AtNonFiniteRow<T>(vp, hi - 1, Dv)) --hi;
  if (hi == 0) return {Tk, 0};
  int64_t lo = 0;
  while (!AtNonFiniteRow<T>(vp, lo, Dv)) ++lo;
  return {lo, hi};
}

// The largest Euclidean norm of the packed keys kt (D x ldk, zero past Tk), with a
// margin of 1e-3 for its float32 rounding; +inf when a key holds an inf or a NaN.
template <class T>
inline double AtKeyNormMax(const float* kt, int64_t ldk, int64_t D) {
  using V = typename T::V;
  constexpr int64_t L = T::kLanes;
  V mx = T::Zero(), bad = T::Zero();
  for (int64_t c0 = 0; c0 < ldk; c0 += L) {
    V acc = T::Zero();
    for (int64_t d = 0; d < D; ++d) {
      const V x = T::Load(kt + d * ldk + c0);
      acc = T::Fma(x, x, acc);
    }
    bad = T::Add(bad, T::Sub(acc, acc));  // NaN once a sum is inf or NaN
    mx = T::Max(mx, acc);
  }
  if (!(T::Sum(bad) == 0.0f)) return INFINITY;
  return std::sqrt(double{T::HMax(mx)}) * 1.001;
}

// Row i's scores against keys [c_from, c_to) (whole vectors, c_to <= ldk) of the packed
// kt, then the steps on them, into s (R x ldk).
template <class T, int R>
inline void AtScoresAndSteps(const AttentionJob& j, const int64_t* idx, int64_t i0,
                             const float* kt, int64_t ldk, float* s, int64_t c_from,
                             int64_t c_to) {
  using V = typename T::V;
  constexpr int64_t L = T::kLanes;
  constexpr int NB = L == 16 ? 4 : 2;
  const float* q = j.q.p + AtOffset(j.q, idx, j.nb) + i0 * j.q.row;
  int64_t c0 = c_from;
  for (; c0 + NB * L <= c_to; c0 += NB * L)
    ScoreTile<T, R, NB>(q, j.q.row, j.q.col, kt, ldk, j.D, c0, s, ldk);
  for (; c0 < c_to; c0 += L) ScoreTile<T, R, 1>(q, j.q.row, j.q.col, kt, ldk, j.D, c0, s, ldk);
  for (int r = 0; r < R; ++r) {
    float* sr = s + r * ldk;
    const int64_t i = i0 + r;
    for (int o = 0; o < j.nops; ++o) {
      const int64_t op = j.ops[o];
      const V c = T::Set(op == kAtWhere ? j.fill : j.scale);
      const AtOperand& a = op == kAtAdd ? j.bias : j.mask;
      const float* row = (op == kAtAdd || op == kAtWhere)
                             ? a.p + AtOffset(a, idx, j.nb) + i * a.row
                             : nullptr;
      // One loop per kind of step (the branch out of the loop); padded lanes past Tk
      // are computed too and never read.
      if (op == kAtMul) {
        for (int64_t k0 = c_from; k0 < c_to; k0 += L)
          T::Store(sr + k0, T::Mul(T::Load(sr + k0), c));
      } else if (op == kAtDiv) {
        // x / c as x * (1 / c) and one correction (Markstein: the rounded quotient but in
        // rare double-rounding cases, within the step's bound either way), a division's
        // cost saved per vector. Where x * (1 / c) is not finite (x inf or NaN, c 0) it is
        // the quotient itself (the correction would be inf - inf).
        const V inv = T::Set(1.0f / j.scale);
        for (int64_t k0 = c_from; k0 < c_to; k0 += L) {
          const V x = T::Load(sr + k0);
          const V q0 = T::Mul(x, inv);
          const V y = T::Fma(T::Fnma(q0, c, x), inv, q0);
          T::Store(sr + k0, T::SelectNonZero(T::Sub(q0, q0), q0, y));
        }
      } else if (op == kAtAdd && a.col == 1) {
        for (int64_t k0 = c_from; k0 < c_to; k0 += L)
          T::Store(sr + k0, T::Add(T::Load(sr + k0), AtRowVector<T>(row, 1, k0, j.Tk)));
      } else if (op == kAtAdd) {
        for (int64_t k0 = c_from; k0 < c_to; k0 += L)
          T::Store(sr + k0, T::Add(T::Load(sr + k0), AtRowVector<T>(row, a.col, k0, j.Tk)));
      } else {
        for (int64_t k0 = c_from; k0 < c_to; k0 += L)
          T::Store(sr + k0, T::SelectNonZero(AtRowVector<T>(row, a.col, k0, j.Tk),
                                             T::Load(sr + k0), c));
      }
    }
  }
}

// Per-chunk facts AttentionRows computes when it first needs them (-1 until then).
struct AtChunkFacts {
  AtKeys vbad = {-1, -1};  // AtNonFiniteRows of the packed values
  double key_norm = -1.0;  // AtKeyNormMax of the packed keys
};

// R query rows from i0: their scores against the packed keys kt (D x ldk), the steps,
// the softmax and the product with the packed values vp, into y. s and e: R x ldk and
// R x Tk floats of scratch.
//
// Masked keys at either end of the tile's rows (causal attention, right or left padding,
// a sliding window, a cache's unwritten slots) are skipped where that gives the whole
// rows' result bit for bit. The computed keys run from the first key some row of the
// tile keeps (down to a whole vector, so that the sums' lanes stay the whole rows') to
// the last:
// - The where step last (j.skip == kAtSkipWhere): every score outside them is ``fill``
//   whatever q and k hold, so those scores are not computed; each row's maximum takes
//   ``fill`` in.
// - The add step last, after multiplies or divides only (kAtSkipAdd: an additive mask,
//   ``s + finfo.min`` or ``s - 10000``): before the add, row r's scores are at most
//   S_r = |factor| |q_r| max_j |k_j| in magnitude (Cauchy-Schwarz, with a margin for
//   rounding). The tile's keys at either end whose biases are all at most beta =
//   -(2 max_r S_r + 200) are not computed. Once the computed scores' maximum m_r is known,
//   S_r + beta < m_r - 100 in every row (with a margin for rounding) proves each
//   skipped score below m_r - 100: not the maximum, and its exp is 0. Otherwise the
//   rest of the scores are computed.
// Then, when exp(skipped score - max) is exactly 0 in every row (always, for the add
// case; for the where case with the usual -1e30, finfo.min or -inf fills), those keys
// add 0 to the sums and 0 * v to the products, so the exps and the product skip them
// too, but for the rows of v holding an inf or a NaN (0 * inf is NaN, as on XLA).
// Otherwise the scores are written as ``fill`` and the rows run whole. A row keeping no
// key at all (uniform weights) runs whole.
template <class T, int R>
inline void AttentionRows(const AttentionJob& j, const int64_t* idx, int64_t i0, const float* kt,
                          int64_t ldk, const float* vp, float* s, float* e, AtChunkFacts* facts) {
  constexpr int64_t L = T::kLanes;
  int64_t lo = 0, hi = j.Tk;  // the keys whose scores are computed
  double bound[R] = {}, beta = 0.0;
  // The tile's kept keys: from the first any row keeps to the last; all of them where a
  // row keeps none. A mask or bias broadcast over the query rows (row stride 0, as
  // padding is) is read once.
  const auto tile_keys = [&](int64_t row_stride, auto kept) {
    lo = j.Tk;
    hi = 0;
    for (int r = 0; r < (row_stride == 0 ? 1 : R); ++r) {
      const AtKeys k = kept(r);
      if (k.hi == 0) {
        lo = 0;
        hi = j.Tk;
        return;
      }
      lo = std::min(lo, k.lo);
      hi = std::max(hi, k.hi);
    }
  };
  if (j.skip == kAtSkipWhere) {
    const float* m = j.mask.p + AtOffset(j.mask, idx, j.nb) + i0 * j.mask.row;
    tile_keys(j.mask.row,
              [&](int r) { return AtKeptKeys<T>(m + r * j.mask.row, j.mask.col, j.Tk); });
  } else if (j.skip == kAtSkipAdd) {
    if (facts->key_norm < 0) facts->key_norm = AtKeyNormMax<T>(kt, ldk, j.D);
    const float* q = j.q.p + AtOffset(j.q, idx, j.nb) + i0 * j.q.row;
    double most = 0.0;
    for (int r = 0; r < R; ++r) {
      double qq = 0.0;
      for (int64_t d = 0; d < j.D; ++d) {
        const double x = q[r * j.q.row + d * j.q.col];
        qq += x * x;
      }
      bound[r] = j.scale_abs * std::sqrt(qq) * 1.001 * facts->key_norm;
      most = std::max(most, bound[r]);
    }
    beta = -(2.0 * most + 200.0);
    if (std::isfinite(beta) && beta > -3.0e38) {  // NaN q: no skipping
      const float* b = j.bias.p + AtOffset(j.bias, idx, j.nb) + i0 * j.bias.row;
      const float fb = static_cast<float>(beta);
      tile_keys(j.bias.row, [&](int r) {
        return AtBiasKeptKeys<T>(b + r * j.bias.row, j.bias.col, j.Tk, fb);
      });
    }
  }
  lo = lo / L * L;  // whole vectors: the sums' lanes stay those of the whole rows
  const int64_t hi_ld = (hi + L - 1) / L * L;
  AtScoresAndSteps<T, R>(j, idx, i0, kt, ldk, s, lo, hi_ld);
  float sums[R], maxes[R];
  int64_t kfrom = 0, kto = j.Tk;  // the keys the product with v runs over
  if (lo > 0 || hi < j.Tk) {
    bool zero = true;  // exp(skipped score - max) == 0 in every row
    for (int r = 0; r < R; ++r) {
      if (j.skip == kAtSkipWhere) {
        maxes[r] = RowMax<T>(s + r * ldk + lo, hi - lo, j.fill);
        alignas(64) float x[L];
        T::Store(x, SoftmaxExp<T>(T::Sub(T::Set(j.fill), T::Set(maxes[r]))));
        zero = zero && x[0] == 0.0f;
      } else {
        maxes[r] = RowMax<T>(s + r * ldk + lo, hi - lo, -INFINITY);
        // (false for NaN; the margin covers the roundings of s + bias and s - max)
        const double m = maxes[r];
        zero = zero && bound[r] + beta + 1e-6 * (std::fabs(beta) + std::fabs(m)) < m - 100.0;
      }
    }
    if (zero) {
      if (facts->vbad.hi < 0) facts->vbad = AtNonFiniteRows<T>(vp, j.Tk, j.Dv);
      kfrom = std::min(lo, facts->vbad.lo);
      kto = std::max(hi, facts->vbad.hi);
    } else if (j.skip == kAtSkipWhere) {
      for (int r = 0; r < R; ++r) {
        std::fill(s + r * ldk, s + r * ldk + lo, j.fill);
        std::fill(s + r * ldk + hi, s + r * ldk + j.Tk, j.fill);
      }
      lo = 0;
      hi = j.Tk;
    } else {
      AtScoresAndSteps<T, R>(j, idx, i0, kt, ldk, s, 0, lo);
      AtScoresAndSteps<T, R>(j, idx, i0, kt, ldk, s, hi_ld, ldk);
      lo = 0;
      hi = j.Tk;
    }
  }
  for (int r = 0; r < R; ++r) {
    float* er = e + r * j.Tk;
    if (lo > 0 || hi < j.Tk) {
      sums[r] = RowExpsFrom<T>(s + r * ldk + lo, hi - lo, maxes[r], er + lo);
      // exp(skipped score - max), as checked, where v's infs and NaNs need the zeros
      std::fill(er + kfrom, er + lo, 0.0f);
      std::fill(er + hi, er + kto, 0.0f);
    } else {
      sums[r] = RowExps<T>(s + r * ldk, j.Tk, er);
    }
  }
  float* y = const_cast<float*>(j.y.p) + AtOffset(j.y, idx, j.nb) + i0 * j.y.row;
  for (int64_t d0 = 0; d0 < j.Dv; d0 += 2 * L)
    SoftmaxDotTile<T, R>(e, j.Tk, kfrom, kto, vp, j.Dv, d0, sums, y, j.y.row);
}

template <class T>
void AttentionChunk(const void* ctx, int64_t c) {
  const AttentionJob& j = *static_cast<const AttentionJob*>(ctx);
  constexpr int64_t L = T::kLanes;
  int64_t g = c / j.qblocks;
  // The last query rows first: with causal masks they keep the most keys, and the
  // lighter chunks left for the end even out the threads' loads.
  const int64_t q0 = (j.qblocks - 1 - c % j.qblocks) * j.chunk_rows;
  const int64_t rows = std::min(j.Tq - q0, j.chunk_rows);
  int64_t idx[kAtMaxBatch] = {};
  for (int d = j.nb; d-- > 0;) {
    idx[d] = g % j.bsz[d];
    g /= j.bsz[d];
  }
  const int64_t ldk = (j.Tk + L - 1) / L * L;
  const size_t need = static_cast<size_t>(j.D * ldk + j.Tk * j.Dv + kSdRows * (ldk + j.Tk));
  if (t_at_buf.size() < need) t_at_buf.resize(need);
  float* kt = t_at_buf.data();
  float* vp = kt + j.D * ldk;
  float* s = vp + j.Tk * j.Dv;
  float* e = s + kSdRows * ldk;
  const float* k = j.k.p + AtOffset(j.k, idx, j.nb);
  int64_t t16 = 0, d16 = 0;  // keys and d's moved in 16 x 16 blocks (AVX512, d contiguous)
  if constexpr (L == 16) {
    if (j.k.col == 1) {
      t16 = j.Tk / 16 * 16;
      d16 = j.D / 16 * 16;
      for (int64_t t = 0; t < t16; t += 16)
        for (int64_t d = 0; d < d16; d += 16)
          T::Transpose16(k + t * j.k.row + d, j.k.row, kt + d * ldk + t, ldk);
    }
  }
  for (int64_t d = 0; d < j.D; ++d) {
    float* dst = kt + d * ldk;
    for (int64_t t = d < d16 ? t16 : 0; t < j.Tk; ++t) dst[t] = k[t * j.k.row + d * j.k.col];
    std::fill(dst + j.Tk, dst + ldk, 0.0f);
  }
  const float* v = j.v.p + AtOffset(j.v, idx, j.nb);
  for (int64_t t = 0; t < j.Tk; ++t) {
    if (j.v.col == 1) {
      std::copy(v + t * j.v.row, v + t * j.v.row + j.Dv, vp + t * j.Dv);
    } else {
      for (int64_t d = 0; d < j.Dv; ++d) vp[t * j.Dv + d] = v[t * j.v.row + d * j.v.col];
    }
  }
  AtChunkFacts facts;
  for (int64_t r = 0; r < rows; r += kSdRows) {
    const int64_t i0 = q0 + r;
    switch (std::min(kSdRows, rows - r)) {
      case 4: AttentionRows<T, 4>(j, idx, i0, kt, ldk, vp, s, e, &facts); break;
      case 3: AttentionRows<T, 3>(j, idx, i0, kt, ldk, vp, s, e, &facts); break;
      case 2: AttentionRows<T, 2>(j, idx, i0, kt, ldk, vp, s, e, &facts); break;
      default: AttentionRows<T, 1>(j, idx, i0, kt, ldk, vp, s, e, &facts); break;
    }
  }
}

// The FFI body, for either vector type. dims: [nb, batch sizes (nb), Tq, Tk, D, Dv];
// strides: for q, k, v, bias, mask and y in turn, nb batch strides, then the row's and
// the column's (y's column stride must be 1); ops: the steps (kAtMul ... kAtWhere).
// bias, mask and scale may be empty where no step reads them.
template <class T>
xla::ffi::Error ScoresSoftmaxDotBody(
    xla::ffi::Buffer<xla::ffi::F32> q, xla::ffi::Buffer<xla::ffi::F32> k,
    xla::ffi::Buffer<xla::ffi::F32> v, xla::ffi::Buffer<xla::ffi::F32> bias,
    xla::ffi::Buffer<xla::ffi::F32> mask, xla::ffi::Buffer<xla::ffi::F32> scale,
    xla::ffi::ResultBuffer<xla::ffi::F32> y, xla::ffi::Span<const int64_t> dims,
    xla::ffi::Span<const int64_t> strides, xla::ffi::Span<const int64_t> ops, float fill,
    xla::ffi::ThreadPool xla_pool) {
  const auto bad = [](const char* why) {
    return xla::ffi::Error::InvalidArgument(std::string("jqx_scores_softmax_dot: ") + why);
  };
  if (dims.size() < 1) return bad("empty dims");
  const int nb = static_cast<int>(dims[0]);
  if (nb < 0 || nb > kAtMaxBatch || dims.size() != static_cast<size_t>(nb + 5) ||
      strides.size() != static_cast<size_t>(6 * (nb + 2)) || ops.size() > 4)
    return bad("dims, strides or ops of the wrong length");
  AttentionJob j{};
  j.nb = nb;
  int64_t G = 1;
  for (int d = 0; d < nb; ++d) {
    j.bsz[d] = dims[1 + d];
    G *= j.bsz[d];
  }
  j.Tq = dims[nb + 1];
  j.Tk = dims[nb + 2];
  j.D = dims[nb + 3];
  j.Dv = dims[nb + 4];
  for (int64_t x : dims)
    if (x < 0) return bad("negative dims");
  xla::ffi::Buffer<xla::ffi::F32>* bufs[5] = {&q, &k, &v, &bias, &mask};
  AtOperand* operands[6] = {&j.q, &j.k, &j.v, &j.bias, &j.mask, &j.y};
  // Each operand's sizes (batch..., rows, columns) and the largest element it reads.
  const int64_t rows[6] = {j.Tq, j.Tk, j.Tk, j.Tq, j.Tq, j.Tq};
  const int64_t cols[6] = {j.D, j.D, j.Dv, j.Tk, j.Tk, j.Dv};
  bool uses[6] = {true, true, true, false, false, true};
  for (size_t o = 0; o < ops.size(); ++o) {
    if (ops[o] < kAtMul || ops[o] > kAtWhere) return bad("unknown op");
    if (ops[o] == kAtAdd) uses[3] = true;
    if (ops[o] == kAtWhere) uses[4] = true;
    j.ops[o] = ops[o];
  }
  j.nops = static_cast<int>(ops.size());
  const bool scaled = std::any_of(ops.begin(), ops.end(),
                                  [](int64_t o) { return o == kAtMul || o == kAtDiv; });
  if (scaled && scale.element_count() < 1) return bad("a scale step without a scale");
  j.scale = scaled ? scale.typed_data()[0] : 1.0f;
  j.fill = fill;
  j.skip = kAtSkipNone;
  j.scale_abs = 1.0;
  if (j.nops > 0 && j.ops[j.nops - 1] == kAtWhere && fill < INFINITY) j.skip = kAtSkipWhere;
  if (j.nops > 0 && j.ops[j.nops - 1] == kAtAdd &&
      std::all_of(j.ops, j.ops + j.nops - 1, [](int64_t o) { return o == kAtMul || o == kAtDiv; })) {
    j.skip = kAtSkipAdd;
    if (scaled) j.scale_abs = std::fabs(ops[0] == kAtMul ? double{j.scale} : 1.0 / j.scale);
  }
  const bool empty = G == 0 || j.Tq == 0 || j.Dv == 0;
  for (int o = 0; o < 6; ++o) {
    const int64_t* st = strides.begin() + o * (nb + 2);
    AtOperand& a = *operands[o];
    a.p = o < 5 ? bufs[o]->typed_data() : y->typed_data();
    int64_t last = 0;
    for (int d = 0; d < nb; ++d) {
      a.b[d] = st[d];
      last += (j.bsz[d] - 1) * st[d];
    }
    a.row = st[nb];
    a.col = st[nb + 1];
    last += (rows[o] - 1) * a.row + (cols[o] - 1) * a.col;
    for (int d = 0; d < nb + 2; ++d)
      if (st[d] < 0) return bad("negative strides");
    const int64_t n = o < 5 ? static_cast<int64_t>(bufs[o]->element_count())
                            : static_cast<int64_t>(y->element_count());
    if (uses[o] && !empty && rows[o] > 0 && cols[o] > 0 && last >= n)
      return bad("strides reach past an operand's end");
  }
  if (j.y.col != 1) return bad("y's column stride must be 1");
  if (empty) return xla::ffi::Error::Success();
  if (j.Tk == 0) {  // an empty softmax: 0 / 0
    for (int64_t g = 0; g < G; ++g) {
      int64_t idx[kAtMaxBatch] = {}, rem = g;
      for (int d = nb; d-- > 0;) {
        idx[d] = rem % j.bsz[d];
        rem /= j.bsz[d];
      }
      for (int64_t i = 0; i < j.Tq; ++i) {
        float* row = const_cast<float*>(j.y.p) + AtOffset(j.y, idx, nb) + i * j.y.row;
        std::fill(row, row + j.Dv, NAN);
      }
    }
    return xla::ffi::Error::Success();
  }
  // Whole query ranges per chunk (each chunk packs its g's k and v once), halved while
  // there are fewer than kAtChunksPerThread chunks per thread, down to 16 rows.
  j.chunk_rows = j.Tq;
  const int64_t want = kAtChunksPerThread * GetPool()->threads();
  while (j.chunk_rows > 16 && G * ((j.Tq + j.chunk_rows - 1) / j.chunk_rows) < want)
    j.chunk_rows = (j.chunk_rows + 1) / 2;
  j.qblocks = (j.Tq + j.chunk_rows - 1) / j.chunk_rows;
  const int64_t chunks = G * j.qblocks;
  XlaPoolScope xla_scope(xla_pool, G * j.Tq > kXlaPoolRows);
  if (G * j.Tq * j.Tk * (j.D + j.Dv + 8) < (int64_t{1} << 16)) {
    for (int64_t c = 0; c < chunks; ++c) AttentionChunk<T>(&j, c);
  } else {
    GetPool()->Run(AttentionChunk<T>, &j, chunks);
  }
  return xla::ffi::Error::Success();
}

#define JQX_SCORES_SOFTMAX_DOT_BINDING                        \
  xla::ffi::Ffi::Bind()                                       \
      .Arg<xla::ffi::Buffer<xla::ffi::F32>>()                 \
      .Arg<xla::ffi::Buffer<xla::ffi::F32>>()                 \
      .Arg<xla::ffi::Buffer<xla::ffi::F32>>()                 \
      .Arg<xla::ffi::Buffer<xla::ffi::F32>>()                 \
      .Arg<xla::ffi::Buffer<xla::ffi::F32>>()                 \
      .Arg<xla::ffi::Buffer<xla::ffi::F32>>()                 \
      .Ret<xla::ffi::Buffer<xla::ffi::F32>>()                 \
      .Attr<xla::ffi::Span<const int64_t>>("dims")            \
      .Attr<xla::ffi::Span<const int64_t>>("strides")         \
      .Attr<xla::ffi::Span<const int64_t>>("ops")             \
      .Attr<float>("fill")                                    \
      .Ctx<xla::ffi::ThreadPool>()

}  // namespace

#endif  // JQX_KERNELS_CPU_SOFTMAX_DOT_H_
