"""`fastdiff sample`: generate images from a checkpoint (the Engine) or an ONNX file (the torch-free runtime)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from .. import distributed, ops
from ..checkpoint import BUNDLED_MODEL, load_model
from ..engine import Engine, generate
from ..images import check_name
from ..machine import pick_device
from ..request import MAX_SAMPLES, SampleRequest, check_int, default_steps
from ..runtimes import RUNTIMES
from .common import add_device, add_quiet, add_sampler_options, sampler_options


def add(sub) -> None:
    p = sub.add_parser("sample", help="generate images with DDPM or DDIM",
                       description="Generate images; writes one PNG per image, a grid PNG and a JSON sidecar. "
                                   "Batches are written as they finish, so any --n runs in bounded memory.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--ckpt", type=Path, help="run folder or checkpoint file (default: the shipped digits model)")
    src.add_argument("--diffusers", type=Path, metavar="FOLDER",
                     help="a diffusers folder as save_pretrained writes it (unet/ + scheduler/, safetensors) holding "
                          "an unconditional UNet2DModel; its scheduler config gives steps_offset, set_alpha_to_one, "
                          "clip_sample_range and clip_sample=False, the flags the rest")
    src.add_argument("--onnx", type=Path, help="sample from an exported ONNX model with the torch-free runtime")
    add_sampler_options(p)
    p.add_argument("-n", "--count", "--n", dest="n", type=int, default=64,
                   help="number of images (default: 64); under torchrun spell it -n or --count")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i; seeds are int64 (default: 0)")
    p.add_argument("--class", dest="class_id", type=int, help="class id for class-conditional models")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (default: 1 = none)")
    p.add_argument("--batch-size", type=int, default=256, help="images per batch (default: 256)")
    p.add_argument("--out", type=Path, default=Path("samples"), help="output folder (default: samples)")
    p.add_argument("--name", help="file name stem (default: <sampler>-<steps>); an existing set of that name is "
                                  "replaced as a whole")
    add_device(p)
    p.add_argument("--runtime", choices=RUNTIMES, default="auto",
                   help="how the engine runs the model: auto (cuda-graph on CUDA, ort on the CPU), ort (ONNX Runtime, "
                        "the model exported once and cached), torch (eager) or cuda-graph (default: auto)")
    p.add_argument("--int8", action="store_true", help="run the INT8 ONNX model (quantized once, cached; CPU, ort: --device auto means the CPU)")
    add_quiet(p)
    p.set_defaults(run=run)


def _device(a: argparse.Namespace) -> torch.device:
    """--device; auto means the CPU for the CPU runtimes (ort, INT8) even where a GPU is there."""
    cpu_runtime = a.int8 or a.runtime == "ort"
    return pick_device("cpu" if a.device == "auto" and cpu_runtime else a.device)


def _check_class(class_id: int | None, num_classes: int) -> None:
    """--class against the model's class count, naming the flag."""
    if class_id is None:
        return
    if not num_classes:
        raise ValueError(f"--class {class_id}: the model is unconditional (trained without --class-cond)")
    check_int("--class", class_id, -1, num_classes - 1)


def _check_ort(model, schedule, a: argparse.Namespace) -> None:
    """An explicit --runtime ort / --int8 must run on ONNX Runtime: its cached files are made (or repaired) now, and
    one that still does not load is refused here rather than left to the engine's fallback to eager torch."""
    from ..runtimes import ort_available, ort_model

    if ort_available():
        try:
            ort_model(model, schedule, 1, a.int8)
        except ValueError as e:
            raise ValueError(f"{'--int8' if a.int8 else '--runtime ort'}: {e}") from None


