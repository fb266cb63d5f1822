"""fastdiff inside diffusers: the fused drop-in schedulers in real pipelines (DDIM, DDPM, Stable Diffusion), diffusers
folders in (load_diffusers, the CLI) and out (save_diffusers, `fastdiff export --format diffusers`).

Every model is a tiny random-weight one built here; nothing is downloaded."""
from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

diffusers = pytest.importorskip("diffusers", reason="the diffusers extra is not installed (pip install .[diffusers])")

from diffusers import (DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DConditionModel,  # noqa: E402
                       UNet2DModel)
from diffusers.pipelines.ddim import pipeline_ddim  # noqa: E402
from diffusers.schedulers import scheduling_ddpm  # noqa: E402

from fastdiff import noise, ops  # noqa: E402
from fastdiff.checkpoint import BUNDLED_MODEL, load_model  # noqa: E402
from fastdiff.cli import main  # noqa: E402
from fastdiff.diffusers import FusedDDIMScheduler, FusedDDPMScheduler  # noqa: E402
from fastdiff.engine import generate  # noqa: E402
from fastdiff.interop.diffusers import load_diffusers, save_diffusers  # noqa: E402
from fastdiff.schedule import NoiseSchedule  # noqa: E402

SD_CONFIG = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                 set_alpha_to_one=False, steps_offset=1)
def accepted(cls: type, config: dict) -> dict:
    """The part of config that scheduler class cls takes."""
    return {k: v for k, v in config.items() if k in inspect.signature(cls.__init__).parameters}


ATOL = 2e-5  # fp32: diffusers keeps its tables and scalars in float32, fastdiff computes the scalars in float64


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_unet(seed: int = 0, **overrides) -> UNet2DModel:
    torch.manual_seed(seed)
    kw = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(32, 32), layers_per_block=1,
              down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
              norm_num_groups=8)
    return UNet2DModel(**{**kw, **overrides}).eval()


def philox(seeds: torch.Tensor, t: int, like: torch.Tensor) -> torch.Tensor:
    """fastdiff's noise of step t for each sample, shaped like `like`."""
    return noise.gaussian(seeds.cpu(), int(t), like[0].numel()).reshape(like.shape).to(like)


def images(pipe, **kw) -> np.ndarray:
    return pipe(output_type="np", **kw).images


class PhiloxNoise:
    """Hands diffusers' own schedulers fastdiff's noise of (seeds, t): DDIM through variance_noise, DDPM by
    replacing its randn_tensor."""

    def __init__(self, monkeypatch, seeds: torch.Tensor):
        self.seeds, self.t = seeds, None
        ddim_step, ddpm_step = DDIMScheduler.step, DDPMScheduler.step

        def ddim(sched, m, t, x, eta=0.0, use_clipped_model_output=False, generator=None, variance_noise=None,
                 return_dict=True):
            return ddim_step(sched, m, t, x, eta=eta, use_clipped_model_output=use_clipped_model_output,
                             variance_noise=philox(self.seeds, t, x), return_dict=return_dict)

        def ddpm(sched, m, t, x, generator=None, return_dict=True):
            self.t = int(t)
            return ddpm_step(sched, m, t, x, return_dict=return_dict)

        monkeypatch.setattr(DDIMScheduler, "step", ddim)
        monkeypatch.setattr(DDPMScheduler, "step", ddpm)
        monkeypatch.setattr(scheduling_ddpm, "randn_tensor",
                            lambda shape, **kw: philox(self.seeds, self.t, torch.empty(shape)))


# --- the schedulers ----------------------------------------------------------------------------------------------
CONFIGS = [dict(), SD_CONFIG | dict(prediction_type="v_prediction", timestep_spacing="trailing"),
           dict(beta_schedule="squaredcos_cap_v2", clip_sample_range=2.0, timestep_spacing="linspace"),
           dict(trained_betas=np.linspace(1e-4, 0.02, 1000).tolist(), prediction_type="sample")]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("ours,theirs", [(FusedDDIMScheduler, DDIMScheduler), (FusedDDPMScheduler, DDPMScheduler)])
