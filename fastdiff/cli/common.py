"""Arguments several commands share, declared once."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..schedule import SAMPLERS, SPACINGS, VARIANCE_TYPES


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:i] (default: auto)")


def add_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_ckpt(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--ckpt", type=Path, required=required,
                   help="run folder or checkpoint file" + ("" if required else " (default: the shipped digits model)"))


def add_sampler_options(p: argparse.ArgumentParser) -> None:
    """--sampler, --steps and every option of schedule.SAMPLER_OPTIONS, as flags."""
    p.add_argument("--sampler", choices=SAMPLERS, default="ddim", help="default: ddim")
    p.add_argument("--steps", type=int, help="reverse steps (default: 50 for ddim, T for ddpm)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM noise scale: 0 deterministic, 1 DDPM-like (default: 0)")
    p.add_argument("--spacing", choices=SPACINGS, default="leading", help="timestep spacing (default: leading)")
    p.add_argument("--variance", choices=VARIANCE_TYPES, default="fixed_small", help="DDPM variance (default: fixed_small)")
    p.add_argument("--no-clip", action="store_true", help="do not clamp predicted x0 to [-1, 1]")
    p.add_argument("--clipped-eps", action="store_true",
                   help="DDIM: re-derive ε from the clamped x0 (diffusers' use_clipped_model_output); keeps many-step "
                        "DDIM with clipping consistent")


def sampler_options(a: argparse.Namespace) -> dict:
    """The options dict of schedule.reverse_steps for the flags of add_sampler_options."""
    if a.sampler == "ddpm" and (a.eta or a.clipped_eps):
        raise ValueError("--eta and --clipped-eps apply to --sampler ddim only")
    if a.sampler == "ddim" and a.variance != "fixed_small":
        raise ValueError("--variance applies to --sampler ddpm only")
    options = {"spacing": a.spacing, "clip_sample": not a.no_clip}
    if a.sampler == "ddim":
        return options | {"eta": a.eta} | ({"use_clipped_model_output": True} if a.clipped_eps else {})
    return options | {"variance_type": a.variance}
