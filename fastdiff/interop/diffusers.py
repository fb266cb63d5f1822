"""fastdiff <-> diffusers: a fastdiff U-Net as a diffusers UNet2DModel with the same weights, a NoiseSchedule as
DDIMScheduler/DDPMScheduler arguments, the DDIMPipeline/DDPMPipeline built from both; diffusers folders in
(`load_diffusers`: a UNet2DModel as `model(x, t, y=None)` plus its schedule) and out (`save_diffusers`).

diffusers is an optional extra (`pip install fastdiff[diffusers]`): it is imported inside the functions that need
it, so importing this module works without it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch

from ..files import atomic_folder, write_json
from ..nn.unet import UNet
from ..schedule import DIFFUSERS_BETA_SCHEDULES, NoiseSchedule

if TYPE_CHECKING:
    from diffusers import UNet2DModel

BETA_SCHEDULES = DIFFUSERS_BETA_SCHEDULES  # fastdiff's beta schedule -> diffusers' beta_schedule of the same betas
SAMPLERS = ("ddim", "ddpm")
# Scheduler classes whose config a folder may hold: their training-schedule fields are DDPMScheduler's.
SCHEDULER_CLASSES = ("DDPMScheduler", "DDIMScheduler", "FusedDDPMScheduler", "FusedDDIMScheduler", "PNDMScheduler",
                     "DPMSolverMultistepScheduler")
# diffusers' DDPM variance types -> fastdiff's (fixed_small_log draws with the same standard deviation).
VARIANCE_TYPES = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small", "fixed_large": "fixed_large"}
EXPORT_MARKER = "fastdiff_export.json"  # in folders save_diffusers writes (diffusers ignores it)
WEIGHTS, WEIGHTS_INDEX, PICKLE_WEIGHTS = ("diffusion_pytorch_model.safetensors",
                                          "diffusion_pytorch_model.safetensors.index.json", ".bin")


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
    return {**schedule.to_diffusers_config(), "clip_sample": True}


def sampler_options(sampler: str, config: Mapping[str, Any], where: str = "scheduler config") -> dict[str, Any]:
    """fastdiff's options (schedule.SAMPLER_OPTIONS[sampler]) for a diffusers scheduler config, with diffusers'
    defaults for missing keys; ValueError (prefixed by `where`) for what the fused step cannot do."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}; got {sampler!r}")
    if config.get("thresholding"):
        raise ValueError(f"{where}: thresholding=True (dynamic thresholding) is not supported by fastdiff's fused "
                         "step; use clip_sample=True with clip_sample_range instead")
    options = {"spacing": config.get("timestep_spacing", "leading"), "steps_offset": config.get("steps_offset", 0),
               "clip_sample": bool(config.get("clip_sample", True)),
               "clip_sample_range": float(config.get("clip_sample_range", 1.0))}
    if sampler == "ddim":
        return options | {"set_alpha_to_one": bool(config.get("set_alpha_to_one", True))}
    variance = config.get("variance_type") or "fixed_small"
    if variance not in VARIANCE_TYPES:
        raise ValueError(f"{where}: variance_type {variance!r} is not supported; fastdiff supports "
                         f"{', '.join(VARIANCE_TYPES)}")
    return options | {"variance_type": VARIANCE_TYPES[variance]}


def schedule_from_config(config: Mapping[str, Any], where: str = "scheduler config") -> NoiseSchedule:
    """NoiseSchedule.from_diffusers_config with errors prefixed by `where`."""
    try:
        return NoiseSchedule.from_diffusers_config(config)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None


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


