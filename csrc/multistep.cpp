// fastdiff::multistep_step (DPM-Solver++): schema, argument checks and the CPU kernel (at::parallel_for).
// Kept apart from ops.cpp: its own schema fragment, math in multistep.h, noise from philox.h's scalar API.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>

#define FASTDIFF_WITH_ATEN
#include "multistep.h"

#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#define FD_MS_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define FD_MS_CLONES
#endif

namespace fastdiff {

PreparedMultistep prepare_multistep(const at::Tensor& x, const at::Tensor& model_output, const at::Tensor& x0_prev,
                                    const at::Tensor& seeds, int64_t step, double a, double b, double clip_range,
                                    double k_x0, double k_prev, double k_x, double sigma) {
  TORCH_CHECK(x.dim() >= 1, "multistep_step: x must have a batch dimension (dim >= 1); got a 0-d tensor");
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
              "multistep_step: x must be float32, float16 or bfloat16; got ", dt);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"model_output", model_output},
                                std::pair<const char*, const at::Tensor&>{"x0_prev", x0_prev}}) {
    TORCH_CHECK(t.sizes() == x.sizes(), "multistep_step: ", name, " must have x's shape ", x.sizes(), "; got ",
                t.sizes());
    TORCH_CHECK(t.scalar_type() == dt, "multistep_step: ", name, " must have x's dtype ", dt, "; got ",
                t.scalar_type());
    TORCH_CHECK(t.device() == x.device(), "multistep_step: ", name, " must be on x's device ", x.device(), "; got ",
                t.device());
  }
  TORCH_CHECK(seeds.dim() == 1 && seeds.size(0) == x.size(0),
              "multistep_step: seeds must be a 1-D tensor with one seed per sample (", x.size(0), "); got shape ",
              seeds.sizes());
  TORCH_CHECK(seeds.scalar_type() == at::kLong, "multistep_step: seeds must be int64; got ", seeds.scalar_type());
  TORCH_CHECK(seeds.device() == x.device(), "multistep_step: seeds must be on x's device ", x.device(), "; got ",
              seeds.device());
  TORCH_CHECK(step >= 0 && step <= static_cast<int64_t>(std::numeric_limits<uint32_t>::max()),
              "multistep_step: step must be in [0, 2^32); got ", step);

  PreparedMultistep s;
  const int64_t dim = x.dim();
  const bool cl = !x.is_contiguous() && ((dim == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
                                         (dim == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d)));
  const auto fmt = cl ? (dim == 4 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::ChannelsLast3d)
                      : at::MemoryFormat::Contiguous;
  s.x = x.contiguous(fmt);
  s.m = model_output.contiguous(fmt);
  s.xp = x0_prev.contiguous(fmt);
  s.seeds = seeds.contiguous();
  s.out = at::empty_like(s.x, fmt);
  s.x0 = at::empty_like(s.x, fmt);
  s.channels_last = cl;
  s.batch = x.size(0);
  s.per_sample = s.batch ? x.numel() / s.batch : 0;
  if (cl) {
    s.channels = x.size(1);
    s.spatial = s.channels ? s.per_sample / s.channels : 0;
  }
  s.step = static_cast<uint32_t>(step);
  s.p = make_multistep_params(a, b, clip_range, k_x0, k_prev, k_x, sigma);
  return s;
}

namespace {

constexpr int64_t kGroups = 64;  // Philox groups per inner block (256 elements)

// z[0 .. 4n): the normals of groups g0 .. g0+n of one sample (scalar philox.h API, 4 normals per group), in
// two vectorisable passes (Philox, then Box-Muller) as ops.cpp's portable path.
FD_MS_CLONES void ms_noise_groups(uint64_t seed, uint32_t step, uint64_t g0, int64_t n, float* z) {
  uint32_t U[2 * kGroups], V[2 * kGroups];
  float zc[2 * kGroups], zs[2 * kGroups];
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const Philox4 r = philox_group(seed, step, g0 + static_cast<uint64_t>(j));
    U[2 * j] = r.r0;
    V[2 * j] = r.r1;
    U[2 * j + 1] = r.r2;
    V[2 * j + 1] = r.r3;
  }
#pragma omp simd
  for (int64_t k = 0; k < 2 * n; ++k) box_muller(U[k], V[k], zc[k], zs[k]);
  for (int64_t k = 0; k < 2 * n; ++k) {
    z[2 * k] = zc[k];
    z[2 * k + 1] = zs[k];
  }
}

// The step on n elements; the loop-invariant choices (noise, second order) are hoisted out of the loops.
template <typename T, bool kPrev, bool kNoise>
void ms_loop(const T* __restrict x, const T* __restrict m, const T* __restrict xp, const float* __restrict z,
             T* __restrict out, T* __restrict x0o, int64_t n, const MultistepParams p) {
#pragma omp simd
  for (int64_t e = 0; e < n; ++e) {
    const float xf = static_cast<float>(x[e]);
    const float x0 = multistep_x0(xf, static_cast<float>(m[e]), p);
    float y;
    if constexpr (kPrev)
      y = multistep_mean_prev(xf, x0, static_cast<float>(xp[e]), p);
    else
      y = multistep_mean_first(xf, x0, p);
    if constexpr (kNoise) y = multistep_add_noise(y, z[e], p);
    out[e] = static_cast<T>(y);
    x0o[e] = static_cast<T>(x0);
  }
}