def test_from_config_is_a_diffusers_scheduler(ours, theirs, config, tmp_path):
    ref = theirs(**accepted(theirs, config))
    sched = ours.from_config(ref.config)
    assert isinstance(sched, theirs) and isinstance(sched, diffusers.SchedulerMixin)
    assert {k: v for k, v in sched.config.items() if not k.startswith("_")} == \
        {k: v for k, v in ref.config.items() if not k.startswith("_")}
    assert theirs.__name__ in sched._compatibles and sched.order == 1 and sched.init_noise_sigma == 1.0
    ref.set_timesteps(7)
    sched.set_timesteps(7)
    assert torch.equal(sched.timesteps, ref.timesteps) and torch.equal(sched.alphas_cumprod, ref.alphas_cumprod)
    x, z, t = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4), torch.tensor([5, 600])
    assert torch.equal(sched.add_noise(x, z, t), ref.add_noise(x, z, t)) and sched.scale_model_input(x, 5) is x
    sched.save_pretrained(tmp_path)
    assert type(ours.from_pretrained(tmp_path)) is ours and type(theirs.from_config(sched.config)) is theirs
    for other in (DDPMScheduler, diffusers.PNDMScheduler, diffusers.DPMSolverMultistepScheduler):  # SD's defaults
        assert isinstance(ours.from_config(other(**accepted(other, SD_CONFIG)).config), ours)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("clip,clipped_eps", [(True, False), (False, False), (True, True)])
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_step_matches_diffusers(prediction, clip, clipped_eps, eta):
    ref = DDIMScheduler(prediction_type=prediction, clip_sample=clip)
    sched = FusedDDIMScheduler.from_config(ref.config)
    sched.set_seeds(11)
    for s in (ref, sched):
        s.set_timesteps(5)
    for t in sched.timesteps:
        x, m = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
        ours = sched.step(m, t, x, eta=eta, use_clipped_model_output=clipped_eps)
        want = ref.step(m, t, x, eta=eta, use_clipped_model_output=clipped_eps,
                        variance_noise=philox(sched.seeds, t, x) if eta else None)
        torch.testing.assert_close(ours.prev_sample, want.prev_sample, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours.pred_original_sample, want.pred_original_sample, rtol=1e-4, atol=1e-4)
        prev, x0 = sched.step(m, t, x, eta=eta, use_clipped_model_output=clipped_eps, return_dict=False)
        assert torch.equal(prev, ours.prev_sample) and torch.equal(x0, ours.pred_original_sample)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_small_log", "fixed_large"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace", "custom"])
def test_ddpm_step_matches_diffusers(monkeypatch, prediction, variance, spacing):
    ref = DDPMScheduler(prediction_type=prediction, variance_type=variance,
                        timestep_spacing="leading" if spacing == "custom" else spacing)
    sched = FusedDDPMScheduler.from_config(ref.config)
    sched.set_seeds([3, 99])
    PhiloxNoise(monkeypatch, torch.tensor([3, 99]))
    for s in (ref, sched):
        s.set_timesteps(**({"timesteps": [900, 500, 499, 17, 0]} if spacing == "custom" else {"num_inference_steps": 3}))
    for t in sched.timesteps:
        x, m = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
        ours, want = sched.step(m, t, x), ref.step(m, t, x)
        torch.testing.assert_close(ours.prev_sample, want.prev_sample, rtol=1e-4, atol=1e-4)
    if spacing != "custom":  # fastdiff's own plans (the Engine, the ONNX runtime) step the same way
        options = {**sched.options, "variance_type": "fixed_small" if variance == "fixed_small_log" else variance}
        plan = sched.schedule.reverse_steps("ddpm", 3, **options)
        assert [s.coefs for s in plan] == [c for c in sched._coefs.values()]


