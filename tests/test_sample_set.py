"""SampleSet replaces only a set's own files, refuses anything else before work, and publishes shareable folders."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from fastdiff.cli import main
from fastdiff.images import SampleSet, save_samples

IMAGES = torch.zeros(3, 1, 4, 4)


def test_an_earlier_set_is_replaced(tmp_path):
    save_samples(IMAGES, tmp_path, {"run": 1}, "s")
    save_samples(IMAGES[:1], tmp_path, {"run": 2}, "s")
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["0000.png"]


@pytest.mark.parametrize("make", ["folder-with-other-files", "file", "symlink", "grid-is-folder", "sidecar-is-folder"])
def test_what_is_not_a_set_is_refused_before_work_and_kept(tmp_path, make):
    kept = tmp_path / "important.txt"
    kept.write_text("data")
    if make == "folder-with-other-files":
        (tmp_path / "s").mkdir()
        (tmp_path / "s" / "0000.png").write_bytes(b"")
        os.replace(kept, tmp_path / "s" / "important.txt")
        kept = tmp_path / "s" / "important.txt"
    elif make == "file":
        os.replace(kept, tmp_path / "s")
        kept = tmp_path / "s"
    elif make == "symlink":
        (tmp_path / "elsewhere").mkdir()
        (tmp_path / "s").symlink_to(tmp_path / "elsewhere")
    else:
        (tmp_path / ("s_grid.png" if make == "grid-is-folder" else "s.json")).mkdir()
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    with pytest.raises(ValueError, match="^--name s: .*choose another --name"):
        SampleSet(tmp_path, "s")
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before
    assert kept.read_text() == "data"


def test_cli_refuses_a_name_that_is_a_user_folder(tmp_path, capsys):
    (tmp_path / "mydir").mkdir()
    (tmp_path / "mydir" / "notes.txt").write_text("keep me")
    assert main(["sample", "--n", "2", "--steps", "2", "--out", str(tmp_path), "--name", "mydir", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--name mydir" in err
    assert (tmp_path / "mydir" / "notes.txt").read_text() == "keep me"


def test_published_folder_is_shareable(tmp_path):
    old = os.umask(0o022)
    try:
        save_samples(IMAGES, tmp_path, {}, "s")
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "s").stat().st_mode)
    assert mode & 0o055 == 0o055, oct(mode)  # others can list and read it, as they can the grid beside it


def test_an_out_that_cannot_be_made_is_named(tmp_path):
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file", tmp_path / "file" / "below", Path("/proc/fastdiff-test")):
        with pytest.raises(ValueError, match=f"^--out {out}: "):
            SampleSet(out, "s")
