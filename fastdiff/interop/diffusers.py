"""fastdiff <-> diffusers: a fastdiff U-Net as a diffusers UNet2DModel with the same weights, a NoiseSchedule as
DDIMScheduler/DDPMScheduler arguments, and the DDIMPipeline/DDPMPipeline built from both.

diffusers is an optional extra (`pip install -e .[bench]`): it is imported inside the functions that need it,
so importing this module works without it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..nn.unet import UNet
from ..schedule import NoiseSchedule

if TYPE_CHECKING:
    from diffusers import UNet2DModel

# fastdiff's beta schedule -> diffusers' beta_schedule of the same betas.
BETA_SCHEDULES = {"linear": "linear", "quadratic": "scaled_linear", "cosine": "squaredcos_cap_v2",
                  "sigmoid": "sigmoid"}
SAMPLERS = ("ddim", "ddpm")


def diffusers_available() -> str | None:
    """diffusers' version, or None when the optional extra is not installed."""
    try:
        import diffusers
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None
    return diffusers.__version__


def to_diffusers_unet(model: UNet) -> UNet2DModel:
    """A diffusers UNet2DModel of the same architecture holding the same weights (unconditional nets), on the
    device of model.

    Mapping: time embedding = Timesteps(ch, flip_sin_to_cos=False, freq_shift=1) + TimestepEmbedding;
    ResBlock -> ResnetBlock2D; Attention (1x1 qkv conv) -> Attention(heads=1) with to_q/to_k/to_v/to_out;
    strided conv -> Downsample2D(conv); nearest upsample + conv -> Upsample2D(conv); mid = res, attn, res."""
    from diffusers import UNet2DModel

    c = model.config
    if c.num_classes:
        raise ValueError("to_diffusers_unet: class-conditional nets are not mapped")
    n = len(c.ch_mult)
    res = [c.image_size // 2**i for i in range(n)]
    out = UNet2DModel(
        sample_size=c.image_size, in_channels=c.in_channels, out_channels=c.in_channels, freq_shift=1,
        flip_sin_to_cos=False, block_out_channels=tuple(c.ch * m for m in c.ch_mult), layers_per_block=c.num_res_blocks,
        down_block_types=tuple("AttnDownBlock2D" if r in c.attn_resolutions else "DownBlock2D" for r in res),
        up_block_types=tuple("AttnUpBlock2D" if r in c.attn_resolutions else "UpBlock2D" for r in reversed(res)),
        dropout=c.dropout, attention_head_dim=None, norm_num_groups=32, norm_eps=1e-5, add_attention=True,
        downsample_padding=1)
    src = model.state_dict()
    dst: dict[str, torch.Tensor] = {}

    def put(theirs: str, ours: str, squeeze: bool = False) -> None:
        for p in ("weight", "bias"):
            v = src[f"{ours}.{p}"]
            dst[f"{theirs}.{p}"] = v.flatten(1) if squeeze and p == "weight" else v

    def block(ours: str, res_to: str, attn_to: str | None) -> None:
        for a, b in (("norm1", "norm1"), ("conv1", "conv1"), ("time_emb_proj", "temb_proj"), ("norm2", "norm2"),
                     ("conv2", "conv2")):
            put(f"{res_to}.{a}", f"{ours}.res.{b}")
        if f"{ours}.res.skip.weight" in src:
            put(f"{res_to}.conv_shortcut", f"{ours}.res.skip")
        if attn_to is not None:
            put(f"{attn_to}.group_norm", f"{ours}.attn.norm")
            w, b = src[f"{ours}.attn.qkv.weight"].flatten(1), src[f"{ours}.attn.qkv.bias"]
            for k, name in enumerate(("to_q", "to_k", "to_v")):
                ch = w.shape[1]
                dst[f"{attn_to}.{name}.weight"], dst[f"{attn_to}.{name}.bias"] = w[k * ch:(k + 1) * ch], b[k * ch:(k + 1) * ch]
            put(f"{attn_to}.to_out.0", f"{ours}.attn.proj", squeeze=True)

    put("conv_in", "conv_in")
    put("time_embedding.linear_1", "temb.0")
    put("time_embedding.linear_2", "temb.2")
    i = 0
    for level in range(n):
        for k in range(c.num_res_blocks):
            attn = res[level] in c.attn_resolutions
            block(f"down.{i}", f"down_blocks.{level}.resnets.{k}", f"down_blocks.{level}.attentions.{k}" if attn else None)
            i += 1
        if level != n - 1:
            put(f"down_blocks.{level}.downsamplers.0.conv", f"down.{i}")
            i += 1
    block("mid.0", "mid_block.resnets.0", "mid_block.attentions.0")
    block("mid.1", "mid_block.resnets.1", None)
    i = 0
    for u, level in enumerate(reversed(range(n))):
        for k in range(c.num_res_blocks + 1):
            attn = res[level] in c.attn_resolutions
            block(f"up.{i}", f"up_blocks.{u}.resnets.{k}", f"up_blocks.{u}.attentions.{k}" if attn else None)
            i += 1
        if level != 0:
            put(f"up_blocks.{u}.upsamplers.0.conv", f"up.{i}.1")
            i += 1
    put("conv_norm_out", "out.0")
    put("conv_out", "out.2")
    missing = set(out.state_dict()) - set(dst)
    if missing or len(dst) != len(out.state_dict()):
        raise RuntimeError(f"to_diffusers_unet: unmapped parameters {sorted(missing)[:5]}")
    out.load_state_dict({k: v.clone() for k, v in dst.items()}, strict=True)
    return out.eval().to(next(model.parameters()).device)


def diffusers_scheduler_kwargs(schedule: NoiseSchedule) -> dict[str, Any]:
    """The DDIMScheduler/DDPMScheduler arguments of the same training schedule (clip_sample on)."""
    if schedule.beta_schedule not in BETA_SCHEDULES:
        raise ValueError(f"diffusers has no beta_schedule for {schedule.beta_schedule!r}")
    return {"num_train_timesteps": schedule.num_train_timesteps, "beta_start": schedule.beta_start,
            "beta_end": schedule.beta_end, "beta_schedule": BETA_SCHEDULES[schedule.beta_schedule],
            "prediction_type": schedule.prediction_type, "clip_sample": True}


def to_diffusers_pipeline(model: UNet, sampler: str = "ddim", schedule: NoiseSchedule | None = None) -> Any:
    """A DDIMPipeline (set_alpha_to_one, steps_offset 0) or DDPMPipeline (fixed_small) running a UNet2DModel with
    model's weights under the same schedule (default: NoiseSchedule()); its progress bar is off.
    pipeline.unet is the converted network."""
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler

    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}; got {sampler!r}")
    unet = to_diffusers_unet(model)
    kw = diffusers_scheduler_kwargs(schedule or NoiseSchedule())
    if sampler == "ddim":
        pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler(**kw, set_alpha_to_one=True, steps_offset=0))
    else:
        pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(**kw, variance_type="fixed_small"))
    pipe.set_progress_bar_config(disable=True)
    return pipe
