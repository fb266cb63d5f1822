"""Arguments several commands share, declared once."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..multistep import FINAL_SIGMAS_TYPES
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
    p.add_argument("--steps", type=int, help="reverse steps (default: 50 for ddim, 20 for dpmpp-*, T for ddpm)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM noise scale: 0 deterministic, 1 DDPM-like (default: 0)")
    p.add_argument("--spacing", choices=SPACINGS,
                   help="timestep spacing (default: leading; linspace for dpmpp-*, as diffusers)")
    p.add_argument("--variance", choices=VARIANCE_TYPES, default="fixed_small", help="DDPM variance (default: fixed_small)")
    p.add_argument("--no-clip", action="store_true", help="do not clamp predicted x0 to [-1, 1]")
    eps = p.add_mutually_exclusive_group()
    eps.add_argument("--clipped-eps", action="store_true",
                     help="DDIM: re-derive ε from the clamped x0 (use_clipped_model_output; fastdiff's default, so "
                          "more steps never mean worse images)")
    eps.add_argument("--unclipped-eps", action="store_true",
                     help="DDIM: use the model's ε as is even when x0 is clamped (diffusers' default semantics)")
    p.add_argument("--solver-order", type=int, choices=(1, 2), default=2, help="DPM-Solver++ order (default: 2)")
    p.add_argument("--final-sigmas", choices=FINAL_SIGMAS_TYPES, default="zero",
                   help="DPM-Solver++ final sigma (final_sigmas_type; default: zero)")
    p.add_argument("--no-lower-order-final", action="store_true",
                   help="DPM-Solver++: keep second order on the last steps of short runs (< 15 steps)")


def sampler_options(a: argparse.Namespace) -> dict:
    """The options dict of schedule.reverse_steps for the flags of add_sampler_options."""
    dpmpp = a.sampler.startswith("dpmpp")
    if dpmpp and (a.eta or a.clipped_eps or a.unclipped_eps or a.variance != "fixed_small"):
        raise ValueError("--eta, --clipped-eps, --unclipped-eps and --variance do not apply to the dpmpp samplers")
    if not dpmpp and (a.solver_order != 2 or a.final_sigmas != "zero" or a.no_lower_order_final):
        raise ValueError("--solver-order, --final-sigmas and --no-lower-order-final apply to the dpmpp samplers only")
    if dpmpp:  # diffusers' DPMSolverMultistepScheduler does not clamp x0 by default
        options = {"solver_order": a.solver_order, "final_sigmas_type": a.final_sigmas,
                   "lower_order_final": not a.no_lower_order_final}
        return options | ({"spacing": a.spacing} if a.spacing else {})
    if a.sampler == "ddpm" and (a.eta or a.clipped_eps or a.unclipped_eps):
        raise ValueError("--eta, --clipped-eps and --unclipped-eps apply to --sampler ddim only")
    if a.sampler == "ddim" and a.variance != "fixed_small":
        raise ValueError("--variance applies to --sampler ddpm only")
    options = {"spacing": a.spacing or "leading", "clip_sample": not a.no_clip}
    if a.sampler == "ddim":
        return options | {"eta": a.eta, "use_clipped_model_output": not a.unclipped_eps and not a.no_clip}
    return options | {"variance_type": a.variance}
