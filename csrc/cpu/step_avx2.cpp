// The AVX2 kernel table (csrc/cpu/kernels.h). Standard headers come first, compiled for the
// library's baseline; everything after the target pragma (our headers only, internal linkage) may
// use AVX2 + F16C and runs only where ops.cpp found them.
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "isa.h"

#if FD_X86_SIMD
#pragma GCC target("avx2,f16c,popcnt")

// clang-format off
#include "step_simd.h"
#include "simd_avx2.h"
// clang-format on

namespace fastdiff {
namespace cpu {
const Kernels kAvx2Kernels = make_kernels<Avx2Lanes, Avx2F32, Avx2F16, Avx2BF16>("avx2");
}  // namespace cpu
}  // namespace fastdiff
#endif
