// A/B of two builds of the CPU noise kernel: bit-equal outputs, then the median of per-round speed ratios (each
// round times A and B once each on the same 256K normals, in alternating order).
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include "cpu/kernels.h"  // kBlock (the working tree's)

using Noise = void (*)(uint64_t, uint32_t, uint64_t, int64_t, float*);
void avx2_a(uint64_t, uint32_t, uint64_t, int64_t, float*);
void avx2_b(uint64_t, uint32_t, uint64_t, int64_t, float*);
void avx512_a(uint64_t, uint32_t, uint64_t, int64_t, float*);
void avx512_b(uint64_t, uint32_t, uint64_t, int64_t, float*);

static double run(Noise f, int64_t groups, float* z) {
  const auto t0 = std::chrono::steady_clock::now();
  using fastdiff::cpu::kBlock;
  for (int64_t g = 0; g < groups; g += kBlock) f(1234, 7, static_cast<uint64_t>(g), kBlock, z + 4 * g);
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

static double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

static int compare(const char* isa, Noise a, Noise b) {
  const int64_t groups = 1 << 16, n = 4 * groups;
  std::vector<float> za(n + 64), zb(n + 64);
  for (uint64_t seed : {0ull, 1ull, 0xdeadbeefcafeull}) {
    for (int64_t k : {1, 3, 7, 8, 9, 15, 16, 17, 63, 64, 1000}) {
      std::fill(za.begin(), za.end(), 0.f);
      std::fill(zb.begin(), zb.end(), 0.f);
      a(seed, 3, 12345, k, za.data());
      b(seed, 3, 12345, k, zb.data());
      if (std::memcmp(za.data(), zb.data(), 4 * sizeof(float) * k)) {
        std::printf("%s: the two builds' normals differ (seed %llu, %lld groups)\n", isa, (unsigned long long)seed,
                    (long long)k);
        return 1;
      }
    }
  }
  std::vector<double> ratio, tb;
  for (int r = 0; r < 600; ++r) {
    const bool a_first = r % 2 == 0;
    const double t1 = run(a_first ? a : b, groups, a_first ? za.data() : zb.data());
    const double t2 = run(a_first ? b : a, groups, a_first ? zb.data() : za.data());
    const double ta = a_first ? t1 : t2, t = a_first ? t2 : t1;
    ratio.push_back(ta / t);
    tb.push_back(t);
  }
  std::printf("%s: same bits; B %.2f ns a normal (one thread, median); speed-up B over A %.3fx (median of 600 "
              "paired rounds)\n", isa, median(tb) * 1e9 / n, median(ratio));
  return 0;
}

int main() {
  __builtin_cpu_init();
  int rc = 0;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c")) rc |= compare("avx2", avx2_a, avx2_b);
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq"))
    rc |= compare("avx512", avx512_a, avx512_b);
  else
    std::printf("avx512: not on this CPU\n");
  return rc;
}
