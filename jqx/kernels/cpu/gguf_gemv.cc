// y = x @ W.T on GGUF's block layouts (Q4_0, Q4_1, Q8_0) for a few rows of x
// (decode), as an XLA FFI custom call, for x86 CPUs with AVX2, FMA and F16C.
//
// W has N rows (output features) of K (input features) in blocks of 32 along K,
// stored as jqx keeps GGUF tensors (jqx/io/gguf.py):
//   Q4_1  codes uint8 (N, K/2), two 4-bit codes per byte, ADJACENT elements
//         share a byte, low nibble = even element; scale d and min m float16
//         (N, K/32); w = d * q + m.
//   Q4_0  the same packing, codes int4 two's complement; w = d * q.
//   Q8_0  codes int8 (N, K); w = d * q.
//
// Numerics (jqx_gguf_gemv): x stays float32 (it is never quantized). Per block, the kernel
// forms the float32 sum of q_j * x_j, scales it by d, and adds m * sum_j x_j
// (block sums of x computed once per call); the codes and scales are exact in
// float32, so the only rounding is float32 summation.
//
// Q4 unpacking ("nibble planes"): 32 bytes of codes (two blocks) are read as
// eight 32-bit lanes; nibble p of lane i holds element 8 i + p of the 64. A
// shift and a mask (a shift pair for signed codes) give plane p as eight int32
// codes, converted to float and FMA'd against x gathered in the same order:
// x is permuted once per call (an 8 x 8 transpose per 64 elements), so the
// weights need no shuffles. Lanes 0..3 belong to the first block, 4..7 to the
// second: the per-block scales are applied as one vector [d0 x4, d1 x4].
//
// Q8_0: eight codes at a time are sign-extended to int32 (vpmovsxbd) and
// converted; x is read in its own order.
//
// Register tiles: MR rows of x times NR rows of W per pass, MR * NR <= 4 (two
// accumulators each: one per block or group, one running total), so every
// loaded x vector serves NR weight rows and every unpacked weight vector
// serves MR rows of x: 1 x 4 at M = 1, 2 x 2 at M = 2..3, 4 x 1 from M = 4.
// More rows of x loop over the same weight tile (it stays in L1). The rows of
// the tiles ahead are prefetched as the current one is read: the hardware
// prefetcher alone streamed a large weight at a third of the bandwidth.
//
// Threads: the persistent pool of pool.h (created on first use, once per
// process and shared with the other native libraries; sized by the CPU
// affinity mask or $JQX_NUM_THREADS). A call's output rows are cut
// into chunks of a few microseconds of work that the calling thread and the
// workers claim from a shared counter, so a worker that is not running (a
// busy, shared machine) costs nothing. Workers spin briefly for the next job,
// then sleep on a condition variable, so back-to-back calls (a decode step's
// products) never start threads. A call that finds the pool busy (another
// XLA thread using it) or that is too small to pay for waking the workers
// runs on the calling thread. The chunks split rows only, so the result does
// not depend on the number of threads.
//
// jqx_gguf_gemv_q8 (its section below) is the same product with x quantized to
// int8 per block of 32 and integer dot products, as llama.cpp computes it.
//
// The same library holds jqx_decode_attention (one new token's attention over
// the visible slots of a float32 / float16 KV cache; see its section below) and
// jqx_decode_attention_q (the same over an int8 or fp8 quantized cache) and
// jqx_decode_attention_int4 (over the 4-bit KIVI cache), which share the thread
// pool, and jqx_softmax_dot (softmax_dot.h: a softmax and its product with the
// values in one pass, for jqx.quantized's attention).
//
// Built on first use by jqx/kernels/cpu/native.py (g++ -O3 -mavx2 -mfma
// -mf16c); jqx_gguf_cpu_supported() is checked before registering it.

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
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

#include "pool.h"
#include "softmax_dot.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

enum Kind : int64_t { kQ4_0 = 0, kQ4_1 = 1, kQ8_0 = 2 };

constexpr int64_t kBlock = 32;     // elements per GGUF block
constexpr int64_t kMaxRows = 16;   // rows of x per call (decode sizes)
// Below this many multiply-adds (M * N * K) a call is at most two chunks and
// the calling thread is done before a worker joins in (measured on 2 cores):
// run it there and leave the pool alone.
constexpr int64_t kInlineWork = int64_t{1} << 16;
// Multiply-adds per chunk of a threaded call (a few microseconds): enough to
// make claiming a chunk (one atomic) negligible.
constexpr int64_t kChunkWork = int64_t{1} << 15;

// ------------------------------------------------------------------ helpers

inline float HSum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

alignas(32) const int32_t kLaneMask[9][8] = {
    {0, 0, 0, 0, 0, 0, 0, 0},         {-1, 0, 0, 0, 0, 0, 0, 0},
    {-1, -1, 0, 0, 0, 0, 0, 0},       {-1, -1, -1, 0, 0, 0, 0, 0},
    {-1, -1, -1, -1, 0, 0, 0, 0},     {-1, -1, -1, -1, -1, 0, 0, 0},
    {-1, -1, -1, -1, -1, -1, 0, 0},   {-1, -1, -1, -1, -1, -1, -1, 0},
    {-1, -1, -1, -1, -1, -1, -1, -1}};

// Eight float16 values from p as float32, lanes >= count zeroed. When the
// caller knows 16 bytes from p are readable (`whole`: not the end of the
// array), a short chunk is one load and a mask, not a copy.
inline __m256 LoadHalf8(const uint16_t* p, int64_t count, bool whole) {
  if (count >= 8) return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  if (whole) {
    const __m256 v = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    const __m256i keep = _mm256_load_si256(reinterpret_cast<const __m256i*>(kLaneMask[count]));
    return _mm256_and_ps(v, _mm256_castsi256_ps(keep));  // also clears NaN/Inf bits read past
  }
  alignas(16) uint16_t tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t i = 0; i < count; ++i) tmp[i] = p[i];
  return _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(tmp)));
}

// Writes the horizontal sums of NR accumulators to y[0..NR).
template <int NR>
inline void StoreSums(const __m256 (&v)[NR], float* y) {
  if constexpr (NR == 4) {
    const __m256 ab = _mm256_hadd_ps(v[0], v[1]);
    const __m256 cd = _mm256_hadd_ps(v[2], v[3]);
    const __m256 abcd = _mm256_hadd_ps(ab, cd);  // lanes: a b c d (low half), a b c d (high)
    _mm_storeu_ps(y, _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1)));
  } else {
    for (int r = 0; r < NR; ++r) y[r] = HSum(v[r]);
  }
}

// Plane p (0..7) of eight 32-bit lanes of packed codes: nibble p of each lane,
// as float. Signed (Q4_0): two's complement nibbles, sign-extended by shifting
// the nibble to the top and back down arithmetically.
template <int P, bool kSigned>
inline __m256 Plane(__m256i raw) {
  if constexpr (kSigned) {
    if constexpr (P == 7) return _mm256_cvtepi32_ps(_mm256_srai_epi32(raw, 28));
    return _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(raw, 28 - 4 * P), 28));
  } else {
    if constexpr (P == 7) return _mm256_cvtepi32_ps(_mm256_srli_epi32(raw, 28));
    const __m256i mask = _mm256_set1_epi32(0xF);
    if constexpr (P == 0) return _mm256_cvtepi32_ps(_mm256_and_si256(raw, mask));
    return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(raw, 4 * P), mask));
  }
}

// ------------------------------------------------------------------ Q4 tile

// How many tiles ahead of the one being computed its rows are prefetched.
constexpr int64_t kAheadTiles = 2;

struct Q4Args {
  const float* xp;    // x permuted into nibble-plane order, rows of kp floats
  int64_t kp;         // 64 * ceil(nb / 2)
  const float* xs;    // block sums of x, rows of nb8 floats (Q4_1 only)
  int64_t nb8;        // 8 * ceil(nb / 8)
  const uint8_t* q;   // (N, K/2)
  const uint16_t* d;  // (N, nb) float16 bits
  const uint16_t* m;  // (N, nb) float16 bits, or null
  int64_t nb;         // blocks per row, K / 32
  int64_t n_total;    // N
  int64_t rows;       // M
  float* y;           // (M, N)
};

template <int P, bool kSigned, int MR, int NR>
inline void Q4PlaneStep(const __m256i (&raw)[NR], const float* xg, int64_t kp,
                        __m256 (&blk)[MR][NR]) {
  __m256 xv[MR];
#pragma GCC unroll 4
  for (int i = 0; i < MR; ++i) xv[i] = _mm256_loadu_ps(xg + i * kp + 8 * P);
#pragma GCC unroll 4
  for (int r = 0; r < NR; ++r) {
    const __m256 w = Plane<P, kSigned>(raw[r]);
#pragma GCC unroll 4
    for (int i = 0; i < MR; ++i)
      blk[i][r] = P == 0 ? _mm256_mul_ps(w, xv[i]) : _mm256_fmadd_ps(w, xv[i], blk[i][r]);
  }
}

// MR rows of x (starting at x row i0) times NR rows of W (starting at n0).
template <int MR, int NR, bool kSigned, bool kMin>
void Q4Tile(const Q4Args& a, int64_t i0, int64_t n0) {
  const int64_t nb = a.nb, kp = a.kp;
  const int64_t qstride = nb * 16;
  // Prefetch only rows that exist (the last tiles of W have none ahead).
  const bool ahead = n0 + (kAheadTiles + 1) * NR <= a.n_total;
  const char* pf =
      reinterpret_cast<const char*>(a.q) + (ahead ? (n0 + kAheadTiles * NR) * qstride : 0);
  __m256 tot[MR][NR];
#pragma GCC unroll 4
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int r = 0; r < NR; ++r) tot[i][r] = _mm256_setzero_ps();
  // Lane -> block-scale index for each of the four groups of an 8-block chunk.
  alignas(32) static const int32_t kSel[4][8] = {{0, 0, 0, 0, 1, 1, 1, 1},
                                                 {2, 2, 2, 2, 3, 3, 3, 3},
                                                 {4, 4, 4, 4, 5, 5, 5, 5},
                                                 {6, 6, 6, 6, 7, 7, 7, 7}};
  for (int64_t b0 = 0; b0 < nb; b0 += 8) {
    const int64_t nc = std::min<int64_t>(8, nb - b0);  // blocks in this chunk
    __m256 dsc[NR];
#pragma GCC unroll 4
    for (int r = 0; r < NR; ++r) {
      const int64_t at = (n0 + r) * nb + b0;
      const bool whole = at + 8 <= a.n_total * nb;  // 8 halves inside the array
      dsc[r] = LoadHalf8(a.d + at, nc, whole);
      if constexpr (kMin) {
        // + m * sum(x) per block, as a vector over the chunk's 8 blocks.
        const __m256 mv = LoadHalf8(a.m + at, nc, whole);
#pragma GCC unroll 4
        for (int i = 0; i < MR; ++i)
          tot[i][r] = _mm256_fmadd_ps(mv, _mm256_loadu_ps(a.xs + (i0 + i) * a.nb8 + b0), tot[i][r]);
      }
    }
    for (int64_t j = 0; 2 * j < nc; ++j) {
      const int64_t b = b0 + 2 * j;  // first block of this group
      const bool pair = b + 1 < nb;
      // The tiles ahead are the next rows, contiguous: stream them in at the
      // pace this tile is read (the hardware prefetcher alone fell behind).
      if (ahead)
        for (int l = 0; l < NR * 32; l += 64) _mm_prefetch(pf + b * NR * 16 + l, _MM_HINT_T0);
      __m256i raw[NR];
#pragma GCC unroll 4
      for (int r = 0; r < NR; ++r) {
        const uint8_t* src = a.q + (n0 + r) * qstride + b * 16;
        raw[r] = pair ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src))
                      : _mm256_zextsi128_si256(
                            _mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
      }
      const float* xg = a.xp + i0 * kp + b * 32;
      __m256 blk[MR][NR];
      Q4PlaneStep<0, kSigned, MR, NR>(raw, xg, kp, blk);
      Q4PlaneStep<1, kSigned, MR, NR>(raw, xg, kp, blk);
      Q4PlaneStep<2, kSigned, MR, NR>(raw, xg, kp, blk);
      Q4PlaneStep<3, kSigned, MR, NR>(raw, xg, kp, blk);
      Q4PlaneStep<4, kSigned, MR, NR>(raw, xg, kp, blk);
      Q4PlaneStep<5, kSigned, MR, NR>(raw, xg, kp, blk);
      Q4PlaneStep<6, kSigned, MR, NR>(raw, xg, kp, blk);
      Q4PlaneStep<7, kSigned, MR, NR>(raw, xg, kp, blk);
      const __m256i sel = _mm256_load_si256(reinterpret_cast<const __m256i*>(kSel[j]));
#pragma GCC unroll 4
      for (int r = 0; r < NR; ++r) {
        // [d_b x4, d_b+1 x4]; for a lone last block the upper lanes multiply
        // zeros (zero codes and zero x), and the padded scale there is zero.
        const __m256 dv = _mm256_permutevar8x32_ps(dsc[r], sel);
#pragma GCC unroll 4
        for (int i = 0; i < MR; ++i) tot[i][r] = _mm256_fmadd_ps(dv, blk[i][r], tot[i][r]);
      }
    }
  }
