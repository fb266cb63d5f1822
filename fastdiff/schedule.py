"""Noise schedules, inference timesteps and the scalars of each reverse step.

Semantics follow diffusers' DDPMScheduler / DDIMScheduler (docs/design.md §2). Every reverse
step, whatever the sampler and prediction type, reduces to one per-element formula:

    x0  = a*x + b*m              (m: model output; clamped to ±clip_range)
    out = k_x0*x0 + k_x*x + k_m*m + sigma*z

The host computes the scalars here in float64; the fused kernel does the per-element part.
This module needs only NumPy, so the torch-free ONNX runtime shares it; torch is imported only
by the forward-process helpers used in training.
"""
from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, NamedTuple

import numpy as np

from . import multistep
from .multistep import MultistepCoefs

if TYPE_CHECKING:
    import torch

BETA_SCHEDULES = ("linear", "cosine", "sigmoid", "quadratic")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
SPACINGS = ("leading", "trailing", "linspace")
VARIANCE_TYPES = ("fixed_small", "fixed_large")
SAMPLERS = ("ddpm", "ddim", *multistep.SAMPLERS)
# fastdiff's beta_schedule -> diffusers' beta_schedule of the same betas.
DIFFUSERS_BETA_SCHEDULES = {"linear": "linear", "quadratic": "scaled_linear", "cosine": "squaredcos_cap_v2",
                            "sigmoid": "sigmoid"}
MAX_TIMESTEPS = 100_000  # T beyond this is a typo, not a model: refused before any table is allocated

# The options each sampler takes, with diffusers' defaults: the one list every entry point checks against.
SAMPLER_OPTIONS: dict[str, dict[str, object]] = {
    "ddpm": {"variance_type": "fixed_small", "spacing": "leading", "steps_offset": 0, "clip_sample": True,
             "clip_sample_range": 1.0},
    "ddim": {"eta": 0.0, "spacing": "leading", "steps_offset": 0, "clip_sample": True, "clip_sample_range": 1.0,
             "set_alpha_to_one": True, "use_clipped_model_output": False},
    **{name: dict(multistep.OPTIONS) for name in multistep.SAMPLERS},  # DPM-Solver++ (fastdiff/multistep.py)
}


class StepCoefs(NamedTuple):
    """Scalars of one fused reverse step (see module docstring); clip_range=inf disables clamping."""

    a: float
    b: float
    clip_range: float
    k_x0: float
    k_x: float
    k_m: float
    sigma: float


class Step(NamedTuple):
    t: int
    coefs: StepCoefs | MultistepCoefs  # MultistepCoefs: a DPM-Solver++ step (fastdiff.ops.multistep_step)


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
    return value


def make_betas(kind: str, num_train_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """Betas in float64. 'cosine' is Nichol & Dhariwal's squaredcos_cap_v2; 'quadratic' is diffusers' scaled_linear."""
    _choice("beta_schedule", kind, BETA_SCHEDULES)
    T = num_train_timesteps
    if isinstance(T, bool) or not isinstance(T, (int, np.integer)) or not 2 <= T <= MAX_TIMESTEPS:
        raise ValueError(f"num_train_timesteps must be an integer in [2, {MAX_TIMESTEPS}]; got {T!r}")
    for name, v in (("beta_start", beta_start), ("beta_end", beta_end)):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.floating)) or not 0 < v < 1:
            raise ValueError(f"{name} must be a number in (0, 1); got {v!r}")
    if beta_start > beta_end:
        raise ValueError(f"beta_start ({beta_start}) must be <= beta_end ({beta_end})")
    if kind == "linear":
        return np.linspace(beta_start, beta_end, T, dtype=np.float64)
    if kind == "quadratic":
        return np.linspace(beta_start**0.5, beta_end**0.5, T, dtype=np.float64) ** 2
    if kind == "sigmoid":
        return 1 / (1 + np.exp(-np.linspace(-6, 6, T, dtype=np.float64))) * (beta_end - beta_start) + beta_start

    def alpha_bar(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)], dtype=np.float64)


