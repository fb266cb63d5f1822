"""The fused diffusers schedulers' state, as diffusers' own: the generator is used only by steps that add noise, the
step follows config changes made after construction, a saved pipeline loads again, and gradients flow as through
diffusers' step. Tiny random-weight models built here; nothing is downloaded."""
from __future__ import annotations

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="the diffusers extra is not installed (pip install .[diffusers])")

from diffusers import (DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler,  # noqa: E402
                       DiffusionPipeline, DPMSolverMultistepScheduler, UNet2DModel)
from diffusers.configuration_utils import FrozenDict  # noqa: E402

from fastdiff.diffusers import (FusedDDIMScheduler, FusedDDPMScheduler,  # noqa: E402
                                FusedDPMSolverMultistepScheduler)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ATOL = 2e-5


def tiny_unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(32, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=8).eval()


@pytest.mark.parametrize("pipeline,theirs,ours,kw", [
    (DDIMPipeline, DDIMScheduler, FusedDDIMScheduler, dict(eta=0.0)),
    (DDPMPipeline, DPMSolverMultistepScheduler, FusedDPMSolverMultistepScheduler, {})])
def test_deterministic_runs_leave_the_generator_alone(pipeline, theirs, ours, kw):
    """A generator reused across pipeline calls gives diffusers' images on every call, not only the first."""
    pipe = pipeline(unet=tiny_unet(), scheduler=theirs())
    pipe.set_progress_bar_config(disable=True)

    def two_calls(scheduler) -> list[np.ndarray]:
        pipe.scheduler = scheduler
        g = torch.Generator().manual_seed(0)
        return [pipe(batch_size=2, generator=g, num_inference_steps=4, output_type="np", **kw).images
                for _ in range(2)]

    want = two_calls(theirs())
    got = two_calls(ours())
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, atol=ATOL)
    assert np.abs(want[0] - want[1]).max() > 0.1  # the second call starts from other latents


def test_noisy_steps_draw_once_per_run():
    g = torch.Generator().manual_seed(0)
    sched = FusedDDIMScheduler()
    sched.set_timesteps(3)
    x = torch.randn(2, 1, 4, 4)
    before = g.get_state()
    sched.step(x, sched.timesteps[0], x, eta=0.0, generator=g)
    assert torch.equal(g.get_state(), before) and sched.seeds is None
    sched.step(x, sched.timesteps[1], x, eta=1.0, generator=g)
    after = g.get_state()
    assert not torch.equal(after, before) and sched.seeds is not None
    sched.step(x, sched.timesteps[2], x, eta=1.0, generator=g)
    assert torch.equal(g.get_state(), after)


@pytest.mark.parametrize("theirs,ours,change", [
    (DDIMScheduler, FusedDDIMScheduler, dict(clip_sample=False)),
    (DDIMScheduler, FusedDDIMScheduler, dict(prediction_type="v_prediction")),
    (DDIMScheduler, FusedDDIMScheduler, dict(clip_sample_range=0.5)),
    (DDPMScheduler, FusedDDPMScheduler, dict(clip_sample=False)),
    (DPMSolverMultistepScheduler, FusedDPMSolverMultistepScheduler, dict(prediction_type="v_prediction")),
])
@pytest.mark.parametrize("how", ["register_to_config", "replaced"])
def test_the_step_follows_the_current_config(theirs, ours, change, how):
    """register_to_config, or a new config object as StableDiffusionPipeline.__init__ sets (clip_sample,
    steps_offset), takes effect as in diffusers, whose step reads the config at each call."""
    ref, sched = theirs(), ours()
    for s in (ref, sched):
        if how == "register_to_config":
            s.register_to_config(**change)
        else:
            s._internal_dict = FrozenDict({**s.config, **change})
        s.set_timesteps(4)
    torch.manual_seed(0)
    x, m = torch.randn(2, 1, 4, 4) * 3, torch.randn(2, 1, 4, 4)
    for t in sched.timesteps[-1:] if ours is FusedDDPMScheduler else sched.timesteps:  # DDPM: its noise-free step
        a, b = ref.step(m, t, x), sched.step(m, t, x)
        torch.testing.assert_close(b.prev_sample, a.prev_sample, rtol=1e-4, atol=1e-4)
        if hasattr(a, "pred_original_sample"):
            torch.testing.assert_close(b.pred_original_sample, a.pred_original_sample, rtol=1e-4, atol=1e-4)


