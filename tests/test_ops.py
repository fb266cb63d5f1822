"""fastdiff.ops.reverse_step: kernel vs reference, layouts, dtypes, validation, opcheck, compile, fallback."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fastdiff import noise, ops
from fastdiff.schedule import NoiseSchedule, StepCoefs

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
needs_ext = pytest.mark.skipif(ops.backend() != "extension", reason="fastdiff._C not built")
# Tests that hold the kernels to the PyTorch reference: without the extension, ops.reverse_step IS the
# reference, and they would compare it with itself (make test sets FASTDIFF_REQUIRE_EXTENSION=1,
# which fails the run instead; see tests/conftest.py).
vs_reference = pytest.mark.skipif(
    ops.backend() != "extension",
    reason="compares fastdiff._C with the PyTorch reference, but fastdiff._C is not built (the op is the reference)")
ROOT = Path(__file__).parents[1]

DDIM = StepCoefs(a=1.6, b=-1.2, clip_range=1.0, k_x0=0.8, k_x=0.0, k_m=0.45, sigma=0.3)
NOCLIP = DDIM._replace(clip_range=math.inf)
NONOISE = DDIM._replace(sigma=0.0)
DDPM = StepCoefs(a=1.02, b=-0.2, clip_range=1.0, k_x0=0.3, k_x=0.69, k_m=0.0, sigma=0.1)
COEFS = {"ddim": DDIM, "noclip": NOCLIP, "nonoise": NONOISE, "ddpm": DDPM}


def _inputs(shape, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 1.5).to(dtype).to(device)
    m = torch.randn(shape, generator=g).to(dtype).to(device)
    seeds = torch.randint(-(2**62), 2**62, (shape[0],), generator=g).to(device)
    return x, m, seeds


def _truth64(x, m, seeds, step, c: StepCoefs) -> torch.Tensor:
    """The formula in float64 (same noise), the accuracy yardstick."""
    x, m = x.double().cpu(), m.double().cpu()
    x0 = c.a * x + c.b * m
    if math.isfinite(c.clip_range):
        x0 = x0.clamp(-c.clip_range, c.clip_range)
    out = c.k_x0 * x0 + c.k_x * x + c.k_m * m
    if c.sigma:
        z = noise.gaussian(seeds.cpu().numpy(), step, x[0].numel()).astype(np.float64)
        out = out + c.sigma * torch.from_numpy(z).reshape(x.shape)
    return out


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


SHAPES = [(3, 3, 7, 5), (1, 1), (5,), (2, 4, 8, 8), (2, 1027), (4, 3, 16, 16)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", list(COEFS))
def test_fp32_matches_float64_truth(shape, kind) -> None:
    x, m, seeds = _inputs(shape)
    c = COEFS[kind]
    out = ops.reverse_step(x, m, seeds, 7, c)
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert _rel_err(out, _truth64(x, m, seeds, 7, c)) <= 1e-6


@vs_reference
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", list(COEFS))
def test_fp32_matches_reference(shape, kind) -> None:
    x, m, seeds = _inputs(shape)
    c = COEFS[kind]
    out = ops.reverse_step(x, m, seeds, 7, c)
    ref = ops.reverse_step_reference(x, m, seeds, 7, c)
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert _rel_err(out, ref) <= 1e-6


@vs_reference
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 3, 7, 5), (4, 3, 16, 16), (2, 1027)])
def test_low_precision(dtype, shape) -> None:
    x, m, seeds = _inputs(shape, dtype)
    truth = _truth64(x, m, seeds, 3, DDIM)
    out = ops.reverse_step(x, m, seeds, 3, DDIM)
    ref = ops.reverse_step_reference(x, m, seeds, 3, DDIM)
    assert out.dtype == dtype
    err_out = (out.double() - truth).abs().max().item()
    err_ref = (ref.double() - truth).abs().max().item()
    assert err_out <= 2 * err_ref + 1e-12


def test_non_contiguous_inputs() -> None:
    x, m, seeds = _inputs((4, 3, 10, 12))
    xs, ms = x[:, :, ::2, 1:], m.transpose(2, 3).contiguous().transpose(2, 3)[:, :, ::2, 1:]
    out = ops.reverse_step(xs, ms, seeds, 5, DDIM)
    want = ops.reverse_step(xs.contiguous(), ms.contiguous(), seeds, 5, DDIM)
    assert torch.equal(out, want)
    xt = x.transpose(2, 3)  # dense but neither contiguous nor channels_last
    mt = m.transpose(2, 3)
    assert torch.equal(ops.reverse_step(xt, mt, seeds, 5, DDIM), ops.reverse_step(xt.contiguous(), mt.contiguous(), seeds, 5, DDIM))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (3, 4, 8, 8), (2, 2, 3, 1)])  # C > 1, H*W > 1: layouts differ
def test_channels_last_same_as_contiguous(dtype, shape) -> None:
    x, m, seeds = _inputs(shape, dtype)
    want = ops.reverse_step(x, m, seeds, 9, DDIM)
    assert want.is_contiguous() and not want.is_contiguous(memory_format=torch.channels_last)
    xc = x.to(memory_format=torch.channels_last)
    for mm in (m.to(memory_format=torch.channels_last), m):  # model_output follows x's layout
        out = ops.reverse_step(xc, mm, seeds, 9, DDIM)
        assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
        assert torch.equal(out.contiguous(), want)
    ref = ops.reverse_step_reference(xc, m, seeds, 9, DDIM)
    assert torch.equal(ref.contiguous(), want)


def _cl(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


# (name, x from a contiguous (2, 3, 5, 7) tensor, m likewise, the layout the op promises for out)
LAYOUTS = [
    ("contiguous", lambda t: t, lambda t: t, "contiguous"),
    ("channels_last", _cl, _cl, "channels_last"),
    ("x channels_last, m contiguous", _cl, lambda t: t, "channels_last"),
    ("x contiguous, m channels_last", lambda t: t, _cl, "contiguous"),
    ("dense, neither layout", lambda t: t.transpose(2, 3).contiguous().transpose(2, 3),
     lambda t: t.transpose(2, 3).contiguous().transpose(2, 3), "contiguous"),
    ("strided view", lambda t: torch.stack([t, t], -1).flatten(-2)[..., ::2], lambda t: t, "contiguous"),
    ("channels_last strided view", lambda t: _cl(torch.stack([t, t], 3).flatten(2, 3))[:, :, ::2], _cl,
     "contiguous"),
]


@pytest.mark.parametrize("fn", ["reverse_step", "reverse_step_reference"])
@pytest.mark.parametrize("name, make_x, make_m, want", LAYOUTS, ids=[c[0] for c in LAYOUTS])
def test_output_layout(fn, name, make_x, make_m, want) -> None:
    """out's layout: contiguous x -> contiguous; channels_last x -> channels_last; any other x -> contiguous."""
    x, m, seeds = _inputs((2, 3, 5, 7))
    xs, ms = make_x(x), make_m(m)
    assert torch.equal(xs, x) and torch.equal(ms, m)
    out = getattr(ops, fn)(xs, ms, seeds, 4, DDIM)
    assert out.is_contiguous() == (want == "contiguous"), (out.stride(), want)
    assert out.is_contiguous(memory_format=torch.channels_last) == (want == "channels_last"), (out.stride(), want)
    assert torch.equal(out, getattr(ops, fn)(x, m, seeds, 4, DDIM))


