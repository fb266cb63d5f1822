"""Names and sizes shared by the benchmark modules."""
from __future__ import annotations

import torch

KIB, MIB = 1 << 10, 1 << 20
DTYPE_NAMES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
STEP_IMPLS = ("fused", "eager", "compile", "copy")
# engine: runtime "auto" (cuda-graph on CUDA, ort on the CPU); engine-torch / engine-int8: the eager torch and
# the INT8 ONNX runtime of the Engine; engine-unsplit: the ort runtime with the batch in one loop (workers=1);
# ort-fp32 / ort-int8: the torch-free ONNX sampler (fastdiff.export.runtime)
PEER_IMPLS = ("engine", "engine-bf16", "engine-torch", "engine-int8", "engine-unsplit", "ort-fp32", "ort-int8", "eager",
              "compile", "diffusers")
# one forward of the network (the model section); fp32-peak: the machine's fp32 convolution throughput, timed with
# them (PEAK_CONV: a dense 3x3 conv, batch 64, 128 -> 128 channels, 8x8, channels_last, torch's oneDNN: the
# fastest of the shapes tried on a 2-core EPYC, ~235 GFLOP/s alone)
MODEL_IMPLS = ("torch", "ort-fp32", "ort-int8", "fp32-peak")
PEAK_CONV = (64, 128, 8)
NETS = ("cifar-ddpm", "digits")
SECTIONS = ("step", "model", "peers", "e2e")


def fmt_size(n: int) -> str:
    """64K, 1M, ...: an element count as the tables and targets write it."""
    return f"{n // MIB}M" if n >= MIB else f"{n // KIB}K"
