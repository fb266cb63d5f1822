"""`fastdiff info`: version, step backend (and its CPU ISA path), torch, CUDA, the device and the default runtime."""
from __future__ import annotations

import argparse
import json

import torch

from .. import __version__, ops
from ..checkpoint import BUNDLED_MODEL
from ..machine import cpu_isa
from ..runtimes import default_runtime


def add(sub) -> None:
    p = sub.add_parser("info", help="version, step backend, torch and devices")
    p.set_defaults(run=run)


def run(a: argparse.Namespace) -> None:
    info = {"fastdiff": __version__, "step_backend": ops.backend(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "cpu_threads": torch.get_num_threads(), "cpu_isa": cpu_isa(), "step_cpu_isa": ops.cpu_isa(),
            "default_runtime": default_runtime("cuda" if torch.cuda.is_available() else "cpu"),
            "bundled_model": str(BUNDLED_MODEL) if BUNDLED_MODEL.exists() else None}
    print(json.dumps(info, indent=2))
