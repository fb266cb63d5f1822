import numpy as np
import pytest
import torch
from PIL import Image

from fastdiff.data import load_data, load_digits


def test_digits_upscaled_in_range_with_labels():
    d = load_digits(16)
    assert d.images.shape == (1797, 1, 16, 16) and d.images.dtype == torch.float32
    assert d.images.min() >= -1 and d.images.max() <= 1
    assert d.labels.shape == (1797,) and set(d.labels.tolist()) == set(range(10)) and d.num_classes == 10
    assert len(load_digits(8, "train").images) + len(load_digits(8, "test").images) == 1797


def _png(path, size=(12, 12), value=128, mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size[::-1] + ((3,) if mode == "RGB" else ()), value, np.uint8), mode).save(path)


def test_folder_with_class_subfolders(tmp_path):
    for cls in ("cat", "dog"):
        for i in range(3):
            _png(tmp_path / cls / f"{i}.png", value=0 if cls == "cat" else 255)
    d = load_data(str(tmp_path), 8, 1)
    assert d.images.shape == (6, 1, 8, 8) and d.num_classes == 2
    assert d.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert d.images[0].max() == -1 and d.images[-1].min() == 1


def test_flat_folder_rgb_unlabelled(tmp_path):
    for i in range(2):
        _png(tmp_path / f"{i}.jpg", mode="RGB")
    d = load_data(str(tmp_path), 16, 3)
    assert d.images.shape == (2, 3, 16, 16) and d.labels is None


def test_empty_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="no images"):
        load_data(str(tmp_path), 8, 1)


def test_mixed_sizes(tmp_path):
    _png(tmp_path / "a.png", (8, 8))
    _png(tmp_path / "b.png", (9, 8))
    with pytest.raises(ValueError, match="mixed sizes"):
        load_data(str(tmp_path), 8, 1)


def test_npz(tmp_path):
    np.savez(tmp_path / "d.npz", images=np.random.randint(0, 256, (5, 8, 8, 3), dtype=np.uint8), labels=np.arange(5))
    d = load_data(str(tmp_path / "d.npz"), 8, 3)
    assert d.images.shape == (5, 3, 8, 8) and d.num_classes == 5
    np.savez(tmp_path / "bad.npz", pictures=np.zeros((2, 8, 8)))
    with pytest.raises(ValueError, match="'images'"):
        load_data(str(tmp_path / "bad.npz"), 8, 1)


def test_missing_path_and_channel_mismatch(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_data(str(tmp_path / "nope"), 8, 1)
    with pytest.raises(ValueError, match="channel"):
        load_data("digits", 8, 3)
