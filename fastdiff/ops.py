"""Python face of the fused reverse-step kernel (torch.ops.fastdiff.reverse_step).

    x0  = a*x + b*m, clamped to ±clip_range (inf: no clamp)
    out = k_x0*x0 + k_x*x + k_m*m + sigma*z,   z = fastdiff.noise.gaussian(seeds, step, ·)

If the compiled extension fastdiff._C is missing, the pure-PyTorch reference (same fp32 math, same
noise bits) is used instead, with one warning; backend() says which is in use. Bad arguments raise
ValueError naming the argument (docs/design.md §4). Both ops are differentiable in x, model_output (and x0_prev):
the step is linear in them but for the clamp of x0, and the noise does not depend on them.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from . import noise, reference
from .multistep import MultistepCoefs
from .schedule import StepCoefs

__all__ = ["reverse_step", "reverse_step_reference", "multistep_step", "multistep_step_reference", "initial_noise",
           "check_seeds", "backend", "cpu_isa"]

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


def cpu_isa() -> str:
    """The CPU kernel's vector path: 'avx512', 'avx2' or 'scalar' (picked at load time, FASTDIFF_CPU_ISA to
    force one), or 'reference' without the extension."""
    return _C.cpu_isa() if _BACKEND == "extension" else "reference"


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
        # Reached for fake/meta tensors, and for a meta tensor mixed with real ones: refuse the latter
        # rather than hand back uninitialised memory on x's device.
        torch._check(x.shape == model_output.shape, lambda: "x and model_output must have the same shape")
        torch._check(model_output.device == x.device and seeds.device == x.device,
                     lambda: f"reverse_step: x, model_output and seeds must be on one device; got {x.device}, "
                             f"{model_output.device}, {seeds.device}")
        torch._check(model_output.dtype == x.dtype and seeds.dtype == torch.int64,
                     lambda: "reverse_step: model_output must have x's dtype and seeds must be int64")
        return torch.empty_like(x, memory_format=_memory_format(x))


def _unclamped(x: torch.Tensor, m: torch.Tensor, a: float, b: float, clip_range: float) -> torch.Tensor:
    """1 where the clamp of x0 = a*x + b*m passes the gradient, as the reference's where() does (NaN included)."""
    x0 = reference.f32(a) * x.float() + reference.f32(b) * m.float()
    clip = reference.f32(clip_range)
    return ((x0 >= -clip) & (x0 <= clip) | x0.isnan()).float()


def _save_step(ctx, inputs, output) -> None:
    x, m, *_ = inputs
    ctx.save_for_backward(x, m)
    ctx.scalars = [reference.f32(c) for c in inputs[-7:]]


def _reverse_step_backward(ctx, grad: torch.Tensor):
    x, m = ctx.saved_tensors
    a, b, clip, k_x0, k_x, k_m, _ = ctx.scalars
    g = grad.float()
    through = _unclamped(x, m, a, b, clip) * g * k_x0
    gx, gm = (through * a + k_x * g).to(x.dtype), (through * b + k_m * g).to(m.dtype)
    return (gx, gm) + (None,) * 9


def _multistep_step_backward(ctx, grad_out: torch.Tensor | None, grad_x0: torch.Tensor | None):
    x, m = ctx.saved_tensors
    a, b, clip, k_x0, k_prev, k_x, _ = ctx.scalars
    g = torch.zeros_like(x, dtype=torch.float32) if grad_out is None else grad_out.float()
    g0 = g * k_x0 if grad_x0 is None else g * k_x0 + grad_x0.float()
    through = _unclamped(x, m, a, b, clip) * g0
    return ((through * a + k_x * g).to(x.dtype), (through * b).to(m.dtype), (k_prev * g).to(x.dtype)) + (None,) * 9


if _BACKEND == "extension":
    torch.library.register_autograd("fastdiff::reverse_step", _reverse_step_backward, setup_context=_save_step)
    torch.library.register_autograd("fastdiff::multistep_step", _multistep_step_backward, setup_context=_save_step)


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