#pragma GCC unroll 4
  for (int i = 0; i < MR; ++i) StoreSums<NR>(tot[i], a.y + (i0 + i) * a.n_total + n0);
}

template <bool kSigned, bool kMin>
void Q4Rows(const Q4Args& a, int64_t n0, int64_t n1) {
  // Each weight tile (NR rows) meets every row of x while it is in L1.
  const int64_t M = a.rows;
  auto tile = [&](auto nr_tag, int64_t n) {
    constexpr int NR = decltype(nr_tag)::value;
    int64_t i = 0;
    if constexpr (NR == 4) {
      for (; i < M; ++i) Q4Tile<1, 4, kSigned, kMin>(a, i, n);
    } else if constexpr (NR == 2) {
      for (; i + 2 <= M; i += 2) Q4Tile<2, 2, kSigned, kMin>(a, i, n);
      for (; i < M; ++i) Q4Tile<1, 2, kSigned, kMin>(a, i, n);
    } else {
      for (; i + 4 <= M; i += 4) Q4Tile<4, 1, kSigned, kMin>(a, i, n);
      for (; i + 2 <= M; i += 2) Q4Tile<2, 1, kSigned, kMin>(a, i, n);
      for (; i < M; ++i) Q4Tile<1, 1, kSigned, kMin>(a, i, n);
    }
  };
  // Tile shape by rows of x: 1 row -> 4 weight rows per pass, 2..3 -> 2, 4+ -> 1.
  const int64_t nr = M == 1 ? 4 : (M < 4 ? 2 : 1);
  int64_t n = n0;
  if (nr == 4)
    for (; n + 4 <= n1; n += 4) tile(std::integral_constant<int, 4>{}, n);
  if (nr >= 2)
    for (; n + 2 <= n1; n += 2) tile(std::integral_constant<int, 2>{}, n);
  for (; n < n1; ++n) tile(std::integral_constant<int, 1>{}, n);
}

// ------------------------------------------------------------------ Q8_0 tile

struct Q8Args {
  const float* x;     // (M, K)
  int64_t k;
  const int8_t* q;    // (N, K)
  const uint16_t* d;  // (N, nb)
  int64_t nb;
  int64_t n_total;
  int64_t rows;
  float* y;
};

template <int MR, int NR>
void Q8Tile(const Q8Args& a, int64_t i0, int64_t n0) {
  const int64_t nb = a.nb, K = a.k;
  const bool ahead = n0 + (kAheadTiles + 1) * NR <= a.n_total;  // as in Q4Tile
  const char* pf = reinterpret_cast<const char*>(a.q) + (ahead ? (n0 + kAheadTiles * NR) * K : 0);
  __m256 tot[MR][NR];
#pragma GCC unroll 4
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int r = 0; r < NR; ++r) tot[i][r] = _mm256_setzero_ps();
  for (int64_t b0 = 0; b0 < nb; b0 += 8) {
    const int64_t nc = std::min<int64_t>(8, nb - b0);
    alignas(32) float dsc[NR][8];
#pragma GCC unroll 4
    for (int r = 0; r < NR; ++r) {
      const int64_t at = (n0 + r) * nb + b0;
      _mm256_store_ps(dsc[r], LoadHalf8(a.d + at, nc, at + 8 <= a.n_total * nb));
    }
    for (int64_t j = 0; j < nc; ++j) {
      const int64_t e = (b0 + j) * kBlock;
      if (ahead && j % 2 == 0)  // as in Q4Tile: the rows ahead, at this tile's pace
        for (int l = 0; l < NR * 64; l += 64) _mm_prefetch(pf + e * NR + l, _MM_HINT_T0);
      __m256 blk[MR][NR];
#pragma GCC unroll 4
      for (int s = 0; s < 4; ++s) {
        __m256 xv[MR];
#pragma GCC unroll 4
        for (int i = 0; i < MR; ++i) xv[i] = _mm256_loadu_ps(a.x + (i0 + i) * K + e + 8 * s);
#pragma GCC unroll 4
        for (int r = 0; r < NR; ++r) {
          const __m128i c =
              _mm_loadl_epi64(reinterpret_cast<const __m128i*>(a.q + (n0 + r) * K + e + 8 * s));
          const __m256 w = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(c));
#pragma GCC unroll 4
          for (int i = 0; i < MR; ++i)
            blk[i][r] = s == 0 ? _mm256_mul_ps(w, xv[i]) : _mm256_fmadd_ps(w, xv[i], blk[i][r]);
        }
      }
#pragma GCC unroll 4
      for (int r = 0; r < NR; ++r) {
        const __m256 dv = _mm256_broadcast_ss(&dsc[r][j]);
#pragma GCC unroll 4
        for (int i = 0; i < MR; ++i) tot[i][r] = _mm256_fmadd_ps(dv, blk[i][r], tot[i][r]);
      }
    }
  }
#pragma GCC unroll 4
  for (int i = 0; i < MR; ++i) StoreSums<NR>(tot[i], a.y + (i0 + i) * a.n_total + n0);
}

void Q8Rows(const Q8Args& a, int64_t n0, int64_t n1) {
  const int64_t M = a.rows;
  auto tile = [&](auto nr_tag, int64_t n) {
    constexpr int NR = decltype(nr_tag)::value;
    int64_t i = 0;
    if constexpr (NR == 4) {
      for (; i < M; ++i) Q8Tile<1, 4>(a, i, n);
    } else if constexpr (NR == 2) {
      for (; i + 2 <= M; i += 2) Q8Tile<2, 2>(a, i, n);
      for (; i < M; ++i) Q8Tile<1, 2>(a, i, n);
    } else {
      for (; i + 4 <= M; i += 4) Q8Tile<4, 1>(a, i, n);
      for (; i + 2 <= M; i += 2) Q8Tile<2, 1>(a, i, n);
      for (; i < M; ++i) Q8Tile<1, 1>(a, i, n);
    }
  };
  const int64_t nr = M == 1 ? 4 : (M < 4 ? 2 : 1);
  int64_t n = n0;
  if (nr == 4)
    for (; n + 4 <= n1; n += 4) tile(std::integral_constant<int, 4>{}, n);
  if (nr >= 2)
    for (; n + 2 <= n1; n += 2) tile(std::integral_constant<int, 2>{}, n);
  for (; n < n1; ++n) tile(std::integral_constant<int, 1>{}, n);
}

// ------------------------------------------------------------------ dispatch

struct Job {
  int64_t kind;
  int64_t n;
  int64_t chunk_rows;  // rows of W per chunk: N, or a multiple of 4 (the widest tile)
  Q4Args q4;
  Q8Args q8;
};

void RunChunk(const void* ctx, int64_t c) {
  const Job& job = *static_cast<const Job*>(ctx);
  const int64_t n0 = c * job.chunk_rows, n1 = std::min(job.n, n0 + job.chunk_rows);
  switch (job.kind) {
    case kQ4_0: return Q4Rows<true, false>(job.q4, n0, n1);
    case kQ4_1: return Q4Rows<false, true>(job.q4, n0, n1);
    default: return Q8Rows(job.q8, n0, n1);
  }
}

// Per-call scratch of the calling thread (XLA may call from several threads).
thread_local std::vector<float> t_scratch;

ffi::Error GgufGemvImpl(ffi::Buffer<ffi::F32> x, ffi::AnyBuffer qvalue, ffi::Buffer<ffi::F16> scale,
                        ffi::Buffer<ffi::F16> minimum, ffi::ResultBuffer<ffi::F32> y,
                        int64_t kind) {
  const auto xd = x.dimensions();
  const auto qd = qvalue.dimensions();
  const auto sd = scale.dimensions();
  const auto yd = y->dimensions();
  if (kind != kQ4_0 && kind != kQ4_1 && kind != kQ8_0)
    return ffi::Error::InvalidArgument("jqx_gguf_gemv: kind must be 0 (Q4_0), 1 (Q4_1), 2 (Q8_0)");
  if (xd.size() != 2 || qd.size() != 2 || sd.size() != 2 || yd.size() != 2)
    return ffi::Error::InvalidArgument("jqx_gguf_gemv: every operand must be 2-D");
  const int64_t M = xd[0], K = xd[1], N = qd[0], nb = K / kBlock;
  const bool q8 = kind == kQ8_0;
  const auto want_type = q8 ? ffi::DataType::S8 : ffi::DataType::U8;
  if (K % kBlock != 0 || M > kMaxRows || qvalue.element_type() != want_type ||
      qd[1] != (q8 ? K : K / 2) || sd[0] != N || sd[1] != nb || yd[0] != M || yd[1] != N ||
      (kind == kQ4_1 && (minimum.dimensions().size() != 2 || minimum.dimensions()[0] != N ||
                         minimum.dimensions()[1] != nb)))
    return ffi::Error::InvalidArgument("jqx_gguf_gemv: inconsistent shapes or dtypes");
  float* Y = y->typed_data();
  if (M == 0 || N == 0) return ffi::Error::Success();
  if (K == 0) {
    memset(Y, 0, static_cast<size_t>(M * N) * sizeof(float));
    return ffi::Error::Success();
  }
  const float* X = x.typed_data();
  Job job{};
  job.kind = kind;
  job.n = N;
  const auto* d = reinterpret_cast<const uint16_t*>(scale.untyped_data());
  if (q8) {
    job.q8 = Q8Args{X, K, static_cast<const int8_t*>(qvalue.untyped_data()), d, nb, N, M, Y};
  } else {
    const int64_t kp = (nb + 1) / 2 * 64, nb8 = (nb + 7) / 8 * 8;
    std::vector<float>& buf = t_scratch;
    buf.assign(static_cast<size_t>(M * (kp + nb8)), 0.0f);
    float* xp = buf.data();
    float* xs = xp + M * kp;
    for (int64_t i = 0; i < M; ++i) {
      const float* xr = X + i * K;
      float* dst = xp + i * kp;
      // Element 8 l + p of each 64 goes to plane p, lane l (see the header); a
      // lone last block fills lanes 0..3 and leaves the rest zero.
      for (int64_t g0 = 0; g0 < K; g0 += 64) {
        const int64_t lanes = std::min<int64_t>(64, K - g0) / 8;
        for (int64_t l = 0; l < lanes; ++l)
          for (int64_t p = 0; p < 8; ++p) dst[g0 + p * 8 + l] = xr[g0 + 8 * l + p];
      }
      if (kind == kQ4_1) {
        for (int64_t b = 0; b < nb; ++b) {
          float s = 0.0f;
          for (int64_t e = 0; e < kBlock; ++e) s += xr[b * kBlock + e];
          xs[i * nb8 + b] = s;
        }
      }
    }
    job.q4 = Q4Args{xp,
                    kp,
                    xs,
                    nb8,
                    static_cast<const uint8_t*>(qvalue.untyped_data()),
                    d,
                    kind == kQ4_1 ? reinterpret_cast<const uint16_t*>(minimum.untyped_data())
                                  : nullptr,
                    nb,
                    N,
                    M,
                    Y};
  }
  const int64_t work = M * N * K;
  if (work < kInlineWork) {
    job.chunk_rows = N;
    RunChunk(&job, 0);
  } else {
    // Small chunks (kChunkWork multiply-adds, rounded up to whole tiles):
    // whichever threads are running share the work out between them.
    const int64_t rows = (kChunkWork + M * K - 1) / (M * K);
    job.chunk_rows = std::max<int64_t>(4, (rows + 3) / 4 * 4);
    GetPool()->Run(RunChunk, &job, (N + job.chunk_rows - 1) / job.chunk_rows);
  }
  return ffi::Error::Success();
}


