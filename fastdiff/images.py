"""Writing samples: one PNG per image, a grid PNG, and a JSON sidecar describing the run."""
from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .files import atomic_write, ensure_writable, write_json


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


SAMPLE_FILE = re.compile(r"\d{4,}\.png")


class SampleSet:
    """Writes one set of samples — out/<name>/NNNN.png, out/<name>_grid.png, out/<name>.json — batch by batch,
    in bounded memory. Images go to a hidden folder first; `close` writes the grid, swaps the folder in
    (replacing an older set of that name as a whole) and writes the sidecar last, so the sidecar always
    describes exactly the files beside it. `abort` (or an exception inside `with`) leaves no new files.
    Only a set's own files are ever replaced: a folder holding anything but NNNN.png files, or a grid or
    sidecar path that is not a file, is refused (ValueError) before any work.

    Several processes can write one set (fastdiff.distributed.SharedSampleSet): the owner makes the set as
    usual and hands `folder_in_progress` to the others, who open `SampleSet(out, name, folder=that)` and
    `add(images, start=...)` under global indices; the owner's `close(info, count=total)` publishes them all
    (a joined set never publishes, aborts or cleans up: that is the owner's)."""

    GRID_IMAGES = 64

    def __init__(self, out: Path, name: str, scale: int = 4, folder: Path | None = None):
        self.out, self.name, self.scale = Path(out), check_name(name), scale
        self.folder = self.out / self.name
        self._grid: list[torch.Tensor] = []
        self.count = 0
        self.joined = folder is not None
        if self.joined:
            if not Path(folder).is_dir():
                raise ValueError(f"{folder}: the shared sample folder is not visible here (is --out on a "
                                 "file system every process shares?)")
            self._tmp = Path(folder)
            return
        self._check_replaceable()
        ensure_writable(self.out, "--out")
        for stale in self.out.glob(f".{self.name}.*.partial"):  # left by a killed run
            shutil.rmtree(stale, ignore_errors=True)
        self._tmp = Path(tempfile.mkdtemp(prefix=f".{self.name}.", suffix=".partial", dir=self.out))
        os.chmod(self._tmp, 0o755)  # mkdtemp makes 0700; samples are meant to be shared, like the grid beside them

    def _check_replaceable(self) -> None:
        """ValueError unless every path the set will (re)place is absent or one of a set's own files."""
        for path in (self.out / f"{self.name}_grid.png", self.out / f"{self.name}.json"):
            if path.exists() and not path.is_file():
                raise ValueError(f"--name {self.name}: {path} exists and is not a file; remove it or choose "
                                 "another --name")
        folder = self.folder
        if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
            raise ValueError(f"--name {self.name}: {folder} exists and is not a folder of samples; remove it or "
                             "choose another --name")
        if folder.is_dir() and any(not (f.is_file() and SAMPLE_FILE.fullmatch(f.name)) for f in folder.iterdir()):
            raise ValueError(f"--name {self.name}: {folder} holds files other than samples (NNNN.png); remove it "
                             "or choose another --name")

    @property
    def folder_in_progress(self) -> Path:
        """The hidden folder the images go to until `close`."""
        return self._tmp

    def add(self, images: torch.Tensor, start: int | None = None) -> None:
        """Write images as NNNN.png, numbered on from the last add (or from `start`, their global index)."""
        first = self.count if start is None else start
        for i, arr in enumerate(to_uint8(images)):
            _pil(arr).save(self._tmp / f"{first + i:04d}.png", format="PNG")
            self.count += 1
        room = self.GRID_IMAGES - sum(len(g) for g in self._grid)
        if room > 0:
            self._grid.append(images[:room].detach().cpu())

    def close(self, info: dict, count: int | None = None) -> Path:
        """Publish the set; returns the grid's path. count: the total when other processes wrote into the
        folder too (their files are checked to be there, and the grid is read back from the first files)."""
        if self.joined:
            raise ValueError("a joined SampleSet is published by its owner, not closed")
        grid_path = self.out / f"{self.name}_grid.png"
        if count is None:
            images = torch.cat(self._grid)
        else:
            missing = [f"{i:04d}.png" for i in range(count) if not (self._tmp / f"{i:04d}.png").exists()]
            if missing:
                raise RuntimeError(f"{len(missing)} of {count} sample files were not written (first {missing[0]})")
            self.count = count
            images = _read_pngs([self._tmp / f"{i:04d}.png" for i in range(min(count, self.GRID_IMAGES))])
        self._check_replaceable()
        save_png(grid(images, scale=self.scale), grid_path)
        old = self.out / f".{self.name}.{os.getpid()}.old"
        if self.folder.exists():
            os.rename(self.folder, old)
        os.rename(self._tmp, self.folder)
        shutil.rmtree(old, ignore_errors=True)
        write_json(self.out / f"{self.name}.json",
                   {**info, "count": self.count, "images": str(self.folder), "grid": str(grid_path)})
        return grid_path

    def abort(self) -> None:
        if not self.joined:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> "SampleSet":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or self._tmp.exists():
            self.abort()


def _read_pngs(paths: list[Path]) -> torch.Tensor:
    """PNG files written by SampleSet back as (N, C, H, W) in [-1, 1] (to_uint8 of them gives the same bytes)."""
    arrays = []
    for path in paths:
        with Image.open(path) as im:
            arr = np.asarray(im)
        arrays.append(arr[..., None] if arr.ndim == 2 else arr)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1


def save_samples(images: torch.Tensor, out: Path, info: dict, name: str, scale: int = 4) -> Path:
    """Write a whole set at once (see SampleSet); returns the grid path."""
    with SampleSet(out, name, scale) as samples:
        samples.add(images)
        return samples.close(info)
