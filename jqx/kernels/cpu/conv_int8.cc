// W8A8 int8 2-D convolution, NHWC input x HWIO int8 kernel -> NHWC float32, as an
// XLA FFI custom call for x86 CPUs with AVX2 (jqx.ops.conv's "native.conv_int8").
// The same library holds jqx_w8a8_gemm (its section below): the dense W8A8
// product (M, K) x (K, N) with the activation quantization fused in, on the same
// quantizer and register tiles (jqx.ops' "native.w8a8_fused").
//
// y[n, oh, ow, o] = xs[n] * ws[o] * sum_{i, j, c} qx[n, oh*sh + i*dh - ph,
//                                              ow*sw + j*dw - pw, c] * qw[i, j, c, o]
//
// Numerics: bit-identical to jqx.ops.conv's XLA path (xla.conv_int8), not just
// close: the activation codes are formed as XLA:CPU forms them and the window sums
// are exact int32.
//   - scale: static (the calibrated act_scale, an input), per tensor or per sample
//     (N): s = max|x| * (1 / 127), 1 where that is 0 (jqx.core.numerics.absmax_scale;
//     XLA:CPU divides by multiplying with the correctly rounded reciprocal, so
//     the kernel does the same);
//   - codes: round_half_even((x * c) * (1 / (s * c))) clamped to [-128, 127], c =
//     2^-64 for scales above 2^100, else 1 (numerics.div_by_scale);
//   - rescale: float(acc) * xs[n], then * ws[o], in that order, as the XLA path.
//
// Passes: (1) max|x| (dynamic scales only); (2) x quantized into a zero-padded
// int16 image (N, Hp, Wp, Cp), channels rounded up to even (a zero channel), so
// the padding is real zeros and no window read needs a bounds check; (3) the
// implicit GEMM (no im2col): positions x output channels, K = taps x channel
// pairs, the rescale fused in its epilogue.
//
// Inner loop: vpmaddwd on int16 pairs (16 exact int8 x int8 products summed into
// 8 int32 lanes per instruction). Unlike vpmaddubsw it needs no unsigned operand
// and cannot saturate, so every int8 code (the static scale's -128 included) is
// exact. The kernel is packed once per call into [16-channel block][tap][channel
// pair][16][2] int16 (a few microseconds at CNN sizes, against the GEMM's
// hundreds); a tile of MR = 6 positions x 16 channels keeps 12 accumulators in
// registers, each broadcast activation pair serving 16 channels and each weight
// vector 6 positions.
//
// Threads: the persistent pool of pool.h (shared with the other native
// libraries; sized by the CPU affinity mask or $JQX_NUM_THREADS) over chunks of
// positions; the chunks
// split positions only, so the result does not depend on the number of threads.
//
// Built on first use by jqx/kernels/cpu/native.py (g++ -O3 -mavx2 -mfma);
// jqx_conv_cpu_supported() is checked before registering it.

#include <immintrin.h>
#include <math.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

#include "pool.h"
#include "w8a8.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kMR = 6;   // positions per register tile
constexpr int kNR = 16;  // output channels per register tile (two vectors)
// Below this many multiply-adds a call runs on the calling thread: waking the
// workers costs more than they save.
constexpr int64_t kInlineWork = int64_t{1} << 18;
// Multiply-adds per chunk of a threaded call (some tens of microseconds).
constexpr int64_t kChunkWork = int64_t{1} << 19;

// ------------------------------------------------------------------ quantize

// max|x|, inf where x holds a NaN (numerics.nan_max): max_ps alone would drop it.
float AbsMax(const float* x, int64_t n) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 m0 = _mm256_setzero_ps(), m1 = _mm256_setzero_ps();
  __m256 nan = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256 a = _mm256_andnot_ps(sign, _mm256_loadu_ps(x + i));
    const __m256 b = _mm256_andnot_ps(sign, _mm256_loadu_ps(x + i + 8));
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(a, b, _CMP_UNORD_Q));
    m0 = _mm256_max_ps(m0, a);
    m1 = _mm256_max_ps(m1, b);
  }
  if (_mm256_movemask_ps(nan) != 0) return INFINITY;
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, _mm256_max_ps(m0, m1));
  float m = 0.0f;
  for (float v : lanes) m = std::max(m, v);
  for (; i < n; ++i) {
    if (std::isnan(x[i])) return INFINITY;
    m = std::max(m, fabsf(x[i]));
  }
  return m;
}