// ------------------------------------------------------------------ int8 activations
//
// jqx_gguf_gemv_q8: the same product with x quantized to int8 per block of 32,
// as llama.cpp's CPU backend does (its Q8_0 / Q8_1 activation blocks), so each
// weight block meets x in an integer dot product (vpmaddubsw + vpmaddwd: 32
// byte products per instruction pair instead of 8 float FMAs).
//
// Quantizing x (once per call, on the calling thread; M * K elements): per
// block, amax = max |x|, d = amax / 127 (float32) stored rounded to float16,
// id = 127 / amax (0 when amax is 0, or when 127 / amax overflows: d is 0 in
// float16 there anyway), codes = round-half-even(x * id). Q4_1 also takes
// s = d * sum(codes) (float32 d) rounded to float16, llama.cpp's Q8_1.
//
// Per weight block and row of x, the kernel forms the exact int32 dot of the
// codes as eight partial lanes, converts them and accumulates d_w * d_x * lanes
// in float32; Q4_1 adds m_w * s_x per block. Q4 codes are unsigned 0..15 for
// vpmaddubsw (its unsigned operand): Q4_0's two's complement nibbles are
// flipped to q + 8 and 8 * sum(codes of x) is subtracted per lane (a table
// made once per call), so the integer sums are exactly those of the signed
// codes. Q8_0 weights use llama.cpp's sign trick (|w| unsigned, x carrying
// w's sign): a byte pair sums to at most 2 * 128 * 127, inside int16.
//
// Layout of the quantized x (scratch of the calling thread): Q4 kinds, per
// pair of blocks, 64 bytes [even elements of both blocks | odd elements of
// both], matching the low and high nibbles of the 32 code bytes of the pair,
// so the weights need only a mask and a shift; lanes 0..3 of a product belong
// to the first block, 4..7 to the second (as in Q4Tile). Q8_0: x's own order.

constexpr int64_t kQ8ChunkScale = 4;  // q8 multiply-adds cost about a quarter of f32 ones

struct Q4Q8Args {
  const int8_t* xq;    // per row: npair * 64 code bytes (see above)
  const float* dxp;    // per row: npair * 8 floats, [d_x(b) x4, d_x(b + 1) x4]
  const int32_t* cor;  // Q4_0: per row npair * 8 int32, 8 * sums of x codes per lane
  const float* sx;     // Q4_1: per row nb8 floats, s_x per block
  int64_t npair;       // ceil(nb / 2)
  int64_t nb8;
  const uint8_t* q;
  const uint16_t* d;
  const uint16_t* m;
  int64_t nb;
  int64_t n_total;
  int64_t rows;
  float* y;
};

template <int MR, int NR, bool kQ4_0, bool kMin>
void Q4Q8Tile(const Q4Q8Args& a, int64_t i0, int64_t n0) {
  const int64_t nb = a.nb, qstride = nb * 16, np = a.npair;
  const bool ahead = n0 + (kAheadTiles + 1) * NR <= a.n_total;  // as in Q4Tile
  const char* pf =
      reinterpret_cast<const char*>(a.q) + (ahead ? (n0 + kAheadTiles * NR) * qstride : 0);
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x88));
  const __m256i ones = _mm256_set1_epi16(1);
  alignas(32) static const int32_t kSel[4][8] = {{0, 0, 0, 0, 1, 1, 1, 1},
                                                 {2, 2, 2, 2, 3, 3, 3, 3},
                                                 {4, 4, 4, 4, 5, 5, 5, 5},
                                                 {6, 6, 6, 6, 7, 7, 7, 7}};
  __m256 tot[MR][NR];
#pragma GCC unroll 4
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int r = 0; r < NR; ++r) tot[i][r] = _mm256_setzero_ps();
  for (int64_t b0 = 0; b0 < nb; b0 += 8) {
    const int64_t nc = std::min<int64_t>(8, nb - b0);
    __m256 dw[NR];
#pragma GCC unroll 4
    for (int r = 0; r < NR; ++r) {
      const int64_t at = (n0 + r) * nb + b0;
      const bool whole = at + 8 <= a.n_total * nb;
      dw[r] = LoadHalf8(a.d + at, nc, whole);
      if constexpr (kMin) {
        const __m256 mv = LoadHalf8(a.m + at, nc, whole);
#pragma GCC unroll 4
        for (int i = 0; i < MR; ++i)
          tot[i][r] = _mm256_fmadd_ps(mv, _mm256_loadu_ps(a.sx + (i0 + i) * a.nb8 + b0), tot[i][r]);
      }
    }
    for (int64_t j = 0; 2 * j < nc; ++j) {
      const int64_t b = b0 + 2 * j, p = b / 2;
      const bool pair = b + 1 < nb;
      if (ahead)
        for (int l = 0; l < NR * 32; l += 64) _mm_prefetch(pf + b * NR * 16 + l, _MM_HINT_T0);
      const __m256i sel = _mm256_load_si256(reinterpret_cast<const __m256i*>(kSel[j]));
      __m256i xe[MR], xo[MR];
      __m256 dx[MR];
#pragma GCC unroll 4
      for (int i = 0; i < MR; ++i) {
        const int8_t* xr = a.xq + ((i0 + i) * np + p) * 64;
        xe[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr));
        xo[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + 32));
        dx[i] = _mm256_loadu_ps(a.dxp + ((i0 + i) * np + p) * 8);
      }
#pragma GCC unroll 4
      for (int r = 0; r < NR; ++r) {
        const uint8_t* src = a.q + (n0 + r) * qstride + b * 16;
        __m256i raw = pair ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src))
                           : _mm256_zextsi128_si256(
                                 _mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
        // Q4_0: nibble q (two's complement) -> q + 8; a lone block's zero upper
        // half becomes 8s, which meet zero codes of x (and zero corrections).
        if constexpr (kQ4_0) raw = _mm256_xor_si256(raw, flip);
        const __m256i lo = _mm256_and_si256(raw, low4);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4);
        const __m256 dwp = _mm256_permutevar8x32_ps(dw[r], sel);
#pragma GCC unroll 4
        for (int i = 0; i < MR; ++i) {
          const __m256i s16 =
              _mm256_add_epi16(_mm256_maddubs_epi16(lo, xe[i]), _mm256_maddubs_epi16(hi, xo[i]));
          __m256i s32 = _mm256_madd_epi16(s16, ones);
          if constexpr (kQ4_0)
            s32 = _mm256_sub_epi32(
                s32, _mm256_loadu_si256(
                         reinterpret_cast<const __m256i*>(a.cor + ((i0 + i) * np + p) * 8)));
          tot[i][r] =
              _mm256_fmadd_ps(_mm256_mul_ps(dwp, dx[i]), _mm256_cvtepi32_ps(s32), tot[i][r]);
        }
      }
    }
  }
#pragma GCC unroll 4
  for (int i = 0; i < MR; ++i) StoreSums<NR>(tot[i], a.y + (i0 + i) * a.n_total + n0);
}

struct Q8Q8Args {
  const int8_t* xq;  // (M, K) codes in x's order
  const float* dx;   // per row nb8 floats
  int64_t nb8;
  int64_t k;
  const int8_t* q;
  const uint16_t* d;
  int64_t nb;
  int64_t n_total;
  int64_t rows;
  float* y;
};

template <int MR, int NR>
void Q8Q8Tile(const Q8Q8Args& a, int64_t i0, int64_t n0) {
  const int64_t nb = a.nb, K = a.k;
  const bool ahead = n0 + (kAheadTiles + 1) * NR <= a.n_total;
  const char* pf = reinterpret_cast<const char*>(a.q) + (ahead ? (n0 + kAheadTiles * NR) * K : 0);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 tot[MR][NR];
#pragma GCC unroll 4
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int r = 0; r < NR; ++r) tot[i][r] = _mm256_setzero_ps();
  for (int64_t b0 = 0; b0 < nb; b0 += 8) {
    const int64_t nc = std::min<int64_t>(8, nb - b0);
    alignas(32) float dd[MR][NR][8];  // d_w * d_x per block
#pragma GCC unroll 4
    for (int r = 0; r < NR; ++r) {
      const int64_t at = (n0 + r) * nb + b0;
      const __m256 dw = LoadHalf8(a.d + at, nc, at + 8 <= a.n_total * nb);
#pragma GCC unroll 4
      for (int i = 0; i < MR; ++i)
        _mm256_store_ps(dd[i][r], _mm256_mul_ps(dw, _mm256_loadu_ps(a.dx + (i0 + i) * a.nb8 + b0)));
    }
    for (int64_t j = 0; j < nc; ++j) {
      const int64_t e = (b0 + j) * kBlock;
      if (ahead && j % 2 == 0)
        for (int l = 0; l < NR * 64; l += 64) _mm_prefetch(pf + e * NR + l, _MM_HINT_T0);
      __m256i xv[MR];
#pragma GCC unroll 4
      for (int i = 0; i < MR; ++i)
        xv[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.xq + (i0 + i) * K + e));
#pragma GCC unroll 4
      for (int r = 0; r < NR; ++r) {
        const __m256i w =
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.q + (n0 + r) * K + e));
        const __m256i aw = _mm256_sign_epi8(w, w);  // |w| as unsigned bytes (-128 -> 128)
#pragma GCC unroll 4
        for (int i = 0; i < MR; ++i) {
          const __m256i s16 = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(xv[i], w));
          const __m256 f = _mm256_cvtepi32_ps(_mm256_madd_epi16(s16, ones));
          tot[i][r] = _mm256_fmadd_ps(_mm256_broadcast_ss(&dd[i][r][j]), f, tot[i][r]);
        }
      }
    }
  }
