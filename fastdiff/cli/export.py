"""`fastdiff export`: a checkpoint's EMA denoiser (or a diffusers folder's UNet2DModel) to one ONNX file, or a
checkpoint to a diffusers folder (--format diffusers)."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..checkpoint import BUNDLED_MODEL
from .common import add_ckpt


def add(sub) -> None:
    p = sub.add_parser("export", help="export a checkpoint's EMA denoiser to ONNX or to a diffusers folder",
                       description="Export the EMA denoiser to one ONNX file (dynamic batch, fastdiff metadata); "
                                   "--diffusers FOLDER exports a diffusers UNet2DModel instead; --format diffusers "
                                   "writes the checkpoint as a folder DDPMPipeline.from_pretrained loads.")
    src = p.add_mutually_exclusive_group()
    add_ckpt(src)
    src.add_argument("--diffusers", type=Path, metavar="FOLDER",
                     help="export this diffusers folder's unconditional UNet2DModel (save_pretrained layout, "
                          "safetensors) to ONNX")
    p.add_argument("--format", choices=("onnx", "diffusers"), default="onnx",
                   help="onnx: one ONNX file (default); diffusers: a DDPMPipeline folder (unet/ + scheduler/, "
                        "safetensors), written atomically")
    p.add_argument("--out", type=Path, required=True, help="ONNX file to write (e.g. model.onnx), or the folder "
                   "for --format diffusers")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset, 17 to the highest the installed torch exports "
                   "(default: 17)")
    p.add_argument("--fp16", action="store_true", help="fp16 weights and activations with float32 inputs/outputs "
                   "(for GPUs)")
    p.set_defaults(run=run)


def run(a: argparse.Namespace) -> None:
    from ..onnx_export import MIN_OPSET, max_opset

    if not MIN_OPSET <= a.opset <= max_opset():
        raise ValueError(f"--opset must be in [{MIN_OPSET}, {max_opset()}] (the opsets the installed torch exports); "
                         f"got {a.opset}")
    if a.format == "diffusers":
        return _to_diffusers(a)
    from ..export.onnx import export_model, export_onnx
    from ..files import ensure_writable

    if a.out.is_dir():
        raise ValueError(f"--out {a.out}: is a folder; expected the ONNX file to write (e.g. model.onnx)")
    ensure_writable(a.out.parent, "--out's folder")  # made now (or refused), not after the export

    if a.diffusers:
        from ..interop.diffusers import load_diffusers

        model, schedule, _ = load_diffusers(a.diffusers)
        out = export_model(model, schedule, a.out, opset=a.opset, fp16=a.fp16)
        print(f"exported {a.diffusers} → {out} ({out.stat().st_size / 1e6:.2f} MB, opset {a.opset}, "
              f"{'fp16' if a.fp16 else 'fp32'})")
        return
    ckpt = a.ckpt or BUNDLED_MODEL
    out = export_onnx(ckpt, a.out, opset=a.opset, fp16=a.fp16)
    print(f"exported {ckpt} → {out} ({out.stat().st_size / 1e6:.2f} MB, opset {a.opset}, "
          f"{'fp16' if a.fp16 else 'fp32'})")


def _to_diffusers(a: argparse.Namespace) -> None:
    from ..checkpoint import load_model
    from ..interop.diffusers import save_diffusers

    if a.diffusers:
        raise ValueError("--format diffusers writes a fastdiff checkpoint (--ckpt) as a diffusers folder; "
                         f"--diffusers {a.diffusers} is one already")
    if a.fp16 or a.opset != 17:
        raise ValueError("--opset and --fp16 apply to --format onnx only")
    ckpt = a.ckpt or BUNDLED_MODEL
    model, schedule, _ = load_model(ckpt)
    out = save_diffusers(model, schedule, a.out, source=str(ckpt))
    print(f"exported {ckpt} → {out}/ (diffusers DDPMPipeline: model_index.json, unet/, scheduler/; safetensors)")
