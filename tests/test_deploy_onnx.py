"""The ONNX deployment path refuses hostile or foreign files in one line: bounded metadata, checked outputs, ONNX
files that must belong to `eval`'s checkpoint, a damaged engine cache repaired once, sane threads and providers."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from fastdiff import distributed, runtimes
from fastdiff.cli import main
from fastdiff.data import load_digits
from fastdiff.export.metadata import KEY_WEIGHTS
from fastdiff.export.onnx import export_onnx
from fastdiff.export.runtime import OnnxSampler, load_error
from fastdiff.nn.unet import UNet
from fastdiff.onnx_export import weights_digest
from fastdiff.schedule import NoiseSchedule
from fastdiff.train import TrainConfig, Trainer

from conftest import TINY

pytestmark = pytest.mark.usefixtures("one_torch_thread")
T = 100


def refused(capsys, args: list[str], *matches: str) -> str:
    """A command that must end in status 2 and one `fastdiff <cmd>: error:` line holding every match."""
    assert main(args) == 2
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"fastdiff {args[0]}: error: "), lines
    assert all(m in lines[0] for m in matches), lines[0]
    return lines[0]


def _meta(shape, classes: int = 0) -> dict[str, str]:
    return {"fastdiff.format": "fastdiff-denoiser", "fastdiff.format_version": "1", "fastdiff.version": "0.1.0",
            "fastdiff.schedule": json.dumps(NoiseSchedule(num_train_timesteps=T).to_dict()),
            "fastdiff.image_shape": json.dumps(list(shape)), "fastdiff.num_classes": str(classes),
            "fastdiff.precision": "fp32"}


def fake_model(path: Path, kind: str = "identity", shape=(1, 8, 8), meta: dict | None = None) -> Path:
    """A hand-made graph with fastdiff metadata and inputs x [b, *shape], t [b]; its output by kind: identity (x),
    scalar (ReduceSum of x) or int64 (Shape of x)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", *shape])
    t = helper.make_tensor_value_info("t", TensorProto.INT64, ["b"])
    op, out_type, dims, attrs = {"identity": ("Identity", TensorProto.FLOAT, ["b", *shape], {}),
                                 "scalar": ("ReduceSum", TensorProto.FLOAT, [], {"keepdims": 0}),
                                 "int64": ("Shape", TensorProto.INT64, [4], {})}[kind]
    out = helper.make_tensor_value_info("out", out_type, dims)
    graph = helper.make_graph([helper.make_node(op, ["x"], ["out"], **attrs)], "g", [x, t], [out])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    for k, v in (meta or _meta(shape)).items():
        model.metadata_props.add(key=k, value=v)
    onnx.save(model, str(path))
    return path