// A NaN's code is 0, as XLA converts NaN to an integer (the row's inf scale makes
// its products NaN; under a static scale the result is XLA's).
inline int16_t Code(float x, Quant q) {
  float v = nearbyintf((x * q.c) * q.inv);  // ties to even (default rounding)
  if (std::isnan(v)) return 0;
  v = std::min(127.0f, std::max(-128.0f, v));
  return static_cast<int16_t>(v);
}

// n contiguous floats -> n int16 codes; returns whether x holds a NaN (a static
// scale then becomes NaN for the row: numerics.keep_nan_rows).
bool QuantizeRun(const float* x, int16_t* dst, int64_t n, Quant q) {
  const __m256 c = _mm256_set1_ps(q.c), inv = _mm256_set1_ps(q.inv);
  const __m256 lo = _mm256_set1_ps(-128.0f), hi = _mm256_set1_ps(127.0f);
  __m256 nan = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256 xa = _mm256_loadu_ps(x + i), xb = _mm256_loadu_ps(x + i + 8);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(xa, xb, _CMP_UNORD_Q));
    __m256 a = _mm256_mul_ps(_mm256_mul_ps(xa, c), inv);
    __m256 b = _mm256_mul_ps(_mm256_mul_ps(xb, c), inv);
    a = _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    b = _mm256_round_ps(b, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    // NaN lanes to 0 (Code), then clamped.
    a = _mm256_min_ps(hi, _mm256_max_ps(lo, _mm256_and_ps(a, _mm256_cmp_ps(a, a, _CMP_ORD_Q))));
    b = _mm256_min_ps(hi, _mm256_max_ps(lo, _mm256_and_ps(b, _mm256_cmp_ps(b, b, _CMP_ORD_Q))));
    // packs interleaves 128-bit lanes: [a0 b0 a1 b1] -> reorder to [a0 a1 b0 b1].
    const __m256i p = _mm256_packs_epi32(_mm256_cvtps_epi32(a), _mm256_cvtps_epi32(b));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                        _mm256_permute4x64_epi64(p, 0xD8));
  }
  bool has_nan = _mm256_movemask_ps(nan) != 0;
  for (; i < n; ++i) {
    has_nan = has_nan || std::isnan(x[i]);
    dst[i] = Code(x[i], q);
  }
  return has_nan;
}

// ------------------------------------------------------------------ GEMM

struct Job {
  const int16_t* xq;  // (N, Hp, Wp, Cp)
  const int16_t* wp;  // packed kernel, [O / 16][T][Cp / 2][16][2]
  const float* ws;    // (Opad) weight scales, zero-padded
  const float* xs;    // (N) activation scale per sample (or one, repeated)
  float* y;           // (N, Ho, Wo, O)
  const int64_t* tapoff;
  int64_t T, CP2, O, Opad, Ho, Wo, Hp, Wp, Cp, sh, sw;
  int64_t P;          // positions N * Ho * Wo
  int64_t chunk_pos;  // positions per chunk (a multiple of kMR)
};

inline const int16_t* Origin(const Job& j, int64_t p) {
  const int64_t hw = j.Ho * j.Wo;
  const int64_t n = p / hw, r = p % hw, oh = r / j.Wo, ow = r % j.Wo;
  return j.xq + ((n * j.Hp + oh * j.sh) * j.Wp + ow * j.sw) * j.Cp;
}

