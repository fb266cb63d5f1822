"""fastdiff.engine.Engine: same samples as the plain sampler (sampling.run), cache, errors, CUDA graphs."""
from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

from fastdiff import engine, ops, runtimes, sampling
from fastdiff.engine import Engine
from fastdiff.ops import INITIAL_NOISE_COEFS, INITIAL_NOISE_STEP
from fastdiff.nn.unet import UNet
from fastdiff.schedule import NoiseSchedule

from conftest import TINY

SHAPE = (TINY.in_channels, TINY.image_size, TINY.image_size)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def reference(model, schedule, seeds, sampler, steps, y=None, guidance=1.0, **options):
    with torch.inference_mode():
        x = sampling.initial_noise(seeds, SHAPE)
        return sampling.SAMPLERS[sampler](model, x, seeds, schedule, steps, y=y, guidance=guidance, **options)


@pytest.fixture
def schedule() -> NoiseSchedule:
    return NoiseSchedule()


@pytest.fixture
def cond_model() -> UNet:
    torch.manual_seed(0)
    return UNet(dataclasses.replace(TINY, num_classes=3)).eval()


def test_initial_noise_from_the_fused_op() -> None:
    seeds = sampling.make_seeds(7, 3)
    for fmt in (torch.contiguous_format, torch.channels_last):
        zeros = torch.zeros(3, *SHAPE).contiguous(memory_format=fmt)
        got = ops.reverse_step(zeros, zeros, seeds, INITIAL_NOISE_STEP, INITIAL_NOISE_COEFS)
        assert torch.equal(got, sampling.initial_noise(seeds, SHAPE))


@pytest.mark.parametrize("sampler,steps,options", [
    ("ddim", 4, {"eta": 0.0}), ("ddim", 4, {"eta": 1.0}), ("ddpm", 3, {}),
    ("ddim", 3, {"eta": 0.5, "spacing": "trailing", "clip_sample": False}),
])
@pytest.mark.parametrize("channels_last", [False, True])
def test_engine_equals_plain_sampler(tiny_model, schedule, sampler, steps, options, channels_last) -> None:
    seeds = sampling.make_seeds(3, 4)
    want = reference(tiny_model, schedule, seeds, sampler, steps, **options)
    got = Engine(tiny_model, schedule, channels_last=channels_last).sample(seeds, SHAPE, sampler, steps, **options)
    assert got.dtype == torch.float32 and got.is_contiguous() and not got.is_inference()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_engine_cfg_equals_plain_sampler(cond_model, schedule) -> None:
    seeds = sampling.make_seeds(0, 3)
    y = torch.tensor([0, 2, -1])
    want = reference(cond_model, schedule, seeds, "ddim", 3, y=y, guidance=2.5, eta=1.0)
    got = Engine(cond_model, schedule, channels_last=False).sample(seeds, SHAPE, "ddim", 3, classes=y, guidance=2.5, eta=1.0)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_sample_independent_of_batch(tiny_model, schedule) -> None:
    engine = Engine(tiny_model, schedule, channels_last=False)
    both = engine.sample(sampling.make_seeds(5, 2), SHAPE, "ddim", 2, eta=1.0)
    one = engine.sample(sampling.make_seeds(6, 1), SHAPE, "ddim", 2, eta=1.0)
    torch.testing.assert_close(both[1:], one, rtol=1e-5, atol=1e-5)


def test_bf16_within_model_error(tiny_model, schedule) -> None:
    seeds = sampling.make_seeds(0, 2)
    full = Engine(tiny_model, schedule, channels_last=False).sample(seeds, SHAPE, "ddim", 3)
    half = Engine(tiny_model, schedule, dtype=torch.bfloat16, channels_last=False).sample(seeds, SHAPE, "ddim", 3)
    assert half.dtype == torch.float32
    assert (half - full).abs().max() < 0.1


def test_generate_uses_the_engine_and_matches_plain(tiny_model, schedule) -> None:
    kw = dict(seed=1, sampler="ddim", steps=3, batch_size=2, eta=1.0)
    fast = engine.generate(tiny_model, schedule, SHAPE, 3, **kw)
    plain = engine.generate(tiny_model, schedule, SHAPE, 3, engine=False, **kw)
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-4)


