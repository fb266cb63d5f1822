"""Writing samples: one PNG per image, a grid PNG, and a JSON sidecar describing the run."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .checkpoint import atomic_write, write_json


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] → (N, H, W, C) uint8."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def _pil(arr: np.ndarray) -> Image.Image:
    return Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)


def grid(images: torch.Tensor, nrow: int | None = None, pad: int = 1, scale: int = 1) -> Image.Image:
    arr = to_uint8(images)
    n, h, w, c = arr.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    canvas = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, np.uint8)
    for i, im in enumerate(arr):
        r, col = divmod(i, nrow)
        canvas[pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = im
    img = _pil(canvas)
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST) if scale > 1 else img


def save_png(img: Image.Image, path: Path) -> None:
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def save_samples(images: torch.Tensor, out: Path, info: dict, name: str, scale: int = 4) -> Path:
    """Write out/<name>/NNNN.png, out/<name>_grid.png and out/<name>.json; returns the grid path."""
    out = Path(out)
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    for i, arr in enumerate(to_uint8(images)):
        save_png(_pil(arr), folder / f"{i:04d}.png")
    grid_path = out / f"{name}_grid.png"
    save_png(grid(images, scale=scale), grid_path)
    write_json(out / f"{name}.json", {**info, "count": len(images), "images": str(folder), "grid": str(grid_path)})
    return grid_path
