"""Fused drop-in schedulers for diffusers pipelines: FusedDDIMScheduler, FusedDDPMScheduler and
FusedDPMSolverMultistepScheduler (DPM-Solver++ 2M / 2M-SDE, docs/dpmpp.md).

    pipe.scheduler = FusedDDIMScheduler.from_config(pipe.scheduler.config)
    image = pipe(generator=torch.Generator().manual_seed(0)).images[0]

They are diffusers' DDIMScheduler / DDPMScheduler (same config, timesteps, add_noise, alphas_cumprod, saving
and loading) whose `step` is ONE call of fastdiff's fused reverse step (torch.ops.fastdiff.reverse_step): the
scalars are computed on the host in float64 by NoiseSchedule.step_coefs from the same config, and the noise is
fastdiff's counter-based Philox stream of (seed of the sample, timestep, element), so a seed gives the same noise
on every device and for any batch it shares. Per-sample seeds are drawn ONCE per run (at the first step after
set_timesteps that adds noise) from the generator the pipeline passes: a list of generators gives one seed per image, one
generator a base seed s with image i using s + i (fastdiff's convention); or they are set with `set_seeds`.

Like diffusers' own step, theirs follows the scheduler's current config (pipelines such as StableDiffusionPipeline
and register_to_config replace it after construction), and a deterministic step (η = 0, t = 0, DPM-Solver++ 2M) draws
nothing from the generator. Gradients flow through `step` to sample and model_output (guidance methods).

What differs from diffusers: the noise values (Philox instead of torch.randn; hand diffusers the same numbers
through `variance_noise` to compare), and `thresholding=True`, variance types other than fixed_small(_log) /
fixed_large and rescale_betas_zero_snr are refused with a ValueError; so is a training schedule (betas) changed in the
config after construction (diffusers would keep the old one).
"""
from __future__ import annotations

import numbers
from typing import Any, Sequence

import torch

try:
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
    # diffusers' pipeline loader finds a component's loading methods through the base classes exported by the module
    # that model_index.json names for it (this one, for the fused schedulers): without it no saved pipeline loads.
    from diffusers import SchedulerMixin  # noqa: F401
    from diffusers.configuration_utils import register_to_config
    from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
    from diffusers.schedulers.scheduling_ddpm import DDPMSchedulerOutput
    from diffusers.schedulers.scheduling_utils import SchedulerOutput
except ImportError as _e:  # pragma: no cover - depends on the optional extra
    raise ImportError(f"fastdiff.diffusers needs diffusers: pip install fastdiff[diffusers] ({_e})") from _e

from . import ops
from .interop.diffusers import sampler_options, schedule_from_config
from . import multistep
from .multistep import MultistepCoefs
from .schedule import Step, StepCoefs

__all__ = ["FusedDDIMScheduler", "FusedDDPMScheduler", "FusedDPMSolverMultistepScheduler", "SchedulerMixin"]

SEED_HIGH = 2**62  # seeds drawn from a generator: base + i stays an int64 for any batch
DDIM_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
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


def _check_num_steps(num_inference_steps: Any, where: str) -> None:
    if num_inference_steps is not None and (isinstance(num_inference_steps, bool) or not isinstance(
            num_inference_steps, numbers.Integral) or num_inference_steps < 1):
        raise ValueError(f"{where}.set_timesteps: num_inference_steps must be a positive int; got "
                         f"{num_inference_steps!r}")


class _FusedStep:
    """What both fused schedulers share: the schedule, per-sample seeds and the fused op."""

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


class FusedDDIMScheduler(_FusedStep, DDIMScheduler):
    """diffusers' DDIMScheduler with the fused reverse step and per-sample Philox noise (see module docstring)."""

    _sampler = "ddim"
    _compatibles = [*DDIMScheduler._compatibles]
    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas: Any = None, clip_sample: bool = True,
                 set_alpha_to_one: bool = True, steps_offset: int = 0, prediction_type: str = "epsilon",
                 thresholding: bool = False, dynamic_thresholding_ratio: float = 0.995, clip_sample_range: float = 1.0,
                 sample_max_value: float = 1.0, timestep_spacing: str = "leading",
                 rescale_betas_zero_snr: bool = False):
        kwargs = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        if trained_betas is None and beta_schedule not in DDIM_BETA_SCHEDULES:
            raise ValueError(f"FusedDDIMScheduler: beta_schedule {beta_schedule!r} is not supported (as in "
                             f"DDIMScheduler); use one of {', '.join(DDIM_BETA_SCHEDULES)} or trained_betas")
        self._setup()
        DDIMScheduler.__init__.__wrapped__(self, **kwargs)

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """diffusers' set_timesteps; also starts a new run (its seeds are drawn at its first noisy step)."""
        _check_num_steps(num_inference_steps, type(self).__name__)
        super().set_timesteps(num_inference_steps, device)
        self._drop_extra_timestep(num_inference_steps)
        self._run_seeds, self._on_device = None, None

    def step(self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator: Any = None,
             variance_noise: torch.Tensor | None = None, return_dict: bool = True) -> DDIMSchedulerOutput | tuple:
        """DDIMScheduler.step as one fused op call (plus one for pred_original_sample unless
        return_pred_original_sample is False)."""
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after creating "
                             "the scheduler")
        t = int(timestep)
        prev = t - self.config.num_train_timesteps // self.num_inference_steps
        coefs = self._step_coefs(t, prev, eta=float(eta), use_clipped_model_output=bool(use_clipped_model_output))
        if eta > 0 and variance_noise is not None and generator is not None:
            raise ValueError("Cannot pass both generator and variance_noise. Please make sure that either "
                             "`generator` or `variance_noise` stays `None`.")
        return self._fused(model_output, t, sample, coefs, generator, variance_noise if eta > 0 else None,
                           return_dict, DDIMSchedulerOutput)


