// The epilogue of jqx_f32_gemm and jqx_w8a8_vnni (int8_gemm.cc's library, AVX512F):
// what a dense layer does to its product's outputs, applied to each output block while
// it is in L1 (or, in jqx_w8a8_vnni, to each rescaled vector before it is stored),
//
//   y[m, n] = act(c[m, n] + bias[n])     (the add only where a bias is given),
//
// with act one of
//
// - kEpNone: the identity. y is then the bits of XLA's c + bias (one rounding).
// - kEpGeluErf: jax.nn.gelu(x, approximate=False) as jax traces it,
//     (0.5 x) * erfc((-x) * 0.70710677f),
//   with every multiply rounded as there; only erfc differs from XLA's: ErfcAvx512
//   below (Cephes' float erfc, with exp(-x^2) carried to ~1 ulp), within 8 ulps of
//   the exact erfc of that float argument (docs/internals/native-kernels.md states the
//   measured bound, tests/_gelu_check.py checks it).
// - kEpGeluTanh: jax.nn.gelu(x) (approximate=True, flax's default) as jax traces it,
//     x * (0.5 * (1 + tanh(0.79788456f * (x + 0.044715f * (x * (x * x)))))),
//   each operation rounded as there; only tanh differs: TanhAvx512 below (Cephes'
//   float tanh), within 2 ulps of the exact tanh of its float argument.
// - kEpRelu: jax.nn.relu(x), max(x, 0) as XLA computes it, bit for bit: x where x > 0
//   or NaN, else +0 (-0 too).

#ifndef JQX_KERNELS_CPU_EPILOGUE_H_
#define JQX_KERNELS_CPU_EPILOGUE_H_

#include <immintrin.h>
#include <stdint.h>

#include <algorithm>

#include "softmax_dot.h"

namespace {

enum EpAct : int64_t { kEpNone = 0, kEpGeluErf = 1, kEpGeluTanh = 2, kEpRelu = 3 };

#ifdef __AVX512F__

// c[0] x^(n-1) + ... + c[n-1], Horner with fused multiply-adds.
template <int n>
inline __m512 EpPoly(__m512 x, const float (&c)[n]) {
  __m512 p = _mm512_set1_ps(c[0]);
#pragma GCC unroll 16
  for (int i = 1; i < n; ++i) p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(c[i]));
  return p;
}

