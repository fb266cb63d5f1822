"""DDPM, DDIM and DPM-Solver++ samplers: flat functions with one signature; the model is any `model(x, t, y=None)`.

`denoise` is THE torch denoising loop: the plain samplers here and every runtime of fastdiff.engine run
it (the torch-free ONNX runtime keeps a NumPy twin, fastdiff/export/runtime.py, held equal by its
parity test). Every random number comes from the counter-based Philox stream of (seed of the sample,
step, element), so the noise of sample b is the same whether it is drawn alone or in a batch, on any
device or backend (docs/design.md §3).
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, ContextManager

import numpy as np
import torch
from tqdm import tqdm

from . import ops
from .multistep import MultistepCoefs
from .schedule import NoiseSchedule, Step, StepCoefs

Model = Callable[..., torch.Tensor]
StepFn = Callable[..., torch.Tensor]
MultistepFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def make_seeds(seed: int, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Per-sample seeds seed, seed+1, ... as the int64 tensor the samplers and kernels take."""
    return torch.arange(n, dtype=torch.int64, device=device) + int(seed)


def initial_noise(seeds: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype = torch.float32,
                  memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """x_T for each sample, from its own seed (on the seeds' device)."""
    return ops.initial_noise(seeds, tuple(shape), memory_format).to(dtype)


def guided_output(model: Model, x: torch.Tensor, t: int, y: torch.Tensor | None, guidance: float) -> torch.Tensor:
    """The model's prediction at timestep t, with classifier-free guidance when guidance != 1
    (one batched call: class id -1 selects the null class)."""
    tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
    if y is None or guidance == 1.0:
        return model(x, tt, y)
    m_cond, m_uncond = model(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([y, torch.full_like(y, -1)])).chunk(2)
    return m_uncond + guidance * (m_cond - m_uncond)


def advance(x: torch.Tensor, m: torch.Tensor, seeds: torch.Tensor, t: int, coefs: StepCoefs | MultistepCoefs,
            x0_prev: torch.Tensor | None, step_fn: StepFn | None = None,
            multistep_fn: MultistepFn | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One fused step of any sampler on the loop state (x, x0_prev) -> the next (x, x0_prev).

    StepCoefs (DDPM/DDIM): ops.reverse_step, no extra state (None). MultistepCoefs (DPM-Solver++):
    ops.multistep_step, whose x0 is the next step's x0_prev; before the first step x0_prev is zeros (a
    first-order step has k_prev = 0 and does not read it)."""
    if isinstance(coefs, MultistepCoefs):
        if x0_prev is None:
            x0_prev = torch.zeros_like(x)
        return (multistep_fn or ops.multistep_step)(x, m, x0_prev, seeds, t, coefs)
    return (step_fn or ops.reverse_step)(x, m, seeds, t, coefs), None


def all_finite(t: torch.Tensor) -> bool:
    """Whether t holds no NaN/inf. A float32 CPU tensor is checked through NumPy: right after a model call (ONNX
    Runtime's, say) the first torch op pays tens of µs in dispatch, a large share of a batch-1 step."""
    if t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous():
        return bool(np.isfinite(t.detach().numpy()).all())
    return bool(torch.isfinite(t).all())


def denoise(model: Model, x: torch.Tensor, seeds: torch.Tensor, steps: list[Step], *, y: torch.Tensor | None = None,
            guidance: float = 1.0, step_fn: StepFn | None = None, autocast: Callable[[], ContextManager] = nullcontext,
            check_finite: bool = True, progress: bool = False, multistep_fn: MultistepFn | None = None,
            on_step: Callable[[int], None] | None = None) -> torch.Tensor:
    """Run reverse steps from x = x_T: one model call and one fused step each (`advance`: DDPM/DDIM carry x,
    DPM-Solver++ carries x and the previous data prediction x0_prev).

    autocast: a context for the model call (the step and x keep x's dtype); check_finite: raise
    FloatingPointError when the model output holds NaN/inf (a host sync per step: the CUDA graph path
    turns it off and checks the result once); on_step(steps done): called after each step (progress, or a
    place to cancel by raising)."""
    x0_prev = None
    for k, (t, coefs) in enumerate(tqdm(steps, desc="sample", disable=not progress, leave=False,
                                        dynamic_ncols=True)):
        with autocast():
            m = guided_output(model, x, t, y, guidance)
        if check_finite and not all_finite(m):
            raise FloatingPointError(f"the model output holds NaN or inf at timestep {t}; check the weights and inputs")
        x, x0_prev = advance(x, m.to(x.dtype), seeds, t, coefs, x0_prev, step_fn, multistep_fn)
        if on_step is not None:
            on_step(k + 1)
    return x


def sample_ddpm(model: Model, x: torch.Tensor, seeds: torch.Tensor, schedule: NoiseSchedule, steps: int = 1000, *,
                y: torch.Tensor | None = None, guidance: float = 1.0, step_fn: StepFn | None = None,
                progress: bool = False, **options) -> torch.Tensor:
    """Ancestral sampling as diffusers' DDPMScheduler; options: schedule.SAMPLER_OPTIONS['ddpm']."""
    return denoise(model, x, seeds, schedule.reverse_steps("ddpm", steps, **options), y=y, guidance=guidance,
                   step_fn=step_fn, progress=progress)


def sample_ddim(model: Model, x: torch.Tensor, seeds: torch.Tensor, schedule: NoiseSchedule, steps: int = 50, *,
                y: torch.Tensor | None = None, guidance: float = 1.0, step_fn: StepFn | None = None,
                progress: bool = False, **options) -> torch.Tensor:
    """DDIM (η = 0: deterministic; η = 1: DDPM-like) as diffusers' DDIMScheduler; options:
    schedule.SAMPLER_OPTIONS['ddim'] (eta, spacing, clip_sample, use_clipped_model_output, ...)."""
    return denoise(model, x, seeds, schedule.reverse_steps("ddim", steps, **options), y=y, guidance=guidance,
                   step_fn=step_fn, progress=progress)


def sample_dpmpp_2m(model: Model, x: torch.Tensor, seeds: torch.Tensor, schedule: NoiseSchedule, steps: int = 20, *,
                    y: torch.Tensor | None = None, guidance: float = 1.0, progress: bool = False,
                    **options) -> torch.Tensor:
    """DPM-Solver++ 2M (deterministic) as diffusers' DPMSolverMultistepScheduler(algorithm_type="dpmsolver++");
    options: schedule.SAMPLER_OPTIONS['dpmpp-2m'] (solver_order, lower_order_final, final_sigmas_type, ...)."""
    return denoise(model, x, seeds, schedule.reverse_steps("dpmpp-2m", steps, **options), y=y, guidance=guidance,
                   progress=progress)


def sample_dpmpp_2m_sde(model: Model, x: torch.Tensor, seeds: torch.Tensor, schedule: NoiseSchedule, steps: int = 20,
                        *, y: torch.Tensor | None = None, guidance: float = 1.0, progress: bool = False,
                        **options) -> torch.Tensor:
    """DPM-Solver++ 2M-SDE (algorithm_type="sde-dpmsolver++"), its noise the Philox stream of (seed, t, element)."""
    return denoise(model, x, seeds, schedule.reverse_steps("dpmpp-2m-sde", steps, **options), y=y, guidance=guidance,
                   progress=progress)


SAMPLERS = {"ddpm": sample_ddpm, "ddim": sample_ddim, "dpmpp-2m": sample_dpmpp_2m, "dpmpp-2m-sde": sample_dpmpp_2m_sde}
