"""Train the digits classifier whose features fastdiff.metrics uses for FID / KID.

Seeded and deterministic on the CPU (one thread): the same command gives the same weights.
    python scripts/train_classifier.py [--out fastdiff/assets/digits_classifier.safetensors] [--epochs 40]
Trains on load_digits(16, 'train') with small random shifts, Gaussian noise and contrast jitter (so generated
samples are fairly judged), plus noise images with a uniform target (so garbage is not classified with
confidence); writes the weights (safetensors) and a JSON card with the test accuracy.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fastdiff.files import atomic_write, write_json  # noqa: E402
from fastdiff.data import load_digits  # noqa: E402
from fastdiff.metrics import CLASSIFIER, IMAGE_SIZE, DigitsNet  # noqa: E402


def augment(x: torch.Tensor, g: torch.Tensor | torch.Generator) -> torch.Tensor:
    """Random shifts of up to 2 pixels, contrast jitter and Gaussian noise (sigma up to 0.2)."""
    n = len(x)
    pad = F.pad(x, (2, 2, 2, 2), value=-1.0)
    dx, dy = torch.randint(0, 5, (n,), generator=g), torch.randint(0, 5, (n,), generator=g)
    rows = (dy[:, None] + torch.arange(IMAGE_SIZE))[:, :, None]
    cols = (dx[:, None] + torch.arange(IMAGE_SIZE))[:, None, :]
    x = pad[torch.arange(n)[:, None, None], 0, rows, cols][:, None]
    scale = 1 + 0.2 * (torch.rand(n, 1, 1, 1, generator=g) - 0.5)
    x = (x + 1) * scale - 1
    sigma = 0.2 * torch.rand(n, 1, 1, 1, generator=g)
    return (x + sigma * torch.randn(x.shape, generator=g)).clamp(-1, 1)


def outliers(n: int, g: torch.Generator) -> torch.Tensor:
    """Noise images: pure Gaussian noise, and smooth blobs (noise upsampled from 4x4)."""
    white = torch.randn(n // 2, 1, IMAGE_SIZE, IMAGE_SIZE, generator=g).clamp(-1, 1)
    blobs = F.interpolate(torch.randn(n - n // 2, 1, 4, 4, generator=g) * 1.5, size=IMAGE_SIZE, mode="bilinear")
    return torch.cat([white, blobs.clamp(-1, 1)])


def train(epochs: int = 40, seed: int = 0, batch_size: int = 64, lr: float = 3e-3) -> DigitsNet:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    data = load_digits(IMAGE_SIZE, "train")
    net = DigitsNet()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(data.images) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(data.images), generator=g)
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            x, y = augment(data.images[idx], g), data.labels[idx]
            junk = outliers(max(len(idx) // 8, 2), g)
            logits = net(torch.cat([x, junk]))
            loss = F.cross_entropy(logits[:len(x)], y)
            loss = loss + 0.5 * -logits[len(x):].log_softmax(-1).mean()  # uniform target for the outliers
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    net.eval().calibrate(data.images)
    return net


@torch.inference_mode()
def accuracy(net: DigitsNet) -> float:
    data = load_digits(IMAGE_SIZE, "test")
    return float((net(data.images).argmax(1) == data.labels).float().mean())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=CLASSIFIER, help=f"weights file (default: {CLASSIFIER})")
    p.add_argument("--epochs", type=int, default=40, help="default: 40")
    p.add_argument("--seed", type=int, default=0, help="default: 0")
    a = p.parse_args(argv)
    if a.epochs < 1:
        p.error("--epochs must be >= 1")
    from safetensors.torch import save_file

    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)  # thread count changes reduction order; one thread is fast enough here
    torch.use_deterministic_algorithms(True)
    try:
        start = time.time()
        net = train(a.epochs, a.seed)
        acc = accuracy(net)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    # no safetensors metadata: it is a hash map, written in varying order, and the file should be byte-identical
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    atomic_write(a.out, lambda tmp: save_file(state, tmp))
    card = {"model": "DigitsNet (fastdiff.metrics)", "input": "1x16x16 in [-1, 1]", "features": 64,
            "data": "load_digits(16, 'train'): first 1500 scikit-learn digits", "epochs": a.epochs, "seed": a.seed,
            "test_accuracy": round(acc, 4), "test_split": "load_digits(16, 'test'): the remaining 297",
            "torch": torch.__version__, "made_by": "scripts/train_classifier.py"}
    write_json(a.out.with_suffix(".json"), card)
    print(f"test accuracy {acc:.4f} after {a.epochs} epochs in {time.time() - start:.1f} s → {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
