// int8 GEMM for x86 CPUs with AVX512-VNNI, as an XLA FFI custom call.
//
// C[M, N] (int32) = (A[M, Kp] - 128) . B[Kp, N] (int8), exact integer sums.
// A is the int8 activation codes plus 128 (VNNI's vpdpbusd multiplies
// unsigned by signed bytes); the kernel subtracts 128 * column sums of B,
// computed with the same instruction, so C is the plain int8 product.
// B is the (K, N) int8 weight as stored (K <= Kp < K + 4). It is packed once
// per call (threads splitting the k range, rows read in order) into panels of
// 16 columns: for each group of 4 consecutive k the 16 columns' 4 bytes side
// by side, one 64-byte zmm register per (panel, k/4), zero beyond K and N.
// Both jqx_int8_gemm and jqx_w8a8_vnni also take B already in that layout (3-D,
// made once at quantize time by native.pack_int8): no packing per call.
//
// Blocking: the threads of the shared pool (pool.h) split the rows (blocks of
// MR rows), or the column panels when there are few rows; each thread walks
// its panels NB at a time and, inside, its row blocks, so the panels stay in
// cache while A rows stream.
// MR x NB accumulators (6 x 4 = 24 zmm registers). Where the CPU has AMX,
// every whole 16 rows run on the tile unit instead, on the same panels (see
// "AMX" below; the AMX functions carry their own target attribute, so the
// flags stay as below).
//
// Up to kSmallM (6) rows (decode) skip the packing: see SmallM below.
//
// The same library holds jqx_w4_gemv, 4-bit weight-only x @ W for up to 16
// rows (W4Small / W4GemvImpl below), and jqx_fp8_gemv, the same for FP8
// (E4M3 / E5M2) weights (Fp8Small / Fp8GemvImpl).
//
// Built on first use by jqx/native.py (g++ -O3 -mavx512f -mavx512bw
// -mavx512vl -mavx512vnni); jqx checks the CPU before registering it.

#include <cpuid.h>
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "epilogue.h"
#include "f32_gemm.h"
#include "pool.h"
#include "softmax_dot.h"
#include "w8a8.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int MR = 6;
constexpr int NB = 4;

// rows <= R rows of A (row stride lda) times nb panels; writes the valid
// rows x cols of C (row stride ldc).
template <int R, int NBT>
inline void Micro(const uint8_t* a, int64_t lda, const int8_t* bp, int64_t kq_n,
                  int64_t pstride, const int32_t* neg_corr, int32_t* c, int64_t ldc, int rows,
                  int cols) {
  // Every loop over r and b is unrolled so the accumulators live in registers.
  // The activations come in as int8 + 128: the accumulators start at
  // -128 * column sums of B (``neg_corr``), so they end at the int8 product.
  __m512i acc[R][NBT];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int b = 0; b < NBT; ++b)
      acc[r][b] = _mm512_loadu_si512(static_cast<const void*>(neg_corr + b * 16));
  for (int64_t kq = 0; kq < kq_n; ++kq) {
    __m512i bv[NBT];
#pragma GCC unroll 16
    for (int b = 0; b < NBT; ++b)
      bv[b] = _mm512_loadu_si512(static_cast<const void*>(bp + b * pstride + kq * 64));
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      int32_t a4;
      memcpy(&a4, a + r * lda + kq * 4, 4);
      const __m512i av = _mm512_set1_epi32(a4);
#pragma GCC unroll 16
      for (int b = 0; b < NBT; ++b) acc[r][b] = _mm512_dpbusd_epi32(acc[r][b], av, bv[b]);
    }
  }
  if (rows == R && cols == NBT * 16) {
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
      for (int b = 0; b < NBT; ++b)
        _mm512_storeu_si512(static_cast<void*>(c + r * ldc + b * 16), acc[r][b]);
    return;
  }
  alignas(64) int32_t tmp[R][NBT * 16];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int b = 0; b < NBT; ++b) _mm512_store_si512(static_cast<void*>(&tmp[r][b * 16]), acc[r][b]);
  for (int r = 0; r < rows; ++r) memcpy(c + r * ldc, tmp[r], static_cast<size_t>(cols) * 4);
}

// Micro for a block of 1..MR rows: only ``rows`` rows of A are read, so a last,
// partial row block (and a decode-sized M on a pre-packed weight) needs no copy.
template <int NBT>
inline void MicroRows(int rows, const uint8_t* a, int64_t lda, const int8_t* bp, int64_t kq_n,
                      int64_t pstride, const int32_t* neg_corr, int32_t* c, int64_t ldc,
                      int cols) {
  switch (rows) {
    case 1: return Micro<1, NBT>(a, lda, bp, kq_n, pstride, neg_corr, c, ldc, 1, cols);
    case 2: return Micro<2, NBT>(a, lda, bp, kq_n, pstride, neg_corr, c, ldc, 2, cols);
    case 3: return Micro<3, NBT>(a, lda, bp, kq_n, pstride, neg_corr, c, ldc, 3, cols);
    case 4: return Micro<4, NBT>(a, lda, bp, kq_n, pstride, neg_corr, c, ldc, 4, cols);
    case 5: return Micro<5, NBT>(a, lda, bp, kq_n, pstride, neg_corr, c, ldc, 5, cols);
    default: return Micro<MR, NBT>(a, lda, bp, kq_n, pstride, neg_corr, c, ldc, rows, cols);
  }
}

// Packs k-quads [kq0, kq1) of every 16-column panel of B (K x N int8,
// row-major) into dst[NP][Kp/4][64]: 16 columns x 4 consecutive k per
// 64-byte group, zero beyond K and N. B's rows are read in order, four at a
// time, across all N columns (sequential reads; strided reads of a column
// panel measured ~1 GB/s).
void PackRows(const int8_t* B, int64_t K, int64_t N, int64_t Kp, int64_t kq0, int64_t kq1,
              int8_t* dst) {
  const int64_t kq_n = Kp / 4;
  const int64_t np = (N + 15) / 16;
  const int64_t pstride = kq_n * 64;
  for (int64_t kq = kq0; kq < kq1; ++kq) {
    const int64_t k0 = kq * 4;
    int64_t q = 0;
    if (k0 + 4 <= K) {
      // Four panels at a time: the same byte interleave in each 128-bit lane
      // (lane L is panel L's 16 bytes of a quarter), then a 4 x 4 transpose of
      // the lanes, so each panel's 64-byte group is one store.
      for (; q + 4 <= N / 16; q += 4) {
        const int8_t* b = B + k0 * N + q * 16;
        const __m512i r0 = _mm512_loadu_si512(static_cast<const void*>(b));
        const __m512i r1 = _mm512_loadu_si512(static_cast<const void*>(b + N));
        const __m512i r2 = _mm512_loadu_si512(static_cast<const void*>(b + 2 * N));
        const __m512i r3 = _mm512_loadu_si512(static_cast<const void*>(b + 3 * N));
        const __m512i a_lo = _mm512_unpacklo_epi8(r0, r1), a_hi = _mm512_unpackhi_epi8(r0, r1);
        const __m512i b_lo = _mm512_unpacklo_epi8(r2, r3), b_hi = _mm512_unpackhi_epi8(r2, r3);
        const __m512i t0 = _mm512_unpacklo_epi16(a_lo, b_lo), t1 = _mm512_unpackhi_epi16(a_lo, b_lo);
        const __m512i t2 = _mm512_unpacklo_epi16(a_hi, b_hi), t3 = _mm512_unpackhi_epi16(a_hi, b_hi);
        const __m512i u0 = _mm512_shuffle_i64x2(t0, t1, 0x44), u1 = _mm512_shuffle_i64x2(t2, t3, 0x44);
        const __m512i u2 = _mm512_shuffle_i64x2(t0, t1, 0xEE), u3 = _mm512_shuffle_i64x2(t2, t3, 0xEE);
        int8_t* d = dst + q * pstride + kq * 64;
        _mm512_storeu_si512(static_cast<void*>(d), _mm512_shuffle_i64x2(u0, u1, 0x88));
        _mm512_storeu_si512(static_cast<void*>(d + pstride), _mm512_shuffle_i64x2(u0, u1, 0xDD));
        _mm512_storeu_si512(static_cast<void*>(d + 2 * pstride), _mm512_shuffle_i64x2(u2, u3, 0x88));
        _mm512_storeu_si512(static_cast<void*>(d + 3 * pstride), _mm512_shuffle_i64x2(u2, u3, 0xDD));
      }
    }
    for (; q < np; ++q) {
      const int64_t jb = q * 16;
      const int64_t nc = std::min<int64_t>(16, N - jb);
      int8_t* d = dst + (q * kq_n + kq) * 64;
      if (nc == 16 && k0 + 4 <= K) {
        // Interleave 4 rows of 16 bytes into 16 groups of 4 bytes.
        const __m128i r0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(B + (k0 + 0) * N + jb));
        const __m128i r1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(B + (k0 + 1) * N + jb));
        const __m128i r2 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(B + (k0 + 2) * N + jb));
        const __m128i r3 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(B + (k0 + 3) * N + jb));
        const __m128i a_lo = _mm_unpacklo_epi8(r0, r1), a_hi = _mm_unpackhi_epi8(r0, r1);
        const __m128i b_lo = _mm_unpacklo_epi8(r2, r3), b_hi = _mm_unpackhi_epi8(r2, r3);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(d + 0), _mm_unpacklo_epi16(a_lo, b_lo));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(d + 16), _mm_unpackhi_epi16(a_lo, b_lo));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(d + 32), _mm_unpacklo_epi16(a_hi, b_hi));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(d + 48), _mm_unpackhi_epi16(a_hi, b_hi));
      } else {
        memset(d, 0, 64);
        for (int64_t kr = 0; kr < 4 && k0 + kr < K; ++kr)
          for (int64_t c = 0; c < nc; ++c) d[c * 4 + kr] = B[(k0 + kr) * N + jb + c];
      }
    }
  }
}

// -128 * the column sums of one packed 16-column panel (vpdpbusd with all bytes
// 128): the accumulators' start value, so that they end at the int8 product.
inline __m512i NegColumnSums(const int8_t* panel, int64_t kq_n) {
  const __m512i v128 = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512i cs = _mm512_setzero_si512();
  for (int64_t kq = 0; kq < kq_n; ++kq)
    cs = _mm512_dpbusd_epi32(cs, v128,
                             _mm512_loadu_si512(static_cast<const void*>(panel + kq * 64)));
  return _mm512_sub_epi32(_mm512_setzero_si512(), cs);
}

// NegColumnSums of the ``have`` consecutive panels from ``bpp`` into corr (16
// each), zeros for the slots after them up to ``slots``.
inline void PanelSums(const int8_t* bpp, int64_t have, int64_t slots, int64_t kq_n,
                      int32_t* corr) {
  for (int64_t q = 0; q < slots; ++q) {
    const __m512i c = q < have ? NegColumnSums(bpp + q * kq_n * 64, kq_n) : _mm512_setzero_si512();
    _mm512_storeu_si512(static_cast<void*>(corr + q * 16), c);
  }
}

// ---------------------------------------------------------------------------
// AMX (Intel Advanced Matrix Extensions, Sapphire Rapids on): the same packed
// panels on the tile unit. A 16-column panel's 16 k-quads (64 bytes of k) are
// 16 rows of 64 bytes, one after the other: exactly the B operand of
// tdpbusd (K/4 rows of N x 4 bytes), loaded with stride 64; A's 16 rows x 64
// bytes load with A's row stride. tdpbusd multiplies unsigned A by signed B,
// as vpdpbusd does, so the sums are the same integers (exact int32: the
// result does not depend on which unit ran, bit for bit); the C tiles start at
// the -128 * column sums, as the registers do. Tiles: 0-3 hold a 32 x 32 block
// of C (2 row tiles x 2 panels), 4-5 rows of A, 6-7 panels of B; every tile is
// 16 rows x 64 bytes. A K that is not a multiple of 64 ends with one step from
// zero-padded copies (zero A bytes add nothing). The tile intrinsics are asm
// that names its addresses only as registers: compiler barriers around them
// keep the copies made before and the stores read after. Used for row ranges of 16
// rows and more; fewer rows run on MicroRows. Linux hands out the tile state
// per process on request (arch_prctl), once; each thread loads the tile
// configuration before a run of blocks and releases it after.