def test_noise_is_philox_bit_for_bit():
    """With x = m = 0 a DDPM step is σ·z: z is exactly fastdiff's NumPy Philox normals of (seed, t, index)."""
    sched = FusedDDPMScheduler()
    sched.set_timesteps(10)
    sched.set_seeds([7, 2**40])
    t = int(sched.timesteps[3])
    x = torch.zeros(2, 3, 5, 5)
    out = sched.step(x, t, x).prev_sample
    sigma = np.float32(sched.schedule.step_coefs("ddpm", t, int(sched.timesteps[4]), **sched.options).sigma)
    want = sigma * noise.gaussian(np.array([7, 2**40], dtype=np.int64), t, 75).reshape(2, 3, 5, 5)
    assert np.array_equal(out.numpy(), want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_same_noise_on_every_device():
    x = torch.randn(2, 4, 8, 8)
    outs = []
    for device in ("cpu", "cuda"):
        sched = FusedDDIMScheduler(**SD_CONFIG)
        sched.set_timesteps(10)
        sched.set_seeds(5)
        outs.append(sched.step(x.to(device) * 0, 501, x.to(device) * 0, eta=1.0).prev_sample.cpu())
        outs.append(sched.initial_noise((2, 4, 8, 8), device).cpu())
    assert torch.equal(outs[0], outs[2]) and torch.equal(outs[1], outs[3])


@pytest.mark.parametrize("kwargs,match", [
    (dict(thresholding=True), "thresholding"), (dict(variance_type="learned_range"), "variance_type"),
    (dict(variance_type="fixed_large_log"), "variance_type"), (dict(rescale_betas_zero_snr=True), "rescale"),
    (dict(beta_schedule="laplace"), "beta_schedule"), (dict(trained_betas=[0.1, 0.2]), "trained_betas"),
])
def test_unsupported_configs_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FusedDDPMScheduler(**kwargs)
    with pytest.raises(ValueError, match="beta_schedule"):
        FusedDDIMScheduler(beta_schedule="sigmoid")


def test_step_errors():
    sched = FusedDDIMScheduler()
    x = torch.zeros(2, 1, 4, 4)
    with pytest.raises(ValueError, match="set_timesteps"):
        sched.step(x, 10, x)
    sched.set_timesteps(4)
    with pytest.raises(ValueError, match="list of 3 generators"):
        sched.step(x, 750, x, generator=[torch.Generator()] * 3)
    with pytest.raises(ValueError, match="seeds"):
        sched.set_seeds(1.5)
    with pytest.raises(ValueError, match="initial_noise needs explicit seeds"):
        sched.initial_noise((1, 1, 4, 4))
    ddpm = FusedDDPMScheduler()
    ddpm.set_timesteps(4)
    with pytest.raises(ValueError, match="not one of this run's timesteps"):
        ddpm.step(x, 3, x)


@pytest.mark.parametrize("ours,theirs", [(FusedDDIMScheduler, DDIMScheduler), (FusedDDPMScheduler, DDPMScheduler)])
def test_trailing_runs_the_steps_asked_for(ours, theirs):
    """diffusers' trailing spacing adds a timestep -1 at 61 steps (of 1000); the fused schedulers drop it."""
    ref, sched = theirs(timestep_spacing="trailing"), ours(timestep_spacing="trailing")
    ref.set_timesteps(61)
    sched.set_timesteps(61)
    assert sched.timesteps.tolist() == ref.timesteps.tolist()[:61] and min(sched.timesteps.tolist()) == 15
    sched.set_seeds(0)
    x = torch.randn(1, 1, 4, 4)
    for t in sched.timesteps:
        x = sched.step(torch.randn_like(x), t, x).prev_sample
    assert torch.isfinite(x).all()


# --- real pipelines ----------------------------------------------------------------------------------------------
def test_ddim_pipeline_matches_diffusers(monkeypatch):
    pipe = DDIMPipeline(unet=tiny_unet(), scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    want = images(pipe, batch_size=2, num_inference_steps=4, eta=0.0, generator=torch.Generator().manual_seed(0))
    fused = DDIMPipeline(unet=pipe.unet, scheduler=pipe.scheduler)
    fused.scheduler = FusedDDIMScheduler.from_config(pipe.scheduler.config)  # DDIMPipeline() converts to DDIM
    fused.set_progress_bar_config(disable=True)
    got = images(fused, batch_size=2, num_inference_steps=4, eta=0.0, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(got, want, atol=ATOL)
    # with noise: equal when diffusers is handed fastdiff's noise, and the fused op equals the reference bitwise
    fused.scheduler.set_seeds(42)
    got = images(fused, batch_size=2, num_inference_steps=4, eta=1.0, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(FusedDDIMScheduler, "step_fn", staticmethod(ops.reverse_step_reference))
    assert np.array_equal(got, images(fused, batch_size=2, num_inference_steps=4, eta=1.0,
                                      generator=torch.Generator().manual_seed(0)))
    PhiloxNoise(monkeypatch, torch.tensor([42, 43]))
    want = images(pipe, batch_size=2, num_inference_steps=4, eta=1.0, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(got, want, atol=ATOL)
    assert np.abs(got - images(fused, batch_size=2, num_inference_steps=4, eta=0.0,
                               generator=torch.Generator().manual_seed(0))).max() > 1e-3  # the noise matters


def test_ddpm_pipeline_matches_diffusers(monkeypatch):
    pipe = DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(variance_type="fixed_small_log"))
    pipe.set_progress_bar_config(disable=True)
    fused = DDPMPipeline(unet=pipe.unet, scheduler=FusedDDPMScheduler.from_config(pipe.scheduler.config))
    fused.set_progress_bar_config(disable=True)
    fused.scheduler.set_seeds([5, 6])
    got = images(fused, batch_size=2, num_inference_steps=5, generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(FusedDDPMScheduler, "step_fn", staticmethod(ops.reverse_step_reference))
    assert np.array_equal(got, images(fused, batch_size=2, num_inference_steps=5,
                                      generator=torch.Generator().manual_seed(1)))
    PhiloxNoise(monkeypatch, torch.tensor([5, 6]))
    want = images(pipe, batch_size=2, num_inference_steps=5, generator=torch.Generator().manual_seed(1))
    np.testing.assert_allclose(got, want, atol=ATOL)


def test_seeds_come_from_the_generators_once_per_run(monkeypatch):
    """A list of generators: one seed per image, so an image is the same alone or in a batch; one generator: one
    draw per run (at its first step); set_seeds: the same seeds every run."""
    pipe = DDIMPipeline(unet=tiny_unet(), scheduler=DDIMScheduler())
    pipe.scheduler = FusedDDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    seen = []
    step = FusedDDIMScheduler.step

    def spy(sched, *args, **kw):
        out = step(sched, *args, **kw)
        seen.append(sched.seeds.clone())
        return out

    monkeypatch.setattr(FusedDDIMScheduler, "step", spy)
    pair = images(pipe, batch_size=2, num_inference_steps=3, eta=1.0,
                  generator=[torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)])
    alone = images(pipe, batch_size=1, num_inference_steps=3, eta=1.0, generator=[torch.Generator().manual_seed(1)])
    np.testing.assert_allclose(pair[1:], alone, atol=ATOL)
    assert seen[0][1] == seen[3][0] and all(torch.equal(s, seen[0]) for s in seen[:3])
    g = torch.Generator().manual_seed(3)
    images(pipe, batch_size=2, num_inference_steps=3, eta=1.0, generator=g)
    images(pipe, batch_size=2, num_inference_steps=3, eta=1.0, generator=g)
    assert torch.equal(seen[6], seen[8]) and not torch.equal(seen[6], seen[9])  # one draw per run
    assert seen[6][1] == seen[6][0] + 1  # one generator: image i uses base + i
    pipe.scheduler.set_seeds(7)
    images(pipe, batch_size=2, num_inference_steps=3, eta=1.0, generator=g)
    assert seen[-1].tolist() == [7, 8]


def _tiny_sd(tmp_path: Path):
    transformers = pytest.importorskip("transformers", reason="the diffusers extra (transformers) is not installed")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = transformers.CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"),
                                           model_max_length=16)
    torch.manual_seed(0)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=2, vocab_size=len(vocab), max_position_embeddings=16)).eval()
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 32),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=4, norm_num_groups=8).eval()
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(32, 32), latent_channels=4,
                                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                  layers_per_block=1, norm_num_groups=8, sample_size=16).eval()
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                             scheduler=DDIMScheduler(**SD_CONFIG), safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_stable_diffusion_pipeline(tmp_path, monkeypatch):
    """Latent text-to-image with the pipeline's own classifier-free guidance (guidance_scale 7.5)."""
    pipe = _tiny_sd(tmp_path)
    kw = dict(prompt=["a cat", "a dog"], num_inference_steps=3, height=16, width=16, guidance_scale=7.5)
    want = images(pipe, generator=torch.Generator().manual_seed(0), **kw)
    ddim = pipe.scheduler
    pipe.scheduler = FusedDDIMScheduler.from_config(ddim.config)
    np.testing.assert_allclose(images(pipe, generator=torch.Generator().manual_seed(0), **kw), want, atol=ATOL)
    # noise and latents from one seed each (the same on every device); diffusers handed the same numbers
    pipe.scheduler.set_seeds(100)
    latents = pipe.scheduler.initial_noise((2, 4, 8, 8))
    got = images(pipe, eta=1.0, latents=latents, **kw)
    assert np.array_equal(got, images(pipe, eta=1.0, latents=latents.clone(), **kw))
    PhiloxNoise(monkeypatch, torch.tensor([100, 101]))
    pipe.scheduler = ddim
    np.testing.assert_allclose(images(pipe, eta=1.0, latents=latents, **kw), got, atol=ATOL)


