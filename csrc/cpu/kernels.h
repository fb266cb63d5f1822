// The vectorised CPU kernels of one ISA, on raw pointers. Declared here for ops.cpp; each table is
// defined in its own translation unit (step_avx2.cpp, step_avx512.cpp) compiled for that ISA and
// used only when the CPU has it (ops.cpp picks one at load time). No ATen here: those translation
// units must not emit inline ATen code for an ISA the rest of the library does not assume.
#pragma once

#include <cstdint>

#include "../step.h"
#include "isa.h"

namespace fastdiff {
namespace cpu {

// Philox groups per block of the contiguous kernel; every SIMD width divides it.
constexpr int64_t kBlock = 64;

struct Kernels {
  const char* name;
  int width;  // float32 lanes
  // z[0 .. 4n): the normals of groups g0 .. g0+n-1 of one sample; writes 4 * round_up(n, width) floats.
  void (*noise)(uint64_t seed, uint32_t step, uint64_t g0, int64_t n, float* z);
  // out[e] = the step of (x[e], m[e]) (+ sigma * z[e] when z is not null), e < n. f16/bf16: raw bits.
  void (*step_f32)(const float* x, const float* m, const float* z, float* out, int64_t n, const StepParams& p);
  void (*step_f16)(const uint16_t* x, const uint16_t* m, const float* z, uint16_t* out, int64_t n,
                   const StepParams& p);
  void (*step_bf16)(const uint16_t* x, const uint16_t* m, const float* z, uint16_t* out, int64_t n,
                    const StepParams& p);
};

extern const Kernels kAvx2Kernels;    // needs avx2, fma-free math, f16c
extern const Kernels kAvx512Kernels;  // needs avx512f, avx512bw, avx512vl, avx512dq

}  // namespace cpu
}  // namespace fastdiff