// erfc(x): Cephes' single-precision erfcf, and one more piece where it cancels.
// - |x| < 0.5: 1 - x T(x^2) (Cephes' erf; erfc > 0.47 there, so little cancels).
// - 0.5 <= |x| < 1: exp(-x^2) N(|x| - 0.75), N a degree-7 fit of erfc(x) exp(x^2) on
//   [0.5, 1] (relative error 7e-10). Cephes' 1 - x T(x^2) lost up to 12 ulps there.
// - 1 <= |x| < 2: exp(-x^2) P(1/x^2) / |x|; beyond, exp(-x^2) R(1/x^2) / |x|.
// - x < 0: 2 - erfc(|x|).
// exp(-x^2) is exp(-p) (1 - e) with p = fl(x^2) and e = x^2 - p exactly (an FMA), so
// the square's rounding (up to ~87 u at the tail) does not reach the result. erfc is 0
// from x ~ 9.3 (where exp(-x^2) leaves the normal floats), 2 from -9.3; NaN stays NaN.
inline __m512 ErfcAvx512(__m512 x) {
  static constexpr float kT[] = {7.853861353153693E-5f,  -8.010193625184903E-4f,
                                 5.188327685732524E-3f,  -2.685381193529856E-2f,
                                 1.128358514861418E-1f,  -3.761262582423300E-1f,
                                 1.128379165726710E+0f};
  static constexpr float kN[] = {-0.0061851818989024235f, 0.0145977486872177f,
                                 -0.03189097099579181f,   0.06677843948810437f,
                                 -0.12983617144237414f,   0.23095828315457695f,
                                 -0.36797269114211834f,   0.5069376499966746f};
  static constexpr float kP[] = {2.326819970068386E-2f,  -1.387039388740657E-1f,
                                 3.687424674597105E-1f,  -5.824733027278666E-1f,
                                 6.210004621745983E-1f,  -4.944515323274145E-1f,
                                 3.404879937665872E-1f,  -2.741127028184656E-1f,
                                 5.638259427386472E-1f};
  static constexpr float kR[] = {-1.047766399936249E+1f, 1.297719955372516E+1f,
                                 -7.495518717768503E+0f, 2.921019019210786E+0f,
                                 -1.015265279202700E+0f, 4.218463358204948E-1f,
                                 -2.820767439740514E-1f, 5.641895067754075E-1f};
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 ax = _mm512_abs_ps(x);
  const __mmask16 small = _mm512_cmp_ps_mask(ax, _mm512_set1_ps(0.5f), _CMP_LT_OQ);
  __m512 out = _mm512_setzero_ps();
  if (small != 0) {
    const __m512 t = EpPoly(_mm512_mul_ps(x, x), kT);
    out = _mm512_mask_mov_ps(out, small, _mm512_fnmadd_ps(x, t, one));
  }
  if (small != 0xFFFF) {
    const __m512 p = _mm512_mul_ps(ax, ax);
    const __m512 e = _mm512_fmsub_ps(ax, ax, p);  // x^2 - p, exact
    __m512 z = ExpNonPositiveT<SdAvx512>(_mm512_sub_ps(_mm512_setzero_ps(), p));
    z = _mm512_fnmadd_ps(z, e, z);  // exp(-p - e) ~ exp(-p) (1 - e)
    const __mmask16 big = static_cast<__mmask16>(~small);
    const __mmask16 near = _mm512_cmp_ps_mask(ax, one, _CMP_LT_OQ) & big;
    const __mmask16 mid = _mm512_cmp_ps_mask(ax, _mm512_set1_ps(2.0f), _CMP_LT_OQ) & big & ~near;
    const __mmask16 tail = static_cast<__mmask16>(big & ~near & ~mid);  // (and NaN lanes)
    __m512 r = _mm512_setzero_ps();
    if (near != 0) {
      const __m512 n = EpPoly(_mm512_sub_ps(ax, _mm512_set1_ps(0.75f)), kN);
      r = _mm512_mask_mov_ps(r, near, _mm512_mul_ps(z, n));
    }
    if ((mid | tail) != 0) {
      const __m512 q = _mm512_div_ps(one, ax);
      const __m512 y = _mm512_mul_ps(q, q);
      __m512 poly = _mm512_setzero_ps();
      if (mid != 0) poly = _mm512_mask_mov_ps(poly, mid, EpPoly(y, kP));
      if (tail != 0) poly = _mm512_mask_mov_ps(poly, tail, EpPoly(y, kR));
      r = _mm512_mask_mov_ps(r, mid | tail, _mm512_mul_ps(_mm512_mul_ps(z, q), poly));
    }
    // 0 where exp(-x^2) is below the normal floats (x^2 > 87; x infinite too: e is NaN
    // there). NaN x: p is NaN, the comparison false, the NaN kept.
    r = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(p, _mm512_set1_ps(87.0f), _CMP_NGT_UQ), r);
    const __mmask16 neg = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
    r = _mm512_mask_sub_ps(r, neg, _mm512_set1_ps(2.0f), r);
    out = _mm512_mask_mov_ps(out, big, r);
  }
  return out;
}

// jax.nn.gelu(x, approximate=False)'s trace: (0.5 x) * erfc((-x) * 0.70710677f).
inline __m512 GeluErfAvx512(__m512 x) {
  const __m512 half = _mm512_mul_ps(_mm512_set1_ps(0.5f), x);
  const __m512 arg = _mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), x),
                                   _mm512_set1_ps(0.7071067690849304f));
  return _mm512_mul_ps(half, ErfcAvx512(arg));
}

