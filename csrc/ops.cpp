// fastdiff::reverse_step: schema, argument checks and the CPU kernel (OpenMP via at::parallel_for).
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#define FASTDIFF_WITH_ATEN
#include "cpu/kernels.h"
#include "step.h"

// The CPU kernel has three paths, picked at load time (FASTDIFF_CPU_ISA=avx512|avx2|scalar, default:
// the best this CPU runs) and switchable with fastdiff._C._set_cpu_isa: AVX-512 and AVX2 kernels
// (csrc/cpu/, the philox.h/step.h templates on SIMD lanes) and the portable one below, whose hot
// loops get an AVX2 clone. All run the same IEEE float32 operations, so every path is bit-identical.
#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#define FD_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define FD_CLONES
#endif

namespace fastdiff {
namespace {

enum Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };
constexpr const char* kIsaNames[] = {"scalar", "avx2", "avx512"};

int best_isa() {
#if FD_X86_SIMD
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq"))
    return kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c")) return kAvx2;
#endif
  return kScalar;
}

std::atomic<int> g_isa{-1};

// The SIMD kernel table in use, or nullptr for the portable path.
const cpu::Kernels* simd_kernels() {
  int isa = g_isa.load(std::memory_order_relaxed);
  if (isa < 0) g_isa.store(isa = best_isa());
#if FD_X86_SIMD
  return isa == kAvx512 ? &cpu::kAvx512Kernels : isa == kAvx2 ? &cpu::kAvx2Kernels : nullptr;
#else
  return nullptr;
#endif
}

// Sets the path by name ("auto": the best one); returns an error message, empty on success.
std::string set_isa(const char* name) {
  const int best = best_isa();
  if (std::strcmp(name, "auto") == 0) {
    g_isa.store(best);
    return "";
  }
  for (int i = 0; i < 3; ++i) {
    if (std::strcmp(name, kIsaNames[i]) == 0) {
      if (i > best) return std::string("this CPU cannot run the ") + name + " kernel (best: " + kIsaNames[best] + ")";
      g_isa.store(i);
      return "";
    }
  }
  return std::string("unknown CPU ISA '") + name + "'; choose auto, avx512, avx2 or scalar";
}

PyObject* py_cpu_isa(PyObject*, PyObject*) {
  simd_kernels();
  return PyUnicode_FromString(kIsaNames[g_isa.load()]);
}

PyObject* py_set_cpu_isa(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_Check(arg) ? PyUnicode_AsUTF8(arg) : nullptr;
  if (!name) {
    PyErr_SetString(PyExc_ValueError, "isa must be a str: auto, avx512, avx2 or scalar");
    return nullptr;
  }
  const std::string err = set_isa(name);
  if (!err.empty()) {
    PyErr_SetString(PyExc_ValueError, ("isa: " + err).c_str());
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyMethodDef kMethods[] = {
    {"cpu_isa", py_cpu_isa, METH_NOARGS, "The CPU kernel path in use: 'avx512', 'avx2' or 'scalar'."},
    {"_set_cpu_isa", py_set_cpu_isa, METH_O, "Switch the CPU kernel path (auto, avx512, avx2, scalar); for tests."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace
}  // namespace fastdiff

extern "C" {
// Importable as the Python module fastdiff._C; importing it runs the registrations below and reads
// FASTDIFF_CPU_ISA (a bad or unsupported value warns and keeps the best path).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, fastdiff::kMethods};
  PyObject* module = PyModule_Create(&module_def);
  const char* env = std::getenv("FASTDIFF_CPU_ISA");
  fastdiff::simd_kernels();
  if (module && env && *env) {
    const std::string err = fastdiff::set_isa(env);
    if (!err.empty() && PyErr_WarnEx(PyExc_RuntimeWarning, ("FASTDIFF_CPU_ISA: " + err).c_str(), 1) < 0) {
      Py_DECREF(module);
      return nullptr;
    }
  }
  return module;
}
}

namespace fastdiff {

PreparedStep prepare_step(const at::Tensor& x, const at::Tensor& model_output, const at::Tensor& seeds,
                          int64_t step, double a, double b, double clip_range, double k_x0, double k_x,
                          double k_m, double sigma) {
  TORCH_CHECK(x.dim() >= 1, "reverse_step: x must have a batch dimension (dim >= 1); got a 0-d tensor");
  TORCH_CHECK(x.sizes() == model_output.sizes(), "reverse_step: x and model_output must have the same shape; got ",
              x.sizes(), " and ", model_output.sizes());
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
              "reverse_step: x must be float32, float16 or bfloat16; got ", dt);
  TORCH_CHECK(model_output.scalar_type() == dt, "reverse_step: model_output must have x's dtype ", dt, "; got ",
              model_output.scalar_type());
  TORCH_CHECK(model_output.device() == x.device(), "reverse_step: model_output must be on x's device ", x.device(),
              "; got ", model_output.device());
  TORCH_CHECK(seeds.dim() == 1 && seeds.size(0) == x.size(0),
              "reverse_step: seeds must be a 1-D tensor with one seed per sample (", x.size(0), "); got shape ",
              seeds.sizes());
  TORCH_CHECK(seeds.scalar_type() == at::kLong, "reverse_step: seeds must be int64; got ", seeds.scalar_type());
  TORCH_CHECK(seeds.device() == x.device(), "reverse_step: seeds must be on x's device ", x.device(), "; got ",
              seeds.device());
  TORCH_CHECK(step >= 0 && step <= static_cast<int64_t>(std::numeric_limits<uint32_t>::max()),
              "reverse_step: step must be in [0, 2^32); got ", step);

  PreparedStep s;
  const int64_t dim = x.dim();
  const bool cl = !x.is_contiguous() && ((dim == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
                                         (dim == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d)));
  const auto fmt = cl ? (dim == 4 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::ChannelsLast3d)
                      : at::MemoryFormat::Contiguous;
  s.x = x.contiguous(fmt);
  s.m = model_output.contiguous(fmt);
  s.seeds = seeds.contiguous();
  s.out = at::empty_like(s.x, fmt);
  s.channels_last = cl;
  s.batch = x.size(0);
  s.per_sample = s.batch ? x.numel() / s.batch : 0;
  if (cl) {
    s.channels = x.size(1);
    s.spatial = s.channels ? s.per_sample / s.channels : 0;
  }
  s.step = static_cast<uint32_t>(step);
  s.p = make_step_params(a, b, clip_range, k_x0, k_x, k_m, sigma);
  return s;
}

namespace {

using cpu::kBlock;  // Philox groups per inner block (256 elements)

// z[0 .. 4n): the normals of groups g0 .. g0+n of one sample.
FD_CLONES void noise_groups(uint64_t seed, uint32_t step, uint64_t g0, int64_t n, float* z) {
  uint32_t U[2 * kBlock], V[2 * kBlock];
  float zc[2 * kBlock], zs[2 * kBlock];
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const Philox4 r = philox_group(seed, step, g0 + j);
    U[2 * j] = r.r0;
    V[2 * j] = r.r1;
    U[2 * j + 1] = r.r2;
    V[2 * j + 1] = r.r3;
  }
#pragma omp simd
  for (int64_t k = 0; k < 2 * n; ++k) box_muller(U[k], V[k], zc[k], zs[k]);
  for (int64_t k = 0; k < 2 * n; ++k) {
    z[2 * k] = zc[k];
    z[2 * k + 1] = zs[k];
  }
}

// z[k * z_stride] = the normal of element i0 + k of one sample, k in [0, n).
FD_CLONES void noise_range(uint64_t seed, uint32_t step, uint64_t i0, int64_t n, float* z, int64_t z_stride) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) z[k * z_stride] = normal_at(seed, step, i0 + static_cast<uint64_t>(k));
}

template <typename T>
void apply_step(const T* x, const T* m, T* out, const float* z, int64_t n, const StepParams& p) {
  if (z) {
#pragma omp simd
    for (int64_t e = 0; e < n; ++e)
      out[e] = static_cast<T>(step_add_noise(step_mean(static_cast<float>(x[e]), static_cast<float>(m[e]), p), z[e], p));
  } else {
#pragma omp simd
    for (int64_t e = 0; e < n; ++e)
      out[e] = static_cast<T>(step_mean(static_cast<float>(x[e]), static_cast<float>(m[e]), p));
  }
}

// The SIMD step on n elements (f16/bf16 as their raw bits).
template <typename T>
void simd_apply(const cpu::Kernels& k, const T* x, const T* m, const float* z, T* out, int64_t n, const StepParams& p) {
  if constexpr (std::is_same_v<T, float>) {
    k.step_f32(x, m, z, out, n, p);
  } else {
    using Bits = const uint16_t*;
    auto* o = reinterpret_cast<uint16_t*>(out);
    if constexpr (std::is_same_v<T, c10::Half>)
      k.step_f16(reinterpret_cast<Bits>(x), reinterpret_cast<Bits>(m), z, o, n, p);
    else
      k.step_bf16(reinterpret_cast<Bits>(x), reinterpret_cast<Bits>(m), z, o, n, p);
  }
}

// z[k * z_stride] = the normal of element i0 + k of one sample, k in [0, n), from whole groups.
void simd_noise_range(const cpu::Kernels& k, uint64_t seed, uint32_t step, uint64_t i0, int64_t n, float* z,
                      int64_t z_stride) {
  alignas(64) float buf[4 * kBlock];
  while (n > 0) {
    const uint64_t g0 = i0 >> 2;
    const int64_t skip = static_cast<int64_t>(i0 & 3u), take = std::min<int64_t>(n, 4 * kBlock - skip);
    k.noise(seed, step, g0, (skip + take + 3) / 4, buf);
    for (int64_t j = 0; j < take; ++j) z[j * z_stride] = buf[skip + j];
    i0 += static_cast<uint64_t>(take);
    z += take * z_stride;
    n -= take;
  }
}

// Contiguous: blocks of whole Philox groups inside one sample (groups never straddle samples).
template <typename T>
void step_contiguous(const PreparedStep& s, const uint64_t* seeds) {
  const T* x = s.x.const_data_ptr<T>();
  const T* m = s.m.const_data_ptr<T>();
  T* out = s.out.mutable_data_ptr<T>();
  const int64_t N = s.per_sample, G = (N + 3) / 4;
  const bool noise = s.p.sigma != 0.f;
  const cpu::Kernels* k = simd_kernels();
  at::parallel_for(0, s.batch * G, 1024, [&](int64_t begin, int64_t end) {
    alignas(64) float z[4 * kBlock];
    for (int64_t idx = begin; idx < end;) {
      const int64_t b = idx / G, g = idx - b * G;
      const int64_t n = std::min({kBlock, G - g, end - idx});
      const int64_t e0 = 4 * g, ne = std::min(N, 4 * (g + n)) - e0, off = b * N + e0;
      if (k) {
        if (noise) k->noise(seeds[b], s.step, static_cast<uint64_t>(g), n, z);
        simd_apply<T>(*k, x + off, m + off, noise ? z : nullptr, out + off, ne, s.p);
      } else {
        if (noise) noise_groups(seeds[b], s.step, static_cast<uint64_t>(g), n, z);
        apply_step<T>(x + off, m + off, out + off, noise ? z : nullptr, ne, s.p);
      }
      idx += n;
    }
  });
}

// Channels-last: memory order (b, spatial position, c); element (c, sp) has logical index c*S + sp.
template <typename T>
void step_channels_last(const PreparedStep& s, const uint64_t* seeds) {
  const T* x = s.x.const_data_ptr<T>();
  const T* m = s.m.const_data_ptr<T>();
  T* out = s.out.mutable_data_ptr<T>();
  const int64_t C = s.channels, S = s.spatial, N = s.per_sample;
  const bool noise = s.p.sigma != 0.f;
  const cpu::Kernels* k = simd_kernels();
  // spatial positions per block; the SIMD path draws each channel's run from whole Philox groups,
  // so it wants runs of >= 64 positions (the portable path draws each element alone)
  const int64_t block = std::max<int64_t>(k ? 64 : 1, 4 * kBlock / C);
  const int64_t nblk = (S + block - 1) / block;
  at::parallel_for(0, s.batch * nblk, 4, [&](int64_t begin, int64_t end) {
    std::vector<float> z(noise ? static_cast<size_t>(block * C) : 0);
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t b = idx / nblk, sp0 = (idx - b * nblk) * block, nsp = std::min(block, S - sp0);
      const int64_t off = b * N + sp0 * C;
      if (noise)
        for (int64_t c = 0; c < C; ++c) {
          const auto i0 = static_cast<uint64_t>(c * S + sp0);
          if (k)
            simd_noise_range(*k, seeds[b], s.step, i0, nsp, z.data() + c, C);
          else
            noise_range(seeds[b], s.step, i0, nsp, z.data() + c, C);
        }
      if (k)
        simd_apply<T>(*k, x + off, m + off, noise ? z.data() : nullptr, out + off, nsp * C, s.p);
      else
        apply_step<T>(x + off, m + off, out + off, noise ? z.data() : nullptr, nsp * C, s.p);
    }
  });
}

