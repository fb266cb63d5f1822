"""Sample an exported fastdiff model with NumPy + onnxruntime only (this module never imports torch).

The reverse step is the fused kernel's float32 math in the kernel's order (fastdiff.ops), the noise
is the Philox contract of fastdiff.noise with the same per-sample seeds, and the schedule comes
from the file's metadata: a seed gives the same images as ``fastdiff.engine.generate``.
"""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnxruntime as ort

from .. import noise, reference
from ..multistep import MultistepCoefs
from ..request import SampleRequest, check_int
from ..schedule import NoiseSchedule, StepCoefs
from .metadata import (FORMAT, FORMAT_VERSION, KEY_CLASSES, KEY_FORMAT, KEY_FORMAT_VERSION, KEY_MODEL,
                       KEY_PRECISION, KEY_SCHEDULE, KEY_SHAPE, KEY_VERSION, KEY_WEIGHTS, PRECISIONS, REQUIRED_KEYS,
                       parse_classes, parse_shape)

__all__ = ["OnnxSampler", "step", "multistep"]

_NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
MAX_THREADS = 1024  # ORT intra-op threads: far above any machine's cores; 10**9 is a typo, not a setting
# What onnxruntime raises for a file that is not a readable ONNX model (anything else is a load failure of a model).
_PARSE_ERRORS = ("InvalidProtobuf", "InvalidGraph")
_warned: set[str] = set()


def step(x: np.ndarray, m: np.ndarray, seeds: np.ndarray, t: int, coefs: StepCoefs) -> np.ndarray:
    """One reverse step in float32, operation for operation as the fused kernel (fastdiff.ops)."""
    return reference.apply_step(x, m, seeds, t, coefs).astype(np.float32, copy=False)


def multistep(x: np.ndarray, m: np.ndarray, x0_prev: np.ndarray | None, seeds: np.ndarray, t: int,
              coefs: MultistepCoefs) -> tuple[np.ndarray, np.ndarray]:
    """One DPM-Solver++ step in float32 as the fused multistep kernel: (x_prev, x0); x0_prev None before the first."""
    out, x0 = reference.apply_multistep(x, m, np.zeros_like(x) if x0_prev is None else x0_prev, seeds, t, coefs)
    return out.astype(np.float32, copy=False), x0.astype(np.float32, copy=False)


def default_providers() -> list[str]:
    """CUDA when this onnxruntime has it, else CPU."""
    available = ort.get_available_providers()
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if "CUDAExecutionProvider" in available \
        else ["CPUExecutionProvider"]