def _check_coefs(coefs, kind: type) -> list[float]:
    """The 7 scalars of a step as floats: finite, but clip_range, which is >= 0 (inf: no clamp)."""
    try:
        values = [float(c) for c in coefs]
    except (TypeError, ValueError):
        raise ValueError(f"coefs must be a fastdiff {kind.__name__} of {len(kind._fields)} numbers; got "
                         f"{type(coefs).__name__}") from None
    if len(values) != len(kind._fields):
        raise ValueError(f"coefs must hold {len(kind._fields)} numbers ({', '.join(kind._fields)}); got {len(values)}")
    for name, v in zip(kind._fields, values):
        if not (v >= 0 if name == "clip_range" else math.isfinite(v)):
            raise ValueError(f"coefs.{name} must be " + ("a number >= 0 (inf: no clamp)" if name == "clip_range"
                                                         else "finite") + f"; got {v}")
    return values


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
    coefs = StepCoefs(*_check_coefs(coefs, StepCoefs))
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
    if isinstance(shape, (str, bytes)) or not hasattr(shape, "__iter__") or not all(
            isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise ValueError(f"shape must be a sequence of sizes >= 0 (one sample's, e.g. (C, H, W)); got {shape!r}")
    zeros = torch.zeros((len(seeds), *shape), device=seeds.device).contiguous(memory_format=memory_format)
    return reverse_step(zeros, zeros, seeds, INITIAL_NOISE_STEP, INITIAL_NOISE_COEFS)


def _reference(x: torch.Tensor, m: torch.Tensor, seeds: torch.Tensor, step: int, coefs: StepCoefs) -> torch.Tensor:
    out = reference.apply_step(x.float(), m.float(), seeds, step, coefs)
    return out.to(x.dtype).contiguous(memory_format=_memory_format(x))


# --- DPM-Solver++: torch.ops.fastdiff.multistep_step (csrc/multistep.*, docs/dpmpp.md) ----------------------
# It returns (out, x0) as two new tensors rather than writing x0 into a caller's buffer: a functional op needs
# no alias annotations, so register_fake, torch.compile and opcheck work as for reverse_step, and under CUDA-graph
# capture both outputs come from the graph's private pool, i.e. they are static buffers by construction.
if _BACKEND == "extension":

    @torch.library.register_fake("fastdiff::multistep_step")
    def _multistep_step_fake(x, model_output, x0_prev, seeds, step, a, b, clip_range, k_x0, k_prev, k_x, sigma):
        torch._check(x.shape == model_output.shape and x.shape == x0_prev.shape,
                     lambda: "multistep_step: x, model_output and x0_prev must have the same shape")
        torch._check(model_output.device == x.device and x0_prev.device == x.device and seeds.device == x.device,
                     lambda: "multistep_step: x, model_output, x0_prev and seeds must be on one device")
        torch._check(model_output.dtype == x.dtype and x0_prev.dtype == x.dtype and seeds.dtype == torch.int64,
                     lambda: "multistep_step: model_output and x0_prev must have x's dtype; seeds must be int64")
        fmt = _memory_format(x)
        return torch.empty_like(x, memory_format=fmt), torch.empty_like(x, memory_format=fmt)


def _validate_multistep(x: torch.Tensor, model_output: torch.Tensor, x0_prev: torch.Tensor, seeds: torch.Tensor,
                        step: int, coefs: MultistepCoefs):
    if not isinstance(coefs, MultistepCoefs):
        raise ValueError(f"coefs must be a fastdiff.multistep.MultistepCoefs; got {type(coefs).__name__}")
    x, model_output, _ = _validate(x, model_output, seeds, step, StepCoefs(*_check_coefs(coefs, MultistepCoefs)))
    if not isinstance(x0_prev, torch.Tensor):
        raise ValueError(f"x0_prev must be a torch.Tensor; got {type(x0_prev).__name__}")
    if x0_prev.shape != x.shape or x0_prev.dtype != x.dtype or x0_prev.device != x.device:
        raise ValueError(f"x0_prev must match x ({x.dtype}, shape {tuple(x.shape)}, on {x.device}); got "
                         f"{x0_prev.dtype}, shape {tuple(x0_prev.shape)}, on {x0_prev.device}")
    x0_prev = x0_prev.contiguous(memory_format=_memory_format(x))
    return x, model_output, x0_prev, MultistepCoefs(*_check_coefs(coefs, MultistepCoefs))


def multistep_step(x: torch.Tensor, model_output: torch.Tensor, x0_prev: torch.Tensor, seeds: torch.Tensor, step: int,
                   coefs: MultistepCoefs) -> tuple[torch.Tensor, torch.Tensor]:
    """One fused DPM-Solver++ step: (x_prev, x0), both with x's dtype, device and memory format; x0 (the clamped
    data prediction of this step) is the next step's x0_prev."""
    x, model_output, x0_prev, coefs = _validate_multistep(x, model_output, x0_prev, seeds, step, coefs)
    if _BACKEND == "extension":
        return torch.ops.fastdiff.multistep_step(x, model_output, x0_prev, seeds, int(step), *coefs)
    _warn_fallback()
    return _multistep_reference(x, model_output, x0_prev, seeds, int(step), coefs)


def multistep_step_reference(x: torch.Tensor, model_output: torch.Tensor, x0_prev: torch.Tensor, seeds: torch.Tensor,
                             step: int, coefs: MultistepCoefs) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-PyTorch twin of the multistep kernels: the same fp32 operations in the same order, the same noise."""
    x, model_output, x0_prev, coefs = _validate_multistep(x, model_output, x0_prev, seeds, step, coefs)
    return _multistep_reference(x, model_output, x0_prev, seeds, int(step), coefs)


def _multistep_reference(x, m, x0_prev, seeds, step, coefs) -> tuple[torch.Tensor, torch.Tensor]:
    out, x0 = reference.apply_multistep(x.float(), m.float(), x0_prev.float(), seeds, step, coefs)
    fmt = _memory_format(x)
    return out.to(x.dtype).contiguous(memory_format=fmt), x0.to(x.dtype).contiguous(memory_format=fmt)