@pytest.mark.parametrize("fn", ["reverse_step", "reverse_step_reference"])
def test_output_layout_ambiguous_and_other_ranks(fn) -> None:
    """C == 1 (channels_last strides are also contiguous) and 2-D / 3-D / 5-D tensors come out contiguous,
    except a channels_last_3d 5-D x, which stays channels_last_3d."""
    f = getattr(ops, fn)
    x, m, seeds = _inputs((2, 1, 3, 3))
    assert f(_cl(x), _cl(m), seeds, 4, DDIM).is_contiguous()
    for shape in [(2, 7), (2, 3, 5), (2, 3, 4, 5, 6)]:
        x, m, seeds = _inputs(shape)
        assert f(x, m, seeds, 4, DDIM).is_contiguous()
        assert f(x.transpose(1, -1), m.transpose(1, -1), seeds, 4, DDIM).is_contiguous()
    cl3 = torch.channels_last_3d
    out = f(x.contiguous(memory_format=cl3), m.contiguous(memory_format=cl3), seeds, 4, DDIM)
    assert out.is_contiguous(memory_format=cl3) and not out.is_contiguous()


def test_channels_last_3d() -> None:
    x, m, seeds = _inputs((2, 3, 4, 5, 6))
    xc, mc = x.to(memory_format=torch.channels_last_3d), m.to(memory_format=torch.channels_last_3d)
    out = ops.reverse_step(xc, mc, seeds, 1, DDIM)
    assert out.is_contiguous(memory_format=torch.channels_last_3d)
    assert torch.equal(out.contiguous(), ops.reverse_step(x, m, seeds, 1, DDIM))


