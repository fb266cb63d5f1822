"""The fastdiff ONNX file format keys (defined in fastdiff.onnx_format, a lower layer the engine's runtimes
share; re-exported here for the export package), the key of the weights digest, and the bounds a file's
metadata must keep before anything is allocated from it. Torch-free."""
from __future__ import annotations

import json
from typing import Any

from ..onnx_format import (FORMAT, FORMAT_VERSION, KEY_CLASSES, KEY_FORMAT, KEY_FORMAT_VERSION,  # noqa: F401
                           KEY_MODEL, KEY_PRECISION, KEY_SCHEDULE, KEY_SHAPE, KEY_VERSION, KEY_WEIGHTS,
                           REQUIRED_KEYS)

PRECISIONS = ("fp32", "fp16", "int8")
# The image sizes training accepts (`fastdiff train --image-size` in [4, 1024]); channels: 1 or 3 for fastdiff's
# data, a few more for a diffusers UNet2DModel. A hostile file claiming more is refused before any array exists.
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE, MAX_CHANNELS = 4, 1024, 16
MAX_CLASSES = 1_000_000


def parse_shape(text: str) -> tuple[int, int, int]:
    """The fastdiff.image_shape value as (C, H, W) within the bounds above; ValueError otherwise."""
    try:
        shape = json.loads(text)
    except ValueError:
        raise ValueError(f"{KEY_SHAPE} is not JSON: {text[:80]!r}") from None
    if not (isinstance(shape, list) and len(shape) == 3 and all(_is_int(s) for s in shape)):
        raise ValueError(f"{KEY_SHAPE} must be a list of three integers [C, H, W]; got {text[:80]!r}")
    c, h, w = shape
    if not (1 <= c <= MAX_CHANNELS and MIN_IMAGE_SIZE <= h <= MAX_IMAGE_SIZE and MIN_IMAGE_SIZE <= w <= MAX_IMAGE_SIZE):
        raise ValueError(f"{KEY_SHAPE} {shape} is out of bounds: channels must be in [1, {MAX_CHANNELS}], height and "
                         f"width in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}]")
    return c, h, w


def parse_classes(text: str) -> int:
    """The fastdiff.num_classes value as an int in [0, MAX_CLASSES]; ValueError otherwise."""
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{KEY_CLASSES} must be an integer; got {text[:80]!r}") from None
    if not 0 <= value <= MAX_CLASSES:
        raise ValueError(f"{KEY_CLASSES} must be in [0, {MAX_CLASSES}]; got {value}")
    return value


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
