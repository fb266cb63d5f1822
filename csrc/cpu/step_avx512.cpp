// The AVX-512 kernel table (csrc/cpu/kernels.h). Standard headers come first, compiled for the
// library's baseline; everything after the target pragma (our headers only, internal linkage) may
// use AVX-512 and runs only where ops.cpp found avx512f/bw/vl/dq.
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "isa.h"

#if FD_X86_SIMD
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,f16c,popcnt")

// clang-format off
#include "step_simd.h"
#include "simd_avx512.h"
// clang-format on

namespace fastdiff {
namespace cpu {
const Kernels kAvx512Kernels = make_kernels<Avx512Lanes, Avx512F32, Avx512F16, Avx512BF16>("avx512");
}  // namespace cpu
}  // namespace fastdiff
#endif
