// The per-element DPM-Solver++ multistep step, written once for the CPU and CUDA kernels.
//
//   x0  = a*x + b*m, clamped to [-R, R] (R = inf: no clamp; NaN propagates)
//   out = k_x0*x0 + k_prev*x0_prev + k_x*x  (+ sigma*z when sigma != 0)
//
// The k_prev term is left out (x0_prev is not read) when k_prev == 0: first-order steps.
// All in float32, left to right, every product rounded (no fma: -ffp-contract=off / -fmad=false), as
// step.h; fastdiff/reference.py:apply_multistep does the same operations in the same order.
#pragma once

#include <cmath>

#include "philox.h"

namespace fastdiff {

struct MultistepParams {
  float a, b, clip, k_x0, k_prev, k_x, sigma;  // clip = +inf disables the clamp
};

namespace {

inline MultistepParams make_multistep_params(double a, double b, double clip_range, double k_x0, double k_prev,
                                             double k_x, double sigma) {
  const float clip = std::isfinite(clip_range) ? static_cast<float>(clip_range) : INFINITY;
  return {static_cast<float>(a),      static_cast<float>(b),   clip, static_cast<float>(k_x0),
          static_cast<float>(k_prev), static_cast<float>(k_x), static_cast<float>(sigma)};
}

// The clamped data prediction x0.
FD_HD float multistep_x0(float x, float m, const MultistepParams& p) {
  const float x0 = p.a * x + p.b * m;
  return x0 < -p.clip ? -p.clip : (x0 > p.clip ? p.clip : x0);  // NaN: both comparisons false
}

// out without noise: a second-order step (k_prev != 0) and a first-order one (x0_prev not read).
FD_HD float multistep_mean_prev(float x, float x0, float xp, const MultistepParams& p) {
  return p.k_x0 * x0 + p.k_prev * xp + p.k_x * x;
}
FD_HD float multistep_mean_first(float x, float x0, const MultistepParams& p) { return p.k_x0 * x0 + p.k_x * x; }
FD_HD float multistep_mean(float x, float x0, float xp, const MultistepParams& p) {
  return p.k_prev != 0.f ? multistep_mean_prev(x, x0, xp, p) : multistep_mean_first(x, x0, p);
}

FD_HD float multistep_add_noise(float mean, float z, const MultistepParams& p) { return mean + p.sigma * z; }

}  // namespace
}  // namespace fastdiff

#ifdef FASTDIFF_WITH_ATEN
// Host glue shared by multistep.cpp and cuda/multistep.cu: argument checks and layout (in multistep.cpp).
#include <ATen/core/Tensor.h>

namespace fastdiff {

struct PreparedMultistep {
  at::Tensor x, m, xp, seeds, out, x0;  // x, m, xp, out, x0 share one dense layout
  bool channels_last = false;           // memory order (N, spatial..., C) instead of (N, C, spatial...)
  int64_t batch = 0, per_sample = 0, channels = 1, spatial = 1;
  uint32_t step = 0;
  MultistepParams p{};
};

PreparedMultistep prepare_multistep(const at::Tensor& x, const at::Tensor& model_output, const at::Tensor& x0_prev,
                                    const at::Tensor& seeds, int64_t step, double a, double b, double clip_range,
                                    double k_x0, double k_prev, double k_x, double sigma);

}  // namespace fastdiff
#endif
