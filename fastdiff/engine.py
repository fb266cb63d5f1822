"""The sampling engine: the fastest way this package knows to run a DDPM/DDIM plan.

On CUDA the whole denoising loop — x_T included — is captured as ONE CUDA graph per request key
(batch size, image shape, sampler, steps, options, dtype, guidance, conditional or not):

* static buffers: the per-sample seeds (an int64 device tensor, docs/design.md §3), the class ids
  and the output; a replay copies new seeds into the static buffer and so draws new samples,
  without recapture and without any host sync inside the loop (x_T is drawn by the fused op
  itself: ops.initial_noise);
* the fused reverse step (torch.ops.fastdiff.reverse_step) after every model call; for DPM-Solver++ the fused
  multistep step (torch.ops.fastdiff.multistep_step), whose loop state x0_prev is allocated inside the capture
  and so lives in the graph's pool: a static buffer like x (sampling.advance);
* optional bf16/fp16 autocast of the model; the step state x stays float32;
* the model and the state in channels_last (the fused op keeps the layout; the noise depends on
  the logical index only, so the samples do not change);
* warm-up on a side stream before capture, a small LRU cache of captured graphs (`cache_size`,
  each graph owns its memory pool, freed on eviction), and an eager fallback that warns once
  when capture fails.

On the CPU (runtime "ort", the default where onnxruntime is installed: fastdiff.runtimes) the model is
exported once to ONNX (cached by content under $FASTDIFF_CACHE) and run by ONNX Runtime, fed and read through
IOBinding over torch tensors, with the fused C++ step between calls; runtime="torch" (and the fallback when
ORT cannot run the model, with a warning) runs the model in eager torch under torch.inference_mode.
Threads: the ORT session gets `num_threads` (default: torch's thread count when it is built) and, while it
runs, torch's own pool is set to one thread - the step is tiny beside the model, and two thread pools
spinning on the same cores slow each other down. A batch of n >= 2 runs as min(n, threads, `workers`) independent
loops over slices of the batch, each on its own thread with a one-thread ORT session (data parallelism: a small
net's convolutions split across threads inside one call much less well; 1.2-1.4x on 2 cores from batch 2 to 64,
docs/performance.md). Per-sample seeds make the images the same as one loop's. A batch that runs as one loop
(batch 1) takes the session or a one-thread one, whichever ran its call faster when first seen (a small net's
batch-1 call is faster on one thread; runtimes.one_loop_model). The torch runtime leaves torch's
thread count alone unless `num_threads` is given (then it is set for the duration of each `sample` call).

Every path runs the one loop `fastdiff.sampling.denoise` (ORT as a `model(x, t, y)` callable). Results equal
the plain samplers with the same seeds (fp32: to float32 rounding of the two runtimes' convolutions, bounded
in tests/test_engine_runtimes.py; bf16/fp16: within the model's own reduced-precision error; int8: see
docs/performance.md).

Side effect: the engine puts the model in eval mode on `device` and, with channels_last, converts its parameters
to channels_last in place (the same module object is used).
"""
from __future__ import annotations

import warnings
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from tqdm import tqdm

from . import ops, runtimes
from .nn.unet import UNetConfig
from .request import MAX_BATCH_SIZE, MAX_GUIDANCE, SampleRequest, check_classes, check_float, check_int
from .sampling import SAMPLERS, Model, denoise, initial_noise, make_seeds
from .schedule import NoiseSchedule, Step