template <int MR>
void Tile(const Job& j, int64_t p0, int64_t ob) {
  const int16_t* a[MR];
  for (int m = 0; m < MR; ++m) a[m] = Origin(j, p0 + m);
  __m256i acc[MR][2];
  for (int m = 0; m < MR; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_si256();
  const int16_t* w = j.wp + ob * j.T * j.CP2 * 2 * kNR;
  for (int64_t t = 0; t < j.T; ++t) {
    const int64_t off = j.tapoff[t];
    for (int64_t c = 0; c < j.CP2; ++c, w += 2 * kNR) {
      const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
      const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + kNR));
      for (int m = 0; m < MR; ++m) {
        int32_t pair;
        memcpy(&pair, a[m] + off + 2 * c, sizeof(pair));
        const __m256i b = _mm256_set1_epi32(pair);
        acc[m][0] = _mm256_add_epi32(acc[m][0], _mm256_madd_epi16(b, w0));
        acc[m][1] = _mm256_add_epi32(acc[m][1], _mm256_madd_epi16(b, w1));
      }
    }
  }
  const int64_t o0 = ob * kNR;
  const int64_t width = std::min<int64_t>(kNR, j.O - o0);
  const int64_t hw = j.Ho * j.Wo;
  const __m256 ws0 = _mm256_loadu_ps(j.ws + o0), ws1 = _mm256_loadu_ps(j.ws + o0 + 8);
  for (int m = 0; m < MR; ++m) {
    const __m256 xs = _mm256_set1_ps(j.xs[(p0 + m) / hw]);
    // (acc * xs) * ws, the XLA path's order: bit-identical results.
    const __m256 f0 = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(acc[m][0]), xs), ws0);
    const __m256 f1 = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(acc[m][1]), xs), ws1);
    float* dst = j.y + (p0 + m) * j.O + o0;
    if (width == kNR) {
      _mm256_storeu_ps(dst, f0);
      _mm256_storeu_ps(dst + 8, f1);
    } else {
      alignas(32) float tmp[kNR];
      _mm256_store_ps(tmp, f0);
      _mm256_store_ps(tmp + 8, f1);
      memcpy(dst, tmp, static_cast<size_t>(width) * sizeof(float));
    }
  }
}

void TileAny(const Job& j, int64_t p0, int64_t ob, int64_t mr) {
  switch (mr) {
    case 6: return Tile<6>(j, p0, ob);
    case 5: return Tile<5>(j, p0, ob);
    case 4: return Tile<4>(j, p0, ob);
    case 3: return Tile<3>(j, p0, ob);
    case 2: return Tile<2>(j, p0, ob);
    default: return Tile<1>(j, p0, ob);
  }
}

void GemmChunk(const void* ctx, int64_t chunk) {
  const Job& j = *static_cast<const Job*>(ctx);
  const int64_t p_begin = chunk * j.chunk_pos;
  const int64_t p_end = std::min(j.P, p_begin + j.chunk_pos);
  // Channel blocks outside: one block's packed weights stay in L1 over the chunk.
  for (int64_t ob = 0; ob < j.Opad / kNR; ++ob)
    for (int64_t p = p_begin; p < p_end; p += kMR) TileAny(j, p, ob, std::min<int64_t>(kMR, p_end - p));
}

// Scratch reused across calls on a thread (no allocation, no page faults per call).
thread_local std::vector<int16_t> t_xq, t_wp;
thread_local std::vector<float> t_ws, t_xs;
thread_local std::vector<int64_t> t_tapoff;