def test_construction_settings_may_not_change():
    sched = FusedDDIMScheduler()
    sched.register_to_config(set_alpha_to_one=False)
    sched.set_timesteps(3)
    x = torch.randn(1, 1, 4, 4)
    with pytest.raises(ValueError, match="set_alpha_to_one changed in the config after construction"):
        sched.step(x, sched.timesteps[0], x)


def test_a_saved_pipeline_loads_with_its_fused_scheduler(tmp_path):
    pipe = DDPMPipeline(unet=tiny_unet(), scheduler=FusedDDPMScheduler(num_train_timesteps=50, clip_sample_range=0.5))
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.scheduler) is FusedDDPMScheduler and loaded.scheduler.config.clip_sample_range == 0.5
    kw = dict(batch_size=1, num_inference_steps=3, output_type="np")
    np.testing.assert_allclose(loaded(generator=torch.Generator().manual_seed(0), **kw).images,
                               pipe(generator=torch.Generator().manual_seed(0), **kw).images, atol=1e-6)


def _grads(sched, steps: list, x: torch.Tensor, **kw) -> torch.Tensor:
    """d loss / d x through one step, loss of prev_sample (and pred_original_sample where there is one)."""
    x = x.clone().requires_grad_()
    m = torch.tanh(x) * 0.7  # a stand-in model
    for t in steps:
        out = sched.step(m, t, x, **kw)
        loss = (out.prev_sample * torch.linspace(-1, 1, x.numel()).view_as(x)).sum()
        if getattr(out, "pred_original_sample", None) is not None:
            loss = loss + out.pred_original_sample.square().sum()
    return torch.autograd.grad(loss, x)[0]


@pytest.mark.parametrize("theirs,ours,pick", [(DDIMScheduler, FusedDDIMScheduler, slice(1, 2)),
                                              (DDPMScheduler, FusedDDPMScheduler, slice(-1, None)),
                                              (DPMSolverMultistepScheduler, FusedDPMSolverMultistepScheduler,
                                               slice(0, 1))])
def test_gradients_flow_as_through_diffusers_step(theirs, ours, pick):
    """Guidance methods differentiate through step: the fused ops have an autograd formula (clamp included)."""
    x = torch.randn(2, 1, 4, 4) * 2  # some x0 beyond the clamp
    grads = []
    for cls in (theirs, ours):
        sched = cls()
        sched.set_timesteps(5)
        grads.append(_grads(sched, list(sched.timesteps[pick]), x))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-4)
    assert grads[0].abs().sum() > 0


@pytest.mark.parametrize("seeds", [np.int64(5), torch.tensor(5)])
def test_set_seeds_takes_integer_scalars(seeds):
    sched = FusedDDIMScheduler()
    sched.set_seeds(seeds)
    assert sched.initial_noise((2, 1, 2, 2)).shape == (2, 1, 2, 2)
    sched.set_timesteps(2)
    x = torch.zeros(2, 1, 2, 2)
    sched.step(x, sched.timesteps[0], x, eta=1.0)
    assert sched.seeds.tolist() == [5, 6]


@pytest.mark.parametrize("call,match", [
    (lambda s: s.set_seeds([-5, 7]), r"seeds must be in \[0, 2\^63\)"),
    (lambda s: s.set_timesteps(0), "num_inference_steps must be a positive int; got 0"),
    (lambda s: s.set_timesteps(2.5), "num_inference_steps must be a positive int; got 2.5"),
])
def test_bad_arguments_are_one_line_errors(call, match):
    for cls in (FusedDDIMScheduler, FusedDDPMScheduler, FusedDPMSolverMultistepScheduler):
        with pytest.raises(ValueError, match=match):
            call(cls())


@pytest.mark.parametrize("cls", [FusedDDIMScheduler, FusedDPMSolverMultistepScheduler])
def test_a_generator_of_the_wrong_type_is_named(cls):
    sched = cls(**({"algorithm_type": "sde-dpmsolver++"} if cls is FusedDPMSolverMultistepScheduler else {}))
    sched.set_timesteps(2)
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match="generator must be a torch.Generator, a list of them .* got int"):
        sched.step(x, sched.timesteps[0], x, generator=0, **({"eta": 1.0} if cls is FusedDDIMScheduler else {}))
