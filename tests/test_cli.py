import json

import pytest
from PIL import Image

from fastdiff.cli import main


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["train", "--steps", "3", "--batch-size", "8", "--image-size", "8", "--out", str(out), "--quiet"]) == 0
    return out


def test_train_writes_checkpoint_and_summary(run_dir):
    assert (run_dir / "checkpoint.safetensors").exists() and (run_dir / "loss.png").exists()
    assert json.loads((run_dir / "train_summary.json").read_text())["steps"] == 3
    assert json.loads((run_dir / "config.json").read_text())["model"]["image_size"] == 8


def test_train_refuses_to_overwrite_without_resume(run_dir, capsys):
    assert main(["train", "--steps", "3", "--image-size", "8", "--out", str(run_dir), "--quiet"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["train", "--steps", "4", "--batch-size", "8", "--image-size", "8", "--out", str(run_dir),
                 "--resume", "--quiet"]) == 0


@pytest.mark.parametrize("args", [["--sampler", "ddim", "--steps", "5", "--eta", "0.5"],
                                  ["--sampler", "ddpm", "--steps", "4", "--spacing", "trailing"],
                                  ["--sampler", "ddim", "--steps", "6", "--clipped-eps"]])
def test_sample_writes_pngs_grid_and_sidecar(run_dir, tmp_path, args):
    assert main(["sample", "--ckpt", str(run_dir), "--n", "5", "--out", str(tmp_path), "--quiet", *args]) == 0
    name = f"{args[1]}-{args[3]}"
    assert len(list((tmp_path / name).glob("*.png"))) == 5
    assert Image.open(tmp_path / f"{name}_grid.png").size[0] > 8
    info = json.loads((tmp_path / f"{name}.json").read_text())
    assert info["sampler"] == args[1] and info["steps"] == int(args[3]) and info["count"] == 5


def test_info(capsys):
    assert main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["step_backend"] in ("extension", "reference") and "torch" in info


@pytest.mark.parametrize("args,match", [
    (["sample", "--ckpt", "/nonexistent/run"], "no checkpoint"),
    (["sample", "--steps", "0"], "steps"),
    (["sample", "--eta", "-1"], "eta"),
    (["sample", "--guidance", "3", "--class", "7"], "unconditional"),
    (["train", "--data", "/nonexistent/folder", "--steps", "1"], "no such file"),
    (["sample", "--sampler", "ddpm", "--clipped-eps"], "ddim only"),
])
def test_clear_errors(run_dir, capsys, args, match):
    if args[0] == "sample" and "--ckpt" not in args:
        args = [*args, "--ckpt", str(run_dir)]
    assert main([*args, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err


def test_unknown_sampler_is_rejected_by_argparse(capsys):
    with pytest.raises(SystemExit):
        main(["sample", "--sampler", "euler"])
    assert "invalid choice" in capsys.readouterr().err


def test_sample_uses_the_shipped_model_by_default(tmp_path):
    assert main(["sample", "--n", "3", "--steps", "4", "--out", str(tmp_path), "--quiet"]) == 0
    info = json.loads((tmp_path / "ddim-4.json").read_text())
    assert info["source"].endswith("assets/digits") and Image.open(tmp_path / "ddim-4" / "0000.png").size == (16, 16)