ffi::Error ConvInt8Impl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w,
                        ffi::Buffer<ffi::F32> wscale, ffi::Buffer<ffi::F32> act_scale,
                        ffi::ResultBuffer<ffi::F32> out, int64_t sh, int64_t sw, int64_t ph,
                        int64_t pw, int64_t dh, int64_t dw, int64_t mode,
                        ffi::ThreadPool xla_pool) {
  XlaPoolScope xla_scope(xla_pool, RowsOf(x.dimensions()) > kXlaPoolRows);
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  const auto od = out->dimensions();
  if (xd.size() != 4 || wd.size() != 4 || od.size() != 4 || wscale.dimensions().size() != 1)
    return ffi::Error::InvalidArgument(
        "jqx_conv_int8: x, w and out must be 4-D (NHWC, HWIO, NHWC), wscale 1-D");
  const int64_t N = xd[0], H = xd[1], W = xd[2], C = xd[3];
  const int64_t KH = wd[0], KW = wd[1], O = wd[3];
  const int64_t Ho = od[1], Wo = od[2];
  if (wd[2] != C || od[0] != N || od[3] != O || wscale.dimensions()[0] != O || sh < 1 ||
      sw < 1 || dh < 1 || dw < 1 || ph < 0 || pw < 0 || mode < kStatic || mode > kPerSample ||
      (mode == kStatic && act_scale.element_count() != 1))
    return ffi::Error::InvalidArgument("jqx_conv_int8: inconsistent shapes or attributes");
  if (N == 0 || Ho == 0 || Wo == 0 || O == 0) return ffi::Error::Success();
  const int64_t Cp = C + (C & 1), CP2 = Cp / 2, T = KH * KW;
  const int64_t Hp = (Ho - 1) * sh + (KH - 1) * dh + 1;
  const int64_t Wp = (Wo - 1) * sw + (KW - 1) * dw + 1;
  const int64_t Opad = (O + kNR - 1) / kNR * kNR;
  const float* X = x.typed_data();
  const int8_t* Wt = w.typed_data();

  // Scales per sample.
  t_xs.resize(static_cast<size_t>(N));
  if (mode == kStatic) {
    std::fill(t_xs.begin(), t_xs.end(), act_scale.typed_data()[0]);
  } else if (mode == kPerTensor) {
    std::fill(t_xs.begin(), t_xs.end(), DynamicScale(AbsMax(X, N * H * W * C)));
  } else {
    for (int64_t n = 0; n < N; ++n) t_xs[n] = DynamicScale(AbsMax(X + n * H * W * C, H * W * C));
  }

  // Pass 2: the zero-padded int16 image of the codes.
  t_xq.resize(static_cast<size_t>(N * Hp * Wp * Cp));
  int16_t* XQ = t_xq.data();
  for (int64_t n = 0; n < N; ++n) {
    const Quant q = QuantOf(t_xs[n]);
    bool has_nan = false;  // a static scale becomes NaN for the image: numerics.keep_nan_rows
    for (int64_t r = 0; r < Hp; ++r) {
      int16_t* row = XQ + (n * Hp + r) * Wp * Cp;
      const int64_t hr = r - ph;
      if (hr < 0 || hr >= H) {
        memset(row, 0, static_cast<size_t>(Wp * Cp) * sizeof(int16_t));
        continue;
      }
      const float* src = X + ((n * H + hr) * W) * C;
      const int64_t c0 = std::min(pw, Wp);                 // left padding columns
      const int64_t c1 = std::min(Wp, pw + W);             // end of the input columns
      memset(row, 0, static_cast<size_t>(c0 * Cp) * sizeof(int16_t));
      if (c1 > c0) {
        if (Cp == C) {
          has_nan |= QuantizeRun(src, row + c0 * Cp, (c1 - c0) * C, q);
        } else {
          for (int64_t col = c0; col < c1; ++col) {
            has_nan |= QuantizeRun(src + (col - pw) * C, row + col * Cp, C, q);
            row[col * Cp + C] = 0;
          }
        }
      }
      const int64_t tail = Wp - std::max(c0, c1);
      if (tail > 0)
        memset(row + std::max(c0, c1) * Cp, 0, static_cast<size_t>(tail * Cp) * sizeof(int16_t));
    }
    if (mode == kStatic && has_nan) t_xs[n] = NAN;
  }

  // The kernel packed as the inner loop reads it, zero channels and outputs padded.
  t_wp.assign(static_cast<size_t>(Opad * T * Cp), 0);
  int16_t* WP = t_wp.data();
  for (int64_t ob = 0; ob < Opad / kNR; ++ob)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t c = 0; c < C; ++c) {
        const int8_t* src = Wt + (t * C + c) * O;
        int16_t* dst = WP + ((ob * T + t) * CP2 + c / 2) * 2 * kNR + (c & 1);
        const int64_t o_end = std::min<int64_t>(kNR, O - ob * kNR);
        for (int64_t o = 0; o < o_end; ++o) dst[2 * o] = src[ob * kNR + o];
      }
  t_ws.assign(static_cast<size_t>(Opad), 0.0f);
  std::copy(wscale.typed_data(), wscale.typed_data() + O, t_ws.begin());
  t_tapoff.resize(static_cast<size_t>(T));
  for (int64_t i = 0; i < KH; ++i)
    for (int64_t jj = 0; jj < KW; ++jj) t_tapoff[i * KW + jj] = (i * dh * Wp + jj * dw) * Cp;

  Job job{XQ, WP, t_ws.data(), t_xs.data(), out->typed_data(), t_tapoff.data(),
          T,  CP2, O, Opad, Ho, Wo, Hp, Wp, Cp, sh, sw, N * Ho * Wo, 0};
  const int64_t per_pos = T * Cp * Opad;  // multiply-adds per output position
  const int64_t work = job.P * per_pos;
  int64_t tiles = std::max<int64_t>(1, kChunkWork / (per_pos * kMR));
  job.chunk_pos = tiles * kMR;
  const int64_t chunks = (job.P + job.chunk_pos - 1) / job.chunk_pos;
  if (work < kInlineWork) {
    for (int64_t c = 0; c < chunks; ++c) GemmChunk(&job, c);
  } else {
    GetPool()->Run(GemmChunk, &job, chunks);
  }
  return ffi::Error::Success();
}