#pragma GCC unroll 4
  for (int i = 0; i < MR; ++i) StoreSums<NR>(tot[i], a.y + (i0 + i) * a.n_total + n0);
}

// Rows [n0, n1) of W against every row of x, in the tile shapes of Q4Rows.
template <typename Tile>
void TiledRows(int64_t M, int64_t n0, int64_t n1, Tile tile) {
  auto run = [&](auto nr_tag, int64_t n) {
    constexpr int NR = decltype(nr_tag)::value;
    int64_t i = 0;
    if constexpr (NR == 4) {
      for (; i < M; ++i) tile(std::integral_constant<int, 1>{}, nr_tag, i, n);
    } else if constexpr (NR == 2) {
      for (; i + 2 <= M; i += 2) tile(std::integral_constant<int, 2>{}, nr_tag, i, n);
      for (; i < M; ++i) tile(std::integral_constant<int, 1>{}, nr_tag, i, n);
    } else {
      for (; i + 4 <= M; i += 4) tile(std::integral_constant<int, 4>{}, nr_tag, i, n);
      for (; i + 2 <= M; i += 2) tile(std::integral_constant<int, 2>{}, nr_tag, i, n);
      for (; i < M; ++i) tile(std::integral_constant<int, 1>{}, nr_tag, i, n);
    }
  };
  const int64_t nr = M == 1 ? 4 : (M < 4 ? 2 : 1);
  int64_t n = n0;
  if (nr == 4)
    for (; n + 4 <= n1; n += 4) run(std::integral_constant<int, 4>{}, n);
  if (nr >= 2)
    for (; n + 2 <= n1; n += 2) run(std::integral_constant<int, 2>{}, n);
  for (; n < n1; ++n) run(std::integral_constant<int, 1>{}, n);
}

struct JobQ8 {
  int64_t kind;
  int64_t n;
  int64_t chunk_rows;
  Q4Q8Args q4;
  Q8Q8Args q8;
};

void RunChunkQ8(const void* ctx, int64_t c) {
  const JobQ8& job = *static_cast<const JobQ8*>(ctx);
  const int64_t n0 = c * job.chunk_rows, n1 = std::min(job.n, n0 + job.chunk_rows);
  if (job.kind == kQ8_0) {
    TiledRows(job.q8.rows, n0, n1, [&](auto mr, auto nr, int64_t i, int64_t n) {
      Q8Q8Tile<decltype(mr)::value, decltype(nr)::value>(job.q8, i, n);
    });
  } else if (job.kind == kQ4_0) {
    TiledRows(job.q4.rows, n0, n1, [&](auto mr, auto nr, int64_t i, int64_t n) {
      Q4Q8Tile<decltype(mr)::value, decltype(nr)::value, true, false>(job.q4, i, n);
    });
  } else {
    TiledRows(job.q4.rows, n0, n1, [&](auto mr, auto nr, int64_t i, int64_t n) {
      Q4Q8Tile<decltype(mr)::value, decltype(nr)::value, false, true>(job.q4, i, n);
    });
  }
}

// One row of x (K a multiple of 32) to int8 codes, llama.cpp's rounding (see
// the section's header): codes in x's order, d (float16, as float) per block
// and, when `s` is not null, s = float16(d * sum(codes)) per block.
void QuantizeRowQ8(const float* x, int64_t K, int8_t* codes, float* d, float* s) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (int64_t b = 0; b * kBlock < K; ++b) {
    __m256 v[4];
    __m256 mx = _mm256_setzero_ps();
    for (int t = 0; t < 4; ++t) {
      v[t] = _mm256_loadu_ps(x + b * kBlock + 8 * t);
      mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, v[t]));
    }
    __m128 m4 = _mm_max_ps(_mm256_extractf128_ps(mx, 1), _mm256_castps256_ps128(mx));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float amax = _mm_cvtss_f32(m4);
    const float d32 = amax / 127.0f;
    float id = amax != 0.0f ? 127.0f / amax : 0.0f;
    if (!(id <= 3.4028234663852886e38f)) id = 0.0f;  // 127 / amax overflowed (d16 is 0)
    d[b] = _cvtsh_ss(_cvtss_sh(d32, _MM_FROUND_TO_NEAREST_INT));
    const __m256 mul = _mm256_set1_ps(id);
    __m256i q[4];
    for (int t = 0; t < 4; ++t)
      q[t] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[t], mul),
                                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    if (s != nullptr) {
      const __m256i t = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
      alignas(32) int32_t lanes[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), t);
      int32_t sum = 0;
      for (int l = 0; l < 8; ++l) sum += lanes[l];
      s[b] = _cvtsh_ss(_cvtss_sh(d32 * static_cast<float>(sum), _MM_FROUND_TO_NEAREST_INT));
    }
    // int32 -> int8 (|codes| <= 127, no saturation); the packs interleave
    // 128-bit halves, the permute puts the bytes back in order.
    const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes + b * kBlock),
                        _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  }
}

thread_local std::vector<int8_t> t_q8_codes;
thread_local std::vector<float> t_q8_floats;
thread_local std::vector<int32_t> t_q8_cor;

ffi::Error GgufGemvQ8Impl(ffi::Buffer<ffi::F32> x, ffi::AnyBuffer qvalue,
                          ffi::Buffer<ffi::F16> scale, ffi::Buffer<ffi::F16> minimum,
                          ffi::ResultBuffer<ffi::F32> y, int64_t kind) {
  const auto xd = x.dimensions();
  const auto qd = qvalue.dimensions();
  const auto sd = scale.dimensions();
  const auto yd = y->dimensions();
  if (kind != kQ4_0 && kind != kQ4_1 && kind != kQ8_0)
    return ffi::Error::InvalidArgument(
        "jqx_gguf_gemv_q8: kind must be 0 (Q4_0), 1 (Q4_1), 2 (Q8_0)");
  if (xd.size() != 2 || qd.size() != 2 || sd.size() != 2 || yd.size() != 2)
    return ffi::Error::InvalidArgument("jqx_gguf_gemv_q8: every operand must be 2-D");
  const int64_t M = xd[0], K = xd[1], N = qd[0], nb = K / kBlock;
  const bool q8 = kind == kQ8_0;
  const auto want_type = q8 ? ffi::DataType::S8 : ffi::DataType::U8;
  if (K % kBlock != 0 || M > kMaxRows || qvalue.element_type() != want_type ||
      qd[1] != (q8 ? K : K / 2) || sd[0] != N || sd[1] != nb || yd[0] != M || yd[1] != N ||
      (kind == kQ4_1 && (minimum.dimensions().size() != 2 || minimum.dimensions()[0] != N ||
                         minimum.dimensions()[1] != nb)))
    return ffi::Error::InvalidArgument("jqx_gguf_gemv_q8: inconsistent shapes or dtypes");
  float* Y = y->typed_data();
  if (M == 0 || N == 0) return ffi::Error::Success();
  if (K == 0) {
    memset(Y, 0, static_cast<size_t>(M * N) * sizeof(float));
    return ffi::Error::Success();
  }
  const float* X = x.typed_data();
  const auto* d = reinterpret_cast<const uint16_t*>(scale.untyped_data());
  const int64_t nb8 = (nb + 7) / 8 * 8, np = (nb + 1) / 2;
  // Codes in x's order, then (Q4 kinds) in the pair layout; d_x and s_x per block.
  std::vector<int8_t>& codes = t_q8_codes;
  std::vector<float>& fl = t_q8_floats;
  std::vector<int32_t>& cor = t_q8_cor;
  codes.assign(static_cast<size_t>(M * (K + (q8 ? 0 : np * 64))), 0);
  fl.assign(static_cast<size_t>(M * (2 * nb8 + np * 8)), 0.0f);
  float* dxs = fl.data();        // (M, nb8)
  float* sxs = dxs + M * nb8;    // (M, nb8)
  float* dxp = sxs + M * nb8;    // (M, np * 8)
  int8_t* xq = codes.data();     // (M, K)
  int8_t* xq4 = xq + M * K;      // (M, np * 64)
  for (int64_t i = 0; i < M; ++i)
    QuantizeRowQ8(X + i * K, K, xq + i * K, dxs + i * nb8, kind == kQ4_1 ? sxs + i * nb8 : nullptr);
  JobQ8 job{};
  job.kind = kind;
  job.n = N;
  if (q8) {
    job.q8 = Q8Q8Args{xq, dxs, nb8, K, static_cast<const int8_t*>(qvalue.untyped_data()), d,
                      nb, N, M, Y};
  } else {
    if (kind == kQ4_0) cor.assign(static_cast<size_t>(M * np * 8), 0);
    for (int64_t i = 0; i < M; ++i) {
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t p = b / 2, h = b % 2;  // pair, and which half of its 32 lanes
        const int8_t* src = xq + i * K + b * kBlock;
        int8_t* dst = xq4 + (i * np + p) * 64 + 16 * h;
        for (int64_t e = 0; e < 16; ++e) {
          dst[e] = src[2 * e];            // even elements meet the low nibbles
          dst[32 + e] = src[2 * e + 1];   // odd elements the high ones
        }
        for (int64_t l = 0; l < 4; ++l) dxp[(i * np + p) * 8 + 4 * h + l] = dxs[i * nb8 + b];
        if (kind == kQ4_0) {
          // int32 lane L of a pair's product sums bytes 4L..4L+3 of both halves.
          for (int64_t l = 0; l < 4; ++l) {
            int32_t t = 0;
            for (int64_t e = 0; e < 4; ++e) t += dst[4 * l + e] + dst[32 + 4 * l + e];
            cor[(i * np + p) * 8 + 4 * h + l] = 8 * t;
          }
        }
      }
    }
    job.q4 = Q4Q8Args{xq4,
                      dxp,
                      kind == kQ4_0 ? cor.data() : nullptr,
                      sxs,
                      np,
                      nb8,
                      static_cast<const uint8_t*>(qvalue.untyped_data()),
                      d,
                      kind == kQ4_1 ? reinterpret_cast<const uint16_t*>(minimum.untyped_data())
                                    : nullptr,
                      nb,
                      N,
                      M,
                      Y};
  }
  const int64_t work = M * N * K;
  if (work < kInlineWork * kQ8ChunkScale) {
    job.chunk_rows = N;
    RunChunkQ8(&job, 0);
  } else {
    const int64_t rows = (kChunkWork * kQ8ChunkScale + M * K - 1) / (M * K);
    job.chunk_rows = std::max<int64_t>(4, (rows + 3) / 4 * 4);
    GetPool()->Run(RunChunkQ8, &job, (N + job.chunk_rows - 1) / job.chunk_rows);
  }
  return ffi::Error::Success();
}


// ------------------------------------------------------------------ decode attention
//
// out[b, h] = softmax_s(scale * q[b, h] . k[b, h / G, s]) @ v[b, h / G, s] over the
// visible slots lo[b] <= s < hi[b] of a KV cache (B, KVH, S, D), G = H / KVH query
// heads per kv head (grouped-query attention), for one new token per sequence.
// Only the visible slots are read: the cache is allocated to its maximum length
// but filled up to hi. Per (b, kv head): the scores of the G query heads (a
// register tile of up to four heads times a few slots, so every loaded k row
// serves all of them), a stable softmax (max subtracted, exp vectorized, float32
// sums), then the p-weighted sum of the v rows (again each loaded v vector
// serves every head of the tile), divided by the softmax's sum once at the end.
// k and v may be float32 or float16 (F16C converts eight at a time). No visible
// slot: zeros. Each (b, kv head) pair's slots are cut into parts of kAttnPart
// (split-K, as flash-decoding does): the parts are the pool's chunks, each
// leaves its unnormalized output with its max and sum, and the caller merges
// them in part order. A call too small to pay for the pool runs on the calling
// thread; the cut depends only on lo and hi, so results do not depend on the
// number of threads.

