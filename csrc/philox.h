// Counter-based Gaussian noise: Philox4x32-10 (Random123) + a portable Box-Muller.
//
// The contract (docs/design.md §3): z(seed, step, i) is bit-identical on the host, the device,
// NumPy and PyTorch (fastdiff/noise.py mirrors every floating-point operation below, in the same order; the
// integer bit manipulations may differ where they give the same bits).
// Only float32 + - * / and sqrt, each correctly rounded; no libm, no fma (host: -ffp-contract=off,
// device: -fmad=false).
//
// The math is written ONCE, as templates over a "lanes" type L: L::U (uint32 lanes), L::F (float32
// lanes), L::M (lane masks), with the C operators plus L::sel / to_float / bits / from_bits / sqrt /
// mulhilo. ScalarLanes (below) is one lane: uint32_t, float, bool; the CPU's SIMD kernels
// (csrc/cpu/simd_*.h) instantiate the same templates with AVX2 / AVX-512 registers, so every path
// performs the same IEEE operations in the same order.
//
// Host definitions live in an unnamed namespace (internal linkage): the SIMD translation units
// compile these headers for other ISAs, and an inline function emitted by one of them must never be
// picked by the linker for another.
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

namespace {

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

// One lane: the plain C++ / CUDA types.
struct ScalarLanes {
  using U = uint32_t;
  using F = float;
  using M = bool;
  static FD_HD F sel(M m, F a, F b) { return m ? a : b; }
  static FD_HD U sel(M m, U a, U b) { return m ? a : b; }
  static FD_HD F to_float(U v) { return static_cast<float>(static_cast<int32_t>(v)); }  // as int32: exact < 2^24
  static FD_HD U bits(F f) { return fd_float_bits(f); }
  static FD_HD F from_bits(U u) { return fd_bits_float(u); }
  static FD_HD F sqrt(F x) {
#if defined(__CUDA_ARCH__)
    return __fsqrt_rn(x);
#else
    return __builtin_sqrtf(x);  // sqrtss: correctly rounded (errno off: -fno-math-errno)
#endif
  }
  // (hi, lo) 32-bit halves of the 64-bit product k * a.
  static FD_HD void mulhilo(uint32_t k, U a, U& hi, U& lo) {
    const uint64_t p = static_cast<uint64_t>(k) * a;
    hi = static_cast<uint32_t>(p >> 32);
    lo = static_cast<uint32_t>(p);
  }
};

// The round keys of Philox4x32-10: (k0, k1) plus r times the Weyl constants, r = 0..9.
struct PhiloxKeys {
  uint32_t k0[10], k1[10];
};

FD_HD PhiloxKeys philox_keys(uint32_t k0, uint32_t k1) {
  PhiloxKeys ks;
FD_UNROLL
  for (int r = 0; r < 10; ++r) {
    if (r) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    ks.k0[r] = k0;
    ks.k1[r] = k1;
  }
  return ks;
}

// Philox4x32-10 on counters (c0..c3) with the round keys ks; the result replaces the counters.
template <class L>
FD_HD void philox_rounds(typename L::U& c0, typename L::U& c1, typename L::U& c2, typename L::U& c3,
                         const PhiloxKeys& ks) {
  using U = typename L::U;
FD_UNROLL
  for (int r = 0; r < 10; ++r) {
    U hi0, lo0, hi1, lo1;
    L::mulhilo(0xD2511F53u, c0, hi0, lo0);
    L::mulhilo(0xCD9E8D57u, c2, hi1, lo1);
    c0 = hi1 ^ c1 ^ U(ks.k0[r]);
    c1 = lo1;
    c2 = hi0 ^ c3 ^ U(ks.k1[r]);
    c3 = lo0;
  }
}

// R = sqrt(-2 ln u), u = (2*(U>>9)+1) * 2^-24 in (0, 1).
template <class L>
FD_HD typename L::F radius(typename L::U U) {
  using F = typename L::F;
  using V = typename L::U;
  const F u = L::to_float((U >> 8) | V(1u)) * F(0x1p-24f);  // (U >> 8) | 1 == 2 * (U >> 9) + 1
  // u = 2^e * mant, mant in (sqrt(2)/2, sqrt(2)]: where u's significand exceeds sqrt(2) (its fraction field is
  // >= kHalve) it is halved, exactly, and e raised by one. Subtracting kHalve from u's bits borrows from the
  // exponent field exactly where it is not. (int32 arithmetic in uint32 lanes, two's complement; the same bits as
  // comparing, halving and selecting: checked for all 2^23 inputs.)
  constexpr uint32_t kHalve = 0x3504f4u;  // the fraction field of the float after sqrt(2) = 0x1.6a09e6p+0
  const V t = L::bits(u) - V(kHalve);
  const V e = (t >> 23) - V(126u);
  const F mant = L::from_bits((t & V(0x7fffffu)) + V(kHalve + (126u << 23)));
  // ln(mant) = 2 atanh(s) = 2s (1 + s^2/3 + s^4/5 + s^6/7 + s^8/9)
  const F s = (mant - F(1.0f)) / (mant + F(1.0f));
  const F s2 = s * s;
  F p = s2 * F(0x1.c71c72p-4f) + F(0x1.24924ap-3f);  // 1/9, 1/7
  p = p * s2 + F(0x1.99999ap-3f);                      // 1/5
  p = p * s2 + F(0x1.555556p-2f);                      // 1/3
  p = p * s2 + F(1.0f);
  const F ln_u = (s * F(2.0f)) * p + L::to_float(e) * F(0x1.62e430p-1f);  // ln 2
  return L::sqrt(ln_u * F(-2.0f));
}

// (cos θ, sin θ) of the angle in V: octant = top 3 bits, φ ∈ (0, π/4) from the next 23 bits.
template <class L>
FD_HD void cos_sin(typename L::U V, typename L::F& cos_t, typename L::F& sin_t) {
  using F = typename L::F;
  using W = typename L::U;
  const W o = V >> 29;
  const W q = o >> 1;
  const auto h = (o & W(1u)) == W(1u);
  W f = (V >> 6) & W(0x7fffffu);
  f = L::sel(h, W(0x7fffffu) - f, f);
  const F phi = L::to_float((f << 1) + W(1u)) * F(0x1.921fb6p-25f);
  const F p2 = phi * phi;
  F s = p2 * F(0x1.71de3ap-19f) + F(-0x1.a01a02p-13f);  // 1/9!, -1/7!
  s = s * p2 + F(0x1.111112p-7f);                        // 1/5!
  s = s * p2 + F(-0x1.555556p-3f);                       // -1/3!
  s = s * p2 + F(1.0f);
  const F sin_p = phi * s;
  F c = p2 * F(-0x1.27e4fcp-22f) + F(0x1.a01a02p-16f);  // -1/10!, 1/8!
  c = c * p2 + F(-0x1.6c16c2p-10f);                      // -1/6!
  c = c * p2 + F(0x1.555556p-5f);                        // 1/4!
  c = c * p2 + F(-0.5f);
  const F cos_p = c * p2 + F(1.0f);
  const F sin_a = L::sel(h, cos_p, sin_p);
  const F cos_a = L::sel(h, sin_p, cos_p);
  const auto odd = (q & W(1u)) == W(1u);
  const F ct = L::sel(odd, sin_a, cos_a);
  const F st = L::sel(odd, cos_a, sin_a);
  // negate (flip the sign bit) cos for q = 1, 2 and sin for q = 2, 3 (q = V >> 30); branch-free
  cos_t = L::from_bits(L::bits(ct) ^ ((V ^ (V << 1)) & W(0x80000000u)));
  sin_t = L::from_bits(L::bits(st) ^ (V & W(0x80000000u)));
}

// The two normals (R cos θ, R sin θ) of the word pair (U, V).
template <class L>
FD_HD void box_muller_lanes(typename L::U U, typename L::U V, typename L::F& z_cos, typename L::F& z_sin) {
  const typename L::F r = radius<L>(U);
  typename L::F ct, st;
  cos_sin<L>(V, ct, st);
  z_cos = r * ct;
  z_sin = r * st;
}

// --- the scalar API (CUDA kernel, portable CPU path) ----------------------------------------------
FD_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  philox_rounds<ScalarLanes>(c0, c1, c2, c3, philox_keys(k0, k1));
  return {c0, c1, c2, c3};
}

// Philox of group g (elements 4g..4g+3) of a sample with this seed at this step.
FD_HD Philox4 philox_group(uint64_t seed, uint32_t step, uint64_t g) {
  return philox4x32_10(static_cast<uint32_t>(g), static_cast<uint32_t>(g >> 32), step, 0u,
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

FD_HD float fd_radius(uint32_t U) { return radius<ScalarLanes>(U); }
FD_HD void fd_cos_sin(uint32_t V, float& cos_t, float& sin_t) { cos_sin<ScalarLanes>(V, cos_t, sin_t); }
FD_HD void box_muller(uint32_t U, uint32_t V, float& z_cos, float& z_sin) {
  box_muller_lanes<ScalarLanes>(U, V, z_cos, z_sin);
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

}  // namespace
}  // namespace fastdiff
