"""ONNX export, the torch-free runtime and INT8 quantization."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from fastdiff import ops
from fastdiff.checkpoint import load_model
from fastdiff.cli import main
from fastdiff.data import load_digits
from fastdiff.export.onnx import export_model, export_onnx
from fastdiff.export.quantize import quantize
from fastdiff.export.runtime import OnnxSampler, step
from fastdiff.nn.unet import UNet, preset
from fastdiff.engine import generate
from fastdiff.schedule import NoiseSchedule, StepCoefs
from fastdiff.train import TrainConfig, Trainer

from conftest import TINY

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).with_name("golden_normals.json")
T = 100


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _train(out: Path, num_classes: int, prediction_type: str) -> Path:
    cfg = TINY if not num_classes else type(TINY)(**{**TINY.to_dict(), "num_classes": num_classes})
    schedule = NoiseSchedule(num_train_timesteps=T, prediction_type=prediction_type)
    trainer = Trainer(load_digits(8), cfg, schedule, TrainConfig(steps=2, batch_size=8, warmup=1), out)
    trainer.fit(progress=False)
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """{'uncond' | 'cond': (run folder, model.onnx)} of two tiny models trained for 2 steps."""
    root = tmp_path_factory.mktemp("export")
    runs = {"uncond": _train(root / "uncond", 0, "epsilon"), "cond": _train(root / "cond", 10, "v_prediction")}
    return {k: (run, export_onnx(run, root / f"{k}" / "onnx" / "model.onnx")) for k, run in runs.items()}


# --- export -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["uncond", "cond"])
def test_export_single_checked_file_with_metadata(exported, kind):
    run, path = exported[kind]
    assert [p.name for p in path.parent.iterdir()] == ["model.onnx"]  # no external .data side file
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    meta = {p.key: p.value for p in proto.metadata_props}
    _, schedule, config = load_model(run)
    assert meta["fastdiff.format"] == "fastdiff-denoiser" and meta["fastdiff.version"]
    assert json.loads(meta["fastdiff.schedule"]) == schedule.to_dict()
    assert json.loads(meta["fastdiff.image_shape"]) == [1, 8, 8]
    assert int(meta["fastdiff.num_classes"]) == config["model"]["num_classes"]
    names = [i.name for i in proto.graph.input]
    assert names == (["x", "t", "y"] if kind == "cond" else ["x", "t"])
    for i in proto.graph.input:
        assert i.type.tensor_type.shape.dim[0].dim_param  # symbolic batch
    assert [o.name for o in proto.graph.output] == ["out"]


@pytest.mark.parametrize("kind", ["uncond", "cond"])
def test_onnx_matches_pytorch(exported, kind):
    run, path = exported[kind]
    model, _, _ = load_model(run)
    runner = OnnxSampler(path)
    g = torch.Generator().manual_seed(1)
    for batch, ts in ((1, [0]), (1, [T - 1]), (3, [1, T // 2, T - 1]), (8, [0, 1, 7, 30, 50, 63, 98, 99])):
        x = torch.randn(batch, 1, 8, 8, generator=g)
        tt = torch.tensor(ts)
        y = torch.randint(-1, 10, (batch,), generator=g) if kind == "cond" else None
        with torch.no_grad():
            ref = model(x, tt, y).numpy()
        got = runner.predict(x.numpy(), tt.numpy(), None if y is None else y.numpy())
        assert np.abs(got - ref).max() <= 1e-4, (batch, ts)


def test_export_options(exported, tmp_path):
    run, _ = exported["uncond"]
    with pytest.raises(ValueError, match="opset"):
        export_onnx(run, tmp_path / "m.onnx", opset=13)
    path = export_onnx(run, tmp_path / "half.onnx", opset=18, fp16=True)
    runner = OnnxSampler(path)
    assert runner.precision == "fp16" and runner.input_dtype == np.float32  # fp16 inside, float32 I/O
    model, _, _ = load_model(run)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 90])
    with torch.no_grad():
        ref = model(x, t).numpy()
    assert np.abs(runner.predict(x.numpy(), t.numpy()) - ref).max() < 2e-2
    with pytest.raises(FileNotFoundError):
        export_onnx(tmp_path / "missing", tmp_path / "m.onnx")


def test_cli_export(exported, tmp_path, capsys):
    run, _ = exported["uncond"]
    assert main(["export", "--ckpt", str(run), "--out", str(tmp_path / "cli.onnx")]) == 0
    assert OnnxSampler(tmp_path / "cli.onnx").num_train_timesteps == T
    assert main(["export", "--ckpt", str(tmp_path / "nope"), "--out", str(tmp_path / "x.onnx")]) == 2
    assert "no checkpoint" in capsys.readouterr().err


# --- runtime ------------------------------------------------------------------------------------
def test_reverse_step_is_the_kernel_math():
    g = torch.Generator().manual_seed(0)
    x, m = torch.randn(3, 1, 8, 8, generator=g) * 2, torch.randn(3, 1, 8, 8, generator=g)
    x[0, 0, 0, 0] = float("nan")
    seeds = torch.tensor([5, 6, -7])
    for coefs in (StepCoefs(1.3, -0.7, 1.0, 0.4, 0.3, 0.2, 0.15), StepCoefs(0.9, 0.1, float("inf"), 0.5, 0.5, 0.0, 0.0)):
        ref = ops.reverse_step_reference(x, m, seeds, 42, coefs).numpy()
        got = step(x.numpy(), m.numpy(), seeds.numpy(), 42, coefs)
        np.testing.assert_array_equal(got, ref)  # bit for bit, NaN included


CASES = [
    ("uncond", dict(sampler="ddim", steps=5)),
    ("uncond", dict(sampler="ddim", steps=5, eta=1.0, spacing="trailing")),
    ("uncond", dict(sampler="ddpm", steps=4, variance_type="fixed_large")),
    ("cond", dict(sampler="ddim", steps=4, classes=3, guidance=2.5, eta=0.5)),
    ("cond", dict(sampler="ddpm", steps=3, classes=[0, 1, 9, -1, 4], guidance=3.0, clip_sample=False)),
    ("uncond", dict(sampler="dpmpp-2m", steps=5)),
    ("cond", dict(sampler="dpmpp-2m-sde", steps=4, classes=2, guidance=2.0, final_sigmas_type="sigma_min")),
]


@pytest.mark.parametrize("kind,kw", CASES)
def test_sample_matches_pytorch_generate(exported, kind, kw):
    run, path = exported[kind]
    model, schedule, _ = load_model(run)
    got = OnnxSampler(path).sample(5, seed=11, batch_size=2, **kw)
    ref = generate(model, schedule, (1, 8, 8), 5, seed=11, num_classes=model.config.num_classes, **kw).numpy()
    assert got.dtype == np.float32 and got.shape == (5, 1, 8, 8)
    assert np.abs(got - ref).max() <= 1e-4


def test_sample_argument_errors(exported):
    uncond, cond = OnnxSampler(exported["uncond"][1]), OnnxSampler(exported["cond"][1])
    with pytest.raises(ValueError, match="unconditional"):
        uncond.sample(2, steps=2, classes=1)
    with pytest.raises(ValueError, match="guidance"):
        cond.sample(2, steps=2, guidance=2.0)
    with pytest.raises(ValueError, match="class id"):
        cond.sample(2, steps=2, classes=10)
    with pytest.raises(ValueError, match="steps"):
        uncond.sample(2, steps=T + 1)
    with pytest.raises(ValueError, match="sampler"):
        uncond.sample(2, sampler="euler")
    with pytest.raises(ValueError, match="n "):
        uncond.sample(0)


def test_nan_model_output_names_timestep(tmp_path):
    torch.manual_seed(0)
    model = UNet(TINY).eval()
    with torch.no_grad():
        model.out[2].bias.fill_(float("nan"))
    path = export_model(model, NoiseSchedule(num_train_timesteps=T), tmp_path / "nan.onnx")
    with pytest.raises(FloatingPointError, match="timestep 80"):
        OnnxSampler(path).sample(1, steps=5)


TORCH_FREE = r"""
import json, sys
sys.modules["torch"] = None  # any `import torch` now fails
import numpy as np
from fastdiff.export.runtime import OnnxSampler
from fastdiff.noise import gaussian
golden = json.load(open(sys.argv[2]))["cases"]
groups = {}
for c in golden:
    groups.setdefault((c["seed"], c["step"]), []).append((c["index"], int(c["bits"], 16)))
