"""Export a checkpoint's EMA denoiser to one self-describing ONNX file. The export itself (export_model: the
graph, its inputs and outputs, the exporter choice) lives in fastdiff.onnx_export, a lower layer shared with
the engine's ONNX Runtime runtime; it is re-exported here."""
from __future__ import annotations

from pathlib import Path

from ..checkpoint import load_model
from ..onnx_export import MIN_OPSET, TWO_GB, describe, export_model, metadata  # noqa: F401  (the pure export)


def export_onnx(ckpt: Path | str, out: Path | str, *, opset: int = MIN_OPSET, fp16: bool = False,
                exporter: str = "torchscript") -> Path:
    """Export the EMA denoiser of a run folder / checkpoint file to out (see module docstring)."""
    model, schedule, _ = load_model(Path(ckpt))
    return export_model(model, schedule, out, opset=opset, fp16=fp16, exporter=exporter)