// exp(x) for x <= 0 (the softmax's shifted scores; softmax_dot.h's ExpNonPositiveT:
// Cephes' range reduction and polynomial, about 1 ulp; below -87 exp(-87)).
inline __m256 ExpNonPositive(__m256 x) { return ExpNonPositiveT<SdAvx2>(x); }

// Eight cache elements as float32.
inline __m256 Load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 Load8(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline float Load1(const float* p) { return *p; }
inline float Load1(const uint16_t* p) { return _cvtsh_ss(*p); }
// Quantized caches (jqx_decode_attention_q): int8 codes are sign-extended; an fp8
// E4M3 code's bits moved into a float16 (sign to bit 15, exponent and mantissa
// to bits 7..13) are its value times 2^-8, for normal and subnormal codes alike
// (the factor is folded into the scales), then F16C converts them.
struct Fp8 {
  uint8_t bits;
};
inline __m256 Load8(const int8_t* p) {
  const __m128i c = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(c));
}
inline float Load1(const int8_t* p) { return static_cast<float>(*p); }
inline __m256 Load8(const Fp8* p) {
  const __m128i w = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  const __m128i sign = _mm_and_si128(_mm_slli_epi16(w, 8), _mm_set1_epi16(int16_t(0x8000)));
  const __m128i rest = _mm_and_si128(_mm_slli_epi16(w, 7), _mm_set1_epi16(0x3F80));
  return _mm256_cvtph_ps(_mm_or_si128(sign, rest));
}
inline float Load1(const Fp8* p) {
  return _cvtsh_ss(static_cast<uint16_t>(((p->bits & 0x80) << 8) | ((p->bits & 0x7F) << 7)));
}
constexpr float kFp8Unit = 256.0f;  // Load8(Fp8) returns the code's value / 256

// row[j] *= s[j] (float16 per-slot scales of a quantized cache).
inline void ScaleRow(float* row, const uint16_t* s, int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    _mm256_storeu_ps(row + j, _mm256_mul_ps(_mm256_loadu_ps(row + j), Load8(s + j)));
  for (; j < n; ++j) row[j] *= Load1(s + j);
}

// Slots per pass of the score tile: GT heads x SL slots accumulators, plus the
// GT q vectors and one k vector, within AVX2's 16 registers.
template <int GT>
constexpr int kScoreSlots = GT <= 3 ? 4 : 2;
// Vectors of 8 along D per pass of the value tile (GT x VB accumulators).
template <int GT>
constexpr int kValueVecs = GT <= 2 ? 4 : 2;

// sc[g * ns + j] = scale * q[g] . k[j] for GT heads and ns slots (rows of D).
template <typename T, int GT>
void AttnScores(const float* q, const T* k, int64_t D, int64_t ns, float scale, float* sc) {
  constexpr int SL = kScoreSlots<GT>;
  const int64_t d8 = D / 8 * 8;
  int64_t j = 0;
  for (; j + SL <= ns; j += SL) {
    __m256 acc[GT][SL];
#pragma GCC unroll 4
    for (int g = 0; g < GT; ++g)
#pragma GCC unroll 4
      for (int t = 0; t < SL; ++t) acc[g][t] = _mm256_setzero_ps();
    for (int64_t d = 0; d < d8; d += 8) {
      __m256 qv[GT];
#pragma GCC unroll 4
      for (int g = 0; g < GT; ++g) qv[g] = _mm256_loadu_ps(q + g * D + d);
#pragma GCC unroll 4
      for (int t = 0; t < SL; ++t) {
        const __m256 kv = Load8(k + (j + t) * D + d);
#pragma GCC unroll 4
        for (int g = 0; g < GT; ++g) acc[g][t] = _mm256_fmadd_ps(qv[g], kv, acc[g][t]);
      }
    }
#pragma GCC unroll 4
    for (int g = 0; g < GT; ++g) {
      float s[SL];
      StoreSums<SL>(acc[g], s);
      for (int t = 0; t < SL; ++t) {
        for (int64_t d = d8; d < D; ++d) s[t] += q[g * D + d] * Load1(k + (j + t) * D + d);
        sc[g * ns + j + t] = scale * s[t];
      }
    }
  }
  for (; j < ns; ++j) {  // the last slots, one at a time
    __m256 acc[GT];
#pragma GCC unroll 4
    for (int g = 0; g < GT; ++g) acc[g] = _mm256_setzero_ps();
    for (int64_t d = 0; d < d8; d += 8) {
      const __m256 kv = Load8(k + j * D + d);
#pragma GCC unroll 4
      for (int g = 0; g < GT; ++g)
        acc[g] = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * D + d), kv, acc[g]);
    }
#pragma GCC unroll 4
    for (int g = 0; g < GT; ++g) {
      float s = HSum(acc[g]);
      for (int64_t d = d8; d < D; ++d) s += q[g * D + d] * Load1(k + j * D + d);
      sc[g * ns + j] = scale * s;
    }
  }
}

// In place: row := exp(row - max(row)); returns the row's sum (>= 1) and sets
// *top to the max.
inline float SoftmaxNumerators(float* row, int64_t ns, float* top) {
  const int64_t n8 = ns / 8 * 8;
  __m256 mv = _mm256_set1_ps(-INFINITY);
  for (int64_t j = 0; j < n8; j += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(row + j));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, mv);
  float mx = -INFINITY;
  for (int i = 0; i < 8; ++i) mx = std::max(mx, lanes[i]);
  for (int64_t j = n8; j < ns; ++j) mx = std::max(mx, row[j]);
  *top = mx;
  const __m256 m = _mm256_set1_ps(mx);
  __m256 sv = _mm256_setzero_ps();
  for (int64_t j = 0; j < n8; j += 8) {
    const __m256 e = ExpNonPositive(_mm256_sub_ps(_mm256_loadu_ps(row + j), m));
    _mm256_storeu_ps(row + j, e);
    sv = _mm256_add_ps(sv, e);
  }
  float sum = HSum(sv);
  if (n8 < ns) {  // the tail through the same exp, padded with -inf (exp -> ~0, dropped)
    alignas(32) float t[8];
    for (int i = 0; i < 8; ++i) t[i] = n8 + i < ns ? row[n8 + i] - mx : -INFINITY;
    _mm256_store_ps(t, ExpNonPositive(_mm256_load_ps(t)));
    for (int64_t j = n8; j < ns; ++j) {
      row[j] = t[j - n8];
      sum += row[j];
    }
  }
  return sum;
}

// out[g] = (sum_j p[g * ns + j] * v[j]) * inv[g] for GT heads.
template <typename T, int GT>
void AttnValues(const float* p, const T* v, int64_t D, int64_t ns, const float* inv, float* out) {
  constexpr int VB = kValueVecs<GT>;
  const int64_t d8 = D / 8 * 8;
  int64_t d = 0;
  for (; d < d8; d += 8 * VB) {
    const int nv = static_cast<int>(std::min<int64_t>(VB, (d8 - d) / 8));
    __m256 acc[GT][VB];
#pragma GCC unroll 4
    for (int g = 0; g < GT; ++g)
#pragma GCC unroll 4
      for (int t = 0; t < VB; ++t) acc[g][t] = _mm256_setzero_ps();
    if (nv == VB) {
      for (int64_t j = 0; j < ns; ++j) {
        __m256 vv[VB];
#pragma GCC unroll 4
        for (int t = 0; t < VB; ++t) vv[t] = Load8(v + j * D + d + 8 * t);
#pragma GCC unroll 4
        for (int g = 0; g < GT; ++g) {
          const __m256 pg = _mm256_broadcast_ss(p + g * ns + j);
#pragma GCC unroll 4
          for (int t = 0; t < VB; ++t) acc[g][t] = _mm256_fmadd_ps(pg, vv[t], acc[g][t]);
        }
      }
    } else {  // fewer than VB vectors left along D
      for (int64_t j = 0; j < ns; ++j)
        for (int t = 0; t < nv; ++t) {
          const __m256 vv = Load8(v + j * D + d + 8 * t);
          for (int g = 0; g < GT; ++g)
            acc[g][t] = _mm256_fmadd_ps(_mm256_broadcast_ss(p + g * ns + j), vv, acc[g][t]);
        }
    }
#pragma GCC unroll 4
    for (int g = 0; g < GT; ++g)
      for (int t = 0; t < nv; ++t)
        _mm256_storeu_ps(out + g * D + d + 8 * t,
                         _mm256_mul_ps(acc[g][t], _mm256_set1_ps(inv[g])));
  }
  for (d = d8; d < D; ++d)  // D not a multiple of 8: the last columns
    for (int g = 0; g < GT; ++g) {
      float s = 0.0f;
      for (int64_t j = 0; j < ns; ++j) s += p[g * ns + j] * Load1(v + j * D + d);
      out[g * D + d] = s * inv[g];
    }
}

// Scales of a quantized cache for the slots of one part: per slot (int8;
// float16) or one factor per kv head (fp8; float32, times kFp8Unit). A float
// cache has none (null and 1).
struct SlotScales {
  const uint16_t* k = nullptr;
  const uint16_t* v = nullptr;
  float kmul = 1.0f;
  float vmul = 1.0f;
};

// The G heads of one kv head over ns slots: out[g] = sum_j p_j v_j with p_j =
// exp(score_j - top[g]), divided by sum[g] = sum_j p_j when `normalize`, else
// left unnormalized for the combination of parts. A quantized cache's key scales
// multiply the scores before the softmax, its value scales the weights p_j after
// the sum is taken (so sum[g] stays the softmax's denominator).
template <typename T, int GT>
void AttnHeads(const float* q, const T* k, const T* v, int64_t D, int64_t ns, float scale,
               const SlotScales& qs, float* sc, float* out, bool normalize, float* top,
               float* sum) {
  AttnScores<T, GT>(q, k, D, ns, scale * qs.kmul, sc);
  if (qs.k != nullptr)
    for (int g = 0; g < GT; ++g) ScaleRow(sc + g * ns, qs.k, ns);
  float inv[GT];
  for (int g = 0; g < GT; ++g) {
    sum[g] = SoftmaxNumerators(sc + g * ns, ns, top + g);
    inv[g] = (normalize ? 1.0f / sum[g] : 1.0f) * qs.vmul;
  }
  if (qs.v != nullptr)
    for (int g = 0; g < GT; ++g) ScaleRow(sc + g * ns, qs.v, ns);
  AttnValues<T, GT>(sc, v, D, ns, inv, out);
}

// Slots per part: a (b, kv head) pair's visible slots are cut into parts of
// this many, each a chunk for the pool (a few microseconds of work), so long
// caches spread over the threads and a preempted worker holds back little.
// The cut depends on lo and hi only, never on the threads, so neither do the
// results.
constexpr int64_t kAttnPart = 256;

enum CacheKind : int {
  kCacheF32 = 0,
  kCacheF16 = 1,
  kCacheInt8 = 2,
  kCacheFp8 = 3,
  kCacheInt4 = 4
};

