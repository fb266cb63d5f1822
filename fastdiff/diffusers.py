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

from typing import Any

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

from . import multistep, ops
from .interop.fused_step import FusedStep, check_num_steps
from .multistep import MultistepCoefs
from .schedule import Step

__all__ = ["FusedDDIMScheduler", "FusedDDPMScheduler", "FusedDPMSolverMultistepScheduler", "SchedulerMixin"]

DDIM_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


class FusedDDIMScheduler(FusedStep, DDIMScheduler):
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
        check_num_steps(num_inference_steps, type(self).__name__)
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


class FusedDDPMScheduler(FusedStep, DDPMScheduler):
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
        check_num_steps(num_inference_steps, type(self).__name__)
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


class FusedDPMSolverMultistepScheduler(FusedStep, DPMSolverMultistepScheduler):
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
        check_num_steps(num_inference_steps, type(self).__name__)
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
