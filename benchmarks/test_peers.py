"""(c) Peers on the same network and weights: the engine (each runtime) vs the torch-free ONNX sampler (fp32, INT8)
vs the eager loop vs torch.compile(max-autotune) of it vs diffusers' DDIMPipeline/DDPMPipeline (skipped when
diffusers is not installed). FASTDIFF_BENCH_FULL=1 runs the full table (slow on a small CPU)."""
from __future__ import annotations

import pytest

from fastdiff import bench

from bench_config import DEVICE, FULL, cpu_only, full_only, gpu_only

CASES = [
    pytest.param("digits", 1, "ddim", 10, id="digits-b1-ddim10"),
    pytest.param("cifar-ddpm", 1, "ddim", 50, id="cifar-b1-ddim50", marks=gpu_only),
    pytest.param("cifar-ddpm", 1, "ddpm", 100, id="cifar-b1-ddpm100", marks=gpu_only),
]
if FULL:  # the issue-14 table: both nets, batch 1/16/64, DDIM-20/50, DDPM-1000 at batch 1
    CASES += [pytest.param(net, b, s, n, id=f"{net}-b{b}-{s}{n}") for net in ("digits", "cifar-ddpm")
              for b in (1, 16, 64) for s, n in (("ddim", 20), ("ddim", 50), ("ddpm", 1000))
              if (s, n) != ("ddpm", 1000) or b == 1]
IMPLS = ["engine", "engine-torch", "eager", "diffusers", pytest.param("engine-bf16", marks=gpu_only),
         pytest.param("engine-int8", marks=cpu_only), pytest.param("ort-fp32", marks=cpu_only),
         pytest.param("ort-int8", marks=cpu_only), pytest.param("compile", marks=[] if FULL else [full_only])]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("net,batch,sampler,steps", CASES)
def test_peers(run_case, impl, net, batch, sampler, steps):
    if impl == "diffusers" and bench.diffusers_available() is None:
        pytest.skip("diffusers is not installed (pip install -e .[bench])")
    case = bench.e2e_case(impl, net, batch, sampler, steps, DEVICE)
    run_case(case, rounds=5 if FULL else 3, warmup=1)