struct alignas(64) AmxConfig {
  uint8_t palette;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Palette 1, tiles 0-7 of 16 rows x 64 bytes. A constant in memory: the
// intrinsic's asm names only the first 8 bytes of its operand, so a local
// configuration's other stores could be dropped by the compiler.
constexpr AmxConfig kAmxConfig = {
    1, 0, {}, {64, 64, 64, 64, 64, 64, 64, 64}, {16, 16, 16, 16, 16, 16, 16, 16}};

bool AmxSupported() {
  static const bool ok = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    if (!((d >> 24) & 1u) || !((d >> 25) & 1u)) return false;  // AMX-TILE, AMX-INT8
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

// Whether the GEMMs use the tiles: where supported, unless JQX_AMX=0 when the
// library loads; jqx_amx() reads and sets it (benchmarks compare both).
std::atomic<bool> g_amx_on{[] {
  const char* v = getenv("JQX_AMX");
  return !(v != nullptr && strcmp(v, "0") == 0);
}()};

inline bool UseAmx() { return g_amx_on.load(std::memory_order_relaxed) && AmxSupported(); }

// Loads the tile configuration for this thread's run of AMX blocks; releases
// the tiles at the end (so the OS does not save them at every switch).
class AmxScope {
 public:
  __attribute__((target("amx-tile"))) AmxScope() { _tile_loadconfig(&kAmxConfig); }
  __attribute__((target("amx-tile"))) ~AmxScope() { _tile_release(); }
  AmxScope(const AmxScope&) = delete;
  AmxScope& operator=(const AmxScope&) = delete;
};

// One 64-byte step of k for AmxTile: rows of A at a0 (and a1) with stride sa,
// panels at b0 (and b1) with stride 64. A function of its own, not a lambda:
// a lambda does not inherit its caller's target attribute (clang's tile
// builtins need it).
// With S (signed), A holds the int8 codes themselves and tdpbssd multiplies
// signed by signed: no column-sum correction (jqx_w8a8_vnni's own codes). The
// branches are written out: the tile intrinsics are macros that paste their
// arguments into the asm as register names, so they take literal tile numbers.
template <int RT, int CT, bool S>
__attribute__((target("amx-tile,amx-int8"), always_inline)) inline void AmxStep(
    const uint8_t* a0, const uint8_t* a1, int64_t sa, const int8_t* b0, const int8_t* b1) {
  _tile_loadd(4, a0, sa);
  _tile_loadd(6, b0, 64);
  if constexpr (CT == 2) _tile_loadd(7, b1, 64);
  if constexpr (S) {
    _tile_dpbssd(0, 4, 6);
    if constexpr (CT == 2) _tile_dpbssd(1, 4, 7);
  } else {
    _tile_dpbusd(0, 4, 6);
    if constexpr (CT == 2) _tile_dpbusd(1, 4, 7);
  }
  if constexpr (RT == 2) {
    _tile_loadd(5, a1, sa);
    if constexpr (S) {
      _tile_dpbssd(2, 5, 6);
      if constexpr (CT == 2) _tile_dpbssd(3, 5, 7);
    } else {
      _tile_dpbusd(2, 5, 6);
      if constexpr (CT == 2) _tile_dpbusd(3, 5, 7);
    }
  }
}

// RT (1 or 2) row tiles of A (rows a, a + 16 lda) times CT (1 or 2) panels of
// B (bp, bp + pstride), all of Kp, added to ``init`` (per panel 16 identical
// rows of 16 int32, the -128 * column sums: AmxInit; zeros for signed A, S) so
// that the tiles end at the int8 product. Row tile r, panel c is stored at out
// + 16 (r ldo + c) (ldo in int32).
template <int RT, int CT, bool S>
__attribute__((target("amx-tile,amx-int8"))) void AmxTile(const uint8_t* a, int64_t lda,
                                                          const int8_t* bp, int64_t pstride,
                                                          int64_t Kp, const int32_t* init,
                                                          int32_t* out, int64_t ldo) {
  asm volatile("" ::: "memory");  // A, B and init as written before this call
  _tile_loadd(0, init, 64);
  if constexpr (CT == 2) _tile_loadd(1, init + 256, 64);
  if constexpr (RT == 2) _tile_loadd(2, init, 64);
  if constexpr (RT == 2 && CT == 2) _tile_loadd(3, init + 256, 64);
  const int64_t kfull = Kp / 64 * 64;
  for (int64_t k = 0; k < kfull; k += 64)
    AmxStep<RT, CT, S>(a + k, a + 16 * lda + k, lda, bp + k * 16, bp + pstride + k * 16);
  if (kfull < Kp) {
    const int64_t rem = Kp - kfull;  // a multiple of 4, < 64
    alignas(64) uint8_t at[32][64];
    alignas(64) int8_t bt[2][16][64];
    memset(at, 0, sizeof(at));
    memset(bt, 0, sizeof(bt));
    for (int r = 0; r < 16 * RT; ++r) memcpy(at[r], a + r * lda + kfull, static_cast<size_t>(rem));
    for (int c = 0; c < CT; ++c)
      memcpy(bt[c], bp + c * pstride + kfull * 16, static_cast<size_t>(rem * 16));
    asm volatile("" ::: "memory");  // the tile loads' asm reads these copies
    AmxStep<RT, CT, S>(at[0], at[16], 64, &bt[0][0][0], &bt[1][0][0]);
  }
  const int64_t so = ldo * 4;
  _tile_stored(0, out, so);
  if constexpr (CT == 2) _tile_stored(1, out + 16, so);
  if constexpr (RT == 2) _tile_stored(2, out + 16 * ldo, so);
  if constexpr (RT == 2 && CT == 2) _tile_stored(3, out + 16 * ldo + 16, so);
  asm volatile("" ::: "memory");  // ... and the tile stores' asm wrote ``out``
}

// AmxTile for a block of 16 or 32 rows (rt row tiles) and 1 or 2 panels (ct).
template <bool S>
inline void AmxTileCT(int rt, int ct, const uint8_t* a, int64_t lda, const int8_t* bp,
                      int64_t pstride, int64_t Kp, const int32_t* init, int32_t* out,
                      int64_t ldo) {
  if (rt == 2)
    return ct == 2 ? AmxTile<2, 2, S>(a, lda, bp, pstride, Kp, init, out, ldo)
                   : AmxTile<2, 1, S>(a, lda, bp, pstride, Kp, init, out, ldo);
  return ct == 2 ? AmxTile<1, 2, S>(a, lda, bp, pstride, Kp, init, out, ldo)
                 : AmxTile<1, 1, S>(a, lda, bp, pstride, Kp, init, out, ldo);
}

inline void AmxTileAny(bool s, int rt, int ct, const uint8_t* a, int64_t lda, const int8_t* bp,
                       int64_t pstride, int64_t Kp, const int32_t* init, int32_t* out,
                       int64_t ldo) {
  if (s) return AmxTileCT<true>(rt, ct, a, lda, bp, pstride, Kp, init, out, ldo);
  return AmxTileCT<false>(rt, ct, a, lda, bp, pstride, Kp, init, out, ldo);
}

// The C tiles' start for ct panels: each panel's 16 -128 * column sums (from
// ``corr``, 16 per panel; zeros for a null corr) in 16 identical rows,
// init[2][16][16].
inline void AmxInit(const int32_t* corr, int ct, int32_t* init) {
  for (int c = 0; c < 2; ++c) {
    const __m512i v = c < ct && corr != nullptr
                          ? _mm512_loadu_si512(static_cast<const void*>(corr + 16 * c))
                          : _mm512_setzero_si512();
    for (int r = 0; r < 16; ++r) _mm512_store_si512(static_cast<void*>(init + 256 * c + 16 * r), v);
  }
}

// Runs f(rows, r, tile) over the 32-row blocks (and a last 16-row one) of rows
// [0, n16) of A (n16 a multiple of 16) against ct (1 or 2) panels from bpp,
// whose -128 * column sums ``corr`` holds (null: A holds signed codes, no
// correction): ``tile`` (row stride 32) holds the int32 products of rows r ..
// r + rows. With ``direct`` (row stride ldd, for
// blocks that fill 16 ct columns), the tiles are stored there instead and f is
// not called. The caller holds an AmxScope.
template <typename F>
void AmxRows(const uint8_t* A, int64_t lda, int64_t n16, const int8_t* bpp, int64_t pstride,
             int64_t Kp, int ct, const int32_t* corr, int32_t* direct, int64_t ldd, F f) {
  alignas(64) int32_t init[2 * 16 * 16];
  AmxInit(corr, ct, init);
  alignas(64) int32_t tile[32 * 32];
  for (int64_t r = 0; r < n16; r += 32) {
    const int rt = n16 - r >= 32 ? 2 : 1;
    if (direct != nullptr) {
      AmxTileAny(corr == nullptr, rt, ct, A + r * lda, lda, bpp, pstride, Kp, init,
                 direct + r * ldd, ldd);
    } else {
      AmxTileAny(corr == nullptr, rt, ct, A + r * lda, lda, bpp, pstride, Kp, init, tile, 32);
      f(16 * rt, r, static_cast<const int32_t*>(tile));
    }
  }
}

// Rows [i0, i1) x column panels [p0, p1) of C from the packed B. With AMX
// (UseAmx), the rows' whole 16-row blocks run on the tiles (AmxRows), panel
// pairs outermost; the other rows (all of them without AMX) on the VNNI
// registers: NB panels at a time, every row block against them while they are
// in cache.
void Blocks(const uint8_t* A, int64_t Kp, const int8_t* Bp, int64_t N, int32_t* C, int64_t i0,
            int64_t i1, int64_t p0, int64_t p1) {
  if (i0 >= i1 || p0 >= p1) return;
  const int64_t kq_n = Kp / 4;
  const int64_t pstride = kq_n * 64;
  if (i1 - i0 >= 16 && UseAmx()) {
    const int64_t n16 = (i1 - i0) / 16 * 16;
    AmxScope scope;
    for (int64_t p = p0; p < p1; p += 2) {
      const int ct = static_cast<int>(std::min<int64_t>(2, p1 - p));
      const int cols = static_cast<int>(std::min<int64_t>(N - p * 16, ct * 16));
      alignas(64) int32_t corr[32];
      PanelSums(Bp + p * pstride, ct, 2, kq_n, corr);
      // Whole 16-column panels go straight to C; a last, partial one through ``tile``.
      const bool full = cols == 16 * ct;
      AmxRows(A + i0 * Kp, Kp, n16, Bp + p * pstride, pstride, Kp, ct, corr,
              full ? C + i0 * N + p * 16 : nullptr, N,
              [&](int rows, int64_t r, const int32_t* t) {
                for (int rr = 0; rr < rows; ++rr) {
                  int32_t* dst = C + (i0 + r + rr) * N + p * 16;
                  for (int c0 = 0; c0 < cols; c0 += 16) {
                    const int m = std::min(16, cols - c0);
                    const __mmask16 k = static_cast<__mmask16>(m == 16 ? 0xFFFF : (1u << m) - 1);
                    _mm512_mask_storeu_epi32(
                        dst + c0, k, _mm512_load_si512(static_cast<const void*>(t + rr * 32 + c0)));
                  }
                }
              });
    }
    i0 += n16;
    if (i0 >= i1) return;
  }
  for (int64_t p = p0; p < p1; p += NB) {
    const int64_t nbh = std::min<int64_t>(NB, p1 - p);
    const int cols = static_cast<int>(std::min<int64_t>(N - p * 16, nbh * 16));
    const int8_t* bpp = Bp + p * pstride;
    // -128 * column sums of these panels, one pass over the slice that the row
    // blocks then reuse from cache.
    alignas(64) int32_t corr[NB * 16];
    PanelSums(bpp, nbh, NB, kq_n, corr);
    for (int64_t i = i0; i < i1; i += MR) {
      const int rows = static_cast<int>(std::min<int64_t>(MR, i1 - i));
      const uint8_t* a = A + i * Kp;
      int32_t* c = C + i * N + p * 16;
      if (nbh == NB) {
        MicroRows<NB>(rows, a, Kp, bpp, kq_n, pstride, corr, c, N, cols);
      } else {
        for (int64_t q = 0; q < nbh; ++q) {
          const int c2 = static_cast<int>(std::min<int64_t>(16, N - (p + q) * 16));
          MicroRows<1>(rows, a, Kp, bpp + q * pstride, kq_n, pstride, corr + q * 16, c + q * 16,
                       N, c2);
        }
      }
    }
  }
}

// The packed weight: one buffer per calling thread, grown as needed and kept
// across calls, 2 MB aligned with transparent huge pages requested: the
// packing writes 16-column panels far apart, which with 4 KB pages costs a
// TLB miss per 64-byte write.
class PackBuffer {
 public:
  ~PackBuffer() { Release(); }
  int8_t* get(size_t bytes) {
    if (bytes <= size_) return ptr_;
    Release();
    constexpr size_t kHuge = size_t{2} << 20;
    const size_t n = (bytes + kHuge - 1) / kHuge * kHuge;
    void* p = nullptr;
    if (posix_memalign(&p, kHuge, n) != 0) return nullptr;
    madvise(p, n, MADV_HUGEPAGE);  // advisory: fine if refused
    ptr_ = static_cast<int8_t*>(p);
    size_ = n;
    return ptr_;
  }

 private:
  void Release() {
    free(ptr_);
    ptr_ = nullptr;
    size_ = 0;
  }
  int8_t* ptr_ = nullptr;
  size_t size_ = 0;
};

// Column chunks of a decode-sized product (M rows of x times a (K, N) weight,
// row-major): an even split into one chunk per thread, in whole units of 128
// columns (a cache line of 4-bit codes, two of FP8). Each thread streams long
// runs of its rows (512 bytes of a 4-bit row at N = 2048), which the hardware
// prefetchers follow; chunks of 128 columns (more chunks for the pool to share
// out) read one cache line per row and ran 1.3-2x slower from memory. Below
// kGemvInlineWork multiply-adds, or with one thread, one chunk: the calling
// thread is done before a worker would join in. (A floor of 2^20 multiply-adds
// per thread before this left every product of SmolLM2-135M on one thread.)
constexpr int64_t kGemvInlineWork = int64_t{1} << 16;

int64_t GemvChunkCols(int64_t M, int64_t K, int64_t N, int64_t threads) {
  const int64_t t = std::min<int64_t>(threads, GetPool()->threads());
  if (t <= 1 || M * K * N < kGemvInlineWork) return std::max<int64_t>(N, 1);
  const int64_t units = (N + 127) / 128;
  return (units + t - 1) / t * 128;
}

// The row kGemvPrefetchRows below k of a weight streamed row by row (a
// column block at a time, as W4Small and Fp8Small read it), requested ahead:
// from memory (a model's weights are not in cache) the kernels ran 1.4-2x
// slower without it. Clamped to the last row, so no branch in the unit loop.
constexpr int64_t kGemvPrefetchRows = 48;

inline void GemvPrefetch(const uint8_t* col, int64_t k, int64_t K, int64_t stride) {
  const int64_t r = std::min(k + kGemvPrefetchRows, K - 1);
  _mm_prefetch(reinterpret_cast<const char*>(col + r * stride), _MM_HINT_T0);
}

// Decode-sized M (<= kSmallM rows): no packing, B is read once, in place.
// Two rows of B at a time are sign-extended to int16 and interleaved in
// registers (vpmovsxbw + vpunpck{l,h}wd), then multiplied by the broadcast
// pair of activations with vpdpwssd (int16 x int16 -> int32, exact; the
// activations are A - 128, so no column-sum correction is needed). Within
// each 128-bit lane the unpacks leave columns in a fixed order that
// vpermt2d undoes before the store. k runs in chunks (kChunkPairs pairs of
// rows) so a chunk of rows stays in cache while every 64-column block of the
// thread's range walks it; C is written by the first chunk and added to by
// the later ones.
constexpr int64_t kSmallM = 6;
constexpr int64_t kChunkPairs = 8;

template <int R>
void SmallM(const uint8_t* A, int64_t Kp, const int8_t* B, int64_t K, int64_t N, int32_t* C,
            int64_t j0, int64_t j1) {
  if (j0 >= j1) return;
  const int64_t np = (K + 1) / 2;  // row pairs; an odd K pairs its last row with zeros
  // xp[r][p]: the int16 pair (x[2p], x[2p+1]) as one int32 for the broadcast.
  thread_local std::vector<int32_t> xp;  // kept across calls: no allocation per call
  xp.resize(static_cast<size_t>(R * np));
  for (int r = 0; r < R; ++r)
    for (int64_t p = 0; p < np; ++p) {
      const int32_t lo = static_cast<int32_t>(A[r * Kp + 2 * p]) - 128;
      const int32_t hi = 2 * p + 1 < K ? static_cast<int32_t>(A[r * Kp + 2 * p + 1]) - 128 : 0;
      xp[r * np + p] = static_cast<int32_t>((static_cast<uint32_t>(hi) << 16) |
                                            (static_cast<uint32_t>(lo) & 0xFFFFu));
    }
  // Output column c of a 32-column half lives in lane c/8 of the low (c%8 < 4)
  // or high unpack, element c%4.
  alignas(64) int32_t idx[2][16];
  for (int h = 0; h < 2; ++h)
    for (int e = 0; e < 16; ++e) {
      const int c = h * 16 + e, l = c / 8, i = c % 8;
      idx[h][e] = i < 4 ? l * 4 + i : 16 + l * 4 + (i - 4);
    }
  const __m512i perm0 = _mm512_load_si512(static_cast<const void*>(idx[0]));
  const __m512i perm1 = _mm512_load_si512(static_cast<const void*>(idx[1]));
  for (int64_t p0 = 0; p0 < np; p0 += kChunkPairs) {
    const int64_t p1 = std::min(np, p0 + kChunkPairs);
    for (int64_t jb = j0; jb < j1; jb += 64) {
      const int64_t nc = std::min<int64_t>(64, j1 - jb);
      __m512i acc[R][4];
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
        for (int s = 0; s < 4; ++s) acc[r][s] = _mm512_setzero_si512();
      // Byte masks of the two 32-column halves (all ones except at the edge).
      __mmask32 m[2];
      for (int h = 0; h < 2; ++h) {
        const int64_t v = std::max<int64_t>(0, std::min<int64_t>(32, nc - 32 * h));
        m[h] = v >= 32 ? ~__mmask32{0} : static_cast<__mmask32>((uint64_t{1} << v) - 1);
      }
      for (int64_t p = p0; p < p1; ++p) {
        const int8_t* b0 = B + (2 * p) * N + jb;
        const bool has1 = 2 * p + 1 < K;
        const uint8_t* col = reinterpret_cast<const uint8_t*>(B + jb);
        GemvPrefetch(col, 2 * p, K, N);
        GemvPrefetch(col, 2 * p + 1, K, N);
#pragma GCC unroll 2
        for (int h = 0; h < 2; ++h) {
          const __m512i w0 = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(m[h], b0 + 32 * h));
          const __m512i w1 = has1 ? _mm512_cvtepi8_epi16(
                                        _mm256_maskz_loadu_epi8(m[h], b0 + N + 32 * h))
                                  : _mm512_setzero_si512();
          const __m512i lo = _mm512_unpacklo_epi16(w0, w1);
          const __m512i hi = _mm512_unpackhi_epi16(w0, w1);
#pragma GCC unroll 16
          for (int r = 0; r < R; ++r) {
            const __m512i xv = _mm512_set1_epi32(xp[r * np + p]);
            acc[r][2 * h] = _mm512_dpwssd_epi32(acc[r][2 * h], lo, xv);
            acc[r][2 * h + 1] = _mm512_dpwssd_epi32(acc[r][2 * h + 1], hi, xv);
          }
        }
      }
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
        for (int h = 0; h < 2; ++h)
#pragma GCC unroll 2
          for (int q = 0; q < 2; ++q) {
            const int64_t c0 = 32 * h + 16 * q;  // first of these 16 columns
            const int64_t v = std::max<int64_t>(0, std::min<int64_t>(16, nc - c0));
            if (v == 0) continue;
            const __mmask16 sm = static_cast<__mmask16>((1u << v) - 1);
            __m512i out =
                _mm512_permutex2var_epi32(acc[r][2 * h], q ? perm1 : perm0, acc[r][2 * h + 1]);
            int32_t* c = C + r * N + jb + c0;
            if (p0 > 0) out = _mm512_add_epi32(out, _mm512_maskz_loadu_epi32(sm, c));
            _mm512_mask_storeu_epi32(c, sm, out);
          }
    }
  }
}

void SmallMAny(int64_t M, const uint8_t* A, int64_t Kp, const int8_t* B, int64_t K, int64_t N,
               int32_t* C, int64_t j0, int64_t j1) {
  switch (M) {
    case 1: return SmallM<1>(A, Kp, B, K, N, C, j0, j1);
    case 2: return SmallM<2>(A, Kp, B, K, N, C, j0, j1);
    case 3: return SmallM<3>(A, Kp, B, K, N, C, j0, j1);
    case 4: return SmallM<4>(A, Kp, B, K, N, C, j0, j1);
    case 5: return SmallM<5>(A, Kp, B, K, N, C, j0, j1);
    default: return SmallM<6>(A, Kp, B, K, N, C, j0, j1);
  }
}

// Runs f(0..t-1) on the shared persistent pool (pool.h; the calling thread
// takes part), not on threads started per call.
template <typename F>
void Parallel(int64_t t, F f) {
  if (t <= 1) {
    f(0);
    return;
  }
  GetPool()->ForEach(t, f);
}

// The (K, N) int8 weight ``w`` packed into ``buf`` (pack_int8's panels) by up to t_max
// threads splitting the k range; null when out of memory.
inline const int8_t* PackWeight(const int8_t* w, int64_t K, int64_t N, PackBuffer& buf,
                                int64_t t_max) {
  const int64_t Kp = (K + 3) / 4 * 4, kq_n = Kp / 4, np = (N + 15) / 16;
  int8_t* out = buf.get(static_cast<size_t>(np * kq_n * 64));
  if (out == nullptr) return nullptr;
  const int64_t tp = std::max<int64_t>(1, std::min<int64_t>(t_max, kq_n));
  Parallel(tp, [&](int64_t i) { PackRows(w, K, N, Kp, kq_n * i / tp, kq_n * (i + 1) / tp, out); });
  return out;
}

constexpr int64_t kPanelSplitWork = int64_t{1} << 17;
// jqx_w8a8_vnni splits the panels (not the rows) over the threads up to this
// many rows of x (decode sizes).
constexpr int64_t kW8A8PanelRows = 16;

// C = (A - 128) . B on the pool. ``Bp`` is the packed weight, or null: then B
// (K, N) is packed here, into this thread's buffer, and up to kSmallM rows read
// it in place (SmallM) instead.
ffi::Error Int8Gemm(const uint8_t* A, int64_t M, int64_t Kp, const int8_t* B, int64_t K,
                    const int8_t* Bp, int64_t N, int32_t* C, int64_t threads) {
  if (M == 0 || N == 0) return ffi::Error::Success();
  const int64_t nmb = (M + MR - 1) / MR;
  const int64_t np = (N + 15) / 16;
  // Small products are not worth a thread each (~2M multiply-adds minimum).
  const int64_t work = M * N * Kp;
  threads = std::min<int64_t>(threads, GetPool()->threads());
  const int64_t t_max = std::max<int64_t>(1, std::min<int64_t>(threads, work / (1 << 21)));
  if (Bp == nullptr && M <= kSmallM) {
    // An even split of the columns over the threads (GemvChunkCols), rows
    // prefetched ahead: the weight is read once, from memory.
    const int64_t cols = GemvChunkCols(M, Kp, N, threads);
    Parallel((N + cols - 1) / cols, [&](int64_t i) {
      SmallMAny(M, A, Kp, B, K, N, C, i * cols, std::min(N, (i + 1) * cols));
    });
    return ffi::Error::Success();
  }
  if (Bp == nullptr) {
    // Pack B once per call (this thread's buffer, reused across calls),
    // threads splitting the k-quads (Kp is K rounded up to 4).
    thread_local PackBuffer packed;
    Bp = PackWeight(B, K, N, packed, t_max);
    if (Bp == nullptr) return ffi::Error::Internal("jqx_int8_gemm: out of memory");
  }
  // Many row blocks: threads split the rows. Few (decode-like M): the panels,
  // over every thread from kPanelSplitWork multiply-adds on: each panel is
  // streamed from memory once, and one thread alone left a decode step's
  // products (SmolLM2-135M: 0.3-1.8M multiply-adds each) at half the bandwidth.
  const bool by_rows = nmb >= 4 * t_max;
  const int64_t ng = (np + NB - 1) / NB;  // panel groups of NB
  const int64_t t_panels = work >= kPanelSplitWork ? std::max<int64_t>(threads, 1) : t_max;
  const int64_t t = by_rows ? std::min<int64_t>(t_max, nmb) : std::min<int64_t>(t_panels, ng);
  // Row splits in whole blocks: MR rows, or 32 on the AMX tiles.
  const int64_t unit = UseAmx() ? 32 : MR;
  const int64_t nu = (M + unit - 1) / unit;
  Parallel(t, [&](int64_t i) {
    if (by_rows) {
      Blocks(A, Kp, Bp, N, C, std::min(M, nu * i / t * unit), std::min(M, nu * (i + 1) / t * unit),
             0, np);
    } else {
      Blocks(A, Kp, Bp, N, C, 0, M, std::min(np, ng * i / t * NB),
             std::min(np, ng * (i + 1) / t * NB));
    }
  });
  return ffi::Error::Success();
}

// B is the (K, N) weight, or (3-D) the weight already packed
// (jqx.kernels.cpu.native.pack_int8): (ceil(N/16), Kp/4, 64), the layout PackRows
// writes; N is then C's.
ffi::Error Int8GemmImpl(ffi::Buffer<ffi::U8> a, ffi::Buffer<ffi::S8> b,
                        ffi::ResultBuffer<ffi::S32> c, int64_t threads,
                        ffi::ThreadPool xla_pool) {
  XlaPoolScope xla_scope(xla_pool, RowsOf(a.dimensions()) > kXlaPoolRows);
  const auto ad = a.dimensions();
  const auto bd = b.dimensions();
  const auto cd = c->dimensions();
  if (ad.size() != 2 || (bd.size() != 2 && bd.size() != 3) || cd.size() != 2)
    return ffi::Error::InvalidArgument(
        "jqx_int8_gemm: expected A (M, Kp), B (K, N) or packed (ceil(N/16), Kp/4, 64), "
        "C (M, N)");
  const int64_t M = ad[0], Kp = ad[1], N = cd[1];
  if (bd.size() == 3) {
    if (Kp % 4 != 0 || cd[0] != M || bd[0] != (N + 15) / 16 || bd[1] != Kp / 4 || bd[2] != 64)
      return ffi::Error::InvalidArgument("jqx_int8_gemm: inconsistent shapes (packed B)");
    return Int8Gemm(a.typed_data(), M, Kp, nullptr, Kp, b.typed_data(), N, c->typed_data(),
                    threads);
  }
  const int64_t K = bd[0];
  if (Kp % 4 != 0 || K > Kp || Kp - K >= 4 || cd[0] != M || bd[1] != N)
    return ffi::Error::InvalidArgument("jqx_int8_gemm: inconsistent shapes");
  return Int8Gemm(a.typed_data(), M, Kp, b.typed_data(), K, nullptr, N, c->typed_data(), threads);
}

// ---------------------------------------------------------------------------
// 4-bit weight-only, decode-sized M: Y[M, N] (f32) = X[M, K] (f32) . W, with
// W[k, n] = (table[code[k, n]] - zero[g, n]) * scale[g, n], g = k / gs.
// Codes are packed two per byte along N (low nibble = even column), as in
// jqx's QArray: P[K, ceil(N/2)]. ``table`` (16 floats) decodes every 4-bit
// format (uint4, int4, nf4, fp4) with one vpermps. Per group the kernel sums
// x[k] * table[code] in f32 and applies the group's zero and scale once:
// y += scale * (sum - zero * sum_k x[k]). The weight is read once, in place:
// 16 packed bytes (32 columns) are zero-extended to int32, split into even
// (low nibble) and odd (high nibble) columns, decoded and multiplied by the
// broadcast x[k] (f32 FMA); vpermt2ps interleaves even and odd back at the
// group's end. k runs in chunks of kW4ChunkRows rows (partial sums kept per
// thread) so each chunk streams in order; threads split the columns.
constexpr int64_t kW4ChunkRows = 16;

// The dtypes a decode kernel reads its block scales in.
enum ScaleKind : int { kScaleF32 = 0, kScaleE8M0 = 1, kScaleE4M3 = 2 };

// 16 block scales of a decode kernel from S, widened in registers exactly as
// astype(float32) widens them: the scales are read in their own dtype, no
// float32 copy per call. kScaleE8M0: the OCP MX E8M0 bytes, 2^(e - 127) (e = 0
// the float32 subnormal 2^-127, e = 255 NaN). kScaleE4M3: float8_e4m3fn
// (NVFP4's block scales; 0x7F / 0xFF NaN): the byte's sign and low 7 bits
// shifted into float16's fields give its value times 2^-8, subnormals included,
// widened exactly by vcvtph2ps and times 2^8.
template <int kKind>
inline __m512 LoadScale(const void* S, int64_t i, __mmask16 m) {
  if (kKind == kScaleF32) return _mm512_maskz_loadu_ps(m, static_cast<const float*>(S) + i);
  const __m512i e = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, static_cast<const uint8_t*>(S) + i));
  if (kKind == kScaleE4M3) {
    const __m512i mag = _mm512_and_si512(e, _mm512_set1_epi32(0x7F));
    const __m512i h = _mm512_or_si512(_mm512_slli_epi32(_mm512_and_si512(e, _mm512_set1_epi32(0x80)), 8),
                                      _mm512_slli_epi32(mag, 7));
    const __m512 v = _mm512_mul_ps(_mm512_cvtph_ps(_mm512_cvtepi32_epi16(h)), _mm512_set1_ps(256.0f));
    return _mm512_mask_mov_ps(v, _mm512_cmpeq_epi32_mask(mag, _mm512_set1_epi32(0x7F)),
                              _mm512_castsi512_ps(_mm512_set1_epi32(0x7FC00000)));
  }
  __m512i bits = _mm512_slli_epi32(e, 23);
  bits = _mm512_mask_mov_epi32(bits, _mm512_cmpeq_epi32_mask(e, _mm512_setzero_si512()),
                               _mm512_set1_epi32(0x00400000));
  bits = _mm512_mask_mov_epi32(bits, _mm512_cmpeq_epi32_mask(e, _mm512_set1_epi32(255)),
                               _mm512_set1_epi32(0x7FC00000));
  return _mm512_castsi512_ps(bits);
}