# --- diffusers folders in ---------------------------------------------------------------------------------------
class DiffusersDenoiser(torch.nn.Module):
    """An unconditional diffusers UNet2DModel as fastdiff's `model(x, t, y=None)`; image_shape, num_classes and
    model_config describe it to the Engine and the ONNX export."""

    def __init__(self, unet: UNet2DModel):
        super().__init__()
        self.unet = unet
        size = unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        self.image_shape: tuple[int, int, int] = (int(unet.config.in_channels), h, w)
        self.num_classes = 0
        self.model_config = {"diffusers": type(unet).__name__, **json.loads(unet.to_json_string())}

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if y is not None:
            raise ValueError("this diffusers UNet2DModel is unconditional: y (class ids) must be None")
        return self.unet(x, t, return_dict=False)[0]


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable JSON config ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config must be a JSON object; got {type(data).__name__}")
    return data


def _find_folders(path: Path) -> tuple[Path, Path]:
    """(UNet folder, scheduler config file) of a save_pretrained pipeline folder or a bare UNet2DModel folder."""
    if not path.is_dir():
        raise ValueError(f"{path}: not a diffusers folder ({'a file' if path.exists() else 'no such folder'}); "
                         "give a folder written by save_pretrained")
    if (path / "unet" / "config.json").is_file():
        unet = path / "unet"
    elif (path / "config.json").is_file():
        unet = path
    else:
        raise ValueError(f"{path}: not a diffusers folder: expected unet/config.json (a pipeline saved with "
                         "save_pretrained) or the config.json of a UNet2DModel")
    for sched in (path / "scheduler" / "scheduler_config.json", path / "scheduler_config.json"):
        if sched.is_file():
            return unet, sched
    raise ValueError(f"{path}: no scheduler config (scheduler/scheduler_config.json or scheduler_config.json); "
                     "save the pipeline's scheduler with it, e.g. DDPMScheduler().save_pretrained(folder)")


def _check_unet_config(config: dict, where: Path) -> None:
    cls = config.get("_class_name")
    if cls == "UNet2DConditionModel":
        raise ValueError(f"{where}: a UNet2DConditionModel (text-conditional, e.g. Stable Diffusion) where an "
                         "unconditional UNet2DModel is needed; run it in its diffusers pipeline with "
                         "fastdiff.diffusers.FusedDDIMScheduler instead")
    if cls != "UNet2DModel":
        raise ValueError(f"{where}: a {cls or 'model without _class_name'}; fastdiff loads UNet2DModel folders")
    if config.get("num_class_embeds") or config.get("class_embed_type"):
        raise ValueError(f"{where}: a class-conditional UNet2DModel (num_class_embeds/class_embed_type); fastdiff "
                         "loads unconditional ones")
    size, c_in, c_out = config.get("sample_size"), config.get("in_channels", 3), config.get("out_channels", 3)
    if not (isinstance(size, int) and size > 0) and not (isinstance(size, list) and len(size) == 2
                                                         and all(isinstance(s, int) and s > 0 for s in size)):
        raise ValueError(f"{where}: sample_size must be a positive integer or [height, width]; got {size!r}")
    if c_in != c_out:
        raise ValueError(f"{where}: out_channels ({c_out}) must equal in_channels ({c_in}); a model with learned "
                         "variance (2x channels) is not supported")


def _weights(unet: Path) -> str | None:
    """The safetensors variant to load (None: the plain file); ValueError for pickle-only or missing weights."""
    if (unet / WEIGHTS).is_file() or (unet / WEIGHTS_INDEX).is_file():
        return None
    variants = sorted(p.name.split(".")[1] for p in unet.glob("diffusion_pytorch_model.*.safetensors"))
    if len(variants) == 1:
        return variants[0]
    if any(p.suffix == PICKLE_WEIGHTS for p in unet.iterdir()):
        raise ValueError(f"{unet}: holds only pickle (.bin) weights; fastdiff loads safetensors only (re-save the "
                         "model with save_pretrained(folder, safe_serialization=True))")
    raise ValueError(f"{unet}: no weights ({WEIGHTS} missing)" if not variants else
                     f"{unet}: several weight variants {variants}; keep one")


