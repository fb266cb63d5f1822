"""The sampling engine: the fastest way this package knows to run a DDPM/DDIM plan.

On CUDA the whole denoising loop — x_T included — is captured as ONE CUDA graph per request key
(batch size, image shape, sampler, steps, options, dtype, guidance, conditional or not):

* static buffers: the per-sample seeds (an int64 device tensor, shared design §3), the class ids
  and the output; a replay copies new seeds into the static buffer and so draws new samples,
  without recapture and without any host sync inside the loop (x_T is drawn by the fused op
  itself: reverse_step(0, 0, seeds, INITIAL_NOISE_STEP, σ=1) is exactly sampling.initial_noise);
* the fused reverse step (torch.ops.fastdiff.reverse_step) after every model call;
* optional bf16/fp16 autocast of the model; the step state x stays float32;
* the model and the state in channels_last (the fused op keeps the layout; the noise depends on
  the logical index only, so the samples do not change);
* warm-up on a side stream before capture, a small LRU cache of captured graphs (`cache_size`,
  each graph owns its memory pool, freed on eviction), and an eager fallback that warns once
  when capture fails.

On the CPU the same loop runs eagerly under torch.inference_mode with the fused C++ step
(OpenMP via at::parallel_for). The engine leaves torch's thread count alone (torch defaults to
one thread per physical core, which is right for a dedicated machine); pass `num_threads` to
set it for the duration of each `sample` call, e.g. when other processes share the cores.

Results equal `sampling.run` with the same seeds (fp32: to float32 rounding of the model's
convolutions; bf16/fp16: within the model's own reduced-precision error).

Side effect: the engine puts the model in eval mode on `device` and, with channels_last,
converts its parameters to channels_last in place (the same module object is used).
"""
from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from . import ops
from .sampling import INITIAL_NOISE_STEP, model_output
from .schedule import NoiseSchedule, Step, StepCoefs

__all__ = ["Engine", "INITIAL_NOISE_COEFS", "SAMPLER_OPTIONS"]

# reverse_step(0, 0, seeds, INITIAL_NOISE_STEP, INITIAL_NOISE_COEFS) = 1·z: the normals of x_T.
INITIAL_NOISE_COEFS = StepCoefs(0.0, 0.0, math.inf, 0.0, 0.0, 0.0, 1.0)

SAMPLER_OPTIONS = {
    "ddpm": ("variance_type", "spacing", "steps_offset", "clip_sample", "clip_sample_range"),
    "ddim": ("eta", "spacing", "steps_offset", "clip_sample", "clip_sample_range", "set_alpha_to_one",
             "use_clipped_model_output"),
}
DTYPES = (None, torch.float32, torch.bfloat16, torch.float16)
_WARMUP_STEPS = 2  # model calls per warm-up pass (shapes are the same at every step)
_WARMUP_PASSES = 3


@dataclass
class _Graph:
    graph: Any  # torch.cuda.CUDAGraph, or None when capture failed (eager fallback)
    seeds: torch.Tensor | None = None
    y: torch.Tensor | None = None
    out: torch.Tensor | None = None


