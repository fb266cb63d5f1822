"""How the Engine runs the model: the runtimes and the ONNX Runtime one (docs/performance.md).

* ``cuda-graph``: the whole loop captured as one CUDA graph (fastdiff.engine), on CUDA;
* ``ort``: on the CPU, the network exported once to ONNX (fastdiff.onnx_export) and run by ONNX Runtime,
  whose convolutions are 2-4x faster than eager torch's for these U-Nets on a small CPU; the fused torch step
  stays the step. For an unconditional UNet the file is its body alone (engine.onnx: inputs x and the blocks'
  time biases, which BlockBias looks up per timestep from a table computed once), else the deployment export
  (model.onnx: x, t, y). Files are cached by content (sha256 of the state_dict bytes, the config, the schedule
  and the fastdiff/torch versions) under $FASTDIFF_CACHE (default ~/.cache/fastdiff), written atomically and
  reused across runs; int8=True adds the INT8 file (fastdiff.onnx_quant) beside it, calibrated on the fp32
  model's own DDIM trajectories (x_t at every noise level: timestep-aware, data-free);
* ``torch``: the eager loop (the fallback: onnxruntime missing, a model that is not a fastdiff UNet, a failed
  export - each warns once per process and reason).

OrtModel is a `model(x, t, y)` callable, so the ONE loop `fastdiff.sampling.denoise` runs it unchanged; its
inputs and output are bound to torch CPU tensors' memory with IOBinding (no copies).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import statistics
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .nn.unet import UNet
from .schedule import NoiseSchedule

RUNTIMES = ("auto", "ort", "torch", "cuda-graph")
CALIB_SEEDS, CALIB_STEPS = 8, 32  # INT8 calibration: 8 DDIM-32 trajectories = 256 (x_t, t), t over [0, T)
_warned: set[str] = set()


def ort_available() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


def default_runtime(device: torch.device | str = "cpu") -> str:
    """What runtime="auto" picks on this device: cuda-graph on CUDA, ort on the CPU when onnxruntime is installed."""
    if torch.device(device).type == "cuda":
        return "cuda-graph"
    return "ort" if ort_available() else "torch"


def warn_once(reason: str, message: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def resolve(runtime: str, device: torch.device, model: Any, *, dtype: torch.dtype | None, use_graphs: bool,
            int8: bool) -> str:
    """The runtime an Engine with these settings runs ('ort', 'torch' or 'cuda-graph'); ValueError for
    combinations that cannot run, a warning (once) and 'torch' where ORT is wanted but unusable."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}; got {runtime!r}")
    cuda = device.type == "cuda"
    if runtime == "cuda-graph" and not cuda:
        raise ValueError(f"runtime='cuda-graph' needs a CUDA device; got {device}")
    if runtime == "cuda-graph" and not use_graphs:
        raise ValueError("runtime='cuda-graph' contradicts use_graphs=False")
    if runtime == "ort" and cuda:
        raise ValueError("runtime='ort' is the CPU runtime; on CUDA use 'cuda-graph' or 'torch'")
    if runtime == "ort" and dtype is not None:
        raise ValueError(f"runtime='ort' runs the fp32 (or int8) ONNX model; dtype={dtype} is a torch autocast option")
    if runtime == "auto":
        runtime = ("cuda-graph" if use_graphs else "torch") if cuda else ("ort" if dtype is None else "torch")
    if int8 and runtime != "ort":
        raise ValueError(f"int8=True runs the INT8 ONNX model: it needs the ort runtime (CPU, no dtype); got {runtime!r}")
    if runtime != "ort":
        return runtime
    if not ort_available():
        warn_once("no-ort", "onnxruntime is not installed: the engine runs the model in eager torch "
                            "(pip install onnxruntime for the faster CPU runtime)")
        return "torch"
    if not isinstance(model, UNet):
        warn_once(f"not-unet:{type(model).__name__}",
                  f"the ONNX Runtime runtime exports fastdiff UNets only; a {type(model).__name__} runs in eager torch")
        return "torch"
    return "ort"


# --- the cache ------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    """$FASTDIFF_CACHE, default ~/.cache/fastdiff."""
    return Path(os.environ.get("FASTDIFF_CACHE") or Path.home() / ".cache" / "fastdiff")


def model_digest(model: UNet, schedule: NoiseSchedule) -> str:
    """sha256 of everything the exported file depends on: weights (names, dtypes, shapes, bytes), config,
    schedule, fastdiff and torch versions."""
    h = hashlib.sha256()
    head = {"config": model.config.to_dict(), "schedule": schedule.to_dict(), "fastdiff": __version__,
            "torch": torch.__version__, "format": "onnx-fp32-1"}
    h.update(json.dumps(head, sort_keys=True).encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().data if t.numel() else b"")
    return h.hexdigest()[:32]


def onnx_file(model: UNet, schedule: NoiseSchedule, digest: str | None = None, rebuild: bool = False) -> Path:
    """The cached fp32 ONNX export of model, the deployment format (x, t[, y]; exported on first use, or again
    with rebuild=True)."""
    from .onnx_export import export_model

    return _cached(cache_dir() / "onnx" / (digest or model_digest(model, schedule)) / "model.onnx",
                   lambda path: export_model(model, schedule, path), model, rebuild)


