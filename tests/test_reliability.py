"""Nothing escapes, nothing is lost, nothing is mixed: interrupts, locks, debris, unwritable folders, one-line errors
(each guarantee is listed in docs/reliability.md beside the test that holds it)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fastdiff import checkpoint
from fastdiff.cli import main
from fastdiff.files import FolderLock

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TRAIN = [sys.executable, "-m", "fastdiff", "train", "--preset", "digits", "--quiet", "--batch-size", "4"]


def _wait_for(predicate, timeout: float = 120.0) -> None:
    end = time.time() + timeout
    while not predicate():
        if time.time() > end:
            raise TimeoutError("condition not reached")
        time.sleep(0.2)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_training_saves_and_resumes(tmp_path, sig):
    """Ctrl-C (or SIGTERM) saves a checkpoint at the current step and prints one line with the resume command;
    --resume continues from exactly that step."""
    out = tmp_path / "run"
    proc = subprocess.Popen([*TRAIN, "--steps", "100000", "--ckpt-every", "3", "--out", str(out)], env=ENV,
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: (out / checkpoint.WEIGHTS).exists())  # training is under way
        time.sleep(1)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    line = [x for x in err.splitlines() if "interrupted" in x]
    assert len(line) == 1 and "Traceback" not in err, err
    step = int(line[0].split("checkpoint saved at step ")[1].split()[0])
    assert step >= 1 and "--resume" in line[0]
    _, _, meta = checkpoint.load(out)
    assert meta["step"] == step
    rc = subprocess.run([*TRAIN, "--steps", str(step + 2), "--out", str(out), "--resume"], env=ENV, timeout=300,
                        capture_output=True, text=True)
    assert rc.returncode == 0, rc.stderr
    assert checkpoint.load(out)[2]["step"] == step + 2


def test_second_trainer_on_one_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    with FolderLock(out):
        assert main(["train", "--steps", "1", "--out", str(out), "--quiet"]) == 2
    assert "another process is writing" in capsys.readouterr().err
    assert not (out / checkpoint.WEIGHTS).exists()


def test_stale_temp_files_are_removed_when_the_run_is_opened(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--steps", "1", "--out", str(out), "--quiet", "--batch-size", "4"]) == 0
    debris = [out / ".checkpoint.safetensors.abc123.tmp", out / ".config.json.x.tmp"]
    for f in debris:
        f.write_bytes(b"half a checkpoint")
    assert main(["train", "--steps", "2", "--out", str(out), "--quiet", "--batch-size", "4", "--resume"]) == 0
    assert not any(f.exists() for f in debris)


def test_unwritable_out_is_refused_before_training(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["train", "--steps", "1", "--out", str(blocker / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and len(err.strip().splitlines()) == 1


def test_resume_of_weights_only_checkpoint(tmp_path, capsys):
    import shutil

    run = tmp_path / "shipped"
    shutil.copytree(checkpoint.BUNDLED_MODEL, run)
    assert main(["train", "--steps", "1", "--out", str(run), "--resume", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "weights only, no training state" in err and len(err.strip().splitlines()) == 1


def test_sample_set_replaced_as_a_whole(tmp_path):
    """4 images, then 2 into the same name: the folder holds exactly the 2 the sidecar describes."""
    out = tmp_path / "so"
    assert main(["sample", "--n", "4", "--steps", "2", "--out", str(out), "--quiet"]) == 0
    assert main(["sample", "--n", "2", "--steps", "2", "--out", str(out), "--quiet"]) == 0
    info = json.loads((out / "ddim-2.json").read_text())
    assert info["count"] == 2 == len(list((out / "ddim-2").glob("*.png")))
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_interrupted_sample_leaves_no_partial_set(tmp_path, monkeypatch, capsys):
    from fastdiff import images

    calls = {"n": 0}
    real_add = images.SampleSet.add

    def add(self, batch, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        real_add(self, batch, *args, **kwargs)

    monkeypatch.setattr(images.SampleSet, "add", add)
    out = tmp_path / "so"
    assert main(["sample", "--n", "4", "--batch-size", "2", "--steps", "2", "--out", str(out), "--quiet"]) == 130
    assert capsys.readouterr().err.strip().endswith("interrupted")
    assert sorted(p.name for p in out.iterdir()) == []


@pytest.mark.parametrize("argv,culprit", [
    (["sample", "--out", "/dev/null/x", "--n", "1", "--steps", "1"], "/dev/null"),
    (["sample", "--name", "../../escaped", "--n", "1", "--steps", "1"], "--name"),
    (["sample", "--timesteps", "5"], None),
    (["train", "--timesteps", "1000000000000", "--steps", "1"], "num_train_timesteps"),
    (["train", "--image-size", "0", "--steps", "1"], "--image-size"),
    (["train", "--lr", "inf", "--steps", "1"], "lr"),
    (["export", "--out", "/dev/null/m.onnx"], "/dev/null"),
])
def test_one_line_errors(tmp_path, capsys, argv, culprit):
    argv = [a if not a.startswith("/dev/null") else a for a in argv]
    try:
        rc = main(argv + (["--out", str(tmp_path / "o")] if "--out" not in argv and argv[0] != "export" else []))
    except SystemExit as e:  # argparse: unknown option
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    if culprit:
        assert culprit in err.strip().splitlines()[-1]


def test_config_json_that_is_a_folder(tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(checkpoint.BUNDLED_MODEL, run)
    (run / checkpoint.CONFIG).unlink()
    (run / checkpoint.CONFIG).mkdir()
    assert main(["sample", "--ckpt", str(run), "--n", "1", "--steps", "1", "--out", str(tmp_path / "o")]) == 2
    assert "config.json" in capsys.readouterr().err


def test_closed_stdout_is_silent():
    proc = subprocess.run(f"{sys.executable} -m fastdiff info | head -c0", shell=True, capture_output=True, text=True,
                          timeout=120, env=ENV)
    assert proc.stderr == ""


def test_decompression_bomb_png_is_refused(tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("L", (12000, 12000)).save(folder / "bomb.png", optimize=True)  # 144 M pixels, a few KB on disk
    assert main(["train", "--data", str(folder), "--steps", "1", "--out", str(tmp_path / "r"), "--quiet"]) == 2
    assert "bomb.png" in capsys.readouterr().err


def test_hand_edited_timesteps_in_config_json(tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(checkpoint.BUNDLED_MODEL, run)
    config = json.loads((run / checkpoint.CONFIG).read_text())
    config["schedule"]["num_train_timesteps"] = 10**12
    (run / checkpoint.CONFIG).write_text(json.dumps(config))
    assert main(["sample", "--ckpt", str(run), "--n", "1", "--out", str(tmp_path / "o")]) == 2
    assert "num_train_timesteps" in capsys.readouterr().err


def test_npz_of_strings_and_npy(tmp_path, capsys):
    np.savez(tmp_path / "s.npz", images=np.array(["a", "b"]))
    np.save(tmp_path / "a.npy", np.zeros((2, 8, 8)))
    for data in ("s.npz", "a.npy"):
        assert main(["train", "--data", str(tmp_path / data), "--steps", "1", "--out", str(tmp_path / "r"),
                     "--quiet"]) == 2
        assert "--data" in capsys.readouterr().err


def test_nothing_written_outside_out(tmp_path):
    before = set(Path(tmp_path).iterdir())
    main(["sample", "--out", str(tmp_path / "o"), "--name", "../../escaped", "--n", "1", "--steps", "1"])
    assert set(Path(tmp_path).iterdir()) - before <= {tmp_path / "o"}
    assert not (tmp_path.parent / "escaped").exists()


def test_kill_9_at_random_moments_never_leaves_an_unloadable_run(tmp_path):
    """SIGKILL while checkpoints are being written (every step here): the run folder always loads and resumes."""
    import random

    out = tmp_path / "run"
    rng = random.Random(0)
    for attempt in range(3):
        proc = subprocess.Popen([*TRAIN, "--steps", "100000", "--ckpt-every", "1", "--out", str(out),
                                 *(["--resume"] if attempt else [])], env=ENV, stderr=subprocess.DEVNULL)
        try:
            _wait_for(lambda: (out / checkpoint.WEIGHTS).exists())
            time.sleep(rng.uniform(0.1, 2.0))
        finally:
            proc.kill()
            proc.wait(timeout=60)
        _, tensors, meta = checkpoint.load(out)  # never a torn file
        assert meta["step"] >= 1 and "rng.gen" in tensors
