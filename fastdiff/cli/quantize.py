"""`fastdiff quantize`: INT8 an exported ONNX model and write a report."""
from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_quiet

# Upper bounds far above any real use, so a typo fails in a second rather than after minutes or gigabytes:
# calibration inputs are built in memory (65536 x 3x32x32 float32 is 0.8 GB per copy; Q-Diffusion calibrates
# with 5120), and the paired measure holds both image sets in memory.
MAX_CALIB_SIZE = 65536
MAX_PAIRED_N = 10000
MAX_REPEATS = 10000


def add(sub) -> None:
    q = sub.add_parser("quantize", help="INT8-quantize an exported ONNX model and write a report",
                       description="Static INT8 (QDQ, per-channel weights) with timestep-aware calibration, or "
                                   "dynamic INT8; writes <out>.report.json and <out>.report.md.")
    q.add_argument("--onnx", type=Path, required=True, help="fp32 ONNX model from `fastdiff export`")
    q.add_argument("--out", type=Path, required=True, help="INT8 ONNX file to write (e.g. model.int8.onnx)")
    q.add_argument("--method", choices=["minmax", "entropy", "percentile"],
                   help="activation calibration method (default: minmax; not with --dynamic)")
    q.add_argument("--dynamic", action="store_true", help="dynamic quantization (weights only; no calibration)")
    q.add_argument("--calib-size", type=int, default=256,
                   help=f"calibration samples x_t, 1 to {MAX_CALIB_SIZE} (default: 256)")
    q.add_argument("--data", default="digits", help="calibration images: 'digits', a folder of images or a .npz "
                   "(default: digits)")
    q.add_argument("--seed", type=int, default=0, help="seed of the calibration / evaluation draws (default: 0)")
    q.add_argument("--repeats", type=int, default=20, help="timed runs per latency figure (default: 20)")
    q.add_argument("--paired-n", type=int, default=64, help="images of the paired quality measure: the same seeds' "
                   "DDIM-50 η=0 images of int8 vs fp32, PSNR and max abs diff (default: 64; 0: skip)")
    add_quiet(q)
    q.set_defaults(run=run)


def run(a: argparse.Namespace) -> None:
    from ..export.quantize import quantize
    from ..export.runtime import check_model_file
    from ..files import ensure_writable
    from ..request import MAX_SEED, check_int

    check_model_file(a.onnx, "--onnx")
    if a.dynamic and a.method is not None:
        raise ValueError(f"--method {a.method} calibrates activations; --dynamic has no calibration (drop one)")
    check_int("--calib-size", a.calib_size, 1, MAX_CALIB_SIZE)
    check_int("--seed", a.seed, 0, MAX_SEED)
    check_int("--repeats", a.repeats, 1, MAX_REPEATS)
    check_int("--paired-n", a.paired_n, 0, MAX_PAIRED_N)
    if a.out.is_dir():
        raise ValueError(f"--out {a.out}: is a folder; expected the INT8 ONNX file to write (e.g. model.int8.onnx)")
    if a.out.resolve() == a.onnx.resolve():
        raise ValueError(f"--out {a.out}: is the --onnx file itself; write the INT8 model to another file")
    if a.data != "digits" and not Path(a.data).exists():
        raise ValueError(f"--data {a.data}: no such file or folder (expected 'digits', a folder of images or a .npz)")
    ensure_writable(a.out.parent, "--out's folder")  # now, not after the calibration
    quantize(a.onnx, a.out, method=a.method or "minmax", dynamic=a.dynamic, calib_size=a.calib_size, data=a.data,
             seed=a.seed, repeats=a.repeats, paired_n=a.paired_n, progress=not a.quiet)
