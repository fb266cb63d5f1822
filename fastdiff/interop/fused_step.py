"""What the fused diffusers schedulers (fastdiff.diffusers) share: per-sample Philox seeds drawn once per run, the
schedule and options made from the scheduler's current config, and the fused step call. No diffusers import: the
schedulers' module brings diffusers' classes."""
from __future__ import annotations

import numbers
from typing import Any, Sequence

import torch

from .. import ops
from ..schedule import StepCoefs
from .diffusers import sampler_options, schedule_from_config

SEED_HIGH = 2**62  # seeds drawn from a generator: base + i stays an int64 for any batch
# config keys diffusers reads only at construction (its alphas_cumprod, final_alpha_cumprod, model_outputs)
CONSTRUCTION_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                     "set_alpha_to_one", "rescale_betas_zero_snr", "solver_order")


def _x0_coefs(c: StepCoefs) -> StepCoefs:
    """The fused op's coefficients that output its own clamped x0 (k_x0 = 1, nothing else)."""
    return StepCoefs(c.a, c.b, c.clip_range, 1.0, 0.0, 0.0, 0.0)


def _as_seeds(seeds: int | Sequence[int] | torch.Tensor) -> int | torch.Tensor:
    if isinstance(seeds, torch.Tensor) and seeds.dim() == 0 and not seeds.dtype.is_floating_point:
        seeds = seeds.item()
    if isinstance(seeds, bool):
        raise ValueError(f"seeds must be an int or one int64 seed per image; got {seeds!r}")
    if isinstance(seeds, numbers.Integral):
        if not 0 <= seeds < 2**63:
            raise ValueError(f"seeds must be in [0, 2^63); got {seeds}")
        return int(seeds)
    try:
        t = torch.as_tensor(seeds)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"seeds must be an int or one int64 seed per image; got {type(seeds).__name__}") from None
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool or t.dim() != 1 or not len(t):
        raise ValueError(f"seeds must be an int or a non-empty 1-D sequence of integer seeds; got {t.dtype} "
                         f"of shape {tuple(t.shape)}")
    t = t.to("cpu", torch.int64)
    if (t < 0).any():
        raise ValueError(f"seeds must be in [0, 2^63); got {int(t.min())}")
    return t


def _check_generator(generator: Any, n: int) -> None:
    gens = generator if isinstance(generator, (list, tuple)) else [generator]
    if not all(isinstance(g, torch.Generator) for g in gens):
        raise ValueError("generator must be a torch.Generator, a list of them (one per image) or None; got "
                         f"{type(generator).__name__}")
    if isinstance(generator, (list, tuple)) and len(generator) != n:
        raise ValueError(f"generator: a list of {len(generator)} generators for a batch of {n} images")


def check_num_steps(num_inference_steps: Any, where: str) -> None:
    if num_inference_steps is not None and (isinstance(num_inference_steps, bool) or not isinstance(
            num_inference_steps, numbers.Integral) or num_inference_steps < 1):
        raise ValueError(f"{where}.set_timesteps: num_inference_steps must be a positive int; got "
                         f"{num_inference_steps!r}")