template <typename T>
void ms_apply(const T* x, const T* m, const T* xp, const float* z, T* out, T* x0o, int64_t n,
              const MultistepParams& p) {
  const bool prev = p.k_prev != 0.f;
  if (prev && z)
    ms_loop<T, true, true>(x, m, xp, z, out, x0o, n, p);
  else if (prev)
    ms_loop<T, true, false>(x, m, xp, z, out, x0o, n, p);
  else if (z)
    ms_loop<T, false, true>(x, m, xp, z, out, x0o, n, p);
  else
    ms_loop<T, false, false>(x, m, xp, z, out, x0o, n, p);
}

// Contiguous: blocks of whole Philox groups inside one sample (a chunk may start or end mid-sample).
template <typename T>
void ms_contiguous(const PreparedMultistep& s, const uint64_t* seeds) {
  const T* x = s.x.const_data_ptr<T>();
  const T* m = s.m.const_data_ptr<T>();
  const T* xp = s.xp.const_data_ptr<T>();
  T* out = s.out.mutable_data_ptr<T>();
  T* x0 = s.x0.mutable_data_ptr<T>();
  const int64_t N = s.per_sample, G = (N + 3) / 4;
  const bool noise = s.p.sigma != 0.f;
  at::parallel_for(0, s.batch * G, 1024, [&](int64_t begin, int64_t end) {
    alignas(64) float z[4 * kGroups];
    for (int64_t idx = begin; idx < end;) {
      const int64_t b = idx / G, g = idx - b * G;
      const int64_t n = std::min({kGroups, G - g, end - idx});
      const int64_t e0 = 4 * g, ne = std::min(N, 4 * (g + n)) - e0, off = b * N + e0;
      if (noise) ms_noise_groups(seeds[b], s.step, static_cast<uint64_t>(g), n, z);
      ms_apply<T>(x + off, m + off, xp + off, noise ? z : nullptr, out + off, x0 + off, ne, s.p);
      idx += n;
    }
  });
}

// Channels-last: memory order (b, spatial position, c); element (c, sp) has logical index c*S + sp.
template <typename T>
void ms_channels_last(const PreparedMultistep& s, const uint64_t* seeds) {
  const T* x = s.x.const_data_ptr<T>();
  const T* m = s.m.const_data_ptr<T>();
  const T* xp = s.xp.const_data_ptr<T>();
  T* out = s.out.mutable_data_ptr<T>();
  T* x0 = s.x0.mutable_data_ptr<T>();
  const int64_t C = s.channels, S = s.spatial, N = s.per_sample;
  const bool noise = s.p.sigma != 0.f;
  at::parallel_for(0, s.batch * N, 4096, [&](int64_t begin, int64_t end) {
    alignas(64) float z[256];
    for (int64_t e0 = begin; e0 < end; e0 += 256) {
      const int64_t n = std::min<int64_t>(256, end - e0);
      if (noise)
        for (int64_t k = 0; k < n; ++k) {
          const int64_t e = e0 + k, b = e / N, pos = e - b * N, sp = pos / C, c = pos - sp * C;
          z[k] = normal_at(seeds[b], s.step, static_cast<uint64_t>(c * S + sp));
        }
      ms_apply<T>(x + e0, m + e0, xp + e0, noise ? z : nullptr, out + e0, x0 + e0, n, s.p);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> multistep_step_cpu(const at::Tensor& x, const at::Tensor& model_output,
                                                      const at::Tensor& x0_prev, const at::Tensor& seeds,
                                                      int64_t step, double a, double b, double clip_range,
                                                      double k_x0, double k_prev, double k_x, double sigma) {
  TORCH_CHECK(x.device().is_cpu(), "multistep_step (CPU kernel): x must be a CPU tensor; got ", x.device());
  const PreparedMultistep s =
      prepare_multistep(x, model_output, x0_prev, seeds, step, a, b, clip_range, k_x0, k_prev, k_x, sigma);
  if (s.out.numel() == 0) return {s.out, s.x0};
  const auto* sd = reinterpret_cast<const uint64_t*>(s.seeds.const_data_ptr<int64_t>());
  const auto kernel = [&](auto tag) {
    using scalar_t = decltype(tag);
    if (s.channels_last)
      ms_channels_last<scalar_t>(s, sd);
    else
      ms_contiguous<scalar_t>(s, sd);
  };
  AT_DISPATCH_SWITCH(s.x.scalar_type(), "multistep_step_cpu",  // float32, float16, bfloat16 only
                     AT_DISPATCH_CASE(at::kFloat, [&] { kernel(scalar_t{}); })
                     AT_DISPATCH_CASE(at::kHalf, [&] { kernel(scalar_t{}); })
                     AT_DISPATCH_CASE(at::kBFloat16, [&] { kernel(scalar_t{}); }));
  return {s.out, s.x0};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastdiff, m) {
  m.def(
      "multistep_step(Tensor x, Tensor model_output, Tensor x0_prev, Tensor seeds, int step, float a, float b, "
      "float clip_range, float k_x0, float k_prev, float k_x, float sigma) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastdiff, CPU, m) { m.impl("multistep_step", &multistep_step_cpu); }

}  // namespace fastdiff
