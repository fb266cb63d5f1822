"""DDPM training (Ho et al. Algorithm 1) with EMA, AMP, gradient clipping, label dropout for
classifier-free guidance, atomic checkpoints and exact resume.

Under torchrun (fastdiff.distributed, docs/scaling.md) the model runs in DistributedDataParallel and
config.batch_size is the GLOBAL batch: every rank draws the whole batch (indices, flips, label drops,
timesteps, noise) from the same generator and trains on its contiguous slice, so N processes train on
exactly the batches one process would (results equal to float rounding of the split and the all-reduce).
Each rank's global torch RNG (dropout) is its own stream (distributed.rank_seed); rank 0 writes the
checkpoints, holding every rank's RNG state, so a resume with the same world size is exact."""
from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import __version__, checkpoint, distributed
from .files import atomic_write, write_json
from .data import ImageData
from .nn.unet import UNet, UNetConfig
from .request import MAX_BATCH_SIZE
from .schedule import NoiseSchedule

# The global batch: far above real diffusion training (DDPM: 128; ADM: 256-2048), yet small enough to refuse a typo
# before allocating it (65536 3x32x32 float32 images are 0.8 GB before any activation).


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 4000
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    amp: str = "auto"  # auto (bf16 on a CUDA GPU that has it, else off) | off | bf16 | fp16
    hflip: bool = False
    label_dropout: float = 0.1  # class-conditional models only: share of labels replaced by the null class
    seed: int = 0
    ckpt_every: int = 500

    def __post_init__(self) -> None:
        checks = {  # option: (valid, what is expected)
            "steps": (self.steps >= 1, "an integer >= 1"),
            "batch_size": (1 <= self.batch_size <= MAX_BATCH_SIZE, f"an integer in [1, {MAX_BATCH_SIZE}]"),
            "lr": (math.isfinite(self.lr) and self.lr > 0, "a finite number > 0"),
            "warmup": (self.warmup >= 0, "an integer >= 0"),
            "grad_clip": (math.isfinite(self.grad_clip) and self.grad_clip >= 0, "a finite number >= 0 (0: off)"),
            "ckpt_every": (self.ckpt_every >= 1, "an integer >= 1"),
            "weight_decay": (math.isfinite(self.weight_decay) and self.weight_decay >= 0, "a finite number >= 0"),
            "ema_decay": (0 <= self.ema_decay < 1, "a number in [0, 1)"),
            "label_dropout": (0 <= self.label_dropout < 1, "a number in [0, 1)"),
            "seed": (0 <= self.seed < 2**63, "an integer in [0, 2**63)"),
            "amp": (self.amp in ("auto", "off", "bf16", "fp16"), "auto, off, bf16 or fp16"),
        }
        bad = [f"--{k.replace('_', '-')} {getattr(self, k)!r}: expected {what}" for k, (ok, what) in checks.items()
               if not ok]
        if bad:
            raise ValueError("; ".join(bad))

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        return cls(**{k: v for k, v in d.items() if k in {f.name for f in fields(cls)}})


def json_roundtrip(obj: dict) -> dict:
    """obj as it reads back from JSON (tuples become lists), so configs compare equal after a reload."""
    return json.loads(json.dumps(obj))


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if device.type != "cuda" or amp == "off":
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]


