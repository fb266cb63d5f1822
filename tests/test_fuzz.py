"""Property-based fuzzing (Hypothesis): hostile values across the CLI, the data loaders, the op and the ONNX
loader end in a clean refusal (ValueError, or exit status 2 with one line naming the culprit) or work —
never a traceback, a crash, a hang or a silent wrong answer."""
from __future__ import annotations

import io
import math
import zipfile

import numpy as np
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fastdiff import ops  # noqa: E402
from fastdiff.cli import main  # noqa: E402
from fastdiff.data import load_folder, load_npz  # noqa: E402
from fastdiff.schedule import StepCoefs  # noqa: E402

from conftest import TINY  # noqa: E402

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                       HealthCheck.too_slow])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny trained-for-one-step run folder, so CLI examples sample fast."""
    run = tmp_path_factory.mktemp("run")
    from fastdiff.data import load_digits
    from fastdiff.schedule import NoiseSchedule
    from fastdiff.train import TrainConfig, Trainer

    data = load_digits(TINY.image_size, "train")
    trainer = Trainer(data, TINY, NoiseSchedule(num_train_timesteps=50), TrainConfig(steps=1, batch_size=4,
                                                                                    ckpt_every=1), run)
    trainer.fit(progress=False)
    return run


def _one_line_or_ok(rc: int, err: str) -> None:
    assert rc in (0, 2), err
    assert "Traceback" not in err
    if rc == 2:
        lines = [line for line in err.strip().splitlines() if line.startswith("fastdiff ")]
        assert lines and ": error: " in lines[-1]


ints = st.one_of(st.integers(-3, 4), st.sampled_from([0, -1, 2**31, 2**63, 2**64, 10**30]))
floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, 1.0, -1.0, 1e308]))


@FUZZ
@given(n=st.one_of(st.integers(-2, 3), st.sampled_from([10**9 + 1, 10**30])), steps=ints, seed=ints, eta=floats,
       batch=ints, guidance=floats, cls=st.one_of(st.none(), ints),
       name=st.one_of(st.none(), st.sampled_from(["ok", "../up", "a/b", ".hidden", "..", "x\\y"])))
def test_sample_arguments(tiny_run, tmp_path_factory, capsys, n, steps, seed, eta, batch, guidance, cls, name):
    tmp_path = tmp_path_factory.mktemp("sample")
    argv = ["sample", "--ckpt", str(tiny_run), "--n", str(n), "--steps", str(steps), "--seed", str(seed),
            "--eta", repr(eta), "--batch-size", str(batch), "--guidance", repr(guidance), "--out", str(tmp_path / "o"),
            "--quiet"] + ([] if cls is None else ["--class", str(cls)]) + ([] if name is None else ["--name", name])
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own refusals (e.g. 'nan' is a float but not an int) exit 2
        rc = e.code
    _one_line_or_ok(rc, capsys.readouterr().err)
    written = {p.relative_to(tmp_path).parts[0] for p in tmp_path.rglob("*")}
    assert written <= {"o"}, f"files outside --out: {written}"
    if rc == 0:
        sidecar = next((tmp_path / "o").glob("*.json"))
        import json

        info = json.loads(sidecar.read_text())
        assert info["count"] == n == len(list((tmp_path / "o" / sidecar.stem).glob("*.png")))


@FUZZ
@given(args=st.lists(st.sampled_from([
    ["--image-size", "0"], ["--image-size", "-8"], ["--lr", "inf"], ["--lr", "nan"], ["--lr", "-1"],
    ["--timesteps", "1000000000000"], ["--timesteps", "1"], ["--batch-size", "0"], ["--steps", "0"],
    ["--ema-decay", "1.5"], ["--warmup", "-1"], ["--grad-clip", "nan"], ["--label-dropout", "1"],
    ["--ckpt-every", "0"], ["--seed", "-1"], ["--seed", str(2**64)]]), min_size=1, max_size=3))
def test_bad_train_arguments_refused_before_work(tmp_path_factory, capsys, args):
    out = tmp_path_factory.mktemp("train") / "run"
    rc = main(["train", "--steps", "1", "--out", str(out), "--quiet", *[a for pair in args for a in pair]])
    _one_line_or_ok(rc, capsys.readouterr().err)
    assert rc == 2
    assert not (out / "checkpoint.safetensors").exists()


@FUZZ
@given(blob=st.binary(max_size=512))
def test_random_bytes_as_images(tmp_path, blob):
    folder = tmp_path / "imgs"
    folder.mkdir(exist_ok=True)
    (folder / "a.png").write_bytes(blob)
    with pytest.raises(ValueError):
        load_folder(folder, 8, 1)


@FUZZ
@given(dtype=st.sampled_from(["uint8", "float32", "float64", "int64", "bool", "U3", "complex64", "O"]),
       shape=st.lists(st.integers(0, 5), min_size=0, max_size=5), labels=st.booleans(), scale=floats)
def test_random_arrays_as_npz(tmp_path, dtype, shape, labels, scale):
    path = tmp_path / "d.npz"
    if dtype == "O":
        arr = np.empty(shape, dtype=object)
    elif dtype == "U3":
        arr = np.full(shape, "abc")
    else:
        with np.errstate(all="ignore"):
            arr = (np.ones(shape) * (scale if math.isfinite(scale) else 1.0)).astype(dtype)
    extra = {"labels": np.arange(shape[0] if shape else 1)} if labels else {}
    np.savez(path, images=arr, **extra)
    try:
        data = load_npz(path, 8)
    except ValueError:
        return
    assert data.images.dtype == torch.float32 and torch.isfinite(data.images).all()
    assert data.images.min() >= -1 and data.images.max() <= 1


@FUZZ
@given(blob=st.binary(max_size=256), kind=st.sampled_from(["raw", "zip"]))
def test_corrupt_npz(tmp_path, blob, kind):
    path = tmp_path / "d.npz"
    if kind == "zip":
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr("images.npy", blob)
        blob = buf.getvalue()
    path.write_bytes(blob)
    with pytest.raises(ValueError):
        load_npz(path, 8)


shapes = st.lists(st.integers(0, 7), min_size=1, max_size=4)


@FUZZ
@given(shape=shapes, dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32]),
       layout=st.sampled_from(["contiguous", "transposed", "strided"]), seed=st.integers(-2**63, 2**63 - 1),
       step=st.one_of(st.integers(-1, 2**32), st.sampled_from([0, 999, 2**32 - 1])),
       sigma=st.sampled_from([0.0, 0.5]), seeds_dtype=st.sampled_from([torch.int64, torch.int32]))
def test_op_on_any_input(shape, dtype, layout, seed, step, sigma, seeds_dtype):
    """The op either refuses (ValueError) or equals the PyTorch reference bit for bit."""
    x = torch.randn(shape).to(dtype)
    if layout == "transposed" and x.dim() >= 2:
        x = x.transpose(0, -1).contiguous().transpose(0, -1)
    elif layout == "strided":
        x = torch.randn([2 * s for s in shape]).to(dtype)[tuple(slice(None, None, 2) for _ in shape)]
    m = torch.randn(x.shape).to(dtype)
    seeds = torch.full((x.shape[0],), seed, dtype=torch.int64).to(seeds_dtype)
    coefs = StepCoefs(1.3, -0.4, 1.0, 0.8, 0.1, 0.05, sigma)
    try:
        out = ops.reverse_step(x, m, seeds, step, coefs)
    except ValueError:
        return
    want = ops.reverse_step_reference(x, m, seeds, step, coefs)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out.float().nan_to_num(7.0), want.float().nan_to_num(7.0))


@FUZZ
@given(devices=st.sampled_from([("cpu", "meta", "cpu"), ("cpu", "cpu", "meta"), ("meta", "cpu", "cpu")]))
def test_raw_op_refuses_mixed_devices(devices):
    """The raw torch op (not only the Python wrapper) refuses a meta tensor among CPU ones."""
    x, m, s = (torch.zeros(2, 3, device=devices[0]), torch.zeros(2, 3, device=devices[1]),
               torch.zeros(2, dtype=torch.int64, device=devices[2]))
    with pytest.raises(RuntimeError, match="device"):
        torch.ops.fastdiff.reverse_step(x, m, s, 0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0)


@pytest.fixture(scope="module")
def onnx_file(tiny_run, tmp_path_factory):
    from fastdiff.export.onnx import export_onnx

    return export_onnx(tiny_run, tmp_path_factory.mktemp("onnx") / "m.onnx")


@FUZZ
@given(cut=st.integers(0, 4000), flip=st.integers(0, 255), at=st.integers(0, 10**6))
def test_corrupt_onnx_files(onnx_file, tmp_path, cut, flip, at):
    from fastdiff.export.runtime import OnnxSampler

    blob = bytearray(onnx_file.read_bytes())
    blob = blob[:cut] if cut < len(blob) // 2 else blob
    if blob:
        blob[at % len(blob)] ^= flip
    path = tmp_path / "bad.onnx"
    path.write_bytes(bytes(blob))
    try:
        sampler = OnnxSampler(path)
    except ValueError:
        return
    images = sampler.sample(1, steps=2)
    assert images.shape == (1, *sampler.image_shape) and np.isfinite(images).all()


@FUZZ
@given(key=st.sampled_from(["fastdiff.schedule", "fastdiff.image_shape", "fastdiff.num_classes"]),
       value=st.sampled_from(['{"num_train_timesteps": 1000000000000}', '{"beta_end": 2}', '{"beta_start": -1}',
                              '{"num_train_timesteps": 2.5}', "[1, 8, 8, 8]", "[0, 8, 8]", "-1", "x", "{}", "null"]))
def test_hostile_onnx_metadata(onnx_file, tmp_path, key, value):
    """A T of 10^12 or a beta of 2 in a file someone was sent is refused before any table is allocated."""
    import onnx

    from fastdiff.export.runtime import OnnxSampler

    model = onnx.load(str(onnx_file))
    for prop in model.metadata_props:
        if prop.key == key:
            prop.value = value
    path = tmp_path / "meta.onnx"
    onnx.save(model, str(path))
    try:
        OnnxSampler(path)
    except ValueError as e:
        assert str(e)