// ``S2``: second-level scales (NVFP4's per tensor, or one per column where
// ``s2_cols``: tensors of different scales stacked along N) that multiply every
// widened block scale, in float32 as QArray.dequantize's two-level scales; or null.
template <int R, int kScale>
void W4Small(const float* X, int64_t K, const uint8_t* P, int64_t N2, int64_t N,
             const float* table, const void* S, const float* S2, bool s2_cols, const float* Z,
             int64_t gs, float* Y, int64_t j0, int64_t j1) {
  if (j0 >= j1) return;
  const int64_t G = K / gs;
  const int64_t width = j1 - j0;
  const int64_t nblk = (width + 63) / 64;  // 64-column blocks: two 32-column units
  // Scratch kept across calls (no allocation per call).
  thread_local std::vector<float> xs, part;
  if (Z != nullptr) {  // sum(x) per group, for the zero points (no division per k)
    xs.resize(static_cast<size_t>(R * G));
    for (int r = 0; r < R; ++r)
      for (int64_t g = 0; g < G; ++g) {
        float sum = 0.0f;
        for (int64_t k = g * gs; k < (g + 1) * gs; ++k) sum += X[r * K + k];
        xs[r * G + g] = sum;
      }
  }
  // Partial group sums, per row and block: [r][blk][even0, odd0, even1, odd1] x 16.
  part.resize(static_cast<size_t>(R * nblk * 64));
  const __m512 tab = _mm512_loadu_ps(table);
  const __m512i nib = _mm512_set1_epi32(0xF);
  alignas(64) int32_t il[2][16];
  for (int e = 0; e < 16; ++e) {
    il[0][e] = (e % 2 ? 16 : 0) + e / 2;      // columns 0..15 of a unit
    il[1][e] = (e % 2 ? 16 : 0) + 8 + e / 2;  // columns 16..31
  }
  const __m512i il0 = _mm512_load_si512(static_cast<const void*>(il[0]));
  const __m512i il1 = _mm512_load_si512(static_cast<const void*>(il[1]));
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t k0 = g * gs; k0 < (g + 1) * gs; k0 += kW4ChunkRows) {
      const int64_t k1 = std::min<int64_t>(k0 + kW4ChunkRows, (g + 1) * gs);
      const bool first = k0 == g * gs, last = k1 == (g + 1) * gs;
      for (int64_t blk = 0; blk < nblk; ++blk) {
        const int64_t jb = j0 + blk * 64;
        const int64_t nc = std::min<int64_t>(64, j1 - jb);  // valid columns
        __mmask16 bm[2];  // packed bytes of each 32-column unit
        for (int u = 0; u < 2; ++u) {
          const int64_t cu = std::max<int64_t>(0, std::min<int64_t>(32, nc - 32 * u));
          const int64_t bytes = std::min<int64_t>((cu + 1) / 2, N2 - (jb + 32 * u) / 2);
          bm[u] = bytes <= 0 ? 0 : static_cast<__mmask16>((1u << bytes) - 1);
        }
        __m512 acc[R][4];
        float* pp = part.data() + blk * 64;
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
          for (int s = 0; s < 4; ++s)
            acc[r][s] = first ? _mm512_setzero_ps()
                              : _mm512_loadu_ps(pp + r * nblk * 64 + s * 16);
        const uint8_t* pk = P + jb / 2;
        for (int64_t k = k0; k < k1; ++k) {
          GemvPrefetch(pk, k, K, N2);
#pragma GCC unroll 2
          for (int u = 0; u < 2; ++u) {
            const __m512i b =
                _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(bm[u], pk + k * N2 + 16 * u));
            const __m512 ev = _mm512_permutexvar_ps(_mm512_and_si512(b, nib), tab);
            const __m512 od = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), tab);
#pragma GCC unroll 8
            for (int r = 0; r < R; ++r) {
              const __m512 xv = _mm512_set1_ps(X[r * K + k]);
              acc[r][2 * u] = _mm512_fmadd_ps(ev, xv, acc[r][2 * u]);
              acc[r][2 * u + 1] = _mm512_fmadd_ps(od, xv, acc[r][2 * u + 1]);
            }
          }
        }
        if (!last) {
#pragma GCC unroll 8
          for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
            for (int s = 0; s < 4; ++s) _mm512_storeu_ps(pp + r * nblk * 64 + s * 16, acc[r][s]);
          continue;
        }
        // Group end: interleave, then y += scale * (sum - zero * sum(x)).
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          const __m512 xsv = _mm512_set1_ps(Z != nullptr ? xs[r * G + g] : 0.0f);
#pragma GCC unroll 2
          for (int u = 0; u < 2; ++u)