// The 4-bit KIVI cache (jqx.ops.attention's KVCodes "int4"), S a multiple of
// `group`: codes (B, KVH, S, D / 2) two per byte, the even channel in the low
// nibble; keys with a float16 scale and zero point per channel and group of
// `group` slots (B, KVH, S / group, D), values per slot and group of `group`
// channels (B, KVH, S, D / group); x = (code - zero) * scale. The slots from
// qhi[b] = (hi - 1) / group * group on are read from the float residual window
// (B, KVH, group, D; slot qhi + r at row r), whatever their codes hold; values
// kept without a window (v_window false) are read from their codes at every slot.
struct Int4Cache {
  const uint16_t* ks;  // key scales and zero points
  const uint16_t* kz;
  const uint16_t* vs;  // value scales and zero points
  const uint16_t* vz;
  const void* kr;  // residual windows, float32 or float16 bits
  const void* vr;
  bool res_f16;
  bool v_window;  // false: no value window, value codes at every slot
  int64_t group;
  const int64_t* qhi;  // (B,): the residual's first slot
};

struct AttnJob {
  const float* q;  // (B, H, D)
  const void* k;   // (B, KVH, S, D), float, float16 bits, int8 or fp8 codes (int4: D / 2)
  const void* v;
  float* out;  // (B, H, D)
  int64_t H, KVH, S, D;
  float scale;
  CacheKind kind;
  const void* ks;  // quantized caches: int8 (B, KVH, S) float16, fp8 (B, KVH) float32
  const void* vs;
  const int64_t* first;  // (B + 1,): chunks of sequences < b; chunk = pair * parts + part
  const int64_t* lo;     // (B,) clipped
  const int64_t* ns;     // (B,) visible slots
  float* partial;        // per chunk of a multi-part sequence: G x (D + 2) floats
  const Int4Cache* i4 = nullptr;  // kCacheInt4 only
};

// Scores of the calling thread (workers keep theirs between calls).
thread_local std::vector<float> t_scores;

template <typename T>
void AttnPart(const AttnJob& a, int64_t b, int64_t kh, int64_t part, int64_t parts,
              float* partial) {
  const int64_t G = a.H / a.KVH, D = a.D;
  const int64_t s0 = a.lo[b] + part * kAttnPart;
  const int64_t ns = std::min(kAttnPart, a.ns[b] - part * kAttnPart);
  const int64_t at = ((b * a.KVH + kh) * a.S + s0) * D;
  const T* k = static_cast<const T*>(a.k) + at;
  const T* v = static_cast<const T*>(a.v) + at;
  const float* q = a.q + (b * a.H + kh * G) * D;
  SlotScales qs;
  if (a.kind == kCacheInt8) {
    const int64_t slot = (b * a.KVH + kh) * a.S + s0;
    qs.k = static_cast<const uint16_t*>(a.ks) + slot;
    qs.v = static_cast<const uint16_t*>(a.vs) + slot;
  } else if (a.kind == kCacheFp8) {
    qs.kmul = static_cast<const float*>(a.ks)[b * a.KVH + kh] * kFp8Unit;
    qs.vmul = static_cast<const float*>(a.vs)[b * a.KVH + kh] * kFp8Unit;
  }
  // One part: the final output, normalized. Several: unnormalized rows with
  // their max and sum, combined by the caller.
  const bool whole = parts == 1;
  float* out = whole ? a.out + (b * a.H + kh * G) * D : partial;
  float* top = whole ? nullptr : partial + G * D;
  float* sum = whole ? nullptr : top + G;
  float scratch[8];  // max and sum of a tile when they are not kept
  std::vector<float>& sc = t_scores;
  const int64_t need = std::min<int64_t>(G, 4) * ns;
  if (static_cast<int64_t>(sc.size()) < need) sc.resize(static_cast<size_t>(need));
  for (int64_t g = 0; g < G;) {
    const int64_t gt = std::min<int64_t>(4, G - g);
    const float* qg = q + g * D;
    float* og = out + g * D;
    float* tg = whole ? scratch : top + g;
    float* sg = whole ? scratch + 4 : sum + g;
    switch (gt) {
      case 4: AttnHeads<T, 4>(qg, k, v, D, ns, a.scale, qs, sc.data(), og, whole, tg, sg); break;
      case 3: AttnHeads<T, 3>(qg, k, v, D, ns, a.scale, qs, sc.data(), og, whole, tg, sg); break;
      case 2: AttnHeads<T, 2>(qg, k, v, D, ns, a.scale, qs, sc.data(), og, whole, tg, sg); break;
      default: AttnHeads<T, 1>(qg, k, v, D, ns, a.scale, qs, sc.data(), og, whole, tg, sg); break;
    }
    g += gt;
  }
}

// ------------------------------------------------------------------ int4 (KIVI)
//
// A byte holds channels 2i (low nibble) and 2i + 1 (high): eight bytes unpack
// to the even channels of a block of 16 in one vector and the odd ones in
// another. The scores' scaled queries are stored in that order (position
// Int4Pos(d)), so a block costs two FMAs per head; the value sums are kept in it
// and interleaved back when stored. Channels past the last whole block of 16 are
// done one at a time in natural order.
inline int64_t Int4Pos(int64_t d, int64_t d16) {
  return d < d16 ? d / 16 * 16 + (d & 1) * 8 + (d & 15) / 2 : d;
}
inline void Unpack16(const uint8_t* p, __m256* even, __m256* odd) {
  const __m256i w = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  *even = _mm256_cvtepi32_ps(_mm256_and_si256(w, _mm256_set1_epi32(15)));
  *odd = _mm256_cvtepi32_ps(_mm256_srli_epi32(w, 4));
}
inline float Nibble(const uint8_t* row, int64_t d) {
  return static_cast<float>((row[d / 2] >> ((d & 1) * 4)) & 15);
}
inline float F16(uint16_t h) { return _cvtsh_ss(h); }

// sc[g * stride + j] = qk[g] . codes[j] - bias[g] for GT heads over n slots of
// one key group, qk (GT x D, Int4Pos order) the query times the softmax scale
// times the group's channel scales, bias[g] = qk[g] . zero points.
template <int GT>
void Int4Scores(const float* qk, const float* bias, const uint8_t* codes, int64_t D, int64_t n,
                float* sc, int64_t stride) {
  constexpr int SL = kScoreSlots<GT>;  // slots per pass: one horizontal sum for SL
  const int64_t d16 = D / 16 * 16;
  int64_t j = 0;
  for (; j + SL <= n; j += SL) {
    __m256 acc[GT][SL];
#pragma GCC unroll 4
    for (int g = 0; g < GT; ++g)
#pragma GCC unroll 4
      for (int t = 0; t < SL; ++t) acc[g][t] = _mm256_setzero_ps();
    for (int64_t d = 0; d < d16; d += 16) {
#pragma GCC unroll 4
      for (int t = 0; t < SL; ++t) {
        __m256 ev, od;
        Unpack16(codes + (j + t) * (D / 2) + d / 2, &ev, &od);
#pragma GCC unroll 4
        for (int g = 0; g < GT; ++g) {
          acc[g][t] = _mm256_fmadd_ps(_mm256_loadu_ps(qk + g * D + d), ev, acc[g][t]);
          acc[g][t] = _mm256_fmadd_ps(_mm256_loadu_ps(qk + g * D + d + 8), od, acc[g][t]);
        }
      }
    }
#pragma GCC unroll 4
    for (int g = 0; g < GT; ++g) {
      float s[SL];
      StoreSums<SL>(acc[g], s);
      for (int t = 0; t < SL; ++t) {
        const uint8_t* row = codes + (j + t) * (D / 2);
        for (int64_t d = d16; d < D; ++d) s[t] += qk[g * D + d] * Nibble(row, d);
        sc[g * stride + j + t] = s[t] - bias[g];
      }
    }
  }
  for (; j < n; ++j) {  // the last slots, one at a time
    const uint8_t* row = codes + j * (D / 2);
    __m256 acc[GT];
#pragma GCC unroll 4
    for (int g = 0; g < GT; ++g) acc[g] = _mm256_setzero_ps();
    for (int64_t d = 0; d < d16; d += 16) {
      __m256 ev, od;
      Unpack16(row + d / 2, &ev, &od);
#pragma GCC unroll 4
      for (int g = 0; g < GT; ++g) {
        acc[g] = _mm256_fmadd_ps(_mm256_loadu_ps(qk + g * D + d), ev, acc[g]);
        acc[g] = _mm256_fmadd_ps(_mm256_loadu_ps(qk + g * D + d + 8), od, acc[g]);
      }
    }
#pragma GCC unroll 4
    for (int g = 0; g < GT; ++g) {
      float s = HSum(acc[g]);
      for (int64_t d = d16; d < D; ++d) s += qk[g * D + d] * Nibble(row, d);
      sc[g * stride + j] = s - bias[g];
    }
  }
}

