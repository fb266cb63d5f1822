"""The suite of a bench run: which step sizes, nets, batches, samplers and implementations a mode measures,
and how long each case is timed."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .constants import KIB, MIB, MODEL_IMPLS, NETS, PEER_IMPLS, STEP_IMPLS

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
    model: list[tuple[str, int]] = field(default_factory=list)  # (net, batch) of the one-forward rows
    model_impls: list[str] = field(default_factory=list)
    model_timing: dict = field(default_factory=dict)


def make_suite(mode: str, device: torch.device) -> Suite:
    """smoke (tests: seconds), quick (small sizes, digits only) or full (every size, both nets, every runtime;
    torch.compile on GPU only: its compile time on a small CPU exceeds a case's budget)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
    cuda = device.type == "cuda"
    samplers_full = [("ddpm", 1000), ("ddim", 10), ("ddim", 20), ("ddim", 50), ("ddim", 100)]
    model_timing = {"warmup": 2, "min_runs": 5, "max_runs": 50, "budget_s": 1.0}
    if mode == "smoke":
        return Suite([64 * KIB], ["fp32"], ["fused", "eager", "copy"],
                     [("digits", 1, "ddim", 2), ("digits", 1, "ddpm", 3)], ["engine"],
                     [("digits", 1, "ddim", 2)], ["engine", "engine-torch", "eager", "diffusers"],
                     {"warmup": 1, "min_runs": 3, "max_runs": 5, "budget_s": 0.1},
                     {"warmup": 0, "min_runs": 2, "max_runs": 3, "budget_s": 0.1}, 10.0,
                     [("digits", 1)], ["torch", "ort-fp32"], {"warmup": 1, "min_runs": 3, "max_runs": 5, "budget_s": 0.1})
    if mode == "quick":
        return Suite([64 * KIB, 1 * MIB], ["fp32", "bf16"], ["fused", "eager", "copy"],
                     [(net, b, s, n) for net in ["digits"] for b in (1, 16)
                      for s, n in [("ddpm", 10), ("ddim", 10), ("ddim", 20)]], ["engine"],
                     [("digits", 1, "ddim", 20), ("digits", 1, "ddpm", 10)],
                     ["engine", "engine-bf16", "engine-torch", "eager", "diffusers"],
                     {"warmup": 3, "min_runs": 10, "max_runs": 50, "budget_s": 0.5},
                     {"warmup": 1, "min_runs": 3, "max_runs": 10, "budget_s": 2.0}, 30.0,
                     [("digits", 1), ("digits", 16)], ["torch", "ort-fp32", "fp32-peak"], model_timing)
    sizes = [64 * KIB * 4**i for i in range(6 if cuda else 5)]  # 64K..64M (CPU: ..16M)
    if cuda:
        return Suite(sizes, ["fp32", "bf16"], list(STEP_IMPLS),
                     [(net, b, s, n) for net in NETS for b in (1, 16, 128) for s, n in samplers_full],
                     ["engine", "engine-bf16"],
                     [(net, b, s, n) for net in NETS for b in (1, 16) for s, n in [("ddim", 50), ("ddpm", 100)]],
                     ["engine", "engine-bf16", "engine-torch", "eager", "compile", "diffusers"],
                     {"warmup": 5, "min_runs": 20, "max_runs": 200, "budget_s": 1.0},
                     {"warmup": 1, "min_runs": 3, "max_runs": 20, "budget_s": 5.0}, 300.0,
                     [(net, b) for net in NETS for b in (1, 16, 128)], ["torch"], model_timing)
    # CPU: the one table of the issue - every runtime on the same weights, batch 1/16/64, DDIM-20/50, DDPM-1000
    # (cases estimated beyond the budget, e.g. cifar-ddpm DDPM-1000 at batch > 1, are recorded as skipped)
    return Suite(sizes, ["fp32", "bf16"], list(STEP_IMPLS),
                 [("digits", b, s, n) for b in (1, 16) for s, n in samplers_full], ["engine"],
                 [(net, b, s, n) for net in ("digits", "cifar-ddpm") for b in (1, 16, 64)
                  for s, n in [("ddim", 20), ("ddim", 50), ("ddpm", 1000)]],
                 [i for i in PEER_IMPLS if i not in ("engine-bf16", "compile")],
                 {"warmup": 5, "min_runs": 20, "max_runs": 200, "budget_s": 1.0},
                 {"warmup": 1, "min_runs": 3, "max_runs": 10, "budget_s": 5.0}, 150.0,
                 [(net, b) for net in ("digits", "cifar-ddpm") for b in (1, 16, 64)], list(MODEL_IMPLS), model_timing)