#pragma GCC unroll 2
            for (int h = 0; h < 2; ++h) {
              const int64_t c0 = 32 * u + 16 * h;
              const int64_t v = std::max<int64_t>(0, std::min<int64_t>(16, nc - c0));
              if (v == 0) continue;
              const __mmask16 m = static_cast<__mmask16>((1u << v) - 1);
              __m512 sum = _mm512_permutex2var_ps(acc[r][2 * u], h ? il1 : il0, acc[r][2 * u + 1]);
              const int64_t col = jb + c0;
              if (Z != nullptr)
                sum = _mm512_fnmadd_ps(_mm512_maskz_loadu_ps(m, Z + g * N + col), xsv, sum);
              __m512 sc = LoadScale<kScale>(S, g * N + col, m);
              if (S2 != nullptr)
                sc = _mm512_mul_ps(sc, s2_cols ? _mm512_maskz_loadu_ps(m, S2 + col)
                                               : _mm512_set1_ps(*S2));
              float* y = Y + r * N + col;
              const __m512 prev = g == 0 ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(m, y);
              _mm512_mask_storeu_ps(y, m, _mm512_fmadd_ps(sum, sc, prev));
            }
        }
      }
    }
  }
}

constexpr int64_t kW4BlockRows = 8;  // rows per register block
constexpr int64_t kW4MaxRows = 16;   // more rows: XLA's dequantize-then-dot wins

template <int kScale>
void W4Any(int64_t M, const float* X, int64_t K, const uint8_t* P, int64_t N2, int64_t N,
           const float* table, const void* S, const float* S2, bool s2_cols, const float* Z,
           int64_t gs, float* Y, int64_t j0, int64_t j1) {
  switch (M) {
    case 1: return W4Small<1, kScale>(X, K, P, N2, N, table, S, S2, s2_cols, Z, gs, Y, j0, j1);
    case 2: return W4Small<2, kScale>(X, K, P, N2, N, table, S, S2, s2_cols, Z, gs, Y, j0, j1);
    case 3: return W4Small<3, kScale>(X, K, P, N2, N, table, S, S2, s2_cols, Z, gs, Y, j0, j1);
    case 4: return W4Small<4, kScale>(X, K, P, N2, N, table, S, S2, s2_cols, Z, gs, Y, j0, j1);
    case 5: return W4Small<5, kScale>(X, K, P, N2, N, table, S, S2, s2_cols, Z, gs, Y, j0, j1);
    case 6: return W4Small<6, kScale>(X, K, P, N2, N, table, S, S2, s2_cols, Z, gs, Y, j0, j1);
    case 7: return W4Small<7, kScale>(X, K, P, N2, N, table, S, S2, s2_cols, Z, gs, Y, j0, j1);
    default: return W4Small<8, kScale>(X, K, P, N2, N, table, S, S2, s2_cols, Z, gs, Y, j0, j1);
  }
}

