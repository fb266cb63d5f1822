"""pytest-benchmark suite of fastdiff: `python -m pytest benchmarks -q`.

The cases are built by fastdiff.bench (the same builders as `fastdiff bench`). GPU-only cases
skip without CUDA. FASTDIFF_BENCH_FULL=1 adds the large sizes and the torch.compile rows;
FASTDIFF_BENCH_DEVICE=cpu|cuda overrides the device (default: cuda when available);
FASTDIFF_BENCH_THREADS=N sets torch's CPU threads (default: torch's choice).
Timing: pytest-benchmark's own timer (perf_counter) around a call that synchronizes the GPU.
"""
from __future__ import annotations

import pytest
import torch

from bench_config import DEVICE
from fastdiff import bench


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture
def run_case(benchmark, device):
    """run_case(case, rounds, warmup): time case.fn with the benchmark fixture; records GB/s or images/s."""

    def run(case: bench.Case, rounds: int = 20, warmup: int = 3):
        if case.skip:
            pytest.skip(case.skip)

        def call():
            out = case.fn()
            bench.sync(device)
            return out

        with torch.inference_mode() if case.params.get("impl") != "compile" else torch.no_grad():
            result = benchmark.pedantic(call, rounds=rounds, warmup_rounds=warmup, iterations=1)
        stats = benchmark.stats.stats if benchmark.stats else None
        if stats is not None:
            benchmark.extra_info.update(case.params)
            if case.bytes:
                benchmark.extra_info["gbps"] = case.bytes / stats.median / 1e9
            if "batch" in case.params:
                benchmark.extra_info["images_per_s"] = case.params["batch"] / stats.median
        return result

    return run