class Engine:
    """Graph-captured, mixed-precision sampling on CUDA; the fused step under inference_mode on CPU.

    model: any `model(x, t, y=None)` nn.Module (fastdiff's UNet, or a wrapper of another network).
    dtype: None / torch.float32 (full precision), torch.bfloat16 or torch.float16 (autocast of the
    model only; the reverse step and x stay float32).
    channels_last: run the model and keep x in channels_last (4-D images only).
    use_graphs: capture CUDA graphs (CUDA only; ignored on the CPU).
    cache_size: captured graphs kept (least recently used evicted first).
    num_threads: torch CPU threads during `sample` (None: leave torch's setting alone).
    check_finite: raise FloatingPointError on NaN/inf: on the CPU the model output is checked at every
    step (as sampling.run does; a reduction, cheap beside the model); on CUDA the result is checked
    once at the end (never inside the loop: no host sync per step).
    """

    def __init__(self, model: torch.nn.Module, schedule: NoiseSchedule, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None, channels_last: bool = True, use_graphs: bool = True,
                 cache_size: int = 8, num_threads: int | None = None, check_finite: bool = True):
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule must be a fastdiff NoiseSchedule; got {type(schedule).__name__}")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be None, torch.float32, torch.bfloat16 or torch.float16; got {dtype}")
        if cache_size < 1:
            raise ValueError(f"cache_size must be >= 1; got {cache_size}")
        if num_threads is not None and num_threads < 1:
            raise ValueError(f"num_threads must be >= 1; got {num_threads}")
        if device is None:
            try:
                device = next(model.parameters()).device
            except (StopIteration, AttributeError, TypeError):
                device = torch.device("cpu")
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda; got {self.device}")
        self.schedule = schedule
        self.dtype = None if dtype == torch.float32 else dtype
        self.channels_last = channels_last
        self.use_graphs = use_graphs and self.device.type == "cuda"
        self.cache_size = cache_size
        self.num_threads = num_threads
        self.check_finite = check_finite
        if isinstance(model, torch.nn.Module):
            model = model.to(self.device).eval()
            if channels_last:
                model = model.to(memory_format=torch.channels_last)
        self.model = model
        self._graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self._warned = False
        self.stats = {"captures": 0, "replays": 0, "eager_runs": 0, "evictions": 0, "capture_failures": 0}

    # --- public -------------------------------------------------------------------------------------
    def plan(self, sampler: str, steps: int, **options) -> list[Step]:
        """The reverse steps of a request (validates sampler, steps and options)."""
        if sampler not in SAMPLER_OPTIONS:
            raise ValueError(f"sampler must be one of {', '.join(SAMPLER_OPTIONS)}; got {sampler!r}")
        unknown = set(options) - set(SAMPLER_OPTIONS[sampler])
        if unknown:
            raise ValueError(f"unknown option(s) for {sampler}: {', '.join(sorted(unknown))}; "
                             f"allowed: {', '.join(SAMPLER_OPTIONS[sampler])}")
        if isinstance(steps, bool) or not isinstance(steps, int):
            raise ValueError(f"steps must be an int; got {steps!r}")
        return self.schedule.plan(sampler, steps, **options)

    def sample(self, seeds: torch.Tensor, image_shape: tuple[int, ...], sampler: str = "ddim", steps: int = 50,
               y: torch.Tensor | None = None, guidance: float = 1.0, progress: bool = False,
               **options) -> torch.Tensor:
        """Samples x_0 (float32, contiguous, on the engine's device; not clamped) for the given seeds,
        one int64 seed per sample; y: class ids (or None), guidance: classifier-free guidance scale;
        progress: a per-step bar on the eager path (a captured graph runs as one replay)."""
        seeds, image_shape, y, guidance = self._check(seeds, image_shape, y, guidance)
        plan = self.plan(sampler, steps, **options)
        threads = torch.get_num_threads()
        if self.num_threads is not None:
            torch.set_num_threads(self.num_threads)
        try:
            with torch.inference_mode():
                if self.use_graphs:
                    out = self._sample_graph(seeds, image_shape, sampler, steps, plan, y, guidance, options)
                else:
                    self.stats["eager_runs"] += 1
                    out = self._loop(seeds, image_shape, plan, y, guidance, progress)
                if self.check_finite and not bool(torch.isfinite(out).all()):
                    raise FloatingPointError(f"the samples hold NaN or inf ({sampler}-{steps}); check the weights, "
                                             "the inputs and, with dtype=float16, the model's range")
        finally:
            if self.num_threads is not None:
                torch.set_num_threads(threads)
        return out.contiguous().clone()  # outside inference_mode: an ordinary tensor, not the static buffer

    def clear(self) -> None:
        """Drop every captured graph (and its memory pool)."""
        self._graphs.clear()

    @property
    def cached_keys(self) -> list[tuple]:
        return list(self._graphs)

    # --- internals ----------------------------------------------------------------------------------
    def _check(self, seeds, image_shape, y, guidance):
        if not isinstance(seeds, torch.Tensor) or seeds.dtype != torch.int64 or seeds.dim() != 1 or not len(seeds):
            raise ValueError("seeds must be a non-empty 1-D int64 tensor (one seed per sample), "
                             f"e.g. fastdiff.sampling.make_seeds(0, n); got {_describe(seeds)}")
        image_shape = tuple(int(s) for s in image_shape)
        if not image_shape or any(s < 1 for s in image_shape):
            raise ValueError(f"image_shape must be positive sizes (C, H, W); got {image_shape}")
        guidance = float(guidance)
        if not guidance >= 0 or not math.isfinite(guidance):
            raise ValueError(f"guidance must be a finite number >= 0; got {guidance}")
        if y is not None:
            if not isinstance(y, torch.Tensor) or y.dtype.is_floating_point or y.dim() != 1 or len(y) != len(seeds):
                raise ValueError(f"y must be a 1-D integer tensor with one class id per seed ({len(seeds)}); "
                                 f"got {_describe(y)}")
            y = y.to(self.device, torch.long)
        elif guidance != 1.0:
            raise ValueError("guidance != 1 needs class ids y (and a class-conditional model)")
        return seeds.to(self.device), image_shape, y, guidance

    def _autocast(self):
        if self.dtype is None:
            return nullcontext()
        # cache_enabled=False: the autocast weight cache must not outlive a graph capture
        return torch.autocast(self.device.type, dtype=self.dtype, cache_enabled=False)

    def _layout(self, image_shape) -> torch.memory_format:
        return torch.channels_last if self.channels_last and len(image_shape) == 3 else torch.contiguous_format

    def _loop(self, seeds: torch.Tensor, image_shape: tuple[int, ...], plan: list[Step], y: torch.Tensor | None,
              guidance: float, progress: bool = False) -> torch.Tensor:
        """x_T from the fused op, then model + fused step per plan entry; no host sync."""
        zeros = torch.zeros((len(seeds), *image_shape), device=self.device).contiguous(
            memory_format=self._layout(image_shape))
        x = ops.reverse_step(zeros, zeros, seeds, INITIAL_NOISE_STEP, INITIAL_NOISE_COEFS)
        for t, coefs in tqdm(plan, desc="sample", disable=not progress, leave=False, dynamic_ncols=True):
            with self._autocast():
                m = model_output(self.model, x, t, y, guidance)
            if self.check_finite and self.device.type == "cpu" and not bool(torch.isfinite(m).all()):
                raise FloatingPointError(f"the model output holds NaN or inf at timestep {t}; check the weights and "
                                         "inputs")  # CPU only: on CUDA this would be a host sync per step
            x = ops.reverse_step(x, m.to(torch.float32), seeds, t, coefs)
        return x

    def _key(self, n, image_shape, sampler, steps, y, guidance, options) -> tuple:
        return (n, image_shape, sampler, steps, tuple(sorted(options.items())), self.dtype, self.channels_last,
                guidance, y is not None)

    def _sample_graph(self, seeds, image_shape, sampler, steps, plan, y, guidance, options) -> torch.Tensor:
        key = self._key(len(seeds), image_shape, sampler, steps, y, guidance, options)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._capture(seeds, image_shape, plan, y, guidance)
            self._graphs[key] = entry
            while len(self._graphs) > self.cache_size:
                self._graphs.popitem(last=False)
                self.stats["evictions"] += 1
        self._graphs.move_to_end(key)
        if entry.graph is None:
            self.stats["eager_runs"] += 1
            return self._loop(seeds, image_shape, plan, y, guidance)
        entry.seeds.copy_(seeds, non_blocking=True)
        if y is not None:
            entry.y.copy_(y, non_blocking=True)
        entry.graph.replay()
        self.stats["replays"] += 1
        return entry.out

    def _capture(self, seeds, image_shape, plan, y, guidance) -> _Graph:
        static_seeds = seeds.clone()
        static_y = None if y is None else y.clone()
        try:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):  # cuDNN/cuBLAS autotuning and lazy init happen here, not in capture
                for _ in range(_WARMUP_PASSES):
                    self._loop(static_seeds, image_shape, plan[:_WARMUP_STEPS], static_y, guidance)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self._loop(static_seeds, image_shape, plan, static_y, guidance)
            self.stats["captures"] += 1
            return _Graph(graph, static_seeds, static_y, out)
        except Exception as exc:  # noqa: BLE001 - any capture failure falls back to the eager loop
            self.stats["capture_failures"] += 1
            if not self._warned:
                self._warned = True
                warnings.warn(f"CUDA graph capture failed ({type(exc).__name__}: {exc}); the engine runs this "
                              "request eagerly (slower, same results)", RuntimeWarning, stacklevel=4)
            torch.cuda.synchronize(self.device)
            return _Graph(None)


def _describe(v) -> str:
    if isinstance(v, torch.Tensor):
        return f"a {v.dtype} tensor of shape {tuple(v.shape)}"
    return type(v).__name__
