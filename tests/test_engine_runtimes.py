"""The engine's runtimes (fastdiff.runtimes): ORT on the CPU by default, the content-hashed ONNX cache, the
fallbacks to eager torch, INT8, the CLI's --runtime / --int8 and their sidecar, and the agreement of the
ORT runtime with the plain torch loop."""
from __future__ import annotations

import argparse
import json
import os
import time
import warnings

import pytest
import torch

from fastdiff import onnx_export, runtimes, sampling
from fastdiff.checkpoint import BUNDLED_MODEL, load_model
from fastdiff.cli import main
from fastdiff.engine import Engine, generate
from fastdiff.nn.unet import UNet
from fastdiff.schedule import NoiseSchedule

from conftest import TINY

SHAPE = (TINY.in_channels, TINY.image_size, TINY.image_size)
needs_ort = pytest.mark.skipif(not runtimes.ort_available(), reason="onnxruntime is not installed")
# max |x_0(ORT) - x_0(torch)| of DDIM-20 images of the shipped digits model, same seeds: the two runtimes'
# float32 convolutions differ in summation order only. Measured 2.0e-6 (eta = 0) and 2.9e-6 (eta = 1) with
# 16 seeds on an AVX-512 Xeon (onnxruntime 1.32, torch 2.14); the bound leaves room for other CPUs' kernels.
ORT_VS_TORCH_MAX_ABS = 5e-5


