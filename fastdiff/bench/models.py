"""The objects the cases share - networks, engines, compiled loops, diffusers pipelines - built once per process.

Weights are random (seed 0): latency does not depend on them."""
from __future__ import annotations

import functools
from typing import Any, Callable

import torch

from .. import runtimes
from ..engine import Engine
from ..interop.diffusers import to_diffusers_pipeline
from ..nn.unet import UNet, preset
from ..schedule import NoiseSchedule
from .baselines import diffusers_ddim_step, diffusers_ddpm_step
from .constants import DTYPE_NAMES


@functools.lru_cache(maxsize=None)
def get_model(net: str, device: str) -> UNet:
    """The network of a preset with random weights (seed 0), eval mode, on device."""
    torch.manual_seed(0)
    return UNet(preset(net)).eval().to(device)


def image_shape(net: str) -> tuple[int, int, int]:
    """(C, H, W) of the images of a preset."""
    c = preset(net)
    return c.image_shape


@functools.lru_cache(maxsize=None)
def get_engine(net: str, device: str, dtype_name: str = "fp32", runtime: str = "auto", int8: bool = False,
               workers: int | None = None) -> Engine:
    """The Engine over get_model's weights; channels_last on CUDA (tensor cores like NHWC; on the CPU it
    measured no gain for these nets, and the ort runtime reads NCHW)."""
    dev = torch.device(device)
    model = get_model(net, device) if dev.type == "cpu" else _private_model(net, device)
    return Engine(model, NoiseSchedule(), device=dev, dtype=DTYPE_NAMES[dtype_name], channels_last=dev.type == "cuda",
                  runtime=runtime, int8=int8, workers=workers)


@functools.lru_cache(maxsize=None)
def onnx_path(net: str, int8: bool = False) -> Any:
    """The deployment ONNX file of get_model's weights (cached by content; int8: its INT8 file), as the torch-free
    sampler runs it."""
    model = get_model(net, "cpu")
    fp32 = runtimes.onnx_file(model, NoiseSchedule())
    return runtimes.int8_file(model, NoiseSchedule(), fp32, torch.get_num_threads()) if int8 else fp32


@functools.lru_cache(maxsize=None)
def get_onnx_sampler(net: str, int8: bool = False) -> Any:
    """The torch-free ONNX sampler (fastdiff.export.runtime.OnnxSampler) over onnx_path's file, on the CPU, with
    torch's thread count (as the engine's session)."""
    from ..export.runtime import OnnxSampler

    return OnnxSampler(onnx_path(net, int8), providers=["CPUExecutionProvider"], threads=torch.get_num_threads())


@functools.lru_cache(maxsize=None)
def get_ort_model(net: str, int8: bool = False, threads: int = 0) -> runtimes.OrtModel:
    """The engine's ORT model callable of get_model's weights (its engine file; threads 0: torch's thread count)."""
    return runtimes.ort_model(get_model(net, "cpu"), NoiseSchedule(), threads or torch.get_num_threads(), int8)


@functools.lru_cache(maxsize=None)
def _private_model(net: str, device: str) -> UNet:
    """A copy of get_model's weights for an engine that converts its model to channels_last in place."""
    m = UNet(preset(net)).eval().to(device)
    m.load_state_dict(get_model(net, device).state_dict())
    return m


@functools.lru_cache(maxsize=None)
def get_compiled(net: str, device: str, mode: str = "max-autotune") -> tuple[Callable, Callable, Callable]:
    """(compiled model, compiled DDIM step, compiled DDPM step) of the torch.compile'd eager loop."""
    model = torch.compile(get_model(net, device), mode=mode)
    return model, torch.compile(diffusers_ddim_step), torch.compile(diffusers_ddpm_step)


@functools.lru_cache(maxsize=None)
def get_pipeline(net: str, device: str, sampler: str) -> tuple[Any, float]:
    """(diffusers pipeline over get_model's weights, max |output difference| of its UNet2DModel vs our U-Net
    on a random input)."""
    ours = get_model(net, device)
    pipe = to_diffusers_pipeline(ours, sampler, NoiseSchedule())
    with torch.inference_mode():
        g = torch.Generator().manual_seed(1)
        x = torch.randn((2, *image_shape(net)), generator=g).to(device)
        t = torch.tensor([10, 500], device=device)
        diff = (pipe.unet(x, t).sample - ours(x, t)).abs().max().item()
    return pipe, diff
