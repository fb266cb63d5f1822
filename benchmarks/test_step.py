"""(a) The reverse step alone: fused op vs diffusers-style eager step vs torch.compile of it, and the
same-size device copy (the roofline). `--benchmark-group-by=param:numel,param:dtype` compares them."""
from __future__ import annotations

import pytest

from fastdiff import bench

from bench_config import CUDA, DEVICE, FULL, full_only, gpu_only

M = bench.MIB
SIZES = [pytest.param(64 * bench.KIB, id="64K"), pytest.param(1 * M, id="1M"),
         pytest.param(16 * M, id="16M", marks=[] if (CUDA or FULL) else [full_only]),
         pytest.param(64 * M, id="64M", marks=[gpu_only])]
IMPLS = ["fused", "eager", "copy", pytest.param("compile", marks=[] if FULL else [full_only])]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("numel", SIZES)
@pytest.mark.parametrize("impl", IMPLS)
def test_step(run_case, impl, numel, dtype):
    case = bench.step_case(impl, numel, dtype, DEVICE)
    run_case(case, rounds=20 if numel <= M else 5, warmup=3)
