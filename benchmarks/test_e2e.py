"""(b) End to end with the engine: DDPM vs DDIM at a few step counts; cifar-ddpm and large batches on GPU."""
from __future__ import annotations

import pytest

from fastdiff import bench

from bench_config import DEVICE, FULL, gpu_only

CASES = [
    pytest.param("digits", 1, "ddim", 10, id="digits-b1-ddim10"),
    pytest.param("digits", 1, "ddpm", 10, id="digits-b1-ddpm10"),
    pytest.param("digits", 16, "ddim", 10, id="digits-b16-ddim10"),
    pytest.param("cifar-ddpm", 1, "ddim", 50, id="cifar-b1-ddim50", marks=gpu_only),
    pytest.param("cifar-ddpm", 128, "ddim", 50, id="cifar-b128-ddim50", marks=gpu_only),
    pytest.param("cifar-ddpm", 1, "ddpm", 1000, id="cifar-b1-ddpm1000", marks=gpu_only),
]


@pytest.mark.parametrize("impl", ["engine", pytest.param("engine-bf16", marks=gpu_only)])
@pytest.mark.parametrize("net,batch,sampler,steps", CASES)
def test_e2e(run_case, impl, net, batch, sampler, steps):
    case = bench.e2e_case(impl, net, batch, sampler, steps, DEVICE)
    run_case(case, rounds=3 if steps >= 1000 else (5 if FULL else 3), warmup=1)