// tanh(x), Cephes' single-precision tanhf: x + x^3 P(x^2) for |x| < 0.625; else
// (1 - t) / (1 + t) with t = exp(-2 |x|) (at most 0.29: no cancellation), with x's
// sign. Past |x| = 43.5 t stays exp(-87) and the result is +-1; NaN stays NaN.
inline __m512 TanhAvx512(__m512 x) {
  static constexpr float kP[] = {-5.70498872745E-3f, 2.06390887954E-2f, -5.37397155531E-2f,
                                 1.33314422036E-1f, -3.33332819422E-1f};
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 ax = _mm512_abs_ps(x);
  const __mmask16 small = _mm512_cmp_ps_mask(ax, _mm512_set1_ps(0.625f), _CMP_LT_OQ);
  __m512 out = _mm512_setzero_ps();
  if (small != 0) {
    const __m512 z = _mm512_mul_ps(x, x);
    const __m512 p = EpPoly(z, kP);
    out = _mm512_mask_mov_ps(out, small, _mm512_fmadd_ps(_mm512_mul_ps(p, z), x, x));
  }
  if (small != 0xFFFF) {
    const __m512 t =
        ExpNonPositiveT<SdAvx512>(_mm512_mul_ps(_mm512_set1_ps(-2.0f), ax));  // NaN kept
    const __m512 r = _mm512_div_ps(_mm512_sub_ps(one, t), _mm512_add_ps(one, t));
    // x's sign onto r (r >= 0, or NaN), in integer ops (AVX512F has no float and/or)
    const __m512i sign =
        _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(static_cast<int>(0x80000000u)));
    const __m512 signed_r = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(r), sign));
    out = _mm512_mask_mov_ps(out, static_cast<__mmask16>(~small), signed_r);
  }
  return out;
}

// jax.nn.gelu(x) (tanh form)'s trace, each operation rounded as there.
inline __m512 GeluTanhAvx512(__m512 x) {
  const __m512 cube = _mm512_mul_ps(x, _mm512_mul_ps(x, x));
  const __m512 inner = _mm512_add_ps(x, _mm512_mul_ps(_mm512_set1_ps(0.044714998453855515f), cube));
  const __m512 t = TanhAvx512(_mm512_mul_ps(_mm512_set1_ps(0.7978845834732056f), inner));
  const __m512 h = _mm512_mul_ps(_mm512_set1_ps(0.5f), _mm512_add_ps(_mm512_set1_ps(1.0f), t));
  return _mm512_mul_ps(x, h);
}

// The activation ``act`` on one vector.
inline __m512 EpActivation(__m512 y, int64_t act) {
  if (act == kEpGeluErf) return GeluErfAvx512(y);
  if (act == kEpGeluTanh) return GeluTanhAvx512(y);
  if (act == kEpRelu)  // y where !(y <= 0): y > 0 or NaN; else +0
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(y, _mm512_setzero_ps(), _CMP_NLE_UQ), y);
  return y;
}

// One vector of a product's outputs leaving a kernel: y + bias[0..15] (the lanes of
// ``m``; no add without a bias, so -0 stays -0), then the activation.
inline __m512 EpilogueVector(__m512 y, const float* bias, __mmask16 m, int64_t act) {
  if (bias != nullptr) y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(m, bias));
  return EpActivation(y, act);
}

// The epilogue on ``rows`` rows (stride ldc) of 32 columns of C in place: the columns
// of each half that exist are m0 and m1; ``bias`` (or null) holds these 32 columns'.
inline void EpilogueBlock(float* c, int64_t ldc, int64_t rows, const float* bias, int64_t act,
                          __mmask16 m0, __mmask16 m1) {
  for (int64_t r = 0; r < rows; ++r, c += ldc) {
    _mm512_mask_storeu_ps(c, m0, EpilogueVector(_mm512_maskz_loadu_ps(m0, c), bias, m0, act));
    if (m1 != 0)
      _mm512_mask_storeu_ps(
          c + 16, m1,
          EpilogueVector(_mm512_maskz_loadu_ps(m1, c + 16),
                         bias == nullptr ? nullptr : bias + 16, m1, act));
  }
}

// The epilogue on all of C (M, N), in place (a product with nothing to sum, K = 0).
inline void EpilogueRows(float* c, int64_t M, int64_t N, const float* bias, int64_t act) {
  for (int64_t p = 0; p * 32 < N; ++p) {
    const int64_t w = std::min<int64_t>(32, N - p * 32);
    EpilogueBlock(c + p * 32, N, M, bias == nullptr ? nullptr : bias + p * 32, act,
                  SdAvx512::Mask(w), SdAvx512::Mask(std::max<int64_t>(w - 16, 0)));
  }
}

#endif  // __AVX512F__

}  // namespace

#endif  // JQX_KERNELS_CPU_EPILOGUE_H_
