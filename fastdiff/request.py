"""A sampling request, checked once: the one validator behind generate(), the Engine, the ONNX runtime and the CLI.

Every mistake raises ValueError naming the argument and what was expected, before any allocation. This
module needs only NumPy, so the torch-free ONNX runtime uses it too.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np

from .schedule import SAMPLER_OPTIONS, SAMPLERS, NoiseSchedule, Step

MAX_SEED = 2**63 - 1  # seeds are int64 (the Philox key is its 64 bits); image i uses seed + i
MAX_SAMPLES = 10**9   # per request; generate() streams batches, so this bounds work, not memory
MAX_BATCH_SIZE = 65536  # images in one batch (a model call, a training step)
MAX_GUIDANCE = 1000.0   # classifier-free guidance scales in use are below ~30; beyond this float32 overflows soon


def check_int(name: str, value: Any, low: int, high: int | None = None) -> int:
    """value as an int in [low, high]; ValueError naming `name` otherwise (bools are not integers here)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer; got {value!r}")
    value = int(value)
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bound}; got {value}")
    return value


def check_float(name: str, value: Any, low: float = -math.inf, *, positive: bool = False,
                high: float = math.inf) -> float:
    """value as a finite float >= low (> low when positive) and <= high; ValueError naming `name` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number; got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < low or (positive and value == low):
        raise ValueError(f"{name} must be a finite number {'>' if positive else '>='} {low:g}; got {value}")
    if value > high:
        raise ValueError(f"{name} must be <= {high:g}; got {value:g}")
    return value


def fastdiff_options(sampler: str, options: dict) -> dict:
    """fastdiff's own defaults on top of diffusers' (schedule.SAMPLER_OPTIONS): DDIM re-derives ε from the
    clamped x0 whenever x0 is clamped (use_clipped_model_output), so more steps never mean worse images;
    diffusers' default (ε as the model gave it) accumulates the clipping residue over many steps (FID 162
    at DDIM-1000 η = 0 on the shipped model). Pass use_clipped_model_output=False for diffusers' semantics."""
    if sampler == "ddim" and options.get("clip_sample", True) and "use_clipped_model_output" not in options:
        return {**options, "use_clipped_model_output": True}
    return dict(options)


def default_steps(sampler: str, num_train_timesteps: int) -> int:
    """50 for DDIM, 20 for DPM-Solver++ (dpmpp-*), every training timestep (T) for DDPM."""
    if sampler.startswith("dpmpp"):
        return min(20, num_train_timesteps)
    return num_train_timesteps if sampler == "ddpm" else 50


@dataclass(frozen=True)
class SampleRequest:
    """n images from seeds seed .. seed+n-1 with one sampler; build it with `SampleRequest.checked`."""

    n: int
    sampler: str
    steps: int
    seed: int
    classes: int | np.ndarray | None  # one id for every image, one per image (-1: the null class), or None
    guidance: float
    options: dict = field(default_factory=dict)
    reverse_steps: list[Step] = field(default_factory=list, repr=False)

    @classmethod
    def checked(cls, schedule: NoiseSchedule, num_classes: int, n: int, *, sampler: str = "ddim",
                steps: int | None = None, seed: int = 0, classes: int | Sequence[int] | Any | None = None,
                guidance: float = 1.0, **options) -> "SampleRequest":
        """Validate every field against the model (its schedule and class count); the request or ValueError."""
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}; got {sampler!r}")
        n = check_int("n (number of images)", n, 1, MAX_SAMPLES)
        T = schedule.num_train_timesteps
        steps = default_steps(sampler, T) if steps is None else check_int("steps", steps, 1, T)
        seed = check_int("seed", seed, 0, MAX_SEED - (n - 1))
        guidance = check_float("guidance", guidance, 0.0, high=MAX_GUIDANCE)
        classes = check_classes(classes, n, num_classes)
        if classes is None and guidance != 1.0:
            raise ValueError("guidance != 1 needs class ids (--class) and a class-conditional model")
        options = fastdiff_options(sampler, options)
        plan = schedule.reverse_steps(sampler, steps, **options)
        return cls(n, sampler, steps, seed, classes, guidance, options, plan)

    def batches(self, batch_size: int) -> Iterator[tuple[int, int]]:
        """(first image, count) of each batch, in order."""
        batch_size = check_int("batch_size", batch_size, 1, MAX_BATCH_SIZE)
        for start in range(0, self.n, batch_size):
            yield start, min(batch_size, self.n - start)

    def seeds(self, start: int, count: int) -> np.ndarray:
        return np.arange(count, dtype=np.int64) + np.int64(self.seed + start)

    def class_ids(self, start: int, count: int) -> np.ndarray | None:
        """The class id of images start .. start+count-1 (int64), or None for an unconditional request."""
        if self.classes is None:
            return None
        if isinstance(self.classes, int):
            return np.full(count, self.classes, dtype=np.int64)
        return self.classes[start:start + count]

    def describe(self) -> dict:
        """The request as JSON-ready fields (for sidecars and manifests)."""
        classes = self.classes.tolist() if isinstance(self.classes, np.ndarray) else self.classes
        return {"sampler": self.sampler, "steps": self.steps, "n": self.n, "seed": self.seed, "classes": classes,
                "guidance": self.guidance, **self.options}


def check_classes(classes: Any, n: int, num_classes: int) -> int | np.ndarray | None:
    """One class id for every image, n of them (ndarray, tensor, sequence), or None; each in [-1, num_classes)."""
    if classes is None:
        return None
    if not num_classes:
        raise ValueError("class ids were given but the model is unconditional (trained without --class-cond)")
    if isinstance(classes, (int, np.integer)) and not isinstance(classes, bool):
        return check_int("class id", classes, -1, num_classes - 1)
    if hasattr(classes, "numpy"):  # a torch tensor, without importing torch here
        classes = classes.detach().cpu().numpy()
    ids = np.asarray(classes)
    if ids.shape != (n,) or ids.dtype.kind not in "iu":
        raise ValueError(f"classes must be one integer class id or {n} of them (one per image); "
                         f"got {ids.dtype} of shape {ids.shape}")
    if ids.min() < -1 or ids.max() >= num_classes:
        raise ValueError(f"class ids must be in [0, {num_classes - 1}] (or -1 for the null class); "
                         f"got [{ids.min()}, {ids.max()}]")
    return ids.astype(np.int64)
