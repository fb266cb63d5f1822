// CUDA kernel of fastdiff::multistep_step (DPM-Solver++): grid-stride, one Philox group per thread-iteration,
// launched on the current stream (capturable in a CUDA graph). Same math (multistep.h) and noise (philox.h)
// as the CPU kernel.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

#define FASTDIFF_WITH_ATEN
#include "../multistep.h"

namespace fastdiff {
namespace {

constexpr int kMsThreads = 256;

template <typename T>
__device__ __forceinline__ void ms_element(const T* __restrict__ x, const T* __restrict__ m,
                                           const T* __restrict__ xp, T* __restrict__ out, T* __restrict__ x0o,
                                           int64_t e, float z, bool noise, const MultistepParams& p) {
  const float xf = static_cast<float>(x[e]);
  const float x0 = multistep_x0(xf, static_cast<float>(m[e]), p);
  float y = multistep_mean(xf, x0, p.k_prev != 0.f ? static_cast<float>(xp[e]) : 0.f, p);
  if (noise) y = multistep_add_noise(y, z, p);
  out[e] = static_cast<T>(y);
  x0o[e] = static_cast<T>(x0);
}

// Contiguous: one Philox group (up to 4 elements; a sample's last group may be partial) per iteration.
template <typename T>
__global__ void ms_group_kernel(const T* __restrict__ x, const T* __restrict__ m, const T* __restrict__ xp,
                                T* __restrict__ out, T* __restrict__ x0o, const uint64_t* __restrict__ seeds,
                                int64_t N, int64_t G, int64_t ngroups, uint32_t step, MultistepParams p) {
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
    for (int l = 0; l < 4; ++l)
      if (l < n) ms_element(x, m, xp, out, x0o, off + l, z[l], noise, p);
  }
}

// Channels-last: one element per iteration; memory (b, sp, c) has logical index c*S + sp.
template <typename T>
__global__ void ms_channels_last_kernel(const T* __restrict__ x, const T* __restrict__ m, const T* __restrict__ xp,
                                        T* __restrict__ out, T* __restrict__ x0o, const uint64_t* __restrict__ seeds,
                                        int64_t N, int64_t C, int64_t S, int64_t total, uint32_t step,
                                        MultistepParams p) {
  const bool noise = p.sigma != 0.f;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float z = 0.f;
    if (noise) {
      const int64_t b = e / N, pos = e - b * N, sp = pos / C, c = pos - sp * C;
      z = normal_at(seeds[b], step, static_cast<uint64_t>(c * S + sp));
    }
    ms_element(x, m, xp, out, x0o, e, z, noise, p);
  }
}

unsigned int ms_grid_for(int64_t work) {
  int dev = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  const int64_t blocks = (work + kMsThreads - 1) / kMsThreads;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(blocks, int64_t(sms) * 16)));
}

std::tuple<at::Tensor, at::Tensor> multistep_step_cuda(const at::Tensor& x, const at::Tensor& model_output,
                                                       const at::Tensor& x0_prev, const at::Tensor& seeds,
                                                       int64_t step, double a, double b, double clip_range,
                                                       double k_x0, double k_prev, double k_x, double sigma) {
  TORCH_CHECK(x.is_cuda(), "multistep_step (CUDA kernel): x must be a CUDA tensor; got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const PreparedMultistep s =
      prepare_multistep(x, model_output, x0_prev, seeds, step, a, b, clip_range, k_x0, k_prev, k_x, sigma);
  const int64_t total = s.out.numel();
  if (total == 0) return {s.out, s.x0};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto* sd = reinterpret_cast<const uint64_t*>(s.seeds.const_data_ptr<int64_t>());
  const int64_t N = s.per_sample;
  const auto kernel = [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* xp = s.x.const_data_ptr<scalar_t>();
    const scalar_t* mp = s.m.const_data_ptr<scalar_t>();
    const scalar_t* pp = s.xp.const_data_ptr<scalar_t>();
    scalar_t* op = s.out.mutable_data_ptr<scalar_t>();
    scalar_t* x0p = s.x0.mutable_data_ptr<scalar_t>();
    if (s.channels_last) {
      ms_channels_last_kernel<scalar_t><<<ms_grid_for(total), kMsThreads, 0, stream>>>(
          xp, mp, pp, op, x0p, sd, N, s.channels, s.spatial, total, s.step, s.p);
    } else {
      const int64_t G = (N + 3) / 4, ngroups = s.batch * G;
      ms_group_kernel<scalar_t><<<ms_grid_for(ngroups), kMsThreads, 0, stream>>>(xp, mp, pp, op, x0p, sd, N, G,
                                                                                  ngroups, s.step, s.p);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  AT_DISPATCH_SWITCH(s.x.scalar_type(), "multistep_step_cuda",  // float32, float16, bfloat16 only
                     AT_DISPATCH_CASE(at::kFloat, [&] { kernel(scalar_t{}); })
                     AT_DISPATCH_CASE(at::kHalf, [&] { kernel(scalar_t{}); })
                     AT_DISPATCH_CASE(at::kBFloat16, [&] { kernel(scalar_t{}); }));
  return {s.out, s.x0};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdiff, CUDA, m) { m.impl("multistep_step", &multistep_step_cuda); }

}  // namespace fastdiff
