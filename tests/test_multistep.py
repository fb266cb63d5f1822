"""DPM-Solver++ (dpmpp-2m, dpmpp-2m-sde): coefficients vs diffusers, the fused multistep op vs its reference, the
one loop, the Engine, the CLI and the diffusers drop-in (FusedDPMSolverMultistepScheduler)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fastdiff import multistep, noise, ops, sampling
from fastdiff.engine import Engine, generate
from fastdiff.multistep import MultistepCoefs
from conftest import TINY
from fastdiff.nn.unet import UNet
from fastdiff.request import SampleRequest
from fastdiff.schedule import SAMPLER_OPTIONS, SAMPLERS, NoiseSchedule

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
vs_reference = pytest.mark.skipif(
    ops.backend() != "extension",
    reason="compares fastdiff._C with the PyTorch reference, but fastdiff._C is not built (the op is the reference)")
SHAPE = (1, 8, 8)
C2 = MultistepCoefs(a=1.6, b=-1.2, clip_range=1.0, k_x0=0.9, k_prev=-0.35, k_x=0.4, sigma=0.3)
COEFS = {"2nd": C2, "1st": C2._replace(k_prev=0.0), "ode": C2._replace(sigma=0.0),
         "noclip": C2._replace(clip_range=math.inf)}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- coefficients vs diffusers ----------------------------------------------------------------------------------
def _apply64(c: MultistepCoefs, x, m, xp, z):
    x0 = c.a * x.double() + c.b * m.double()
    if math.isfinite(c.clip_range):
        x0 = x0.clamp(-c.clip_range, c.clip_range)
    return c.k_x0 * x0 + c.k_prev * xp + c.k_x * x.double() + c.sigma * z.double(), x0


@pytest.mark.parametrize("sampler", multistep.SAMPLERS)
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("steps,final,solver,spacing,order,lof", [
    (20, "zero", "midpoint", "linspace", 2, True), (10, "sigma_min", "heun", "trailing", 2, True),
    (15, "sigma_min", "midpoint", "leading", 2, False), (5, "zero", "midpoint", "linspace", 1, True),
    (8, "sigma_min", "midpoint", "linspace", 2, False),
    (700, "sigma_min", "midpoint", "trailing", 2, True)])  # last step from timestep 0 to sigma_min: h = 0
def test_steps_match_diffusers(sampler, prediction, steps, final, solver, spacing, order, lof):
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DPMSolverMultistepScheduler(
        algorithm_type=multistep.ALGORITHMS[sampler], prediction_type=prediction, final_sigmas_type=final,
        solver_type=solver, timestep_spacing=spacing, solver_order=order, lower_order_final=lof)
    sched.set_timesteps(steps)
    ns = NoiseSchedule(prediction_type=prediction)
    plan = ns.reverse_steps(sampler, steps, final_sigmas_type=final, solver_type=solver, spacing=spacing,
                            solver_order=order, lower_order_final=lof)
    assert [s.t for s in plan] == sched.timesteps.tolist()
    # diffusers keeps its sigmas in float32; give it float64 ones so the comparison tests the formulas
    ac, ts = ns.alphas_cumprod, sched.timesteps.numpy()
    last = 0.0 if final == "zero" else math.sqrt((1 - ac[0]) / ac[0])
    sched.sigmas = torch.from_numpy(np.append(np.sqrt((1 - ac[ts]) / ac[ts]), last))
    g = torch.Generator().manual_seed(0)
    x, xp = torch.randn(2, 3, 4, 4, generator=g), torch.zeros(2, 3, 4, 4, dtype=torch.float64)
    for step in plan:
        m, z = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
        want = sched.step(m, step.t, x, variance_noise=z).prev_sample
        got, x0 = _apply64(step.coefs, x, m, xp, z)
        torch.testing.assert_close(got.float(), want, rtol=1e-5, atol=1e-5)
        x, xp = want, x0
    assert (plan[0].coefs.k_prev == 0.0) and (order == 1) == all(s.coefs.k_prev == 0 for s in plan)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # diffusers' set_timesteps under NumPy 2
@pytest.mark.parametrize("T", [1000, 333])
@pytest.mark.parametrize("spacing", multistep.SPACINGS)
def test_timesteps_for_every_step_count(T, spacing):
    """diffusers' timesteps for every count it spaces without repeating one (its trailing extra -1 dropped); a count
    where it repeats one (its run turns NaN) is refused, naming steps and the largest valid count."""
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=T, timestep_spacing=spacing)
    most = T if spacing == "trailing" else T - 1
    for steps in range(1, T + 1):
        sched.set_timesteps(steps)
        theirs = sched.timesteps.tolist()
        assert theirs[steps:] in ([], [-1])
        if len(set(theirs)) < len(theirs):
            assert steps == most + 1
            with pytest.raises(ValueError, match=rf"^steps must be an integer in \[1, {most}\] [^\n]*got {steps}$"):
                multistep.timesteps(T, steps, spacing)
        else:
            ours = multistep.timesteps(T, steps, spacing)
            assert ours == theirs[:steps] and min(ours) >= 0


def test_too_many_steps_are_one_line_errors(tiny_model, tmp_path, capsys):
    from fastdiff.cli import main

    for sampler in multistep.SAMPLERS:
        with pytest.raises(ValueError, match=r"steps must be an integer in \[1, 999\]"):
            generate(tiny_model, NoiseSchedule(), SHAPE, 1, sampler=sampler, steps=1000, engine=False)
        assert len(NoiseSchedule().reverse_steps(sampler, 1000, spacing="trailing")) == 1000
    assert main(["sample", "--sampler", "dpmpp-2m", "--steps", "1000", "--n", "1", "--out", str(tmp_path),
                 "--device", "cpu", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "steps must be an integer in [1, 999]" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_options_are_checked():
    s = NoiseSchedule()
    assert set(SAMPLERS) >= {"dpmpp-2m", "dpmpp-2m-sde"} and SAMPLER_OPTIONS["dpmpp-2m"]["spacing"] == "linspace"
    for kw, match in [({"solver_order": 3}, "solver_order"), ({"final_sigmas_type": "x"}, "final_sigmas_type"),
                      ({"solver_type": "bh2"}, "solver_type"), ({"eta": 1.0}, "eta"), ({"spacing": "x"}, "spacing"),
                      ({"lower_order_final": 1}, "lower_order_final"), ({"clip_sample_range": 0}, "clip_sample_range")]:
        with pytest.raises(ValueError, match=match):
            s.reverse_steps("dpmpp-2m", 10, **kw)
    with pytest.raises(ValueError, match="steps"):
        s.reverse_steps("dpmpp-2m", 0)
    with pytest.raises(ValueError, match="sampler"):
        s.step_coefs("dpmpp-2m", 10, 5)
    assert SampleRequest.checked(s, 0, 1, sampler="dpmpp-2m-sde").steps == 20
    plan = s.reverse_steps("dpmpp-2m-sde", 10, clip_sample=True)
    assert all(st.coefs.clip_range == 1.0 for st in plan) and plan[-1].coefs.sigma == 0.0
    assert all(st.coefs.sigma > 0 for st in plan[:-1])


# --- the op ---------------------------------------------------------------------------------------------------
def _inputs(shape=(3, 2, 5, 7), dtype=torch.float32, fmt=torch.contiguous_format, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, m, xp = (torch.randn(shape, generator=g).to(dtype).contiguous(memory_format=fmt) for _ in range(3))
    return x, m, xp, sampling.make_seeds(5, shape[0])


@vs_reference
@pytest.mark.parametrize("name", COEFS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_kernel_equals_reference_bit_for_bit(name, dtype, fmt):
    x, m, xp, seeds = _inputs(dtype=dtype, fmt=fmt)
    out, x0 = ops.multistep_step(x, m, xp, seeds, 17, COEFS[name])
    want_out, want_x0 = ops.multistep_step_reference(x, m, xp, seeds, 17, COEFS[name])
    assert out.dtype == dtype and out.is_contiguous(memory_format=fmt) and x0.is_contiguous(memory_format=fmt)
    assert torch.equal(out, want_out) and torch.equal(x0, want_x0)


@vs_reference
def test_kernel_chunks_and_batch_rows():
    """Parallel chunks that start mid-sample (odd per-sample size, 2 threads) and a sample alone vs in a batch."""
    x, m, xp, seeds = _inputs(shape=(3, 1, 61, 67))
    torch.set_num_threads(2)
    try:
        out, x0 = ops.multistep_step(x, m, xp, seeds, 3, C2)
    finally:
        torch.set_num_threads(1)
    want = ops.multistep_step_reference(x, m, xp, seeds, 3, C2)
    assert torch.equal(out, want[0]) and torch.equal(x0, want[1])
    alone, _ = ops.multistep_step(x[1:2], m[1:2], xp[1:2], seeds[1:2], 3, C2)
    assert torch.equal(alone, out[1:2])


def test_reference_math():
    """x0 is the clamped data prediction; the noise is the Philox stream of (seed, step, index); k_prev = 0 does
    not read x0_prev (NaN there stays out)."""
    x, m, xp, seeds = _inputs()
    c = C2
    out, x0 = ops.multistep_step(x, m, xp, seeds, 9, c)
    f = np.float32
    x0_want = (f(c.a) * x + f(c.b) * m).clamp(-1, 1)
    z = noise.gaussian(seeds, 9, x[0].numel()).reshape(x.shape)
    assert torch.equal(x0, x0_want)
    torch.testing.assert_close(out, c.k_x0 * x0 + c.k_prev * xp + c.k_x * x + c.sigma * z, rtol=1e-6, atol=1e-6)
    first, _ = ops.multistep_step(x, m, torch.full_like(xp, float("nan")), seeds, 9, c._replace(k_prev=0.0))
    assert torch.isfinite(first).all()


def test_validation_names_the_argument():
    x, m, xp, seeds = _inputs()
    with pytest.raises(ValueError, match="x0_prev"):
        ops.multistep_step(x, m, xp[:2], seeds, 1, C2)
    with pytest.raises(ValueError, match="x0_prev"):
        ops.multistep_step(x, m, xp.double(), seeds, 1, C2)
    with pytest.raises(ValueError, match="coefs"):
        ops.multistep_step(x, m, xp, seeds, 1, tuple(C2))
    with pytest.raises(ValueError, match="seeds"):
        ops.multistep_step(x, m, xp, seeds[:1], 1, C2)
    with pytest.raises(ValueError, match="step"):
        ops.multistep_step(x, m, xp, seeds, -1, C2)
    with pytest.raises(ValueError, match="model_output"):
        ops.multistep_step(x, m[:, :1], xp, seeds, 1, C2)


@vs_reference
def test_opcheck_and_compile():
    x, m, xp, seeds = _inputs(shape=(2, 1, 4, 4))
    torch.library.opcheck(torch.ops.fastdiff.multistep_step.default, (x, m, xp, seeds, 3, *C2))
    fn = torch.compile(lambda *a: torch.ops.fastdiff.multistep_step(*a, 3, *C2), fullgraph=True, backend="eager")
    assert all(torch.equal(a, b) for a, b in zip(fn(x, m, xp, seeds), ops.multistep_step(x, m, xp, seeds, 3, C2)))


@CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_cuda_equals_cpu(dtype, fmt):
    x, m, xp, seeds = _inputs(shape=(3, 3, 9, 11), dtype=dtype, fmt=fmt)
    want = ops.multistep_step(x, m, xp, seeds, 7, C2)
    got = ops.multistep_step(x.cuda(), m.cuda(), xp.cuda(), seeds.cuda(), 7, C2)
    assert all(torch.equal(g.cpu(), w) for g, w in zip(got, want))


# --- the loop, the Engine, the CLI ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model() -> UNet:
    torch.manual_seed(0)
    return UNet(TINY).eval()


class _Recorder:
    """A model that records its inputs (diffusers' loop and ours must see the same x at every step)."""

    def __init__(self, model):
        self.model, self.xs = model, []

    def __call__(self, x, t, y=None):
        self.xs.append(x.clone())
        return self.model(x, t, y)


@pytest.mark.parametrize("sampler", multistep.SAMPLERS)
def test_denoise_equals_diffusers_loop(tiny_model, sampler):
    """sampling.denoise with the fused op vs diffusers' DPMSolverMultistepScheduler (its noise: fastdiff's)."""
    diffusers = pytest.importorskip("diffusers")
    schedule, seeds, steps = NoiseSchedule(), sampling.make_seeds(2, 3), 6
    sched = diffusers.DPMSolverMultistepScheduler(algorithm_type=multistep.ALGORITHMS[sampler])
    sched.set_timesteps(steps)
    with torch.inference_mode():
        x = x_T = sampling.initial_noise(seeds, SHAPE)
        for t in sched.timesteps.tolist():
            z = noise.gaussian(seeds, t, x[0].numel()).reshape(x.shape)
            x = sched.step(tiny_model(x, torch.full((3,), t)), t, x, variance_noise=z).prev_sample
        got = sampling.SAMPLERS[sampler](tiny_model, x_T, seeds, schedule, steps)
    torch.testing.assert_close(got, x, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sampler", multistep.SAMPLERS)
def test_engine_and_generate(tiny_model, sampler):
    schedule, seeds = NoiseSchedule(), sampling.make_seeds(4, 3)
    with torch.inference_mode():
        want = sampling.SAMPLERS[sampler](tiny_model, sampling.initial_noise(seeds, SHAPE), seeds, schedule, 5)
    for channels_last in (False, True):
        got = Engine(tiny_model, schedule, channels_last=channels_last, runtime="torch").sample(
            seeds, SHAPE, sampler, 5)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # channels_last convs round differently
    a = generate(tiny_model, schedule, SHAPE, 3, seed=4, sampler=sampler, steps=5, runtime="torch")
    b = generate(tiny_model, schedule, SHAPE, 3, seed=4, sampler=sampler, steps=5, engine=False)
    assert torch.equal(a, generate(tiny_model, schedule, SHAPE, 3, seed=4, sampler=sampler, steps=5, runtime="torch"))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a, want.clamp(-1, 1), rtol=1e-5, atol=1e-5)
    alone = generate(tiny_model, schedule, SHAPE, 1, seed=5, sampler=sampler, steps=5, runtime="torch")
    torch.testing.assert_close(alone, a[1:2], rtol=1e-4, atol=1e-4)  # the model batch-size rounding only


@CUDA
@pytest.mark.parametrize("sampler", multistep.SAMPLERS)
def test_cuda_graph_equals_eager(tiny_model, sampler):
    schedule, seeds = NoiseSchedule(), sampling.make_seeds(4, 3, "cuda")
    engine = Engine(tiny_model, schedule, device="cuda", channels_last=False)
    first = engine.sample(seeds, SHAPE, sampler, 6)
    again = engine.sample(seeds, SHAPE, sampler, 6)
    assert engine.stats["captures"] == 1 and engine.stats["replays"] == 2 and torch.equal(first, again)
    eager = Engine(tiny_model, schedule, device="cuda", channels_last=False, use_graphs=False).sample(
        seeds, SHAPE, sampler, 6)
    torch.testing.assert_close(first, eager, rtol=1e-5, atol=1e-5)


def test_cli_sample(tmp_path, capsys):
    from fastdiff.cli import main

    out = tmp_path / "run"
    assert main(["sample", "--sampler", "dpmpp-2m", "--steps", "3", "--n", "2", "--out", str(out), "--device", "cpu",
                 "--quiet"]) == 0
    assert any(out.rglob("*.png"))
    assert main(["sample", "--sampler", "dpmpp-2m", "--eta", "0.5", "--n", "1", "--out", str(out), "--quiet"]) == 2
    assert "--eta" in capsys.readouterr().err


# --- the diffusers drop-in ------------------------------------------------------------------------------------
def _dpm_pipelines(sampler: str, **config):
    diffusers = pytest.importorskip("diffusers")
    from test_diffusers import tiny_unet

    from fastdiff.diffusers import FusedDPMSolverMultistepScheduler

    sched = diffusers.DPMSolverMultistepScheduler(algorithm_type=multistep.ALGORITHMS[sampler], **config)
    pipe = diffusers.DDPMPipeline(unet=tiny_unet(), scheduler=sched)
    fused = diffusers.DDPMPipeline(unet=pipe.unet, scheduler=FusedDPMSolverMultistepScheduler.from_config(sched.config))
    for p in (pipe, fused):
        p.set_progress_bar_config(disable=True)
    return pipe, fused


def _philox_noise(monkeypatch, seeds: torch.Tensor) -> None:
    """diffusers' DPMSolverMultistepScheduler handed fastdiff's noise of (seeds, t) through variance_noise."""
    from diffusers import DPMSolverMultistepScheduler

    step = DPMSolverMultistepScheduler.step

    def with_philox(sched, m, t, x, generator=None, variance_noise=None, return_dict=True):
        z = noise.gaussian(seeds, int(t), x[0].numel()).reshape(x.shape).to(x)
        return step(sched, m, t, x, variance_noise=z, return_dict=return_dict)

    monkeypatch.setattr(DPMSolverMultistepScheduler, "step", with_philox)


@pytest.mark.parametrize("sampler,config", [("dpmpp-2m", {}), ("dpmpp-2m-sde", {}),
                                            ("dpmpp-2m", {"final_sigmas_type": "sigma_min", "solver_type": "heun",
                                                          "prediction_type": "v_prediction"})])
def test_pipeline_matches_diffusers(monkeypatch, sampler, config):
    pipe, fused = _dpm_pipelines(sampler, **config)  # skips without diffusers
    from fastdiff.diffusers import FusedDPMSolverMultistepScheduler

    fused.scheduler.set_seeds([5, 6])
    kw = dict(batch_size=2, num_inference_steps=6)
    got = images(fused, generator=torch.Generator().manual_seed(1), **kw)
    assert isinstance(fused.scheduler, FusedDPMSolverMultistepScheduler) and fused.scheduler.seeds.tolist() == [5, 6]
    monkeypatch.setattr(FusedDPMSolverMultistepScheduler, "multistep_fn",
                        staticmethod(ops.multistep_step_reference))
    assert np.array_equal(got, images(fused, generator=torch.Generator().manual_seed(1), **kw))  # same seeds, same
    _philox_noise(monkeypatch, torch.tensor([5, 6]))
    want = images(pipe, generator=torch.Generator().manual_seed(1), **kw)
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_drop_in_refuses_what_it_cannot_fuse():
    diffusers = pytest.importorskip("diffusers")
    from fastdiff.diffusers import FusedDPMSolverMultistepScheduler

    for kw, match in [({"use_karras_sigmas": True}, "use_karras_sigmas"), ({"thresholding": True}, "thresholding"),
                      ({"solver_order": 3}, "solver_order"), ({"algorithm_type": "dpmsolver"}, "algorithm_type"),
                      ({"final_sigmas_type": "sigma_min", "algorithm_type": "dpmsolver"}, "algorithm_type")]:
        with pytest.raises(ValueError, match=match):
            FusedDPMSolverMultistepScheduler(**kw)
    sched = FusedDPMSolverMultistepScheduler.from_config(diffusers.DPMSolverMultistepScheduler().config)
    with pytest.raises(ValueError, match="timesteps"):
        sched.set_timesteps(timesteps=[999, 500, 0])


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large", None])
def test_drop_in_takes_an_exported_ddpm_pipeline(tiny_model, tmp_path, variance):
    """docs/dpmpp.md's swap on a DDPMPipeline as `fastdiff export --format diffusers` writes it: diffusers'
    DPMSolverMultistepScheduler takes that DDPMScheduler config (variance_type matters to it only when learned),
    and so does the fused one, with the same timesteps and images."""
    diffusers = pytest.importorskip("diffusers")
    from fastdiff.diffusers import FusedDPMSolverMultistepScheduler
    from fastdiff.interop.diffusers import save_diffusers

    folder = save_diffusers(tiny_model, NoiseSchedule(), tmp_path / "pipe")
    pipe = diffusers.DDPMPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    config = {**pipe.scheduler.config, "variance_type": variance}
    assert pipe.scheduler.config.variance_type == "fixed_small"
    theirs = diffusers.DPMSolverMultistepScheduler.from_config(config)
    pipe.scheduler = FusedDPMSolverMultistepScheduler.from_config(config)
    for sched in (theirs, pipe.scheduler):
        sched.set_timesteps(8)
    assert pipe.scheduler.timesteps.tolist() == theirs.timesteps.tolist()
    got = images(pipe, batch_size=2, num_inference_steps=8, generator=torch.Generator().manual_seed(3))
    pipe.scheduler = theirs
    want = images(pipe, batch_size=2, num_inference_steps=8, generator=torch.Generator().manual_seed(3))
    np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.parametrize("variance", ["learned", "learned_range"])
def test_drop_in_learned_variance_uses_the_epsilon_channels(variance):
    diffusers = pytest.importorskip("diffusers")
    from fastdiff.diffusers import FusedDPMSolverMultistepScheduler

    theirs = diffusers.DPMSolverMultistepScheduler(variance_type=variance)
    ours = FusedDPMSolverMultistepScheduler.from_config(theirs.config)
    g = torch.Generator().manual_seed(0)
    x = want = torch.randn(2, 3, 4, 4, generator=g)
    for sched in (theirs, ours):
        sched.set_timesteps(5)
    for t in theirs.timesteps:
        m = torch.randn(2, 6, 4, 4, generator=g)  # [ε, variance]
        x, want = ours.step(m, t, x).prev_sample, theirs.step(m, t, want).prev_sample
        torch.testing.assert_close(x, want, rtol=1e-4, atol=1e-4)


def test_drop_in_trailing_runs_the_steps_asked_for():
    """diffusers' trailing spacing adds a timestep -1 at 61 steps (of 1000); the fused scheduler drops it."""
    diffusers = pytest.importorskip("diffusers")
    from fastdiff.diffusers import FusedDPMSolverMultistepScheduler

    theirs = diffusers.DPMSolverMultistepScheduler(timestep_spacing="trailing")
    ours = FusedDPMSolverMultistepScheduler.from_config(theirs.config)
    for sched in (theirs, ours):
        sched.set_timesteps(61)
    assert ours.timesteps.tolist() == theirs.timesteps.tolist()[:61] and ours.num_inference_steps == 61
    assert torch.equal(ours.sigmas, torch.cat([theirs.sigmas[:61], theirs.sigmas[-1:]]))
    x = torch.randn(1, 1, 4, 4)
    for t in ours.timesteps:
        x = ours.step(torch.randn_like(x), t, x).prev_sample
    assert torch.isfinite(x).all()


def test_stable_diffusion_pipeline(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from test_diffusers import SD_CONFIG, _tiny_sd, accepted

    from fastdiff.diffusers import FusedDPMSolverMultistepScheduler

    pipe = _tiny_sd(tmp_path)
    cfg = accepted(diffusers.DPMSolverMultistepScheduler, SD_CONFIG)
    pipe.scheduler = diffusers.DPMSolverMultistepScheduler(**cfg)
    kw = dict(prompt=["a cat", "a dog"], num_inference_steps=4, height=16, width=16, guidance_scale=7.5)
    want = images(pipe, generator=torch.Generator().manual_seed(0), **kw)
    pipe.scheduler = FusedDPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    np.testing.assert_allclose(images(pipe, generator=torch.Generator().manual_seed(0), **kw), want, atol=1e-4)


def images(pipe, **kw) -> np.ndarray:
    return pipe(output_type="np", **kw).images
