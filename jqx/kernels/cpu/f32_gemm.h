// jqx_f32_gemm (int8_gemm.cc's library, AVX512F): the float32 matrix product
//
//   C[m, n] = sum_k A[m, k] B[k, n],   A (rows..., K), B (K, N), C (rows..., N),
//
// row-major, with one fused multiply-add chain per output over k = 0..K-1 from 0:
// c = fma(A[m, k], B[k, n], c). That order is fixed by the shapes alone (not by the
// thread count or the blocking), so the result is the same for any number of threads,
// and within the sequential chain's bound |C - AB| <= gamma_K sum_k |A[m, k] B[k, n]|,
// gamma_K = K u / (1 - K u), u = 2^-24 (jqx.native.f32_matmul,
// docs/internals/native-kernels.md).
//
// - Register blocks of kF32Rows = 14 rows x 32 columns: 28 zmm accumulators; per k, two
//   loads of B's 32 columns, 14 broadcasts of A and 28 FMAs, B prefetched 16 k ahead.
//   In L1 a block runs at ~187 GFLOP/s on one core of the 2-core Xeon this was tuned
//   on; MKL's whole sgemm reaches ~170 there.
// - From kF32PackRows rows B is packed once per call into panels of 32 columns,
//   k-major ([panel][k][32], zero beyond N), in a buffer of the calling thread kept
//   across calls; the threads share the packing. Fewer rows read B in place where its
//   rows are less than a page apart (N < kF32InPlaceMaxN), else each chunk packs its
//   own groups of panels (in place, the TLB misses made 64-128 rows x 576 x 49152 1.3x
//   XLA's time).
// - A's rows are copied per k block into a thread's buffer whose row stride is a
//   constant: one base register addresses a block's 14 rows (14 row pointers left
//   GCC spilling). Each block's rows are copied before their first use while the
//   block before requests them, one line per k.
// - k runs in blocks of at most kF32Kc (the accumulators are stored and reloaded in
//   between, which leaves each chain's operations as they are); panels in groups of
//   about kF32GroupBytes (kept in L2) while a chunk's row blocks pass; chunks of rows
//   (or, for few rows, of panels) are handed out to the pool's threads from a counter.

#ifndef JQX_KERNELS_CPU_F32_GEMM_H_
#define JQX_KERNELS_CPU_F32_GEMM_H_

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <utility>

#include "epilogue.h"
#include "pool.h"
#include "xla/ffi/api/ffi.h"