# --- diffusers folders in --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ddpm_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("diffusers") / "ddpm"
    DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(num_train_timesteps=100)).save_pretrained(folder)
    return folder


def test_load_pipeline_folder(ddpm_folder):
    model, schedule, info = load_diffusers(ddpm_folder)
    assert schedule == NoiseSchedule(num_train_timesteps=100) and info["image_shape"] == (1, 8, 8)
    assert info["scheduler_class"] == "DDPMScheduler" and info["options"]["ddpm"]["variance_type"] == "fixed_small"
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0, 5, 99])
    with torch.no_grad():
        assert torch.equal(model(x, t), tiny_unet()(x, t).sample)
    with pytest.raises(ValueError, match="unconditional"):
        model(x, t, torch.zeros(3, dtype=torch.long))


def test_load_bare_unet_folder(tmp_path):
    tiny_unet().save_pretrained(tmp_path)
    DDIMScheduler(**SD_CONFIG).save_pretrained(tmp_path)
    _, schedule, info = load_diffusers(tmp_path)
    assert schedule.beta_schedule == "quadratic" and schedule.beta_start == 0.00085
    assert info["options"]["ddim"] == {"spacing": "leading", "steps_offset": 1, "clip_sample": False,
                                       "clip_sample_range": 1.0, "set_alpha_to_one": False}


