// AVX2 lanes for the templates of philox.h / step.h: 8 x uint32 / float32 per register.
// Only IEEE-exact operations (add, sub, mul, div, sqrt are correctly rounded; no fma).
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace fastdiff {
namespace cpu {
namespace {

struct V8U {
  __m256i v;
  V8U() = default;
  V8U(__m256i a) : v(a) {}
  V8U(uint32_t s) : v(_mm256_set1_epi32(static_cast<int>(s))) {}
};
struct V8F {
  __m256 v;
  V8F() = default;
  V8F(__m256 a) : v(a) {}
  V8F(float s) : v(_mm256_set1_ps(s)) {}
};
struct V8M {  // a lane mask: all ones or all zeros per 32-bit lane
  __m256i v;
};

inline V8U operator>>(V8U a, int n) { return _mm256_srli_epi32(a.v, n); }
inline V8U operator<<(V8U a, int n) { return _mm256_slli_epi32(a.v, n); }
inline V8U operator&(V8U a, V8U b) { return _mm256_and_si256(a.v, b.v); }
inline V8U operator|(V8U a, V8U b) { return _mm256_or_si256(a.v, b.v); }
inline V8U operator^(V8U a, V8U b) { return _mm256_xor_si256(a.v, b.v); }
inline V8U operator+(V8U a, V8U b) { return _mm256_add_epi32(a.v, b.v); }
inline V8U operator-(V8U a, V8U b) { return _mm256_sub_epi32(a.v, b.v); }
inline V8M operator==(V8U a, V8U b) { return {_mm256_cmpeq_epi32(a.v, b.v)}; }
inline V8F operator+(V8F a, V8F b) { return _mm256_add_ps(a.v, b.v); }
inline V8F operator-(V8F a, V8F b) { return _mm256_sub_ps(a.v, b.v); }
inline V8F operator*(V8F a, V8F b) { return _mm256_mul_ps(a.v, b.v); }
inline V8F operator/(V8F a, V8F b) { return _mm256_div_ps(a.v, b.v); }
inline V8M operator<(V8F a, V8F b) { return {_mm256_castps_si256(_mm256_cmp_ps(a.v, b.v, _CMP_LT_OQ))}; }
inline V8M operator>(V8F a, V8F b) { return {_mm256_castps_si256(_mm256_cmp_ps(a.v, b.v, _CMP_GT_OQ))}; }

// Philox lanes: 8 counters as two registers of 4 64-bit lanes, each word in the low 32 bits. vpmuludq
// reads only those, so a round is one multiply + one in-lane shuffle per product (a shuffle, not a shift: Zen 2
// shifts on one pipe; 1.03x); the high halves hold garbage that nothing reads.
struct W8U {
  __m256i e, o;  // counters 0..3 and 4..7
  W8U() = default;
  W8U(__m256i a, __m256i b) : e(a), o(b) {}
  W8U(uint32_t s) : e(_mm256_set1_epi32(static_cast<int>(s))), o(e) {}
};
inline W8U operator^(W8U a, W8U b) { return {_mm256_xor_si256(a.e, b.e), _mm256_xor_si256(a.o, b.o)}; }

struct Avx2Philox {
  using U = W8U;
  static void mulhilo(uint32_t k, U a, U& hi, U& lo) {
    const __m256i kk = _mm256_set1_epi32(static_cast<int>(k));
    lo = {_mm256_mul_epu32(a.e, kk), _mm256_mul_epu32(a.o, kk)};
    constexpr int kHighDown = _MM_SHUFFLE(3, 3, 1, 1);
    hi = {_mm256_shuffle_epi32(lo.e, kHighDown), _mm256_shuffle_epi32(lo.o, kHighDown)};
  }
  // (c0, c1) of groups g .. g+7: the low and high words of the 64-bit group index. The groups sit in the order
  // (0, 2, 1, 3 | 4, 6, 5, 7) so that to_lanes' one in-lane shuffle puts group 2m in lane m and group 2m + 1 in lane
  // 4 + m, the order in which Avx2Lanes::store_groups writes whole registers.
  static void counters(uint64_t g, U& c0, U& c1) {
    const __m256i base = _mm256_set1_epi64x(static_cast<long long>(g));
    c0 = {_mm256_add_epi64(base, _mm256_setr_epi64x(0, 2, 1, 3)), _mm256_add_epi64(base, _mm256_setr_epi64x(4, 6, 5, 7))};
    c1 = {_mm256_srli_epi64(c0.e, 32), _mm256_srli_epi64(c0.o, 32)};
  }
  // The 8 words packed in one register by one in-lane shuffle, (e0, e1, o0, o1 | e2, e3, o2, o3): lane m holds
  // group 2m and lane 4 + m group 2m + 1 (see counters).
  static V8U to_lanes(U a) {
    return _mm256_castps_si256(
        _mm256_shuffle_ps(_mm256_castsi256_ps(a.e), _mm256_castsi256_ps(a.o), _MM_SHUFFLE(2, 0, 2, 0)));
  }
};

struct Avx2Lanes {
  using Philox = Avx2Philox;
  using U = V8U;
  using F = V8F;
  using M = V8M;
  static constexpr int width = 8;
  static F sel(M m, F a, F b) { return _mm256_blendv_ps(b.v, a.v, _mm256_castsi256_ps(m.v)); }
  static U sel(M m, U a, U b) { return _mm256_blendv_epi8(b.v, a.v, m.v); }
  static F to_float(U v) { return _mm256_cvtepi32_ps(v.v); }
  static U bits(F f) { return _mm256_castps_si256(f.v); }
  static F from_bits(U u) { return _mm256_castsi256_ps(u.v); }
  static F sqrt(F x) { return _mm256_sqrt_ps(x.v); }
  // 32x32 -> 64: vpmuludq multiplies the even lanes; the odd ones are shifted down first.
  static void mulhilo(uint32_t k, U a, U& hi, U& lo) {
    const __m256i kk = _mm256_set1_epi32(static_cast<int>(k));
    const __m256i even = _mm256_mul_epu32(a.v, kk);
    const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a.v, 32), kk);
    hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
    lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  }
  static U iota(uint32_t base) {
    return _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(base)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static U load(const uint32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static F loadf(const float* p) { return _mm256_loadu_ps(p); }
  // z[4g + 0..3] = (c0, s0, c1, s1) of group g, for the 8 groups of the lanes: lane m holds group 2m and lane 4 + m
  // group 2m + 1 (Avx2Philox::counters), so each transposed register is two whole groups in place.
  static void store_groups(float* z, F c0, F s0, F c1, F s1) {
    const __m256 plo = _mm256_unpacklo_ps(c0.v, s0.v), phi = _mm256_unpackhi_ps(c0.v, s0.v);
    const __m256 qlo = _mm256_unpacklo_ps(c1.v, s1.v), qhi = _mm256_unpackhi_ps(c1.v, s1.v);
    // r_m, 128-bit lane k: the four outputs of lane 4k + m, i.e. groups (2m | 2m + 1)
    const __m256 r0 = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(plo), _mm256_castps_pd(qlo)));
    const __m256 r1 = _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(plo), _mm256_castps_pd(qlo)));
    const __m256 r2 = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(phi), _mm256_castps_pd(qhi)));
    const __m256 r3 = _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(phi), _mm256_castps_pd(qhi)));
    _mm256_storeu_ps(z, r0);
    _mm256_storeu_ps(z + 8, r1);
    _mm256_storeu_ps(z + 16, r2);
    _mm256_storeu_ps(z + 24, r3);
  }
};

struct Avx2F32 {
  using T = float;
  static V8F load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V8F v) { _mm256_storeu_ps(p, v.v); }
};

struct Avx2F16 {  // F16C: IEEE binary16 <-> float32, exact up, round-to-nearest-even down
  using T = uint16_t;
  static V8F load(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static void store(uint16_t* p, V8F v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
};

struct Avx2BF16 {  // bfloat16 = the top half of a float32; rounding as c10::BFloat16
  using T = uint16_t;
  static V8F load(const uint16_t* p) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
  static void store(uint16_t* p, V8F v) {
    V8U r = bf16_round_bits(Avx2Lanes::bits(v));
    r = Avx2Lanes::sel(V8M{_mm256_castps_si256(_mm256_cmp_ps(v.v, v.v, _CMP_UNORD_Q))}, V8U(0x7FC0u), r);
    // 32 -> 16 bits (values <= 0xFFFF): packus works per 128-bit lane, then the two halves are joined
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r.v, r.v), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
  }
};

}  // namespace
}  // namespace cpu
}  // namespace fastdiff