bad = 0
for (seed, step), cases in groups.items():
    n = max(i for i, _ in cases) + 1
    bits = gaussian(np.array([seed], dtype=np.int64), step, n)[0].view(np.uint32)
    bad += sum(int(bits[i]) != b for i, b in cases)
runner = OnnxSampler(sys.argv[1])
x = runner.sample(3, sampler="ddim", steps=4, seed=5, eta=1.0)
print(json.dumps({"golden_cases": len(golden), "golden_bad": bad, "provider": runner.provider,
                  "sample": x.tolist(), "torch_loaded": sys.modules["torch"] is not None}))
"""


def test_runtime_without_torch(exported):
    run, path = exported["uncond"]
    res = subprocess.run([sys.executable, "-c", TORCH_FREE, str(path), str(GOLDEN)], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["golden_cases"] > 0 and out["golden_bad"] == 0  # NumPy normals equal the golden vector bit for bit
    assert not out["torch_loaded"] and out["provider"] == "CPUExecutionProvider"
    model, schedule, _ = load_model(run)
    ref = generate(model, schedule, (1, 8, 8), 3, seed=5, sampler="ddim", steps=4, eta=1.0).numpy()
    assert np.abs(np.array(out["sample"], dtype=np.float32) - ref).max() <= 1e-4


# --- bad inputs ---------------------------------------------------------------------------------
def _identity_model(path: Path) -> Path:
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 1, 8, 8])
    out = onnx.helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, ["batch", 1, 8, 8])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["out"])], "g", [x], [out])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, str(path))
    return path


def test_bad_files(exported, tmp_path):
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model\n")
    with pytest.raises(ValueError, match="not a valid ONNX model"):
        OnnxSampler(text)
    with pytest.raises(ValueError, match="not a fastdiff model"):
        OnnxSampler(_identity_model(tmp_path / "plain.onnx"))
    with pytest.raises(FileNotFoundError):
        OnnxSampler(tmp_path / "missing.onnx")

    proto = onnx.load(str(exported["uncond"][1]))
    for i in proto.graph.input:
        i.type.tensor_type.shape.dim[0].dim_value = 2  # bake a static batch in
    onnx.save(proto, str(tmp_path / "static.onnx"))
    with pytest.raises(ValueError, match="static batch axis"):
        OnnxSampler(tmp_path / "static.onnx")

    proto = onnx.load(str(exported["uncond"][1]))
    meta = [p for p in proto.metadata_props if p.key != "fastdiff.schedule"]
    del proto.metadata_props[:]
    proto.metadata_props.extend(meta)
    onnx.save(proto, str(tmp_path / "nosched.onnx"))
    with pytest.raises(ValueError, match="missing fastdiff.schedule"):
        OnnxSampler(tmp_path / "nosched.onnx")

    proto = onnx.load(str(exported["cond"][1]))  # claims to be unconditional but has a y input
    for p in proto.metadata_props:
        if p.key == "fastdiff.num_classes":
            p.value = "0"
    onnx.save(proto, str(tmp_path / "inputs.onnx"))
    with pytest.raises(ValueError, match="unexpected inputs"):
        OnnxSampler(tmp_path / "inputs.onnx")


def test_predict_checks_inputs(exported):
    runner = OnnxSampler(exported["cond"][1])
    x, t = np.zeros((2, 1, 8, 8), np.float32), np.array([1, 2])
    assert runner.predict(x, t).shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match="shape"):
        runner.predict(np.zeros((2, 1, 16, 16), np.float32), t)
    with pytest.raises(ValueError, match="float32"):
        runner.predict(x.astype(np.float64), t)
    with pytest.raises(ValueError, match="integer"):
        runner.predict(x, t.astype(np.float32))
    with pytest.raises(ValueError, match="one timestep per sample"):
        runner.predict(x, np.array([1, 2, 3]))
    with pytest.raises(ValueError, match=r"t must be in \[0, 99\]"):
        runner.predict(x, np.array([0, T]))
    with pytest.raises(ValueError, match="class id"):
        runner.predict(x, t, np.array([0, 10]))


# --- quantization -------------------------------------------------------------------------------
def test_quantize_digits_preset(tmp_path):
    torch.manual_seed(0)
    fp32 = export_model(UNet(preset("digits")).eval(), NoiseSchedule(), tmp_path / "model.onnx")
    out = tmp_path / "model.int8.onnx"
    report = quantize(fp32, out, calib_size=32, eval_per_band=8, repeats=2, verbose=False)
    assert report["size_ratio"] <= 0.35 and out.stat().st_size <= 0.35 * fp32.stat().st_size
    saved = json.loads(Path(f"{out}.report.json").read_text())
    assert saved["size_ratio"] == report["size_ratio"] and set(saved["latency_ms"]) == {"batch1", "batch16"}
    assert "| t |" in Path(f"{out}.report.md").read_text()
    assert len(report["error_bands"]) == 4
    assert all(b["rel_rmse"] < 0.5 for b in report["error_bands"])
    runner = OnnxSampler(out)  # the INT8 file keeps the metadata and the dynamic batch
    assert runner.image_shape == (1, 16, 16) and runner.sample(2, steps=2).shape == (2, 1, 16, 16)


@pytest.mark.parametrize("method,dynamic", [("entropy", False), ("percentile", False), ("minmax", True)])
def test_quantize_methods(exported, tmp_path, method, dynamic):
    _, path = exported["cond"]
    out = tmp_path / "q.onnx"
    report = quantize(path, out, method=method, dynamic=dynamic, calib_size=16, eval_per_band=4, repeats=1,
                      verbose=False)
    assert report["method"] == ("dynamic" if dynamic else method)
    x, t, y = np.random.default_rng(0).standard_normal((3, 1, 8, 8)).astype(np.float32), np.array([1, 50, 99]), None
    a, b = OnnxSampler(path).predict(x, t, y), OnnxSampler(out).predict(x, t, y)
    assert np.sqrt(np.mean((a - b) ** 2)) < 0.5 * np.sqrt(np.mean(a**2)) + 1e-3


def test_cli_quantize_errors(exported, tmp_path, capsys):
    assert main(["quantize", "--onnx", str(tmp_path / "none.onnx"), "--out", str(tmp_path / "q.onnx")]) == 2
    assert "no such file" in capsys.readouterr().err
    _, path = exported["uncond"]
    assert main(["quantize", "--onnx", str(path), "--out", str(tmp_path / "q.onnx"), "--calib-size", "0"]) == 2
    assert "--calib-size" in capsys.readouterr().err
