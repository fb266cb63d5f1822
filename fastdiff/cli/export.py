"""`fastdiff export`: a checkpoint's EMA denoiser to one ONNX file."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..checkpoint import BUNDLED_MODEL
from .common import add_ckpt


def add(sub) -> None:
    p = sub.add_parser("export", help="export a checkpoint's EMA denoiser to ONNX",
                       description="Export the EMA denoiser to one ONNX file (dynamic batch, fastdiff metadata).")
    add_ckpt(p)
    p.add_argument("--out", type=Path, required=True, help="ONNX file to write (e.g. model.onnx)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset, >= 17 (default: 17)")
    p.add_argument("--fp16", action="store_true", help="fp16 weights and activations with float32 inputs/outputs "
                   "(for GPUs)")
    p.set_defaults(run=run)


def run(a: argparse.Namespace) -> None:
    from ..export.onnx import export_onnx

    ckpt = a.ckpt or BUNDLED_MODEL
    out = export_onnx(ckpt, a.out, opset=a.opset, fp16=a.fp16)
    print(f"exported {ckpt} → {out} ({out.stat().st_size / 1e6:.2f} MB, opset {a.opset}, "
          f"{'fp16' if a.fp16 else 'fp32'})")