namespace {

constexpr int kF32Rows = 14;         // rows per register block
constexpr int64_t kF32Kc = 768;      // k per block
constexpr int64_t kF32Lda = kF32Kc + 16;  // row stride of the copied rows (a line apart)
constexpr int64_t kF32Prefetch = 16;  // panel rows (k) prefetched ahead
constexpr int64_t kF32ChunksPerThread = 8;  // row chunks per thread, at most...
constexpr int64_t kF32MinChunk = 8;         // ...of at least this many row blocks
constexpr int64_t kF32PackRows = 256;       // from this many rows B is packed up front;
constexpr int64_t kF32InPlaceMaxN = 1024;   // below, B is read in place where N < this
                                            // (else each chunk packs its panel groups)
constexpr int64_t kF32GroupBytes = 512 << 10;  // panels per group: about this many bytes (L2)

// R rows (1..kF32Rows) of A, copied to ``a`` with row stride kF32Lda (one base register
// and constant offsets address all of them), times kk rows of a packed 32-column panel
// of B (``b``, 64-byte aligned): C's R x 32 block (masks m0 / m1: the columns of each
// half that exist). ``accumulate``: continue the chains from C (a later
// k block) instead of from 0.
template <int R>
inline void F32Block(const float* a, const float* b, int64_t ldb, int64_t kk, float* c,
                     int64_t ldc, bool accumulate, __mmask16 m0, __mmask16 m1,
                     const float* next, int64_t lda) {
  __m512 c0[R], c1[R];  // every loop over r unrolled: the accumulators stay in registers
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    c0[r] = accumulate ? _mm512_maskz_loadu_ps(m0, c + r * ldc) : _mm512_setzero_ps();
    c1[r] = accumulate ? _mm512_maskz_loadu_ps(m1, c + r * ldc + 16) : _mm512_setzero_ps();
  }
  // ``next`` (or null): rows of A (stride lda) to bring into cache meanwhile, one line
  // per k: line k / kF32Rows of row k % kF32Rows (the next block's rows, which the
  // caller copies next; one request per k keeps the line fill buffers free).
  const float* pf = next == nullptr ? b : next;
  const int64_t pf_row = next == nullptr ? 0 : lda;
  for (int64_t k = 0; k < kk; ++k, b += ldb) {
    // (A prefetch past the last panel's end is harmless: prefetches do not fault.)
    _mm_prefetch(reinterpret_cast<const char*>(b + kF32Prefetch * ldb), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(b + kF32Prefetch * ldb + 16), _MM_HINT_T0);
    _mm_prefetch(
        reinterpret_cast<const char*>(pf + (k % kF32Rows) * pf_row + (k / kF32Rows) * 16),
        _MM_HINT_T0);
    const __m512 b0 = _mm512_maskz_loadu_ps(m0, b);
    const __m512 b1 = _mm512_maskz_loadu_ps(m1, b + 16);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m512 x = _mm512_set1_ps(a[r * kF32Lda + k]);
      c0[r] = _mm512_fmadd_ps(x, b0, c0[r]);
      c1[r] = _mm512_fmadd_ps(x, b1, c1[r]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    _mm512_mask_storeu_ps(c + r * ldc, m0, c0[r]);
    _mm512_mask_storeu_ps(c + r * ldc + 16, m1, c1[r]);
  }
}

using F32BlockFn = void (*)(const float*, const float*, int64_t, int64_t, float*, int64_t, bool,
                            __mmask16, __mmask16, const float*, int64_t);

template <int... R>
constexpr auto F32Blocks(std::integer_sequence<int, R...>) {
  return std::array<F32BlockFn, sizeof...(R)>{&F32Block<R + 1>...};
}
// kF32BlockFns[r - 1]: the block of r rows.
constexpr auto kF32BlockFns = F32Blocks(std::make_integer_sequence<int, kF32Rows>{});

inline __mmask16 F32Mask(int64_t n) {  // the first n (0..16) lanes
  return n >= 16 ? static_cast<__mmask16>(0xFFFF)
                 : static_cast<__mmask16>((1u << std::max<int64_t>(n, 0)) - 1);
}

// Rows [k0, k0 + kk) of panels [p0, p1) of B (K, N) into dst: panel p at
// dst + (p - p0) * kk * 32, [k][32], zero beyond N.
inline void F32PackPanels(const float* B, int64_t N, int64_t k0, int64_t kk, int64_t p0,
                          int64_t p1, float* dst) {
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t n0 = p * 32, w = std::min<int64_t>(32, N - n0);
    const __mmask16 m0 = F32Mask(w), m1 = F32Mask(w - 16);
    float* d = dst + (p - p0) * kk * 32;
    for (int64_t k = 0; k < kk; ++k) {
      const float* src = B + (k0 + k) * N + n0;
      _mm512_store_ps(d + k * 32, _mm512_maskz_loadu_ps(m0, src));
      _mm512_store_ps(d + k * 32 + 16, _mm512_maskz_loadu_ps(m1, src + 16));
    }
  }
}

// The panel buffer: 64-byte aligned floats, kept by the calling thread across calls.
class F32PanelBuffer {
 public:
  ~F32PanelBuffer() { free(ptr_); }
  float* get(size_t floats) {
    if (floats <= size_) return ptr_;
    free(ptr_);
    ptr_ = nullptr;
    size_ = 0;
    void* p = nullptr;
    const size_t bytes = (floats * sizeof(float) + 4095) / 4096 * 4096;
    if (posix_memalign(&p, 4096, bytes) != 0) return nullptr;
    ptr_ = static_cast<float*>(p);
    size_ = bytes / sizeof(float);
    return ptr_;
  }

 private:
  float* ptr_ = nullptr;
  size_t size_ = 0;
};