def _break(folder: Path, how: str) -> Path:
    if how == "file":
        (folder / "x.txt").write_text("")
        return folder / "x.txt"
    if how == "empty":
        return folder
    if how == "missing":
        return folder / "nope"
    DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler()).save_pretrained(
        folder, safe_serialization=how != "pickle")
    unet, sched = folder / "unet", folder / "scheduler" / "scheduler_config.json"
    edit = {"euler": (sched, {"_class_name": "EulerDiscreteScheduler"}), "threshold": (sched, {"thresholding": True}),
            "learned": (sched, {"variance_type": "learned"}), "channels": (unet / "config.json", {"out_channels": 2}),
            "size": (unet / "config.json", {"sample_size": None}), "classes": (unet / "config.json", {"num_class_embeds": 10}),
            "weights": (unet / "config.json", {"block_out_channels": [32, 64]})}
    if how in edit:
        file, change = edit[how]
        file.write_text(json.dumps({**json.loads(file.read_text()), **change}))
    elif how == "noweights":
        (unet / "diffusion_pytorch_model.safetensors").unlink()
    elif how == "partial":
        weights = unet / "diffusion_pytorch_model.safetensors"
        state = load_file(weights)
        save_file({k: v for k, v in state.items() if k != "conv_in.bias"}, weights)
    elif how == "nosched":
        shutil.rmtree(folder / "scheduler")
    elif how == "json":
        sched.write_text("{not json")
    elif how == "conditional":
        shutil.rmtree(unet)
        UNet2DConditionModel(sample_size=8, block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=8,
                             down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), cross_attention_dim=32,
                             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4).save_pretrained(unet)
    return folder


