// Counter-based Gaussian noise: Philox4x32-10 (Random123) + a portable Box-Muller.
//
// The contract (docs/design.md §3): z(seed, step, i) is bit-identical on the host, the device,
// NumPy and PyTorch (fastdiff/noise.py mirrors every operation below, in the same order).
// Only float32 + - * / and sqrt, each correctly rounded; no libm, no intrinsics, no fma
// (host: -ffp-contract=off, device: -fmad=false).
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define FD_HD __host__ __device__ __forceinline__
#else
#define FD_HD inline
#endif

#if defined(__CUDACC__)
#define FD_UNROLL _Pragma("unroll")
#else
#define FD_UNROLL _Pragma("GCC unroll 16")
#endif

namespace fastdiff {

struct Philox4 {
  uint32_t r0, r1, r2, r3;
};

FD_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
FD_UNROLL
  for (int r = 0; r < 10; ++r) {
    if (r) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0;
    const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
  }
  return {c0, c1, c2, c3};
}

// Philox of group g (elements 4g..4g+3) of a sample with this seed at this step.
FD_HD Philox4 philox_group(uint64_t seed, uint32_t step, uint64_t g) {
  return philox4x32_10(static_cast<uint32_t>(g), static_cast<uint32_t>(g >> 32), step, 0u,
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

FD_HD uint32_t fd_float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

FD_HD float fd_bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

FD_HD float fd_sqrt(float x) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(x);
#else
  return __builtin_sqrtf(x);  // sqrtss/sqrtps: correctly rounded (errno off: -fno-math-errno)
#endif
}

// R = sqrt(-2 ln u), u = (2*(U>>9)+1) * 2^-24 in (0, 1).
FD_HD float fd_radius(uint32_t U) {
  const float u = static_cast<float>(static_cast<int32_t>(((U >> 9) << 1) + 1u)) * 0x1p-24f;
  const uint32_t bits = fd_float_bits(u);
  int32_t e = static_cast<int32_t>((bits >> 23) & 0xffu) - 127;
  float mant = fd_bits_float((bits & 0x7fffffu) | 0x3f800000u);  // [1, 2)
  const bool big = mant > 0x1.6a09e6p+0f;                         // sqrt(2)
  mant = big ? mant * 0.5f : mant;
  e = big ? e + 1 : e;
  // ln(mant) = 2 atanh(s) = 2s (1 + s^2/3 + s^4/5 + s^6/7 + s^8/9)
  const float s = (mant - 1.0f) / (mant + 1.0f);
  const float s2 = s * s;
  float p = s2 * 0x1.c71c72p-4f + 0x1.24924ap-3f;  // 1/9, 1/7
  p = p * s2 + 0x1.99999ap-3f;                      // 1/5
  p = p * s2 + 0x1.555556p-2f;                      // 1/3
  p = p * s2 + 1.0f;
  const float ln_u = (s * 2.0f) * p + static_cast<float>(e) * 0x1.62e430p-1f;  // ln 2
  return fd_sqrt(ln_u * -2.0f);
}

// (cos θ, sin θ) of the angle in V: octant = top 3 bits, φ ∈ (0, π/4) from the next 23 bits.
FD_HD void fd_cos_sin(uint32_t V, float& cos_t, float& sin_t) {
  const uint32_t o = V >> 29;
  const uint32_t q = o >> 1;
  const bool h = (o & 1u) != 0;
  uint32_t f = (V >> 6) & 0x7fffffu;
  f = h ? 0x7fffffu - f : f;
  const float phi = static_cast<float>(static_cast<int32_t>((f << 1) + 1u)) * 0x1.921fb6p-25f;
  const float p2 = phi * phi;
  float s = p2 * 0x1.71de3ap-19f + -0x1.a01a02p-13f;  // 1/9!, -1/7!
  s = s * p2 + 0x1.111112p-7f;                        // 1/5!
  s = s * p2 + -0x1.555556p-3f;                       // -1/3!
  s = s * p2 + 1.0f;
  const float sin_p = phi * s;
  float c = p2 * -0x1.27e4fcp-22f + 0x1.a01a02p-16f;  // -1/10!, 1/8!
  c = c * p2 + -0x1.6c16c2p-10f;                      // -1/6!
  c = c * p2 + 0x1.555556p-5f;                        // 1/4!
  c = c * p2 + -0.5f;
  const float cos_p = c * p2 + 1.0f;
  const float sin_a = h ? cos_p : sin_p;
  const float cos_a = h ? sin_p : cos_p;
  const bool odd = (q & 1u) != 0;
  const float ct = odd ? sin_a : cos_a;
  const float st = odd ? cos_a : sin_a;
  // negate (flip the sign bit) cos for q = 1, 2 and sin for q = 2, 3; branch-free
  cos_t = fd_bits_float(fd_float_bits(ct) ^ (((q ^ (q >> 1)) & 1u) << 31));
  sin_t = fd_bits_float(fd_float_bits(st) ^ ((q >> 1) << 31));
}

// The two normals (R cos θ, R sin θ) of the word pair (U, V).
FD_HD void box_muller(uint32_t U, uint32_t V, float& z_cos, float& z_sin) {
  const float r = fd_radius(U);
  float ct, st;
  fd_cos_sin(V, ct, st);
  z_cos = r * ct;
  z_sin = r * st;
}

// The normal of element i of a sample (lane i % 4 of group i / 4); one Philox call per element.
FD_HD float normal_at(uint64_t seed, uint32_t step, uint64_t i) {
  const Philox4 r = philox_group(seed, step, i >> 2);
  const uint32_t lane = static_cast<uint32_t>(i & 3u);
  const uint32_t U = lane < 2 ? r.r0 : r.r2;
  const uint32_t V = lane < 2 ? r.r1 : r.r3;
  float zc, zs;
  box_muller(U, V, zc, zs);
  return (lane & 1u) ? zs : zc;
}

}  // namespace fastdiff