def run(a: argparse.Namespace) -> None:
    check_int("-n/--count", a.n, 1, MAX_SAMPLES)
    options = sampler_options(a)
    if a.name is not None:
        check_name(a.name)
    start = time.time()
    if a.onnx and (a.runtime != "auto" or a.int8):
        raise ValueError("--runtime and --int8 choose how a checkpoint runs; --onnx runs that file with onnxruntime")
    if a.onnx:
        from ..export.runtime import OnnxSampler, check_model_file, providers_for

        runner = OnnxSampler(check_model_file(a.onnx, "--onnx"), providers=providers_for(a.device))
        if a.device.startswith("cuda") and runner.provider != "CUDAExecutionProvider":
            raise ValueError(f"--device {a.device}: onnxruntime could not start its CUDA provider for --onnx "
                             f"(it fell back to {runner.provider}); use --device cpu or auto")
        steps = a.steps if a.steps is not None else default_steps(a.sampler, runner.num_train_timesteps)
        source, backend, device = str(a.onnx), f"onnxruntime ({runner.provider})", "onnxruntime"
        num_classes = runner.num_classes
    elif a.diffusers:
        from ..interop.diffusers import folder_options, load_diffusers

        model, schedule, folder = load_diffusers(a.diffusers)
        options = folder_options(folder, a.sampler, options)
        device = _device(a)
        steps = a.steps if a.steps is not None else default_steps(a.sampler, schedule.num_train_timesteps)
        source, backend, shape, num_classes = str(a.diffusers), ops.backend(), folder["image_shape"], 0
    else:
        ckpt = a.ckpt or BUNDLED_MODEL
        model, schedule, _ = load_model(ckpt)
        device = _device(a)
        steps = a.steps if a.steps is not None else default_steps(a.sampler, schedule.num_train_timesteps)
        source, backend = str(ckpt), ops.backend()
        shape = model.config.image_shape
        num_classes = model.config.num_classes
    joined = distributed.init("cpu" if a.onnx else device)  # under torchrun: join its group; this rank's device
    device = device if a.onnx else joined
    _check_class(a.class_id, num_classes)
    SampleRequest.checked(runner.schedule if a.onnx else schedule, num_classes, a.n, sampler=a.sampler, steps=steps,
                          seed=a.seed, classes=a.class_id, guidance=a.guidance, **options)  # before any file
    check_int("--batch-size", a.batch_size, 1)
    name = a.name or f"{a.sampler}-{steps}"
    lo, hi = distributed.batch_share(a.n, a.batch_size)  # this rank's images: whole batches of one process's run
    note = distributed.idle_note(a.n, a.batch_size)
    if distributed.is_main() and note:
        print(f"fastdiff sample: note: {note}", file=sys.stderr)
    if not a.onnx and not a.diffusers and device.type == "cpu" and (a.runtime == "ort" or a.int8):
        _check_ort(model, schedule, a)
    with distributed.SharedSampleSet(a.out, name) as samples:
        kwargs = dict(seed=a.seed + lo, sampler=a.sampler, steps=steps, classes=a.class_id, guidance=a.guidance,
                      batch_size=a.batch_size, progress=not a.quiet and distributed.is_main(), **options)
        if hi > lo and a.onnx:
            runner.sample(hi - lo, on_batch=lambda s, images: samples.add(torch.from_numpy(images), lo + s), **kwargs)
        elif hi > lo:
            engine = Engine(model, schedule, device=device, channels_last=device.type == "cuda", runtime=a.runtime,
                            int8=a.int8)
            generate(model, schedule, shape, hi - lo, num_classes=num_classes, device=device, engine=engine,
                     on_batch=lambda s, images: samples.add(images, lo + s), **kwargs)
            runtime = {k: engine.runtime_info[k] for k in ("runtime", "precision")}
        seconds = time.time() - start
        info = {"source": source, "sampler": a.sampler, "steps": steps, "seed": a.seed, "class": a.class_id,
                "guidance": a.guidance, "backend": backend, "device": str(device), "seconds": round(seconds, 2),
                **(runtime if a.onnx is None and hi > lo else
                   {"runtime": "onnxruntime", "precision": runner.precision} if a.onnx else {"runtime": None}),
                **options}
        grid = samples.close(info, a.n)
    if not distributed.is_main():
        return
    print(f"{a.n} images in {seconds:.1f} s → {a.out / name}/, grid {grid}")
