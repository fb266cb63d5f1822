"""The suite of a bench run: which step sizes, nets, batches, samplers and implementations a mode measures,
and how long each case is timed."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .constants import KIB, MIB, NETS, PEER_IMPLS, STEP_IMPLS

Setting = tuple[str, int, str, int]  # (net, batch, sampler, steps)
MODES = ("smoke", "quick", "full")


@dataclass
class Suite:
    """The cases of one bench run (the jobs are their products) and the timing of each section."""

    step_sizes: list[int]
    step_dtypes: list[str]
    step_impls: list[str]
    e2e: list[Setting]  # engine rows
    e2e_impls: list[str]
    peers: list[Setting]
    peer_impls: list[str]
    step_timing: dict
    e2e_timing: dict
    case_budget_s: float  # e2e/peer cases estimated to take longer are skipped


def make_suite(mode: str, device: torch.device) -> Suite:
    """smoke (tests: seconds), quick (small sizes, digits only) or full (every size, both nets, torch.compile)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
    cuda = device.type == "cuda"
    samplers_full = [("ddpm", 1000), ("ddim", 10), ("ddim", 20), ("ddim", 50), ("ddim", 100)]
    if mode == "smoke":
        return Suite([64 * KIB], ["fp32"], ["fused", "eager", "copy"],
                     [("digits", 1, "ddim", 2), ("digits", 1, "ddpm", 3)], ["engine"],
                     [("digits", 1, "ddim", 2)], ["engine", "eager", "diffusers"],
                     {"warmup": 1, "min_runs": 3, "max_runs": 5, "budget_s": 0.1},
                     {"warmup": 0, "min_runs": 2, "max_runs": 3, "budget_s": 0.1}, 10.0)
    if mode == "quick":
        return Suite([64 * KIB, 1 * MIB], ["fp32", "bf16"], ["fused", "eager", "copy"],
                     [(net, b, s, n) for net in ["digits"] for b in (1, 16)
                      for s, n in [("ddpm", 10), ("ddim", 10), ("ddim", 20)]], ["engine"],
                     [("digits", 1, "ddim", 20), ("digits", 1, "ddpm", 10)],
                     ["engine", "engine-bf16", "eager", "diffusers"],
                     {"warmup": 3, "min_runs": 10, "max_runs": 50, "budget_s": 0.5},
                     {"warmup": 1, "min_runs": 3, "max_runs": 10, "budget_s": 2.0}, 30.0)
    sizes = [64 * KIB * 4**i for i in range(6 if cuda else 5)]  # 64K..64M (CPU: ..16M)
    return Suite(sizes, ["fp32", "bf16"], list(STEP_IMPLS),
                 [(net, b, s, n) for net in NETS for b in (1, 16, 128) for s, n in samplers_full],
                 ["engine", "engine-bf16"] if cuda else ["engine"],
                 [(net, b, s, n) for net in NETS for b in (1, 16) for s, n in [("ddim", 50), ("ddpm", 100)]],
                 list(PEER_IMPLS),
                 {"warmup": 5, "min_runs": 20, "max_runs": 200, "budget_s": 1.0},
                 {"warmup": 1, "min_runs": 3, "max_runs": 20, "budget_s": 5.0}, 300.0 if cuda else 120.0)
