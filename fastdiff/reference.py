"""The fused reverse step as array code, for NumPy and PyTorch alike: the twin of csrc/step.h.

The same float32 operations in the same order as the kernels (each product rounded, no fma), with
the same Philox noise, so the PyTorch reference (fastdiff.ops, the test oracle and fallback) and
the torch-free ONNX runtime share one definition. Inputs are float32 arrays or tensors.
"""
from __future__ import annotations

import math

import numpy as np

from . import noise
from .multistep import MultistepCoefs
from .schedule import StepCoefs


def f32(v: float) -> float:
    """The float32 value of a scalar (what the kernels compute with), as a Python float: exact in
    float32, so NumPy and torch both multiply by exactly that value."""
    return float(np.float32(v))


def apply_step(x, m, seeds, step: int, coefs: StepCoefs):
    """x_prev = k_x0·clamp(a·x + b·m) + k_x·x + k_m·m + σ·z, z the Philox normals of (seed, step, index)."""
    a, b, clip, k_x0, k_x, k_m, sigma = (f32(c) for c in coefs)
    x0 = a * x + b * m
    if math.isfinite(coefs.clip_range):  # comparisons, not min/max: NaN propagates as in the kernels
        x0 = noise.where(x0 < -clip, -clip, noise.where(x0 > clip, clip, x0))
    out = k_x0 * x0 + k_x * x + k_m * m
    if sigma != 0.0:
        numel = math.prod(x.shape[1:]) if x.shape[0] else 0
        out = out + sigma * noise.gaussian(seeds, step, numel).reshape(x.shape)
    return out


def apply_multistep(x, m, x0_prev, seeds, step: int, coefs: MultistepCoefs):
    """(out, x0) of one DPM-Solver++ step, the twin of csrc/multistep.h: x0 = clamp(a·x + b·m),
    out = k_x0·x0 + k_prev·x0_prev + k_x·x + σ·z (the k_prev term only when k_prev != 0)."""
    a, b, clip, k_x0, k_prev, k_x, sigma = (f32(c) for c in coefs)
    x0 = a * x + b * m
    if math.isfinite(coefs.clip_range):
        x0 = noise.where(x0 < -clip, -clip, noise.where(x0 > clip, clip, x0))
    out = k_x0 * x0 + k_prev * x0_prev + k_x * x if k_prev != 0.0 else k_x0 * x0 + k_x * x
    if sigma != 0.0:
        numel = math.prod(x.shape[1:]) if x.shape[0] else 0
        out = out + sigma * noise.gaussian(seeds, step, numel).reshape(x.shape)
    return out, x0