// ------------------------------------------------------------------ W8A8 dense GEMM
// jqx_w8a8_gemm: y (M, N) f32 = (xs[m] * ws[n]) applied to the exact int32 sums
// of codes(x) (M, K) . w (K, N) int8, the activation quantization fused in: each
// chunk of rows computes its rows' scales (per token: max|x| of the row; per
// tensor: one pass over x before the job; static: the given scale), writes the
// codes into a small per-thread int16 buffer and runs the register tiles over
// every 16-column block of the weight, so x is read once from memory and its
// codes never leave the cache. Same codes, sums and rescale order as the conv
// kernel above (and so as jqx.ops' XLA W8A8 path), bit for bit.
//
// The weight is packed per call into [N / 16][K / 2][16][2] int16 (the tile's
// order) in a per-thread buffer kept across calls: no allocation per call. The
// packing reads the weight once (K * N bytes); at the sizes the dispatcher
// sends here it is a small part of the call (docs/internals/native-kernels.md).

struct DenseJob {
  const float* x;     // (M, K)
  const int16_t* wp;  // packed weight, [Npad / 16][Cp / 2][16][2]
  const float* ws;    // (Npad) weight scales, zero-padded
  float* y;           // (M, N)
  int64_t M, K, Cp, N, Npad;
  int64_t mode;
  float scale;        // kStatic / kPerTensor: the one activation scale
  int64_t chunk_rows; // rows per chunk (a multiple of kMR)
};

