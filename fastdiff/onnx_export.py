"""A denoiser (a fastdiff UNet, or a module `describe` accepts) to one self-describing ONNX file.

The pure export - torch.onnx.export wrapper + fastdiff metadata - in a low layer, so that both
fastdiff.export.onnx (checkpoints, the CLI) and the engine's ONNX Runtime runtime
(fastdiff.runtimes) use it.

Graph: inputs ``x`` float32 [B, C, H, W], ``t`` int64 [B] and, for class-conditional models only,
``y`` int64 [B] (class ids, -1 = null class); output ``out`` float32 [B, C, H, W]; the batch axis
is dynamic. With ``fp16=True`` weights and activations are float16 but the I/O stays float32 (the
graph casts at its edges, and the timestep embedding is computed in float32 before the cast), so
the runtime and every caller are the same for both precisions.

We use the TorchScript exporter (``dynamo=False``): it writes opset 17 natively, one file with no
external-data side file, a symbolic batch axis, and takes ~1 s where the dynamo exporter takes ~20 s
on a small CPU. If a future torch drops it, ``exporter="dynamo"`` (external_data=False) is used.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import tempfile
import warnings
from pathlib import Path
from typing import Iterator

import onnx
import torch

from . import __version__
from .files import atomic_write
from .nn.unet import UNet
from .onnx_format import (FORMAT, FORMAT_VERSION, KEY_CLASSES, KEY_FORMAT, KEY_FORMAT_VERSION, KEY_MODEL,
                          KEY_PRECISION, KEY_SCHEDULE, KEY_SHAPE, KEY_VERSION, KEY_WEIGHTS)
from .schedule import NoiseSchedule

MIN_OPSET = 17
FALLBACK_MAX_OPSET = 20  # the TorchScript exporter's ceiling in torch 2.x, where torch does not say
KEY_GRAPH = "fastdiff.graph"  # "engine-body" on the engine's internal files (export_engine_body)
TWO_GB = 2**31


def max_opset() -> int:
    """The highest opset the installed torch's ONNX exporter writes."""
    try:
        from torch.onnx import _constants

        return int(_constants.ONNX_MAX_OPSET)
    except (ImportError, AttributeError, TypeError, ValueError):
        return FALLBACK_MAX_OPSET


class _Denoiser(torch.nn.Module):
    """UNet with a fixed signature for export; casts to the weights' dtype inside the graph."""

    def __init__(self, model: torch.nn.Module, conditional: bool, dtype: torch.dtype):
        super().__init__()
        model = copy.deepcopy(model) if dtype != torch.float32 else model  # never cast the caller's model
        self.model, self.conditional, self.dtype = model.to(dtype), conditional, dtype

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(x.to(self.dtype), t, y if self.conditional else None).to(torch.float32)


def describe(model: torch.nn.Module) -> tuple[tuple[int, int, int], int, dict]:
    """(image shape (C, H, W), class count, model config) of a fastdiff UNet, or of any `model(x, t, y=None)`
    module that declares image_shape, num_classes and model_config (e.g. interop.diffusers.DiffusersDenoiser)."""
    if isinstance(model, UNet):
        c = model.config
        return c.image_shape, c.num_classes, c.to_dict()
    try:
        return tuple(int(s) for s in model.image_shape), int(model.num_classes), dict(model.model_config)
    except (AttributeError, TypeError, ValueError):
        raise ValueError(f"model must be a fastdiff UNet or declare image_shape, num_classes and model_config; got "
                         f"{type(model).__name__}") from None


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 (hex) of model's state_dict - names, dtypes, shapes and bytes, in name order: what an exported file
    records (fastdiff.weights_sha256), so `fastdiff eval` can tell whether an ONNX file holds a checkpoint's weights."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().data if t.numel() else b"")
    return h.hexdigest()


def metadata(model: torch.nn.Module, schedule: NoiseSchedule, precision: str) -> dict[str, str]:
    shape, num_classes, config = describe(model)
    return {KEY_FORMAT: FORMAT, KEY_FORMAT_VERSION: FORMAT_VERSION, KEY_VERSION: __version__,
            KEY_SCHEDULE: json.dumps(schedule.to_dict()), KEY_SHAPE: json.dumps(list(shape)),
            KEY_CLASSES: str(num_classes), KEY_PRECISION: precision, KEY_MODEL: json.dumps(config),
            KEY_WEIGHTS: weights_digest(model)}


def _trace(wrapper: torch.nn.Module, args: tuple, names: list[str], opset: int, exporter: str) -> onnx.ModelProto:
    if exporter == "torchscript":
        buf = io.BytesIO()
        axes = {n: {0: "batch"} for n in [*names, "out"]}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(wrapper, args, buf, input_names=names, output_names=["out"], opset_version=opset,
                              dynamic_axes=axes, do_constant_folding=True, dynamo=False)
        return onnx.load_from_string(buf.getvalue())
    batch = torch.export.Dim("batch", min=1)
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = Path(d) / "model.onnx"
        torch.onnx.export(wrapper, args, str(path), input_names=names, output_names=["out"], opset_version=opset,
                          dynamic_shapes={n: {0: batch} for n in names}, external_data=False, dynamo=True,
                          verbose=False)
        return onnx.load(str(path))


class _Body(torch.nn.Module):
    """UNet.body(x, block_bias) with the fixed signature of the engine's file."""

    def __init__(self, model: UNet):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, block_bias: torch.Tensor) -> torch.Tensor:
        return self.model.body(x, block_bias)


