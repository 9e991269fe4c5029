// The scalar parts of jqx.ops' W8A8 activation quantizer and the dense W8A8
// call's operand check, shared by conv_int8.cc (AVX2: the convolution and
// jqx_w8a8_gemm) and int8_gemm.cc (AVX512-VNNI: jqx_w8a8_vnni). Both kernels must
// quantize exactly as the XLA path does (jqx.core.numerics): one formula here keeps
// them bit-identical to it and to each other. native.py's build cache key hashes
// this header with each source that includes it.

#ifndef JQX_KERNELS_CPU_W8A8_H_
#define JQX_KERNELS_CPU_W8A8_H_

#include <stdint.h>

#include <string>

#include "xla/ffi/api/ffi.h"

namespace {

// How the activation scale is found (native.py's _W8A8_MODES): given (static), one
// for all of x, or one per sample (a convolution's image, a dense call's row).
// kTwoLevel (jqx_w8a8_vnni only): int8 weight-only's two-level split of each row
// (jqx.ops.impl_xla.two_level_split), two code rows per row of x.
enum Mode : int64_t { kStatic = 0, kPerTensor = 1, kPerSample = 2, kTwoLevel = 3 };

constexpr float kBigScale = 1.2676506002282294e30f;  // 2^100, numerics._BIG_SCALE

// The dynamic scale of absmax_scale: max|x| / 127 (as x * (1/127)), 1 for 0.
inline float DynamicScale(float amax) {
  const float s = amax * (1.0f / 127.0f);
  return s == 0.0f ? 1.0f : s;
}

struct Quant {
  float c, inv;  // code = round_half_even((x * c) * inv), clamped to [-128, 127]
};

// numerics.div_by_scale: scales above 2^100 are divided in two steps.
inline Quant QuantOf(float s) {
  const float c = s > kBigScale ? 5.421010862427522e-20f /* 2^-64 */ : 1.0f;
  return {c, 1.0f / (s * c)};
}

// The operands of a dense W8A8 call: x (M, K) f32, w (K, N) int8, wscale (N),
// out (M, N), a mode up to ``max_mode``, and one act_scale element for a static scale.
template <typename X, typename W, typename S, typename A, typename O>
xla::ffi::Error CheckDenseW8A8(const char* target, const X& x, const W& w, const S& wscale,
                               const A& act_scale, const O& out, int64_t mode,
                               int64_t max_mode = kPerSample) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  const auto od = out.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || od.size() != 2 || wscale.dimensions().size() != 1)
    return xla::ffi::Error::InvalidArgument(
        std::string(target) + ": expected x (M, K), w (K, N), wscale (N), out (M, N)");
  if (wd[0] != xd[1] || od[0] != xd[0] || od[1] != wd[1] || wscale.dimensions()[0] != wd[1] ||
      mode < kStatic || mode > max_mode || (mode == kStatic && act_scale.element_count() != 1))
    return xla::ffi::Error::InvalidArgument(std::string(target) + ": inconsistent shapes or mode");
  return xla::ffi::Error::Success();
}

}  // namespace

#endif  // JQX_KERNELS_CPU_W8A8_H_
