// One side of the A/B: csrc's SIMD noise kernel of one ISA as the plain function FN (built by noise_ab.sh).
#include <immintrin.h>

#include <cstdint>

#include "cpu/isa.h"
#if FD_ISA_AVX512
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,f16c,popcnt")
#include "cpu/step_simd.h"
#include "cpu/simd_avx512.h"
#define FD_LANES fastdiff::cpu::Avx512Lanes
#else
#pragma GCC target("avx2,f16c,popcnt")
#include "cpu/step_simd.h"
#include "cpu/simd_avx2.h"
#define FD_LANES fastdiff::cpu::Avx2Lanes
#endif

void FN(uint64_t seed, uint32_t step, uint64_t g0, int64_t n, float* z) {
  fastdiff::cpu::noise_groups_simd<FD_LANES>(seed, step, g0, n, z);
}