// Rows [r0, r1) and panels [p0, p1) of C. ``packed``: all of B's panels, [panel][k][32]
// (K rows each), or null: then each group's panels are packed here from B (K, N), into
// a buffer of this thread. Per k block and group of panels (about kF32GroupBytes, kept
// in L2) every block of rows runs against the group's panels; the first group copies
// each block's rows to another buffer (row stride kF32Lda: one base register and
// constant offsets address a block's rows).
inline bool F32Tile(const float* A, int64_t K, const float* B, const float* packed, int64_t N,
                    float* C, int64_t r0, int64_t r1, int64_t p0, int64_t p1, const float* bias,
                    int64_t act) {
  thread_local F32PanelBuffer rows_buf, group_buf;
  float* abuf = rows_buf.get(static_cast<size_t>((r1 - r0 + kF32Rows) * kF32Lda));
  if (abuf == nullptr) return false;
  const int64_t nkb = (K + kF32Kc - 1) / kF32Kc;
  const int64_t kc = (K + nkb - 1) / nkb;  // even k blocks
  for (int64_t k0 = 0; k0 < K; k0 += kc) {
    const int64_t kk = std::min(kc, K - k0);
    const bool last = k0 + kk == K;  // the epilogue on each block after its last k block
    const bool epilogue = last && (bias != nullptr || act != kEpNone);
    const int64_t group = std::max<int64_t>(1, kF32GroupBytes / (kk * 32 * 4));
    for (int64_t g0 = p0; g0 < p1; g0 += group) {
      const int64_t g1 = std::min(p1, g0 + group);
      // Panel p's row k at gp + (p - g0) * gstride + (k - k0) * ldb.
      const float* gp = packed;
      int64_t gstride = K * 32, ldb = 32;
      if (packed != nullptr) {
        gp = packed + g0 * K * 32 + k0 * 32;
      } else if (N < kF32InPlaceMaxN) {  // B read in place
        gp = B + k0 * N + g0 * 32;
        gstride = 32;
        ldb = N;
      } else if (packed == nullptr) {
        float* buf = group_buf.get(static_cast<size_t>(group * kk * 32));
        if (buf == nullptr) return false;
        F32PackPanels(B, N, k0, kk, g0, g1, buf);
        gp = buf;
        gstride = kk * 32;
      }
      for (int64_t i = r0; i < r1; i += kF32Rows) {
        const int64_t rows = std::min<int64_t>(kF32Rows, r1 - i);
        const F32BlockFn block = kF32BlockFns[rows - 1];
        // The first group copies the block's rows just before their first use; its first
        // panel's block requests the next block's rows meanwhile.
        const bool first = g0 == p0;
        if (first) {
          for (int64_t r = i; r < i + rows; ++r)
            memcpy(abuf + (r - r0) * kF32Lda, A + r * K + k0, sizeof(float) * kk);
        }
        const float* next = first && i + rows < r1 ? A + (i + rows) * K + k0 : nullptr;
        for (int64_t p = g0; p < g1; ++p) {
          const int64_t w = std::min<int64_t>(32, N - p * 32);
          const __mmask16 m0 = F32Mask(w), m1 = F32Mask(w - 16);
          float* c = C + i * N + p * 32;
          block(abuf + (i - r0) * kF32Lda, gp + (p - g0) * gstride, ldb, kk, c, N, k0 > 0, m0,
                m1, p == g0 ? next : nullptr, K);
          if (epilogue)
            EpilogueBlock(c, N, rows, bias == nullptr ? nullptr : bias + p * 32, act, m0, m1);
        }
      }
    }
  }
  return true;
}

// B (K, N) packed into ``buf`` (np panels of 32 columns, [panel][k][32]) by the pool's
// threads (up to t).
inline void F32PackAll(const float* B, int64_t K, int64_t N, float* buf, int64_t t) {
  const int64_t np = (N + 31) / 32;
  const int64_t pack_chunks = std::max<int64_t>(1, std::min<int64_t>(np, t));
  auto pack = [&](int64_t i) {
    const int64_t q0 = np * i / pack_chunks, q1 = np * (i + 1) / pack_chunks;
    F32PackPanels(B, N, 0, K, q0, q1, buf + q0 * K * 32);
  };
  if (pack_chunks > 1) {
    GetPool()->ForEach(pack_chunks, pack);
  } else {
    pack(0);
  }
}