// The kind of a decode kernel's scales, or -1 for a dtype it does not read:
// F32, F8E8M0FNU (MX) and, where ``e4m3_ok``, F8E4M3FN (NVFP4's block scales).
int ScaleKindOf(const ffi::AnyBuffer& scale, bool e4m3_ok) {
  switch (scale.element_type()) {
    case ffi::DataType::F32: return kScaleF32;
    case ffi::DataType::F8E8M0FNU: return kScaleE8M0;
    case ffi::DataType::F8E4M3FN: return e4m3_ok ? kScaleE4M3 : -1;
    default: return -1;
  }
}

// ``scale2`` (one float32, or N: one per column) multiplies every block scale
// where ``has_scale2`` (NVFP4's per-tensor scales, its E4M3 block scales read as
// stored).
ffi::Error W4GemvImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> p, ffi::Buffer<ffi::F32> table,
                      ffi::AnyBuffer scale, ffi::Buffer<ffi::F32> scale2,
                      ffi::Buffer<ffi::F32> zero, ffi::ResultBuffer<ffi::F32> y, int64_t group,
                      int64_t has_zero, int64_t has_scale2, int64_t threads) {
  const auto xd = x.dimensions();
  const auto pd = p.dimensions();
  const auto sd = scale.dimensions();
  const auto yd = y->dimensions();
  if (xd.size() != 2 || pd.size() != 2 || sd.size() != 2 || yd.size() != 2 ||
      table.element_count() != 16)
    return ffi::Error::InvalidArgument(
        "jqx_w4_gemv: expected x (M, K), packed (K, ceil(N/2)), table (16), scale (K/g, N), "
        "y (M, N)");
  const int kind = ScaleKindOf(scale, /*e4m3_ok=*/true);
  if (kind < 0)
    return ffi::Error::InvalidArgument("jqx_w4_gemv: scale must be F32, F8E8M0FNU or F8E4M3FN");
  if (has_scale2 && scale2.element_count() != 1 &&
      static_cast<int64_t>(scale2.element_count()) != yd[1])
    return ffi::Error::InvalidArgument("jqx_w4_gemv: scale2 must hold 1 or N float32");
  const int64_t M = xd[0], K = xd[1], N = yd[1], N2 = pd[1];
  if (pd[0] != K || yd[0] != M || N2 != (N + 1) / 2 || group <= 0 || K % group != 0 ||
      sd[0] != K / group || sd[1] != N || M > kW4MaxRows ||
      (has_zero && zero.element_count() != scale.element_count()))
    return ffi::Error::InvalidArgument("jqx_w4_gemv: inconsistent shapes");
  if (M == 0 || N == 0) return ffi::Error::Success();
  float* Y = y->typed_data();
  if (K == 0) {
    memset(Y, 0, static_cast<size_t>(M * N) * sizeof(float));
    return ffi::Error::Success();
  }
  const int64_t cols = GemvChunkCols(M, K, N, threads);
  const float* Z = has_zero ? zero.typed_data() : nullptr;
  const float* S2 = has_scale2 ? scale2.typed_data() : nullptr;
  const bool s2_cols = has_scale2 && scale2.element_count() != 1;
  const auto run = kind == kScaleE8M0   ? W4Any<kScaleE8M0>
                   : kind == kScaleE4M3 ? W4Any<kScaleE4M3>
                                        : W4Any<kScaleF32>;
  Parallel((N + cols - 1) / cols, [&](int64_t i) {
    // Blocks of up to kW4BlockRows rows, each over the chunk's columns (the
    // weight slice is read again per block, from cache).
    for (int64_t r0 = 0; r0 < M; r0 += kW4BlockRows)
      run(std::min(kW4BlockRows, M - r0), x.typed_data() + r0 * K, K, p.typed_data(), N2, N,
          table.typed_data(), scale.untyped_data(), S2, s2_cols, Z, group, Y + r0 * N, i * cols,
          std::min(N, (i + 1) * cols));
  });
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------
// FP8 weight-only, decode-sized M: Y[M, N] (f32) = X[M, K] (f32) . W, with
// W[k, n] = fp8(code[k, n]) * scale[g, n], g = k / gs; codes (K, N) uint8,
// E4M3 (OCP "fn": no infinities, 0x7F/0xFF NaN) or E5M2. Each code widens to
// float16 exactly: E5M2 is float16's top byte; E4M3 shifted into float16's
// fields is its value times 2^-8 (subnormals included), so each group's sum is
// scaled by 2^8 (exact) with its scale. E4M3's NaN codes stay NaN. Per group
// the kernel sums x[k] * value in f32 and applies the group's scale once:
// y += scale * sum. Threads split the columns (blocks of 64), k runs in chunks
// of kW4ChunkRows rows as in W4Small.
template <bool kE4M3>
inline __m512 Fp8ToF32(__m128i codes) {
  __m256i h = _mm256_slli_epi16(_mm256_cvtepu8_epi16(codes), 8);  // E5M2 = f16's top byte
  if (kE4M3) {
    // s eeee mmm -> f16 s 0eeee mmm0000000 (value * 2^-8); NaN codes to f16 NaN.
    const __mmask16 nan = _mm256_cmpeq_epi16_mask(
        _mm256_and_si256(h, _mm256_set1_epi16(0x7F00)), _mm256_set1_epi16(0x7F00));
    h = _mm256_and_si256(_mm256_srai_epi16(h, 1), _mm256_set1_epi16(static_cast<int16_t>(0xBFFF)));
    h = _mm256_mask_mov_epi16(h, nan, _mm256_set1_epi16(0x7E00));
  }
  return _mm512_cvtph_ps(h);
}

template <int R, bool kE4M3, int kScale>
void Fp8Small(const float* X, int64_t K, const uint8_t* P, int64_t N, const void* S,
              int64_t gs, float* Y, int64_t j0, int64_t j1) {
  if (j0 >= j1) return;
  const int64_t G = K / gs;
  const int64_t width = j1 - j0;
  const int64_t nblk = (width + 63) / 64;
  thread_local std::vector<float> part;  // partial group sums kept across chunks
  part.resize(static_cast<size_t>(R * nblk * 64));
  const __m512 unit = _mm512_set1_ps(kE4M3 ? 256.0f : 1.0f);
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t k0 = g * gs; k0 < (g + 1) * gs; k0 += kW4ChunkRows) {
      const int64_t k1 = std::min<int64_t>(k0 + kW4ChunkRows, (g + 1) * gs);
      const bool first = k0 == g * gs, last = k1 == (g + 1) * gs;
      for (int64_t blk = 0; blk < nblk; ++blk) {
        const int64_t jb = j0 + blk * 64;
        const int64_t nc = std::min<int64_t>(64, j1 - jb);  // valid columns
        __mmask16 m[4];
        for (int u = 0; u < 4; ++u) {
          const int64_t v = std::max<int64_t>(0, std::min<int64_t>(16, nc - 16 * u));
          m[u] = static_cast<__mmask16>((1u << v) - 1);
        }
        __m512 acc[R][4];
        float* pp = part.data() + blk * 64;
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
          for (int u = 0; u < 4; ++u)
            acc[r][u] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(pp + r * nblk * 64 + u * 16);
        for (int64_t k = k0; k < k1; ++k) {
          GemvPrefetch(P + jb, k, K, N);
          const uint8_t* row = P + k * N + jb;
#pragma GCC unroll 4
          for (int u = 0; u < 4; ++u) {  // empty units load zeros (no branch: acc stays in registers)
            const __m512 w = Fp8ToF32<kE4M3>(_mm_maskz_loadu_epi8(m[u], row + 16 * u));
#pragma GCC unroll 8
            for (int r = 0; r < R; ++r)
              acc[r][u] = _mm512_fmadd_ps(w, _mm512_set1_ps(X[r * K + k]), acc[r][u]);
          }
        }
        if (!last) {
#pragma GCC unroll 8
          for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
            for (int u = 0; u < 4; ++u) _mm512_storeu_ps(pp + r * nblk * 64 + u * 16, acc[r][u]);
          continue;
        }
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
          for (int u = 0; u < 4; ++u) {
            if (!m[u]) continue;
            const int64_t col = jb + 16 * u;
            const __m512 sc = _mm512_mul_ps(LoadScale<kScale>(S, g * N + col, m[u]), unit);
            float* y = Y + r * N + col;
            const __m512 prev = g == 0 ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(m[u], y);
            _mm512_mask_storeu_ps(y, m[u], _mm512_fmadd_ps(acc[r][u], sc, prev));
          }
      }
    }
  }
}

template <bool kE4M3, int kScale>
void Fp8Any(int64_t M, const float* X, int64_t K, const uint8_t* P, int64_t N, const void* S,
            int64_t gs, float* Y, int64_t j0, int64_t j1) {
  switch (M) {
    case 1: return Fp8Small<1, kE4M3, kScale>(X, K, P, N, S, gs, Y, j0, j1);
    case 2: return Fp8Small<2, kE4M3, kScale>(X, K, P, N, S, gs, Y, j0, j1);
    case 3: return Fp8Small<3, kE4M3, kScale>(X, K, P, N, S, gs, Y, j0, j1);
    case 4: return Fp8Small<4, kE4M3, kScale>(X, K, P, N, S, gs, Y, j0, j1);
    case 5: return Fp8Small<5, kE4M3, kScale>(X, K, P, N, S, gs, Y, j0, j1);
    case 6: return Fp8Small<6, kE4M3, kScale>(X, K, P, N, S, gs, Y, j0, j1);
    case 7: return Fp8Small<7, kE4M3, kScale>(X, K, P, N, S, gs, Y, j0, j1);
    default: return Fp8Small<8, kE4M3, kScale>(X, K, P, N, S, gs, Y, j0, j1);
  }
}

// The codes arrive in their own dtype (F8E4M3FN or F8E5M2, which picks the
// decode): a bitcast to uint8 on the jax side would copy the weight per call.
ffi::Error Fp8GemvImpl(ffi::Buffer<ffi::F32> x, ffi::AnyBuffer codes, ffi::AnyBuffer scale,
                       ffi::ResultBuffer<ffi::F32> y, int64_t group, int64_t threads) {
  const auto xd = x.dimensions();
  const auto cd = codes.dimensions();
  const auto sd = scale.dimensions();
  const auto yd = y->dimensions();
  const bool e4m3 = codes.element_type() == ffi::DataType::F8E4M3FN;
  if (!e4m3 && codes.element_type() != ffi::DataType::F8E5M2)
    return ffi::Error::InvalidArgument("jqx_fp8_gemv: codes must be F8E4M3FN or F8E5M2");
  if (xd.size() != 2 || cd.size() != 2 || sd.size() != 2 || yd.size() != 2)
    return ffi::Error::InvalidArgument(
        "jqx_fp8_gemv: expected x (M, K), codes (K, N), scale (K/g, N), y (M, N)");
  const int kind = ScaleKindOf(scale, /*e4m3_ok=*/false);
  if (kind < 0) return ffi::Error::InvalidArgument("jqx_fp8_gemv: scale must be F32 or F8E8M0FNU");
  const bool e8m0 = kind == kScaleE8M0;
  const uint8_t* C = static_cast<const uint8_t*>(codes.untyped_data());
  const int64_t M = xd[0], K = xd[1], N = yd[1];
  if (cd[0] != K || cd[1] != N || yd[0] != M || group <= 0 || K % group != 0 ||
      sd[0] != K / group || sd[1] != N || M > kW4MaxRows)
    return ffi::Error::InvalidArgument("jqx_fp8_gemv: inconsistent shapes");
  if (M == 0 || N == 0) return ffi::Error::Success();
  float* Y = y->typed_data();
  if (K == 0) {
    memset(Y, 0, static_cast<size_t>(M * N) * sizeof(float));
    return ffi::Error::Success();
  }
  const int64_t cols = GemvChunkCols(M, K, N, threads);
  Parallel((N + cols - 1) / cols, [&](int64_t i) {
    const int64_t j0 = i * cols, j1 = std::min(N, (i + 1) * cols);
    for (int64_t r0 = 0; r0 < M; r0 += kW4BlockRows) {
      const int64_t rows = std::min(kW4BlockRows, M - r0);
      const float* xr = x.typed_data() + r0 * K;
      const void* S = scale.untyped_data();
      if (e4m3)
        (e8m0 ? Fp8Any<true, kScaleE8M0> : Fp8Any<true, kScaleF32>)(rows, xr, K, C, N, S, group,
                                                                    Y + r0 * N, j0, j1);
      else
        (e8m0 ? Fp8Any<false, kScaleE8M0> : Fp8Any<false, kScaleF32>)(rows, xr, K, C, N, S,
                                                                      group, Y + r0 * N, j0, j1);
    }
  });
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------
// jqx_w8a8_vnni: W8A8 y (M, N) f32 = (xs[m] * ws[n]) applied to the exact int32
// sums of codes(x) (M, K) . w (K, N) int8, with the activation quantization
// inside the call, on the VNNI tiles above. The quantizer (its scalar formulas
// in w8a8.h) and the rescale are conv_int8.cc's (and so jqx.ops' XLA W8A8
// path's), bit for bit: per row (or
// one for all of x, or a static one) s = max|x| * (1/127), 1 for an all-zero
// row; code = round_half_even((x * c) * (1 / (s * c))) clamped to [-128, 127],
// c = 2^-64 above 2^100; y = (float(sum) * s) * ws[n]. Each chunk of rows writes
// its codes (plus 128, VNNI's unsigned operand) into a per-thread buffer, runs
// the register tiles over every panel group and rescales each tile as it leaves
// the registers: x is read once, its codes and the int32 sums stay in cache, and
// XLA runs no pass over x or over the sums. The weight is packed per call as
// for jqx_int8_gemm, or comes packed (a 3-D w).
//
// mode kTwoLevel is int8 weight-only's product (native.two_level_matmul): each row
// of x gives two code rows (its two-level split, QuantizeTwoLevelU8), the tiles run
// 2M rows, and each pair is rescaled into one row of y (RescalePair).

// max|x|, inf where x holds a NaN (numerics.nan_max; max_ps alone would drop it).
float RowAbsMax(const float* x, int64_t n) {
  __m512 m = _mm512_setzero_ps();
  __mmask16 nan = 0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_abs_ps(_mm512_loadu_ps(x + i));
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    m = _mm512_max_ps(m, v);
  }
  if (i < n) {
    const __mmask16 k = static_cast<__mmask16>((1u << (n - i)) - 1);
    const __m512 v = _mm512_abs_ps(_mm512_maskz_loadu_ps(k, x + i));
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    m = _mm512_max_ps(m, v);
  }
  return nan != 0 ? INFINITY : _mm512_reduce_max_ps(m);
}

