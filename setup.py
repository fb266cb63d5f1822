"""Build of fastdiff and its fused-step extension fastdiff._C.

The CPU kernel (csrc/ops.cpp) is always built; the CUDA kernel (csrc/cuda/step.cu) is added when
torch is a CUDA build and nvcc is found. Knobs (environment):
  FASTDIFF_NO_EXTENSION=1    build no extension (fastdiff.ops falls back to the PyTorch reference)
  FASTDIFF_FORCE_CUDA=1      build the CUDA kernel even if nvcc/CUDA detection says no (=0: never)
  FASTDIFF_CUDA_ARCH_LIST    GPU architectures (default "8.0;8.6;9.0"; exported as TORCH_CUDA_ARCH_LIST)
  FASTDIFF_SHARED_LIBSTDCXX=1  link libstdc++.so.6 by name, for a compiler that links libstdc++ statically
                             (the extension must share torch's C++ runtime: see benchmarks/gpu_check.sh)
  MAX_JOBS                   parallel compile jobs (honoured by torch.utils.cpp_extension)
"""
from __future__ import annotations

import os
import shutil
import site
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent.resolve()
# Host compiler flags of the extension (benchmarks/noise_ab.sh reads them from here). -fno-math-errno and
# -fno-trapping-math change no result; they let the loops if-convert and vectorise. On Linux (GCC), its
# pre-allocation scheduler, off on x86 by default, interleaves the independent noise chains (same results).
HOST_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]
LINUX_HOST_FLAGS = ["-fschedule-insns", "-fsched-pressure"]


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _nvidia_include_dirs() -> list[str]:
    """Headers of the pip CUDA wheels (the local toolkit may lack e.g. cusparse.h)."""
    dirs = []
    for sp in {*site.getsitepackages(), site.getusersitepackages(), *sys.path}:
        for sub in ("cu13", "cu12"):
            inc = Path(sp) / "nvidia" / sub / "include"
            if inc.is_dir() and str(inc) not in dirs:
                dirs.append(str(inc))
    return dirs


def _extensions() -> tuple[list, dict]:
    if _flag("FASTDIFF_NO_EXTENSION"):
        return [], {}
    if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH") and Path("/usr/local/cuda/bin/nvcc").exists():
        os.environ["CUDA_HOME"] = "/usr/local/cuda"  # before importing cpp_extension, which guesses once
    import torch
    from torch.utils import cpp_extension as ce

    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or ce.CUDA_HOME
    nvcc = shutil.which("nvcc") or (cuda_home and shutil.which("nvcc", path=str(Path(cuda_home) / "bin")))
    force = os.environ.get("FASTDIFF_FORCE_CUDA", "").strip()
    with_cuda = _flag("FASTDIFF_FORCE_CUDA") or (force != "0" and bool(torch.version.cuda and nvcc))
    # No -std flag: torch picks the one its headers need (C++20 for torch >= 2.10; C++17 fails).
    host = HOST_FLAGS + (LINUX_HOST_FLAGS if sys.platform.startswith("linux") else [])
    # csrc/cpu/step_avx*.cpp: the AVX2 / AVX-512 kernels (per-function ISA targets, picked at load time)
    sources = ["csrc/ops.cpp", "csrc/cpu/step_avx2.cpp", "csrc/cpu/step_avx512.cpp"]
    sources.append("csrc/multistep.cpp")  # DPM-Solver++ multistep_step (its own schema fragment)
    args = {"cxx": host}
    kwargs = {"extra_link_args": ["-fopenmp"], "include_dirs": [str(ROOT / "csrc")]}
    if _flag("FASTDIFF_SHARED_LIBSTDCXX"):  # resolves std:: before the driver's own (static) libstdc++ is searched
        kwargs["extra_link_args"].append("-l:libstdc++.so.6")
    if with_cuda:
        os.environ["TORCH_CUDA_ARCH_LIST"] = os.environ.get("FASTDIFF_CUDA_ARCH_LIST", "8.0;8.6;9.0")
        sources += ["csrc/cuda/step.cu", "csrc/cuda/multistep.cu"]
        args["nvcc"] = ["-O3", "-fmad=false", "-prec-div=true", "-prec-sqrt=true", "-ftz=false"]
        kwargs["include_dirs"] += _nvidia_include_dirs()
        ext = ce.CUDAExtension("fastdiff._C", sources, extra_compile_args=args, **kwargs)
    else:
        ext = ce.CppExtension("fastdiff._C", sources, extra_compile_args=args, **kwargs)
    return [ext], {"build_ext": ce.BuildExtension}


ext_modules, cmdclass = _extensions()

setup(
    name="fastdiff",
    version="0.1.0",
    description="Fast diffusion sampling for PyTorch: fused reverse-step kernels, graph-captured sampling, ONNX export",
    packages=find_packages(include=["fastdiff", "fastdiff.*"]),
    package_data={"fastdiff": ["assets/*", "assets/*/*", "serve/static/*"]},
    python_requires=">=3.10",
    install_requires=[
        "torch", "numpy", "safetensors", "tqdm", "pillow", "scikit-learn",
        "onnx", "onnxruntime", "onnxscript", "matplotlib", "scipy",
    ],
    extras_require={"test": ["pytest", "pytest-benchmark", "diffusers", "transformers", "fastapi", "uvicorn", "httpx",
                             "playwright", "hypothesis"],
                    "bench": ["diffusers"], "serve": ["fastapi", "uvicorn", "httpx"],
                    "diffusers": ["diffusers", "transformers"]},
    entry_points={"console_scripts": ["fastdiff=fastdiff.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
