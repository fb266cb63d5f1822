// The per-element reverse step, written once for the CPU and CUDA kernels.
//
//   x0  = a*x + b*m, clamped to [-R, R] (R = inf: no clamp; NaN propagates)
//   out = k_x0*x0 + k_x*x + k_m*m  (+ sigma*z when sigma != 0)
//
// All in float32, left to right, every product rounded (no fma: -ffp-contract=off / -fmad=false);
// fastdiff/ops.py:reverse_step_reference does the same operations in the same order.
#pragma once

#include <cmath>

#include "philox.h"

namespace fastdiff {

struct StepParams {
  float a, b, clip, k_x0, k_x, k_m, sigma;  // clip = +inf disables the clamp
};

namespace {

inline StepParams make_step_params(double a, double b, double clip_range, double k_x0, double k_x,
                                   double k_m, double sigma) {
  const float clip = std::isfinite(clip_range) ? static_cast<float>(clip_range) : INFINITY;
  return {static_cast<float>(a), static_cast<float>(b), clip, static_cast<float>(k_x0),
          static_cast<float>(k_x), static_cast<float>(k_m), static_cast<float>(sigma)};
}

// Without the noise term (sigma == 0, or added by the caller with step_add_noise); L: see philox.h.
template <class L>
FD_HD typename L::F step_mean_lanes(typename L::F x, typename L::F m, const StepParams& p) {
  using F = typename L::F;
  F x0 = F(p.a) * x + F(p.b) * m;
  x0 = L::sel(x0 < F(-p.clip), F(-p.clip), L::sel(x0 > F(p.clip), F(p.clip), x0));  // NaN: both false
  return F(p.k_x0) * x0 + F(p.k_x) * x + F(p.k_m) * m;
}

template <class L>
FD_HD typename L::F step_add_noise_lanes(typename L::F mean, typename L::F z, const StepParams& p) {
  return mean + typename L::F(p.sigma) * z;
}

FD_HD float step_mean(float x, float m, const StepParams& p) { return step_mean_lanes<ScalarLanes>(x, m, p); }
FD_HD float step_add_noise(float mean, float z, const StepParams& p) {
  return step_add_noise_lanes<ScalarLanes>(mean, z, p);
}

}  // namespace
}  // namespace fastdiff

#ifdef FASTDIFF_WITH_ATEN
// Host glue shared by ops.cpp and cuda/step.cu: argument checks and layout (defined in ops.cpp).
#include <ATen/core/Tensor.h>

namespace fastdiff {

struct PreparedStep {
  at::Tensor x, m, seeds, out;  // x, m, out share one dense layout
  bool channels_last = false;   // memory order (N, spatial..., C) instead of (N, C, spatial...)
  int64_t batch = 0, per_sample = 0, channels = 1, spatial = 1;
  uint32_t step = 0;
  StepParams p{};
};

PreparedStep prepare_step(const at::Tensor& x, const at::Tensor& model_output, const at::Tensor& seeds,
                          int64_t step, double a, double b, double clip_range, double k_x0, double k_x,
                          double k_m, double sigma);

}  // namespace fastdiff
#endif