class FusedDDPMScheduler(_FusedStep, DDPMScheduler):
    """diffusers' DDPMScheduler with the fused reverse step and per-sample Philox noise (see module docstring)."""

    _sampler = "ddpm"
    _compatibles = [*DDPMScheduler._compatibles]
    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas: Any = None, variance_type: str = "fixed_small",
                 clip_sample: bool = True, prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, clip_sample_range: float = 1.0,
                 sample_max_value: float = 1.0, timestep_spacing: str = "leading", steps_offset: int = 0,
                 rescale_betas_zero_snr: bool = False):
        kwargs = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        self._setup()
        DDPMScheduler.__init__.__wrapped__(self, **kwargs)

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      timesteps: list[int] | None = None) -> None:
        """diffusers' set_timesteps (custom timesteps included); also starts a new run."""
        _check_num_steps(num_inference_steps, type(self).__name__)
        super().set_timesteps(num_inference_steps, device, timesteps)
        self._drop_extra_timestep(num_inference_steps)
        self._run_seeds, self._on_device = None, None

    def step(self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor,
             generator: Any = None, return_dict: bool = True) -> DDPMSchedulerOutput | tuple:
        """DDPMScheduler.step as one fused op call (no noise at t = 0, as diffusers)."""
        t = int(timestep)
        try:
            prev = int(self.previous_timestep(t))
        except IndexError:
            raise ValueError(f"timestep {t} is not one of this run's timesteps (set_timesteps)") from None
        return self._fused(model_output, t, sample, self._step_coefs(t, prev), generator, None, return_dict,
                           DDPMSchedulerOutput)


# --- DPM-Solver++ ---------------------------------------------------------------------------------------------
DPM_ALGORITHMS = {v: k for k, v in multistep.ALGORITHMS.items()}  # diffusers' algorithm_type -> fastdiff sampler
# config values the fused multistep step cannot reproduce, with the value it needs
_DPM_UNSUPPORTED = {"thresholding": False, "use_karras_sigmas": False, "use_exponential_sigmas": False,
                    "use_beta_sigmas": False, "use_lu_lambdas": False, "use_flow_sigmas": False,
                    "rescale_betas_zero_snr": False, "use_dynamic_shifting": False, "lambda_min_clipped": -float("inf")}
# variance types whose ε-prediction models output [ε, variance] channels; diffusers keeps model_output[:, :3]
# (every other variance_type, e.g. DDPMScheduler's fixed_small / fixed_large, means None to it)
LEARNED_VARIANCES = ("learned", "learned_range")


def _dpm_options(config: Any, where: str) -> tuple[str, dict]:
    """(fastdiff sampler, its options) of a DPMSolverMultistepScheduler config; ValueError for what it cannot do."""
    algorithm = config.algorithm_type
    if algorithm not in DPM_ALGORITHMS:
        raise ValueError(f"{where}: algorithm_type {algorithm!r} is not supported; use one of "
                         f"{', '.join(DPM_ALGORITHMS)}")
    for key, want in _DPM_UNSUPPORTED.items():
        if config.get(key, want) != want:
            raise ValueError(f"{where}: {key}={config.get(key)!r} is not supported by fastdiff's fused multistep step "
                             f"(it needs {key}={want!r})")
    options = {"solver_order": config.solver_order, "solver_type": config.solver_type,
               "lower_order_final": bool(config.lower_order_final), "euler_at_final": bool(config.euler_at_final),
               "final_sigmas_type": config.final_sigmas_type, "spacing": config.timestep_spacing,
               "steps_offset": config.steps_offset}
    try:
        return DPM_ALGORITHMS[algorithm], multistep.check_options({**multistep.OPTIONS, **options})
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


