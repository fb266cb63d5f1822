import pytest
import torch

from fastdiff import ops
from fastdiff.nn.unet import UNet
from fastdiff.engine import generate
from fastdiff.sampling import guided_output, initial_noise, make_seeds, sample_ddim, sample_ddpm
from fastdiff.schedule import NoiseSchedule

from conftest import TINY

SHAPE = (1, 8, 8)


def smooth_model(x, t, y=None):
    """A stand-in denoiser with a small Jacobian: an untrained U-Net amplifies 1-ulp differences
    between two correct implementations ~1e4-fold over a loop, which would hide real bugs in noise."""
    return 0.5 * torch.tanh(x) + 1e-4 * t.view(-1, *([1] * (x.dim() - 1)))


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_ddim_loop_matches_diffusers(prediction):
    diffusers = pytest.importorskip("diffusers")
    schedule = NoiseSchedule(prediction_type=prediction)
    seeds = make_seeds(3, 2)
    x = initial_noise(seeds, SHAPE)
    with torch.no_grad():
        ours = sample_ddim(smooth_model, x, seeds, schedule, 20)
        sched = diffusers.DDIMScheduler(prediction_type=prediction)
        sched.alphas_cumprod = torch.from_numpy(schedule.alphas_cumprod)
        sched.set_timesteps(20)
        theirs = x.clone()
        for t in sched.timesteps:
            theirs = sched.step(smooth_model(theirs, t.expand(2)), t, theirs).prev_sample
    assert torch.allclose(ours, theirs, atol=1e-5)


@pytest.mark.parametrize("sampler,kw", [(sample_ddim, dict(eta=1.0)), (sample_ddim, dict(eta=0.0, spacing="trailing")),
                                        (sample_ddpm, dict(variance_type="fixed_large"))])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_fused_op_matches_reference(sampler, kw, prediction):
    schedule = NoiseSchedule(prediction_type=prediction)
    seeds = make_seeds(0, 3)
    x = initial_noise(seeds, SHAPE)
    with torch.no_grad():
        fused = sampler(smooth_model, x, seeds, schedule, 10, step_fn=ops.reverse_step, **kw)
        ref = sampler(smooth_model, x, seeds, schedule, 10, step_fn=ops.reverse_step_reference, **kw)
    assert torch.allclose(fused, ref, rtol=1e-5, atol=1e-5)


def test_sample_does_not_depend_on_its_batch(tiny_model):
    together = generate(tiny_model, NoiseSchedule(), SHAPE, 5, seed=10, sampler="ddim", steps=8, eta=1.0)
    for i in (0, 3):
        alone = generate(tiny_model, NoiseSchedule(), SHAPE, 1, seed=10 + i, sampler="ddim", steps=8, eta=1.0)
        assert torch.allclose(alone[0], together[i], atol=1e-5)
    split = generate(tiny_model, NoiseSchedule(), SHAPE, 5, seed=10, sampler="ddim", steps=8, eta=1.0, batch_size=2)
    assert torch.allclose(split, together, atol=1e-5)


def test_deterministic_and_seed_dependent(tiny_model):
    a = generate(tiny_model, NoiseSchedule(), SHAPE, 2, seed=1, sampler="ddpm", steps=10)
    assert torch.equal(a, generate(tiny_model, NoiseSchedule(), SHAPE, 2, seed=1, sampler="ddpm", steps=10))
    assert not torch.allclose(a, generate(tiny_model, NoiseSchedule(), SHAPE, 2, seed=2, sampler="ddpm", steps=10))
    assert a.min() >= -1 and a.max() <= 1


def test_initial_noise_is_standard_normal():
    x = initial_noise(make_seeds(0, 64), (3, 32, 32))
    assert abs(x.mean().item()) < 0.01 and abs(x.std().item() - 1) < 0.01


def test_classifier_free_guidance_combines_outputs():
    def model(x, t, y=None):
        return torch.where((y >= 0)[:, None], 2.0, 1.0) * torch.ones_like(x)

    x, y = torch.zeros(3, 2), torch.tensor([1, 2, 3])
    assert torch.equal(guided_output(model, x, 5, y, 3.0), torch.full_like(x, 1 + 3 * (2 - 1)))
    assert torch.equal(guided_output(model, x, 5, y, 1.0), torch.full_like(x, 2.0))


def test_guided_sampling_runs_on_a_class_conditional_model():
    model = UNet(TINY.__class__(**{**TINY.to_dict(), "num_classes": 10})).eval()
    out = generate(model, NoiseSchedule(), SHAPE, 4, classes=7, guidance=3.0, num_classes=10, steps=5)
    assert out.shape == (4, *SHAPE) and torch.isfinite(out).all()


def test_nan_from_the_model_is_reported():
    def broken(x, t, y=None):
        return torch.full_like(x, float("nan")) if t[0] < 500 else torch.zeros_like(x)

    with pytest.raises(FloatingPointError, match="NaN or inf at timestep"):
        generate(broken, NoiseSchedule(), SHAPE, 2, steps=10)


@pytest.mark.parametrize("kwargs,match", [
    (dict(n=0), "n "), (dict(guidance=2.0), "guidance != 1 needs class ids"),
    (dict(classes=3), "unconditional"), (dict(sampler="plms"), "sampler"), (dict(steps=0), "steps"),
    (dict(steps=5000), "steps"), (dict(eta=-1.0), "eta")])
def test_bad_requests(tiny_model, kwargs, match):
    args = dict(n=2, steps=5) | kwargs
    with pytest.raises(ValueError, match=match):
        generate(tiny_model, NoiseSchedule(), SHAPE, **args)


def test_class_ids_out_of_range():
    model = UNet(TINY.__class__(**{**TINY.to_dict(), "num_classes": 10})).eval()
    with pytest.raises(ValueError, match="class id"):
        generate(model, NoiseSchedule(), SHAPE, 2, classes=10, num_classes=10, steps=5)


def test_fastdiff_ddim_default_rederives_eps_from_the_clamped_x0():
    """fastdiff's own default (generate, CLI, eval, server, ONNX runtime) is use_clipped_model_output=True when
    x0 is clamped; diffusers' semantics stay one option away and remain the plain samplers' default."""
    from fastdiff.request import SampleRequest

    schedule = NoiseSchedule()
    req = SampleRequest.checked(schedule, 0, 2, sampler="ddim", steps=10)
    assert req.options["use_clipped_model_output"] is True
    assert req.reverse_steps == schedule.reverse_steps("ddim", 10, use_clipped_model_output=True)
    diffusers = SampleRequest.checked(schedule, 0, 2, sampler="ddim", steps=10, use_clipped_model_output=False)
    assert diffusers.reverse_steps == schedule.reverse_steps("ddim", 10)
    assert "use_clipped_model_output" not in SampleRequest.checked(schedule, 0, 2, sampler="ddpm").options
    assert SampleRequest.checked(schedule, 0, 2, clip_sample=False).options == {"clip_sample": False}