def load_diffusers(path: Path | str, device: str | torch.device = "cpu") -> tuple[DiffusersDenoiser, NoiseSchedule,
                                                                                  dict[str, Any]]:
    """A local diffusers folder (a pipeline's save_pretrained layout, unet/ + scheduler/, or a bare UNet2DModel
    folder with scheduler_config.json) as (model(x, t, y=None) in eval mode, its NoiseSchedule, info).

    info: source, unet (folder), scheduler_class, image_shape (C, H, W), num_classes (0) and options
    {sampler: schedule.SAMPLER_OPTIONS of the folder's scheduler config}. Safetensors only; every bad input is a
    one-line ValueError naming the path."""
    path = Path(path)
    unet_dir, sched_file = _find_folders(path)
    config = _read_json(unet_dir / "config.json")
    _check_unet_config(config, unet_dir)
    sched = _read_json(sched_file)
    cls = sched.get("_class_name")
    if cls not in SCHEDULER_CLASSES:
        raise ValueError(f"{sched_file}: scheduler {cls!r} is not supported; supported: {', '.join(SCHEDULER_CLASSES)}")
    schedule = schedule_from_config(sched, str(sched_file))
    options = {s: sampler_options(s, sched, str(sched_file)) for s in SAMPLERS}
    variant = _weights(unet_dir)
    try:
        from diffusers import UNet2DModel
    except ImportError as e:
        raise ValueError(f"loading {path} needs diffusers (pip install fastdiff[diffusers]): {e}") from None
    try:
        unet, loading = UNet2DModel.from_pretrained(str(unet_dir), use_safetensors=True, local_files_only=True,
                                                    variant=variant, output_loading_info=True,
                                                    low_cpu_mem_usage=False)
    except Exception as e:  # noqa: BLE001 - diffusers raises many types; one line naming the folder instead
        text = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise ValueError(f"{unet_dir}: the UNet2DModel could not be loaded ({type(e).__name__}: {text})") from None
    bad = {k: v for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if (v := loading.get(k))}
    if bad:
        raise ValueError(f"{unet_dir}: the weights do not match config.json ("
                         + "; ".join(f"{k.replace('_', ' ')} {list(v)[:3]}" for k, v in bad.items()) + ")")
    model = DiffusersDenoiser(unet).eval().requires_grad_(False).to(device)
    info = {"source": str(path), "unet": str(unet_dir), "scheduler_class": cls, "image_shape": model.image_shape,
            "num_classes": 0, "options": options}
    return model, schedule, info


def folder_options(info: dict[str, Any], sampler: str, options: dict[str, Any]) -> dict[str, Any]:
    """Sampler options of fastdiff's CLI completed by a loaded folder's scheduler config: steps_offset,
    set_alpha_to_one and clip_sample_range come from the folder, and its clip_sample=False turns clipping off."""
    folder = info["options"][sampler]
    merged = dict(options)
    for key in ("steps_offset", "set_alpha_to_one", "clip_sample_range"):
        if key in folder:
            merged.setdefault(key, folder[key])
    if not folder["clip_sample"]:
        merged["clip_sample"] = False
        if "use_clipped_model_output" in merged:  # nothing is clamped, so there is nothing to re-derive from
            merged["use_clipped_model_output"] = False
    return merged


# --- diffusers folders out --------------------------------------------------------------------------------------
def save_diffusers(model: UNet, schedule: NoiseSchedule, out: Path | str, source: str | None = None) -> Path:
    """Write an unconditional fastdiff U-Net and its schedule as a DDPMPipeline folder (model_index.json, unet/ in
    safetensors, scheduler/ with a DDPMScheduler config, and EXPORT_MARKER naming the source), atomically: written
    to a temporary folder, then renamed. An existing folder is replaced only if it is empty or such an export."""
    from .. import __version__

    pipe = to_diffusers_pipeline(model, "ddpm", schedule)

    def write(tmp: Path) -> None:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        write_json(tmp / EXPORT_MARKER, {"format": "fastdiff-diffusers-export", "fastdiff": __version__,
                                         "source": source, "schedule": schedule.to_dict()})

    out = Path(out)
    atomic_folder(out, write, replaceable=lambda p: (p / EXPORT_MARKER).is_file())
    return out