def test_empty_and_tiny() -> None:
    for shape in [(0, 3, 4), (2, 0), (1, 1), (1,)]:
        x, m, seeds = _inputs(shape)
        out = ops.reverse_step(x, m, seeds, 0, DDIM)
        assert out.shape == x.shape
        assert torch.equal(out, ops.reverse_step_reference(x, m, seeds, 0, DDIM))


def test_clip_and_nan() -> None:
    x = torch.tensor([[10.0, -10.0, 0.25, float("nan"), 1.0, 0.0]])
    m = torch.tensor([[0.0, 0.0, 0.0, 0.0, float("nan"), 1e30]])
    seeds = torch.tensor([3])
    c = StepCoefs(1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0)  # out = clamp(x + m)
    out = ops.reverse_step(x, m, seeds, 0, c)
    assert out[0, :3].tolist() == [1.0, -1.0, 0.25]
    assert out[0, 3].isnan() and out[0, 4].isnan() and out[0, 5].item() == 1.0
    out = ops.reverse_step(x, m, seeds, 0, c._replace(clip_range=math.inf))
    assert out[0, :3].tolist() == [10.0, -10.0, 0.25] and out[0, 5].item() == m[0, 5].item() and out[0, 3].isnan()
    ref = ops.reverse_step_reference(x, m, seeds, 0, c._replace(clip_range=math.inf))
    torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)


def test_sigma_zero_is_deterministic_mean() -> None:
    x, m, seeds = _inputs((2, 3, 4, 4))
    a = ops.reverse_step(x, m, seeds, 1, NONOISE)
    b = ops.reverse_step(x, m, seeds + 1, 2, NONOISE)
    assert torch.equal(a, b)


def test_noise_depends_on_seed_and_step() -> None:
    x, m, seeds = _inputs((2, 64))
    a = ops.reverse_step(x, m, seeds, 1, DDIM)
    assert not torch.equal(a, ops.reverse_step(x, m, seeds, 2, DDIM))
    assert not torch.equal(a, ops.reverse_step(x, m, seeds + 1, 1, DDIM))
    assert torch.equal(a, ops.reverse_step(x, m, seeds.clone(), 1, DDIM))


def test_batch_invariance() -> None:
    x, m, seeds = _inputs((5, 3, 9, 7))
    full = ops.reverse_step(x, m, seeds, 4, DDIM)
    for b in range(5):
        alone = ops.reverse_step(x[b:b + 1], m[b:b + 1], seeds[b:b + 1], 4, DDIM)
        assert torch.equal(alone[0], full[b])
    perm = torch.tensor([3, 0, 4, 1, 2])
    assert torch.equal(ops.reverse_step(x[perm], m[perm], seeds[perm], 4, DDIM), full[perm])


# --- the CPU kernel's parallel split ---------------------------------------------------------------
# csrc/ops.cpp, contiguous path: at::parallel_for over batch * G Philox groups (G = ceil(N / 4) per
# sample, N elements per sample) with grain 1024 groups; a chunk walks blocks of <= 64 groups that
# stop at the sample's end and at the chunk's end. Channels-last path: parallel_for over
# batch * ceil(S / block) blocks of block = max(1, 256 // C) spatial positions (SIMD paths: at least 64),
# grain 4.
# With 2 threads a range of R >= 2 * grain items is cut at ceil(R / 2): for the shapes below that
# cut falls inside a sample and inside a 64-group block, and N % 4 != 0 (a partial last group).
GRAIN_GROUPS = 1024
CHUNK_SHAPES = [(3, 4003), (3, 5, 29, 31), (3, 2, 45, 47)]