__all__ = ["Engine", "generate"]

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
    num_threads: CPU threads: the ORT session's, or torch's during `sample` (None: torch's setting).
    workers: the most loops a CPU batch is split into on the ort runtime (None: one per thread; 1: never split).
    runtime: "auto" (cuda-graph on CUDA, ort on the CPU when onnxruntime is installed and the model is a
    fastdiff UNet), "ort", "torch" or "cuda-graph" (fastdiff.runtimes); `runtime` says which one runs.
    int8: run the INT8 ONNX model (quantized once, cached beside the fp32 export; needs the ort runtime).
    check_finite: raise FloatingPointError on NaN/inf: on the CPU the model output is checked at every
    step (as sampling.run does; a reduction, cheap beside the model); on CUDA the result is checked
    once at the end (never inside the loop: no host sync per step).
    """

    def __init__(self, model: torch.nn.Module, schedule: NoiseSchedule, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None, channels_last: bool = True, use_graphs: bool = True,
                 cache_size: int = 8, num_threads: int | None = None, check_finite: bool = True,
                 runtime: str = "auto", int8: bool = False, workers: int | None = None):
        if not isinstance(schedule, NoiseSchedule):
            raise ValueError(f"schedule must be a fastdiff NoiseSchedule; got {type(schedule).__name__}")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be None, torch.float32, torch.bfloat16 or torch.float16; got {dtype}")
        check_int("cache_size", cache_size, 1)
        if num_threads is not None:
            check_int("num_threads", num_threads, 1)
        if workers is not None:
            check_int("workers", workers, 1)
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
        self.runtime = runtimes.resolve(runtime, self.device, model, dtype=self.dtype,
                                        use_graphs=use_graphs and self.device.type == "cuda", int8=bool(int8))
        self.int8 = bool(int8)
        self.channels_last = channels_last and self.runtime != "ort"  # ONNX Runtime reads NCHW
        self.use_graphs = self.runtime == "cuda-graph"
        self.cache_size = cache_size
        self.num_threads = num_threads
        self.workers = workers
        self.check_finite = check_finite
        if isinstance(model, torch.nn.Module):
            model = model.to(self.device).eval()
            if self.channels_last:
                model = model.to(memory_format=torch.channels_last)
        self.model = model
        self._ort: runtimes.OrtModel | None = None
        self._ort_workers: list[runtimes.OrtModel] = []  # one-thread sessions of the split loops
        self._one_loop: dict[tuple, runtimes.OrtModel] = {}  # (n, shape, conditional) -> session of an unsplit loop
        self._graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self._warned = False
        self.stats = {"captures": 0, "replays": 0, "eager_runs": 0, "evictions": 0, "capture_failures": 0}

    # --- public -------------------------------------------------------------------------------------
    def sample(self, seeds: torch.Tensor, image_shape: tuple[int, ...], sampler: str = "ddim", steps: int = 50,
               classes: torch.Tensor | None = None, guidance: float = 1.0, progress: bool = False,
               on_step=None, **options) -> torch.Tensor:
        """Samples x_0 (float32, contiguous, on the engine's device; not clamped) for the given seeds,
        one int64 seed per sample; classes: one class id per seed (or None); guidance: classifier-free
        guidance scale; options: schedule.SAMPLER_OPTIONS[sampler]; progress: a per-step bar, and
        on_step(steps done) a callback after each step, on the eager and ort runtimes (a captured graph
        runs as one replay: neither is called there)."""
        seeds, image_shape, y, guidance = self._check(seeds, image_shape, classes, guidance)
        steps = check_int("steps", steps, 1)
        plan = self.schedule.reverse_steps(sampler, steps, **options)
        self._model_fn()  # export / load the ORT model first (outside inference_mode)
        threads = torch.get_num_threads()
        if self.runtime == "ort":
            torch.set_num_threads(1)  # ORT has the cores; the step is tiny (see the module docstring)
        elif self.num_threads is not None:
            torch.set_num_threads(self.num_threads)
        try:
            with torch.inference_mode():
                if self.use_graphs:
                    out = self._sample_graph(seeds, image_shape, sampler, steps, plan, y, guidance, options)
                else:
                    self.stats["eager_runs"] += 1
                    out = self._loop(seeds, image_shape, plan, y, guidance, progress, on_step)
                if self.check_finite and not bool(torch.isfinite(out).all()):
                    raise FloatingPointError(f"the samples hold NaN or inf ({sampler}-{steps}); check the weights, "
                                             "the inputs and, with dtype=float16, the model's range")
        finally:
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
        return out.contiguous().clone()  # outside inference_mode: an ordinary tensor, not the static buffer

    def clear(self) -> None:
        """Drop every captured graph (and its memory pool) and the ORT session; the next `sample` captures or
        loads again (re-exporting if the model's weights changed: the ORT runtime snapshots them on first use)."""
        self._graphs.clear()
        self._ort, self._ort_workers, self._one_loop = None, [], {}

    @property
    def runtime_info(self) -> dict:
        """What runs the model: runtime, precision, threads and (ort) the ONNX file; for result sidecars."""
        info = {"runtime": self.runtime, "device": str(self.device),
                "precision": "int8" if self.int8 else (str(self.dtype).removeprefix("torch.") if self.dtype else "fp32")}
        if self._ort is not None:
            info.update(onnx=str(self._ort.path), threads=self._ort.threads, workers=self._max_parts())
        return info

    @property
    def cached_keys(self) -> list[tuple]:
        return list(self._graphs)

    # --- internals ----------------------------------------------------------------------------------
    def _check(self, seeds, image_shape, classes, guidance):
        ops.check_seeds(seeds)
        check_int("the number of seeds (the batch)", len(seeds), 1, MAX_BATCH_SIZE)
        image_shape = tuple(int(s) for s in image_shape)
        if not image_shape or any(s < 1 for s in image_shape):
            raise ValueError(f"image_shape must be positive sizes (C, H, W); got {image_shape}")
        self._check_unet_shape(image_shape)
        guidance = check_float("guidance", guidance, 0.0, high=MAX_GUIDANCE)
        y = None
        if classes is not None:
            if (not isinstance(classes, torch.Tensor) or classes.dtype.is_floating_point or classes.dim() != 1
                    or len(classes) != len(seeds)):
                got = f"{classes.dtype} of shape {tuple(classes.shape)}" if isinstance(classes, torch.Tensor) else \
                    type(classes).__name__
                raise ValueError(f"classes must be a 1-D integer tensor with one class id per seed ({len(seeds)}); "
                                 f"got {got}")
            config = getattr(self.model, "config", None)  # a UNet's class count, or a denoiser's own (if it says)
            count = config.num_classes if isinstance(config, UNetConfig) else getattr(self.model, "num_classes", None)
            if count is not None:
                check_classes(classes, len(classes), int(count))
            y = classes.to(self.device, torch.long)
        elif guidance != 1.0:
            raise ValueError("guidance != 1 needs class ids (and a class-conditional model)")
        return seeds.to(self.device), image_shape, y, guidance

    def _check_unet_shape(self, image_shape: tuple[int, ...]) -> None:
        config = getattr(self.model, "config", None)
        if isinstance(config, UNetConfig):
            config.check_image_shape(image_shape)
            if self.runtime == "ort" and image_shape != config.image_shape:
                raise ValueError(f"image_shape must be {config.image_shape} on the ort runtime (the model's exported "
                                 f"size; runtime='torch' samples other sizes); got {image_shape}")

    def _autocast(self):
        if self.dtype is None:
            return nullcontext()
        # cache_enabled=False: the autocast weight cache must not outlive a graph capture
        return torch.autocast(self.device.type, dtype=self.dtype, cache_enabled=False)

    def _layout(self, image_shape) -> torch.memory_format:
        return torch.channels_last if self.channels_last and len(image_shape) == 3 else torch.contiguous_format

    def _model_fn(self) -> Model:
        """The model callable of the runtime: the ORT model (built on first use) or the torch module."""
        if self.runtime != "ort":
            return self.model
        if self._ort is None:
            threads = self.num_threads or torch.get_num_threads()
            try:
                self._ort = runtimes.ort_model(self.model, self.schedule, threads, self.int8)
            except Exception as exc:  # noqa: BLE001 - any export/ORT failure falls back to eager torch
                runtimes.warn_once(f"export:{type(exc).__name__}",
                                   f"the ONNX Runtime runtime could not load the model ({type(exc).__name__}: "
                                   f"{str(exc)[:200]}); the engine runs it in eager torch (fp32)")
                self.runtime, self.int8 = "torch", False
                return self.model
        return self._ort

    def _loop(self, seeds: torch.Tensor, image_shape: tuple[int, ...], plan: list[Step], y: torch.Tensor | None,
              guidance: float, progress: bool = False, on_step=None) -> torch.Tensor:
        """x_T from the fused op, then the one denoising loop (on the ort runtime a batch runs as several
        loops over slices of it, in parallel: _split_loop); no host sync on CUDA."""
        parts = min(len(seeds), self._max_parts())
        if parts > 1:
            return self._split_loop(parts, seeds, image_shape, plan, y, guidance, progress, on_step)
        return self._denoise(self._one_loop_model(len(seeds), image_shape, y), seeds, image_shape, plan, y, guidance,
                             progress, on_step)

    def _one_loop_model(self, n: int, image_shape: tuple[int, ...], y: torch.Tensor | None) -> Model:
        """The model of an unsplit loop: on the ort runtime, the session or its one-thread sibling, whichever ran
        this batch's call faster when first seen (runtimes.one_loop_model)."""
        model = self._model_fn()
        if self.runtime != "ort" or self._ort.threads == 1:
            return model
        key = (n, image_shape, y is not None)
        if key not in self._one_loop:
            x = torch.randn((n, *image_shape), generator=torch.Generator().manual_seed(0))
            t = torch.full((n,), self.schedule.num_train_timesteps // 2)
            self._one_loop[key] = runtimes.one_loop_model(self._ort, self._workers(1)[0], x, t, y)
        return self._one_loop[key]

    def _workers(self, parts: int) -> list[runtimes.OrtModel]:
        """One-thread siblings of the session, one per loop of a split batch."""
        while len(self._ort_workers) < parts:
            self._ort_workers.append(self._ort.sibling(1))
        return self._ort_workers[:parts]

    def _denoise(self, model: Model, seeds, image_shape, plan, y, guidance, progress=False, on_step=None):
        x = initial_noise(seeds, image_shape, memory_format=self._layout(image_shape))
        return denoise(model, x, seeds, plan, y=y, guidance=guidance, autocast=self._autocast,
                       check_finite=self.check_finite and self.device.type == "cpu", progress=progress,
                       on_step=on_step)

    def _max_parts(self) -> int:
        """How many loops a batch may be split into: one per thread of the ORT session (at most `workers`)."""
        if self.runtime != "ort" or self._ort is None:
            return 1
        return min(self._ort.threads, self.workers or self._ort.threads)

    def _split_loop(self, parts, seeds, image_shape, plan, y, guidance, progress, on_step) -> torch.Tensor:
        """The batch as `parts` slices, each denoised on its own thread by its own one-thread ORT session; the first
        slice's loop reports progress (every slice runs the same steps)."""
        workers = self._workers(parts)
        slices = [(int(s[0]), int(s[-1]) + 1) for s in torch.arange(len(seeds)).tensor_split(parts)]

        def run(i: int) -> torch.Tensor:
            a, b = slices[i]
            with torch.inference_mode():  # thread-local: each worker thread enters it
                return self._denoise(workers[i], seeds[a:b], image_shape, plan,
                                     None if y is None else y[a:b], guidance, *((progress, on_step) if i == 0 else ()))

        with ThreadPoolExecutor(parts - 1) as pool:
            rest = [pool.submit(run, i) for i in range(1, parts)]
            first = run(0)
            return torch.cat([first] + [f.result() for f in rest])

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


@torch.inference_mode()
def generate(model: Model, schedule: NoiseSchedule, image_shape: tuple[int, int, int], n: int, *, seed: int = 0,
             sampler: str = "ddim", steps: int | None = None, classes: int | Sequence[int] | torch.Tensor | None = None,
             guidance: float = 1.0, num_classes: int = 0, batch_size: int = 256, device: str | torch.device = "cpu",
             progress: bool = False, engine: "bool | Engine" = True, runtime: str = "auto", int8: bool = False,
             on_batch=None, **options) -> torch.Tensor | None:
    """n samples in [-1, 1] as (n, C, H, W) float32 on the CPU; image i uses seed + i.

    steps: default 50 for DDIM, T for DDPM; classes: one id for all images or one per image (needs
    num_classes); options: schedule.SAMPLER_OPTIONS[sampler]. engine=False runs the plain samplers
    (`sampling.sample_ddpm/ddim`, the same loop without the engine's graphs and layouts); an Engine instance
    is used as it is (its runtime_info then says what ran); runtime, int8: of the Engine built otherwise.
    on_batch(start, images): called with each finished batch instead of keeping it, so any n runs in
    bounded memory; generate then returns None."""
    request = SampleRequest.checked(schedule, num_classes, n, sampler=sampler, steps=steps, seed=seed,
                                    classes=classes, guidance=guidance, **options)
    device = torch.device(device)
    if isinstance(engine, Engine):
        runner = engine
    else:
        runner = Engine(model, schedule, device=device, channels_last=device.type == "cuda", runtime=runtime,
                        int8=int8) if engine else None
    out = []
    total = -(-request.n // check_int("batch_size", batch_size, 1, MAX_BATCH_SIZE))  # a generator and a count: any n, bounded memory
    for start, count in tqdm(request.batches(batch_size), total=total, desc=f"{sampler}-{request.steps}",
                             disable=not progress or total == 1):
        seeds = make_seeds(request.seed + start, count, device)
        ids = request.class_ids(start, count)
        y = None if ids is None else torch.from_numpy(ids).to(device)
        if runner is not None:
            x = runner.sample(seeds, image_shape, request.sampler, request.steps, classes=y,
                              guidance=request.guidance, progress=progress, **request.options)
        else:
            x = SAMPLERS[request.sampler](model, initial_noise(seeds, image_shape), seeds, schedule, request.steps,
                                          y=y, guidance=request.guidance, progress=progress, **request.options)
        images = x.float().cpu().clamp(-1, 1)
        if on_batch is None:
            out.append(images)
        else:
            on_batch(start, images)
    return torch.cat(out) if on_batch is None else None
