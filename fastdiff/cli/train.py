"""`fastdiff train`: train a DDPM U-Net on the bundled digits, an image folder or a .npz."""
from __future__ import annotations

import argparse
import shlex
import signal
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

from .. import distributed
from ..files import FolderLock, ensure_writable, remove_stale_temps
from ..machine import pick_device
from ..nn.unet import PRESETS
from ..schedule import BETA_SCHEDULES, NoiseSchedule
from .common import add_device, add_quiet

PREDICTIONS = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


def add(sub) -> None:
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
    p.add_argument("--batch-size", type=int, default=64,
                   help="the global batch: under torchrun it is split across the processes (default: 64)")
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
    add_device(p)
    add_quiet(p)
    p.set_defaults(run=run)


def run(a: argparse.Namespace) -> None:
    from ..data import load_data
    from ..nn.unet import preset
    from ..train import TrainConfig, Trainer, write_summary

    if a.image_size is not None and not 4 <= a.image_size <= 1024:
        raise ValueError(f"--image-size must be in [4, 1024]; got {a.image_size}")
    overrides = {"image_size": a.image_size} if a.image_size is not None else {}
    cfg = preset(a.preset, **overrides)
    schedule = NoiseSchedule(num_train_timesteps=a.timesteps, beta_schedule=a.schedule,
                             prediction_type=PREDICTIONS[a.prediction])
    tc = TrainConfig(steps=a.steps, batch_size=a.batch_size, lr=a.lr, warmup=a.warmup, weight_decay=a.weight_decay,
                     grad_clip=a.grad_clip, ema_decay=a.ema_decay, amp=a.amp, hflip=a.hflip,
                     label_dropout=a.label_dropout, seed=a.seed, ckpt_every=a.ckpt_every)
    if not a.resume and (a.out / "checkpoint.safetensors").exists():
        raise ValueError(f"{a.out} already holds a checkpoint: pass --resume to continue it, or choose another --out")
    data = load_data(a.data, cfg.image_size, cfg.in_channels)
    if a.class_cond:
        if not data.num_classes:
            raise ValueError(f"--class-cond: the data {a.data!r} has no labels")
        cfg = preset(a.preset, **overrides, num_classes=data.num_classes)
    device = distributed.init(pick_device(a.device))  # joins torchrun's process group, if launched by it
    is_main = distributed.is_main()
    if is_main:
        ensure_writable(a.out)  # now, not at the first checkpoint 500 steps in
    with FolderLock(a.out) if is_main else nullcontext():
        if is_main:
            remove_stale_temps(a.out)  # debris of a killed run
        trainer = Trainer(data, cfg, schedule, tc, a.out, device, data_source=a.data)
        if a.resume:
            trainer.resume()
        start = time.time()
        with _stop_on_signals(trainer):
            losses = trainer.fit(progress=not a.quiet)
        if trainer.stopping and trainer.step < tc.steps:
            resume = " ".join(shlex.quote(x) for x in ["fastdiff", *sys.argv[1:]] + ([] if a.resume else ["--resume"]))
            if distributed.world_size() > 1:
                resume = f"the same torchrun command with: {resume}"
            raise KeyboardInterrupt(f"checkpoint saved at step {trainer.step} of {tc.steps}; continue with: {resume}")
        if not is_main:
            return
        write_summary(a.out, losses, time.time() - start)
    print(f"trained {trainer.step} steps in {time.time() - start:.0f} s, final loss "
          f"{sum(losses[-100:]) / len(losses[-100:]):.4f} → {a.out}")


@contextmanager
def _stop_on_signals(trainer):
    """Ctrl-C / SIGTERM ask the trainer to stop after the current step (with a checkpoint); a second Ctrl-C
    interrupts at once."""
    def ask(signum, frame):
        if trainer.stop_requested:
            raise KeyboardInterrupt
        trainer.stop_requested = True

    previous = {sig: signal.signal(sig, ask) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