def _two_thread_chunks(shape) -> list[tuple[int, int]]:
    """The (sample, group) where each chunk of the contiguous kernel starts, as at::parallel_for with
    2 threads cuts batch * G groups (OpenMP and native backends alike: ceil(R / 2) items per chunk)."""
    n = math.prod(shape[1:])
    groups = (n + 3) // 4
    total = shape[0] * groups
    chunk = -(-total // 2)
    return [divmod(start, groups) for start in range(0, total, chunk)]


@pytest.fixture
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert torch.get_num_threads() == 2
        yield
    finally:
        torch.set_num_threads(threads)


def test_chunk_shapes_split_mid_sample() -> None:
    """Guards CHUNK_SHAPES: more than 2 grains of work, N % 4 != 0, a chunk starting mid-sample and mid-block."""
    for shape in CHUNK_SHAPES:
        n = math.prod(shape[1:])
        groups = (n + 3) // 4
        assert shape[0] * groups > 2 * GRAIN_GROUPS and n % 4 and groups % 64, shape
        starts = _two_thread_chunks(shape)
        assert len(starts) == 2 and starts[1][1] != 0 and starts[1][1] % 64, (shape, starts)


@vs_reference
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape, layout", [(s, "contiguous") for s in CHUNK_SHAPES]
                         + [(s, "channels_last") for s in CHUNK_SHAPES if len(s) == 4])
@pytest.mark.parametrize("kind", ["ddim", "nonoise"])
def test_cpu_chunks_mid_sample(two_threads, shape, layout, dtype, kind) -> None:
    """Chunks of the CPU kernel that start inside a sample: bit-identical to the reference, and each sample
    computed alone (one chunk, or a different cut) equals its row of the batch."""
    c = COEFS[kind]
    x, m, seeds = _inputs(shape, dtype, seed=11)
    if layout == "channels_last":
        x, m = _cl(x), _cl(m)
    out = ops.reverse_step(x, m, seeds, 123, c)
    ref = ops.reverse_step_reference(x, m, seeds, 123, c)
    assert out.dtype == dtype and out.stride() == x.stride()
    assert torch.equal(out, ref), f"max |out - ref| = {(out.float() - ref.float()).abs().max().item()}"
    for b in range(shape[0]):
        alone = ops.reverse_step(x[b:b + 1], m[b:b + 1], seeds[b:b + 1], 123, c)
        assert torch.equal(alone[0], out[b]), f"sample {b} differs alone vs in the batch"
    perm = torch.tensor([2, 0, 1])
    assert torch.equal(ops.reverse_step(x[perm], m[perm], seeds[perm], 123, c), out[perm])


@vs_reference
def test_schedule_plan_roundtrip() -> None:
    """A whole DDIM run (eta=1, clip) through the op agrees with the reference every step."""
    sched = NoiseSchedule(num_train_timesteps=100)
    x, _, seeds = _inputs((2, 3, 8, 8))
    xr = x.clone()
    for i, st in enumerate(sched.reverse_steps("ddim", 10, eta=1.0)):
        m = torch.tanh(x)  # a stand-in model
        x = ops.reverse_step(x, m, seeds, i, st.coefs)
        xr = ops.reverse_step_reference(xr, torch.tanh(xr), seeds, i, st.coefs)
        assert _rel_err(x, xr) <= 1e-5


# --- validation ----------------------------------------------------------------------------------
def test_bad_inputs() -> None:
    x, m, seeds = _inputs((2, 3, 4))
    with pytest.raises(ValueError, match="model_output"):
        ops.reverse_step(x, m[:, :2], seeds, 0, DDIM)
    with pytest.raises(ValueError, match="model_output"):
        ops.reverse_step(x, m.half(), seeds, 0, DDIM)
    with pytest.raises(ValueError, match="x must be"):
        ops.reverse_step(x.long(), m.long(), seeds, 0, DDIM)
    with pytest.raises(ValueError, match="x must be"):
        ops.reverse_step(x.double(), m.double(), seeds, 0, DDIM)
    with pytest.raises(ValueError, match="seeds"):
        ops.reverse_step(x, m, seeds[:1], 0, DDIM)
    with pytest.raises(ValueError, match="seeds"):
        ops.reverse_step(x, m, seeds.view(2, 1), 0, DDIM)
    with pytest.raises(ValueError, match="seeds"):
        ops.reverse_step(x, m, seeds.int(), 0, DDIM)
    with pytest.raises(ValueError, match="step"):
        ops.reverse_step(x, m, seeds, -1, DDIM)
    with pytest.raises(ValueError, match="step"):
        ops.reverse_step(x, m, seeds, 2**32, DDIM)
    with pytest.raises(ValueError, match="step"):
        ops.reverse_step(x, m, seeds, 1.5, DDIM)
    with pytest.raises(ValueError, match="x must have a batch"):
        ops.reverse_step(x[0, 0, 0], m[0, 0, 0], seeds, 0, DDIM)
    with pytest.raises(ValueError, match="x must be a torch.Tensor"):
        ops.reverse_step(x.numpy(), m, seeds, 0, DDIM)