def test_num_threads_restored(tiny_model, schedule) -> None:
    before = torch.get_num_threads()
    Engine(tiny_model, schedule, num_threads=1).sample(sampling.make_seeds(0, 1), SHAPE, "ddim", 1)
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("kwargs,match", [
    ({"seeds": torch.tensor([1, 2], dtype=torch.int32)}, "int64"),
    ({"seeds": torch.zeros((2, 1), dtype=torch.int64)}, "1-D"),
    ({"seeds": torch.zeros(0, dtype=torch.int64)}, "non-empty"),
    ({"sampler": "euler"}, "sampler"),
    ({"steps": 0}, "steps"),
    ({"steps": 2.5}, "steps"),
    ({"options": {"eta": 1.0}, "sampler": "ddpm"}, "eta: not an option of the ddpm sampler"),
    ({"options": {"bogus": 1}}, "bogus: not an option"),
    ({"guidance": 2.0}, "guidance"),
    ({"guidance": -1.0, "classes": torch.tensor([0, 1])}, "guidance"),
    ({"classes": torch.tensor([0])}, "one class id"),
    ({"classes": torch.tensor([0.0, 1.0])}, "integer"),
    ({"image_shape": (1, 0, 8)}, "image_shape"),
    ({"image_shape": (SHAPE[0] + 1,) + SHAPE[1:]}, r"image_shape must be \(1, H, W\)"),
    ({"image_shape": SHAPE[:1] + (SHAPE[1] + 1, SHAPE[2])}, "multiples of 2"),
])
def test_bad_inputs(tiny_model, schedule, kwargs, match) -> None:
    args = {"seeds": sampling.make_seeds(0, 2), "image_shape": SHAPE, "sampler": "ddim", "steps": 2, "classes": None,
            "guidance": 1.0, "options": {}}
    args.update(kwargs)
    options = args.pop("options")
    with pytest.raises(ValueError, match=match):
        Engine(tiny_model, schedule).sample(**args, **options)


@pytest.mark.skipif(not runtimes.ort_available(), reason="onnxruntime not installed")
def test_ort_runtime_takes_the_exported_size_torch_any(tiny_model, schedule) -> None:
    seeds, other = sampling.make_seeds(0, 1), (SHAPE[0], 2 * SHAPE[1], SHAPE[2])
    with pytest.raises(ValueError, match=r"on the ort runtime .*runtime='torch'"):
        Engine(tiny_model, schedule, runtime="ort").sample(seeds, other, "ddim", 2)
    out = Engine(tiny_model, schedule, runtime="torch").sample(seeds, other, "ddim", 2)
    assert out.shape == (1,) + other and torch.isfinite(out).all()


def test_bad_construction(tiny_model, schedule) -> None:
    with pytest.raises(ValueError, match="dtype"):
        Engine(tiny_model, schedule, dtype=torch.float64)
    with pytest.raises(ValueError, match="cache_size"):
        Engine(tiny_model, schedule, cache_size=0)
    with pytest.raises(ValueError, match="NoiseSchedule"):
        Engine(tiny_model, {"num_train_timesteps": 1000})


def test_nan_model_raises(schedule) -> None:
    def bad(x, t, y=None):
        return torch.full_like(x, float("nan"))

    with pytest.raises(FloatingPointError):
        Engine(bad, schedule, device="cpu").sample(sampling.make_seeds(0, 1), SHAPE, "ddim", 2, clip_sample=False)


def test_cpu_engine_does_not_capture(tiny_model, schedule) -> None:
    engine = Engine(tiny_model, schedule, use_graphs=True)
    assert not engine.use_graphs
    engine.sample(sampling.make_seeds(0, 1), SHAPE, "ddim", 1)
    assert engine.cached_keys == [] and engine.stats["eager_runs"] == 1


# --- CUDA graphs ----------------------------------------------------------------------------------
@pytest.fixture
def cuda_model():
    torch.manual_seed(0)
    return UNet(TINY).eval().cuda()


