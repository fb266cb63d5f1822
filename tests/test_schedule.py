import math

import numpy as np
import pytest
import torch

from fastdiff.schedule import NoiseSchedule, StepCoefs, make_betas

diffusers = pytest.importorskip("diffusers")


def float64_tables(sched):
    """diffusers keeps alphas_cumprod in float32, which loses ~1e-4 of 1 - ᾱ near t = 0; compare in float64."""
    sched.alphas_cumprod = torch.from_numpy(NoiseSchedule(num_train_timesteps=sched.config.num_train_timesteps).alphas_cumprod)
    if hasattr(sched, "final_alpha_cumprod") and sched.config.set_alpha_to_one is False:
        sched.final_alpha_cumprod = sched.alphas_cumprod[0]
    return sched


def apply(c: StepCoefs, x: torch.Tensor, m: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """The fused step's math in float64."""
    x, m, z = x.double(), m.double(), z.double()
    x0 = c.a * x + c.b * m
    if math.isfinite(c.clip_range):
        x0 = x0.clamp(-c.clip_range, c.clip_range)
    return c.k_x0 * x0 + c.k_x * x + c.k_m * m + c.sigma * z


def test_betas_closed_forms():
    T = 1000
    lin = torch.from_numpy(make_betas("linear", T))
    assert lin.dtype == torch.float64 and lin[0] == pytest.approx(1e-4) and lin[-1] == pytest.approx(0.02)
    quad = torch.from_numpy(make_betas("quadratic", T))
    assert torch.allclose(quad.sqrt(), torch.linspace(1e-4**0.5, 0.02**0.5, T, dtype=torch.float64))
    sig = torch.from_numpy(make_betas("sigmoid", T))
    assert (sig.diff() > 0).all() and sig.min() > 1e-4 and sig.max() < 0.02
    cos = torch.from_numpy(make_betas("cosine", T))
    ac = torch.cumprod(1 - cos, 0)
    f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2
    for t in (0, 10, 500, 900):
        assert ac[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert cos.max() <= 0.999
    s = NoiseSchedule()
    assert s.alphas_cumprod.dtype == np.float64
    assert np.allclose(s.alphas_cumprod, np.cumprod(1 - s.betas))


@pytest.mark.parametrize("kind,name", [("linear", "linear"), ("quadratic", "scaled_linear"), ("cosine", "squaredcos_cap_v2")])
def test_betas_match_diffusers(kind, name):
    ours = torch.from_numpy(NoiseSchedule(beta_schedule=kind).alphas_cumprod)
    theirs = diffusers.DDPMScheduler(beta_schedule=name).alphas_cumprod.double()
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-7)


def test_q_sample_statistics():
    s = NoiseSchedule()
    n, t = 200_000, 300
    x0 = torch.full((n, 1), 0.7)
    xt = s.q_sample(x0, torch.full((n,), t), torch.randn(n, 1))
    ac = float(s.alphas_cumprod[t])
    assert xt.mean().item() == pytest.approx(math.sqrt(ac) * 0.7, abs=0.01)
    assert xt.std().item() == pytest.approx(math.sqrt(1 - ac), rel=0.01)


def test_v_target_recovers_eps_and_x0():
    s = NoiseSchedule(prediction_type="v_prediction")
    x0, eps, t = torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0, 10, 500, 999])
    xt, v = s.q_sample(x0, t, eps), s.training_target(x0, t, eps)
    ac = torch.from_numpy(s.alphas_cumprod)[t].float()[:, None]
    assert torch.allclose(ac.sqrt() * xt - (1 - ac).sqrt() * v, x0, atol=1e-5)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 10, 50, 333, 1000])
def test_timesteps_match_diffusers(spacing, steps):
    for cls in (diffusers.DDIMScheduler, diffusers.DDPMScheduler):
        sched = cls(timestep_spacing=spacing, steps_offset=1 if spacing == "leading" and steps < 1000 else 0)
        sched.set_timesteps(steps)
        ours = NoiseSchedule().timesteps(steps, spacing, sched.config.steps_offset)
        assert ours == sched.timesteps.tolist()


