"""Checkpoints: one safetensors file (model, EMA, optimizer and RNG state, the config in its metadata)
plus a readable config.json, each written atomically (temp file + rename)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from . import __version__
from .files import atomic_write, write_json
from .nn.unet import UNet, UNetConfig
from .schedule import NoiseSchedule

WEIGHTS = "checkpoint.safetensors"
CONFIG = "config.json"
BUNDLED_MODEL = Path(__file__).parent / "assets" / "digits"  # the shipped digits model (EMA weights only)


def save(directory: Path, config: dict, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write config.json and checkpoint.safetensors (tensors + JSON meta) into directory."""
    directory = Path(directory)
    write_json(directory / CONFIG, config)
    metadata = {"format": "fastdiff", "version": __version__, "config": json.dumps(config), "meta": json.dumps(meta)}
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(directory / WEIGHTS, lambda tmp: save_file(flat, tmp, metadata=metadata))
    return directory / WEIGHTS


def _weights_path(path: Path) -> Path:
    path = Path(path)
    file = path / WEIGHTS if path.is_dir() else path
    if not file.exists():
        raise FileNotFoundError(f"no checkpoint at {path} (expected a run folder holding {WEIGHTS}, or that file)")
    return file


def load(path: Path) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """(config, tensors, meta) of a checkpoint folder or file; clear errors for missing or corrupt files."""
    file = _weights_path(path)
    try:
        with safe_open(str(file), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{file} is not a readable safetensors checkpoint ({e})") from None
    if metadata.get("format") != "fastdiff":
        raise ValueError(f"{file} is not a fastdiff checkpoint (no fastdiff metadata)")
    config = _json_object(metadata.get("config"), f"{file}: its config metadata")
    cfg_file = file.parent / CONFIG
    if cfg_file.exists():  # the readable copy wins, so a hand-edited config is checked against the weights
        try:
            text = cfg_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{cfg_file} is not a readable UTF-8 text file ({e})") from None
        config = _json_object(text, str(cfg_file))
    return config, tensors, _json_object(metadata.get("meta", "{}"), f"{file}: its meta metadata")


def _json_object(text: str | None, what: str) -> dict:
    """The JSON object in text; ValueError naming `what` when it is missing, not JSON or not an object."""
    if text is None:
        raise ValueError(f"{what} is missing")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a JSON object; got {type(value).__name__}")
    return value


def prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def build_model(config: dict, state: dict[str, torch.Tensor], source: str = "checkpoint") -> UNet:
    """A U-Net from config['model'] with state loaded; names what does not match."""
    try:
        model = UNet(UNetConfig.from_dict(config["model"]))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{source}: invalid model config ({e})") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [k for k in set(expected) & set(state) if expected[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(
            f"{source}: the config does not match the weights — missing {missing[:3]}, unexpected {unexpected[:3]}, "
            f"shape mismatch {sorted(shapes)[:3]} (of {len(missing)}/{len(unexpected)}/{len(shapes)})"
        )
    model.load_state_dict(state)
    return model


def load_model(path: Path, ema: bool = True) -> tuple[UNet, NoiseSchedule, dict]:
    """The denoiser (EMA weights unless ema=False) in eval mode, its schedule and the full config."""
    config, tensors, _ = load(path)
    state = prefixed(tensors, "ema.") if ema else {}
    state = state or prefixed(tensors, "model.")
    model = build_model(config, state, str(path)).eval().requires_grad_(False)
    try:
        schedule = NoiseSchedule(**config["schedule"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: invalid schedule config ({e})") from None
    return model, schedule, config
