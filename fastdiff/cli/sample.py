"""`fastdiff sample`: generate images from a checkpoint (the Engine) or an ONNX file (the torch-free runtime)."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from .. import ops
from ..checkpoint import BUNDLED_MODEL, load_model
from ..engine import generate
from ..images import SampleSet, check_name
from ..machine import pick_device
from ..request import SampleRequest, check_int, default_steps
from .common import add_device, add_quiet, add_sampler_options, sampler_options


def add(sub) -> None:
    p = sub.add_parser("sample", help="generate images with DDPM or DDIM",
                       description="Generate images; writes one PNG per image, a grid PNG and a JSON sidecar. "
                                   "Batches are written as they finish, so any --n runs in bounded memory.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--ckpt", type=Path, help="run folder or checkpoint file (default: the shipped digits model)")
    src.add_argument("--onnx", type=Path, help="sample from an exported ONNX model with the torch-free runtime")
    add_sampler_options(p)
    p.add_argument("--n", type=int, default=64, help="number of images (default: 64)")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i; seeds are int64 (default: 0)")
    p.add_argument("--class", dest="class_id", type=int, help="class id for class-conditional models")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (default: 1 = none)")
    p.add_argument("--batch-size", type=int, default=256, help="images per batch (default: 256)")
    p.add_argument("--out", type=Path, default=Path("samples"), help="output folder (default: samples)")
    p.add_argument("--name", help="file name stem (default: <sampler>-<steps>); an existing set of that name is "
                                  "replaced as a whole")
    add_device(p)
    add_quiet(p)
    p.set_defaults(run=run)


def run(a: argparse.Namespace) -> None:
    options = sampler_options(a)
    if a.name is not None:
        check_name(a.name)
    start = time.time()
    if a.onnx:
        from ..export.runtime import OnnxSampler

        runner = OnnxSampler(a.onnx)
        steps = a.steps if a.steps is not None else default_steps(a.sampler, runner.num_train_timesteps)
        source, backend, device = str(a.onnx), f"onnxruntime ({runner.provider})", "onnxruntime"
    else:
        ckpt = a.ckpt or BUNDLED_MODEL
        model, schedule, _ = load_model(ckpt)
        device = pick_device(a.device)
        steps = a.steps if a.steps is not None else default_steps(a.sampler, schedule.num_train_timesteps)
        source, backend = str(ckpt), ops.backend()
    num_classes = runner.num_classes if a.onnx else model.config.num_classes
    SampleRequest.checked(runner.schedule if a.onnx else schedule, num_classes, a.n, sampler=a.sampler, steps=steps,
                          seed=a.seed, classes=a.class_id, guidance=a.guidance, **options)  # before any file
    check_int("--batch-size", a.batch_size, 1)
    name = a.name or f"{a.sampler}-{steps}"
    with SampleSet(a.out, name) as samples:
        kwargs = dict(seed=a.seed, sampler=a.sampler, steps=steps, classes=a.class_id, guidance=a.guidance,
                      batch_size=a.batch_size, progress=not a.quiet, **options)
        if a.onnx:
            runner.sample(a.n, on_batch=lambda _, images: samples.add(torch.from_numpy(images)), **kwargs)
        else:
            shape = (model.config.in_channels, model.config.image_size, model.config.image_size)
            generate(model, schedule, shape, a.n, num_classes=num_classes, device=device,
                     on_batch=lambda _, images: samples.add(images), **kwargs)
        seconds = time.time() - start
        info = {"source": source, "sampler": a.sampler, "steps": steps, "seed": a.seed, "class": a.class_id,
                "guidance": a.guidance, "backend": backend, "device": str(device), "seconds": round(seconds, 2),
                **options}
        grid = samples.close(info)
    print(f"{a.n} images in {seconds:.1f} s → {a.out / name}/, grid {grid}")
