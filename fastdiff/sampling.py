"""DDPM and DDIM samplers: flat functions with one signature; the model is any `model(x, t, y=None)`.

Every random number comes from the counter-based Philox stream of (seed of the sample, step, element),
so sample b is the same whether it is drawn alone or in a batch, on any device or backend.
"""
from __future__ import annotations

from typing import Callable

import torch
from tqdm import tqdm

from . import noise, ops
from .schedule import NoiseSchedule, Step

Model = Callable[..., torch.Tensor]
StepFn = Callable[..., torch.Tensor]
INITIAL_NOISE_STEP = noise.INITIAL_NOISE_STEP


def make_seeds(seed: int, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Per-sample seeds seed, seed+1, ... as the int64 tensor the samplers and kernels take."""
    return torch.arange(n, dtype=torch.int64, device=device) + int(seed)


def initial_noise(seeds: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x_T for each sample, from its own seed."""
    numel = 1
    for s in shape:
        numel *= s
    return noise.gaussian(seeds, INITIAL_NOISE_STEP, numel).reshape(len(seeds), *shape).to(dtype)


def model_output(model: Model, x: torch.Tensor, t: int, y: torch.Tensor | None, guidance: float) -> torch.Tensor:
    """The model's prediction at timestep t, with classifier-free guidance when guidance != 1
    (one batched call: class ids < 0 select the null class)."""
    tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
    if y is None or guidance == 1.0:
        return model(x, tt, y)
    m_cond, m_uncond = model(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([y, torch.full_like(y, -1)])).chunk(2)
    return m_uncond + guidance * (m_cond - m_uncond)


def run(model: Model, x: torch.Tensor, seeds: torch.Tensor, steps: list[Step], *, y: torch.Tensor | None = None,
        guidance: float = 1.0, step_fn: StepFn | None = None, progress: bool = False) -> torch.Tensor:
    """Run a plan of reverse steps from x = x_T; every step is one fused op call."""
    step_fn = step_fn or ops.reverse_step
    for t, coefs in tqdm(steps, desc="sample", disable=not progress, leave=False, dynamic_ncols=True):
        m = model_output(model, x, t, y, guidance)
        if not torch.isfinite(m).all():
            raise FloatingPointError(f"the model output holds NaN or inf at timestep {t}; check the weights and inputs")
        x = step_fn(x, m.to(x.dtype), seeds, t, coefs)
    return x


def sample_ddpm(model: Model, x: torch.Tensor, seeds: torch.Tensor, schedule: NoiseSchedule, steps: int = 1000, *,
                y: torch.Tensor | None = None, guidance: float = 1.0, step_fn: StepFn | None = None,
                progress: bool = False, variance_type: str = "fixed_small", spacing: str = "leading",
                steps_offset: int = 0, clip_sample: bool = True, clip_sample_range: float = 1.0) -> torch.Tensor:
    """Ancestral sampling as diffusers' DDPMScheduler."""
    plan = schedule.plan("ddpm", steps, variance_type=variance_type, spacing=spacing, steps_offset=steps_offset,
                         clip_sample=clip_sample, clip_sample_range=clip_sample_range)
    return run(model, x, seeds, plan, y=y, guidance=guidance, step_fn=step_fn, progress=progress)


def sample_ddim(model: Model, x: torch.Tensor, seeds: torch.Tensor, schedule: NoiseSchedule, steps: int = 50, *,
                y: torch.Tensor | None = None, guidance: float = 1.0, step_fn: StepFn | None = None,
                progress: bool = False, eta: float = 0.0, spacing: str = "leading", steps_offset: int = 0,
                clip_sample: bool = True, clip_sample_range: float = 1.0, set_alpha_to_one: bool = True,
                use_clipped_model_output: bool = False) -> torch.Tensor:
    """DDIM (η = 0: deterministic; η = 1: DDPM-like) as diffusers' DDIMScheduler."""
    plan = schedule.plan("ddim", steps, eta=eta, spacing=spacing, steps_offset=steps_offset, clip_sample=clip_sample,
                         clip_sample_range=clip_sample_range, set_alpha_to_one=set_alpha_to_one,
                         use_clipped_model_output=use_clipped_model_output)
    return run(model, x, seeds, plan, y=y, guidance=guidance, step_fn=step_fn, progress=progress)


SAMPLERS = {"ddpm": sample_ddpm, "ddim": sample_ddim}


def check_request(model_classes: int, n: int, classes: torch.Tensor | None, guidance: float) -> None:
    if n < 1:
        raise ValueError(f"n (number of samples) must be >= 1; got {n}")
    if guidance < 0 or guidance != guidance:
        raise ValueError(f"guidance must be >= 0; got {guidance}")
    if classes is not None:
        if not model_classes:
            raise ValueError("class labels were given but the model is unconditional (trained without --class-cond)")
        if classes.min() < -1 or classes.max() >= model_classes:
            raise ValueError(f"class ids must be in [0, {model_classes - 1}] (or -1 for unconditional)")
    elif guidance != 1.0:
        raise ValueError("guidance needs class labels (--class) and a class-conditional model")


@torch.inference_mode()
def generate(model: Model, schedule: NoiseSchedule, image_shape: tuple[int, int, int], n: int, *, seed: int = 0,
             sampler: str = "ddim", steps: int = 50, classes: torch.Tensor | int | None = None,
             guidance: float = 1.0, num_classes: int = 0, batch_size: int = 256, device: str | torch.device = "cpu",
             progress: bool = False, step_fn: StepFn | None = None, engine: bool | None = None,
             **options) -> torch.Tensor:
    """n samples in [-1, 1] as (n, C, H, W) float32 on the CPU; sample i uses seed + i.

    engine: run each batch with fastdiff.engine.Engine (one CUDA graph per batch shape on CUDA, the fused
    step on CPU); False: the plain reference loop `run()` (the only path that takes a custom step_fn).
    None (default): the engine unless step_fn is given."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}; got {sampler!r}")
    device = torch.device(device)
    if isinstance(classes, int):
        classes = torch.full((n,), classes, dtype=torch.long)
    if classes is not None and len(classes) != n:
        raise ValueError(f"classes must hold one id per sample ({n}); got {len(classes)}")
    check_request(num_classes, n, classes, guidance)
    if engine is None:
        engine = step_fn is None
    if engine and step_fn is not None:
        raise ValueError("step_fn is only used by the plain loop: pass engine=False with it")
    runner = None
    if engine:
        from .engine import Engine

        runner = Engine(model, schedule, device=device, channels_last=device.type == "cuda")
    out = []
    batches = range(0, n, batch_size)
    for start in tqdm(batches, desc=f"{sampler}-{steps}", disable=not progress or len(batches) == 1):
        seeds = make_seeds(seed + start, min(batch_size, n - start), device)
        y = classes[start:start + len(seeds)].to(device) if classes is not None else None
        if runner is not None:
            out.append(runner.sample(seeds, image_shape, sampler, steps, y=y, guidance=guidance, progress=progress,
                                     **options).cpu())
            continue
        x = initial_noise(seeds, image_shape)
        x = SAMPLERS[sampler](model, x, seeds, schedule, steps, y=y, guidance=guidance, step_fn=step_fn,
                              progress=progress, **options)
        out.append(x.float().cpu())
    return torch.cat(out).clamp(-1, 1)