class FusedDPMSolverMultistepScheduler(_FusedStep, DPMSolverMultistepScheduler):
    """diffusers' DPMSolverMultistepScheduler (algorithm_type dpmsolver++ / sde-dpmsolver++, solver_order 1-2) whose
    `step` is one call of the fused multistep op (torch.ops.fastdiff.multistep_step); the scalars of the whole run
    are computed once per set_timesteps in float64 (fastdiff.multistep), the SDE noise is fastdiff's Philox stream.
    The previous data prediction lives where diffusers keeps it (model_outputs)."""

    _compatibles = [*DPMSolverMultistepScheduler._compatibles]
    order = 1
    multistep_fn = staticmethod(ops.multistep_step)  # tests swap in ops.multistep_step_reference

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas: Any = None, solver_order: int = 2,
                 prediction_type: str = "epsilon", thresholding: bool = False, dynamic_thresholding_ratio: float = 0.995,
                 sample_max_value: float = 1.0, algorithm_type: str = "dpmsolver++", solver_type: str = "midpoint",
                 lower_order_final: bool = True, euler_at_final: bool = False, use_karras_sigmas: bool = False,
                 use_exponential_sigmas: bool = False, use_beta_sigmas: bool = False, use_lu_lambdas: bool = False,
                 use_flow_sigmas: bool = False, flow_shift: float = 1.0, final_sigmas_type: str = "zero",
                 lambda_min_clipped: float = -float("inf"), variance_type: str | None = None,
                 timestep_spacing: str = "linspace", steps_offset: int = 0, rescale_betas_zero_snr: bool = False,
                 use_dynamic_shifting: bool = False, time_shift_type: str = "exponential"):
        kwargs = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        DPMSolverMultistepScheduler.__init__.__wrapped__(self, **kwargs)
        self._plan: list[Step] = []
        self._first_order: list[Step] = []
        self._setup(return_pred_original_sample=False)

    def _configure(self, config: Any, name: str) -> None:
        self._sampler, self.options = _dpm_options(config, name)
        if self._plan:  # the config changed during a run: its scalars again, for the same timesteps
            self._make_plan(len(self._plan))

    def _make_plan(self, n: int) -> None:
        self._plan = self.schedule.reverse_steps(self._sampler, n, **self.options)
        # a run that starts mid-schedule (begin_index) takes a first-order step first, as diffusers
        self._first_order = self.schedule.reverse_steps(self._sampler, n, **{**self.options, "solver_order": 1})
        if [s.t for s in self._plan] != self.timesteps.tolist():
            raise ValueError(f"{type(self).__name__}: the config's timestep settings changed after set_timesteps; "
                             "call set_timesteps again")

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      mu: float | None = None, timesteps: list[int] | None = None) -> None:
        """diffusers' set_timesteps (custom timesteps and mu are refused); computes the run's scalars and starts a
        new run (its seeds are drawn at its first noisy step)."""
        if timesteps is not None or mu is not None:
            raise ValueError(f"{type(self).__name__}: custom timesteps / mu are not supported; pass num_inference_steps")
        _check_num_steps(num_inference_steps, type(self).__name__)
        self._plan = []
        self._sync()
        super().set_timesteps(num_inference_steps, device)
        n = int(num_inference_steps)
        if len(self.timesteps) > n:  # diffusers' extra trailing timestep -1 (see _drop_extra_timestep)
            self._drop_extra_timestep(n)
            self.sigmas, self.num_inference_steps = torch.cat([self.sigmas[:n], self.sigmas[-1:]]), n
        self._make_plan(n)
        self._run_seeds, self._on_device = None, None

    def step(self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor,
             generator: Any = None, variance_noise: torch.Tensor | None = None,
             return_dict: bool = True) -> SchedulerOutput | tuple:
        """DPMSolverMultistepScheduler.step as one fused op call."""
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after creating "
                             "the scheduler")
        if not isinstance(sample, torch.Tensor) or not isinstance(model_output, torch.Tensor):
            raise ValueError("sample and model_output must be torch tensors")
        self._sync()
        if self.step_index is None:
            self._init_step_index(timestep)
        i = self.step_index
        coefs: MultistepCoefs = (self._first_order if self.lower_order_nums < 1 else self._plan)[i].coefs
        if self.config.variance_type in LEARNED_VARIANCES and self.config.prediction_type == "epsilon":
            model_output = model_output[:, :3]
        dtype = sample.dtype
        x = sample if dtype in ops.DTYPES else sample.float()
        m = model_output if model_output.dtype == x.dtype else model_output.to(x.dtype)
        prev = self.model_outputs[-1]
        x0_prev = prev.to(x) if coefs.k_prev != 0 and prev is not None else torch.zeros_like(x)
        seeds = self._device_seeds(x.shape[0], x.device, generator, coefs.sigma != 0 and variance_noise is None)
        t = int(self.timesteps[i])
        if variance_noise is not None and coefs.sigma != 0:  # diffusers' semantics: these normals
            out, x0 = self.multistep_fn(x, m, x0_prev, seeds, t, coefs._replace(sigma=0.0))
            out = out + coefs.sigma * variance_noise.to(out)
        else:
            out, x0 = self.multistep_fn(x, m, x0_prev, seeds, t, coefs)
        for k in range(self.config.solver_order - 1):
            self.model_outputs[k] = self.model_outputs[k + 1]
        self.model_outputs[-1] = x0
        if self.lower_order_nums < self.config.solver_order:
            self.lower_order_nums += 1
        self._step_index += 1
        out = out.to(dtype)
        return SchedulerOutput(prev_sample=out) if return_dict else (out,)
