// AVX-512 lanes for the templates of philox.h / step.h: 16 x uint32 / float32 per register.
// Only IEEE-exact operations (add, sub, mul, div, sqrt are correctly rounded; no fma).
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace fastdiff {
namespace cpu {
namespace {

struct V16U {
  __m512i v;
  V16U() = default;
  V16U(__m512i a) : v(a) {}
  V16U(uint32_t s) : v(_mm512_set1_epi32(static_cast<int>(s))) {}
};
struct V16F {
  __m512 v;
  V16F() = default;
  V16F(__m512 a) : v(a) {}
  V16F(float s) : v(_mm512_set1_ps(s)) {}
};

inline V16U operator>>(V16U a, int n) { return _mm512_srli_epi32(a.v, n); }
inline V16U operator<<(V16U a, int n) { return _mm512_slli_epi32(a.v, n); }
inline V16U operator&(V16U a, V16U b) { return _mm512_and_si512(a.v, b.v); }
inline V16U operator|(V16U a, V16U b) { return _mm512_or_si512(a.v, b.v); }
inline V16U operator^(V16U a, V16U b) { return _mm512_xor_si512(a.v, b.v); }
inline V16U operator+(V16U a, V16U b) { return _mm512_add_epi32(a.v, b.v); }
inline V16U operator-(V16U a, V16U b) { return _mm512_sub_epi32(a.v, b.v); }
inline __mmask16 operator==(V16U a, V16U b) { return _mm512_cmpeq_epu32_mask(a.v, b.v); }
inline V16F operator+(V16F a, V16F b) { return _mm512_add_ps(a.v, b.v); }
inline V16F operator-(V16F a, V16F b) { return _mm512_sub_ps(a.v, b.v); }
inline V16F operator*(V16F a, V16F b) { return _mm512_mul_ps(a.v, b.v); }
inline V16F operator/(V16F a, V16F b) { return _mm512_div_ps(a.v, b.v); }
inline __mmask16 operator<(V16F a, V16F b) { return _mm512_cmp_ps_mask(a.v, b.v, _CMP_LT_OQ); }  // NaN: false
inline __mmask16 operator>(V16F a, V16F b) { return _mm512_cmp_ps_mask(a.v, b.v, _CMP_GT_OQ); }

// Philox lanes: 16 counters as two registers of 8 64-bit lanes, each word in the low 32 bits. vpmuludq
// reads only those, so a round is one multiply + one in-lane shuffle per product (a shuffle, not a shift: on
// Intel a shift needs the port vpmuludq uses; 1.067x with the lane order below on a Xeon); the high halves hold
// garbage that nothing reads.
struct W16U {
  __m512i e, o;  // counters 0..7 and 8..15
  W16U() = default;
  W16U(__m512i a, __m512i b) : e(a), o(b) {}
  W16U(uint32_t s) : e(_mm512_set1_epi32(static_cast<int>(s))), o(e) {}
};
inline W16U operator^(W16U a, W16U b) { return {_mm512_xor_si512(a.e, b.e), _mm512_xor_si512(a.o, b.o)}; }

struct Avx512Philox {
  using U = W16U;
  static void mulhilo(uint32_t k, U a, U& hi, U& lo) {
    const __m512i kk = _mm512_set1_epi32(static_cast<int>(k));
    lo = {_mm512_mul_epu32(a.e, kk), _mm512_mul_epu32(a.o, kk)};
    hi = {_mm512_shuffle_epi32(lo.e, _MM_PERM_DDBB), _mm512_shuffle_epi32(lo.o, _MM_PERM_DDBB)};
  }
  // (c0, c1) of groups g .. g+15: the low and high words of the 64-bit group index. The groups sit in the order
  // (0, 4, 1, 5, 2, 6, 3, 7 | 8, 12, 9, 13, 10, 14, 11, 15) so that to_lanes' one in-lane shuffle puts group 4m + k
  // in lane 4k + m, the order in which Avx512Lanes::store_groups writes whole registers.
  static void counters(uint64_t g, U& c0, U& c1) {
    const __m512i base = _mm512_set1_epi64(static_cast<long long>(g));
    c0 = {_mm512_add_epi64(base, _mm512_setr_epi64(0, 4, 1, 5, 2, 6, 3, 7)),
          _mm512_add_epi64(base, _mm512_setr_epi64(8, 12, 9, 13, 10, 14, 11, 15))};
    c1 = {_mm512_srli_epi64(c0.e, 32), _mm512_srli_epi64(c0.o, 32)};
  }
  // The 16 words packed in one register by one in-lane shuffle: 128-bit lane k holds (e[2k], e[2k + 1], o[2k],
  // o[2k + 1]), i.e. lane 4k + m holds group 4m + k (see counters).
  static V16U to_lanes(U a) {
    return _mm512_castps_si512(
        _mm512_shuffle_ps(_mm512_castsi512_ps(a.e), _mm512_castsi512_ps(a.o), _MM_SHUFFLE(2, 0, 2, 0)));
  }
};

struct Avx512Lanes {
  using Philox = Avx512Philox;
  using U = V16U;
  using F = V16F;
  using M = __mmask16;
  static constexpr int width = 16;
  static F sel(M m, F a, F b) { return _mm512_mask_blend_ps(m, b.v, a.v); }
  static U sel(M m, U a, U b) { return _mm512_mask_blend_epi32(m, b.v, a.v); }
  static F to_float(U v) { return _mm512_cvtepi32_ps(v.v); }
  static U bits(F f) { return _mm512_castps_si512(f.v); }
  static F from_bits(U u) { return _mm512_castsi512_ps(u.v); }
  static F sqrt(F x) { return _mm512_sqrt_ps(x.v); }
  // 32x32 -> 64: vpmuludq multiplies the even lanes; the odd ones are shifted down first.
  static void mulhilo(uint32_t k, U a, U& hi, U& lo) {
    const __m512i kk = _mm512_set1_epi32(static_cast<int>(k));
    const __m512i even = _mm512_mul_epu32(a.v, kk);
    const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a.v, 32), kk);
    hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
    lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
  }
  static U iota(uint32_t base) {
    return _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(base)),
                            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  }
  static U load(const uint32_t* p) { return _mm512_loadu_si512(p); }
  static F loadf(const float* p) { return _mm512_loadu_ps(p); }
  // z[4g + 0..3] = (c0, s0, c1, s1) of group g, for the 16 groups of the lanes: lane 4k + m holds group 4m + k
  // (Avx512Philox::counters), so each transposed register is four whole groups in place.
  static void store_groups(float* z, F c0, F s0, F c1, F s1) {
    const __m512 plo = _mm512_unpacklo_ps(c0.v, s0.v), phi = _mm512_unpackhi_ps(c0.v, s0.v);
    const __m512 qlo = _mm512_unpacklo_ps(c1.v, s1.v), qhi = _mm512_unpackhi_ps(c1.v, s1.v);
    // r_m, 128-bit lane k: the four outputs of lane 4k + m, i.e. group 4m + k
    const __m512 r0 = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(plo), _mm512_castps_pd(qlo)));
    const __m512 r1 = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(plo), _mm512_castps_pd(qlo)));
    const __m512 r2 = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(phi), _mm512_castps_pd(qhi)));
    const __m512 r3 = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(phi), _mm512_castps_pd(qhi)));
    _mm512_storeu_ps(z, r0);
    _mm512_storeu_ps(z + 16, r1);
    _mm512_storeu_ps(z + 32, r2);
    _mm512_storeu_ps(z + 48, r3);
  }
};

struct Avx512F32 {
  using T = float;
  static V16F load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V16F v) { _mm512_storeu_ps(p, v.v); }
};

struct Avx512F16 {  // IEEE binary16 <-> float32 in hardware: exact up, round-to-nearest-even down
  using T = uint16_t;
  static V16F load(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static void store(uint16_t* p, V16F v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
};

struct Avx512BF16 {  // bfloat16 = the top half of a float32; rounding as c10::BFloat16
  using T = uint16_t;
  static V16F load(const uint16_t* p) {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  }
  static void store(uint16_t* p, V16F v) {
    V16U r = bf16_round_bits(Avx512Lanes::bits(v));
    r = Avx512Lanes::sel(_mm512_cmp_ps_mask(v.v, v.v, _CMP_UNORD_Q), V16U(0x7FC0u), r);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r.v));
  }
};

}  // namespace
}  // namespace cpu
}  // namespace fastdiff