@CUDA
def test_bad_devices() -> None:
    x, m, seeds = _inputs((2, 3, 4))
    with pytest.raises(ValueError, match="seeds"):
        ops.reverse_step(x.cuda(), m.cuda(), seeds, 0, DDIM)
    with pytest.raises(ValueError, match="model_output"):
        ops.reverse_step(x.cuda(), m, seeds.cuda(), 0, DDIM)


@needs_ext
def test_cpp_checks() -> None:
    x, m, seeds = _inputs((2, 3, 4))
    with pytest.raises(RuntimeError, match="seeds"):
        torch.ops.fastdiff.reverse_step(x, m, seeds[:1], 0, *DDIM)
    with pytest.raises(RuntimeError, match="step"):
        torch.ops.fastdiff.reverse_step(x, m, seeds, -2, *DDIM)
    with pytest.raises(RuntimeError, match="model_output"):
        torch.ops.fastdiff.reverse_step(x, m.half(), seeds, 0, *DDIM)


# --- torch.library integration ------------------------------------------------------------------
@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_opcheck_cpu(dtype) -> None:
    x, m, seeds = _inputs((2, 3, 5, 4), dtype)
    torch.library.opcheck(torch.ops.fastdiff.reverse_step.default, (x, m, seeds, 3, *DDIM))
    xc, mc = x.to(memory_format=torch.channels_last), m.to(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.fastdiff.reverse_step.default, (xc, mc, seeds, 3, *NOCLIP))


@vs_reference
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed"])
def test_gradients_equal_the_reference(dtype, layout) -> None:
    """Autograd through both ops (their register_autograd formulas) gives the gradients of the reference's own
    torch ops bit for bit: the clamp passes none where it bites, the noise none at all; opcheck checks the
    registration with inputs that require grad."""
    from fastdiff.multistep import MultistepCoefs

    x, m, seeds = _inputs((3, 2, 5, 7), dtype, seed=4)
    xp = torch.randn(x.shape).to(dtype)
    arrange = {"contiguous": lambda t: t, "channels_last": lambda t: t.to(memory_format=torch.channels_last),
               "transposed": lambda t: t.transpose(2, 3)}[layout]
    weight = torch.randn(arrange(x).shape)
    ms = MultistepCoefs(a=1.6, b=-1.2, clip_range=1.0, k_x0=0.8, k_prev=-0.3, k_x=0.4, sigma=0.3)
    calls = {"reverse_step": (lambda f, x, m, xp: (f(x, m, seeds, 3, DDIM),), ops.reverse_step, ops.reverse_step_reference),
             "multistep_step": (lambda f, x, m, xp: f(x, m, xp, seeds, 3, ms), ops.multistep_step,
                                ops.multistep_step_reference)}
    for call, fused, ref in calls.values():
        grads = []
        for f in (fused, ref):
            inputs = [arrange(t).detach().requires_grad_() for t in (x, m, xp)]
            outs = call(f, *inputs)
            loss = sum(((o.float() * weight) * (k + 1)).sum() for k, o in enumerate(outs))
            grads.append([g if g is not None else torch.zeros(()) for g in
                          torch.autograd.grad(loss, inputs, allow_unused=True)])
        for g, r in zip(*grads):
            assert g.dtype == r.dtype and torch.equal(g, r)
    clamped = (DDIM.a * x.float() + DDIM.b * m.float()).abs() > DDIM.clip_range
    assert clamped.any() and (~clamped).any()
    xg, mg = x.float().requires_grad_(), m.float().requires_grad_()
    torch.library.opcheck(torch.ops.fastdiff.reverse_step.default, (xg, mg, seeds, 3, *DDIM))
    torch.library.opcheck(torch.ops.fastdiff.multistep_step.default, (xg, mg, xp.float().requires_grad_(), seeds, 3, *ms))


