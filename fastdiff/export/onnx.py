"""Export a checkpoint's EMA denoiser to one self-describing ONNX file (the export itself, export_model, lives in
fastdiff.onnx_export, a lower layer shared with the engine's ONNX Runtime runtime; re-exported here).

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

from pathlib import Path

from ..checkpoint import load_model
from ..onnx_export import MIN_OPSET, TWO_GB, describe, export_model, metadata  # noqa: F401  (the pure export)


def export_onnx(ckpt: Path | str, out: Path | str, *, opset: int = MIN_OPSET, fp16: bool = False,
                exporter: str = "torchscript") -> Path:
    """Export the EMA denoiser of a run folder / checkpoint file to out (see module docstring)."""
    model, schedule, _ = load_model(Path(ckpt))
    return export_model(model, schedule, out, opset=opset, fp16=fp16, exporter=exporter)