@contextlib.contextmanager
def _plain_group_norm(opset: int) -> Iterator[None]:
    """GroupNorm written as ONNX Runtime runs it fastest: InstanceNormalization alone when every group is one channel,
    else Reshape -> InstanceNormalization -> Reshape to the known static shape -> Mul -> Add, with no Shape arithmetic
    (torch's own symbolic reshapes back through Shape(input): ~25 more nodes a digits net, each a dispatch at batch 1).
    Registered for the duration of one export."""
    from torch.onnx import symbolic_helper as sh

    def group_norm(g, x, num_groups, weight, bias, eps, cudnn_enabled):
        groups, eps = sh._maybe_get_const(num_groups, "i"), sh._maybe_get_const(eps, "f")
        sizes = sh._get_tensor_sizes(x) or [None]
        if sizes[1:2] == [groups]:
            return g.op("InstanceNormalization", x, weight, bias, epsilon_f=eps)
        ones, zeros = (g.op("Constant", value_t=torch.full((groups,), v)) for v in (1.0, 0.0))
        h = g.op("Reshape", x, g.op("Constant", value_t=torch.tensor([0, groups, -1])))
        h = g.op("InstanceNormalization", h, ones, zeros, epsilon_f=eps)
        shape = (g.op("Constant", value_t=torch.tensor([-1, *sizes[1:]])) if None not in sizes[1:]
                 else g.op("Shape", x))
        axes = g.op("Constant", value_t=torch.tensor([1, 2]))
        h = g.op("Mul", g.op("Reshape", h, shape), g.op("Unsqueeze", weight, axes))
        return g.op("Add", h, g.op("Unsqueeze", bias, axes))

    torch.onnx.register_custom_op_symbolic("aten::group_norm", group_norm, opset)
    try:
        yield
    finally:
        torch.onnx.unregister_custom_op_symbolic("aten::group_norm", opset)


def export_engine_body(model: UNet, schedule: NoiseSchedule, out: Path | str) -> Path:
    """The engine's ONNX file of an unconditional fastdiff UNet (fastdiff.runtimes): its body alone, inputs x
    [B, C, H, W] and block_bias [1 or B, W] (UNet.block_biases of the step's timestep, computed once per timestep
    by the runtime, so the time MLP and the blocks' projections leave the per-step graph), output out; GroupNorm
    as _plain_group_norm writes it. Not a deployment file: `export_model` writes those."""
    out = Path(out)
    shape, _, _ = describe(model)
    body = _Body(model.eval().cpu()).eval()
    x = torch.zeros(2, *shape)
    with torch.no_grad():
        bias = model.block_biases(model.embedding(torch.tensor([1, schedule.num_train_timesteps - 1])))
        buf = io.BytesIO()
        with _plain_group_norm(MIN_OPSET), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(body, (x, bias), buf, input_names=["x", "block_bias"], output_names=["out"],
                              opset_version=MIN_OPSET, do_constant_folding=True, dynamo=False,
                              dynamic_axes={"x": {0: "batch"}, "block_bias": {0: "bias_batch"}, "out": {0: "batch"}})
    proto = onnx.load_from_string(buf.getvalue())
    for k, v in {**metadata(model, schedule, "fp32"), KEY_GRAPH: "engine-body"}.items():
        proto.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(proto, full_check=True)
    atomic_write(out, lambda tmp: onnx.save_model(proto, tmp, save_as_external_data=False))
    return out


def export_model(model: torch.nn.Module, schedule: NoiseSchedule, out: Path | str, *, opset: int = MIN_OPSET,
                 fp16: bool = False, exporter: str = "torchscript") -> Path:
    """Write model (any UNet, or a module `describe` accepts, e.g. a loaded diffusers UNet2DModel) to out as a
    single checked ONNX file with fastdiff metadata."""
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= max_opset():
        raise ValueError(f"opset must be an integer in [{MIN_OPSET}, {max_opset()}] (the range torch {torch.__version__} "
                         f"exports); got {opset!r}")
    if exporter not in ("torchscript", "dynamo"):
        raise ValueError(f"exporter must be 'torchscript' or 'dynamo'; got {exporter!r}")
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"out must be a file path (e.g. model.onnx); {out} is a folder")
    shape, num_classes, _ = describe(model)
    conditional = num_classes > 0
    wrapper = _Denoiser(model.eval().cpu(), conditional, torch.float16 if fp16 else torch.float32).eval()
    x = torch.zeros(2, *shape)
    t = torch.tensor([1, schedule.num_train_timesteps - 1], dtype=torch.long)
    args, names = ((x, t, torch.tensor([0, -1])), ["x", "t", "y"]) if conditional else ((x, t), ["x", "t"])
    with torch.no_grad():
        proto = _trace(wrapper, args, names, opset, exporter)
    for k, v in metadata(model, schedule, "fp16" if fp16 else "fp32").items():
        proto.metadata_props.add(key=k, value=v)
    proto.producer_name, proto.doc_string = "fastdiff", f"fastdiff {__version__} denoiser (EMA weights)"
    if proto.ByteSize() >= TWO_GB:
        raise ValueError(f"the model is {proto.ByteSize() / 2**30:.1f} GiB; a single ONNX file must stay below 2 GB")
    onnx.checker.check_model(proto, full_check=True)
    atomic_write(out, lambda tmp: onnx.save_model(proto, tmp, save_as_external_data=False))
    return out
