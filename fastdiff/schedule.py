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
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

if TYPE_CHECKING:
    import torch

BETA_SCHEDULES = ("linear", "cosine", "sigmoid", "quadratic")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
SPACINGS = ("leading", "trailing", "linspace")
VARIANCE_TYPES = ("fixed_small", "fixed_large")
SAMPLERS = ("ddpm", "ddim")
MAX_TIMESTEPS = 100_000  # T beyond this is a typo, not a model: refused before any table is allocated

# The options each sampler takes, with diffusers' defaults: the one list every entry point checks against.
SAMPLER_OPTIONS: dict[str, dict[str, object]] = {
    "ddpm": {"variance_type": "fixed_small", "spacing": "leading", "steps_offset": 0, "clip_sample": True,
             "clip_sample_range": 1.0},
    "ddim": {"eta": 0.0, "spacing": "leading", "steps_offset": 0, "clip_sample": True, "clip_sample_range": 1.0,
             "set_alpha_to_one": True, "use_clipped_model_output": False},
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
    coefs: StepCoefs


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


@dataclass(frozen=True)
class NoiseSchedule:
    """The forward process a model was trained with; stored in every checkpoint's config."""

    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    prediction_type: str = "epsilon"

    def __post_init__(self) -> None:
        _choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        betas = make_betas(self.beta_schedule, self.num_train_timesteps, self.beta_start, self.beta_end)
        object.__setattr__(self, "betas", betas)
        object.__setattr__(self, "alphas_cumprod", np.cumprod(1.0 - betas))

    def to_dict(self) -> dict:
        return asdict(self)

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
            ts = np.round(np.arange(T, 0, -T / num_steps)) - 1
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

        options: those of SAMPLER_OPTIONS[sampler] (diffusers' names and defaults); any other is refused."""
        _choice("sampler", sampler, SAMPLERS)
        unknown = sorted(set(options) - set(SAMPLER_OPTIONS[sampler]))
        if unknown:
            raise ValueError(f"{', '.join(unknown)}: not an option of the {sampler} sampler; it takes "
                             f"{', '.join(SAMPLER_OPTIONS[sampler])}")
        o = {**SAMPLER_OPTIONS[sampler], **options}
        eta, spacing, steps_offset = float(o.get("eta", 0.0)), o["spacing"], o["steps_offset"]
        clip_sample, clip_sample_range = o["clip_sample"], float(o["clip_sample_range"])
        variance_type = o.get("variance_type", "fixed_small")
        set_alpha_to_one, use_clipped_model_output = o.get("set_alpha_to_one", True), o.get("use_clipped_model_output")
        for name in ("clip_sample", "set_alpha_to_one", "use_clipped_model_output"):
            if name in o and not isinstance(o[name], (bool, np.bool_)):
                raise ValueError(f"{name} must be True or False; got {o[name]!r}")
        if isinstance(steps_offset, bool) or not isinstance(steps_offset, (int, np.integer)) or steps_offset < 0:
            raise ValueError(f"steps_offset must be an integer >= 0; got {steps_offset!r}")
        _choice("variance_type", variance_type, VARIANCE_TYPES)
        if not math.isfinite(eta) or eta < 0:
            raise ValueError(f"eta must be a finite number >= 0; got {eta}")
        if not clip_sample_range > 0:
            raise ValueError(f"clip_sample_range must be > 0; got {clip_sample_range}")
        T = self.num_train_timesteps
        ac = self.alphas_cumprod.tolist()
        clip = clip_sample_range if clip_sample else math.inf
        stride = T // num_steps if 0 < num_steps <= T else 0
        steps = []
        for t in self.timesteps(num_steps, spacing, steps_offset):
            prev = t - stride
            ac_t = ac[t]
            a, b, c, d = self._x0_eps(ac_t)
            if sampler == "ddpm":
                ac_prev = ac[prev] if prev >= 0 else 1.0
                alpha = ac_t / ac_prev
                beta = 1 - alpha
                k_x0 = math.sqrt(ac_prev) * beta / (1 - ac_t)
                k_x = math.sqrt(alpha) * (1 - ac_prev) / (1 - ac_t)
                var = max((1 - ac_prev) / (1 - ac_t) * beta, 1e-20) if variance_type == "fixed_small" else beta
                coefs = StepCoefs(a, b, clip, k_x0, k_x, 0.0, math.sqrt(var) if t > 0 else 0.0)
            else:
                ac_prev = ac[prev] if prev >= 0 else (1.0 if set_alpha_to_one else ac[0])
                var = (1 - ac_prev) / (1 - ac_t) * (1 - ac_t / ac_prev)
                sigma = eta * math.sqrt(var)
                dir2 = 1 - ac_prev - sigma**2
                if dir2 < -1e-12:
                    raise ValueError(f"eta={eta} is too large: the DDIM direction term becomes imaginary at t={t}")
                direction = math.sqrt(max(dir2, 0.0))
                if use_clipped_model_output:  # ε re-derived from the clamped x0
                    sb = math.sqrt(1 - ac_t)
                    k_x0 = math.sqrt(ac_prev) - direction * math.sqrt(ac_t) / sb
                    coefs = StepCoefs(a, b, clip, k_x0, direction / sb, 0.0, sigma)
                else:
                    coefs = StepCoefs(a, b, clip, math.sqrt(ac_prev), direction * c, direction * d, sigma)
            steps.append(Step(t, coefs))
        return steps