def check_model_file(path: Path | str, flag: str = "model") -> Path:
    """path, if it is an existing regular file; FileNotFoundError / ValueError naming `flag` otherwise."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{flag} {path}: no such file")
    if not path.is_file():
        raise ValueError(f"{flag} {path}: not a regular file; expected an ONNX model file from `fastdiff export`")
    return path


def providers_for(device: str) -> list:
    """ONNX Runtime providers for a --device value: auto (CUDA when this onnxruntime has it), cpu or cuda[:i]."""
    if device == "auto":
        return default_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    kind, _, index = device.partition(":")
    if kind != "cuda" or not (index == "" or index.isdigit()):
        raise ValueError(f"--device must be auto, cpu or cuda[:i]; got {device!r}")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise ValueError(f"--device {device}: this onnxruntime ({ort.__version__}) has no CUDA provider, and --onnx "
                         "runs on onnxruntime (install onnxruntime-gpu, or use --device cpu or auto)")
    return [("CUDAExecutionProvider", {"device_id": int(index or 0)}), "CPUExecutionProvider"]


def usable_providers(providers: str | Sequence[Any]) -> list:
    """providers (a name, or a list of names / (name, options)) less those this onnxruntime lacks, in order,
    warning once about the others (onnxruntime's own fallback); ValueError if none is left or an entry is no name."""
    entries = [providers] if isinstance(providers, (str, tuple)) else list(providers)
    names = []
    for p in entries:
        name = p[0] if isinstance(p, tuple) and len(p) == 2 and isinstance(p[1], dict) else p
        if not isinstance(name, str):
            raise ValueError(f"providers must be provider names or (name, options) pairs; got {p!r}")
        names.append(name)
    available = ort.get_available_providers()
    kept = [p for p, name in zip(entries, names) if name in available]
    if not kept:
        raise ValueError(f"providers {names} are not available in this onnxruntime {ort.__version__} "
                         f"(available: {available})")
    missing = [name for name in names if name not in available]
    if missing and repr(missing) not in _warned:
        _warned.add(repr(missing))
        warnings.warn(f"providers {missing} are not available in this onnxruntime {ort.__version__}; using "
                      f"{[n for n in names if n in available]}", RuntimeWarning, stacklevel=3)
    return kept


def load_error(path: Path, e: Exception) -> ValueError:
    """The one-line error of a failed InferenceSession(path): 'not a valid ONNX model' for parse failures only."""
    kind, text = type(e).__name__, (str(e).strip() or type(e).__name__)[:300]
    if kind in _PARSE_ERRORS or "protobuf" in text.lower():
        return ValueError(f"{path} is not a valid ONNX model: {text}")
    return ValueError(f"{path}: onnxruntime could not load the model ({kind}: {text})")


def _progress(i: int, total: int, label: str) -> None:
    sys.stderr.write(f"\r{label} {i}/{total}" + ("\n" if i == total else ""))
    sys.stderr.flush()


class OnnxSampler:
    """A fastdiff ONNX denoiser plus its schedule; `sample` runs DDPM/DDIM/DPM-Solver++, `predict` one model call."""

    def __init__(self, path: Path | str, providers: str | Sequence[Any] | None = None, threads: int | None = None):
        """providers: onnxruntime's providers in order of preference, a name or a list (names or (name, options));
        unavailable ones are skipped with a warning, as onnxruntime does (None: CUDA when there, else CPU).
        threads: ORT intra-op threads, 1 to MAX_THREADS (None: onnxruntime's default, one per physical core)."""
        self.path = path = Path(path)
        check_model_file(path, "ONNX model")
        providers = default_providers() if providers is None else usable_providers(providers)
        options = ort.SessionOptions()
        options.add_session_config_entry("session.force_spinning_stop", "1")  # no spinning workers between runs
        if threads is not None:
            options.intra_op_num_threads = check_int("threads", threads, 1, MAX_THREADS)
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types (InvalidProtobuf, Fail, ...)
            raise load_error(path, e) from None
        self._read_metadata(self.session.get_modelmeta().custom_metadata_map)
        self._check_io()
        self.provider = self.session.get_providers()[0]

    # --- validation ------------------------------------------------------------------------------
    def _read_metadata(self, meta: dict[str, str]) -> None:
        where = str(self.path)
        if meta.get(KEY_FORMAT) != FORMAT:
            raise ValueError(f"{where} is not a fastdiff model: its metadata has no {KEY_FORMAT}={FORMAT!r} "
                             "(export one with `fastdiff export`)")
        missing = [k for k in REQUIRED_KEYS if k not in meta]
        if missing:
            raise ValueError(f"{where}: fastdiff metadata is incomplete, missing {', '.join(missing)}")
        if meta[KEY_FORMAT_VERSION] != FORMAT_VERSION:
            raise ValueError(f"{where}: format version {meta[KEY_FORMAT_VERSION]} is not supported "
                             f"(this fastdiff reads version {FORMAT_VERSION})")
        try:
            shape = parse_shape(meta[KEY_SHAPE])  # bounded first: nothing is allocated from a hostile shape
            self.num_classes = parse_classes(meta[KEY_CLASSES])
            self.schedule = NoiseSchedule(**json.loads(meta[KEY_SCHEDULE]))
        except (ValueError, TypeError) as e:
            raise ValueError(f"{where}: invalid fastdiff metadata ({str(e)[:300]})") from None
        self.image_shape: tuple[int, int, int] = shape
        self.num_train_timesteps = self.schedule.num_train_timesteps
        self.version, self.precision = meta[KEY_VERSION], meta.get(KEY_PRECISION, "fp32")
        if self.precision not in PRECISIONS:
            raise ValueError(f"{where}: invalid fastdiff metadata ({KEY_PRECISION} must be one of "
                             f"{', '.join(PRECISIONS)}; got {self.precision[:40]!r})")
        self.model_config: str | None = meta.get(KEY_MODEL)  # JSON, as written (None in files of other exporters)
        self.weights_sha256: str | None = meta.get(KEY_WEIGHTS)  # None in files exported before it was recorded

    def _check_io(self) -> None:
        where = str(self.path)
        inputs = {i.name: i for i in self.session.get_inputs()}
        expected = ["x", "t", "y"] if self.num_classes else ["x", "t"]
        if sorted(inputs) != sorted(expected):
            raise ValueError(f"{where}: unexpected inputs {sorted(inputs)}; a "
                             f"{'class-conditional' if self.num_classes else 'unconditional'} fastdiff model has {expected}")
        x = inputs["x"]
        if x.type not in _NP_TYPES:
            raise ValueError(f"{where}: input x must be float32 or float16; the file declares {x.type}")
        self.input_dtype = _NP_TYPES[x.type]
        for name in expected[1:]:
            if inputs[name].type != "tensor(int64)":
                raise ValueError(f"{where}: input {name} must be int64; the file declares {inputs[name].type}")
        if len(x.shape) != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"{where}: input x has shape {x.shape}; the metadata says [batch, *{list(self.image_shape)}]")
        for name in expected:
            dim = inputs[name].shape[0] if inputs[name].shape else None
            if isinstance(dim, int):
                raise ValueError(f"{where}: input {name} has a static batch axis (size {dim}); re-export it with "
                                 "`fastdiff export`, which makes the batch axis dynamic")
        outputs = self.session.get_outputs()
        if len(outputs) != 1:
            raise ValueError(f"{where}: expected one output, found {[o.name for o in outputs]}")
        out = outputs[0]
        if out.type not in _NP_TYPES:
            raise ValueError(f"{where}: the output must be float32 or float16 (the model's prediction); the file "
                             f"declares {out.type}")
        dims = list(out.shape or [])
        if len(dims) != 4 or any(isinstance(d, int) and d != s for d, s in zip(dims[1:], self.image_shape)):
            raise ValueError(f"{where}: the output has shape {dims}; a fastdiff denoiser returns [batch, "
                             f"{', '.join(map(str, self.image_shape))}] (x's shape)")

    # --- one model call --------------------------------------------------------------------------
    def predict(self, x: np.ndarray, t: np.ndarray | int, y: np.ndarray | None = None) -> np.ndarray:
        """The model output (float32, x's shape) for x [B, C, H, W] float32, t [B] (or a scalar) and y [B]."""
        if not isinstance(x, np.ndarray) or x.dtype != np.float32:
            raise ValueError(f"x must be a float32 numpy array; got {getattr(x, 'dtype', type(x).__name__)}")
        if x.ndim != 4 or x.shape[1:] != self.image_shape:
            raise ValueError(f"x must have shape (B, {', '.join(map(str, self.image_shape))}); got {x.shape}")
        if x.shape[0] < 1:
            raise ValueError("x must hold at least one sample (B >= 1)")
        t = np.asarray(t)
        if t.dtype.kind not in "iu":
            raise ValueError(f"t must hold integer timesteps; got dtype {t.dtype}")
        t = np.broadcast_to(t, (x.shape[0],)) if t.ndim == 0 else t
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must have shape ({x.shape[0]},) (one timestep per sample); got {t.shape}")
        if t.min() < 0 or t.max() >= self.num_train_timesteps:
            raise ValueError(f"t must be in [0, {self.num_train_timesteps - 1}]; got [{t.min()}, {t.max()}]")
        if y is not None:
            if not self.num_classes:
                raise ValueError("y (class ids) was given but the model is unconditional")
            y = np.asarray(y)
            if y.dtype.kind not in "iu" or y.shape != (x.shape[0],):
                raise ValueError(f"y must be an integer array of shape ({x.shape[0]},); got {y.dtype} {y.shape}")
            if y.min() < -1 or y.max() >= self.num_classes:
                raise ValueError(f"y must hold class ids in [0, {self.num_classes - 1}] or -1 (null class)")
        return self._forward(x, t.astype(np.int64), None if y is None else y.astype(np.int64))

    def _forward(self, x: np.ndarray, t: np.ndarray, y: np.ndarray | None) -> np.ndarray:
        feed = {"x": x.astype(self.input_dtype, copy=False), "t": t}
        if self.num_classes:
            feed["y"] = y if y is not None else np.full(t.shape, -1, dtype=np.int64)
        out = self.session.run(None, feed)[0]
        if out.shape != x.shape or out.dtype not in (np.float32, np.float16):
            raise ValueError(f"{self.path}: the model returned {out.dtype} {tuple(out.shape)} for x of shape "
                             f"{tuple(x.shape)}; a fastdiff denoiser returns a float array of x's shape")
        return out.astype(np.float32, copy=False)

    def _model_output(self, x: np.ndarray, t: int, y: np.ndarray | None, guidance: float) -> np.ndarray:
        tt = np.full((len(x),), t, dtype=np.int64)
        if y is None or guidance == 1.0:
            return self._forward(x, tt, y)
        both = self._forward(np.concatenate([x, x]), np.concatenate([tt, tt]),
                             np.concatenate([y, np.full_like(y, -1)]))
        m_cond, m_uncond = both[:len(x)], both[len(x):]
        return m_uncond + np.float32(guidance) * (m_cond - m_uncond)

    # --- sampling: the NumPy twin of fastdiff.sampling.denoise (held equal by tests/test_export.py) ----------
    def sample(self, n: int, *, sampler: str = "ddim", steps: int | None = None, seed: int = 0, classes=None,
               guidance: float = 1.0, batch_size: int = 64, progress: bool = False, on_batch=None,
               **options) -> np.ndarray | None:
        """n images (n, C, H, W) float32 in [-1, 1]; image i uses seed + i (as fastdiff.engine.generate).

        classes: one class id for all images or one per image; options: schedule.SAMPLER_OPTIONS[sampler];
        on_batch(start, images): called with each finished batch instead of keeping it (returns None)."""
        request = SampleRequest.checked(self.schedule, self.num_classes, n, sampler=sampler, steps=steps, seed=seed,
                                        classes=classes, guidance=guidance, **options)
        check_int("batch_size", batch_size, 1)
        numel = int(np.prod(self.image_shape))
        out = []
        for start, count in request.batches(batch_size):
            seeds = request.seeds(start, count)
            x = noise.gaussian(seeds, noise.INITIAL_NOISE_STEP, numel).reshape(count, *self.image_shape)
            y = request.class_ids(start, count)
            x0_prev = None  # DPM-Solver++ state (fastdiff.sampling.advance)
            for k, (t, coefs) in enumerate(request.reverse_steps):
                m = self._model_output(x, t, y, request.guidance)
                if not np.isfinite(m).all():
                    raise FloatingPointError(f"the model output holds NaN or inf at timestep {t}; "
                                             "check the weights and inputs")
                if isinstance(coefs, MultistepCoefs):
                    x, x0_prev = multistep(x, m, x0_prev, seeds, t, coefs)
                else:
                    x = step(x, m, seeds, t, coefs)
                if progress:
                    _progress(k + 1, len(request.reverse_steps), f"{sampler}-{request.steps} [{start + count}/{n}]")
            if on_batch is None:
                out.append(np.clip(x, -1, 1))
            else:
                on_batch(start, np.clip(x, -1, 1))
        return np.concatenate(out) if on_batch is None else None
