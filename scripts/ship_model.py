"""Copy a trained run's EMA weights into the package (fastdiff/assets/digits), the model that
`fastdiff sample` and `fastdiff eval` use when no --ckpt is given.

    python scripts/ship_model.py runs/digits-long
"""
from __future__ import annotations

import argparse
from pathlib import Path

from fastdiff import checkpoint
from fastdiff.checkpoint import BUNDLED_MODEL as BUNDLED


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="training run folder")
    p.add_argument("--out", type=Path, default=BUNDLED, help=f"destination (default: {BUNDLED})")
    a = p.parse_args()
    config, tensors, meta = checkpoint.load(a.run)
    ema = {k: v for k, v in tensors.items() if k.startswith("ema.")}
    losses = meta.get("losses", [])
    tail = losses[-100:]
    shipped = {"step": meta.get("step"), "final_loss": sum(tail) / len(tail) if tail else None,
               "source": str(a.run)}
    path = checkpoint.save(a.out, config, ema, shipped)
    print(f"{len(ema)} EMA tensors, step {shipped['step']}, final loss {shipped['final_loss']:.4f} → {path}")


if __name__ == "__main__":
    main()