at::Tensor reverse_step_cpu(const at::Tensor& x, const at::Tensor& model_output, const at::Tensor& seeds,
                            int64_t step, double a, double b, double clip_range, double k_x0, double k_x,
                            double k_m, double sigma) {
  TORCH_CHECK(x.device().is_cpu(), "reverse_step (CPU kernel): x must be a CPU tensor; got ", x.device());
  const PreparedStep s = prepare_step(x, model_output, seeds, step, a, b, clip_range, k_x0, k_x, k_m, sigma);
  if (s.out.numel() == 0) return s.out;
  const auto* sd = reinterpret_cast<const uint64_t*>(s.seeds.const_data_ptr<int64_t>());
  const auto kernel = [&](auto tag) {
    using scalar_t = decltype(tag);
    if (s.channels_last)
      step_channels_last<scalar_t>(s, sd);
    else
      step_contiguous<scalar_t>(s, sd);
  };
  AT_DISPATCH_SWITCH(s.x.scalar_type(), "reverse_step_cpu",   // float32, float16, bfloat16 only
                     AT_DISPATCH_CASE(at::kFloat, [&] { kernel(scalar_t{}); })
                     AT_DISPATCH_CASE(at::kHalf, [&] { kernel(scalar_t{}); })
                     AT_DISPATCH_CASE(at::kBFloat16, [&] { kernel(scalar_t{}); }));
  return s.out;
}

}  // namespace

TORCH_LIBRARY(fastdiff, m) {
  m.def(
      "reverse_step(Tensor x, Tensor model_output, Tensor seeds, int step, float a, float b, float clip_range, "
      "float k_x0, float k_x, float k_m, float sigma) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastdiff, CPU, m) { m.impl("reverse_step", &reverse_step_cpu); }

}  // namespace fastdiff
