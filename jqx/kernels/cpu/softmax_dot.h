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
  static float Sum(V v) {  // the same pairwise order as SdAvx2::Sum on each half
    const __m256 lo = _mm512_castps512_ps256(v);
    const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
    return SdAvx2::Sum(_mm256_add_ps(lo, hi));
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

// The exps exp(s - max(s)) of one row of scores s into e (K floats), and their sum.
// s - max is one IEEE subtraction, as in jax.nn.softmax, so the exps' inputs are the
// bits XLA's softmax exponentiates. A NaN (or +inf) in the row makes its exps, and so
// its outputs, NaN whichever lane the maximum keeps; a row of -inf gives NaN too
// (-inf - -inf), as jax.nn.softmax does.
template <class T>
inline float RowExps(const float* s, int64_t K, float* e) {
  using V = typename T::V;
  constexpr int64_t L = T::kLanes;
  const int64_t tail = K % L;
  const typename T::M mt = T::Mask(tail);
  V mx = T::Set(-INFINITY);
  int64_t k = 0;
  for (; k + L <= K; k += L) mx = T::Max(mx, T::Load(s + k));
  if (tail) mx = T::Max(mx, T::LoadNOr(s + k, mt, -INFINITY));
  const V m = T::Set(T::HMax(mx));
  V acc = T::Zero();
  for (k = 0; k + L <= K; k += L) {
    const V p = SoftmaxExp<T>(T::Sub(T::Load(s + k), m));
    T::Store(e + k, p);
    acc = T::Add(acc, p);
  }
  if (tail) {
    // Masked-off lanes load 0: zeroed before they reach the sum.
    const V x = T::Sub(T::LoadN(s + k, mt), m);
    const V p = T::Keep(SoftmaxExp<T>(x), mt);
    T::StoreN(e + k, mt, p);
    acc = T::Add(acc, p);
  }
  return T::Sum(acc);
}

// y rows [0, R) (R <= kSdRows), columns [d0, d0 + 2 lanes) cut at D, from the rows'
// exps e (stride K) and sums.
template <class T, int R>
inline void SoftmaxDotTile(const float* e, int64_t K, const float* v, int64_t D, int64_t d0,
                           const float* sums, float* y) {
  using V = typename T::V;
  constexpr int64_t L = T::kLanes;
  const typename T::M m0 = T::Mask(std::min<int64_t>(L, std::max<int64_t>(0, D - d0)));
  const typename T::M m1 = T::Mask(std::min<int64_t>(L, std::max<int64_t>(0, D - d0 - L)));
  const bool full = d0 + 2 * L <= D;
  V acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = T::Zero();
  const float* vk = v + d0;
  for (int64_t k = 0; k < K; ++k, vk += D) {
    const V v0 = full ? T::Load(vk) : T::LoadN(vk, m0);
    const V v1 = full ? T::Load(vk + L) : T::LoadN(vk + L, m1);
    for (int r = 0; r < R; ++r) {
      const V p = T::Bcast(e + r * K + k);
      acc[r][0] = T::Fma(p, v0, acc[r][0]);
      acc[r][1] = T::Fma(p, v1, acc[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) {
    const V t = T::Set(sums[r]);
    float* yr = y + r * D + d0;
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
        case 4: SoftmaxDotTile<T, 4>(er, j.K, v, j.D, d0, sums + r, yr); break;
        case 3: SoftmaxDotTile<T, 3>(er, j.K, v, j.D, d0, sums + r, yr); break;
        case 2: SoftmaxDotTile<T, 2>(er, j.K, v, j.D, d0, sums + r, yr); break;
        default: SoftmaxDotTile<T, 1>(er, j.K, v, j.D, d0, sums + r, yr); break;
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

}  // namespace

#endif  // JQX_KERNELS_CPU_SOFTMAX_DOT_H_