class FusedStep:
    """The mixin of the fused schedulers (before their diffusers base class): the schedule and options of the current
    config, per-sample seeds and the fused op call."""

    _sampler: str
    # The step implementation; tests swap in ops.reverse_step_reference (the bit-identical PyTorch twin).
    step_fn = staticmethod(ops.reverse_step)

    def _setup(self, return_pred_original_sample: bool = True) -> None:
        self.return_pred_original_sample = return_pred_original_sample  # False: pred_original_sample None
        self._seeds: int | torch.Tensor | None = None  # set_seeds
        self._run_seeds: torch.Tensor | None = None  # this run's, drawn at its first step that adds noise
        self._on_device: tuple[torch.device, torch.Tensor] | None = None
        self._coefs: dict[tuple, Any] = {}
        self._synced: Any = None  # the config object the schedule and options were made from
        self._built = {k: self.config.get(k) for k in CONSTRUCTION_KEYS}
        self._sync()

    def _sync(self) -> None:
        """Make the schedule and options from the current config when it was replaced: diffusers' step reads
        clip_sample, prediction_type, ... at each call, and pipelines (StableDiffusionPipeline) or register_to_config
        replace the config object after construction. What diffusers reads only at construction may not change."""
        config = self.config
        if config is self._synced:
            return
        name = type(self).__name__
        changed = [k for k, v in self._built.items() if config.get(k) != v]
        if changed:
            raise ValueError(f"{name}: {', '.join(changed)} changed in the config after construction, where diffusers "
                             "reads it; make a new scheduler with from_config(config)")
        self.schedule, self._coefs = schedule_from_config(config, name), {}
        self._configure(config, name)
        self._synced = config

    def _configure(self, config: Any, name: str) -> None:
        self.options = sampler_options(self._sampler, config, name)

    # --- seeds --------------------------------------------------------------------------------------------
    def set_seeds(self, seeds: int | Sequence[int] | torch.Tensor | None) -> None:
        """Per-sample Philox seeds for every following run: an int s (image i uses s + i, as fastdiff's
        generate), one int64 seed per image, or None (draw them from the pipeline's generator again)."""
        self._seeds = None if seeds is None else _as_seeds(seeds)
        self._run_seeds, self._on_device = None, None

    def _drop_extra_timestep(self, num_steps: int | None) -> None:
        """diffusers' trailing spacing yields an extra timestep -1 for some counts (61, 103, ...): drop it, as
        NoiseSchedule.timesteps does, so the run has num_steps steps."""
        if num_steps is not None and len(self.timesteps) > num_steps:
            self.timesteps = self.timesteps[:num_steps]

    @property
    def seeds(self) -> torch.Tensor | None:
        """The seeds of the current run (CPU int64, one per image), once a step has drawn them (set_seeds: its first
        step; a generator: its first step that adds noise, so None for a deterministic run)."""
        return self._run_seeds

    def _draw(self, n: int, generator: Any) -> torch.Tensor:
        if self._seeds is not None:
            if isinstance(self._seeds, int):
                if self._seeds + n > 2**63:
                    raise ValueError(f"set_seeds({self._seeds}): seed + i must stay below 2^63 for {n} images")
                return torch.arange(n, dtype=torch.int64) + self._seeds
            if len(self._seeds) != n:
                raise ValueError(f"set_seeds gave {len(self._seeds)} seeds for a batch of {n} images")
            return self._seeds.clone()
        if isinstance(generator, (list, tuple)):
            return torch.cat([torch.randint(0, SEED_HIGH, (1,), generator=g, device=g.device).cpu()
                              for g in generator])
        device = generator.device if generator is not None else "cpu"
        base = int(torch.randint(0, SEED_HIGH, (1,), generator=generator, device=device).item())
        return torch.arange(n, dtype=torch.int64) + base

    def _device_seeds(self, n: int, device: torch.device, generator: Any, noise: bool = True) -> torch.Tensor:
        """The run's seeds on device; a step that adds no Philox noise (noise False) before the run's first one that
        does gets placeholder seeds and leaves the generator alone, as diffusers draws nothing for it."""
        if generator is not None:
            _check_generator(generator, n)
        if self._run_seeds is None or len(self._run_seeds) != n:
            if not noise and self._seeds is None:
                return torch.zeros(n, dtype=torch.int64, device=device)
            self._run_seeds, self._on_device = self._draw(n, generator), None
        if self._on_device is None or self._on_device[0] != device:
            self._on_device = (device, self._run_seeds.to(device))
        return self._on_device[1]

    def initial_noise(self, shape: Sequence[int], device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """x_T (or latents) of shape (B, ...) from the seeds of set_seeds: fastdiff's Philox normals of each
        image's seed, bit-identical on every device; pass it as a pipeline's `latents=`."""
        if self._seeds is None:
            raise ValueError("initial_noise needs explicit seeds: call set_seeds(seed) first")
        if not isinstance(shape, (tuple, list, torch.Size)) or len(shape) < 1:
            raise ValueError(f"shape must be the full shape (B, ...) of x_T or the latents; got {shape!r}")
        shape = tuple(int(s) for s in shape)
        seeds = self._draw(shape[0], None).to(device)
        return ops.initial_noise(seeds, shape[1:]).to(dtype)

    # --- the step -----------------------------------------------------------------------------------------
    def _step_coefs(self, t: int, prev: int, **options) -> StepCoefs:
        self._sync()
        key = (t, prev, *sorted(options.items()))
        coefs = self._coefs.get(key)
        if coefs is None:
            coefs = self._coefs[key] = self.schedule.step_coefs(self._sampler, t, prev, **{**self.options, **options})
        return coefs

    def _fused(self, model_output: torch.Tensor, t: int, sample: torch.Tensor, coefs: StepCoefs, generator: Any,
               variance_noise: torch.Tensor | None, return_dict: bool, output: type) -> Any:
        if not isinstance(sample, torch.Tensor) or not isinstance(model_output, torch.Tensor):
            raise ValueError("sample and model_output must be torch tensors")
        dtype = sample.dtype
        x = sample if dtype in ops.DTYPES else sample.float()  # float64 runs in float32 (the op's precision)
        m = model_output if model_output.dtype == x.dtype else model_output.to(x.dtype)
        seeds = self._device_seeds(x.shape[0], x.device, generator, coefs.sigma != 0 and variance_noise is None)
        if variance_noise is not None:  # diffusers' semantics: these normals instead of the Philox ones
            out = self.step_fn(x, m, seeds, t, coefs._replace(sigma=0.0)) + coefs.sigma * variance_noise.to(x)
        else:
            out = self.step_fn(x, m, seeds, t, coefs)
        x0 = self.step_fn(x, m, seeds, t, _x0_coefs(coefs)) if self.return_pred_original_sample else None
        if x.dtype != dtype:
            out, x0 = out.to(dtype), None if x0 is None else x0.to(dtype)
        if not return_dict:
            return out, x0
        return output(prev_sample=out, pred_original_sample=x0)
