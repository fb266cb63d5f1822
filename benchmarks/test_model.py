"""(m) One forward of the network: eager torch vs the engine's ONNX Runtime model, fp32 and INT8 (CPU rows)."""
from __future__ import annotations

import pytest

from fastdiff import bench

from bench_config import DEVICE, FULL, cpu_only

BATCHES = [1, 16, 64] if FULL else [1, 16]
NETS = ["digits", "cifar-ddpm"] if FULL else ["digits"]


@pytest.mark.parametrize("impl", ["torch", pytest.param("ort-fp32", marks=cpu_only),
                                  pytest.param("ort-int8", marks=cpu_only)])
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("net", NETS)
def test_model(run_case, net, batch, impl):
    run_case(bench.model_case(impl, net, batch, DEVICE), rounds=10 if net == "digits" else 3, warmup=1)