// One product: A (M, K) . B (K, N) -> C (M, N), on the pool, then the epilogue
// (epilogue.h: bias, N floats, or null; act) on each output.
bool F32Gemm(const float* A, const float* B, float* C, int64_t M, int64_t K, int64_t N,
             int64_t threads, const float* bias = nullptr, int64_t act = kEpNone) {
  if (M == 0 || N == 0) return true;
  if (K == 0) {
    memset(C, 0, sizeof(float) * M * N);
    if (bias != nullptr || act != kEpNone) EpilogueRows(C, M, N, bias, act);
    return true;
  }
  const int64_t np = (N + 31) / 32;
  Pool* pool = GetPool();
  threads = std::max<int64_t>(1, std::min<int64_t>(threads, pool->threads()));
  // ~2M multiply-adds per thread at least.
  const int64_t t = std::max<int64_t>(1, std::min<int64_t>(threads, M * N * K / (1 << 21)));
  // Many rows: B packed once, up front, the threads sharing the work. Few: each
  // chunk packs its groups of panels (read in place, B's rows are a page apart or more
  // at large N, and the TLB misses cost ~1.3x).
  const float* packed = nullptr;
  if (M >= kF32PackRows) {
    thread_local F32PanelBuffer panels;
    float* buf = panels.get(static_cast<size_t>(np * K * 32));
    if (buf == nullptr) return false;
    F32PackAll(B, K, N, buf, t);
    packed = buf;
  }
  const int64_t nb = (M + kF32Rows - 1) / kF32Rows;  // row blocks
  // Chunks of rows (each over every panel: each reads all of B) or of panels (each over
  // every row: each copies all of A), shared out from a counter (a thread the OS has
  // descheduled takes fewer): at least t, at most kF32ChunksPerThread per thread, row
  // chunks of at least kF32MinChunk blocks. The split that reads less runs.
  const auto count = [&](int64_t units, int64_t min_units) {
    if (t <= 1) return int64_t{1};
    const int64_t n = std::min<int64_t>(units / min_units, t * kF32ChunksPerThread);
    // A whole number of chunks per thread (9 chunks on 2 threads left one idle 10%).
    return std::max<int64_t>(std::min<int64_t>(t, units), n / t * t);
  };
  const int64_t row_chunks = count(nb, kF32MinChunk), panel_chunks = count(np, 1);
  const bool by_rows = row_chunks * N <= panel_chunks * M;
  const int64_t units = by_rows ? nb : np;
  const int64_t chunks = by_rows ? row_chunks : panel_chunks;
  std::atomic<bool> ok{true};
  auto tile = [&](int64_t i) {
    const int64_t u0 = units * i / chunks, u1 = units * (i + 1) / chunks;
    const bool done =
        by_rows ? F32Tile(A, K, B, packed, N, C, u0 * kF32Rows, std::min(M, u1 * kF32Rows), 0, np,
                          bias, act)
                : F32Tile(A, K, B, packed, N, C, 0, M, u0, u1, bias, act);
    if (!done) ok.store(false);
  };
  if (chunks > 1) {
    pool->ForEach(chunks, tile);
  } else {
    tile(0);
  }
  return ok.load();
}

constexpr int64_t kF32MlpBlocks = 4;  // row blocks per chunk of jqx_f32_mlp (56 rows)