@pytest.mark.parametrize("how,match", [
    ("missing", "no such folder"), ("file", "a file"), ("empty", "not a diffusers folder"),
    ("nosched", "no scheduler config"), ("euler", "supported: DDPMScheduler"), ("threshold", "thresholding"),
    ("learned", "variance_type 'learned'"), ("channels", "out_channels"), ("size", "sample_size"),
    ("classes", "class-conditional"), ("conditional", "UNet2DConditionModel"), ("pickle", "pickle"),
    ("noweights", "no weights"), ("weights", "do not match|could not be loaded"), ("json", "readable JSON"),
    ("partial", "missing keys .'conv_in.bias'"),
])
def test_bad_folders_are_one_line_errors(tmp_path, capsys, how, match):
    path = _break(tmp_path, how)
    with pytest.raises(ValueError, match=match) as e:
        load_diffusers(path)
    assert "\n" not in str(e.value) and str(tmp_path) in str(e.value)
    assert main(["sample", "--diffusers", str(path), "--n", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastdiff sample: error: ") and "Traceback" not in err and len(err.splitlines()) == 1


def test_engine_on_a_folder_equals_the_fused_pipeline(ddpm_folder, monkeypatch):
    """The Engine on a loaded folder and DDIMPipeline + FusedDDIMScheduler with the same seeds: the same images."""
    model, schedule, info = load_diffusers(ddpm_folder)
    ours = generate(model, schedule, info["image_shape"], 2, seed=3, steps=4, eta=1.0,
                    use_clipped_model_output=False)  # diffusers' semantics, not fastdiff's default
    pipe = DDIMPipeline.from_pretrained(ddpm_folder)
    pipe.scheduler = FusedDDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler.set_seeds(3)
    monkeypatch.setattr(pipeline_ddim, "randn_tensor", lambda shape, **kw: pipe.scheduler.initial_noise(shape))
    theirs = pipe(batch_size=2, num_inference_steps=4, eta=1.0, output_type="pt").images
    torch.testing.assert_close(theirs, (ours + 1) / 2, rtol=0, atol=1e-5)


def test_onnx_export_and_runtime_on_a_folder(ddpm_folder, tmp_path):
    from fastdiff.export.runtime import OnnxSampler

    assert main(["export", "--diffusers", str(ddpm_folder), "--out", str(tmp_path / "m.onnx")]) == 0
    runner = OnnxSampler(tmp_path / "m.onnx")
    assert runner.image_shape == (1, 8, 8) and runner.schedule == NoiseSchedule(num_train_timesteps=100)
    model, schedule, info = load_diffusers(ddpm_folder)
    want = generate(model, schedule, info["image_shape"], 3, seed=9, steps=5).numpy()
    np.testing.assert_allclose(runner.sample(3, seed=9, steps=5), want, atol=1e-4)


def test_cli_sample_from_a_folder(tmp_path):
    folder = tmp_path / "sd-like"
    tiny_unet().save_pretrained(folder)
    DDIMScheduler(num_train_timesteps=100, clip_sample=False, steps_offset=1, set_alpha_to_one=False).save_pretrained(
        folder)
    assert main(["sample", "--diffusers", str(folder), "--n", "3", "--steps", "4", "--out", str(tmp_path / "o"),
                 "--quiet"]) == 0
    info = json.loads((tmp_path / "o" / "ddim-4.json").read_text())
    assert info["source"] == str(folder) and info["count"] == 3 and info["clip_sample"] is False
    assert info["steps_offset"] == 1 and info["set_alpha_to_one"] is False
    assert len(list((tmp_path / "o" / "ddim-4").glob("*.png"))) == 3


# --- diffusers folders out -----------------------------------------------------------------------------------------
def test_export_to_a_diffusers_folder(tmp_path, capsys, ddpm_folder):
    out = tmp_path / "digits-diffusers"
    assert main(["export", "--format", "diffusers", "--out", str(out)]) == 0
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file() and not list(out.rglob("*.bin"))
    assert json.loads((out / "fastdiff_export.json").read_text())["source"] == str(BUNDLED_MODEL)
    pipe = DDPMPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert pipe(batch_size=1, num_inference_steps=2, output_type="np").images.shape == (1, 16, 16, 1)
    model, schedule, _ = load_model(BUNDLED_MODEL)
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([3, 700])
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x, t).sample, model(x, t), rtol=1e-4, atol=1e-4)
    assert load_diffusers(out)[1] == schedule
    capsys.readouterr()
    assert main(["eval", "--diffusers", str(out / "unet" / "config.json"), "--quick", "--quiet"]) == 2
    err = capsys.readouterr().err  # eval reads folders through load_diffusers
    assert err.startswith("fastdiff eval: error: ") and "not a diffusers folder (a file)" in err
    assert main(["export", "--format", "diffusers", "--out", str(out)]) == 0  # an export is replaced whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits-diffusers"]  # no temporary folders left
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep")
    capsys.readouterr()
    assert main(["export", "--format", "diffusers", "--out", str(tmp_path / "other")]) == 2
    assert "exists" in capsys.readouterr().err and (tmp_path / "other" / "notes.txt").read_text() == "keep"
    assert main(["export", "--format", "diffusers", "--out", str(ddpm_folder)]) == 2  # not ours: never replaced
    assert load_diffusers(ddpm_folder)[1] == NoiseSchedule(num_train_timesteps=100)
    assert main(["export", "--format", "diffusers", "--diffusers", str(out), "--out", str(tmp_path / "x")]) == 2


def test_save_diffusers_writes_the_schedule(tmp_path, tiny_model):
    schedule = NoiseSchedule(num_train_timesteps=50, beta_schedule="cosine", prediction_type="v_prediction")
    save_diffusers(tiny_model, schedule, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "scheduler" / "scheduler_config.json").read_text())
    assert config["beta_schedule"] == "squaredcos_cap_v2" and config["prediction_type"] == "v_prediction"
    assert NoiseSchedule.from_diffusers_config(config) == schedule
