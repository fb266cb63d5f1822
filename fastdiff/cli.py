"""The `fastdiff` command: train | sample | info (and export | quantize | bench | eval)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

PREDICTIONS = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
BUNDLED = Path(__file__).parent / "assets" / "digits"


def pick_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is available to this torch ({torch.__version__})")
    return torch.device(name)


# --- train --------------------------------------------------------------------------------------
def add_train(sub) -> None:
    from .nn.unet import PRESETS
    from .schedule import BETA_SCHEDULES

    p = sub.add_parser("train", help="train a DDPM U-Net", description="Train a DDPM U-Net (Ho et al. 2020, Algorithm 1).")
    p.add_argument("--data", default="digits", help="'digits' (bundled scikit-learn digits, the 1500-image train split), a folder of images "
                   "(sub-folders = classes) or a .npz with 'images' [and 'labels'] (default: digits)")
    p.add_argument("--preset", default="digits", choices=list(PRESETS), help="network size (default: digits)")
    p.add_argument("--out", type=Path, default=Path("runs/digits"), help="run folder for checkpoints (default: runs/digits)")
    p.add_argument("--steps", type=int, default=4000, help="total optimisation steps (default: 4000)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    p.add_argument("--prediction", choices=list(PREDICTIONS), default="eps", help="what the network predicts: ε, v or x0")
    p.add_argument("--schedule", choices=BETA_SCHEDULES, default="linear", help="beta schedule (default: linear)")
    p.add_argument("--timesteps", type=int, default=1000, help="diffusion steps T (default: 1000)")
    p.add_argument("--class-cond", action="store_true", help="condition on class labels (enables --guidance when sampling)")
    p.add_argument("--label-dropout", type=float, default=0.1, help="share of labels dropped to the null class (default: 0.1)")
    p.add_argument("--image-size", type=int, help="override the preset's image size")
    p.add_argument("--batch-size", type=int, default=64, help="default: 64")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate after warm-up (default: 1e-3)")
    p.add_argument("--warmup", type=int, default=100, help="linear warm-up steps (default: 100)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default: 0)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm, 0 = off (default: 1.0)")
    p.add_argument("--ema-decay", type=float, default=0.999, help="EMA decay of the weights used for sampling (default: 0.999)")
    p.add_argument("--amp", choices=["auto", "off", "bf16", "fp16"], default="auto",
                   help="mixed precision on CUDA (auto = bf16 when supported; CPU always runs fp32)")
    p.add_argument("--hflip", action="store_true", help="random horizontal flips (not for digits)")
    p.add_argument("--ckpt-every", type=int, default=500, help="checkpoint every N steps (default: 500)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice (default: 0)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:i] (default: auto)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run_train)


def run_train(a: argparse.Namespace) -> None:
    from .data import load_data
    from .nn.unet import preset
    from .schedule import NoiseSchedule
    from .train import TrainConfig, Trainer, write_summary

    overrides = {"image_size": a.image_size} if a.image_size else {}
    cfg = preset(a.preset, **overrides)
    data = load_data(a.data, cfg.image_size, cfg.in_channels)
    if a.class_cond:
        if not data.num_classes:
            raise ValueError(f"--class-cond: the data {a.data!r} has no labels")
        cfg = preset(a.preset, **overrides, num_classes=data.num_classes)
    schedule = NoiseSchedule(num_train_timesteps=a.timesteps, beta_schedule=a.schedule,
                             prediction_type=PREDICTIONS[a.prediction])
    tc = TrainConfig(steps=a.steps, batch_size=a.batch_size, lr=a.lr, warmup=a.warmup, weight_decay=a.weight_decay,
                     grad_clip=a.grad_clip, ema_decay=a.ema_decay, amp=a.amp, hflip=a.hflip,
                     label_dropout=a.label_dropout, seed=a.seed, ckpt_every=a.ckpt_every)
    trainer = Trainer(data, cfg, schedule, tc, a.out, pick_device(a.device), data_source=a.data)
    if a.resume:
        trainer.resume()
    elif (a.out / "checkpoint.safetensors").exists():
        raise ValueError(f"{a.out} already holds a checkpoint: pass --resume to continue it, or choose another --out")
    start = time.time()
    losses = trainer.fit(progress=not a.quiet)
    write_summary(a.out, losses, time.time() - start)
    print(f"trained {trainer.step} steps in {time.time() - start:.0f} s, final loss {sum(losses[-100:]) / len(losses[-100:]):.4f}"
          f" → {a.out}")


# --- sample -------------------------------------------------------------------------------------
def add_sample(sub) -> None:
    from .schedule import SPACINGS, VARIANCE_TYPES

    p = sub.add_parser("sample", help="generate images with DDPM or DDIM",
                       description="Generate images; writes one PNG per image, a grid PNG and a JSON sidecar.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--ckpt", type=Path, help="run folder or checkpoint file (default: the bundled digits model)")
    src.add_argument("--onnx", type=Path, help="sample from an exported ONNX model with the torch-free runtime")
    p.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddim", help="default: ddim")
    p.add_argument("--steps", type=int, help="reverse steps (default: 50 for ddim, T for ddpm)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM noise scale: 0 deterministic, 1 DDPM-like (default: 0)")
    p.add_argument("--spacing", choices=SPACINGS, default="leading", help="timestep spacing (default: leading)")
    p.add_argument("--variance", choices=VARIANCE_TYPES, default="fixed_small", help="DDPM variance (default: fixed_small)")
    p.add_argument("--no-clip", action="store_true", help="do not clamp predicted x0 to [-1, 1]")
    p.add_argument("--clipped-eps", action="store_true",
                   help="DDIM: re-derive ε from the clamped x0 (diffusers' use_clipped_model_output); keeps many-step "
                        "DDIM with clipping consistent")
    p.add_argument("--n", type=int, default=64, help="number of images (default: 64)")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i (default: 0)")
    p.add_argument("--class", dest="cls", type=int, help="class id for class-conditional models")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (default: 1 = none)")
    p.add_argument("--batch-size", type=int, default=256, help="images per batch (default: 256)")
    p.add_argument("--out", type=Path, default=Path("samples"), help="output folder (default: samples)")
    p.add_argument("--name", help="file name stem (default: <sampler>-<steps>)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:i] (default: auto)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run_sample)


def run_sample(a: argparse.Namespace) -> None:
    import torch

    from . import ops
    from .checkpoint import load_model
    from .images import save_samples
    from .sampling import generate

    options = {"spacing": a.spacing, "clip_sample": not a.no_clip}
    if a.sampler == "ddim":
        options |= {"eta": a.eta} | ({"use_clipped_model_output": True} if a.clipped_eps else {})
    else:
        options |= {"variance_type": a.variance}
    if a.sampler == "ddpm" and (a.eta or a.clipped_eps):
        raise ValueError("--eta and --clipped-eps apply to --sampler ddim only")
    start = time.time()
    if a.onnx:
        from .export.runtime import OnnxSampler

        runner = OnnxSampler(a.onnx)
        steps = a.steps if a.steps is not None else (50 if a.sampler == "ddim" else runner.num_train_timesteps)
        images = torch.from_numpy(runner.sample(a.n, sampler=a.sampler, steps=steps, seed=a.seed, cls=a.cls,
                                                guidance=a.guidance, progress=not a.quiet, **options))
        source, backend, device = str(a.onnx), f"onnxruntime ({runner.provider})", "onnxruntime"
    else:
        ckpt = a.ckpt or BUNDLED
        model, schedule, config = load_model(ckpt)
        device = pick_device(a.device)
        steps = a.steps if a.steps is not None else (50 if a.sampler == "ddim" else schedule.num_train_timesteps)
        shape = (model.config.in_channels, model.config.image_size, model.config.image_size)
        images = generate(model.to(device), schedule, shape, a.n, seed=a.seed, sampler=a.sampler, steps=steps,
                          classes=a.cls, guidance=a.guidance, num_classes=model.config.num_classes,
                          batch_size=a.batch_size, device=device, progress=not a.quiet, **options)
        source, backend = str(ckpt), ops.backend()
    seconds = time.time() - start
    name = a.name or f"{a.sampler}-{steps}"
    info = {"source": source, "sampler": a.sampler, "steps": steps, "seed": a.seed, "class": a.cls,
            "guidance": a.guidance, "backend": backend, "device": str(device), "seconds": round(seconds, 2), **options}
    grid = save_samples(images, a.out, info, name)
    print(f"{a.n} images in {seconds:.1f} s → {a.out / name}/, grid {grid}")


# --- info ---------------------------------------------------------------------------------------
def add_info(sub) -> None:
    p = sub.add_parser("info", help="version, step backend, torch and devices")
    p.set_defaults(run=run_info)


def run_info(a: argparse.Namespace) -> None:
    import torch

    from . import __version__, ops

    info = {"fastdiff": __version__, "step_backend": ops.backend(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "cpu_threads": torch.get_num_threads(), "bundled_model": str(BUNDLED) if BUNDLED.exists() else None}
    print(json.dumps(info, indent=2))


COMMANDS = [add_train, add_sample, add_info]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastdiff", description="Train DDPM U-Nets and sample them fast (DDPM / DDIM).")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from . import bench, metrics_cli
    from .export import cli as export_cli

    for add in (*COMMANDS, export_cli.add, bench.add, metrics_cli.add):
        add(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError, FloatingPointError, RuntimeError) as e:
        print(f"fastdiff {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
