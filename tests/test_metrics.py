import json
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch

from fastdiff import metrics
from fastdiff.cli import main
from fastdiff.data import load_digits
from fastdiff.schedule import NoiseSchedule
from fastdiff.train import TrainConfig, Trainer

from conftest import TINY

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread: with other jobs on the (2) cores, more threads spin-wait and run ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gaussian(n: int, mean: float, std: np.ndarray, seed: int) -> np.ndarray:
    return mean + np.random.default_rng(seed).standard_normal((n, len(std))) * std


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_a_shift():
    a = gaussian(500, 0.0, np.ones(8), 0)
    assert metrics.fid(a, a) == pytest.approx(0.0, abs=1e-6)
    shifts = [metrics.fid(a, a + s) for s in (0.5, 1.0, 2.0)]
    assert shifts == pytest.approx([8 * 0.25, 8 * 1.0, 8 * 4.0], rel=1e-6)  # a pure shift adds |d|² exactly


def test_frechet_distance_matches_the_closed_form_for_gaussians():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    s1, s2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(s1) - np.sqrt(s2)) ** 2).sum()  # diagonal covariances
    assert metrics.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-9)
    # and from samples of those Gaussians, within sampling error
    a = mu1 + gaussian(20000, 0.0, np.sqrt(s1), 1)
    b = mu2 + gaussian(20000, 0.0, np.sqrt(s2), 2)
    assert metrics.fid(a, b) == pytest.approx(expected, rel=0.03)


def test_kid_near_zero_for_one_distribution_and_positive_for_two():
    a, b = gaussian(400, 0.0, np.ones(16), 3), gaussian(400, 0.0, np.ones(16), 4)
    same, same_std = metrics.kid(a, b, subsets=20)
    far, _ = metrics.kid(a, b + 1.0, subsets=20)
    assert abs(same) < 3 * same_std + 1e-3 and far > 0.1 > abs(same)


@pytest.mark.parametrize("a, b", [(np.zeros((1, 4)), np.zeros((5, 4))), (np.zeros((5, 4)), np.zeros((5, 3)))])
def test_bad_feature_sets(a, b):
    with pytest.raises(ValueError):
        metrics.fid(a, b)


def test_shipped_classifier_accuracy_and_confidence():
    assert metrics.classifier_accuracy() >= 0.96  # 0.976 as shipped
    test = load_digits(8, "test").images  # resized 8 → 16 inside
    assert metrics.confident_fraction(test) > 0.9
    noise = torch.randn(200, 1, 16, 16, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    assert metrics.confident_fraction(noise) < 0.1
    assert metrics.features(test[:5]).shape == (5, metrics.FEATURE_DIM)
    result = metrics.evaluate(test)
    assert result["fid"] == pytest.approx(0.0, abs=1e-6) and sum(result["class_histogram"]) == len(test)
    floor = metrics.real_floor(200)
    assert 0 < floor["fid"] < metrics.evaluate(noise)["fid"] / 10


def test_classifier_script_is_deterministic(tmp_path):
    script = runpy.run_path(str(ROOT / "scripts" / "train_classifier.py"), run_name="train_classifier")
    for name in ("a", "b"):
        assert script["main"](["--epochs", "1", "--out", str(tmp_path / name / "c.safetensors")]) == 0
    a, b = ((tmp_path / name / "c.safetensors").read_bytes() for name in ("a", "b"))
    assert a == b
    assert json.loads((tmp_path / "a" / "c.json").read_text())["epochs"] == 1


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny")
    Trainer(load_digits(8), TINY, NoiseSchedule(), TrainConfig(steps=2, batch_size=8), out).fit(progress=False)
    return out


def test_eval_quick_writes_the_table(tiny_ckpt, tmp_path):
    out = tmp_path / "eval"
    # --quick as CI runs it, made smaller still (fewer samples and steps) for this shared 2-core machine
    assert main(["eval", "--ckpt", str(tiny_ckpt), "--out", str(out), "--quick", "--n", "12", "--quiet",
                 "--steps", "2,4", "--ddpm-steps", "3", "--threads", "1"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in results["rows"]] == ["ddim-2-eta0", "ddim-4-eta0", "ddim-2-eta1", "ddim-4-eta1",
                                                    "ddpm-3"]
    assert all(r["fid"] > 0 and r["seconds"] > 0 and 0 <= r["confident"] <= 1 for r in results["rows"])
    assert results["n"] == 12 and results["floor"]["n"] == 12
    md = (out / "results.md").read_text()
    assert "| DDIM η = 0 |" in md and "real vs real (floor)" in md
    assert (out / "fid_vs_steps.png").stat().st_size > 0 and (out / "grids" / "ddpm-3.png").exists()


def test_eval_onnx_row(tiny_ckpt, tmp_path):
    pytest.importorskip("onnxruntime")
    from fastdiff.export.onnx import export_onnx

    model = export_onnx(tiny_ckpt, tmp_path / "tiny.onnx")
    out = tmp_path / "eval"
    assert main(["eval", "--ckpt", str(tiny_ckpt), "--out", str(out), "--n", "8", "--quiet", "--threads", "1",
                 "--steps", "2", "--etas", "0", "--ddpm-steps", "", "--onnx", str(model)]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["name"] for r in rows] == ["ddim-2-eta0", "onnx-fp32-ddim-50"]
    assert "| ONNX FP32 (DDIM η = 0) | – |" in (out / "results.md").read_text()


@pytest.mark.parametrize("args, message", [
    (["--steps", "", "--ddpm-steps", ""], "nothing to evaluate"),
    (["--n", "1"], "--n must be >= 2"),
    (["--steps", "2000"], "steps must be in"),
    (["--onnx", "missing.onnx"], "no such file"),
    (["--onnx", "__garbage__"], "not a readable"),
])
def test_eval_bad_input(tiny_ckpt, tmp_path, capsys, args, message):
    if "__garbage__" in args:
        pytest.importorskip("fastdiff.export.runtime")
        (tmp_path / "bad.onnx").write_bytes(b"not onnx")
        args = ["--onnx", str(tmp_path / "bad.onnx")]
    assert main(["eval", "--ckpt", str(tiny_ckpt), "--out", str(tmp_path), "--quick", "--quiet", *args]) == 2
    assert message in capsys.readouterr().err


def test_eval_missing_checkpoint(tmp_path, capsys):
    assert main(["eval", "--ckpt", str(tmp_path / "nope"), "--out", str(tmp_path), "--quick"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
