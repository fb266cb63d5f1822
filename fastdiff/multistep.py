"""DPM-Solver++ (2M and 2M-SDE) as fused multistep steps: the host side, in float64, NumPy only.

Semantics are those of diffusers' DPMSolverMultistepScheduler with algorithm_type "dpmsolver++" /
"sde-dpmsolver++", solver_order 1-2 (docs/dpmpp.md). Every step comes down to seven scalars:

    x0  = clamp(a*x + b*m)                         (the data prediction of this step)
    out = k_x0*x0 + k_prev*x0_prev + k_x*x + sigma*z

where x0_prev is the previous step's x0 (k_prev = 0 for first-order steps). The fused op
torch.ops.fastdiff.multistep_step does the per-element part (csrc/multistep.h).
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import numpy as np

SAMPLERS = ("dpmpp-2m", "dpmpp-2m-sde")
ALGORITHMS = {"dpmpp-2m": "dpmsolver++", "dpmpp-2m-sde": "sde-dpmsolver++"}
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")
SOLVER_TYPES = ("midpoint", "heun")
SPACINGS = ("linspace", "leading", "trailing")
# diffusers' defaults; clip_sample is fastdiff's (diffusers' DPM-Solver has only dynamic thresholding)
OPTIONS: dict[str, object] = {"solver_order": 2, "solver_type": "midpoint", "lower_order_final": True,
                              "euler_at_final": False, "final_sigmas_type": "zero", "spacing": "linspace",
                              "steps_offset": 0, "clip_sample": False, "clip_sample_range": 1.0}


class MultistepCoefs(NamedTuple):
    """Scalars of one fused multistep step (see module docstring); clip_range=inf disables clamping."""

    a: float
    b: float
    clip_range: float
    k_x0: float
    k_prev: float
    k_x: float
    sigma: float


def _choice(name: str, value: object, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def check_options(o: dict) -> dict:
    """The DPM-Solver++ options (already merged over OPTIONS), each checked; ValueError naming the bad one."""
    o = dict(o)
    order = o["solver_order"]
    if isinstance(order, bool) or order not in (1, 2):
        raise ValueError(f"solver_order must be 1 or 2 (fastdiff fuses first- and second-order updates); "
                         f"got {order!r}")
    o["solver_order"] = int(order)
    _choice("solver_type", o["solver_type"], SOLVER_TYPES)
    _choice("final_sigmas_type", o["final_sigmas_type"], FINAL_SIGMAS_TYPES)
    _choice("spacing", o["spacing"], SPACINGS)
    for name in ("lower_order_final", "euler_at_final", "clip_sample"):
        if not isinstance(o[name], (bool, np.bool_)):
            raise ValueError(f"{name} must be True or False; got {o[name]!r}")
    off = o["steps_offset"]
    if isinstance(off, bool) or not isinstance(off, (int, np.integer)) or off < 0:
        raise ValueError(f"steps_offset must be an integer >= 0; got {off!r}")
    try:
        o["clip_sample_range"] = float(o["clip_sample_range"])
    except (TypeError, ValueError):
        raise ValueError(f"clip_sample_range must be a number > 0; got {o['clip_sample_range']!r}") from None
    if not o["clip_sample_range"] > 0:
        raise ValueError(f"clip_sample_range must be > 0; got {o['clip_sample_range']}")
    return o


def timesteps(T: int, num_steps: int, spacing: str = "linspace", steps_offset: int = 0) -> list[int]:
    """Inference timesteps, descending, as DPMSolverMultistepScheduler.set_timesteps (lambda_min_clipped = -inf)."""
    _choice("spacing", spacing, SPACINGS)
    # linspace/leading space num_steps + 1 points over [0, T - 1]: beyond T - 1 steps a timestep repeats (h = 0),
    # which diffusers runs into NaN; trailing spaces num_steps points over [0, T - 1]
    most = T if spacing == "trailing" else T - 1
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or not 0 < num_steps <= most:
        raise ValueError(f"steps must be an integer in [1, {most}] for DPM-Solver++ with {spacing} spacing and "
                         f"num_train_timesteps={T} (more would repeat a timestep); got {num_steps!r}")
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, num_steps + 1).round()[::-1][:-1].astype(np.int64)
    elif spacing == "leading":
        ratio = T // (num_steps + 1)
        ts = (np.arange(0, num_steps + 1) * ratio).round()[::-1][:-1].astype(np.int64) + steps_offset
    else:
        # diffusers' float step gives one extra ~0 point (timestep -1) for some counts (61, 103, ...), which it
        # keeps and runs; the run has num_steps timesteps, all equal to diffusers' first num_steps
        ts = np.arange(T, 0, -T / num_steps).round().astype(np.int64)[:num_steps] - 1
    out = [int(t) for t in ts]
    if max(out) >= T or min(out) < 0:
        raise ValueError(f"steps_offset={steps_offset} moves timesteps outside [0, {T - 1}]")
    return out


def _alpha_sigma_lambda(s: float) -> tuple[float, float, float]:
    """(α_t, σ_t, λ_t) of the VP sigma s = √((1-ᾱ)/ᾱ), as diffusers' _sigma_to_alpha_sigma_t; λ = +inf at s = 0."""
    alpha = 1.0 / math.sqrt(s * s + 1.0)
    sigma = s * alpha
    return alpha, sigma, (math.log(alpha) - math.log(sigma)) if sigma > 0 else math.inf