@CUDA
@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_opcheck_cuda(dtype) -> None:
    x, m, seeds = _inputs((2, 3, 5, 4), dtype, "cuda")
    torch.library.opcheck(torch.ops.fastdiff.reverse_step.default, (x, m, seeds, 3, *DDIM))


@needs_ext
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend: str) -> None:
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, backend=backend)
    def two_steps(x, m, seeds):
        y = ops.reverse_step(x, m, seeds, 1, DDIM)
        return ops.reverse_step(y, m * 0.5, seeds, 2, DDPM)

    x, m, seeds = _inputs((2, 3, 8, 8))
    want = ops.reverse_step(ops.reverse_step(x, m, seeds, 1, DDIM), m * 0.5, seeds, 2, DDPM)
    torch.testing.assert_close(two_steps(x, m, seeds), want, rtol=1e-6, atol=1e-6)


# --- CUDA ----------------------------------------------------------------------------------------
@CUDA
@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 3, 7, 5), (2, 4, 8, 8), (2, 1027), (5,), (4, 3, 32, 32)])
def test_cuda_matches_cpu(dtype, shape) -> None:
    x, m, seeds = _inputs(shape, dtype)
    for c in COEFS.values():
        cpu = ops.reverse_step(x, m, seeds, 6, c)
        gpu = ops.reverse_step(x.cuda(), m.cuda(), seeds.cuda(), 6, c)
        assert torch.equal(gpu.cpu(), cpu)
        ref = ops.reverse_step_reference(x.cuda(), m.cuda(), seeds.cuda(), 6, c)
        assert _rel_err(gpu, ref) <= (1e-6 if dtype == torch.float32 else 1e-2)
    if len(shape) == 4:
        xc, mc = x.cuda().to(memory_format=torch.channels_last), m.cuda().to(memory_format=torch.channels_last)
        gpu = ops.reverse_step(xc, mc, seeds.cuda(), 6, DDIM)
        assert gpu.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(gpu.cpu().contiguous(), ops.reverse_step(x, m, seeds, 6, DDIM))


@CUDA
@needs_ext
def test_cuda_unaligned_and_graph() -> None:
    x, m, seeds = _inputs((2, 4097))
    xs, ms = x.cuda()[:, 1:], m.cuda()[:, 1:]  # offset views → scalar (non-vector) path after .contiguous()
    buf = torch.empty(2 * 4096 + 1, device="cuda")[1:].view(2, 4096)
    buf.copy_(xs)
    assert torch.equal(ops.reverse_step(buf, ms.contiguous(), seeds.cuda(), 2, DDIM).cpu(),
                       ops.reverse_step(x[:, 1:], m[:, 1:], seeds, 2, DDIM))
    s = seeds.cuda()
    xg, mg = x.cuda(), m.cuda()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = ops.reverse_step(xg, mg, s, 2, DDIM)
    g.replay()
    first = out.clone()
    s.add_(1)
    g.replay()
    assert not torch.equal(first, out)
    assert torch.equal(out.cpu(), ops.reverse_step(x, m, seeds + 1, 2, DDIM))


# --- fallback ------------------------------------------------------------------------------------
def test_fallback_without_extension() -> None:
    code = r"""
import sys, warnings
sys.modules["fastdiff._C"] = None  # hide the extension: `from . import _C` raises ImportError
import torch
from fastdiff import ops
from fastdiff.schedule import StepCoefs
assert ops.backend() == "reference", ops.backend()
x = torch.randn(2, 3, 4); seeds = torch.tensor([1, 2])
c = StepCoefs(1.5, -0.5, 1.0, 0.9, 0.0, 0.4, 0.2)
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    a = ops.reverse_step(x, x * 0.5, seeds, 3, c)
    b = ops.reverse_step(x, x * 0.5, seeds, 3, c)
assert len([m for m in w if "fastdiff._C" in str(m.message)]) == 1, [str(m.message) for m in w]
assert torch.equal(a, ops.reverse_step_reference(x, x * 0.5, seeds, 3, c)) and torch.equal(a, b)
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr
