// CUDA kernel of fastdiff::reverse_step: grid-stride, 16-byte vector loads when aligned,
// launched on the current stream. Same math (step.h) and noise (philox.h) as the CPU kernel.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#define FASTDIFF_WITH_ATEN
#include "../step.h"

namespace fastdiff {
namespace {

constexpr int kThreads = 256;

template <typename T, int VEC>
struct alignas(16) Pack {
  T v[VEC];
};

// One 16-byte vector (VEC elements = VEC/4 whole Philox groups) per iteration; needs N % VEC == 0.
template <typename T, int VEC>
__global__ void step_vec_kernel(const T* __restrict__ x, const T* __restrict__ m, T* __restrict__ out,
                                const uint64_t* __restrict__ seeds, int64_t N, int64_t nvec, uint32_t step,
                                StepParams p) {
  static_assert(VEC % 4 == 0, "a vector holds whole Philox groups");
  const bool noise = p.sigma != 0.f;
  for (int64_t v = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; v < nvec;
       v += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e = v * VEC, b = e / N, i = e - b * N;
    const Pack<T, VEC> xv = reinterpret_cast<const Pack<T, VEC>*>(x)[v];
    const Pack<T, VEC> mv = reinterpret_cast<const Pack<T, VEC>*>(m)[v];
    Pack<T, VEC> ov;
    const uint64_t seed = noise ? seeds[b] : 0;
#pragma unroll
    for (int g = 0; g < VEC / 4; ++g) {
      float z[4] = {0.f, 0.f, 0.f, 0.f};
      if (noise) {
        const Philox4 r = philox_group(seed, step, static_cast<uint64_t>(i / 4 + g));
        box_muller(r.r0, r.r1, z[0], z[1]);
        box_muller(r.r2, r.r3, z[2], z[3]);
      }
#pragma unroll
      for (int l = 0; l < 4; ++l) {
        float y = step_mean(static_cast<float>(xv.v[4 * g + l]), static_cast<float>(mv.v[4 * g + l]), p);
        if (noise) y = step_add_noise(y, z[l], p);
        ov.v[4 * g + l] = static_cast<T>(y);
      }
    }
    reinterpret_cast<Pack<T, VEC>*>(out)[v] = ov;
  }
}

// One Philox group (up to 4 elements, a sample's last group may be partial) per iteration.
template <typename T>
__global__ void step_group_kernel(const T* __restrict__ x, const T* __restrict__ m, T* __restrict__ out,
                                  const uint64_t* __restrict__ seeds, int64_t N, int64_t G, int64_t ngroups,
                                  uint32_t step, StepParams p) {
  const bool noise = p.sigma != 0.f;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < ngroups;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = idx / G, g = idx - b * G;
    float z[4] = {0.f, 0.f, 0.f, 0.f};
    if (noise) {
      const Philox4 r = philox_group(seeds[b], step, static_cast<uint64_t>(g));
      box_muller(r.r0, r.r1, z[0], z[1]);
      box_muller(r.r2, r.r3, z[2], z[3]);
    }
    const int64_t off = b * N + 4 * g, n = min(static_cast<int64_t>(4), N - 4 * g);
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      if (l < n) {
        float y = step_mean(static_cast<float>(x[off + l]), static_cast<float>(m[off + l]), p);
        if (noise) y = step_add_noise(y, z[l], p);
        out[off + l] = static_cast<T>(y);
      }
    }
  }
}

// Channels-last: one element per iteration; memory (b, sp, c) has logical index c*S + sp.
template <typename T>
__global__ void step_channels_last_kernel(const T* __restrict__ x, const T* __restrict__ m, T* __restrict__ out,
                                          const uint64_t* __restrict__ seeds, int64_t N, int64_t C, int64_t S,
                                          int64_t total, uint32_t step, StepParams p) {
  const bool noise = p.sigma != 0.f;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float y = step_mean(static_cast<float>(x[e]), static_cast<float>(m[e]), p);
    if (noise) {
      const int64_t b = e / N, pos = e - b * N, sp = pos / C, c = pos - sp * C;
      y = step_add_noise(y, normal_at(seeds[b], step, static_cast<uint64_t>(c * S + sp)), p);
    }
    out[e] = static_cast<T>(y);
  }
}

unsigned int grid_for(int64_t work) {
  int dev = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  const int64_t blocks = (work + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(blocks, int64_t(sms) * 16)));
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

at::Tensor reverse_step_cuda(const at::Tensor& x, const at::Tensor& model_output, const at::Tensor& seeds,
                             int64_t step, double a, double b, double clip_range, double k_x0, double k_x,
                             double k_m, double sigma) {
  TORCH_CHECK(x.is_cuda(), "reverse_step (CUDA kernel): x must be a CUDA tensor; got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const PreparedStep s = prepare_step(x, model_output, seeds, step, a, b, clip_range, k_x0, k_x, k_m, sigma);
  const int64_t total = s.out.numel();
  if (total == 0) return s.out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto* sd = reinterpret_cast<const uint64_t*>(s.seeds.const_data_ptr<int64_t>());
  const int64_t N = s.per_sample;
  const auto kernel = [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* xp = s.x.const_data_ptr<scalar_t>();
    const scalar_t* mp = s.m.const_data_ptr<scalar_t>();
    scalar_t* op = s.out.mutable_data_ptr<scalar_t>();
    constexpr int VEC = 16 / sizeof(scalar_t);
    if (s.channels_last) {
      step_channels_last_kernel<scalar_t><<<grid_for(total), kThreads, 0, stream>>>(
          xp, mp, op, sd, N, s.channels, s.spatial, total, s.step, s.p);
    } else if (N % VEC == 0 && aligned16(xp) && aligned16(mp) && aligned16(op)) {
      const int64_t nvec = total / VEC;
      step_vec_kernel<scalar_t, VEC><<<grid_for(nvec), kThreads, 0, stream>>>(xp, mp, op, sd, N, nvec, s.step, s.p);
    } else {
      const int64_t G = (N + 3) / 4, ngroups = s.batch * G;
      step_group_kernel<scalar_t><<<grid_for(ngroups), kThreads, 0, stream>>>(xp, mp, op, sd, N, G, ngroups, s.step,
                                                                               s.p);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  AT_DISPATCH_SWITCH(s.x.scalar_type(), "reverse_step_cuda",   // float32, float16, bfloat16 only
                     AT_DISPATCH_CASE(at::kFloat, [&] { kernel(scalar_t{}); })
                     AT_DISPATCH_CASE(at::kHalf, [&] { kernel(scalar_t{}); })
                     AT_DISPATCH_CASE(at::kBFloat16, [&] { kernel(scalar_t{}); }));
  return s.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdiff, CUDA, m) { m.impl("reverse_step", &reverse_step_cuda); }

}  // namespace fastdiff