def _trained_betas(values: Any, T: int) -> np.ndarray:
    """diffusers' trained_betas as float64: one beta in (0, 1) per training timestep."""
    try:
        betas = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"trained_betas must be a list of numbers; got {type(values).__name__}") from None
    if betas.ndim != 1 or len(betas) != T:
        raise ValueError(f"trained_betas must hold one beta per training timestep ({T}); got shape {betas.shape}")
    if not np.all((betas > 0) & (betas < 1)):
        raise ValueError("trained_betas must all be in (0, 1)")
    return betas


@dataclass(frozen=True)
class NoiseSchedule:
    """The forward process a model was trained with; stored in every checkpoint's config."""

    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    prediction_type: str = "epsilon"
    trained_betas: tuple[float, ...] | None = field(default=None, repr=False)  # given: these betas, beta_* ignored

    def __post_init__(self) -> None:
        _choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        betas = make_betas(self.beta_schedule, self.num_train_timesteps, self.beta_start, self.beta_end)
        if self.trained_betas is not None:
            betas = _trained_betas(self.trained_betas, self.num_train_timesteps)
            object.__setattr__(self, "trained_betas", tuple(betas.tolist()))
        object.__setattr__(self, "betas", betas)
        object.__setattr__(self, "alphas_cumprod", np.cumprod(1.0 - betas))

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.trained_betas is None:  # so configs of computed schedules stay as they were
            del d["trained_betas"]
        else:
            d["trained_betas"] = list(self.trained_betas)
        return d

    @classmethod
    def from_diffusers_config(cls, config: Mapping[str, Any]) -> "NoiseSchedule":
        """The training schedule of a diffusers scheduler config (DDPMScheduler / DDIMScheduler names and defaults)."""
        c = dict(config)
        if c.get("rescale_betas_zero_snr"):
            raise ValueError("rescale_betas_zero_snr=True (zero terminal SNR) is not supported by fastdiff")
        names = {v: k for k, v in DIFFUSERS_BETA_SCHEDULES.items()}
        kind, trained = c.get("beta_schedule", "linear"), c.get("trained_betas")
        if trained is None and kind not in names:
            raise ValueError(f"beta_schedule {kind!r} is not supported; use one of {', '.join(names)} or trained_betas")
        return cls(num_train_timesteps=c.get("num_train_timesteps", 1000), beta_schedule=names.get(kind, "linear"),
                   beta_start=c.get("beta_start", 1e-4), beta_end=c.get("beta_end", 0.02),
                   prediction_type=c.get("prediction_type", "epsilon"), trained_betas=trained)

    def to_diffusers_config(self) -> dict[str, Any]:
        """This schedule as DDPMScheduler / DDIMScheduler arguments (the inverse of from_diffusers_config)."""
        return {"num_train_timesteps": self.num_train_timesteps, "beta_start": self.beta_start,
                "beta_end": self.beta_end, "beta_schedule": DIFFUSERS_BETA_SCHEDULES[self.beta_schedule],
                "trained_betas": None if self.trained_betas is None else list(self.trained_betas),
                "prediction_type": self.prediction_type}

    # --- forward process -------------------------------------------------------------------------
    def _gather(self, t: "torch.Tensor", like: "torch.Tensor") -> "torch.Tensor":
        torch = sys.modules["torch"]  # a tensor argument means torch is loaded; this module never imports it
        table = torch.from_numpy(self.alphas_cumprod).to(like.device)
        return table[t.long()].to(like.dtype).view(-1, *([1] * (like.dim() - 1)))

    def q_sample(self, x0: "torch.Tensor", t: "torch.Tensor", noise: "torch.Tensor") -> "torch.Tensor":
        """x_t = sqrt(ᾱ_t)·x0 + sqrt(1-ᾱ_t)·noise."""
        ac = self._gather(t, x0)
        return ac.sqrt() * x0 + (1 - ac).sqrt() * noise

    def training_target(self, x0: "torch.Tensor", t: "torch.Tensor", noise: "torch.Tensor") -> "torch.Tensor":
        """What the network learns to output: ε, v = sqrt(ᾱ)·ε - sqrt(1-ᾱ)·x0, or x0."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "sample":
            return x0
        ac = self._gather(t, x0)
        return ac.sqrt() * noise - (1 - ac).sqrt() * x0

    # --- reverse process -------------------------------------------------------------------------
    def timesteps(self, num_steps: int, spacing: str = "leading", steps_offset: int = 0) -> list[int]:
        """Inference timesteps, descending, exactly as diffusers' set_timesteps."""
        _choice("spacing", spacing, SPACINGS)
        T = self.num_train_timesteps
        if not isinstance(num_steps, (int, np.integer)) or not 0 < num_steps <= T:
            raise ValueError(f"steps must be an integer in [1, {T}] (the model's num_train_timesteps); got {num_steps!r}")
        if spacing == "leading":
            ts = (np.arange(num_steps) * (T // num_steps)).round()[::-1] + steps_offset
        elif spacing == "trailing":
            # diffusers' float step gives one extra ~0 point (timestep -1) for some counts (61, 103, ...), which it
            # keeps and runs; the run has num_steps timesteps, all equal to diffusers' first num_steps
            ts = np.round(np.arange(T, 0, -T / num_steps))[:num_steps] - 1
        else:
            ts = np.linspace(0, T - 1, num_steps).round()[::-1]
        ts = [int(t) for t in ts]
        if max(ts) >= T or min(ts) < 0:
            raise ValueError(f"steps_offset={steps_offset} moves timesteps outside [0, {T - 1}]")
        return ts

    def _x0_eps(self, ac: float) -> tuple[float, float, float, float]:
        """(a, b, c, d) with x0 = a·x + b·m and ε = c·x + d·m for this prediction type."""
        sa, sb = math.sqrt(ac), math.sqrt(1 - ac)
        if self.prediction_type == "epsilon":
            return 1 / sa, -sb / sa, 0.0, 1.0
        if self.prediction_type == "v_prediction":
            return sa, -sb, sb, sa
        return 0.0, 1.0, 1 / sb, -sa / sb

    def reverse_steps(self, sampler: str, num_steps: int, **options) -> list[Step]:
        """Every reverse step of a sampling run with its scalars, in the order they run.

        options: those of SAMPLER_OPTIONS[sampler] (diffusers' names and defaults); any other is refused.
        DDIM steps from t to t - T//num_steps (DDIMScheduler, whatever the spacing); DDPM to the next
        timestep of the run, or past the end after the last (DDPMScheduler.previous_timestep)."""
        o = _sampler_options(sampler, options)
        if sampler in multistep.SAMPLERS:
            x0_coefs = lambda ac_t: self._x0_eps(ac_t)[:2]  # noqa: E731
            return [Step(t, c) for t, c in multistep.plan(self.alphas_cumprod, x0_coefs, sampler, num_steps, o)]
        ts = self.timesteps(num_steps, o["spacing"], o["steps_offset"])
        stride = self.num_train_timesteps // num_steps
        ac = self.alphas_cumprod.tolist()
        steps = []
        for i, t in enumerate(ts):
            prev = t - stride if sampler == "ddim" else (ts[i + 1] if i + 1 < len(ts) else -1)
            steps.append(Step(t, self._coefs(sampler, ac, t, prev, o)))
        return steps

    def step_coefs(self, sampler: str, t: int, prev: int, **options) -> StepCoefs:
        """The scalars of one reverse step from timestep t to prev (< 0: past the end), as reverse_steps makes
        them; options: SAMPLER_OPTIONS[sampler] (spacing and steps_offset are not used here)."""
        o = _sampler_options(sampler, options)
        if sampler in multistep.SAMPLERS:
            raise ValueError(f"sampler: {sampler} is a multistep solver (its steps depend on the run); use reverse_steps")
        T = self.num_train_timesteps
        for name, v in (("t", t), ("prev", prev)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise ValueError(f"{name} must be an integer timestep; got {v!r}")
        if not 0 <= t < T or prev >= t:
            raise ValueError(f"need 0 <= t < {T} and prev < t; got t={t}, prev={prev}")
        return self._coefs(sampler, self.alphas_cumprod.tolist(), int(t), int(prev), o)

    def _coefs(self, sampler: str, ac: list[float], t: int, prev: int, o: dict) -> StepCoefs:
        clip = o["clip_sample_range"] if o["clip_sample"] else math.inf
        ac_t = ac[t]
        a, b, c, d = self._x0_eps(ac_t)
        if sampler == "ddpm":
            ac_prev = ac[prev] if prev >= 0 else 1.0
            alpha = ac_t / ac_prev
            beta = 1 - alpha
            k_x0 = math.sqrt(ac_prev) * beta / (1 - ac_t)
            k_x = math.sqrt(alpha) * (1 - ac_prev) / (1 - ac_t)
            var = max((1 - ac_prev) / (1 - ac_t) * beta, 1e-20) if o["variance_type"] == "fixed_small" else beta
            return StepCoefs(a, b, clip, k_x0, k_x, 0.0, math.sqrt(var) if t > 0 else 0.0)
        eta = o["eta"]
        ac_prev = ac[prev] if prev >= 0 else (1.0 if o["set_alpha_to_one"] else ac[0])
        var = (1 - ac_prev) / (1 - ac_t) * (1 - ac_t / ac_prev)
        sigma = eta * math.sqrt(var)
        dir2 = 1 - ac_prev - sigma * sigma  # not sigma**2: that raises OverflowError for a huge eta
        if dir2 < -1e-12:
            raise ValueError(f"eta={eta} is too large: the DDIM direction term becomes imaginary at t={t}")
        direction = math.sqrt(max(dir2, 0.0))
        if o["use_clipped_model_output"]:  # ε re-derived from the clamped x0
            sb = math.sqrt(1 - ac_t)
            k_x0 = math.sqrt(ac_prev) - direction * math.sqrt(ac_t) / sb
            return StepCoefs(a, b, clip, k_x0, direction / sb, 0.0, sigma)
        return StepCoefs(a, b, clip, math.sqrt(ac_prev), direction * c, direction * d, sigma)


def _sampler_options(sampler: str, options: dict) -> dict:
    """options over SAMPLER_OPTIONS[sampler], each checked (ValueError naming the bad one)."""
    _choice("sampler", sampler, SAMPLERS)
    unknown = sorted(set(options) - set(SAMPLER_OPTIONS[sampler]))
    if unknown:
        raise ValueError(f"{', '.join(unknown)}: not an option of the {sampler} sampler; it takes "
                         f"{', '.join(SAMPLER_OPTIONS[sampler])}")
    o = {**SAMPLER_OPTIONS[sampler], **options}
    if sampler in multistep.SAMPLERS:
        return multistep.check_options(o)
    for name in ("clip_sample", "set_alpha_to_one", "use_clipped_model_output"):
        if name in o and not isinstance(o[name], (bool, np.bool_)):
            raise ValueError(f"{name} must be True or False; got {o[name]!r}")
    steps_offset = o["steps_offset"]
    if isinstance(steps_offset, bool) or not isinstance(steps_offset, (int, np.integer)) or steps_offset < 0:
        raise ValueError(f"steps_offset must be an integer >= 0; got {steps_offset!r}")
    _choice("spacing", o["spacing"], SPACINGS)
    if sampler == "ddpm":
        _choice("variance_type", o["variance_type"], VARIANCE_TYPES)
    else:
        o["eta"] = float(o["eta"])
        if not math.isfinite(o["eta"]) or o["eta"] < 0:
            raise ValueError(f"eta must be a finite number >= 0; got {o['eta']}")
    o["clip_sample_range"] = float(o["clip_sample_range"])
    if not o["clip_sample_range"] > 0:
        raise ValueError(f"clip_sample_range must be > 0; got {o['clip_sample_range']}")
    return o
