"""The models a server offers: loaded once at start, named, hashed, and sampled on arbitrary per-sample seeds.

A served model runs any batch of seeds (not only consecutive ones), so the batcher can concatenate the seeds
of several requests: checkpoints through the Engine (the package's fastest path), ONNX files through the
torch-free runtime's pieces (its Philox noise and its reverse step; tests/test_serve.py holds the result equal
to `OnnxSampler.sample`). Web requests only ever name a model; paths come from the command line.
"""
from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..checkpoint import BUNDLED_MODEL, WEIGHTS, load_model
from ..engine import Engine
from ..request import SampleRequest
from ..schedule import NoiseSchedule

Hook = Callable[[int], None]  # called with the number of reverse steps done; may raise Cancelled


class Cancelled(Exception):
    """Raised inside a sampling loop when the server stops mid-job."""


def sha256(*paths: Path) -> str:
    """Hex sha256 of a file's bytes (the weights; several files: of their bytes in order), read in 1 MiB chunks."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


class ServedModel:
    """One model of the server: name, kind, source, weights hash, schedule, image shape, class count."""

    kind = "model"

    def __init__(self, name: str, source: Path, weights: Path, schedule: NoiseSchedule,
                 image_shape: tuple[int, int, int], num_classes: int, backend: str, device: str):
        self.name, self.source, self.weights = name, Path(source), Path(weights)
        self.schedule, self.image_shape, self.num_classes = schedule, tuple(image_shape), int(num_classes)
        self.backend, self.device = backend, device
        self.sha256 = sha256(self.weights)
        self.live_progress = True  # per-step progress (False: per batch, e.g. a CUDA graph replay)

    def sample(self, seeds: np.ndarray, classes: np.ndarray | None, request: SampleRequest,
               hook: Hook | None = None) -> torch.Tensor:
        """Images (len(seeds), C, H, W) float32 in [-1, 1] on the CPU; sampler, steps, guidance and options
        come from request (its n and seed are not used: the seeds are given)."""
        raise NotImplementedError

    def batch_size(self, count: int) -> int:
        """The batch actually run for count images (padding with extra seeds never changes a sample)."""
        return count

    def request_options(self, sampler: str, options: dict) -> dict:
        """The sampler options a request runs with: the client's, plus what the model's own files fix."""
        return dict(options)

    def describe(self) -> dict:
        """The public description (GET /api/models): no path."""
        return {"name": self.name, "kind": self.kind, "sha256": self.sha256, "image_shape": list(self.image_shape),
                "num_classes": self.num_classes, "num_train_timesteps": self.schedule.num_train_timesteps,
                "prediction_type": self.schedule.prediction_type, "backend": self.backend, "device": self.device}


class TorchModel(ServedModel):
    """A torch denoiser `model(x, t, y=None)` run by the Engine (CUDA graphs on a GPU, eager fused step on CPU)."""

    kind = "checkpoint"

    def __init__(self, name: str, source: Path, weights: Path, model: torch.nn.Module, schedule: NoiseSchedule,
                 image_shape: tuple[int, int, int], num_classes: int, device: torch.device | str = "cpu",
                 num_threads: int | None = None):
        from .. import ops

        device = torch.device(device)
        super().__init__(name, source, weights, schedule, image_shape, num_classes, ops.backend(), str(device))
        self.engine = Engine(model, schedule, device=device, channels_last=device.type == "cuda",
                             num_threads=num_threads)
        self.live_progress = not self.engine.use_graphs  # a captured graph replays the whole loop at once

    def batch_size(self, count: int) -> int:
        # CUDA graphs are captured per batch size: round up to a power of two so a few graphs serve all sizes
        return 1 << max(0, math.ceil(math.log2(count))) if self.engine.use_graphs else count

    def sample(self, seeds, classes, request, hook=None):
        count = len(seeds)
        padded = self.batch_size(count)
        if padded > count:  # extra samples from the last seed: each sample depends on its own seed only
            seeds = np.concatenate([seeds, np.full(padded - count, seeds[-1], np.int64)])
            if classes is not None:
                classes = np.concatenate([classes, np.full(padded - count, classes[-1], np.int64)])
        s = torch.from_numpy(np.ascontiguousarray(seeds, np.int64)).to(self.engine.device)
        y = None if classes is None else torch.from_numpy(np.ascontiguousarray(classes, np.int64))
        x = self.engine.sample(s, self.image_shape, request.sampler, request.steps, classes=y,
                               guidance=request.guidance, on_step=hook if self.live_progress else None,
                               **request.options)
        return x[:count].float().cpu().clamp(-1, 1)


class OnnxModel(ServedModel):
    """An exported fastdiff ONNX model: onnxruntime for the network, the runtime's step and Philox noise."""

    kind = "onnx"

    def __init__(self, name: str, path: Path):
        from ..export.runtime import OnnxSampler

        self.runner = OnnxSampler(path)
        super().__init__(name, path, path, self.runner.schedule, self.runner.image_shape, self.runner.num_classes,
                         f"onnxruntime ({self.runner.provider})", "onnxruntime")

    def sample(self, seeds, classes, request, hook=None):
        from .. import noise
        from ..export.runtime import step

        seeds = np.ascontiguousarray(seeds, np.int64)
        x = noise.gaussian(seeds, noise.INITIAL_NOISE_STEP, int(np.prod(self.image_shape)))
        x = x.reshape(len(seeds), *self.image_shape)
        for k, (t, coefs) in enumerate(request.reverse_steps):  # OnnxSampler.sample's loop, on any seeds
            m = self.runner._model_output(x, t, classes, request.guidance)
            if not np.isfinite(m).all():
                raise FloatingPointError(f"the model output holds NaN or inf at timestep {t}; check the weights")
            x = step(x, m, seeds, t, coefs)
            if hook is not None:
                hook(k + 1)
        return torch.from_numpy(np.clip(x, -1, 1))


