"""(c) Peers on the same network and weights: engine vs eager loop vs torch.compile(max-autotune) of it vs
diffusers' DDIMPipeline/DDPMPipeline (skipped when diffusers is not installed)."""
from __future__ import annotations

import pytest

from fastdiff import bench

from bench_config import DEVICE, FULL, full_only, gpu_only

CASES = [
    pytest.param("digits", 1, "ddim", 10, id="digits-b1-ddim10"),
    pytest.param("cifar-ddpm", 1, "ddim", 50, id="cifar-b1-ddim50", marks=gpu_only),
    pytest.param("cifar-ddpm", 1, "ddpm", 100, id="cifar-b1-ddpm100", marks=gpu_only),
]
IMPLS = ["engine", "eager", "diffusers", pytest.param("engine-bf16", marks=gpu_only),
         pytest.param("compile", marks=[] if FULL else [full_only])]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("net,batch,sampler,steps", CASES)
def test_peers(run_case, impl, net, batch, sampler, steps):
    if impl == "diffusers" and bench.diffusers_available() is None:
        pytest.skip("diffusers is not installed (pip install -e .[bench])")
    case = bench.e2e_case(impl, net, batch, sampler, steps, DEVICE)
    run_case(case, rounds=5 if FULL else 3, warmup=1)