// n floats -> n codes + 128 (uint8); bytes [n, kp) are 128 (code 0). A NaN's
// code is 0, as XLA converts NaN to an integer: cvtps gives 0x80000000, whose
// low byte after the + 128 is 128.
// With ``off`` 0 the bytes are the signed codes themselves (rows for the AMX
// tiles' signed product; NaN's 0x80000000 truncates to 0x00, code 0 too).
// Returns whether x holds a NaN (a static scale then becomes NaN for the row:
// numerics.keep_nan_rows).
bool QuantizeRowU8(const float* x, uint8_t* dst, int64_t n, int64_t kp, float s, int off_v) {
  const Quant qs = QuantOf(s);
  const __m512 c = _mm512_set1_ps(qs.c), inv = _mm512_set1_ps(qs.inv);
  const __m512 lo = _mm512_set1_ps(-128.0f), hi = _mm512_set1_ps(127.0f);
  const __m512i off = _mm512_set1_epi32(off_v);
  __mmask16 nan = 0;
  int64_t i = 0;
  for (; i < n; i += 16) {
    const int64_t m = std::min<int64_t>(16, n - i);
    const __mmask16 k = static_cast<__mmask16>(m == 16 ? 0xFFFF : (1u << m) - 1);
    const __m512 xv = _mm512_maskz_loadu_ps(k, x + i);
    nan |= _mm512_cmp_ps_mask(xv, xv, _CMP_UNORD_Q);
    __m512 v = _mm512_mul_ps(_mm512_mul_ps(xv, c), inv);
    v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v = _mm512_min_ps(hi, _mm512_max_ps(lo, v));
    const __m512i q = _mm512_add_epi32(_mm512_cvtps_epi32(v), off);
    _mm_mask_storeu_epi8(dst + i, k, _mm512_cvtepi32_epi8(q));
  }
  for (int64_t j = n; j < kp; ++j) dst[j] = static_cast<uint8_t>(off_v);
  return nan != 0;
}

// int8 weight-only's two-level split of n floats (jqx.ops.impl_xla.two_level_split,
// numerics.two_level_scales): level 1 codes q1 under s1; the residual x - q1 * s1
// (q1 * s1 is exact, so one rounding, fused or not; a NaN's code counts as 0); its
// codes q2 under s2 = s1 * 2^-8. Each plus ``off_v`` (128, or 0 for the AMX tiles'
// signed rows, as QuantizeRowU8) into d1 and d2; bytes [n, kp) code 0.
void QuantizeTwoLevelU8(const float* x, uint8_t* d1, uint8_t* d2, int64_t n, int64_t kp,
                        float s1, float s2, int off_v) {
  const Quant q1 = QuantOf(s1), q2 = QuantOf(s2);
  const __m512 c1 = _mm512_set1_ps(q1.c), inv1 = _mm512_set1_ps(q1.inv);
  const __m512 c2 = _mm512_set1_ps(q2.c), inv2 = _mm512_set1_ps(q2.inv);
  const __m512 sv = _mm512_set1_ps(s1);
  const __m512 lo = _mm512_set1_ps(-128.0f), hi = _mm512_set1_ps(127.0f);
  const __m512i off = _mm512_set1_epi32(off_v);
  for (int64_t i = 0; i < n; i += 16) {
    const int64_t m = std::min<int64_t>(16, n - i);
    const __mmask16 k = static_cast<__mmask16>(m == 16 ? 0xFFFF : (1u << m) - 1);
    const __m512 xv = _mm512_maskz_loadu_ps(k, x + i);
    __m512 v = _mm512_mul_ps(_mm512_mul_ps(xv, c1), inv1);
    v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v = _mm512_min_ps(hi, _mm512_max_ps(lo, v));
    v = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(v, v, _CMP_ORD_Q), v);  // NaN -> 0
    _mm_mask_storeu_epi8(d1 + i, k,
                         _mm512_cvtepi32_epi8(_mm512_add_epi32(_mm512_cvtps_epi32(v), off)));
    const __m512 r = _mm512_sub_ps(xv, _mm512_mul_ps(v, sv));
    __m512 u = _mm512_mul_ps(_mm512_mul_ps(r, c2), inv2);
    u = _mm512_roundscale_ps(u, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    u = _mm512_min_ps(hi, _mm512_max_ps(lo, u));
    _mm_mask_storeu_epi8(d2 + i, k,
                         _mm512_cvtepi32_epi8(_mm512_add_epi32(_mm512_cvtps_epi32(u), off)));
  }
  for (int64_t j = n; j < kp; ++j) d1[j] = d2[j] = static_cast<uint8_t>(off_v);
}

// numerics.two_level_scales: the row's scale rounded up to 16 significant bits (s1),
// and s1 * 2^-8.
inline float FirstScale(float s) {
  uint32_t b;
  memcpy(&b, &s, sizeof b);
  b = (b + 0xFFu) & 0xFFFFFF00u;  // inf and NaN stay
  memcpy(&s, &b, sizeof s);
  return s;
}
constexpr float kTwoLevelStep = 1.0f / 256.0f;
inline float SecondScale(float s1) { return s1 * kTwoLevelStep; }

struct W8A8Job {
  const float* x;     // (M, K)
  const int8_t* bp;   // packed weight, [np][Kp/4][64]
  const int32_t* corr;  // (np * 16): -128 * column sums of the packed weight
  const float* ws;    // (np * 16): weight scales, zero beyond N
  float* y;           // (M, N)
  const float* bias;  // (np * 16): the epilogue's bias, zero beyond N; or null
  int64_t act;        // the epilogue's activation (epilogue.h's EpAct)
  int64_t M, K, Kp, N, np;
  int64_t mode;
  float scale;         // static / per tensor: the one activation scale
  int64_t chunk_rows;  // rows of x per chunk; times levels, a multiple of MR
  int64_t levels;      // code rows per row of x: 2 for kTwoLevel (row 2r: q1, 2r + 1: q2)
  bool amx;            // UseAmx(), read once per call: the codes' form depends on it
};

// How many leading code rows of a run of ``code_rows`` go on the AMX tiles (whole
// 16s): their codes are written signed, the others plus 128.
inline int64_t AmxCodeRows(const W8A8Job& j, int64_t code_rows) {
  return j.amx && code_rows >= 16 ? code_rows / 16 * 16 : 0;
}

thread_local std::vector<uint8_t> t_w8a8_a;
thread_local std::vector<float> t_w8a8_s;

// One row of a W8A8 tile leaving the registers: cols int32 sums (64-byte aligned)
// to y = (float(sum) * xs) * ws, the XLA path's order; then the epilogue (``bias``, the
// same columns', or null; ``act``).
inline void RescaleRow(const int32_t* sums, float xs, const float* ws, float* dst, int cols,
                       const float* bias, int64_t act) {
  const __m512 sv = _mm512_set1_ps(xs);
  for (int c0 = 0; c0 < cols; c0 += 16) {
    const int m = std::min(16, cols - c0);
    const __mmask16 k = static_cast<__mmask16>(m == 16 ? 0xFFFF : (1u << m) - 1);
    const __m512 acc = _mm512_cvtepi32_ps(_mm512_load_si512(static_cast<const void*>(sums + c0)));
    __m512 y = _mm512_mul_ps(_mm512_mul_ps(acc, sv), _mm512_loadu_ps(ws + c0));
    if (bias != nullptr || act != kEpNone)
      y = EpilogueVector(y, bias == nullptr ? nullptr : bias + c0, k, act);
    _mm512_mask_storeu_ps(dst + c0, k, y);
  }
}

// Two code rows of one row of x leaving the registers (kTwoLevel): y = ((float(sum1)
// + float(sum2) * 2^-8) * s1) * ws, two_level_split's order (the product by 2^-8 is
// exact, so the add rounds once, as XLA's, fused or not); then the epilogue.
inline void RescalePair(const int32_t* sums1, const int32_t* sums2, float s1, const float* ws,
                        float* dst, int cols, const float* bias, int64_t act) {
  const __m512 sv = _mm512_set1_ps(s1), step = _mm512_set1_ps(kTwoLevelStep);
  for (int c0 = 0; c0 < cols; c0 += 16) {
    const int m = std::min(16, cols - c0);
    const __mmask16 k = static_cast<__mmask16>(m == 16 ? 0xFFFF : (1u << m) - 1);
    const __m512 a1 = _mm512_cvtepi32_ps(_mm512_load_si512(static_cast<const void*>(sums1 + c0)));
    const __m512 a2 = _mm512_cvtepi32_ps(_mm512_load_si512(static_cast<const void*>(sums2 + c0)));
    const __m512 y0 = _mm512_mul_ps(_mm512_add_ps(a1, _mm512_mul_ps(a2, step)), sv);
    __m512 y = _mm512_mul_ps(y0, _mm512_loadu_ps(ws + c0));
    if (bias != nullptr || act != kEpNone)
      y = EpilogueVector(y, bias == nullptr ? nullptr : bias + c0, k, act);
    _mm512_mask_storeu_ps(dst + c0, k, y);
  }
}

// ``nr`` code rows (rb, rb + 1, ... of the call's code rows from r0) of a tile
// (row stride ``ts``, columns from panel p) into y: one row of y each, or, with two
// levels, one per pair (rb and nr even).
inline void RescaleTile(const W8A8Job& j, const int32_t* t, int64_t ts, int nr, const float* xs,
                        int64_t r0, int64_t rb, int64_t p, int cols) {
  const float* ws = j.ws + p * 16;
  const float* bias = j.bias == nullptr ? nullptr : j.bias + p * 16;
  if (j.levels == 1) {
    for (int r = 0; r < nr; ++r)
      RescaleRow(t + r * ts, xs[rb + r], ws, j.y + (r0 + rb + r) * j.N + p * 16, cols, bias,
                 j.act);
    return;
  }
  for (int r = 0; r < nr; r += 2)
    RescalePair(t + r * ts, t + (r + 1) * ts, xs[rb + r], ws,
                j.y + (r0 + rb + r) / 2 * j.N + p * 16, cols, bias, j.act);
}