class Trainer:
    """Owns the model, its EMA, the optimizer and every RNG, so that a resumed run continues exactly."""

    def __init__(self, data: ImageData, model_config: UNetConfig, schedule: NoiseSchedule, config: TrainConfig,
                 out: Path, device: str | torch.device = "cpu", data_source: str = "digits"):
        if data.image_shape != model_config.image_shape:
            raise ValueError(f"data images are {data.image_shape}, the model expects "
                             f"{model_config.image_shape}")
        if model_config.num_classes and data.labels is None:
            raise ValueError("a class-conditional model needs labelled data (sub-folders, or 'labels' in the .npz)")
        self.data, self.schedule, self.config, self.out = data, schedule, config, Path(out)
        self.device = torch.device(device)
        torch.manual_seed(config.seed)
        self.model = UNet(model_config).to(self.device)
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.amp = amp_dtype(config.amp, self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp == torch.float16)
        self.gen = torch.Generator(self.device).manual_seed(config.seed)
        self.images = data.images.to(self.device)
        self.labels = data.labels.to(self.device) if data.labels is not None and model_config.num_classes else None
        self.step, self.losses = 0, []
        self.rank, self.world = distributed.rank(), distributed.world_size()
        if config.batch_size < self.world:
            raise ValueError(f"--batch-size {config.batch_size} is the global batch and must be >= the number of "
                             f"processes ({self.world})")
        self.shard = slice(*distributed.split(config.batch_size, self.world, self.rank))  # this rank's samples
        if self.rank:
            torch.manual_seed(distributed.rank_seed(config.seed, self.rank))  # after the (shared) initial weights
        self.net = distributed.wrap(self.model, self.device)  # the model itself at world size 1
        if self.world > 1:
            self._settle_buckets()
        self.run_config = json_roundtrip({"fastdiff_version": __version__, "model": model_config.to_dict(),
                           "schedule": schedule.to_dict(), "train": asdict(config), "data": data_source})

    # --- one optimisation step -------------------------------------------------------------------
    def batch(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This rank's slice of the global batch (every rank draws all of it, so the stream is shared)."""
        g, n, mine = self.gen, self.config.batch_size, self.shard
        idx = torch.randint(len(self.images), (n,), generator=g, device=self.device)[mine]
        x0 = self.images[idx]
        if self.config.hflip:
            flip = torch.rand(n, generator=g, device=self.device)[mine] < 0.5
            x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        if self.labels is None:
            return x0, None
        y = self.labels[idx]
        drop = torch.rand(n, generator=g, device=self.device)[mine] < self.config.label_dropout
        return x0, torch.where(drop, -1, y)

    def lr_at(self, step: int) -> float:
        return self.config.lr * min(1.0, (step + 1) / max(1, self.config.warmup))

    def train_step(self) -> float:
        x0, y = self.batch()
        g, T, n = self.gen, self.schedule.num_train_timesteps, self.config.batch_size
        t = torch.randint(T, (n,), generator=g, device=self.device)[self.shard]
        noise = torch.randn((n, *x0.shape[1:]), generator=g, device=self.device)[self.shard]
        x_t = self.schedule.q_sample(x0, t, noise)
        target = self.schedule.training_target(x0, t, noise)
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(self.step)
        with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            loss = F.mse_loss(self.net(x_t, t, y).float(), target)
        share = len(x0) / n  # of the global batch; DDP averages gradients over ranks, hence the weight below
        if self.world == 1:
            mean = loss
        else:  # the global loss, and whether any rank was asked to stop: all then stop after this same step
            flag = torch.tensor(float(self.stop_requested), device=self.device)
            mean, stop = distributed.all_reduce_sum(torch.stack([loss.detach() * share, flag]))
            self._stop_agreed = bool(stop > 0)
        if not torch.isfinite(mean):  # the global loss: every rank stops together
            raise FloatingPointError(f"training loss became {mean.item()} at step {self.step}; lower --lr or use --amp off")
        self.opt.zero_grad(set_to_none=True)
        weight = share * self.world
        self.scaler.scale(loss if weight == 1 else loss * weight).backward()
        if self.config.grad_clip > 0:
            self.scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        decay = min(self.config.ema_decay, (1 + self.step) / (10 + self.step))
        torch._foreach_lerp_(list(self.ema.parameters()), list(self.model.parameters()), 1 - decay)
        self.step += 1
        return mean.item()

    def _settle_buckets(self) -> None:
        """One forward/backward on zeros (eval mode: no RNG drawn) before the first step. DDP regroups the
        gradients into buckets after its first backward; doing that here means a fresh and a resumed run
        all-reduce the same buckets at every step, so they sum in the same order (exact resume, any N)."""
        x = torch.zeros((1, *self.images.shape[1:]), device=self.device)
        t = torch.zeros(1, dtype=torch.long, device=self.device)
        y = None if self.labels is None else torch.zeros(1, dtype=torch.long, device=self.device)
        self.model.eval()
        try:
            self.net(x, t, y).float().sum().backward()
        finally:
            self.model.train()
            self.opt.zero_grad(set_to_none=True)

    stop_requested = False  # set (e.g. by a signal handler) to end fit() after the current step, with a checkpoint
    _stop_agreed = False  # under torchrun: some rank had stop_requested at the last step's all-reduce

    @property
    def stopping(self) -> bool:
        """stop_requested as every rank agrees on it (a signal may reach the ranks during different steps)."""
        return self.stop_requested if self.world == 1 else self._stop_agreed

    def fit(self, progress: bool = True) -> list[float]:
        """Train up to config.steps, checkpointing every ckpt_every steps and at the end (or when stop_requested)."""
        bar = tqdm(total=self.config.steps, initial=self.step, desc="train", disable=not progress or self.rank > 0,
                   dynamic_ncols=True)
        saved = self.step
        while self.step < self.config.steps and not self.stopping:
            self.losses.append(self.train_step())
            bar.update(1)
            if self.step % 10 == 0:
                bar.set_postfix(loss=f"{sum(self.losses[-50:]) / len(self.losses[-50:]):.4f}")
            if self.step % self.config.ckpt_every == 0 or self.step == self.config.steps:
                saved = self.step
                self.save()
        if self.stopping and saved != self.step:  # asked to stop (Ctrl-C, SIGTERM): keep every finished step
            self.save()
        bar.close()
        return self.losses

    # --- checkpoints -----------------------------------------------------------------------------
    def save(self) -> Path:
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        tensors |= {f"ema.{k}": v for k, v in self.ema.state_dict().items()}
        opt_state = self.opt.state_dict()
        for i, state in opt_state["state"].items():
            tensors |= {f"optim.{i}.{k}": v for k, v in state.items()}
        tensors["rng.gen"] = self.gen.get_state()
        cuda = self.device.type == "cuda"
        own = (torch.get_rng_state(), torch.cuda.get_rng_state(self.device) if cuda else None)
        for r, (cpu_state, cuda_state) in enumerate(distributed.all_gather_objects(own)):  # every rank's stream
            tensors[_rng_key("torch", r)] = cpu_state
            if cuda_state is not None:
                tensors[_rng_key("cuda", r)] = cuda_state
        meta = {"step": self.step, "losses": self.losses, "param_groups": opt_state["param_groups"],
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None, "world_size": self.world}
        distributed.check_same(f"the weights at step {self.step}",
                               [*self.model.state_dict().values(), *self.ema.state_dict().values()])
        path = self.out / checkpoint.WEIGHTS
        if self.rank == 0:
            path = checkpoint.save(self.out, self.run_config, tensors, meta)
        distributed.barrier()  # the others go on once the checkpoint is in place
        return path

    def resume(self) -> None:
        """Load the latest checkpoint in self.out; its model, schedule and data must match this run's."""
        config, tensors, meta = checkpoint.load(self.out)
        if "rng.gen" not in tensors or "step" not in meta:
            raise ValueError(f"--resume: {self.out} holds model weights only, no training state (optimizer, RNG, "
                             "step); train a new run with another --out")
        if meta.get("world_size", 1) != self.world:
            raise ValueError(f"--resume: the checkpoint was written by {meta.get('world_size', 1)} process(es), this "
                             f"run has {self.world}; resume with the same number of processes (each rank's RNG stream "
                             "is in the checkpoint)")
        for key in ("model", "schedule", "data"):
            if config.get(key) != self.run_config[key]:
                raise ValueError(f"--resume: the checkpoint's {key} config {config.get(key)} differs from this run's "
                                 f"{self.run_config[key]}")
        self.model.load_state_dict(checkpoint.prefixed(tensors, "model."))
        self.ema.load_state_dict(checkpoint.prefixed(tensors, "ema."))
        state = {}
        for key, value in checkpoint.prefixed(tensors, "optim.").items():
            i, name = key.split(".", 1)
            state.setdefault(int(i), {})[name] = value.to(self.device)
        self.opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        self.gen.set_state(tensors["rng.gen"])
        torch.set_rng_state(tensors[_rng_key("torch", self.rank)])
        if self.device.type == "cuda" and _rng_key("cuda", self.rank) in tensors:
            torch.cuda.set_rng_state(tensors[_rng_key("cuda", self.rank)], self.device)
        if meta.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(meta["scaler"])
        self.step, self.losses = meta["step"], list(meta["losses"])
        if self.step > self.config.steps:
            raise ValueError(f"--resume: the checkpoint is at step {self.step}, beyond --steps {self.config.steps}")


def _rng_key(kind: str, rank: int) -> str:
    """The checkpoint key of rank r's global RNG state ('rng.torch' for rank 0, as before scale-out)."""
    return f"rng.{kind}" if rank == 0 else f"rng.{kind}.{rank}"


def plot_losses(losses: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    window = max(1, len(losses) // 100)
    smooth = [sum(losses[max(0, i - window):i + 1]) / len(losses[max(0, i - window):i + 1]) for i in range(len(losses))]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(losses, alpha=0.3, label="loss")
    ax.plot(smooth, label=f"mean of {window}")
    ax.set(xlabel="step", ylabel="MSE", yscale="log", title="training loss")
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def summary(losses: list[float]) -> dict:
    tail = losses[-100:]
    return {"steps": len(losses), "final_loss": sum(tail) / len(tail) if tail else math.nan}


def write_summary(out: Path, losses: list[float], seconds: float) -> None:
    write_json(Path(out) / "train_summary.json", {**summary(losses), "seconds": round(seconds, 1)})
    plot_losses(losses, Path(out) / "loss.png")