def _train(out: Path, num_classes: int = 0, seed: int = 0) -> Path:
    cfg = type(TINY)(**{**TINY.to_dict(), "num_classes": num_classes})
    Trainer(load_digits(8), cfg, NoiseSchedule(num_train_timesteps=T),
            TrainConfig(steps=1, batch_size=8, warmup=1, seed=seed), out).fit(progress=False)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Three tiny run folders (unconditional, another seed of it, class-conditional) and an export of the first."""
    root = tmp_path_factory.mktemp("deploy")
    found = {"uncond": _train(root / "uncond"), "other": _train(root / "other", seed=1),
             "cond": _train(root / "cond", num_classes=10)}
    found["onnx"] = export_onnx(found["uncond"], root / "uncond.onnx")
    return found


# --- 1: hostile metadata is bounded before anything is allocated ------------------------------------------------
@pytest.mark.parametrize("shape,match", [
    ((1, 60000, 60000), "out of bounds"), ((1, 2, 2), "out of bounds"), ((64, 8, 8), "out of bounds"),
    ((1, 2048, 8), "out of bounds")])
def test_hostile_image_shape_is_refused_naming_the_file(tmp_path, capsys, shape, match):
    path = fake_model(tmp_path / "huge.onnx", shape=shape)
    with pytest.raises(ValueError, match=match) as e:
        OnnxSampler(path)
    assert str(path) in str(e.value) and "fastdiff.image_shape" in str(e.value)
    refused(capsys, ["sample", "--onnx", str(path), "--out", str(tmp_path / "s")], str(path), "out of bounds")
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("value", ["[1.5, 8, 8]", "[true, 8, 8]", "[1, 8]", "{}", "[1, 8, 8, 8]"])
def test_malformed_image_shape_is_refused(tmp_path, value):
    path = fake_model(tmp_path / "m.onnx", meta={**_meta((1, 8, 8)), "fastdiff.image_shape": value})
    with pytest.raises(ValueError, match="three integers"):
        OnnxSampler(path)


def test_hostile_class_count_and_precision_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"num_classes must be in \[0, 1000000\]"):
        OnnxSampler(fake_model(tmp_path / "c.onnx", meta={**_meta((1, 8, 8)), "fastdiff.num_classes": "1000000000000"}))
    with pytest.raises(ValueError, match="fastdiff.precision must be one of"):
        OnnxSampler(fake_model(tmp_path / "p.onnx", meta={**_meta((1, 8, 8)), "fastdiff.precision": "int3"}))


# --- 3: the model's output is checked at load and at every call ----------------------------------------------
@pytest.mark.parametrize("kind,match", [("scalar", "the output has shape []"), ("int64", "must be float32 or float16")])
def test_bad_declared_output_is_refused_at_load(tmp_path, capsys, kind, match):
    path = fake_model(tmp_path / f"{kind}.onnx", kind)
    with pytest.raises(ValueError, match=match.replace("[", r"\[").replace("]", r"\]")):
        OnnxSampler(path)
    refused(capsys, ["sample", "--onnx", str(path), "--out", str(tmp_path / "s"), "-n", "2", "--steps", "2"],
            str(path), match)
    assert not (tmp_path / "s").exists()


class _Session:
    """Stands for an ORT session whose graph returns `out` whatever it is fed (its declared shape passed the load)."""

    def __init__(self, out: np.ndarray):
        self.out = out

    def run(self, names, feed):
        return [self.out]


@pytest.mark.parametrize("out", [np.zeros((2, 1, 1, 1), np.float32), np.zeros((2, 1, 8, 8), np.int64)])
def test_output_of_another_shape_is_refused_at_the_first_call(tmp_path, out):
    sampler = OnnxSampler(fake_model(tmp_path / "ident.onnx"))
    sampler.session = _Session(out)
    with pytest.raises(ValueError, match=rf"ident.onnx: the model returned {out.dtype} .* for x of shape \(2, 1, 8, 8"):
        sampler.predict(np.zeros((2, 1, 8, 8), np.float32), 3)
    with pytest.raises(ValueError, match="ident.onnx: the model returned"):
        sampler.sample(2, steps=2)


def test_quantize_refuses_a_graph_with_nothing_to_quantize(tmp_path, capsys):
    path = fake_model(tmp_path / "ident.onnx", shape=(1, 16, 16))
    refused(capsys, ["quantize", "--onnx", str(path), "--out", str(tmp_path / "q.onnx"), "--calib-size", "8",
                     "--repeats", "1", "--paired-n", "0", "--quiet"], str(path), "nothing to quantize")
    assert not (tmp_path / "q.onnx").exists() and not (tmp_path / "q.onnx.report.json").exists()


# --- 2: eval's ONNX files must be exports of its checkpoint --------------------------------------------------
def test_export_records_the_weights_digest(runs):
    from fastdiff.checkpoint import load_model

    meta = {p.key: p.value for p in onnx.load(str(runs["onnx"])).metadata_props}
    assert meta[KEY_WEIGHTS] == weights_digest(load_model(runs["uncond"])[0])
    assert OnnxSampler(runs["onnx"]).weights_sha256 == meta[KEY_WEIGHTS]


@pytest.mark.parametrize("ckpt,flag,matches", [
    ("cond", "--onnx", ["a model of 0 classes", "the checkpoint has 10"]),
    (None, "--onnx", ["a model of [1, 8, 8] images", "the checkpoint's are [1, 16, 16]"]),
    ("other", "--onnx", ["other weights", "fastdiff.weights_sha256"]),
    ("other", "--onnx-int8", ["other weights"]),
])
def test_eval_refuses_onnx_files_of_another_model_before_sampling(capsys, tmp_path, monkeypatch, runs, ckpt, flag,
                                                                  matches):
    from fastdiff import engine
    from fastdiff.export import runtime

    monkeypatch.setattr(engine, "generate", lambda *a, **k: pytest.fail("sampled before refusing"))
    if flag == "--onnx-int8":  # the check is the precision's too: any file that says int8 will do
        monkeypatch.setattr(runtime.OnnxSampler, "_read_metadata", _as_int8(runtime.OnnxSampler._read_metadata))
    args = ["eval", "--quick", "--out", str(tmp_path / "e"), flag, str(runs["onnx"])]
    refused(capsys, args + (["--ckpt", str(runs[ckpt])] if ckpt else []), f"{flag} {runs['onnx']}", *matches)
    assert not (tmp_path / "e").exists()


def _as_int8(read):
    def patched(self, meta):
        read(self, {**meta, "fastdiff.precision": "int8"})
    return patched


def test_eval_onnx_check_passes_the_checkpoints_own_export(runs, tmp_path, capsys):
    from fastdiff.checkpoint import load_model
    from fastdiff.evaluate import check_onnx_matches

    model, schedule, _ = load_model(runs["uncond"])
    check_onnx_matches(OnnxSampler(runs["onnx"]), "--onnx", model, schedule)
    assert capsys.readouterr().err == ""
    proto = onnx.load(str(runs["onnx"]))  # an export from before the digest: checked by config, with a note
    kept = [p for p in proto.metadata_props if p.key != KEY_WEIGHTS]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    onnx.save(proto, str(tmp_path / "old.onnx"))
    check_onnx_matches(OnnxSampler(tmp_path / "old.onnx"), "--onnx", model, schedule)
    assert "records no weights digest" in capsys.readouterr().err
    with pytest.raises(ValueError, match="noise schedule differs .*beta_end"):
        check_onnx_matches(OnnxSampler(runs["onnx"]), "--onnx", model,
                           NoiseSchedule(num_train_timesteps=T, beta_end=0.03))


# --- 4: a damaged engine cache is exported again, once --------------------------------------------------------
def test_truncated_engine_cache_is_repaired(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTDIFF_CACHE", str(tmp_path / "cache"))
    schedule = NoiseSchedule(num_train_timesteps=T)
    path = runtimes.engine_file(tiny_model, schedule)
    good = path.read_bytes()
    path.write_bytes(good[:1000])
    with pytest.warns(RuntimeWarning, match="does not load .* making it again"):
        model = runtimes.ort_model(tiny_model, schedule, threads=1)
    assert path.read_bytes() == good
    x, t = torch.randn(2, *TINY.image_shape), torch.tensor([3, 50])
    torch.testing.assert_close(model(x, t), tiny_model(x, t), rtol=1e-4, atol=1e-5)


def test_cache_that_stays_broken_is_refused_for_an_explicit_ort(capsys, tmp_path, monkeypatch):
    from fastdiff import engine, onnx_export

    monkeypatch.setenv("FASTDIFF_CACHE", str(tmp_path / "cache"))
    def broken_export(model, schedule, out):  # an exporter (or a disk) that writes files ORT cannot load
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_bytes(b"junk")

    monkeypatch.setattr(onnx_export, "export_engine_body", broken_export)
    monkeypatch.setattr(engine, "generate", lambda *a, **k: pytest.fail("sampled before refusing"))
    assert main(["sample", "--runtime", "ort", "-n", "2", "--steps", "2", "--out", str(tmp_path / "s")]) == 2
    *warnings, error = [x for x in capsys.readouterr().err.splitlines() if x.strip()]  # the retry's warning, if shown
    assert all(w.startswith("fastdiff sample: warning: the cached ONNX file") for w in warnings), warnings
    assert error.startswith("fastdiff sample: error: --runtime ort: the cached ONNX file"), error
    assert "engine.onnx does not load even after making it again" in error and str(tmp_path / "cache") in error
    assert not (tmp_path / "s").exists()


# --- 5, 6: threads and providers ----------------------------------------------------------------------------
@pytest.mark.parametrize("threads", [0, 10**9, True, 1.5])
def test_threads_are_bounded(runs, threads):
    with pytest.raises(ValueError, match="threads must be"):
        OnnxSampler(runs["onnx"], threads=threads)


def test_only_parse_failures_are_called_invalid_models(tmp_path):
    assert "not a valid ONNX model" in str(load_error(tmp_path / "m.onnx", RuntimeError("Protobuf parsing failed")))
    e = load_error(tmp_path / "m.onnx", MemoryError("std::bad_alloc"))
    assert "not a valid" not in str(e) and "could not load the model (MemoryError: std::bad_alloc)" in str(e)


def test_providers_string_and_fallback(runs):
    assert OnnxSampler(runs["onnx"], providers="CPUExecutionProvider").provider == "CPUExecutionProvider"
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has a CUDA provider")
    with pytest.warns(RuntimeWarning, match=r"\['CUDAExecutionProvider'\] are not available"):
        sampler = OnnxSampler(runs["onnx"], providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert sampler.provider == "CPUExecutionProvider"
    with pytest.raises(ValueError, match="not available"):
        OnnxSampler(runs["onnx"], providers=["CUDAExecutionProvider"])
    with pytest.raises(ValueError, match="provider names"):
        OnnxSampler(runs["onnx"], providers=[1])


# --- 7, 8, 9: the CLI names its flags; torchrun's note; the sidecar's precision --------------------------------
def test_cli_errors_name_their_flag(capsys, tmp_path, runs):
    cond = export_onnx(runs["cond"], tmp_path / "cc.onnx")
    refused(capsys, ["sample", "--onnx", str(cond), "--class", "10", "--out", str(tmp_path / "s")],
            "--class must be in [-1, 9]; got 10")
    refused(capsys, ["sample", "--onnx", str(runs["onnx"]), "--class", "1", "--out", str(tmp_path / "s")],
            "--class 1", "unconditional")
    refused(capsys, ["sample", "-n", "0", "--out", str(tmp_path / "s")], "-n/--count", "got 0")
    refused(capsys, ["export", "--out", "/dev/null/x.onnx"], "--out's folder /dev/null")
    refused(capsys, ["export", "--out", str(tmp_path)], f"--out {tmp_path}: is a folder")
    refused(capsys, ["quantize", "--onnx", str(runs["onnx"]), "--out", str(runs["onnx"])], "--out",
            "--onnx file itself")
    refused(capsys, ["quantize", "--onnx", str(runs["onnx"]), "--out", str(tmp_path / "q.onnx"), "--data",
                     str(tmp_path / "nonexist")], "--data", "no such file or folder")
    assert not (tmp_path / "s").exists() and not (tmp_path / "q.onnx").exists()


@pytest.mark.parametrize("n,batch,world,match", [
    (1, 1, 2, "-n 1 is below the 2 processes: 1 process(es) get no image"),
    (4, 4, 2, "1 process(es) get no batch of --batch-size 4; lower it"),
    (4, 2, 2, None)])
def test_idle_note_says_why(n, batch, world, match):
    note = distributed.idle_note(n, batch, world)
    assert (note is None) if match is None else match in note


def test_onnx_sidecar_records_the_files_precision(tmp_path, runs):
    assert main(["sample", "--onnx", str(runs["onnx"]), "-n", "2", "--steps", "2", "--out", str(tmp_path),
                 "--quiet"]) == 0
    info = json.loads((tmp_path / "ddim-2.json").read_text())
    assert info["runtime"] == "onnxruntime" and info["precision"] == "fp32"


def test_unet_digest_is_of_the_weights(tiny_model):
    other = UNet(TINY).eval()
    assert weights_digest(tiny_model) == weights_digest(tiny_model) != weights_digest(other)
