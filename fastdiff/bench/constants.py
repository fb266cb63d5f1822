"""Names and sizes shared by the benchmark modules."""
from __future__ import annotations

import torch

KIB, MIB = 1 << 10, 1 << 20
DTYPE_NAMES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
STEP_IMPLS = ("fused", "eager", "compile", "copy")
PEER_IMPLS = ("engine", "engine-bf16", "eager", "compile", "diffusers")
NETS = ("cifar-ddpm", "digits")
SECTIONS = ("step", "peers", "e2e")


def fmt_size(n: int) -> str:
    """64K, 1M, ...: an element count as the tables and targets write it."""
    return f"{n // MIB}M" if n >= MIB else f"{n // KIB}K"