// jqx_f32_mlp: two float32 dense layers in one call, Y = (act(X . B1 + b1)) . B2 + b2,
// X (M, K), B1 (K, F), B2 (F, N). Both weights are packed up front; then each chunk of
// kF32MlpBlocks row blocks runs on one thread: F32Tile for its rows of the first
// product (and its epilogue) into a per-thread buffer of rows x F floats (56 x 1536:
// 344 KB, in L2), then F32Tile from that buffer for its rows of the second. Every
// output is the same fused multiply-add chain over k as F32Gemm's (the chains depend
// on K alone), so Y is two F32Gemm calls' result bit for bit; the hidden activations
// never go to memory XLA allocates.
bool F32Mlp(const float* X, const float* B1, const float* B2, float* Y, int64_t M, int64_t K,
            int64_t F, int64_t N, int64_t threads, const float* b1, int64_t act, const float* b2) {
  if (M == 0 || N == 0) return true;
  Pool* pool = GetPool();
  threads = std::max<int64_t>(1, std::min<int64_t>(threads, pool->threads()));
  const int64_t work = M * F * std::max(K, N);
  const int64_t t = std::max<int64_t>(1, std::min<int64_t>(threads, work / (1 << 21)));
  const int64_t np1 = (F + 31) / 32, np2 = (N + 31) / 32;
  thread_local F32PanelBuffer panels1, panels2;
  float* p1 = panels1.get(static_cast<size_t>(np1 * K * 32));
  float* p2 = panels2.get(static_cast<size_t>(np2 * F * 32));
  if (p1 == nullptr || p2 == nullptr) return false;
  if (K > 0) F32PackAll(B1, K, F, p1, t);
  F32PackAll(B2, F, N, p2, t);
  const int64_t rows = kF32MlpBlocks * kF32Rows;
  const int64_t chunks = (M + rows - 1) / rows;
  std::atomic<bool> ok{true};
  auto chunk = [&](int64_t c) {
    thread_local F32PanelBuffer hidden;
    const int64_t r0 = c * rows, n = std::min(M, r0 + rows) - r0;
    float* h = hidden.get(static_cast<size_t>(n * F));
    if (h == nullptr) {
      ok.store(false);
      return;
    }
    if (K == 0) {  // empty sums, as F32Gemm's
      memset(h, 0, sizeof(float) * n * F);
      if (b1 != nullptr || act != kEpNone) EpilogueRows(h, n, F, b1, act);
    } else if (!F32Tile(X + r0 * K, K, nullptr, p1, F, h, 0, n, 0, np1, b1, act)) {
      ok.store(false);
      return;
    }
    if (!F32Tile(h, F, nullptr, p2, N, Y + r0 * N, 0, n, 0, np2, b2, kEpNone)) ok.store(false);
  };
  if (t > 1 && chunks > 1) {
    pool->ForEach(chunks, chunk);
  } else {
    for (int64_t c = 0; c < chunks; ++c) chunk(c);
  }
  return ok.load();
}

// X (M, K), B1 (K, F), B2 (F, N), biases (F,) / (N,) or (0,), Y (M, N).
xla::ffi::Error F32MlpImpl(xla::ffi::Buffer<xla::ffi::F32> x, xla::ffi::Buffer<xla::ffi::F32> b1,
                           xla::ffi::Buffer<xla::ffi::F32> e1, xla::ffi::Buffer<xla::ffi::F32> b2,
                           xla::ffi::Buffer<xla::ffi::F32> e2,
                           xla::ffi::ResultBuffer<xla::ffi::F32> y, int64_t threads,
                           int64_t activation, xla::ffi::ThreadPool xla_pool) {
  const auto xd = x.dimensions(), d1 = b1.dimensions(), d2 = b2.dimensions();
  const auto f1 = e1.dimensions(), f2 = e2.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || d1.size() != 2 || d2.size() != 2 || yd.size() != 2 || f1.size() != 1 ||
      f2.size() != 1 || d1[0] != xd[1] || d2[0] != d1[1] || yd[0] != xd[0] || yd[1] != d2[1] ||
      (f1[0] != 0 && f1[0] != d1[1]) || (f2[0] != 0 && f2[0] != d2[1]) || d1[1] == 0 ||
      activation < kEpNone || activation > kEpRelu)
    return xla::ffi::Error::InvalidArgument(
        "jqx_f32_mlp: expected X (M, K), B1 (K, F), bias (F,) or (0,), B2 (F, N), bias (N,) or "
        "(0,), Y (M, N), F > 0, a known activation");
  XlaPoolScope xla_scope(xla_pool, xd[0] > kXlaPoolRows);
  if (!F32Mlp(x.typed_data(), b1.typed_data(), b2.typed_data(), y->typed_data(), xd[0], xd[1],
              d1[1], d2[1], threads, f1[0] == 0 ? nullptr : e1.typed_data(), activation,
              f2[0] == 0 ? nullptr : e2.typed_data()))
    return xla::ffi::Error::Internal("jqx_f32_mlp: out of memory");
  return xla::ffi::Error::Success();
}