def model_name(path: Path) -> str:
    """A model's name: its run folder's name (a checkpoint file named checkpoint.safetensors: its folder's)."""
    path = Path(path)
    if path.is_dir() or path.name == WEIGHTS:
        return (path if path.is_dir() else path.parent).resolve().name
    return path.stem


def load_checkpoint(path: Path, name: str | None = None, device: torch.device | str = "cpu",
                    num_threads: int | None = None) -> TorchModel:
    """A run folder or checkpoint file (EMA weights) as a served model."""
    path = Path(path)
    model, schedule, _ = load_model(path)
    c = model.config
    weights = path / WEIGHTS if path.is_dir() else path
    return TorchModel(name or model_name(path), path, weights, model, schedule,
                      c.image_shape, c.num_classes, device, num_threads)


def load_diffusers_model(path: Path, name: str | None = None, device: torch.device | str = "cpu",
                         num_threads: int | None = None) -> TorchModel:
    """A diffusers folder (save_pretrained layout) via fastdiff.interop.diffusers.load_diffusers; requests get
    the folder's scheduler settings (steps_offset, set_alpha_to_one, clip_sample...) as `load_diffusers` reads them."""
    from ..interop import diffusers as interop

    path = Path(path)
    model, schedule, info = interop.load_diffusers(path, device="cpu")
    unet = Path(info["unet"])
    weights = sorted(unet.glob("diffusion_pytorch_model*.safetensors"))
    if not weights:
        raise ValueError(f"{unet}: no safetensors weights to hash")
    served = TorchModel(name or path.resolve().name, path, weights[0], model, schedule, tuple(info["image_shape"]),
                        int(info.get("num_classes", 0)), device, num_threads)
    served.kind = "diffusers"
    if len(weights) > 1:  # sharded: one hash over every shard, in name order
        served.sha256 = sha256(*weights)
    served.request_options = lambda sampler, options: interop.folder_options(info, sampler, options)
    return served


def load_models(ckpts: list[Path] = (), onnx: list[Path] = (), diffusers: list[Path] = (),
                device: torch.device | str = "cpu", num_threads: int | None = None) -> dict[str, ServedModel]:
    """Every model of the command line, by unique name (a clash gets -2, -3, ...); none: the shipped digits.
    num_threads: torch CPU threads while sampling (None: torch's default; 1 suits a small shared CPU)."""
    sources = [("ckpt", p) for p in ckpts] + [("onnx", p) for p in onnx] + [("diffusers", p) for p in diffusers]
    if not sources:
        return {"digits": load_checkpoint(BUNDLED_MODEL, "digits", device, num_threads)}
    models: dict[str, ServedModel] = {}
    for kind, path in sources:
        base = model_name(path) if kind != "diffusers" else Path(path).resolve().name  # folder name
        name, k = base, 2
        while name in models:
            name, k = f"{base}-{k}", k + 1
        if kind == "ckpt":
            models[name] = load_checkpoint(path, name, device, num_threads)
        elif kind == "onnx":
            models[name] = OnnxModel(name, path)
        else:
            models[name] = load_diffusers_model(path, name, device, num_threads)
    return models
