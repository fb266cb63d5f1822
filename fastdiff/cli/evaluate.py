"""`fastdiff eval`: the FID / KID table vs steps and η (fastdiff.evaluate does the work)."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..evaluate import (DDPM_STEPS, ETAS, N, ONNX_STEPS, QUICK_DDPM_STEPS, QUICK_ETAS, QUICK_N, QUICK_STEPS, STEPS,
                        evaluate_all)
from .common import add_ckpt, add_device, add_quiet


def _ints(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _floats(text: str) -> list[float]:
    try:
        return [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def add(sub) -> None:
    p = sub.add_parser("eval", help="FID / KID table vs steps and eta (DDIM paper Table 1 shape)",
                       description="Sample with DDIM (every S x eta), DDPM and optionally ONNX FP32/INT8 models; score "
                                   "each row by FID / KID against held-out real digits in the feature space of the "
                                   "shipped digits classifier. Writes results.json, results.md, fid_vs_steps.png and "
                                   "a grid PNG per row.")
    src = p.add_mutually_exclusive_group()
    add_ckpt(src)
    src.add_argument("--diffusers", type=Path, metavar="FOLDER",
                     help="evaluate a diffusers folder's unconditional UNet2DModel (save_pretrained layout, safetensors) "
                          "instead of a checkpoint")
    p.add_argument("--out", type=Path, default=Path("eval"), help="output folder (default: eval)")
    p.add_argument("-n", "--n", "--count", dest="n", type=int, help=f"samples per row (default: {N}; {QUICK_N} with --quick)")
    p.add_argument("--quick", action="store_true",
                   help=f"CI size: n={QUICK_N}, S in {QUICK_STEPS}, eta in {QUICK_ETAS}, DDPM-{QUICK_DDPM_STEPS[0]}")
    p.add_argument("--steps", type=_ints, help=f"DDIM steps S, comma-separated (default: {','.join(map(str, STEPS))})")
    p.add_argument("--etas", type=_floats, help=f"DDIM etas, comma-separated (default: {','.join(map(str, ETAS))})")
    p.add_argument("--ddpm-steps", type=_ints, help="DDPM steps, comma-separated; '' for none (default: 1000)")
    p.add_argument("--onnx", type=Path, help=f"also score this exported FP32 ONNX model (DDIM-{ONNX_STEPS}, eta 0)")
    p.add_argument("--onnx-int8", type=Path, help=f"also score this INT8 ONNX model (DDIM-{ONNX_STEPS}, eta 0)")
    p.add_argument("--unclipped-eps", action="store_true",
                   help="DDIM rows use the model's ε as is when x0 is clamped (diffusers' default semantics); by "
                        "default ε is re-derived from the clamped x0")
    p.add_argument("--nll", action="store_true", help="also the NLL of the held-out digits in bits/dim (DDPM's "
                   "variational bound with a discretised Gaussian decoder)")
    p.add_argument("--nll-timesteps", type=int, default=200,
                   help="timesteps of the bound's sum to evaluate, stratified (T-1 = all; default: 200)")
    p.add_argument("--seed", type=int, default=0, help="sample i uses seed + i in every row (default: 0)")
    p.add_argument("--batch-size", type=int, default=256, help="images per batch (default: 256)")
    add_device(p)
    p.add_argument("--threads", type=int, help="CPU threads for torch during the run (default: torch's choice; 1 is "
                   "much faster when other jobs share the cores)")
    add_quiet(p)
    p.set_defaults(run=run)


def run(a: argparse.Namespace) -> None:
    if a.threads is not None and a.threads < 1:
        raise ValueError(f"--threads must be >= 1; got {a.threads}")
    threads = torch.get_num_threads()
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        evaluate_all(a)
    finally:
        torch.set_num_threads(threads)