def engine_file(model: UNet, schedule: NoiseSchedule, rebuild: bool = False) -> Path:
    """The engine's file: the body of an unconditional UNet (onnx_export.export_engine_body; its block biases come
    from BlockBias), else the deployment export. rebuild: export it again (a cached file that does not load)."""
    from .onnx_export import export_engine_body

    if model.config.num_classes:
        return onnx_file(model, schedule, rebuild=rebuild)
    return _cached(cache_dir() / "onnx" / model_digest(model, schedule) / "engine.onnx",
                   lambda path: export_engine_body(model, schedule, path), model, rebuild)


def _cached(path: Path, export, model: torch.nn.Module, rebuild: bool = False) -> Path:
    if rebuild or not path.is_file():
        was = model.training
        try:
            export(path)  # atomic: a reader sees the old file or the new one
        finally:
            model.train(was)
    return path


def int8_file(model: UNet, schedule: NoiseSchedule, fp32: Path, threads: int, bias: "BlockBias | None" = None,
              rebuild: bool = False, fp32_model: "OrtModel | None" = None) -> Path:
    """The cached INT8 file beside the fp32 file fp32 (quantized on first use, or again with rebuild=True; the recipe
    depends on the CPU's VNNI); bias: the model's BlockBias when fp32 is an engine body file; fp32_model: an open
    OrtModel of fp32 to calibrate with (else one is opened)."""
    from .onnx_quant import quantize_int8, recipe_name

    path = fp32.with_name(f"{fp32.stem}.int8-{recipe_name()}.onnx")
    if rebuild or not path.is_file():
        feeds = calibration_feeds(fp32_model or OrtModel(fp32, threads, bias), model.config, schedule)
        quantize_int8(fp32, path, feeds,
                      info={"calibration": f"fp32 DDIM-{CALIB_STEPS} trajectories of {CALIB_SEEDS} seeds"})
    return path


def open_cached(path: Path, threads: int, bias: "BlockBias | None", rebuild) -> "OrtModel":
    """The OrtModel of a cached file. The cache is keyed by content, so a file that does not load was damaged
    (truncated, a bad disk): it is rebuilt once with rebuild() (atomically, warning), and a file that still does
    not load is a ValueError naming it."""
    try:
        return OrtModel(path, threads, bias)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        warnings.warn(f"the cached ONNX file {path} does not load ({type(e).__name__}: {str(e).strip()[:150]}); "
                      "making it again (export or quantization)", RuntimeWarning, stacklevel=3)
    rebuild()
    try:
        return OrtModel(path, threads, bias)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"the cached ONNX file {path} does not load even after making it again "
                         f"({type(e).__name__}: {str(e).strip()[:200]}); delete it or use --runtime torch") from None


def calibration_feeds(fp32: "OrtModel", config, schedule: NoiseSchedule) -> list[dict[str, np.ndarray]]:
    """One batch per DDIM-32 step: the inputs of the file (x_t, and t or the block biases of t) along the fp32
    model's own trajectories (eta = 1, so the noise levels are those of sampling), with class ids and the null
    class for class-conditional models."""
    from .sampling import denoise, initial_noise, make_seeds

    feeds: list[dict[str, np.ndarray]] = []

    def record(x, t, y=None):
        feeds.append({k: v.numpy().copy() for k, v in fp32.feeds(x, t, y).items()})
        return fp32(x, t, y)

    seeds = make_seeds(12345, CALIB_SEEDS)
    y = None
    if config.num_classes:
        y = torch.arange(CALIB_SEEDS) % (config.num_classes + 1) - 1  # -1: the null class
    x = initial_noise(seeds, config.image_shape)
    with torch.inference_mode():
        denoise(record, x, seeds, schedule.reverse_steps("ddim", CALIB_STEPS, eta=1.0), y=y, check_finite=False)
    return feeds


# --- the ORT model --------------------------------------------------------------------------------------
class BlockBias:
    """UNet.block_biases(UNet.embedding(t)) of every timestep of an unconditional UNet, computed once from its
    weights when the engine loads it (a snapshot, as the exported body is one): a step's biases are a row lookup."""

    def __init__(self, model: UNet, schedule: NoiseSchedule):
        if model.config.num_classes:
            raise ValueError("BlockBias serves unconditional UNets (a conditional one runs the deployment file)")
        with torch.no_grad():
            t = torch.arange(schedule.num_train_timesteps)
            self.table = model.block_biases(model.embedding(t)).float().contiguous()
        self.rows = self.table[:, None].unbind(0)  # [1, W] views: a step's lookup is a list index, no torch op

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        """[1, W] when the batch shares one timestep (the samplers' case: ORT broadcasts it), else [B, W]."""
        steps = t.numpy()
        if len(steps) == 1 or (len(steps) and (steps == steps[0]).all()):
            return self.rows[steps[0]]
        return self.table.index_select(0, t)


_NUMPY = {torch.float32: np.float32, torch.int64: np.int64}


