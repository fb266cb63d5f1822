"""`fastdiff quantize`: INT8 an exported ONNX model and write a report."""
from __future__ import annotations

import argparse
from pathlib import Path


def add(sub) -> None:
    q = sub.add_parser("quantize", help="INT8-quantize an exported ONNX model and write a report",
                       description="Static INT8 (QDQ, per-channel weights) with timestep-aware calibration, or "
                                   "dynamic INT8; writes <out>.report.json and <out>.report.md.")
    q.add_argument("--onnx", type=Path, required=True, help="fp32 ONNX model from `fastdiff export`")
    q.add_argument("--out", type=Path, required=True, help="INT8 ONNX file to write (e.g. model.int8.onnx)")
    q.add_argument("--method", choices=["minmax", "entropy", "percentile"], default="minmax",
                   help="activation calibration method (default: minmax)")
    q.add_argument("--dynamic", action="store_true", help="dynamic quantization (weights only; no calibration)")
    q.add_argument("--calib-size", type=int, default=256, help="calibration samples x_t (default: 256)")
    q.add_argument("--data", default="digits", help="calibration images: 'digits', a folder of images or a .npz "
                   "(default: digits)")
    q.add_argument("--seed", type=int, default=0, help="seed of the calibration / evaluation draws (default: 0)")
    q.add_argument("--repeats", type=int, default=20, help="timed runs per latency figure (default: 20)")
    q.add_argument("--paired-n", type=int, default=64, help="images of the paired quality measure: the same seeds' "
                   "DDIM-50 η=0 images of int8 vs fp32, PSNR and max abs diff (default: 64; 0: skip)")
    q.set_defaults(run=run)


def run(a: argparse.Namespace) -> None:
    from ..export.quantize import quantize

    if not a.onnx.is_file():
        raise FileNotFoundError(f"--onnx {a.onnx}: no such file")
    quantize(a.onnx, a.out, method=a.method, dynamic=a.dynamic, calib_size=a.calib_size, data=a.data, seed=a.seed,
             repeats=a.repeats, paired_n=a.paired_n)