@pytest.fixture(scope="module", autouse=True)
def _one_thread_and_cache(tmp_path_factory):
    """One torch thread (the ORT sessions get it too): on a small shared CPU, two thread pools spinning under
    contention make a run many times slower. One FASTDIFF_CACHE for the module's tests."""
    threads, cache = torch.get_num_threads(), os.environ.get("FASTDIFF_CACHE")
    torch.set_num_threads(1)
    os.environ["FASTDIFF_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    torch.set_num_threads(threads)
    os.environ.pop("FASTDIFF_CACHE")
    if cache is not None:
        os.environ["FASTDIFF_CACHE"] = cache


@pytest.fixture(autouse=True)
def _rearm_warnings(monkeypatch):
    monkeypatch.setattr(runtimes, "_warned", set())


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh, empty FASTDIFF_CACHE."""
    monkeypatch.setenv("FASTDIFF_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def digits():
    model, schedule, _ = load_model(BUNDLED_MODEL)
    return model, schedule


@needs_ort
def test_auto_is_ort_on_cpu(tiny_model) -> None:
    assert runtimes.default_runtime("cpu") == "ort"
    engine = Engine(tiny_model, NoiseSchedule())
    assert engine.runtime == "ort" and not engine.channels_last
    engine.sample(sampling.make_seeds(0, 1), SHAPE, "ddim", 2)
    info = engine.runtime_info
    assert info["runtime"] == "ort" and info["precision"] == "fp32" and info["onnx"].endswith("engine.onnx")


@needs_ort
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ort_equals_torch_loop(digits, eta) -> None:
    """DDIM-20 of the shipped model: the ORT runtime vs the plain torch loop (sampling.sample_ddim), same seeds."""
    model, schedule = digits
    seeds = sampling.make_seeds(0, 16)
    got = Engine(model, schedule, runtime="ort").sample(seeds, (1, 16, 16), "ddim", 20, eta=eta)
    with torch.inference_mode():
        want = sampling.sample_ddim(model, sampling.initial_noise(seeds, (1, 16, 16)), seeds, schedule, 20, eta=eta)
    assert (got - want).abs().max().item() <= ORT_VS_TORCH_MAX_ABS


@needs_ort
def test_ort_model_is_a_model_callable(tiny_model) -> None:
    """OrtModel plugs into the one loop as `model(x, t, y)`; conditional models get y (None: the null class)."""
    import dataclasses

    torch.manual_seed(0)
    cond = UNet(dataclasses.replace(TINY, num_classes=3)).eval()
    ort_model = runtimes.ort_model(cond, NoiseSchedule(), threads=1)
    x, t = torch.randn(3, *SHAPE), torch.tensor([1, 500, 999])
    with torch.inference_mode():
        for y in (None, torch.tensor([0, 2, -1])):
            torch.testing.assert_close(ort_model(x, t, y), cond(x, t, y), rtol=1e-4, atol=1e-5)
        # channels_last and non-float32 inputs are made contiguous float32 first
        xc = x.contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(ort_model(xc, t), cond(x, t), rtol=1e-4, atol=1e-5)


@needs_ort
def test_engine_body_file(tiny_model) -> None:
    """The engine's file of an unconditional UNet is its body: BlockBias supplies the blocks' time biases per timestep
    (a [1, W] row when the batch shares t, else one row per sample); the result is the model's, within float32
    rounding of the two runtimes."""
    schedule = NoiseSchedule()
    ort_model = runtimes.ort_model(tiny_model, schedule, threads=1)
    assert ort_model.path.name == "engine.onnx" and ort_model.bias is not None
    x = torch.randn(3, *SHAPE)
    with torch.inference_mode():
        for t in (torch.tensor([1, 500, 999]), torch.full((3,), 250)):
            assert ort_model.feeds(x, t)["block_bias"].shape[0] == (1 if t.unique().numel() == 1 else 3)
            torch.testing.assert_close(ort_model(x, t), tiny_model(x, t), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ort_model.sibling(2)(x, t), tiny_model(x, t), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="BlockBias"):
        runtimes.OrtModel(ort_model.path, 1)
    import dataclasses

    with pytest.raises(ValueError, match="unconditional"):
        runtimes.BlockBias(UNet(dataclasses.replace(TINY, num_classes=2)), schedule)


@needs_ort
def test_export_cached_by_content(tiny_model, cache, monkeypatch) -> None:
    schedule = NoiseSchedule()
    calls = []
    real = onnx_export.export_engine_body
    monkeypatch.setattr(onnx_export, "export_engine_body", lambda *a, **k: calls.append(1) or real(*a, **k))
    seeds = sampling.make_seeds(0, 1)
    Engine(tiny_model, schedule).sample(seeds, SHAPE, "ddim", 1)
    Engine(tiny_model, schedule).sample(seeds, SHAPE, "ddim", 1)  # same weights: the cached file
    assert len(calls) == 1 and len(list(cache.glob("onnx/*/engine.onnx"))) == 1
    assert not list(cache.rglob("*.tmp"))  # written atomically
    with torch.no_grad():
        next(tiny_model.parameters()).add_(0.01)
    Engine(tiny_model, schedule).sample(seeds, SHAPE, "ddim", 1)  # new weights: a new export
    assert len(calls) == 2 and len(list(cache.glob("onnx/*/engine.onnx"))) == 2
    assert runtimes.model_digest(tiny_model, schedule) != runtimes.model_digest(
        tiny_model, NoiseSchedule(num_train_timesteps=100))


@needs_ort
def test_clear_reloads_new_weights(tiny_model) -> None:
    engine = Engine(tiny_model, NoiseSchedule())
    seeds = sampling.make_seeds(0, 1)
    a = engine.sample(seeds, SHAPE, "ddim", 2)
    with torch.no_grad():
        for p in tiny_model.parameters():
            p.mul_(0.5)
    assert torch.equal(engine.sample(seeds, SHAPE, "ddim", 2), a)  # the session holds the first weights
    engine.clear()
    assert not torch.equal(engine.sample(seeds, SHAPE, "ddim", 2), a)


def test_fallbacks_warn_once(tiny_model, monkeypatch) -> None:
    schedule = NoiseSchedule()

    def fn(x, t, y=None):
        return torch.zeros_like(x)

    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert Engine(fn, schedule).runtime == "torch"
        assert Engine(fn, schedule).runtime == "torch"
    assert sum("fastdiff UNets only" in str(x.message) for x in w) == 1

    monkeypatch.setattr(runtimes, "ort_available", lambda: False)
    with pytest.warns(RuntimeWarning, match="onnxruntime is not installed"):
        assert Engine(tiny_model, schedule).runtime == "torch"
    assert runtimes.default_runtime("cpu") == "torch"


@needs_ort
def test_failed_export_falls_back(tiny_model, cache, monkeypatch) -> None:
    def broken(*a, **k):
        raise RuntimeError("no exporter today")

    monkeypatch.setattr(onnx_export, "export_engine_body", broken)
    engine = Engine(tiny_model, NoiseSchedule())
    seeds = sampling.make_seeds(0, 2)
    with pytest.warns(RuntimeWarning, match="no exporter today"):
        got = engine.sample(seeds, SHAPE, "ddim", 2)
    assert engine.runtime == "torch"
    torch.testing.assert_close(got, Engine(tiny_model, NoiseSchedule(), runtime="torch").sample(seeds, SHAPE, "ddim", 2))


def test_bad_runtime_arguments(tiny_model) -> None:
    schedule = NoiseSchedule()
    with pytest.raises(ValueError, match="runtime must be one of"):
        Engine(tiny_model, schedule, runtime="tensorrt")
    with pytest.raises(ValueError, match="cuda-graph.*CUDA"):
        Engine(tiny_model, schedule, device="cpu", runtime="cuda-graph")
    with pytest.raises(ValueError, match="int8"):
        Engine(tiny_model, schedule, runtime="torch", int8=True)
    with pytest.raises(ValueError, match="dtype"):
        Engine(tiny_model, schedule, runtime="ort", dtype=torch.bfloat16)
    assert Engine(tiny_model, schedule, dtype=torch.bfloat16).runtime == "torch"  # autocast is a torch option


@needs_ort
def test_threads(tiny_model) -> None:
    """The ORT session gets num_threads; torch's own thread count is restored after sampling."""
    before = torch.get_num_threads()
    engine = Engine(tiny_model, NoiseSchedule(), num_threads=1)
    engine.sample(sampling.make_seeds(0, 1), SHAPE, "ddim", 1)
    assert engine.runtime_info["threads"] == 1 and torch.get_num_threads() == before


@needs_ort
@pytest.mark.parametrize("int8", [False, True])
def test_batch_split_across_threads(digits, int8) -> None:
    """A CPU batch runs as one loop per ORT thread over slices of it (one-thread sessions): the same images as one
    loop (per-sample seeds; the sessions' convolutions may round differently by batch size, within the runtimes'
    tolerance), class ids and guidance follow their samples, on_step counts the steps once."""
    model, schedule = digits
    seeds, classes = sampling.make_seeds(7, 5), torch.tensor([0, 3, 1, 4, 2])
    split = Engine(model, schedule, num_threads=2, int8=int8)
    steps = []
    got = split.sample(seeds, (1, 16, 16), "ddim", 6, eta=1.0, on_step=steps.append)
    assert split.runtime_info["workers"] == 2 and len(split._ort_workers) == 2 and steps == list(range(1, 7))
    whole = Engine(model, schedule, num_threads=2, int8=int8, workers=1)
    want = whole.sample(seeds, (1, 16, 16), "ddim", 6, eta=1.0)
    assert whole.runtime_info["workers"] == 1
    assert (got - want).abs().max().item() <= ORT_VS_TORCH_MAX_ABS  # measured: 0 (AVX-512 EPYC, fp32 and int8)
    alone = torch.cat([Engine(model, schedule, num_threads=1, int8=int8).sample(seeds[i:i + 1], (1, 16, 16), "ddim", 6,
                                                                                  eta=1.0) for i in (0, 4)])
    assert (got[[0, 4]] - alone).abs().max().item() <= ORT_VS_TORCH_MAX_ABS
    if not int8:  # a class-conditional model under guidance: each slice takes its own class ids
        import dataclasses

        torch.manual_seed(0)
        cond = UNet(dataclasses.replace(model.config, num_classes=5)).eval()
        a = Engine(cond, schedule, num_threads=2).sample(seeds, (1, 16, 16), "ddim", 3, classes=classes, guidance=2.0)
        b = Engine(cond, schedule, runtime="torch").sample(seeds, (1, 16, 16), "ddim", 3, classes=classes, guidance=2.0)
        assert (a - b).abs().max().item() <= ORT_VS_TORCH_MAX_ABS


@needs_ort
def test_one_loop_takes_the_faster_session(digits) -> None:
    """A batch run as one loop takes the session or its one-thread sibling (runtimes.one_loop_model): the same bits
    either way, so the images equal a one-thread engine's exactly; the choice is made once per batch shape."""
    model, schedule = digits
    seeds = sampling.make_seeds(3, 1)
    engine = Engine(model, schedule, num_threads=2)
    got = engine.sample(seeds, (1, 16, 16), "ddim", 5, eta=1.0)
    chosen = engine._one_loop[(1, (1, 16, 16), False)]
    assert chosen is engine._ort or chosen is engine._ort_workers[0]
    assert torch.equal(got, Engine(model, schedule, num_threads=1).sample(seeds, (1, 16, 16), "ddim", 5, eta=1.0))
    full, single = engine._ort, engine._ort.sibling(1)
    for n in (1, 3):  # what the choice relies on: ORT's thread count does not change a call's output
        x, t = torch.randn(n, 1, 16, 16), torch.full((n,), 321)
        assert torch.equal(full(x, t), single(x, t))


class _Timed:
    """A model call that takes `seconds` (the selection logic of one_loop_model, without a real session)."""

    def __init__(self, seconds: float):
        self.seconds, self.calls = seconds, 0

    def __call__(self, x, t, y=None):
        self.calls += 1
        time.sleep(self.seconds)
        return x


def test_one_loop_model_measures_short_calls_only() -> None:
    x, t = torch.zeros(1, 1, 4, 4), torch.zeros(1, dtype=torch.long)
    slow, fast = _Timed(0.006), _Timed(0.0)
    assert runtimes.one_loop_model(slow, fast, x, t) is fast
    assert runtimes.one_loop_model(_Timed(0.0), _Timed(0.006), x, t).seconds == 0.0
    long_call, single = _Timed(runtimes.SHORT_CALL_S * 1.5), _Timed(0.0)
    assert runtimes.one_loop_model(long_call, single, x, t) is long_call and single.calls == 0


def test_bad_workers(tiny_model) -> None:
    for bad in (0, -1, 1.5, "2", True):
        with pytest.raises(ValueError, match="workers"):
            Engine(tiny_model, NoiseSchedule(), workers=bad)


@needs_ort
def test_int8_runtime(digits, cache) -> None:
    model, schedule = digits
    seeds = sampling.make_seeds(0, 4)
    engine = Engine(model, schedule, int8=True)
    got = engine.sample(seeds, (1, 16, 16), "ddim", 10)
    assert engine.runtime_info["precision"] == "int8" and "int8" in engine.runtime_info["onnx"]
    assert len(list(cache.glob("onnx/*/engine.int8-*.onnx"))) == 1  # beside the fp32 file
    fp32 = Engine(model, schedule).sample(seeds, (1, 16, 16), "ddim", 10)
    assert (got - fp32).abs().mean() < 0.05  # quality: the paired PSNR in fastdiff.export.quantize


@needs_ort
def test_generate_takes_an_engine(tiny_model) -> None:
    schedule = NoiseSchedule()
    engine = Engine(tiny_model, schedule, runtime="torch")
    a = generate(tiny_model, schedule, SHAPE, 2, steps=2, engine=engine)
    b = generate(tiny_model, schedule, SHAPE, 2, steps=2, runtime="ort")
    assert engine.stats["eager_runs"] == 1
    assert (a - b).abs().max() < 1e-4


@needs_ort
@pytest.mark.parametrize("flags,want", [([], ("cuda-graph" if torch.cuda.is_available() else "ort", "fp32")),
                                        (["--runtime", "torch"], ("torch", "fp32")), (["--int8"], ("ort", "int8"))])
def test_cli_runtime_in_sidecar(tmp_path, flags, want) -> None:
    assert main(["sample", "--n", "2", "--steps", "2", "--out", str(tmp_path), "--name", "s", "--quiet", *flags]) == 0
    info = json.loads((tmp_path / "s.json").read_text())
    assert (info["runtime"], info["precision"]) == want


def test_cli_cpu_runtimes_take_the_cpu_under_device_auto(monkeypatch) -> None:
    """--int8 and --runtime ort run on the CPU: where a GPU is there, --device auto must not pick it (it did on the
    H200, and `fastdiff sample --int8` failed)."""
    from fastdiff.cli.sample import _device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    args = dict(device="auto", runtime="auto", int8=False)
    assert _device(argparse.Namespace(**args)).type == "cuda"
    assert _device(argparse.Namespace(**{**args, "int8": True})).type == "cpu"
    assert _device(argparse.Namespace(**{**args, "runtime": "ort"})).type == "cpu"
    assert _device(argparse.Namespace(**{**args, "runtime": "ort", "device": "cpu"})).type == "cpu"


def test_cli_runtime_errors(tmp_path, capsys) -> None:
    assert main(["sample", "--onnx", str(tmp_path / "m.onnx"), "--int8", "--out", str(tmp_path)]) == 2
    assert "--int8" in capsys.readouterr().err
