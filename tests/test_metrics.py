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


pytestmark = pytest.mark.usefixtures("one_torch_thread")


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


def test_inception_score_bounds():
    from fastdiff.metrics import inception_score

    one_class = np.tile(np.eye(10)[:1], (50, 1))
    balanced = np.eye(10)[np.arange(50) % 10]
    assert inception_score(one_class) == pytest.approx(1.0)
    assert inception_score(balanced) == pytest.approx(10.0, rel=1e-6)
    assert inception_score(np.full((50, 10), 0.1)) == pytest.approx(1.0)


def test_fid_interval_contains_the_estimate_and_separates_sets():
    from fastdiff.metrics import fid, fid_interval

    rng = np.random.default_rng(0)
    a, b, far = rng.normal(size=(300, 8)), rng.normal(size=(300, 8)), rng.normal(1.0, 1.0, size=(300, 8))
    lo, hi = fid_interval(a, b, rounds=100)
    assert lo <= fid(a, b) <= hi
    flo, _ = fid_interval(far, b, rounds=100)
    assert flo > hi  # a shifted set is told apart from a same-distribution one


def test_paired_fidelity():
    from fastdiff.metrics import paired_fidelity

    x = np.linspace(-1, 1, 100).reshape(1, 1, 10, 10)
    assert paired_fidelity(x, x) == {"psnr_db": float("inf"), "max_abs_diff": 0.0}
    got = paired_fidelity(x + 0.01, x)
    assert got["max_abs_diff"] == pytest.approx(0.01) and got["psnr_db"] == pytest.approx(10 * np.log10(4 / 1e-4))
    with pytest.raises(ValueError, match="shape"):
        paired_fidelity(x, x[:, :, :5])


def test_nll_tells_digits_from_noise():
    """bits/dim of the held-out digits under the shipped model is far below that of uniform noise, and the
    stratified estimate agrees with the full sum on a short schedule."""
    import torch

    from fastdiff.checkpoint import BUNDLED_MODEL, load_model
    from fastdiff.data import load_digits
    from fastdiff.likelihood import bits_per_dim

    model, schedule, _ = load_model(BUNDLED_MODEL)
    digits = load_digits(16, "test").images[:32]
    real = bits_per_dim(model, schedule, digits, timesteps=8)
    noise = bits_per_dim(model, schedule, torch.rand_like(digits) * 2 - 1, timesteps=8)
    assert 0 < real["bits_per_dim"] < noise["bits_per_dim"] - 3
    assert real["timesteps"] == 8 and real["n"] == 32


def test_nll_full_sum_vs_stratified_on_a_short_schedule():
    import torch

    from fastdiff.likelihood import bits_per_dim
    from fastdiff.nn.unet import UNet
    from fastdiff.schedule import NoiseSchedule

    from conftest import TINY

    torch.manual_seed(0)
    model = UNet(TINY).eval()
    schedule = NoiseSchedule(num_train_timesteps=20)
    x = torch.rand(16, 1, 8, 8) * 2 - 1
    full = bits_per_dim(model, schedule, x)
    assert full["timesteps"] == 19
    estimates = [bits_per_dim(model, schedule, x, timesteps=5, seed=s)["bits_per_dim"] for s in range(6)]
    assert abs(np.mean(estimates) - full["bits_per_dim"]) < 0.15 * full["bits_per_dim"]
    with pytest.raises(ValueError, match="timesteps"):
        bits_per_dim(model, schedule, x, timesteps=20)


def test_fid_of_few_samples_warns_nothing():
    import warnings

    import numpy as np

    from fastdiff.metrics import frechet_distance

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((4, 16)), rng.standard_normal((4, 16))  # 4 samples: singular 16x16 covariances,
    a[:, :8] = b[:, :8] = 0.0  # with dead (always zero) features, as ReLU features of a few images have
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        d = frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert np.isfinite(d) and d > 0
