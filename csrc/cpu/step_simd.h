// The CPU kernels as templates over a SIMD lanes type L (simd_avx2.h, simd_avx512.h) and an element
// I/O type; the per-element math is philox.h / step.h itself, instantiated with L.
#pragma once

#include <cstring>

#include "kernels.h"

namespace fastdiff {
namespace cpu {
namespace {

// Software-pipelined: the Philox words of the next L::width groups are made in the same loop body as the
// Box-Muller of these, so the two long dependency chains overlap (benchmarks/noise_ab.sh: AVX2 on Zen 2, with
// simd_avx2.h's lane order, 1.18x).
template <class L>
void noise_groups_simd(uint64_t seed, uint32_t step, uint64_t g0, int64_t n, float* z) {
  using P = typename L::Philox;  // Philox lanes (philox_rounds needs only ^, a broadcast and mulhilo)
  using PU = typename P::U;
  using F = typename L::F;
  if (n <= 0) return;
  const PhiloxKeys keys = philox_keys(static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  PU w0, w1, w2, w3;  // the Philox words of groups g0 + j ..
  auto philox = [&](int64_t j) {
    PU c2(step), c3(0u);
    P::counters(g0 + static_cast<uint64_t>(j), w0, w1);
    philox_rounds<P>(w0, w1, c2, c3, keys);
    w2 = c2;
    w3 = c3;
  };
  auto normals = [&](int64_t j, PU r0, PU r1, PU r2, PU r3) {
    F zc0, zs0, zc1, zs1;
    box_muller_lanes<L>(P::to_lanes(r0), P::to_lanes(r1), zc0, zs0);  // lanes 0, 1 of each group: (r0, r1)
    box_muller_lanes<L>(P::to_lanes(r2), P::to_lanes(r3), zc1, zs1);  // lanes 2, 3: (r2, r3)
    L::store_groups(z + 4 * j, zc0, zs0, zc1, zs1);
  };
  philox(0);
  int64_t j = 0;
  for (; j + L::width < n; j += L::width) {
    const PU r0 = w0, r1 = w1, r2 = w2, r3 = w3;
    philox(j + L::width);
    normals(j, r0, r1, r2, r3);
  }
  normals(j, w0, w1, w2, w3);
}

template <class L, class IO>
void step_simd(const typename IO::T* x, const typename IO::T* m, const float* z, typename IO::T* out, int64_t n,
               const StepParams& params) {
  const StepParams p = params;  // a local copy: out may alias params for all the compiler knows (reloads per vector)
  using T = typename IO::T;
  using F = typename L::F;
  constexpr int W = L::width;
  int64_t e = 0;
  if (z) {
    for (; e + W <= n; e += W)
      IO::store(out + e, step_add_noise_lanes<L>(step_mean_lanes<L>(IO::load(x + e), IO::load(m + e), p),
                                                 L::loadf(z + e), p));
  } else {
    for (; e + W <= n; e += W) IO::store(out + e, step_mean_lanes<L>(IO::load(x + e), IO::load(m + e), p));
  }
  if (e < n) {  // the tail through zero-padded buffers
    const int64_t r = n - e;
    T xb[W] = {}, mb[W] = {}, ob[W];
    alignas(64) float zb[W] = {};
    std::memcpy(xb, x + e, r * sizeof(T));
    std::memcpy(mb, m + e, r * sizeof(T));
    F y = step_mean_lanes<L>(IO::load(xb), IO::load(mb), p);
    if (z) {
      std::memcpy(zb, z + e, r * sizeof(float));
      y = step_add_noise_lanes<L>(y, L::loadf(zb), p);
    }
    IO::store(ob, y);
    std::memcpy(out + e, ob, r * sizeof(T));
  }
}

// The kernel table of lanes L with element I/O types F32, F16, BF16.
template <class L, class F32, class F16, class BF16>
constexpr Kernels make_kernels(const char* name) {
  return {name, L::width, &noise_groups_simd<L>, &step_simd<L, F32>, &step_simd<L, F16>, &step_simd<L, BF16>};
}

// float -> bfloat16 bits as c10::BFloat16 rounds: to nearest even, NaN -> 0x7FC0 (u: the float's bits).
template <class U>
U bf16_round_bits(U u) {
  return (u + (((u >> 16) & U(1u)) + U(0x7FFFu))) >> 16;
}

}  // namespace
}  // namespace cpu
}  // namespace fastdiff