@pytest.mark.parametrize("T", [1000, 333])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_timesteps_match_diffusers_for_every_step_count(T, spacing):
    """Every count 1..T gives diffusers' timesteps; where diffusers' trailing spacing adds a timestep -1 (its float
    arange has one point too many for 62 counts of T = 1000: 61, 103, ...), its first `steps` ones."""
    ours_schedule = NoiseSchedule(num_train_timesteps=T)
    for cls in (diffusers.DDIMScheduler, diffusers.DDPMScheduler):
        sched = cls(num_train_timesteps=T, timestep_spacing=spacing)
        for steps in range(1, T + 1):
            sched.set_timesteps(steps)
            theirs = sched.timesteps.tolist()
            assert theirs[steps:] in ([], [-1])
            ours = ours_schedule.timesteps(steps, spacing)
            assert ours == theirs[:steps] and len(set(ours)) == steps and min(ours) >= 0


def test_trailing_plans_have_the_steps_asked_for():
    for sampler in ("ddim", "ddpm"):
        plan = NoiseSchedule().reverse_steps(sampler, 61, spacing="trailing")
        assert len(plan) == 61 and plan[-1].t == 15


PREDICTIONS = ["epsilon", "v_prediction", "sample"]


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("clip,clipped_eps", [(True, False), (False, False), (True, True)])
@pytest.mark.parametrize("spacing,steps", [("leading", 50), ("trailing", 10), ("linspace", 20)])
def test_ddim_step_matches_diffusers(prediction, eta, clip, clipped_eps, spacing, steps):
    sched = diffusers.DDIMScheduler(prediction_type=prediction, clip_sample=clip, timestep_spacing=spacing,
                                    set_alpha_to_one=spacing != "linspace")
    sched.set_timesteps(steps)
    float64_tables(sched)
    plan = NoiseSchedule(prediction_type=prediction).reverse_steps(
        "ddim", steps, eta=eta, spacing=spacing, clip_sample=clip, set_alpha_to_one=spacing != "linspace",
        use_clipped_model_output=clipped_eps)
    assert [s.t for s in plan] == sched.timesteps.tolist()
    for step in plan[:3] + plan[-3:]:
        x, m, z = torch.randn(2, 3, 5, 5), torch.randn(2, 3, 5, 5), torch.randn(2, 3, 5, 5)
        want = sched.step(m, step.t, x, eta=eta, use_clipped_model_output=clipped_eps, variance_noise=z).prev_sample
        assert torch.allclose(apply(step.coefs, x, m, z).float(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("steps", [1000, 25])
def test_ddpm_step_matches_diffusers(prediction, variance, steps):
    sched = diffusers.DDPMScheduler(prediction_type=prediction, variance_type=variance)
    sched.set_timesteps(steps)
    float64_tables(sched)
    plan = NoiseSchedule(prediction_type=prediction).reverse_steps("ddpm", steps, variance_type=variance)
    assert [s.t for s in plan] == sched.timesteps.tolist()
    for step in plan[:3] + plan[-3:]:
        x, m = torch.randn(2, 1, 6, 6), torch.randn(2, 1, 6, 6)
        want = sched.step(m, step.t, x, generator=torch.Generator().manual_seed(step.t)).prev_sample
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(step.t))
        assert torch.allclose(apply(step.coefs, x, m, z).float(), want, rtol=1e-5, atol=1e-5)
    assert plan[-1].coefs.sigma == 0.0  # no noise at t = 0


@pytest.mark.parametrize("kwargs,match", [
    (dict(sampler="ddim", num_steps=0), "steps"),
    (dict(sampler="ddim", num_steps=1001), "steps"),
    (dict(sampler="ddim", num_steps=2.5), "steps"),
    (dict(sampler="ddim", num_steps=10, eta=-0.1), "eta"),
    (dict(sampler="ddim", num_steps=10, eta=float("nan")), "eta"),
    (dict(sampler="ddim", num_steps=10, eta=3.0), "eta"),
    (dict(sampler="euler", num_steps=10), "sampler"),
    (dict(sampler="ddim", num_steps=10, spacing="random"), "spacing"),
    (dict(sampler="ddpm", num_steps=10, variance_type="learned"), "variance_type"),
    (dict(sampler="ddim", num_steps=10, steps_offset=200), "steps_offset"),
])
def test_bad_plans(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NoiseSchedule().reverse_steps(**kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(beta_schedule="exp"), "beta_schedule"), (dict(prediction_type="noise"), "prediction_type"),
    (dict(num_train_timesteps=1), "num_train_timesteps")])
def test_bad_schedules(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NoiseSchedule(**kwargs)