// acc[g] (natural order, D) = sum_j p[g * stride + j] * vscale_j * codes_j
// (scales per group of `grp` channels) for GT heads over nq slots; the zero
// points are the caller's. Blocks of 16 channels outside, slots inside, so each
// head's two accumulators stay in registers.
template <int GT>
void Int4Values(const float* p, int64_t stride, const uint8_t* codes, const uint16_t* vs,
                int64_t nq, int64_t D, int64_t grp, float* acc) {
  const int64_t d16 = D / 16 * 16, ng = D / grp;
  for (int64_t d = 0; d < d16; d += 16) {
    __m256 ae[GT], ao[GT];
#pragma GCC unroll 4
    for (int g = 0; g < GT; ++g) ae[g] = ao[g] = _mm256_setzero_ps();
    if (grp % 16 == 0) {  // one scale for the block (KIVI's groups of 32)
      const int64_t jg = d / grp;
      for (int64_t j = 0; j < nq; ++j) {
        __m256 ev, od;
        Unpack16(codes + j * (D / 2) + d / 2, &ev, &od);
        const float s = F16(vs[j * ng + jg]);
#pragma GCC unroll 4
        for (int g = 0; g < GT; ++g) {
          const __m256 w = _mm256_set1_ps(p[g * stride + j] * s);
          ae[g] = _mm256_fmadd_ps(w, ev, ae[g]);
          ao[g] = _mm256_fmadd_ps(w, od, ao[g]);
        }
      }
    } else {  // small groups: a scale per lane
      for (int64_t j = 0; j < nq; ++j) {
        __m256 ev, od;
        Unpack16(codes + j * (D / 2) + d / 2, &ev, &od);
        alignas(32) float se[8], so[8];
        for (int i = 0; i < 8; ++i) {
          se[i] = F16(vs[j * ng + (d + 2 * i) / grp]);
          so[i] = F16(vs[j * ng + (d + 2 * i + 1) / grp]);
        }
        const __m256 sev = _mm256_mul_ps(_mm256_load_ps(se), ev);
        const __m256 sov = _mm256_mul_ps(_mm256_load_ps(so), od);
#pragma GCC unroll 4
        for (int g = 0; g < GT; ++g) {
          const __m256 w = _mm256_set1_ps(p[g * stride + j]);
          ae[g] = _mm256_fmadd_ps(w, sev, ae[g]);
          ao[g] = _mm256_fmadd_ps(w, sov, ao[g]);
        }
      }
    }
#pragma GCC unroll 4
    for (int g = 0; g < GT; ++g) {  // interleave even and odd channels back
      const __m256 lo = _mm256_unpacklo_ps(ae[g], ao[g]);
      const __m256 hi = _mm256_unpackhi_ps(ae[g], ao[g]);
      _mm256_storeu_ps(acc + g * D + d, _mm256_permute2f128_ps(lo, hi, 0x20));
      _mm256_storeu_ps(acc + g * D + d + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
    }
  }
  for (int64_t d = d16; d < D; ++d)
    for (int g = 0; g < GT; ++g) {
      float s = 0.0f;
      for (int64_t j = 0; j < nq; ++j)
        s += p[g * stride + j] * F16(vs[j * ng + d / grp]) * Nibble(codes + j * (D / 2), d);
      acc[g * D + d] = s;
    }
}

// acc[g] += sum_j p[g * stride + j] * rows[j] (float rows of the residual window).
template <typename T, int GT>
void Int4Residual(const float* p, int64_t stride, const T* rows, int64_t n, int64_t D,
                  float* acc) {
  const int64_t d8 = D / 8 * 8;
  for (int64_t j = 0; j < n; ++j) {
    const T* r = rows + j * D;
    for (int64_t d = 0; d < d8; d += 8) {
      const __m256 x = Load8(r + d);
#pragma GCC unroll 4
      for (int g = 0; g < GT; ++g)
        _mm256_storeu_ps(acc + g * D + d,
                         _mm256_fmadd_ps(_mm256_set1_ps(p[g * stride + j]), x,
                                         _mm256_loadu_ps(acc + g * D + d)));
    }
    for (int64_t d = d8; d < D; ++d)
      for (int g = 0; g < GT; ++g) acc[g * D + d] += p[g * stride + j] * Load1(r + d);
  }
}

// Per-thread scratch of the int4 part: the scaled queries, the residual's scores
// and the zero points' sums.
thread_local std::vector<float> t_int4;

// GT heads of one kv head over the part's ns slots from s0: the slots below qhi
// from the codes (key groups in runs), the rest from the residual window; then
// the softmax as AttnHeads does and the value sums (codes, minus the zero
// points' share per group, plus the residual's rows).
template <typename R, int GT>
void Int4Heads(const AttnJob& a, int64_t b, int64_t kh, const float* q, int64_t s0, int64_t ns,
               float* sc, float* out, bool normalize, float* top, float* sum) {
  const Int4Cache& c = *a.i4;
  const int64_t D = a.D, S = a.S, grp = c.group, ng = D / grp, d16 = D / 16 * 16;
  const int64_t pair = b * a.KVH + kh;
  const int64_t qhi = c.qhi[b];
  const int64_t nq = std::clamp<int64_t>(qhi - s0, 0, ns);  // slots from the codes
  const uint8_t* kc = static_cast<const uint8_t*>(a.k) + pair * S * (D / 2);
  const uint8_t* vc = static_cast<const uint8_t*>(a.v) + pair * S * (D / 2);
  const uint16_t* ks = c.ks + pair * (S / grp) * D;
  const uint16_t* kz = c.kz + pair * (S / grp) * D;
  const uint16_t* vs = c.vs + pair * S * ng;
  const uint16_t* vz = c.vz + pair * S * ng;
  const R* kr = static_cast<const R*>(c.kr) + pair * grp * D;
  const R* vr = c.v_window ? static_cast<const R*>(c.vr) + pair * grp * D : nullptr;
  std::vector<float>& buf = t_int4;
  const size_t need = static_cast<size_t>(GT * D + GT * grp + GT * ng + GT);
  if (buf.size() < need) buf.resize(need);
  float* qk = buf.data();
  float* rsc = qk + GT * D;
  float* zs = rsc + GT * grp;
  float* bias = zs + GT * ng;
  // Scores from the codes, one key group's run of slots at a time.
  for (int64_t j = 0; j < nq;) {
    const int64_t s = s0 + j, gi = s / grp;
    const int64_t n = std::min(nq - j, (gi + 1) * grp - s);
    for (int g = 0; g < GT; ++g) {
      float bsum = 0.0f;
      for (int64_t d = 0; d < D; ++d) {
        const float x = q[g * D + d] * a.scale * F16(ks[gi * D + d]);
        qk[g * D + Int4Pos(d, d16)] = x;
        bsum += x * F16(kz[gi * D + d]);
      }
      bias[g] = bsum;
    }
    Int4Scores<GT>(qk, bias, kc + s * (D / 2), D, n, sc + j, ns);
    j += n;
  }
  const int64_t nr = ns - nq;  // slots from the residual window, rows from r0
  const int64_t r0 = s0 + nq - qhi;
  if (nr > 0) {
    AttnScores<R, GT>(q, kr + r0 * D, D, nr, a.scale, rsc);
    for (int g = 0; g < GT; ++g)
      for (int64_t j = 0; j < nr; ++j) sc[g * ns + nq + j] = rsc[g * nr + j];
  }
  float inv[GT];
  for (int g = 0; g < GT; ++g) {
    sum[g] = SoftmaxNumerators(sc + g * ns, ns, top + g);
    inv[g] = normalize ? 1.0f / sum[g] : 1.0f;
  }
  const int64_t nv = c.v_window ? nq : ns;  // value slots from the codes
  Int4Values<GT>(sc, ns, vc + s0 * (D / 2), vs + s0 * ng, nv, D, grp, out);
  for (int64_t i = 0; i < GT * ng; ++i) zs[i] = 0.0f;
  for (int64_t j = 0; j < nv; ++j)
    for (int64_t jg = 0; jg < ng; ++jg) {
      const int64_t at = (s0 + j) * ng + jg;
      const float t = F16(vs[at]) * F16(vz[at]);
      for (int g = 0; g < GT; ++g) zs[g * ng + jg] += sc[g * ns + j] * t;
    }
  for (int g = 0; g < GT; ++g)
    for (int64_t d = 0; d < D; ++d) out[g * D + d] -= zs[g * ng + d / grp];
  if (nr > 0 && c.v_window) Int4Residual<R, GT>(sc + nq, ns, vr + r0 * D, nr, D, out);
  for (int g = 0; g < GT; ++g)
    for (int64_t d = 0; d < D; ++d) out[g * D + d] *= inv[g];
}

// AttnPart for the int4 cache: the same parts, tiles of heads and outputs.
template <typename R>
void AttnPartInt4(const AttnJob& a, int64_t b, int64_t kh, int64_t part, int64_t parts,
                  float* partial) {
  const int64_t G = a.H / a.KVH, D = a.D;
  const int64_t s0 = a.lo[b] + part * kAttnPart;
  const int64_t ns = std::min(kAttnPart, a.ns[b] - part * kAttnPart);
  const float* q = a.q + (b * a.H + kh * G) * D;
  const bool whole = parts == 1;
  float* out = whole ? a.out + (b * a.H + kh * G) * D : partial;
  float* top = whole ? nullptr : partial + G * D;
  float* sum = whole ? nullptr : top + G;
  float scratch[8];
  std::vector<float>& sc = t_scores;
  const int64_t need = std::min<int64_t>(G, 4) * ns;
  if (static_cast<int64_t>(sc.size()) < need) sc.resize(static_cast<size_t>(need));
  for (int64_t g = 0; g < G;) {
    const int64_t gt = std::min<int64_t>(4, G - g);
    const float* qg = q + g * D;
    float* og = out + g * D;
    float* tg = whole ? scratch : top + g;
    float* sg = whole ? scratch + 4 : sum + g;
    float* s = sc.data();
    switch (gt) {
      case 4: Int4Heads<R, 4>(a, b, kh, qg, s0, ns, s, og, whole, tg, sg); break;
      case 3: Int4Heads<R, 3>(a, b, kh, qg, s0, ns, s, og, whole, tg, sg); break;
      case 2: Int4Heads<R, 2>(a, b, kh, qg, s0, ns, s, og, whole, tg, sg); break;
      default: Int4Heads<R, 1>(a, b, kh, qg, s0, ns, s, og, whole, tg, sg); break;
    }
    g += gt;
  }
}

inline int64_t AttnParts(int64_t ns) { return (ns + kAttnPart - 1) / kAttnPart; }

void AttnChunk(const void* ctx, int64_t c) {
  const AttnJob& a = *static_cast<const AttnJob*>(ctx);
  // The sequence whose chunks hold c: first[b] <= c < first[b + 1] (B is small).
  int64_t b = 0;
  while (a.first[b + 1] <= c) ++b;
  const int64_t parts = AttnParts(a.ns[b]);
  const int64_t r = c - a.first[b];
  const int64_t G = a.H / a.KVH;
  float* partial = a.partial + c * G * (a.D + 2);
  switch (a.kind) {
    case kCacheF16: AttnPart<uint16_t>(a, b, r / parts, r % parts, parts, partial); break;
    case kCacheInt8: AttnPart<int8_t>(a, b, r / parts, r % parts, parts, partial); break;
    case kCacheFp8: AttnPart<Fp8>(a, b, r / parts, r % parts, parts, partial); break;
    case kCacheInt4:
      if (a.i4->res_f16)
        AttnPartInt4<uint16_t>(a, b, r / parts, r % parts, parts, partial);
      else
        AttnPartInt4<float>(a, b, r / parts, r % parts, parts, partial);
      break;
    default: AttnPart<float>(a, b, r / parts, r % parts, parts, partial); break;
  }
}

// out = sum_p w_p o_p / sum_p w_p l_p with w_p = exp(top_p - max_p top_p): the
// parts of one head merged, in part order.
void AttnCombine(const AttnJob& a, int64_t b, int64_t kh, int64_t parts) {
  const int64_t G = a.H / a.KVH, D = a.D, stride = G * (D + 2);
  const float* base = a.partial + (a.first[b] + kh * parts) * stride;
  for (int64_t g = 0; g < G; ++g) {
    float top = -INFINITY;
    for (int64_t p = 0; p < parts; ++p) top = std::max(top, base[p * stride + G * D + g]);
    float* out = a.out + (b * a.H + kh * G + g) * D;
    float total = 0.0f;
    for (int64_t d = 0; d < D; ++d) out[d] = 0.0f;
    for (int64_t p = 0; p < parts; ++p) {
      const float* part = base + p * stride;
      const float w = expf(part[G * D + g] - top);
      total += w * part[G * D + G + g];
      const float* o = part + g * D;
      for (int64_t d = 0; d < D; ++d) out[d] += w * o[d];
    }
    const float inv = 1.0f / total;
    for (int64_t d = 0; d < D; ++d) out[d] *= inv;
  }
}

// Below this many multiply-adds (2 * H * visible slots * D over the batch), or
// with fewer chunks than two per thread, the pool does not pay (measured on 2
// shared cores: waking a worker and waiting for a preempted one cost more than
// the chunks it takes): run on the calling thread.
constexpr int64_t kAttnInlineWork = int64_t{1} << 20;

// Per-call tables of the calling thread (XLA may call from several threads).
thread_local std::vector<int64_t> t_attn_index;
thread_local std::vector<float> t_attn_partial;

// Runs a validated job: per sequence its clipped lo, visible slots and first
// chunk, the chunks on the pool (or inline), then the merge of multi-part heads.
ffi::Error RunAttention(AttnJob job, const int32_t* lo, const int32_t* hi, int64_t B) {
  const int64_t H = job.H, KVH = job.KVH, S = job.S, D = job.D;
  if (B == 0 || H == 0 || D == 0) return ffi::Error::Success();
  const int64_t G = H / KVH;
  std::vector<int64_t>& idx = t_attn_index;
  idx.assign(static_cast<size_t>(3 * B + 1), 0);
  int64_t* first = idx.data();
  int64_t* los = first + B + 1;
  int64_t* nss = los + B;
  int64_t visible = 0;
  for (int64_t b = 0; b < B; ++b) {
    los[b] = std::clamp<int64_t>(lo[b], 0, S);
    nss[b] = std::clamp<int64_t>(hi[b], los[b], S) - los[b];
    visible += nss[b];
    first[b + 1] = first[b] + KVH * AttnParts(nss[b]);
  }
  const int64_t chunks = first[B];
  std::vector<float>& partial = t_attn_partial;
  if (partial.size() < static_cast<size_t>(chunks * G * (D + 2)))
    partial.resize(static_cast<size_t>(chunks * G * (D + 2)));
  job.first = first;
  job.lo = los;
  job.ns = nss;
  job.partial = partial.data();
  float* Y = job.out;
  Pool* pool = 2 * H * visible * D < kAttnInlineWork ? nullptr : GetPool();
  if (pool == nullptr || chunks < 2 * pool->threads()) {
    for (int64_t c = 0; c < chunks; ++c) AttnChunk(&job, c);
  } else {
    pool->Run(AttnChunk, &job, chunks);
  }
  for (int64_t b = 0; b < B; ++b) {
    const int64_t parts = AttnParts(nss[b]);
    if (parts == 0)  // nothing visible: zeros, not 0/0
      memset(Y + b * H * D, 0, static_cast<size_t>(H * D) * sizeof(float));
    else if (parts > 1)
      for (int64_t kh = 0; kh < KVH; ++kh) AttnCombine(job, b, kh, parts);
  }
  return ffi::Error::Success();
}

ffi::Error DecodeAttentionImpl(ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                               ffi::Buffer<ffi::S32> lo, ffi::Buffer<ffi::S32> hi,
                               ffi::ResultBuffer<ffi::F32> out, float scale) {
  const auto qd = q.dimensions();
  const auto kd = k.dimensions();
  const auto vd = v.dimensions();
  const auto od = out->dimensions();
  if (qd.size() != 3 || kd.size() != 4 || vd.size() != 4 || od.size() != 3 ||
      lo.dimensions().size() != 1 || hi.dimensions().size() != 1)
    return ffi::Error::InvalidArgument(
        "jqx_decode_attention: q and out must be 3-D, k and v 4-D, lo and hi 1-D");
  const int64_t B = qd[0], H = qd[1], D = qd[2], KVH = kd[1], S = kd[2];
  const auto et = k.element_type();
  if ((et != ffi::DataType::F32 && et != ffi::DataType::F16) || v.element_type() != et ||
      kd[0] != B || kd[3] != D || KVH == 0 || H % KVH != 0 ||
      !std::equal(kd.begin(), kd.end(), vd.begin()) || od[0] != B || od[1] != H || od[2] != D ||
      lo.dimensions()[0] != B || hi.dimensions()[0] != B)
    return ffi::Error::InvalidArgument("jqx_decode_attention: inconsistent shapes or dtypes");
  AttnJob job{q.typed_data(), k.untyped_data(), v.untyped_data(), out->typed_data(),
              H, KVH, S, D, scale, et == ffi::DataType::F16 ? kCacheF16 : kCacheF32,
              nullptr, nullptr, nullptr, nullptr, nullptr, nullptr};
  return RunAttention(job, lo.typed_data(), hi.typed_data(), B);
}

// jqx_decode_attention_q: the same attention over a quantized cache read in
// place: int8 codes (B, KVH, S, D) with float16 scales per slot (B, KVH, S), or
// fp8 E4M3 codes (their bits as uint8) with one float32 scale per kv head (B, KVH)
// (jqx.ops.attention's KVCodes). The scales enter the products: a slot's score is its key scale times
// scale * (q . codes), and the value sum weights each slot's codes by its
// probability times its value scale; no float copy of the cache is formed.
ffi::Error DecodeAttentionQImpl(ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k, ffi::AnyBuffer ks,
                                ffi::AnyBuffer v, ffi::AnyBuffer vs, ffi::Buffer<ffi::S32> lo,
                                ffi::Buffer<ffi::S32> hi, ffi::ResultBuffer<ffi::F32> out,
                                float scale) {
  const auto qd = q.dimensions();
  const auto kd = k.dimensions();
  const auto vd = v.dimensions();
  const auto sd = ks.dimensions();
  const auto od = out->dimensions();
  if (qd.size() != 3 || kd.size() != 4 || vd.size() != 4 || od.size() != 3 ||
      lo.dimensions().size() != 1 || hi.dimensions().size() != 1)
    return ffi::Error::InvalidArgument(
        "jqx_decode_attention_q: q and out must be 3-D, k and v 4-D, lo and hi 1-D");
  const int64_t B = qd[0], H = qd[1], D = qd[2], KVH = kd[1], S = kd[2];
  const auto et = k.element_type();
  const bool int8 = et == ffi::DataType::S8 && ks.element_type() == ffi::DataType::F16 &&
                    sd.size() == 3 && sd[0] == B && sd[1] == KVH && sd[2] == S;
  const bool fp8 = et == ffi::DataType::U8 && ks.element_type() == ffi::DataType::F32 &&
                   sd.size() == 2 && sd[0] == B && sd[1] == KVH;
  const auto vsd = vs.dimensions();
  if ((!int8 && !fp8) || v.element_type() != et || vs.element_type() != ks.element_type() ||
      !std::equal(sd.begin(), sd.end(), vsd.begin(), vsd.end()) || kd[0] != B || kd[3] != D ||
      KVH == 0 || H % KVH != 0 || !std::equal(kd.begin(), kd.end(), vd.begin(), vd.end()) ||
      od[0] != B || od[1] != H || od[2] != D || lo.dimensions()[0] != B ||
      hi.dimensions()[0] != B)
    return ffi::Error::InvalidArgument("jqx_decode_attention_q: inconsistent shapes or dtypes");
  AttnJob job{q.typed_data(), k.untyped_data(), v.untyped_data(), out->typed_data(),
              H, KVH, S, D, scale, int8 ? kCacheInt8 : kCacheFp8,
              ks.untyped_data(), vs.untyped_data(), nullptr, nullptr, nullptr, nullptr};
  return RunAttention(job, lo.typed_data(), hi.typed_data(), B);
}

// jqx_decode_attention_int4: the same attention over the 4-bit KIVI cache
// (Int4Cache above) read in place: a key group's channel scales multiply the
// query once per group, so a slot's score is (q * scale * kscale) . codes minus
// that vector's dot with the zero points; a slot's value codes are weighted by
// its probability times its group's scale, and the zero points' share is
// subtracted per group. The slots of the group being filled come from the
// residual windows (the values' from their codes when vr has no rows: a cache
// kept without a value window). hi is clipped to [0, S] before qhi is taken.
ffi::Error DecodeAttentionInt4Impl(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::U8> k,
                                   ffi::Buffer<ffi::F16> ks, ffi::Buffer<ffi::F16> kz,
                                   ffi::AnyBuffer kr, ffi::Buffer<ffi::U8> v,
                                   ffi::Buffer<ffi::F16> vs, ffi::Buffer<ffi::F16> vz,
                                   ffi::AnyBuffer vr, ffi::Buffer<ffi::S32> lo,
                                   ffi::Buffer<ffi::S32> hi, ffi::ResultBuffer<ffi::F32> out,
                                   float scale) {
  const auto qd = q.dimensions();
  const auto kd = k.dimensions();
  const auto od = out->dimensions();
  const auto rd = kr.dimensions();
  if (qd.size() != 3 || kd.size() != 4 || od.size() != 3 || rd.size() != 4 ||
      lo.dimensions().size() != 1 || hi.dimensions().size() != 1)
    return ffi::Error::InvalidArgument(
        "jqx_decode_attention_int4: q and out must be 3-D, codes and residuals 4-D, lo and "
        "hi 1-D");
  const int64_t B = qd[0], H = qd[1], D = qd[2], KVH = kd[1], S = kd[2], grp = rd[2];
  const bool v_window = vr.dimensions().size() != 4 || vr.dimensions()[2] != 0;
  const auto same = [](auto x, std::initializer_list<int64_t> want) {
    return x.size() == want.size() && std::equal(want.begin(), want.end(), x.begin());
  };
  const auto rt = kr.element_type();
  if (KVH == 0 || H % KVH != 0 || grp < 2 || D % grp != 0 || D % 2 != 0 || S % grp != 0 ||
      (rt != ffi::DataType::F32 && rt != ffi::DataType::F16) || vr.element_type() != rt ||
      !same(kd, {B, KVH, S, D / 2}) || !same(v.dimensions(), {B, KVH, S, D / 2}) ||
      !same(ks.dimensions(), {B, KVH, S / grp, D}) ||
      !same(kz.dimensions(), {B, KVH, S / grp, D}) ||
      !same(vs.dimensions(), {B, KVH, S, D / grp}) ||
      !same(vz.dimensions(), {B, KVH, S, D / grp}) || !same(rd, {B, KVH, grp, D}) ||
      !same(vr.dimensions(), {B, KVH, v_window ? grp : 0, D}) || !same(od, {B, H, D}) ||
      lo.dimensions()[0] != B || hi.dimensions()[0] != B)
    return ffi::Error::InvalidArgument(
        "jqx_decode_attention_int4: inconsistent shapes or dtypes");
  thread_local std::vector<int64_t> qhi;
  qhi.assign(static_cast<size_t>(B), 0);
  const int32_t* h = hi.typed_data();
  for (int64_t b = 0; b < B; ++b) {
    const int64_t e = std::clamp<int64_t>(h[b], 0, S);
    qhi[b] = e > 0 ? (e - 1) / grp * grp : 0;
  }
  const Int4Cache c{reinterpret_cast<const uint16_t*>(ks.typed_data()),
                    reinterpret_cast<const uint16_t*>(kz.typed_data()),
                    reinterpret_cast<const uint16_t*>(vs.typed_data()),
                    reinterpret_cast<const uint16_t*>(vz.typed_data()),
                    kr.untyped_data(),
                    vr.untyped_data(),
                    rt == ffi::DataType::F16,
                    v_window,
                    grp,
                    qhi.data()};
  AttnJob job{q.typed_data(), k.typed_data(), v.typed_data(), out->typed_data(),
              H, KVH, S, D, scale, kCacheInt4,
              nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, &c};
  return RunAttention(job, lo.typed_data(), h, B);
}


// jqx_softmax_dot: softmax_dot.h's kernel on eight-float vectors.
ffi::Error SoftmaxDotImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> v,
                          ffi::ResultBuffer<ffi::F32> y, ffi::ThreadPool xla_pool) {
  return SoftmaxDotBody<SdAvx2>(x, v, y, xla_pool);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JqxGgufGemv, GgufGemvImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("kind"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JqxGgufGemvQ8, GgufGemvQ8Impl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("kind"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JqxDecodeAttention, DecodeAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JqxDecodeAttentionQ, DecodeAttentionQImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JqxDecodeAttentionInt4, DecodeAttentionInt4Impl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));

extern "C" int jqx_gguf_cpu_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
}

// Threads the pool uses (creating it): $JQX_NUM_THREADS, else the affinity count.
extern "C" int jqx_gguf_num_threads() { return GetPool()->threads(); }

XLA_FFI_DEFINE_HANDLER_SYMBOL(JqxSoftmaxDot, SoftmaxDotImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ctx<ffi::ThreadPool>());

// jqx_scores_softmax_dot: softmax_dot.h's attention from q and k, on eight-float vectors.
XLA_FFI_DEFINE_HANDLER_SYMBOL(JqxScoresSoftmaxDot, ScoresSoftmaxDotBody<SdAvx2>,
                              JQX_SCORES_SOFTMAX_DOT_BINDING);