// Code rows [r0, r0 + rows) over panels [p0, p1) (p0 a multiple of NB), from the
// rows' codes ``a`` (rows x Kp: the first AmxCodeRows signed, for the tiles; the
// others plus 128, for the registers) and scales ``xs``, into y (code row r is row r
// / levels of y; with two levels r0 and rows are even).
void W8A8Panels(const W8A8Job& j, const uint8_t* a, const float* xs, int64_t r0, int64_t rows,
                int64_t p0, int64_t p1) {
  const int64_t kq_n = j.Kp / 4;
  const int64_t pstride = kq_n * 64;
  const int64_t done = AmxCodeRows(j, rows);  // rows run on the AMX tiles: signed codes
  if (done > 0) {
    AmxScope scope;
    for (int64_t p = p0; p < p1; p += 2) {
      const int ct = static_cast<int>(std::min<int64_t>(2, p1 - p));
      const int cols = static_cast<int>(std::min<int64_t>(j.N - p * 16, ct * 16));
      AmxRows(a, j.Kp, done, j.bp + p * pstride, pstride, j.Kp, ct, nullptr, nullptr, 0,
              [&](int nr, int64_t rb, const int32_t* t) {
                // The VNNI path's int32 sums, rescaled as it rescales them.
                RescaleTile(j, t, 32, nr, xs, r0, rb, p, cols);
              });
    }
    if (done == rows) return;
  }
  alignas(64) int32_t tile[MR * NB * 16];
  for (int64_t p = p0; p < p1; p += NB) {
    const int64_t nbh = std::min<int64_t>(NB, p1 - p);
    const int cols = static_cast<int>(std::min<int64_t>(j.N - p * 16, nbh * 16));
    const int8_t* bpp = j.bp + p * pstride;
    for (int64_t rb = done; rb < rows; rb += MR) {
      const int rr = static_cast<int>(std::min<int64_t>(MR, rows - rb));
      const uint8_t* ar = a + rb * j.Kp;
      if (nbh == NB) {
        MicroRows<NB>(rr, ar, j.Kp, bpp, kq_n, pstride, j.corr + p * 16, tile, NB * 16, NB * 16);
      } else {
        for (int64_t q = 0; q < nbh; ++q)
          MicroRows<1>(rr, ar, j.Kp, bpp + q * pstride, kq_n, pstride, j.corr + (p + q) * 16,
                       tile + q * 16, NB * 16, 16);
      }
      RescaleTile(j, tile, NB * 16, rr, xs, r0, rb, p, cols);
    }
  }
}

// The code rows and scales of rows [r0, r0 + rows) of x into ``a`` and ``xs``
// (levels per row): signed for the leading code rows the AMX tiles run
// (AmxCodeRows of the run W8A8Panels is given), plus 128 for the others.
void W8A8Quantize(const W8A8Job& j, int64_t r0, int64_t rows, uint8_t* a, float* xs) {
  const int64_t amx_rows = AmxCodeRows(j, rows * j.levels);
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = j.x + (r0 + r) * j.K;
    const int off = r * j.levels < amx_rows ? 0 : 128;  // amx_rows is even
    if (j.levels == 2) {
      const float s1 = FirstScale(DynamicScale(RowAbsMax(xr, j.K))), s2 = SecondScale(s1);
      xs[2 * r] = s1;  // the pair's rescale reads s1 alone (RescalePair); xs[2r + 1] unused
      QuantizeTwoLevelU8(xr, a + 2 * r * j.Kp, a + (2 * r + 1) * j.Kp, j.K, j.Kp, s1, s2, off);
      continue;
    }
    const float s = j.mode == kPerSample ? DynamicScale(RowAbsMax(xr, j.K)) : j.scale;
    const bool has_nan = QuantizeRowU8(xr, a + r * j.Kp, j.K, j.Kp, s, off);
    xs[r] = j.mode == kStatic && has_nan ? NAN : s;  // numerics.keep_nan_rows
  }
}

// Rows of x per chunk of a call of Mc code rows on up to t_max threads: up to 8 row
// blocks of code rows (48; on the AMX tiles 4 blocks of 32), fewer when that leaves
// under 4 chunks per thread; rows are the only split, so the result does not depend
// on it. MR and 32 are even: a chunk holds whole pairs of code rows.
inline int64_t ChunkRows(int64_t Mc, int64_t t_max, int64_t levels, bool amx) {
  const int64_t unit = amx ? 32 : MR;
  const int64_t per_thread = std::max<int64_t>(1, Mc / (4 * unit * t_max));
  return unit * std::min<int64_t>(unit == MR ? 8 : 4, per_thread) / levels;
}

void W8A8Chunk(const void* ctx, int64_t chunk) {
  const W8A8Job& j = *static_cast<const W8A8Job*>(ctx);
  const int64_t r0 = chunk * j.chunk_rows;
  const int64_t rows = std::min(j.M, r0 + j.chunk_rows) - r0;
  const int64_t code_rows = rows * j.levels;
  // The chunk's codes (a last, partial row block reads only its own rows).
  if (t_w8a8_a.size() < static_cast<size_t>(code_rows * j.Kp))
    t_w8a8_a.resize(static_cast<size_t>(code_rows * j.Kp));
  if (t_w8a8_s.size() < static_cast<size_t>(code_rows))
    t_w8a8_s.resize(static_cast<size_t>(code_rows));
  W8A8Quantize(j, r0, rows, t_w8a8_a.data(), t_w8a8_s.data());
  W8A8Panels(j, t_w8a8_a.data(), t_w8a8_s.data(), r0 * j.levels, code_rows, 0, j.np);
}

// The weight side of a call, per calling thread, kept across calls: -128 * the
// column sums of the packed panels, and the scales and the bias padded with zeros to
// whole panels (np * 16), as the rescale reads them.
struct W8A8Side {
  std::vector<int32_t> corr;
  std::vector<float> ws, bias;
};

// ``n`` floats from ``src`` into ``v``, zeros up to np * 16; null for a null src.
inline const float* PadPanels(std::vector<float>& v, const float* src, int64_t n, int64_t np) {
  if (src == nullptr) return nullptr;
  if (v.size() < static_cast<size_t>(np * 16)) v.resize(static_cast<size_t>(np * 16));
  std::copy(src, src + n, v.begin());
  std::fill(v.begin() + n, v.begin() + np * 16, 0.0f);
  return v.data();
}

// ``side``'s buffers for a packed (np panels) weight with scales ``wscale`` and
// ``bias`` (null: none); a job's weight-side fields (corr: the sums still to compute).
inline void PrepareSide(W8A8Side& side, const int8_t* bp, int64_t N, const float* wscale,
                        const float* bias, W8A8Job& j) {
  if (side.corr.size() < static_cast<size_t>(j.np * 16))
    side.corr.resize(static_cast<size_t>(j.np * 16));
  j.bp = bp;
  j.corr = side.corr.data();
  j.ws = PadPanels(side.ws, wscale, N, j.np);
  j.bias = PadPanels(side.bias, bias, N, j.np);
}

thread_local W8A8Side t_w8a8_side;

// The body of jqx_w8a8_vnni: ``wp`` is the packed weight, or null (then ``w``
// (K, N) is packed here, per call); ``bias`` (N, or null) and ``act``: the epilogue
// (epilogue.h) on each output after its rescale.
ffi::Error W8A8Vnni(const float* X, int64_t M, int64_t K, const int8_t* w, const int8_t* wp,
                    int64_t N, const float* wscale, const float* act_scale, float* Y,
                    int64_t mode, int64_t threads, const float* bias, int64_t act) {
  if (M == 0 || N == 0) return ffi::Error::Success();
  if (K == 0) {  // empty sums: (0 * s) * ws[n], s = 1 for an empty row (or the static one)
    const float s = mode == kStatic ? act_scale[0] : 1.0f;
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n)
        Y[m * N + n] = mode == kTwoLevel ? ((0.0f + 0.0f * kTwoLevelStep) * s) * wscale[n]
                                         : (0.0f * s) * wscale[n];
    if (bias != nullptr || act != kEpNone) EpilogueRows(Y, M, N, bias, act);
    return ffi::Error::Success();
  }
  const int64_t Kp = (K + 3) / 4 * 4;
  const int64_t np = (N + 15) / 16;
  const int64_t kq_n = Kp / 4;
  // Code rows per row of x, and in all: the GEMM's rows.
  const int64_t levels = mode == kTwoLevel ? 2 : 1;
  const int64_t Mc = M * levels;
  threads = std::min<int64_t>(threads, GetPool()->threads());
  const int64_t t_max = std::max<int64_t>(1, std::min<int64_t>(threads, Mc * N * Kp / (1 << 21)));
  const int8_t* Bp = wp;
  if (Bp == nullptr) {  // the packed weight, per call
    thread_local PackBuffer packed;
    Bp = PackWeight(w, K, N, packed, t_max);
    if (Bp == nullptr) return ffi::Error::Internal("jqx_w8a8_vnni: out of memory");
  }
  float scale = 1.0f;
  if (mode == kStatic) scale = act_scale[0];
  if (mode == kPerTensor) scale = DynamicScale(RowAbsMax(X, M * K));
  const bool amx = UseAmx();
  // The job's fields but the chunking (set below) and the weight side (PrepareSide).
  W8A8Job job{X, nullptr, nullptr, nullptr, Y, nullptr, act, M, K, Kp, N, np, mode, scale,
              M, levels, amx};
  PrepareSide(t_w8a8_side, Bp, N, wscale, bias, job);
  int32_t* corr = t_w8a8_side.corr.data();
  // Per panel, -128 * its column sums: only code rows on the VNNI registers (plus 128)
  // read them; rows on the AMX tiles are signed (AmxCodeRows). Every chunk's code rows
  // but the last are a multiple of 32 on the tiles, so the sums are needed only where
  // the tiles do not run or Mc leaves rows over a multiple of 16.
  const bool need_sums = !amx || Mc % 16 != 0;
  const auto col_sums = [&](int64_t q0, int64_t q1) {
    if (need_sums) PanelSums(Bp + q0 * kq_n * 64, q1 - q0, q1 - q0, kq_n, corr + q0 * 16);
  };
  if (Mc <= kW8A8PanelRows && Mc * N * Kp >= kPanelSplitWork && threads > 1) {
    // Decode-sized: x quantized once here, the threads split the panels (an even
    // split in whole groups of NB), each summing its panels' columns right
    // before it reads them again (from cache): the weight is streamed once.
    if (t_w8a8_a.size() < static_cast<size_t>(Mc * Kp))
      t_w8a8_a.resize(static_cast<size_t>(Mc * Kp));
    if (t_w8a8_s.size() < static_cast<size_t>(Mc)) t_w8a8_s.resize(static_cast<size_t>(Mc));
    const uint8_t* a = t_w8a8_a.data();
    const float* xs = t_w8a8_s.data();
    W8A8Quantize(job, 0, M, t_w8a8_a.data(), t_w8a8_s.data());
    const int64_t ng = (np + NB - 1) / NB;
    const int64_t t = std::min<int64_t>(threads, ng);
    Parallel(t, [&](int64_t i) {
      const int64_t q0 = std::min(np, ng * i / t * NB), q1 = std::min(np, ng * (i + 1) / t * NB);
      col_sums(q0, q1);
      W8A8Panels(job, a, xs, 0, Mc, q0, q1);
    });
    return ffi::Error::Success();
  }
  const int64_t tc = std::min<int64_t>(t_max, np);
  if (need_sums) Parallel(tc, [&](int64_t i) { col_sums(np * i / tc, np * (i + 1) / tc); });
  job.chunk_rows = ChunkRows(Mc, t_max, levels, amx);
  const int64_t chunks = (M + job.chunk_rows - 1) / job.chunk_rows;
  if (t_max <= 1) {
    for (int64_t c = 0; c < chunks; ++c) W8A8Chunk(&job, c);
  } else {
    GetPool()->Run(W8A8Chunk, &job, chunks);
  }
  return ffi::Error::Success();
}

// jqx_w8a8_mlp: two dense layers in one call, y = (act(x . w1 + b1)) . w2 + b2, each
// product as jqx_w8a8_vnni computes it (same mode for both: per-row dynamic W8A8, a
// static scale each, or int8 weight-only's two levels), so y equals the two calls'
// result bit for bit. Each chunk of rows runs both layers: its hidden rows (chunk x F
// floats) go to a per-thread buffer, are quantized again from there and multiplied
// by w2 while they are in cache. Neither the hidden activations nor their codes are
// ever written to memory XLA allocates: the call's only output is y. Each weight comes
// packed (pack_int8's panels) or as (K, N) codes, packed here per call.
struct MlpJob {
  W8A8Job s1, s2;      // the two layers; x, y and M are set per chunk
  int64_t chunk_rows;  // rows of x per chunk
  int64_t M;
};

thread_local std::vector<float> t_mlp_h;
thread_local W8A8Side t_mlp_side2;