template <int MR>
void DenseTile(const DenseJob& j, const int16_t* xq, const float* xs, int64_t r0, int64_t ob) {
  __m256i acc[MR][2];
  for (int m = 0; m < MR; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_si256();
  const int16_t* w = j.wp + ob * j.Cp * kNR;
  const int64_t cp2 = j.Cp / 2;
  for (int64_t c = 0; c < cp2; ++c, w += 2 * kNR) {
    const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
    const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + kNR));
    for (int m = 0; m < MR; ++m) {
      int32_t pair;
      memcpy(&pair, xq + m * j.Cp + 2 * c, sizeof(pair));
      const __m256i b = _mm256_set1_epi32(pair);
      acc[m][0] = _mm256_add_epi32(acc[m][0], _mm256_madd_epi16(b, w0));
      acc[m][1] = _mm256_add_epi32(acc[m][1], _mm256_madd_epi16(b, w1));
    }
  }
  const int64_t o0 = ob * kNR;
  const int64_t width = std::min<int64_t>(kNR, j.N - o0);
  const __m256 ws0 = _mm256_loadu_ps(j.ws + o0), ws1 = _mm256_loadu_ps(j.ws + o0 + 8);
  for (int m = 0; m < MR; ++m) {
    const __m256 s = _mm256_set1_ps(xs[m]);
    // (acc * xs) * ws, the XLA path's order: bit-identical results.
    const __m256 f0 = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(acc[m][0]), s), ws0);
    const __m256 f1 = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(acc[m][1]), s), ws1);
    float* dst = j.y + (r0 + m) * j.N + o0;
    if (width == kNR) {
      _mm256_storeu_ps(dst, f0);
      _mm256_storeu_ps(dst + 8, f1);
    } else {
      alignas(32) float tmp[kNR];
      _mm256_store_ps(tmp, f0);
      _mm256_store_ps(tmp + 8, f1);
      memcpy(dst, tmp, static_cast<size_t>(width) * sizeof(float));
    }
  }
}

void DenseTileAny(const DenseJob& j, const int16_t* xq, const float* xs, int64_t r0, int64_t ob,
                  int64_t mr) {
  switch (mr) {
    case 6: return DenseTile<6>(j, xq, xs, r0, ob);
    case 5: return DenseTile<5>(j, xq, xs, r0, ob);
    case 4: return DenseTile<4>(j, xq, xs, r0, ob);
    case 3: return DenseTile<3>(j, xq, xs, r0, ob);
    case 2: return DenseTile<2>(j, xq, xs, r0, ob);
    default: return DenseTile<1>(j, xq, xs, r0, ob);
  }
}

// Per-thread scratch of a chunk (its rows' codes and scales), kept across calls.
thread_local std::vector<int16_t> t_dense_xq;
thread_local std::vector<float> t_dense_xs;

void DenseChunk(const void* ctx, int64_t chunk) {
  const DenseJob& j = *static_cast<const DenseJob*>(ctx);
  const int64_t r_begin = chunk * j.chunk_rows;
  const int64_t rows = std::min(j.M, r_begin + j.chunk_rows) - r_begin;
  if (t_dense_xq.size() < static_cast<size_t>(j.chunk_rows * j.Cp))
    t_dense_xq.resize(static_cast<size_t>(j.chunk_rows * j.Cp));
  if (t_dense_xs.size() < static_cast<size_t>(j.chunk_rows))
    t_dense_xs.resize(static_cast<size_t>(j.chunk_rows));
  int16_t* xq = t_dense_xq.data();
  float* xs = t_dense_xs.data();
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = j.x + (r_begin + r) * j.K;
    const float s = j.mode == kPerSample ? DynamicScale(AbsMax(xr, j.K)) : j.scale;
    const bool has_nan = QuantizeRun(xr, xq + r * j.Cp, j.K, QuantOf(s));
    xs[r] = j.mode == kStatic && has_nan ? NAN : s;  // numerics.keep_nan_rows
    if (j.Cp != j.K) xq[r * j.Cp + j.K] = 0;  // the zero channel pairs with a zero weight row
  }
  // Column blocks outside: one block's packed weight stays in L1 over the chunk's rows.
  for (int64_t ob = 0; ob < j.Npad / kNR; ++ob)
    for (int64_t r = 0; r < rows; r += kMR)
      DenseTileAny(j, xq + r * j.Cp, xs + r, r_begin + r, ob, std::min<int64_t>(kMR, rows - r));
}

thread_local std::vector<int16_t> t_dense_wp;
thread_local std::vector<float> t_dense_ws;

