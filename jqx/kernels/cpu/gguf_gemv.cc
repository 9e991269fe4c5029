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
// Numerics: x stays float32 (it is never quantized). Per block, the kernel
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
// Threads: a persistent pool (created on first use, once per process; sized
// by the CPU affinity mask or $JQX_NUM_THREADS). A call's output rows are cut
// into chunks of a few microseconds of work that the calling thread and the
// workers claim from a shared counter, so a worker that is not running (a
// busy, shared machine) costs nothing. Workers spin briefly for the next job,
// then sleep on a condition variable, so back-to-back calls (a decode step's
// products) never start threads. A call that finds the pool busy (another
// XLA thread using it) or that is too small to pay for waking the workers
// runs on the calling thread. The chunks split rows only, so the result does
// not depend on the number of threads.
//
// Built on first use by jqx/kernels/cpu/native.py (g++ -O3 -mavx2 -mfma
// -mf16c); jqx_gguf_cpu_supported() is checked before registering it.

#include <immintrin.h>
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
// How long a worker spins for the next job before it sleeps: long enough to
// bridge the gaps between the products of one decode step (the other ops of a
// layer), short enough not to burn a shared core between steps.
constexpr int64_t kSpinNs = 200 * 1000;

inline int64_t NowNs() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return int64_t{ts.tv_sec} * 1000000000 + ts.tv_nsec;
}

// Spins (pausing) until done() or kSpinNs have passed; returns done().
template <typename F>
inline bool SpinUntil(F done) {
  if (done()) return true;
  const int64_t start = NowNs();
  for (int i = 1;; ++i) {
    _mm_pause();
    if (done()) return true;
    if (i % 64 == 0 && NowNs() - start > kSpinNs) return false;
  }
}

// ------------------------------------------------------------------ thread pool

using ChunkFn = void (*)(const void* ctx, int64_t chunk);

// Threads claim chunks of a job from a shared counter, the calling thread
// too: a worker the OS has not scheduled (a busy, shared machine) claims
// nothing and the others finish the job, so the call never waits for a
// sleeping thread, only for chunks already being computed.
class Pool {
 public:
  explicit Pool(int threads) : threads_(std::max(1, threads)) {
    for (int i = 1; i < threads_; ++i) std::thread([this] { Worker(); }).detach();
  }

  int threads() const { return threads_; }

  // Runs fn(ctx, c) for every c in [0, chunks); returns when all are done.
  void Run(ChunkFn fn, const void* ctx, int64_t chunks) {
    if (chunks <= 1 || threads_ == 1 || !busy_.try_lock()) {
      // One chunk, no workers, or another call owns them: all on this thread.
      for (int64_t c = 0; c < chunks; ++c) fn(ctx, c);
      return;
    }
    fn_ = fn;
    ctx_ = ctx;
    chunks_ = chunks;
    next_.store(0, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    open_.store(true);  // seq_cst: publishes the fields above to the workers
    {
      std::lock_guard<std::mutex> lk(mu_);
      gen_.fetch_add(1);
    }
    cv_.notify_all();
    Work();
    const auto all_done = [&] { return done_.load(std::memory_order_acquire) == chunks; };
    while (!SpinUntil(all_done)) std::this_thread::yield();  // a chunk's thread was preempted
    // Close the job, then wait for workers that joined it to leave before the
    // fields (and ctx, on the caller's stack) change.
    open_.store(false);
    const auto no_guests = [&] { return active_.load() == 0; };
    while (!SpinUntil(no_guests)) std::this_thread::yield();
    busy_.unlock();
  }

 private:
  void Work() {
    for (;;) {
      const int64_t c = next_.fetch_add(1, std::memory_order_relaxed);
      if (c >= chunks_) return;
      fn_(ctx_, c);
      done_.fetch_add(1, std::memory_order_release);
    }
  }

  void Worker() {
    uint64_t seen = 0;
    for (;;) {
      const auto posted = [&] { return gen_.load(std::memory_order_acquire) != seen; };
      if (!SpinUntil(posted)) {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, posted);
      }
      seen = gen_.load(std::memory_order_acquire);
      // seq_cst pair with Run(): either Run() sees this thread active and waits
      // for it, or this thread sees the job closed and leaves it alone.
      active_.fetch_add(1);
      if (open_.load()) Work();
      active_.fetch_sub(1);
    }
  }

  const int threads_;
  std::mutex busy_;  // held by the call that owns the workers
  std::mutex mu_;    // with cv_: sleeping workers
  std::condition_variable cv_;
  std::atomic<uint64_t> gen_{0};  // bumped once per job: wakes the workers
  std::atomic<bool> open_{false};
  std::atomic<int> active_{0};  // workers inside the current job
  std::atomic<int64_t> next_{0}, done_{0};
  ChunkFn fn_ = nullptr;
  const void* ctx_ = nullptr;
  int64_t chunks_ = 0;
};

int DefaultThreads() {
  if (const char* s = getenv("JQX_NUM_THREADS")) {
    char* end = nullptr;
    const long v = strtol(s, &end, 10);
    if (end != s && *end == '\0' && v >= 1) return static_cast<int>(std::min<long>(v, 1024));
  }
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

std::mutex g_pool_mu;
Pool* g_pool = nullptr;
pid_t g_pool_pid = 0;

// The process's pool. Never destroyed (its threads are detached and parked on a
// condition variable at exit); a forked child, which has no workers, gets its own.
Pool* GetPool() {
  std::lock_guard<std::mutex> lk(g_pool_mu);
  const pid_t pid = getpid();
  if (g_pool == nullptr || g_pool_pid != pid) {
    g_pool = new Pool(DefaultThreads());
    g_pool_pid = pid;
  }
  return g_pool;
}

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

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JqxGgufGemv, GgufGemvImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("kind"));

extern "C" int jqx_gguf_cpu_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
}

// Threads the pool uses (creating it): $JQX_NUM_THREADS, else the affinity count.
extern "C" int jqx_gguf_num_threads() { return GetPool()->threads(); }