void MlpChunk(const void* ctx, int64_t chunk) {
  const MlpJob& m = *static_cast<const MlpJob*>(ctx);
  const int64_t r0 = chunk * m.chunk_rows;
  const int64_t rows = std::min(m.M, r0 + m.chunk_rows) - r0;
  const int64_t code_rows = rows * m.s1.levels;
  const size_t codes = static_cast<size_t>(code_rows * std::max(m.s1.Kp, m.s2.Kp));
  if (t_w8a8_a.size() < codes) t_w8a8_a.resize(codes);
  if (t_w8a8_s.size() < static_cast<size_t>(code_rows))
    t_w8a8_s.resize(static_cast<size_t>(code_rows));
  if (t_mlp_h.size() < static_cast<size_t>(rows * m.s1.N))
    t_mlp_h.resize(static_cast<size_t>(rows * m.s1.N));
  W8A8Job j1 = m.s1;
  j1.x += r0 * j1.K;
  j1.y = t_mlp_h.data();
  j1.M = rows;
  W8A8Quantize(j1, 0, rows, t_w8a8_a.data(), t_w8a8_s.data());
  W8A8Panels(j1, t_w8a8_a.data(), t_w8a8_s.data(), 0, code_rows, 0, j1.np);
  W8A8Job j2 = m.s2;
  j2.x = t_mlp_h.data();
  j2.y += r0 * j2.N;
  j2.M = rows;
  W8A8Quantize(j2, 0, rows, t_w8a8_a.data(), t_w8a8_s.data());
  W8A8Panels(j2, t_w8a8_a.data(), t_w8a8_s.data(), 0, code_rows, 0, j2.np);
}

// The body of jqx_w8a8_mlp on checked operands: x (M, K), w1 (K -> F) and w2 (F -> N)
// packed, or null and their (K, N) codes in plain1 / plain2, their scales, static
// activation scales (kStatic), biases (null: none), ``act``: the activation between the
// layers.
ffi::Error W8A8Mlp(const float* X, int64_t M, int64_t K, int64_t F, int64_t N,
                   const int8_t* w1, const int8_t* plain1, const float* ws1, const float* as1,
                   const float* b1, const int8_t* w2, const int8_t* plain2, const float* ws2,
                   const float* as2, const float* b2, float* Y, int64_t mode, int64_t threads,
                   int64_t act) {
  if (M == 0 || N == 0) return ffi::Error::Success();
  const int64_t levels = mode == kTwoLevel ? 2 : 1;
  const int64_t Mc = M * levels;
  const int64_t K1p = (K + 3) / 4 * 4, Fp = (F + 3) / 4 * 4;
  const int64_t np1 = (F + 15) / 16, np2 = (N + 15) / 16;
  threads = std::min<int64_t>(threads, GetPool()->threads());
  const int64_t work = std::max(Mc * F * K1p, Mc * N * Fp);
  const int64_t t_max = std::max<int64_t>(1, std::min<int64_t>(threads, work / (1 << 21)));
  if (w1 == nullptr || w2 == nullptr) {  // plain (K, N) codes: packed per call
    thread_local PackBuffer packed1, packed2;
    if (w1 == nullptr) w1 = PackWeight(plain1, K, F, packed1, t_max);
    if (w2 == nullptr) w2 = PackWeight(plain2, F, N, packed2, t_max);
    if (w1 == nullptr || w2 == nullptr) return ffi::Error::Internal("jqx_w8a8_mlp: out of memory");
  }
  const bool amx = UseAmx();
  const float sc1 = mode == kStatic ? as1[0] : 1.0f, sc2 = mode == kStatic ? as2[0] : 1.0f;
  MlpJob job{{X, nullptr, nullptr, nullptr, nullptr, nullptr, act, M, K, K1p, F, np1, mode,
              sc1, M, levels, amx},
             {nullptr, nullptr, nullptr, nullptr, Y, nullptr, kEpNone, M, F, Fp, N, np2, mode,
              sc2, M, levels, amx},
             ChunkRows(Mc, t_max, levels, amx),
             M};
  PrepareSide(t_w8a8_side, w1, F, ws1, b1, job.s1);
  PrepareSide(t_mlp_side2, w2, N, ws2, b2, job.s2);
  if (!amx || Mc % 16 != 0) {  // the column sums, as W8A8Vnni needs them
    const int64_t tc = std::min<int64_t>(t_max, np1 + np2);
    int32_t* corr[2] = {t_w8a8_side.corr.data(), t_mlp_side2.corr.data()};
    Parallel(tc, [&](int64_t i) {
      for (int64_t q = (np1 + np2) * i / tc; q < (np1 + np2) * (i + 1) / tc; ++q) {
        const int s = q < np1 ? 0 : 1;
        const W8A8Job& j = s == 0 ? job.s1 : job.s2;
        const int64_t p = s == 0 ? q : q - np1;
        PanelSums(j.bp + p * (j.Kp / 4) * 64, 1, 1, j.Kp / 4, corr[s] + p * 16);
      }
    });
  }
  const int64_t chunks = (M + job.chunk_rows - 1) / job.chunk_rows;
  if (t_max <= 1) {
    for (int64_t c = 0; c < chunks; ++c) MlpChunk(&job, c);
  } else {
    GetPool()->Run(MlpChunk, &job, chunks);
  }
  return ffi::Error::Success();
}

ffi::Error W8A8MlpImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w1,
                       ffi::Buffer<ffi::F32> ws1, ffi::Buffer<ffi::F32> as1,
                       ffi::Buffer<ffi::F32> b1, ffi::Buffer<ffi::S8> w2,
                       ffi::Buffer<ffi::F32> ws2, ffi::Buffer<ffi::F32> as2,
                       ffi::Buffer<ffi::F32> b2, ffi::ResultBuffer<ffi::F32> out, int64_t mode,
                       int64_t threads, int64_t activation, ffi::ThreadPool xla_pool) {
  XlaPoolScope xla_scope(xla_pool, RowsOf(x.dimensions()) > kXlaPoolRows);
  const auto xd = x.dimensions(), d1 = w1.dimensions(), d2 = w2.dimensions();
  const auto od = out->dimensions();
  if (xd.size() != 2 || (d1.size() != 3 && d1.size() != 2) || (d2.size() != 3 && d2.size() != 2) ||
      od.size() != 2 || ws1.dimensions().size() != 1 || ws2.dimensions().size() != 1)
    return ffi::Error::InvalidArgument(
        "jqx_w8a8_mlp: expected x (M, K), w1 and w2 packed or (K, N), scales (F) and (N), out "
        "(M, N)");
  const int64_t M = xd[0], K = xd[1], F = ws1.dimensions()[0], N = od[1];
  const int64_t e1 = b1.dimensions()[0], e2 = b2.dimensions()[0];
  // A weight is (K, N) codes, or pack_int8's (ceil(N/16), ceil(K/4), 64) panels.
  const auto fits = [](const auto& d, int64_t k, int64_t n) {
    return d.size() == 2 ? d[0] == k && d[1] == n
                         : d[0] == (n + 15) / 16 && d[1] == (k + 3) / 4 && d[2] == 64;
  };
  if (od[0] != M || K == 0 || F == 0 || !fits(d1, K, F) || !fits(d2, F, N) ||
      ws2.dimensions()[0] != N || (e1 != 0 && e1 != F) || (e2 != 0 && e2 != N) ||
      (mode != kStatic && mode != kPerSample && mode != kTwoLevel) ||
      (mode == kStatic && (as1.element_count() != 1 || as2.element_count() != 1)) ||
      activation < kEpNone || activation > kEpRelu)
    return ffi::Error::InvalidArgument("jqx_w8a8_mlp: inconsistent shapes, mode or activation");
  const bool packed1 = d1.size() == 3, packed2 = d2.size() == 3;
  return W8A8Mlp(x.typed_data(), M, K, F, N, packed1 ? w1.typed_data() : nullptr,
                 packed1 ? nullptr : w1.typed_data(), ws1.typed_data(), as1.typed_data(),
                 e1 == 0 ? nullptr : b1.typed_data(), packed2 ? w2.typed_data() : nullptr,
                 packed2 ? nullptr : w2.typed_data(), ws2.typed_data(), as2.typed_data(),
                 e2 == 0 ? nullptr : b2.typed_data(), out->typed_data(), mode, threads,
                 activation);
}

// w is the (K, N) weight, or (3-D) the weight already packed
// (jqx.kernels.cpu.native.pack_int8): (ceil(N/16), ceil(K/4), 64); N is out's.
// ``bias``: (N,), or (0,) for none; ``activation``: the epilogue's (epilogue.h).
ffi::Error W8A8VnniImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w,
                        ffi::Buffer<ffi::F32> wscale, ffi::Buffer<ffi::F32> act_scale,
                        ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> out, int64_t mode,
                        int64_t threads, int64_t activation, ffi::ThreadPool xla_pool) {
  XlaPoolScope xla_scope(xla_pool, RowsOf(x.dimensions()) > kXlaPoolRows);
  const auto bd = bias.dimensions();
  const auto od0 = out->dimensions();
  if (bd.size() != 1 || od0.size() != 2 || (bd[0] != 0 && bd[0] != od0[1]) ||
      (activation < kEpNone || activation > kEpRelu))
    return ffi::Error::InvalidArgument(
        "jqx_w8a8_vnni: the bias must be (N,) or (0,), the activation known");
  const float* E = bd[0] == 0 ? nullptr : bias.typed_data();
  if (w.dimensions().size() != 3) {
    if (auto err =
            CheckDenseW8A8("jqx_w8a8_vnni", x, w, wscale, act_scale, *out, mode, kTwoLevel);
        err.failure())
      return err;
    return W8A8Vnni(x.typed_data(), x.dimensions()[0], x.dimensions()[1], w.typed_data(),
                    nullptr, w.dimensions()[1], wscale.typed_data(), act_scale.typed_data(),
                    out->typed_data(), mode, threads, E, activation);
  }
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  const auto od = out->dimensions();
  if (xd.size() != 2 || od.size() != 2 || wscale.dimensions().size() != 1)
    return ffi::Error::InvalidArgument(
        "jqx_w8a8_vnni: expected x (M, K), packed w (ceil(N/16), ceil(K/4), 64), "
        "wscale (N), out (M, N)");
  const int64_t M = xd[0], K = xd[1], N = od[1];
  if (od[0] != M || wd[0] != (N + 15) / 16 || wd[1] != (K + 3) / 4 || wd[2] != 64 ||
      wscale.dimensions()[0] != N || mode < kStatic || mode > kTwoLevel ||
      (mode == kStatic && act_scale.element_count() != 1))
    return ffi::Error::InvalidArgument("jqx_w8a8_vnni: inconsistent shapes or mode (packed w)");
  return W8A8Vnni(x.typed_data(), M, K, nullptr, w.typed_data(), N, wscale.typed_data(),
                  act_scale.typed_data(), out->typed_data(), mode, threads, E, activation);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JqxInt8Gemm, Int8GemmImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("threads")
                                  .Ctx<ffi::ThreadPool>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JqxW8A8Vnni, W8A8VnniImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("mode")
                                  .Attr<int64_t>("threads")
                                  .Attr<int64_t>("activation")
                                  .Ctx<ffi::ThreadPool>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JqxW8A8Mlp, W8A8MlpImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("mode")
                                  .Attr<int64_t>("threads")
                                  .Attr<int64_t>("activation")
                                  .Ctx<ffi::ThreadPool>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JqxW4Gemv, W4GemvImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("group")
                                  .Attr<int64_t>("has_zero")
                                  .Attr<int64_t>("has_scale2")
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JqxFp8Gemv, Fp8GemvImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("group")
                                  .Attr<int64_t>("threads"));

// set < 0: asks; 0 or 1: turns the AMX tile path off or on. Returns whether the
// int8 GEMMs (jqx_int8_gemm, jqx_w8a8_vnni) run on the tiles now: 0 where the
// CPU or the OS has none (native.amx). Results are the same either way.
extern "C" int jqx_amx(int set) {
  if (set >= 0) g_amx_on.store(set != 0, std::memory_order_relaxed);
  return UseAmx() ? 1 : 0;
}

extern "C" int jqx_cpu_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
}

// jqx_scores_softmax_dot_avx512: softmax_dot.h's attention from q and k, sixteen floats.
XLA_FFI_DEFINE_HANDLER_SYMBOL(JqxScoresSoftmaxDotAvx512, ScoresSoftmaxDotBody<SdAvx512>,
                              JQX_SCORES_SOFTMAX_DOT_BINDING);

// jqx_softmax_dot_avx512: softmax_dot.h's kernel on sixteen-float vectors.
XLA_FFI_DEFINE_HANDLER_SYMBOL(JqxSoftmaxDotAvx512, SoftmaxDotBody<SdAvx512>,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ctx<ffi::ThreadPool>());