ffi::Error W8A8GemmImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w,
                        ffi::Buffer<ffi::F32> wscale, ffi::Buffer<ffi::F32> act_scale,
                        ffi::ResultBuffer<ffi::F32> out, int64_t mode,
                        ffi::ThreadPool xla_pool) {
  XlaPoolScope xla_scope(xla_pool, RowsOf(x.dimensions()) > kXlaPoolRows);
  if (auto err = CheckDenseW8A8("jqx_w8a8_gemm", x, w, wscale, act_scale, *out, mode);
      err.failure())
    return err;
  const int64_t M = x.dimensions()[0], K = x.dimensions()[1], N = w.dimensions()[1];
  if (M == 0 || N == 0) return ffi::Error::Success();
  const int64_t Cp = K + (K & 1);
  const int64_t Npad = (N + kNR - 1) / kNR * kNR;
  const float* X = x.typed_data();
  const int8_t* Wt = w.typed_data();

  // The weight in the tile's order, zero beyond K and N; resize keeps the
  // buffer (no allocation once it is big enough), the fill rewrites all of it.
  const size_t wp_n = static_cast<size_t>(Npad * Cp);
  if (t_dense_wp.size() < wp_n) t_dense_wp.resize(wp_n);
  int16_t* WP = t_dense_wp.data();
  for (int64_t ob = 0; ob < Npad / kNR; ++ob) {
    int16_t* blk = WP + ob * Cp * kNR;
    const int64_t o_end = std::min<int64_t>(kNR, N - ob * kNR);
    for (int64_t c = 0; c < Cp; ++c) {
      int16_t* dst = blk + (c / 2) * 2 * kNR + (c & 1);
      if (c >= K) {
        for (int64_t o = 0; o < kNR; ++o) dst[2 * o] = 0;
        continue;
      }
      const int8_t* src = Wt + c * N + ob * kNR;
      int64_t o = 0;
      for (; o < o_end; ++o) dst[2 * o] = src[o];
      for (; o < kNR; ++o) dst[2 * o] = 0;
    }
  }
  if (t_dense_ws.size() < static_cast<size_t>(Npad)) t_dense_ws.resize(static_cast<size_t>(Npad));
  std::copy(wscale.typed_data(), wscale.typed_data() + N, t_dense_ws.begin());
  std::fill(t_dense_ws.begin() + N, t_dense_ws.begin() + Npad, 0.0f);

  float scale = 1.0f;
  if (mode == kStatic) scale = act_scale.typed_data()[0];
  if (mode == kPerTensor) scale = DynamicScale(AbsMax(X, M * K));

  Pool* pool = GetPool();
  const int64_t work = M * Cp * Npad;
  // Chunks of up to 8 register tiles (48 rows: the column block's packed weight
  // is reused from L1 across them), fewer when that leaves under 4 chunks per
  // thread (rows are the only split, so the result does not depend on it).
  const int64_t per_thread = std::max<int64_t>(1, M / (4 * kMR * pool->threads()));
  const int64_t chunk_rows = kMR * std::min<int64_t>(8, per_thread);
  DenseJob job{X, WP, t_dense_ws.data(), out->typed_data(), M, K, Cp, N, Npad, mode, scale,
               chunk_rows};
  const int64_t chunks = (M + chunk_rows - 1) / chunk_rows;
  if (work < kInlineWork) {
    for (int64_t c = 0; c < chunks; ++c) DenseChunk(&job, c);
  } else {
    pool->Run(DenseChunk, &job, chunks);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JqxConvInt8, ConvInt8Impl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("sh")
                                  .Attr<int64_t>("sw")
                                  .Attr<int64_t>("ph")
                                  .Attr<int64_t>("pw")
                                  .Attr<int64_t>("dh")
                                  .Attr<int64_t>("dw")
                                  .Attr<int64_t>("mode")
                                  .Ctx<ffi::ThreadPool>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JqxW8A8Gemm, W8A8GemmImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("mode")
                                  .Ctx<ffi::ThreadPool>());

extern "C" int jqx_conv_cpu_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2");
}

// Threads the pool uses (creating it): $JQX_NUM_THREADS, else the affinity count.
extern "C" int jqx_conv_num_threads() { return GetPool()->threads(); }
