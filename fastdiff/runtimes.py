"""How the Engine runs the model: the runtimes and the ONNX Runtime one (docs/performance.md).

* ``cuda-graph``: the whole loop captured as one CUDA graph (fastdiff.engine), on CUDA;
* ``ort``: on the CPU, the network exported once to ONNX (fastdiff.onnx_export) and run by ONNX Runtime,
  whose convolutions are 2-4x faster than eager torch's for these U-Nets on a small CPU; the fused torch step
  stays the step. The ONNX file is cached by content (sha256 of the state_dict bytes, the config, the schedule
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
import threading
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


def onnx_file(model: UNet, schedule: NoiseSchedule, digest: str | None = None) -> Path:
    """The cached fp32 ONNX export of model (exported on first use)."""
    from .onnx_export import export_model

    path = cache_dir() / "onnx" / (digest or model_digest(model, schedule)) / "model.onnx"
    if not path.is_file():
        was = model.training
        try:
            export_model(model, schedule, path)
        finally:
            model.train(was)
    return path


def int8_file(model: UNet, schedule: NoiseSchedule, fp32: Path, threads: int) -> Path:
    """The cached INT8 file beside fp32 (quantized on first use; the recipe depends on the CPU's VNNI)."""
    from .onnx_quant import quantize_int8, recipe_name

    path = fp32.with_name(f"model.int8-{recipe_name()}.onnx")
    if not path.is_file():
        feeds = calibration_feeds(OrtModel(fp32, threads), model.config, schedule)
        quantize_int8(fp32, path, feeds,
                      info={"calibration": f"fp32 DDIM-{CALIB_STEPS} trajectories of {CALIB_SEEDS} seeds"})
    return path


def calibration_feeds(fp32: "OrtModel", config, schedule: NoiseSchedule) -> list[dict[str, np.ndarray]]:
    """One batch per DDIM-32 step: the x_t the fp32 model sees along its own trajectories (eta = 1, so the
    noise levels are those of sampling), with t and, for class-conditional models, class ids and the null class."""
    from .sampling import denoise, initial_noise, make_seeds

    feeds: list[dict[str, np.ndarray]] = []

    def record(x, t, y=None):
        feed = {"x": x.numpy().copy(), "t": t.numpy().copy()}
        if config.num_classes:
            feed["y"] = y.numpy().copy()
        feeds.append(feed)
        return fp32(x, t, y)

    seeds = make_seeds(12345, CALIB_SEEDS)
    y = None
    if config.num_classes:
        y = torch.arange(CALIB_SEEDS) % (config.num_classes + 1) - 1  # -1: the null class
    x = initial_noise(seeds, (config.in_channels, config.image_size, config.image_size))
    with torch.inference_mode():
        denoise(record, x, seeds, schedule.reverse_steps("ddim", CALIB_STEPS, eta=1.0), y=y, check_finite=False)
    return feeds


# --- the ORT model --------------------------------------------------------------------------------------
class OrtModel:
    """`model(x, t, y=None)` over an ONNX Runtime CPU session of a fastdiff denoiser file: torch CPU tensors
    in and out, bound by pointer (IOBinding), so nothing is copied when x is float32 and contiguous."""

    def __init__(self, path: Path | str, threads: int):
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
        self.conditional = "y" in [i.name for i in self.session.get_inputs()]
        self.output = self.session.get_outputs()[0].name
        self._local = threading.local()
        meta = self.session.get_modelmeta().custom_metadata_map
        self.precision = meta.get("fastdiff.precision", "fp32")

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if x.dtype != torch.float32 or not x.is_contiguous():
            x = x.to(torch.float32).contiguous()
        if t.dtype != torch.int64 or t.shape != x.shape[:1]:
            t = t.to(torch.int64).expand(x.shape[0]).contiguous()
        out = torch.empty(x.shape, dtype=torch.float32)
        io = getattr(self._local, "io", None)
        if io is None:  # one binding per thread, re-pointed every call (a fresh one costs ~50 µs per run)
            io = self._local.io = self.session.io_binding()
        io.bind_input("x", "cpu", 0, np.float32, tuple(x.shape), x.data_ptr())
        io.bind_input("t", "cpu", 0, np.int64, tuple(t.shape), t.data_ptr())
        if self.conditional:
            y = torch.full_like(t, -1) if y is None else y.to(torch.int64).contiguous()
            io.bind_input("y", "cpu", 0, np.int64, tuple(y.shape), y.data_ptr())
        io.bind_output(self.output, "cpu", 0, np.float32, tuple(out.shape), out.data_ptr())
        self.session.run_with_iobinding(io)
        return out


def ort_model(model: UNet, schedule: NoiseSchedule, threads: int, int8: bool = False) -> OrtModel:
    """The OrtModel of model's current weights (export / quantize on first use, cached)."""
    fp32 = onnx_file(model, schedule)
    return OrtModel(int8_file(model, schedule, fp32, threads) if int8 else fp32, threads)
