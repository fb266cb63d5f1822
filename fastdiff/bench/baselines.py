"""The eager baselines: the reverse steps written as diffusers 0.42 writes them, the plain PyTorch sampling loop
a diffusers user runs, and torch.compile of the step."""
from __future__ import annotations

import functools
from typing import Callable

import torch

from ..schedule import NoiseSchedule


def diffusers_ddim_step(model_output: torch.Tensor, sample: torch.Tensor, alpha_prod_t: torch.Tensor,
                        alpha_prod_t_prev: torch.Tensor, eta: float) -> torch.Tensor:
    """DDIMScheduler.step (epsilon, clip_sample=True, use_clipped_model_output=False): separate tensor ops
    and torch.randn. alpha_prod_* are 0-d tensors (CPU in diffusers; on the device for torch.compile)."""
    beta_prod_t = 1 - alpha_prod_t
    pred_original_sample = (sample - beta_prod_t ** (0.5) * model_output) / alpha_prod_t ** (0.5)
    pred_epsilon = model_output
    pred_original_sample = pred_original_sample.clamp(-1.0, 1.0)
    beta_prod_t_prev = 1 - alpha_prod_t_prev
    variance = (beta_prod_t_prev / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
    std_dev_t = eta * variance ** (0.5)
    pred_sample_direction = (1 - alpha_prod_t_prev - std_dev_t**2) ** (0.5) * pred_epsilon
    prev_sample = alpha_prod_t_prev ** (0.5) * pred_original_sample + pred_sample_direction
    if eta > 0:
        variance_noise = torch.randn(model_output.shape, device=model_output.device, dtype=model_output.dtype)
        prev_sample = prev_sample + std_dev_t * variance_noise
    return prev_sample


def diffusers_ddpm_step(model_output: torch.Tensor, sample: torch.Tensor, alpha_prod_t: torch.Tensor,
                        alpha_prod_t_prev: torch.Tensor, add_noise: bool) -> torch.Tensor:
    """DDPMScheduler.step (epsilon, clip_sample=True, fixed_small) as diffusers writes it."""
    beta_prod_t = 1 - alpha_prod_t
    beta_prod_t_prev = 1 - alpha_prod_t_prev
    current_alpha_t = alpha_prod_t / alpha_prod_t_prev
    current_beta_t = 1 - current_alpha_t
    pred_original_sample = (sample - beta_prod_t ** (0.5) * model_output) / alpha_prod_t ** (0.5)
    pred_original_sample = pred_original_sample.clamp(-1.0, 1.0)
    pred_original_sample_coeff = (alpha_prod_t_prev ** (0.5) * current_beta_t) / beta_prod_t
    current_sample_coeff = current_alpha_t ** (0.5) * beta_prod_t_prev / beta_prod_t
    pred_prev_sample = pred_original_sample_coeff * pred_original_sample + current_sample_coeff * sample
    if add_noise:
        variance_noise = torch.randn(model_output.shape, device=model_output.device, dtype=model_output.dtype)
        variance = torch.clamp(beta_prod_t_prev / beta_prod_t * current_beta_t, min=1e-20)
        pred_prev_sample = pred_prev_sample + variance ** (0.5) * variance_noise
    return pred_prev_sample


def alpha_table(schedule: NoiseSchedule, device: torch.device | str = "cpu") -> torch.Tensor:
    """alphas_cumprod as diffusers holds it (float32), with 1.0 appended at index T (the "previous" of
    the last step: DDIMScheduler's final_alpha_cumprod with set_alpha_to_one, DDPMScheduler's `one`)."""
    ac = torch.tensor(schedule.alphas_cumprod, dtype=torch.float32)
    return torch.cat([ac, torch.ones(1)]).to(device)


def eager_loop(model: Callable, schedule: NoiseSchedule, batch: int, image_shape: tuple[int, ...], sampler: str,
               steps: int, device: torch.device, *, eta: float = 0.0, step_fn: Callable | None = None,
               table: torch.Tensor | None = None, before_model: Callable[[], None] | None = None) -> torch.Tensor:
    """The plain PyTorch loop a diffusers user runs: x_T = torch.randn, model, diffusers-style step.

    step_fn replaces the sampler's eager step (e.g. by its compiled version); before_model runs before each
    model call (e.g. torch.compiler.cudagraph_mark_step_begin)."""
    T = schedule.num_train_timesteps
    table = alpha_table(schedule) if table is None else table
    x = torch.randn((batch, *image_shape), device=device)
    stride = T // steps
    for t in schedule.timesteps(steps):
        prev = t - stride
        a_t, a_prev = table[t], table[prev if prev >= 0 else T]
        if before_model is not None:
            before_model()
        m = model(x, torch.full((batch,), t, device=device, dtype=torch.long))
        if sampler == "ddim":
            x = (step_fn or diffusers_ddim_step)(m, x, a_t, a_prev, eta)
        else:
            x = (step_fn or diffusers_ddpm_step)(m, x, a_t, a_prev, t > 0)
    return x


@functools.lru_cache(maxsize=None)
def compiled_step() -> Callable:
    """torch.compile of the diffusers-style DDIM step, shared by every size (automatic dynamic shapes
    after the second size, so the step section compiles about once per dtype, not once per size)."""
    return torch.compile(diffusers_ddim_step)

