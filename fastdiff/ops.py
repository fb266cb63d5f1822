"""Python face of the fused reverse-step kernel (torch.ops.fastdiff.reverse_step).

    x0  = a*x + b*m, clamped to ±clip_range (inf: no clamp)
    out = k_x0*x0 + k_x*x + k_m*m + sigma*z,   z = fastdiff.noise.gaussian(seeds, step, ·)

If the compiled extension fastdiff._C is missing, the pure-PyTorch reference (same fp32 math, same
noise bits) is used instead, with one warning; backend() says which is in use. Bad arguments raise
ValueError naming the argument (docs/design.md §4).
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from . import noise, reference
from .schedule import StepCoefs

__all__ = ["reverse_step", "reverse_step_reference", "initial_noise", "check_seeds", "backend"]

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# reverse_step(0, 0, seeds, INITIAL_NOISE_STEP, INITIAL_NOISE_COEFS) = 1·z: the normals of x_T.
INITIAL_NOISE_STEP = noise.INITIAL_NOISE_STEP
INITIAL_NOISE_COEFS = StepCoefs(0.0, 0.0, math.inf, 0.0, 0.0, 0.0, 1.0)

try:
    from . import _C  # noqa: F401  (registers torch.ops.fastdiff.reverse_step)

    _BACKEND = "extension"
except ImportError as exc:  # pragma: no cover - depends on the build
    _BACKEND = "reference"
    _IMPORT_ERROR = exc
_warned = False


def backend() -> str:
    """'extension' when the compiled kernels are in use, else 'reference'."""
    return _BACKEND


def _warn_fallback() -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            f"fastdiff._C could not be imported ({_IMPORT_ERROR}); using the slower PyTorch reference of "
            "reverse_step. Rebuild with `pip install --no-build-isolation -e .`.",
            RuntimeWarning,
            stacklevel=3,
        )


if _BACKEND == "extension":

    @torch.library.register_fake("fastdiff::reverse_step")
    def _reverse_step_fake(x, model_output, seeds, step, a, b, clip_range, k_x0, k_x, k_m, sigma):
        torch._check(x.shape == model_output.shape, lambda: "x and model_output must have the same shape")
        return torch.empty_like(x, memory_format=_memory_format(x))


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    """The layout the kernels use (and return) for x: contiguous, else channels_last(_3d) if x is."""
    if x.is_contiguous():
        return torch.contiguous_format
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def check_seeds(seeds: torch.Tensor, n: int | None = None, device: torch.device | None = None) -> None:
    """seeds: a 1-D int64 tensor with one seed per sample (n of them, on `device`, when given; else at least one)."""
    if (not isinstance(seeds, torch.Tensor) or seeds.dtype != torch.int64 or seeds.dim() != 1
            or (n is None and not len(seeds))):
        got = f"a {seeds.dtype} tensor of shape {tuple(seeds.shape)}" if isinstance(seeds, torch.Tensor) \
            else type(seeds).__name__
        raise ValueError("seeds must be a non-empty 1-D int64 tensor (one seed per sample, e.g. "
                         f"fastdiff.sampling.make_seeds(0, n)); got {got}")
    if n is not None and len(seeds) != n:
        raise ValueError(f"seeds must hold one seed per sample ({n}); got {len(seeds)}")
    if device is not None and seeds.device != device:
        raise ValueError(f"seeds must be on x's device {device}; got {seeds.device}")


def _validate(x: torch.Tensor, model_output: torch.Tensor, seeds: torch.Tensor, step: int,
              coefs: StepCoefs) -> tuple[torch.Tensor, torch.Tensor, StepCoefs]:
    for name, t in (("x", x), ("model_output", model_output)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if x.dtype not in DTYPES:
        raise ValueError(f"x must be float32, float16 or bfloat16; got {x.dtype}")
    if model_output.dtype != x.dtype:
        raise ValueError(f"model_output must have x's dtype {x.dtype}; got {model_output.dtype}")
    if x.dim() < 1:
        raise ValueError("x must have a batch dimension (dim >= 1); got a 0-d tensor")
    if model_output.shape != x.shape:
        raise ValueError(f"model_output must have x's shape {tuple(x.shape)}; got {tuple(model_output.shape)}")
    if model_output.device != x.device:
        raise ValueError(f"model_output must be on x's device {x.device}; got {model_output.device}")
    check_seeds(seeds, x.shape[0], x.device)
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
        raise ValueError(f"step must be an int; got {type(step).__name__}")
    if not 0 <= step < 2**32:
        raise ValueError(f"step must be in [0, 2^32); got {step}")
    coefs = StepCoefs(*(float(c) for c in coefs))
    fmt = _memory_format(x)
    x = x.contiguous(memory_format=fmt)
    model_output = model_output.contiguous(memory_format=fmt)
    return x, model_output, coefs


def reverse_step(x: torch.Tensor, model_output: torch.Tensor, seeds: torch.Tensor, step: int,
                 coefs: StepCoefs) -> torch.Tensor:
    """One fused reverse step; returns x_prev with x's dtype, device and memory format."""
    x, model_output, coefs = _validate(x, model_output, seeds, step, coefs)
    if _BACKEND == "extension":
        return torch.ops.fastdiff.reverse_step(x, model_output, seeds, int(step), *coefs)
    _warn_fallback()
    return _reference(x, model_output, seeds, int(step), coefs)


def reverse_step_reference(x: torch.Tensor, model_output: torch.Tensor, seeds: torch.Tensor, step: int,
                           coefs: StepCoefs) -> torch.Tensor:
    """Pure-PyTorch twin of the kernels: the same fp32 operations in the same order, the same noise."""
    x, model_output, coefs = _validate(x, model_output, seeds, step, coefs)
    return _reference(x, model_output, seeds, int(step), coefs)


def initial_noise(seeds: torch.Tensor, shape: tuple[int, ...],
                  memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """x_T (float32, on the seeds' device) for each sample from its own seed, made by the fused op itself
    (so a captured CUDA graph draws it too); bit-identical to fastdiff.noise.gaussian(seeds, INITIAL_NOISE_STEP)."""
    check_seeds(seeds)
    zeros = torch.zeros((len(seeds), *shape), device=seeds.device).contiguous(memory_format=memory_format)
    return reverse_step(zeros, zeros, seeds, INITIAL_NOISE_STEP, INITIAL_NOISE_COEFS)


def _reference(x: torch.Tensor, m: torch.Tensor, seeds: torch.Tensor, step: int, coefs: StepCoefs) -> torch.Tensor:
    out = reference.apply_step(x.float(), m.float(), seeds, step, coefs)
    return out.to(x.dtype).contiguous(memory_format=_memory_format(x))