@cuda
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_graph_equals_eager_and_replays_new_seeds(cuda_model, schedule, dtype) -> None:
    graphed = Engine(cuda_model, schedule, device="cuda", dtype=dtype)
    eager = Engine(cuda_model, schedule, device="cuda", dtype=dtype, use_graphs=False)
    s1, s2 = sampling.make_seeds(0, 3, "cuda"), sampling.make_seeds(100, 3, "cuda")
    a1 = graphed.sample(s1, SHAPE, "ddim", 4, eta=1.0)
    a2 = graphed.sample(s2, SHAPE, "ddim", 4, eta=1.0)
    assert graphed.stats["captures"] == 1 and graphed.stats["replays"] == 2
    assert not torch.allclose(a1, a2)  # new seeds, new samples, same graph
    tol = 1e-4 if dtype is None else 2e-2
    torch.testing.assert_close(a1, eager.sample(s1, SHAPE, "ddim", 4, eta=1.0), rtol=tol, atol=tol)
    torch.testing.assert_close(a2, eager.sample(s2, SHAPE, "ddim", 4, eta=1.0), rtol=tol, atol=tol)
    a1_again = graphed.sample(s1, SHAPE, "ddim", 4, eta=1.0)
    torch.testing.assert_close(a1_again, a1, rtol=0, atol=0)
    assert a1.data_ptr() != a1_again.data_ptr()  # results are copies, not the static buffer


@cuda
def test_graph_equals_cpu_plain_sampler(schedule, monkeypatch) -> None:
    # float32 convolutions on both sides: torch lets cuDNN use TF32 by default, which differed from the CPU by
    # 2.5e-3 here on an H200 (README: bit-identity)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch.manual_seed(0)
    cpu_model = UNet(TINY).eval()
    gpu_model = UNet(TINY).eval().cuda()
    gpu_model.load_state_dict(cpu_model.state_dict())
    seeds = sampling.make_seeds(4, 2)
    want = reference(cpu_model, schedule, seeds, "ddpm", 5)
    got = Engine(gpu_model, schedule, device="cuda").sample(seeds.cuda(), SHAPE, "ddpm", 5).cpu()
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


@cuda
def test_graph_cfg(schedule) -> None:
    torch.manual_seed(0)
    model = UNet(dataclasses.replace(TINY, num_classes=3)).eval().cuda()
    graphed = Engine(model, schedule, device="cuda")
    eager = Engine(model, schedule, device="cuda", use_graphs=False)
    seeds = sampling.make_seeds(0, 2, "cuda")
    for y in (torch.tensor([0, 1]), torch.tensor([2, -1])):  # new class ids replay the same graph
        got = graphed.sample(seeds, SHAPE, "ddim", 3, classes=y.cuda(), guidance=3.0)
        torch.testing.assert_close(got, eager.sample(seeds, SHAPE, "ddim", 3, classes=y.cuda(), guidance=3.0),
                                   rtol=1e-4, atol=1e-4)
    assert graphed.stats["captures"] == 1


@cuda
def test_graph_cache_lru(cuda_model, schedule) -> None:
    engine = Engine(cuda_model, schedule, device="cuda", cache_size=2)
    seeds = sampling.make_seeds(0, 1, "cuda")
    for steps in (1, 2, 1, 3):
        engine.sample(seeds, SHAPE, "ddim", steps)
    assert engine.stats["captures"] == 3 and engine.stats["evictions"] == 1
    assert [k[3] for k in engine.cached_keys] == [1, 3]  # steps of the two most recently used
    engine.sample(sampling.make_seeds(0, 2, "cuda"), SHAPE, "ddim", 1)  # batch size is part of the key
    assert engine.stats["captures"] == 4


@cuda
def test_graph_capture_failure_falls_back(schedule) -> None:
    def not_capturable(x, t, y=None):
        return x * float(x.sum().item() * 0)  # a host sync: illegal during capture

    engine = Engine(not_capturable, schedule, device="cuda")
    seeds = sampling.make_seeds(0, 1, "cuda")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = engine.sample(seeds, SHAPE, "ddim", 2)
        engine.sample(seeds, SHAPE, "ddim", 2)
    assert engine.stats["capture_failures"] == 1 and engine.stats["eager_runs"] == 2
    assert sum("capture failed" in str(x.message) for x in w) == 1
    assert out.shape == (1, *SHAPE)


def test_generate_streams_batches_for_any_n(tiny_model, schedule) -> None:
    """on_batch makes memory independent of n: the batches are never listed up front (a million of them would hold
    ~100 MB of Python objects before the first image)."""
    import tracemalloc

    class Enough(Exception):
        pass

    seen = []

    def on_batch(start, images):
        seen.append((start, len(images)))
        if len(seen) == 2:
            raise Enough

    tracemalloc.start()
    try:
        with pytest.raises(Enough):
            engine.generate(tiny_model, schedule, SHAPE, 10**6, steps=1, batch_size=1, engine=False, on_batch=on_batch)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert seen == [(0, 1), (1, 1)]
    assert peak < 20 * 2**20, f"{peak / 2**20:.0f} MiB of Python objects for two batches"
