"""Training data: the bundled scikit-learn digits, a folder of images, or a .npz array.
Images come out as float32 (N, C, H, W) in [-1, 1]; labels as int64 (N,) or None."""
from __future__ import annotations

import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


@dataclass
class ImageData:
    images: torch.Tensor
    labels: torch.Tensor | None
    num_classes: int

    def __post_init__(self) -> None:
        if len(self.images) == 0:
            raise ValueError("the data set holds no images")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True).clamp(-1, 1)


def load_digits(image_size: int = 16, split: str = "all") -> ImageData:
    """scikit-learn's 1797 8x8 digits (they ship with the package), upscaled to image_size.
    split: 'all', 'train' (first 1500) or 'test' (the remaining 297)."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    images = torch.from_numpy(d.images.astype(np.float32) / 16.0 * 2 - 1)[:, None]
    labels = torch.from_numpy(d.target.astype(np.int64))
    cut = {"all": slice(None), "train": slice(0, 1500), "test": slice(1500, None)}
    if split not in cut:
        raise ValueError(f"split must be one of {', '.join(cut)}; got {split!r}")
    return ImageData(resize(images[cut[split]], image_size), labels[cut[split]], 10)


def _to_float(arr: np.ndarray) -> torch.Tensor:
    """uint8 [0, 255] or float [0, 1] / [-1, 1] (N, H, W[, C]) or (N, C, H, W) → float32 NCHW in [-1, 1]."""
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4 or min(arr.shape) < 1:
        raise ValueError(f"images must have shape (N, H, W), (N, H, W, C) or (N, C, H, W); got {arr.shape}")
    if arr.shape[-1] in (1, 3, 4) and arr.shape[1] not in (1, 3, 4):
        arr = arr.transpose(0, 3, 1, 2)
    x = torch.from_numpy(np.ascontiguousarray(arr)).float()
    if arr.dtype == np.uint8:
        x = x / 127.5 - 1
    elif x.min() >= 0:
        x = x * 2 - 1
    if not torch.isfinite(x).all() or x.min() < -1.001 or x.max() > 1.001:
        raise ValueError("float images must be finite and in [0, 1] or [-1, 1]")
    return x.clamp(-1, 1)


MAX_PIXELS = 4096 * 4096  # per image: larger files are refused (decompression bombs included)


def load_npz(path: Path, image_size: int) -> ImageData:
    if path.suffix.lower() != ".npz":
        raise ValueError(f"--data {path}: expected 'digits', a folder of images or a .npz file with 'images'")
    try:
        with np.load(path, allow_pickle=False) as f:
            if not hasattr(f, "keys"):
                raise ValueError(f"--data {path}: not a .npz archive")
            if "images" not in f:
                raise ValueError(f"--data {path}: expected an array named 'images' (and optionally 'labels'); "
                                 f"found {list(f.keys())}")
            raw, labels = f["images"], f["labels"] if "labels" in f else None
    except (OSError, EOFError, zipfile.BadZipFile, KeyError, ValueError) as e:
        if isinstance(e, ValueError) and str(e).startswith("--data"):
            raise
        raise ValueError(f"--data {path}: not a readable .npz archive ({e})") from None
    if not isinstance(raw, np.ndarray) or (labels is not None and not isinstance(labels, np.ndarray)):
        raise ValueError(f"--data {path}: the archive's members are not .npy arrays")
    if raw.dtype.kind not in "uif" or raw.dtype.itemsize > 8:
        raise ValueError(f"--data {path}: 'images' must hold numbers (uint8 or float); got dtype {raw.dtype}")
    images = _to_float(raw)
    if labels is None:
        return ImageData(resize(images, image_size), None, 0)
    if labels.dtype.kind not in "iu":
        raise ValueError(f"--data {path}: 'labels' must be integers; got dtype {labels.dtype}")
    labels = torch.from_numpy(np.asarray(labels).astype(np.int64)).reshape(-1)
    if len(labels) != len(images) or labels.min() < 0:
        raise ValueError(f"{path}: 'labels' must hold one non-negative integer per image")
    return ImageData(resize(images, image_size), labels, int(labels.max()) + 1)


def load_folder(root: Path, image_size: int, channels: int) -> ImageData:
    """Every image under root; if images sit in sub-folders, the sub-folder names are the classes."""
    from PIL import Image

    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {root}")
    mode = {1: "L", 3: "RGB"}[channels]
    arrays, sizes = [], set()
    for f in files:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(f) as im:
                    if im.size[0] * im.size[1] > MAX_PIXELS:
                        raise ValueError(f"{im.size[0]}x{im.size[1]} pixels is over the limit of {MAX_PIXELS}")
                    arrays.append(np.asarray(im.convert(mode)))
                    sizes.add(im.size)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ValueError(f"--data: {f} is not a readable image ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if len(sizes) > 1:
        raise ValueError(f"images under {root} have mixed sizes {sorted(sizes)[:4]}...; resize them to one size first")
    images = _to_float(np.stack(arrays))
    classes = sorted({f.parent.relative_to(root).as_posix() for f in files})
    if classes == ["."]:
        return ImageData(resize(images, image_size), None, 0)
    labels = torch.tensor([classes.index(f.parent.relative_to(root).as_posix()) for f in files])
    return ImageData(resize(images, image_size), labels, len(classes))


def load_data(source: str, image_size: int, channels: int) -> ImageData:
    """'digits' (the train split: the test split stays held out for evaluation), a folder or a .npz file."""
    if source == "digits":
        data = load_digits(image_size, "train")
    else:
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"--data {source!r}: no such file or folder (or use 'digits')")
        data = load_folder(path, image_size, channels) if path.is_dir() else load_npz(path, image_size)
    if data.images.shape[1] != channels:
        raise ValueError(f"data has {data.images.shape[1]} channel(s) but the model expects {channels}")
    return data