class OrtModel:
    """`model(x, t, y=None)` over an ONNX Runtime CPU session of a fastdiff denoiser file - the deployment format
    (inputs x, t[, y]) or the engine's body (x, block_bias: then `bias` gives the rows) - torch CPU tensors in and
    out, bound by pointer (IOBinding), so nothing is copied when x is float32 and contiguous."""

    def __init__(self, path: Path | str, threads: int, bias: BlockBias | None = None):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        # Stop the intra-op workers spinning when Run() returns: left spinning, they hold the cores that torch's
        # threads need next (on a 2-core VM a oneDNN conv right after an ORT call took 13.4 ms instead of 1.9 ms),
        # while the engine's DDIM-50 loop runs as fast either way (docs/performance.md).
        so.add_session_config_entry("session.force_spinning_stop", "1")
        self.path, self.threads = Path(path), threads
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        inputs = [i.name for i in self.session.get_inputs()]
        self.conditional = "y" in inputs
        if "block_bias" in inputs and bias is None:
            raise ValueError(f"{path} is an engine body file: it needs the model's BlockBias")
        self.bias = bias if "block_bias" in inputs else None
        self.output = self.session.get_outputs()[0].name
        self._local = threading.local()
        meta = self.session.get_modelmeta().custom_metadata_map
        self.precision = meta.get("fastdiff.precision", "fp32")

    def sibling(self, threads: int) -> "OrtModel":
        """The same file in a session with another thread count (the engine's split loops)."""
        return OrtModel(self.path, threads, self.bias)

    def feeds(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The session's inputs for a model call, as contiguous torch tensors."""
        if x.dtype != torch.float32 or not x.is_contiguous():
            x = x.to(torch.float32).contiguous()
        if t.dtype != torch.int64 or t.shape != x.shape[:1]:
            t = t.to(torch.int64).expand(x.shape[0]).contiguous()
        if self.bias is not None:
            return {"x": x, "block_bias": self.bias(t)}
        feeds = {"x": x, "t": t}
        if self.conditional:
            feeds["y"] = torch.full_like(t, -1) if y is None else y.to(torch.int64).contiguous()
        return feeds

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        feeds = self.feeds(x, t, y)
        out = torch.empty(x.shape, dtype=torch.float32)
        io = getattr(self._local, "io", None)
        if io is None:  # one binding per thread, re-pointed every call (a fresh one costs ~50 µs per run)
            io = self._local.io = self.session.io_binding()
        for name, v in feeds.items():
            io.bind_input(name, "cpu", 0, _NUMPY[v.dtype], tuple(v.shape), v.data_ptr())
        io.bind_output(self.output, "cpu", 0, np.float32, tuple(out.shape), out.data_ptr())
        self.session.run_with_iobinding(io)
        return out


def ort_model(model: UNet, schedule: NoiseSchedule, threads: int, int8: bool = False) -> OrtModel:
    """The engine's OrtModel of model's current weights (engine_file; export / quantize on first use, cached; a
    cached file that does not load is made again once: open_cached)."""
    fp32 = engine_file(model, schedule)
    bias = None if model.config.num_classes else BlockBias(model, schedule)
    session = open_cached(fp32, threads, bias, lambda: engine_file(model, schedule, rebuild=True))
    if not int8:
        return session
    path = int8_file(model, schedule, fp32, threads, bias, fp32_model=session)
    return open_cached(path, threads, bias,
                       lambda: int8_file(model, schedule, fp32, threads, bias, rebuild=True, fp32_model=session))


SHORT_CALL_S = 0.02  # one_loop_model measures only calls shorter than this (longer ones keep every thread)


def one_loop_model(full: OrtModel, single: OrtModel, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                   rounds: int = 9) -> OrtModel:
    """The faster of `full` (every thread) and `single` (its one-thread sibling) for a loop of calls like (x, t, y).
    A short call is measured: after a warm-up call of each, `rounds` rounds of one call each, in alternating order,
    and the median of the rounds' single/full time ratios decides (a slow spell of a shared VM slows both calls of a
    round alike; comparing the two medians let one such spell pick the slower session). ORT splits each op across
    threads, and for a small net's batch-1 call the split costs more than it saves (digits: 1.46 ms on one thread,
    1.70 ms on two, on the Zen 4 EPYC; the other way on the Zen 2). A call of full longer than SHORT_CALL_S keeps
    every thread unmeasured (cifar-ddpm batch 1: 75 ms on two threads, 118 ms on one). The outputs are the same
    bits either way: ORT partitions a conv's outputs across threads, not its sums (tests/test_engine_runtimes.py)."""
    start = time.perf_counter()
    full(x, t, y)
    if time.perf_counter() - start > SHORT_CALL_S:
        return full
    single(x, t, y)
    ratios = []
    for r in range(rounds):
        seconds = {}
        for model in (full, single) if r % 2 == 0 else (single, full):
            start = time.perf_counter()
            model(x, t, y)
            seconds[model] = time.perf_counter() - start
        ratios.append(seconds[single] / max(seconds[full], 1e-9))
    return single if statistics.median(ratios) < 1.0 else full