def _update(sampler: str, o: dict, t: tuple, s0: tuple, s1: tuple | None) -> tuple[float, float, float, float]:
    """(k_x0, k_prev, k_x, sigma) of a first-order (s1 None) or second-order update from s0 to t."""
    alpha_t, sigma_t, lam_t = t
    _, sigma_s0, lam_s0 = s0
    h = lam_t - lam_s0
    em = math.exp(-h)  # 0 when the target sigma is 0 (h = inf)
    sde = sampler == "dpmpp-2m-sde"
    if sde:
        k_x, c = sigma_t / sigma_s0 * em, alpha_t * (1.0 - em * em)
        sigma = sigma_t * math.sqrt(1.0 - em * em)
    else:
        k_x, c, sigma = sigma_t / sigma_s0, -(alpha_t * (em - 1.0)), 0.0
    if s1 is None or h == 0.0:  # h = 0 (trailing's last timestep 0 to sigma_min): the identity, as diffusers' midpoint
        return c, 0.0, k_x, sigma
    r0 = (lam_s0 - s1[2]) / h
    # D0 = x0, D1 = (x0 - x0_prev) / r0; out = k_x*x + c*D0 + w*D1 (+ noise)
    if o["solver_type"] == "midpoint":
        w = 0.5 * c
    elif sde:
        w = alpha_t * ((1.0 - em * em) / (-2.0 * h) + 1.0)
    else:
        w = alpha_t * ((em - 1.0) / h + 1.0)
    return c + w / r0, -w / r0, k_x, sigma


def plan(alphas_cumprod: np.ndarray, x0_coefs: Callable[[float], tuple[float, float]], sampler: str,
         num_steps: int, o: dict) -> list[tuple[int, MultistepCoefs]]:
    """(t, scalars) of every step of a run, as DPMSolverMultistepScheduler.step runs them from the start.

    x0_coefs(ᾱ_t) -> (a, b) with x0 = a·x + b·m for the model's prediction type; o: checked options."""
    _choice("sampler", sampler, SAMPLERS)
    ac = np.asarray(alphas_cumprod, dtype=np.float64)
    T = len(ac)
    ts = timesteps(T, num_steps, o["spacing"], o["steps_offset"])
    S = len(ts)
    sig = [math.sqrt((1 - ac[t]) / ac[t]) for t in ts]
    sig.append(math.sqrt((1 - ac[0]) / ac[0]) if o["final_sigmas_type"] == "sigma_min" else 0.0)
    als = [_alpha_sigma_lambda(s) for s in sig]
    clip = o["clip_sample_range"] if o["clip_sample"] else math.inf
    steps = []
    for i, t in enumerate(ts):
        lower_final = i == S - 1 and (o["euler_at_final"] or (o["lower_order_final"] and S < 15)
                                      or o["final_sigmas_type"] == "zero")
        first = o["solver_order"] == 1 or i < 1 or lower_final
        k_x0, k_prev, k_x, sigma = _update(sampler, o, als[i + 1], als[i], None if first else als[i - 1])
        a, b = x0_coefs(float(ac[t]))
        steps.append((t, MultistepCoefs(a, b, clip, k_x0, k_prev, k_x, sigma)))
    return steps
