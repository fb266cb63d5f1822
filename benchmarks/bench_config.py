"""Settings of the pytest-benchmark suite (a module of its own, not conftest: tests/ has a conftest too)."""
from __future__ import annotations

import os

import pytest
import torch

FULL = os.environ.get("FASTDIFF_BENCH_FULL", "").lower() in ("1", "true", "yes")
DEVICE = torch.device(os.environ.get("FASTDIFF_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
CUDA = DEVICE.type == "cuda"
THREADS = int(os.environ.get("FASTDIFF_BENCH_THREADS", "0") or 0)
if THREADS:  # e.g. 1 on a machine shared with other jobs: oversubscribed OpenMP threads spin and stall
    torch.set_num_threads(THREADS)
gpu_only = pytest.mark.skipif(not CUDA, reason="GPU-only case (no CUDA device)")
cpu_only = pytest.mark.skipif(CUDA, reason="CPU-only case (the ONNX Runtime CPU rows)")
full_only = pytest.mark.skipif(not FULL, reason="set FASTDIFF_BENCH_FULL=1")
