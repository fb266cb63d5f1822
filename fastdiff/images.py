"""Writing samples: one PNG per image, a grid PNG, and a JSON sidecar describing the run."""
from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .files import atomic_write, write_json


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


def check_name(name: str) -> str:
    """A sample-set name is a plain file stem: no separator, no '..', nothing hidden."""
    if not name or name != Path(name).name or name in (".", "..") or name.startswith(".") or "\\" in name:
        raise ValueError(f"--name must be a plain file name stem (no '/', no '..', not hidden); got {name!r}")
    return name


class SampleSet:
    """Writes one set of samples — out/<name>/NNNN.png, out/<name>_grid.png, out/<name>.json — batch by batch,
    in bounded memory. Images go to a hidden folder first; `close` writes the grid, swaps the folder in
    (replacing an older set of that name as a whole) and writes the sidecar last, so the sidecar always
    describes exactly the files beside it. `abort` (or an exception inside `with`) leaves no new files."""

    GRID_IMAGES = 64

    def __init__(self, out: Path, name: str, scale: int = 4):
        self.out, self.name, self.scale = Path(out), check_name(name), scale
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"--out {self.out}: exists and is not a folder")
        self.out.mkdir(parents=True, exist_ok=True)
        self.folder = self.out / self.name
        for stale in self.out.glob(f".{self.name}.*.partial"):  # left by a killed run
            shutil.rmtree(stale, ignore_errors=True)
        self._tmp = Path(tempfile.mkdtemp(prefix=f".{self.name}.", suffix=".partial", dir=self.out))
        self._grid: list[torch.Tensor] = []
        self.count = 0

    def add(self, images: torch.Tensor) -> None:
        for arr in to_uint8(images):
            _pil(arr).save(self._tmp / f"{self.count:04d}.png", format="PNG")
            self.count += 1
        room = self.GRID_IMAGES - sum(len(g) for g in self._grid)
        if room > 0:
            self._grid.append(images[:room].detach().cpu())

    def close(self, info: dict) -> Path:
        """Publish the set; returns the grid's path."""
        grid_path = self.out / f"{self.name}_grid.png"
        save_png(grid(torch.cat(self._grid), scale=self.scale), grid_path)
        old = self.out / f".{self.name}.{os.getpid()}.old"
        if self.folder.exists():
            os.rename(self.folder, old)
        os.rename(self._tmp, self.folder)
        shutil.rmtree(old, ignore_errors=True)
        write_json(self.out / f"{self.name}.json",
                   {**info, "count": self.count, "images": str(self.folder), "grid": str(grid_path)})
        return grid_path

    def abort(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> "SampleSet":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or self._tmp.exists():
            self.abort()


def save_samples(images: torch.Tensor, out: Path, info: dict, name: str, scale: int = 4) -> Path:
    """Write a whole set at once (see SampleSet); returns the grid path."""
    with SampleSet(out, name, scale) as samples:
        samples.add(images)
        return samples.close(info)