// A (lead..., rows..., K) . B (lead..., K, N) -> C (lead..., rows..., N), where B's
// ``lead`` dims (its dims before the last two; none unless under jax.vmap, whose
// "expand_dims" method gives every operand one more leading dim per level, 1 where the
// operand is not mapped) broadcast against A's first dims: one product per index of
// C's leading dims. With B's (and the bias's) leading dims all 1, A's rows are all one
// product's. ``bias`` (lead..., N), or (lead..., 0) for none, and ``activation`` (an
// EpAct): the epilogue (epilogue.h).
xla::ffi::Error F32GemmImpl(xla::ffi::Buffer<xla::ffi::F32> a, xla::ffi::Buffer<xla::ffi::F32> b,
                            xla::ffi::Buffer<xla::ffi::F32> bias,
                            xla::ffi::ResultBuffer<xla::ffi::F32> c, int64_t threads,
                            int64_t activation, xla::ffi::ThreadPool xla_pool) {
  const auto ad = a.dimensions();
  const auto bd = b.dimensions();
  const auto ed = bias.dimensions();
  const auto cd = c->dimensions();
  const size_t L = bd.size() >= 2 ? bd.size() - 2 : 0;
  bool shapes_ok = bd.size() >= 2 && ad.size() >= L + 2 && cd.size() == ad.size() &&
                   bd[L] == ad.back() && cd.back() == bd[L + 1] && ed.size() == L + 1 &&
                   (ed[L] == bd[L + 1] || ed[L] == 0);
  int64_t batches = 1, b_batches = 1, e_batches = 1;
  for (size_t d = 0; shapes_ok && d < L; ++d) {
    const int64_t n = std::max({ad[d], bd[d], ed[d]});
    shapes_ok = (ad[d] == n || ad[d] == 1) && (bd[d] == n || bd[d] == 1) && cd[d] == n &&
                (ed[d] == n || ed[d] == 1);
    batches *= n;
    b_batches *= bd[d];
    e_batches *= ed[d];
  }
  for (size_t d = L; shapes_ok && d + 1 < ad.size(); ++d) shapes_ok = cd[d] == ad[d];
  if (!shapes_ok)
    return xla::ffi::Error::InvalidArgument(
        "jqx_f32_gemm: expected A (rows..., K), B (K, N), bias (N,) or (0,), C (rows..., N), "
        "with any leading dims of B and the bias broadcasting against A's");
  if (activation < kEpNone || activation > kEpRelu)
    return xla::ffi::Error::InvalidArgument("jqx_f32_gemm: unknown activation");
  XlaPoolScope xla_scope(xla_pool, RowsOf(ad) > kXlaPoolRows);
  const int64_t K = ad.back(), N = bd[L + 1];
  const float* A = a.typed_data();
  const float* B = b.typed_data();
  const float* E = ed[L] == 0 ? nullptr : bias.typed_data();
  float* C = c->typed_data();
  if (b_batches == 1 && (E == nullptr || e_batches == 1)) {  // every row in one product
    if (!F32Gemm(A, B, C, RowsOf(cd), K, N, threads, E, activation))
      return xla::ffi::Error::Internal("jqx_f32_gemm: out of memory");
    return xla::ffi::Error::Success();
  }
  int64_t a_batches = 1;
  for (size_t d = 0; d < L; ++d) a_batches *= ad[d];
  const int64_t M = RowsOf(ad) / std::max<int64_t>(a_batches, 1);
  for (int64_t i = 0; i < batches; ++i) {
    // C's batch index i, broadcast to A's, B's and the bias's (a dim of 1 stays at 0).
    int64_t rem = i, ai = 0, bi = 0, ei = 0, astride = 1, bstride = 1, estride = 1;
    for (size_t d = L; d-- > 0;) {
      const int64_t idx = rem % cd[d];
      rem /= cd[d];
      if (ad[d] != 1) ai += idx * astride;
      if (bd[d] != 1) bi += idx * bstride;
      if (ed[d] != 1) ei += idx * estride;
      astride *= ad[d];
      bstride *= bd[d];
      estride *= ed[d];
    }
    if (!F32Gemm(A + ai * M * K, B + bi * K * N, C + i * M * N, M, K, N, threads,
                 E == nullptr ? nullptr : E + ei * N, activation))
      return xla::ffi::Error::Internal("jqx_f32_gemm: out of memory");
  }
  return xla::ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JqxF32Gemm, F32GemmImpl,
                              xla::ffi::Ffi::Bind()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Attr<int64_t>("threads")
                                  .Attr<int64_t>("activation")
                                  .Ctx<xla::ffi::ThreadPool>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JqxF32Mlp, F32MlpImpl,
                              xla::ffi::Ffi::Bind()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Attr<int64_t>("threads")
                                  .Attr<int64_t>("activation")
                                  .Ctx<xla::ffi::ThreadPool>());

#endif  // JQX_KERNELS_CPU_F32_GEMM_H_
