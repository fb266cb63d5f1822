"""Benchmarks of fastdiff (shared design §5): the runner behind `fastdiff bench` and the case builders
that the pytest-benchmark suite in benchmarks/ reuses.

Sections
  step   the reverse step alone: fused op vs the eager step written as diffusers' DDIMScheduler.step
         (separate tensor ops + torch.randn) vs torch.compile of that eager step, beside the
         device-to-device copy of the same size (the roofline: bytes that must move = read x and m,
         write out = 3 tensors; GB/s over the copy's GB/s is the fraction of copy bandwidth).
  peers  one network, one set of weights: the fastdiff Engine vs the eager loop (our U-Net +
         diffusers-style step) vs torch.compile(mode="max-autotune") of that loop vs diffusers'
         DDIMPipeline/DDPMPipeline with a UNet2DModel of the same architecture and the same weights.
  e2e    the Engine over DDPM-1000 and DDIM-{10,20,50,100}, batch {1,16,128}, cifar-ddpm and digits.

Timing: medians of repeated runs after warm-up, in one process; torch.cuda.Event on GPU,
time.perf_counter on CPU. Weights are random (seed 0): latency does not depend on them.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import functools
import json
import os
import platform
import re
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from . import ops
from .engine import Engine
from .nn.unet import UNet, preset
from .sampling import make_seeds
from .schedule import NoiseSchedule

KIB, MIB = 1 << 10, 1 << 20
DTYPE_NAMES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
STEP_IMPLS = ("fused", "eager", "compile", "copy")
PEER_IMPLS = ("engine", "engine-bf16", "eager", "compile", "diffusers")
NETS = ("cifar-ddpm", "digits")


# ================================================================================================
# Timing
# ================================================================================================
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], Any], device: torch.device, *, warmup: int = 3, min_runs: int = 5, max_runs: int = 100,
            budget_s: float = 2.0, inner: int = 1) -> dict:
    """Median seconds per call of fn (each sample times `inner` back-to-back calls), after warm-up.

    Runs at least min_runs samples, then more until budget_s or max_runs. GPU: CUDA events on the
    current stream; CPU: time.perf_counter."""
    for _ in range(warmup):
        fn()
    sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_runs and (len(times) < min_runs or time.perf_counter() - start < budget_s):
        if device.type == "cuda":
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            for _ in range(inner):
                fn()
            e1.record()
            e1.synchronize()
            times.append(e0.elapsed_time(e1) / 1e3 / inner)
        else:
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            times.append((time.perf_counter() - t0) / inner)
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return {"median_s": statistics.median(times), "min_s": min(times), "q1_s": q[0], "q3_s": q[2],
            "runs": len(times), "inner": inner}


def calibrate_inner(fn: Callable[[], Any], device: torch.device, target_s: float) -> int:
    """Calls per timed sample so that one sample lasts about target_s (short kernels)."""
    fn()
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    dt = max(time.perf_counter() - t0, 1e-7)
    return max(1, min(1000, int(target_s / dt)))


# ================================================================================================
# The eager baselines: steps written as diffusers 0.42 writes them
# ================================================================================================
def diffusers_ddim_step(model_output: torch.Tensor, sample: torch.Tensor, alpha_prod_t: torch.Tensor,
                        alpha_prod_t_prev: torch.Tensor, eta: float) -> torch.Tensor:
    """DDIMScheduler.step (epsilon, clip_sample=True, use_clipped_model_output=False): separate tensor ops
    and torch.randn. alpha_prod_* are 0-d tensors (CPU in diffusers; on the device for torch.compile)."""
    beta_prod_t = 1 - alpha_prod_t
    pred_original_sample = (sample - beta_prod_t ** (0.5) * model_output) / alpha_prod_t ** (0.5)
    pred_epsilon = model_output
    pred_original_sample = pred_original_sample.clamp(-1.0, 1.0)
    beta_prod_t_prev = 1 - alpha_prod_t_prev
    variance = (beta_prod_t_prev / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
    std_dev_t = eta * variance ** (0.5)
    pred_sample_direction = (1 - alpha_prod_t_prev - std_dev_t**2) ** (0.5) * pred_epsilon
    prev_sample = alpha_prod_t_prev ** (0.5) * pred_original_sample + pred_sample_direction
    if eta > 0:
        variance_noise = torch.randn(model_output.shape, device=model_output.device, dtype=model_output.dtype)
        prev_sample = prev_sample + std_dev_t * variance_noise
    return prev_sample


def diffusers_ddpm_step(model_output: torch.Tensor, sample: torch.Tensor, alpha_prod_t: torch.Tensor,
                        alpha_prod_t_prev: torch.Tensor, add_noise: bool) -> torch.Tensor:
    """DDPMScheduler.step (epsilon, clip_sample=True, fixed_small) as diffusers writes it."""
    beta_prod_t = 1 - alpha_prod_t
    beta_prod_t_prev = 1 - alpha_prod_t_prev
    current_alpha_t = alpha_prod_t / alpha_prod_t_prev
    current_beta_t = 1 - current_alpha_t
    pred_original_sample = (sample - beta_prod_t ** (0.5) * model_output) / alpha_prod_t ** (0.5)
    pred_original_sample = pred_original_sample.clamp(-1.0, 1.0)
    pred_original_sample_coeff = (alpha_prod_t_prev ** (0.5) * current_beta_t) / beta_prod_t
    current_sample_coeff = current_alpha_t ** (0.5) * beta_prod_t_prev / beta_prod_t
    pred_prev_sample = pred_original_sample_coeff * pred_original_sample + current_sample_coeff * sample
    if add_noise:
        variance_noise = torch.randn(model_output.shape, device=model_output.device, dtype=model_output.dtype)
        variance = torch.clamp(beta_prod_t_prev / beta_prod_t * current_beta_t, min=1e-20)
        pred_prev_sample = pred_prev_sample + variance ** (0.5) * variance_noise
    return pred_prev_sample


def _alpha_table(schedule: NoiseSchedule, device: torch.device | str = "cpu") -> torch.Tensor:
    """alphas_cumprod as diffusers holds it (float32), with 1.0 appended at index T (the "previous" of
    the last step: DDIMScheduler's final_alpha_cumprod with set_alpha_to_one, DDPMScheduler's `one`)."""
    ac = torch.tensor(schedule.alphas_cumprod, dtype=torch.float32)
    return torch.cat([ac, torch.ones(1)]).to(device)  # [T] = 1.0 (set_alpha_to_one / DDPM prev < 0)


def eager_loop(model: Callable, schedule: NoiseSchedule, batch: int, image_shape: tuple[int, ...], sampler: str,
               steps: int, device: torch.device, *, eta: float = 0.0, step_fn: Callable | None = None,
               table: torch.Tensor | None = None, before_model: Callable[[], None] | None = None) -> torch.Tensor:
    """The plain PyTorch loop a diffusers user runs: x_T = torch.randn, model, diffusers-style step."""
    T = schedule.num_train_timesteps
    table = _alpha_table(schedule) if table is None else table
    x = torch.randn((batch, *image_shape), device=device)
    stride = T // steps
    for t in schedule.timesteps(steps):
        prev = t - stride
        a_t, a_prev = table[t], table[prev if prev >= 0 else T]
        if before_model is not None:
            before_model()
        m = model(x, torch.full((batch,), t, device=device, dtype=torch.long))
        if sampler == "ddim":
            x = (step_fn or diffusers_ddim_step)(m, x, a_t, a_prev, eta)
        else:
            x = (step_fn or diffusers_ddpm_step)(m, x, a_t, a_prev, t > 0)
    return x


# ================================================================================================
# Shared objects (models, engines, compiled functions, pipelines) - built once per process
# ================================================================================================
@functools.lru_cache(maxsize=None)
def get_model(net: str, device: str) -> UNet:
    """The network of a preset with random weights (seed 0), eval mode, on device."""
    torch.manual_seed(0)
    return UNet(preset(net)).eval().to(device)


def image_shape(net: str) -> tuple[int, int, int]:
    c = preset(net)
    return (c.in_channels, c.image_size, c.image_size)


@functools.lru_cache(maxsize=None)
def get_engine(net: str, device: str, dtype_name: str = "fp32") -> Engine:
    # channels_last on CUDA (tensor cores like NHWC); on CPU we measured no gain for these nets.
    dev = torch.device(device)
    model = get_model(net, device) if dev.type == "cpu" else _private_model(net, device)
    return Engine(model, NoiseSchedule(), device=dev, dtype=DTYPE_NAMES[dtype_name], channels_last=dev.type == "cuda")


@functools.lru_cache(maxsize=None)
def _private_model(net: str, device: str) -> UNet:
    """A copy of get_model's weights for an engine that converts its model to channels_last in place."""
    m = UNet(preset(net)).eval().to(device)
    m.load_state_dict(get_model(net, device).state_dict())
    return m


@functools.lru_cache(maxsize=None)
def compiled_step() -> Callable:
    """torch.compile of the diffusers-style DDIM step, shared by every size (automatic dynamic shapes
    after the second size, so the step section compiles about once per dtype, not once per size)."""
    return torch.compile(diffusers_ddim_step)


@functools.lru_cache(maxsize=None)
def get_compiled(net: str, device: str, mode: str = "max-autotune") -> tuple[Callable, Callable, Callable]:
    """(compiled model, compiled DDIM step, compiled DDPM step)."""
    model = torch.compile(get_model(net, device), mode=mode)
    return model, torch.compile(diffusers_ddim_step), torch.compile(diffusers_ddpm_step)


def diffusers_available() -> str | None:
    """diffusers' version, or None when the optional extra is not installed."""
    try:
        import diffusers
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None
    return diffusers.__version__


_BETA_SCHEDULES = {"linear": "linear", "quadratic": "scaled_linear", "cosine": "squaredcos_cap_v2",
                   "sigmoid": "sigmoid"}


def to_diffusers_unet(model: UNet):
    """A diffusers UNet2DModel of the same architecture holding the same weights (unconditional nets).

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


def diffusers_scheduler_kwargs(schedule: NoiseSchedule) -> dict:
    return {"num_train_timesteps": schedule.num_train_timesteps, "beta_start": schedule.beta_start,
            "beta_end": schedule.beta_end, "beta_schedule": _BETA_SCHEDULES[schedule.beta_schedule],
            "prediction_type": schedule.prediction_type, "clip_sample": True}


@functools.lru_cache(maxsize=None)
def get_pipeline(net: str, device: str, sampler: str):
    """(pipeline, max |output difference| of its UNet2DModel vs our U-Net on a random input)."""
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler

    ours = get_model(net, device)
    unet = to_diffusers_unet(ours)
    kw = diffusers_scheduler_kwargs(NoiseSchedule())
    if sampler == "ddim":
        pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler(**kw, set_alpha_to_one=True, steps_offset=0))
    else:
        pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(**kw, variance_type="fixed_small"))
    pipe.set_progress_bar_config(disable=True)
    with torch.inference_mode():
        g = torch.Generator().manual_seed(1)
        x = torch.randn((2, *image_shape(net)), generator=g).to(device)
        t = torch.tensor([10, 500], device=device)
        diff = (unet(x, t).sample - ours(x, t)).abs().max().item()
    return pipe, diff


# ================================================================================================
# Cases
# ================================================================================================
@dataclass
class Case:
    """One timed thing: fn() runs it once. bytes: bytes that must move per call (step section)."""

    section: str
    params: dict
    fn: Callable[[], Any] | None = None
    bytes: int | None = None
    skip: str | None = None
    info: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return "-".join(str(v) for v in self.params.values())


def step_shape(numel: int) -> tuple[int, ...]:
    """Image-like (B, 3, 32, 32)-shaped batches where possible, else (B, numel / B)."""
    if numel % 3072 == 0:
        return (numel // 3072, 3, 32, 32)
    b = 8 if numel % 8 == 0 else 1
    return (b, numel // b)


def step_coefs_example(schedule: NoiseSchedule | None = None):
    """(t, t_prev, fused StepCoefs): the middle step of DDIM-50, eta = 1 (noise drawn)."""
    schedule = schedule or NoiseSchedule()
    plan = schedule.plan("ddim", 50, eta=1.0)
    t, coefs = plan[len(plan) // 2]
    return t, t - schedule.num_train_timesteps // 50, coefs


def step_case(impl: str, numel: int, dtype: str, device: torch.device | str) -> Case:
    """The reverse step alone (DDIM, eta = 1, clip on) on numel elements, or the same-size copy."""
    device = torch.device(device)
    params = {"impl": impl, "numel": numel, "dtype": dtype}
    if impl not in STEP_IMPLS:
        raise ValueError(f"impl must be one of {STEP_IMPLS}; got {impl!r}")
    dt = DTYPE_NAMES[dtype]
    if device.type == "cuda" and not torch.cuda.is_available():
        return Case("step", params, skip="no CUDA device")
    shape = step_shape(numel)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(shape, generator=g, device=device).to(dt)
    m = torch.randn(shape, generator=g, device=device).to(dt)
    es = x.element_size()
    if impl == "copy":
        dst = torch.empty_like(x)
        return Case("step", params, lambda: dst.copy_(x), bytes=2 * numel * es)
    t, prev, coefs = step_coefs_example()
    if impl == "fused":
        seeds = make_seeds(0, shape[0], device)
        return Case("step", params, lambda: ops.reverse_step(x, m, seeds, t, coefs), bytes=3 * numel * es)
    table = _alpha_table(NoiseSchedule(), "cpu" if impl == "eager" else device)
    a_t, a_prev = table[t], table[prev]
    fn = diffusers_ddim_step if impl == "eager" else compiled_step()
    return Case("step", params, lambda: fn(m, x, a_t, a_prev, 1.0), bytes=3 * numel * es)


def e2e_case(impl: str, net: str, batch: int, sampler: str, steps: int, device: torch.device | str) -> Case:
    """One whole sampling run of `batch` images: impl in PEER_IMPLS."""
    device = torch.device(device)
    params = {"impl": impl, "net": net, "batch": batch, "sampler": sampler, "steps": steps}
    if impl not in PEER_IMPLS:
        raise ValueError(f"impl must be one of {PEER_IMPLS}; got {impl!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        return Case("e2e", params, skip="no CUDA device")
    shape = image_shape(net)
    dev = str(device)
    options = {"eta": 0.0} if sampler == "ddim" else {}
    if impl.startswith("engine"):
        dtype = "bf16" if impl == "engine-bf16" else "fp32"
        if dtype == "bf16" and device.type == "cpu":
            return Case("e2e", params, skip="bf16 autocast is a GPU row")
        engine = get_engine(net, dev, dtype)
        seeds = make_seeds(0, batch, device)
        state = {"n": 0}

        def run_engine():
            state["n"] += 1  # new seeds each call: new samples from the same graph
            seeds.add_(batch)
            return engine.sample(seeds, shape, sampler, steps, **options)

        return Case("e2e", params, run_engine, info={"graphs": engine.use_graphs})
    if impl == "eager":
        model = get_model(net, dev)
        return Case("e2e", params, lambda: eager_loop(model, NoiseSchedule(), batch, shape, sampler, steps, device))
    if impl == "compile":
        model, ddim, ddpm = get_compiled(net, dev)
        table = _alpha_table(NoiseSchedule(), device)
        mark = torch.compiler.cudagraph_mark_step_begin if device.type == "cuda" else None
        return Case("e2e", params, lambda: eager_loop(model, NoiseSchedule(), batch, shape, sampler, steps, device,
                                                      step_fn=ddim if sampler == "ddim" else ddpm, table=table,
                                                      before_model=mark))
    version = diffusers_available()
    if version is None:
        return Case("e2e", params, skip="diffusers is not installed (pip install -e .[bench])")
    pipe, diff = get_pipeline(net, dev, sampler)
    kw = {"eta": 0.0} if sampler == "ddim" else {}
    return Case("e2e", params, lambda: pipe(batch_size=batch, num_inference_steps=steps, output_type="np", **kw),
                info={"diffusers": version, "weights": "copied from the fastdiff U-Net",
                      "unet_max_abs_diff": diff})


def run_case(case: Case, device: torch.device, **timing) -> dict:
    """Time a case; the row of results.json."""
    row = {"section": case.section, **case.params, **case.info}
    if case.skip:
        return {**row, "skipped": case.skip}
    with torch.inference_mode() if case.params.get("impl") not in ("compile",) else torch.no_grad():
        if case.section == "step":
            target = 2e-3 if device.type == "cuda" else 5e-3
            timing = {**timing, "inner": calibrate_inner(case.fn, device, target)}
            r = measure(case.fn, device, **timing)
        else:
            t0 = time.perf_counter()
            case.fn()  # first call: compile / capture / autotune
            sync(device)
            row["first_call_s"] = time.perf_counter() - t0
            r = measure(case.fn, device, **timing)
    row.update(r)
    if case.bytes:
        row["bytes"] = case.bytes
        row["gbps"] = case.bytes / r["median_s"] / 1e9
    if case.section != "step":
        row["latency_ms"] = r["median_s"] * 1e3
        row["images_per_s"] = case.params["batch"] / r["median_s"]
    return row


# ================================================================================================
# The plan of a run
# ================================================================================================
@dataclass
class Plan:
    step_sizes: list[int]
    step_dtypes: list[str]
    step_impls: list[str]
    e2e: list[tuple[str, int, str, int]]  # (net, batch, sampler, steps), engine rows
    e2e_impls: list[str]
    peers: list[tuple[str, int, str, int]]
    peer_impls: list[str]
    step_timing: dict
    e2e_timing: dict
    case_budget_s: float  # e2e/peer cases estimated to take longer are skipped


def make_plan(mode: str, device: torch.device) -> Plan:
    cuda = device.type == "cuda"
    samplers_full = [("ddpm", 1000), ("ddim", 10), ("ddim", 20), ("ddim", 50), ("ddim", 100)]
    if mode == "smoke":
        return Plan([64 * KIB], ["fp32"], ["fused", "eager", "copy"],
                    [("digits", 1, "ddim", 2), ("digits", 1, "ddpm", 3)], ["engine"],
                    [("digits", 1, "ddim", 2)], ["engine", "eager", "diffusers"],
                    {"warmup": 1, "min_runs": 3, "max_runs": 5, "budget_s": 0.1},
                    {"warmup": 0, "min_runs": 2, "max_runs": 3, "budget_s": 0.1}, 10.0)
    if mode == "quick":
        return Plan([64 * KIB, 1 * MIB], ["fp32", "bf16"], ["fused", "eager", "copy"],
                    [(net, b, s, n) for net in ["digits"] for b in (1, 16)
                     for s, n in [("ddpm", 10), ("ddim", 10), ("ddim", 20)]], ["engine"],
                    [("digits", 1, "ddim", 20), ("digits", 1, "ddpm", 10)],
                    ["engine", "engine-bf16", "eager", "diffusers"],
                    {"warmup": 3, "min_runs": 10, "max_runs": 50, "budget_s": 0.5},
                    {"warmup": 1, "min_runs": 3, "max_runs": 10, "budget_s": 2.0}, 30.0)
    sizes = [64 * KIB * 4**i for i in range(6 if cuda else 5)]  # 64K..64M (CPU: ..16M)
    return Plan(sizes, ["fp32", "bf16"], list(STEP_IMPLS),
                [(net, b, s, n) for net in NETS for b in (1, 16, 128) for s, n in samplers_full],
                ["engine", "engine-bf16"] if cuda else ["engine"],
                [(net, b, s, n) for net in NETS for b in (1, 16) for s, n in [("ddim", 50), ("ddpm", 100)]],
                list(PEER_IMPLS),
                {"warmup": 5, "min_runs": 20, "max_runs": 200, "budget_s": 1.0},
                {"warmup": 1, "min_runs": 3, "max_runs": 20, "budget_s": 5.0}, 300.0 if cuda else 120.0)


# ================================================================================================
# Machine, reports, plots
# ================================================================================================
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict:
    from . import __version__

    info = {"date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"), "host": platform.node(),
            "os": platform.platform(), "python": platform.python_version(), "cpu": cpu_model(),
            "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "fastdiff": __version__, "step_backend": ops.backend(), "diffusers": diffusers_available(),
            "device": str(device), "device_name": cpu_model() if device.type == "cpu" else torch.cuda.get_device_name(device),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update({"gpu_memory_gib": round(p.total_memory / 2**30, 1), "sm_count": p.multi_processor_count,
                     "compute_capability": f"{p.major}.{p.minor}", "driver": _nvidia_driver()})
    return info


def _nvidia_driver() -> str | None:
    try:
        import subprocess

        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or None
    except Exception:  # noqa: BLE001
        return None


def device_slug(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu-{cpu_model()}-{os.cpu_count()}c"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def default_out(device: torch.device) -> Path:
    root = Path(__file__).resolve().parent.parent / "benchmarks"
    base = root / "results" if root.is_dir() else Path("benchmarks") / "results"
    return base / f"{device_slug(device)}-{_dt.date.today().isoformat()}"


def _fmt_size(n: int) -> str:
    return f"{n // MIB}M" if n >= MIB else f"{n // KIB}K"


def add_derived(rows: list[dict]) -> None:
    """Fraction of the same-run copy bandwidth for the step rows; speed-ups for the peer rows."""
    copy = {(r["numel"], r["dtype"]): r["gbps"] for r in rows if r["section"] == "step" and r.get("impl") == "copy"
            and "gbps" in r}
    for r in rows:
        if r["section"] == "step" and "gbps" in r and (r["numel"], r["dtype"]) in copy:
            r["copy_fraction"] = r["gbps"] / copy[(r["numel"], r["dtype"])]
    engine = {(r["net"], r["batch"], r["sampler"], r["steps"]): r["median_s"] for r in rows
              if r["section"] == "peers" and r["impl"] == "engine" and "median_s" in r}
    for r in rows:
        key = (r.get("net"), r.get("batch"), r.get("sampler"), r.get("steps"))
        if r["section"] == "peers" and "median_s" in r and key in engine:
            r["engine_speedup"] = r["median_s"] / engine[key]


def targets(rows: list[dict]) -> list[dict]:
    """The H100 targets of benchmarks/NOTES.md, evaluated on whatever this run measured."""
    out = []
    step = [r for r in rows if r["section"] == "step" and r["impl"] == "fused" and "copy_fraction" in r
            and r["numel"] >= 16 * MIB]
    if step:
        worst = min(step, key=lambda r: r["copy_fraction"])
        out.append({"target": "fused step >= 0.90 of copy bandwidth at >= 16M elements", "value": worst["copy_fraction"],
                    "met": worst["copy_fraction"] >= 0.90, "detail": f"worst: {_fmt_size(worst['numel'])} {worst['dtype']}"})

    def peer(impl, net="cifar-ddpm", batch=1, sampler="ddim", steps=50):
        for r in rows:
            if (r["section"], r.get("impl"), r.get("net"), r.get("batch"), r.get("sampler"), r.get("steps")) == \
                    ("peers", impl, net, batch, sampler, steps) and "median_s" in r:
                return r
        return None

    for impl, goal, text in (("diffusers", 3.0, "engine >= 3x diffusers DDIMPipeline (cifar-ddpm, batch 1, DDIM-50)"),
                             ("compile", 1.2, "engine >= 1.2x torch.compile(max-autotune) eager loop (cifar-ddpm, b1, DDIM-50)")):
        r = peer(impl)
        if r and "engine_speedup" in r:
            out.append({"target": text, "value": r["engine_speedup"], "met": r["engine_speedup"] >= goal, "detail": ""})
    e2e = {(r["net"], r["batch"], r["sampler"], r["steps"]): r["median_s"] for r in rows
           if r["section"] == "e2e" and r["impl"] == "engine" and "median_s" in r}
    for (net, batch, s, n), v in sorted(e2e.items()):
        if s == "ddpm" and n == 1000 and (net, batch, "ddim", 50) in e2e:
            ratio = v / e2e[(net, batch, "ddim", 50)]
            out.append({"target": f"DDPM-1000 latency >= 19x DDIM-50 ({net}, batch {batch})", "value": ratio,
                        "met": ratio >= 19, "detail": ""})
    return out


def write_markdown(path: Path, result: dict) -> None:
    m, rows = result["machine"], result["rows"]
    lines = [f"# fastdiff bench ({result['mode']}) — {m['device_name']}", "",
             f"{m['date']} · {m['cpu']} ({m['cpu_cores']} cores, {m['torch_threads']} torch threads) · torch {m['torch']}"
             f" · CUDA {m['cuda']} · step backend {m['step_backend']} · diffusers {m['diffusers'] or 'not installed'}"
             f" · load average at start {m.get('load_average')}", ""]
    lines += [f"- {n}" for n in result.get("notes", [])] + [""]
    tg = result.get("targets") or []
    if tg:
        lines += ["## Targets (set for H100)", "", "| target | value | met |", "|---|---:|:---:|"]
        lines += [f"| {t['target']} {t['detail']} | {t['value']:.2f} | {'yes' if t['met'] else 'no'} |" for t in tg]
        lines.append("")
    step = [r for r in rows if r["section"] == "step"]
    if step:
        lines += ["## (a) The reverse step alone (DDIM, eta=1, clip on)", "",
                  "bytes that must move = 3 tensors (read x, m; write out); copy = `dst.copy_(src)` (2 tensors).", "",
                  "| size | dtype | impl | time (µs) | GB/s | of copy BW |", "|---:|---|---|---:|---:|---:|"]
        for r in step:
            if "skipped" in r or "error" in r:
                lines.append(f"| {_fmt_size(r['numel'])} | {r['dtype']} | {r['impl']} | {r.get('skipped') or r.get('error')} | | |")
                continue
            frac = f"{r['copy_fraction']:.2f}" if "copy_fraction" in r else ""
            lines.append(f"| {_fmt_size(r['numel'])} | {r['dtype']} | {r['impl']} | {r['median_s'] * 1e6:.1f} | "
                         f"{r['gbps']:.1f} | {frac} |")
        lines.append("")
    for sec, title in (("peers", "(c) Peers: same network, same weights"), ("e2e", "(b) End to end: the engine")):
        sr = [r for r in rows if r["section"] == sec]
        if not sr:
            continue
        extra = " engine speed-up |" if sec == "peers" else ""
        lines += [f"## {title}", "", f"| net | batch | sampler | impl | latency (ms) | images/s | first call (s) |{extra}",
                  "|---|---:|---|---|---:|---:|---:|" + ("---:|" if sec == "peers" else "")]
        for r in sr:
            head = f"| {r['net']} | {r['batch']} | {r['sampler']}-{r['steps']} | {r['impl']} |"
            if "skipped" in r or "error" in r:
                lines.append(f"{head} {r.get('skipped') or r.get('error')} | | |" + (" |" if sec == "peers" else ""))
                continue
            sp = f" {r['engine_speedup']:.2f}x |" if sec == "peers" else ""
            lines.append(f"{head} {r['latency_ms']:.1f} | {r['images_per_s']:.2f} | {r.get('first_call_s', 0):.1f} |{sp}")
        lines.append("")
    path.write_text("\n".join(lines))


def write_plots(out: Path, result: dict) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    rows = result["rows"]
    title = result["machine"]["device_name"]
    e2e = [r for r in rows if r["section"] == "e2e" and "median_s" in r]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, sampler in zip(axes, ("ddpm", "ddim")):
        series: dict[tuple, list] = {}
        for r in e2e:
            if r["sampler"] == sampler:
                series.setdefault((r["net"], r["batch"], r["impl"]), []).append((r["steps"], r["latency_ms"]))
        for (net, batch, impl), pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{net} b{batch} {impl}")
        ax.set(xscale="log", yscale="log", xlabel="steps", ylabel="latency (ms)", title=f"{sampler.upper()} — {title}")
        ax.grid(True, which="both", alpha=0.3)
        if series:
            ax.legend(fontsize=7)
    fig.tight_layout()
    made.append(out / "latency_vs_steps.png")
    fig.savefig(made[-1], dpi=110)
    plt.close(fig)

    step = [r for r in rows if r["section"] == "step" and "gbps" in r]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    series = {}
    for r in step:
        series.setdefault((r["impl"], r["dtype"]), []).append((r["numel"], r["gbps"]))
    for (impl, dtype), pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", linestyle="--" if impl == "copy" else "-",
                label=f"{impl} {dtype}")
    ax.set(xscale="log", yscale="log", xlabel="elements", ylabel="GB/s (3 tensors; copy: 2)", title=f"reverse step — {title}")
    ax.grid(True, which="both", alpha=0.3)
    if series:
        ax.legend(fontsize=7)
    fig.tight_layout()
    made.append(out / "step_bandwidth.png")
    fig.savefig(made[-1], dpi=110)
    plt.close(fig)
    return made


def write_results(out: Path, result: dict, plots: bool = True) -> None:
    add_derived(result["rows"])
    result["targets"] = targets(result["rows"])
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(result, indent=1, default=str))
    tmp.replace(out / "results.json")
    write_markdown(out / "results.md", result)
    if plots:
        write_plots(out, result)


# ================================================================================================
# The runner
# ================================================================================================
def _jobs(plan: Plan, sections: list[str]) -> list[tuple[str, dict]]:
    jobs = []
    if "step" in sections:
        jobs += [("step", {"impl": i, "numel": n, "dtype": d}) for d in plan.step_dtypes for n in plan.step_sizes
                 for i in plan.step_impls]
    if "peers" in sections:
        jobs += [("peers", {"impl": i, "net": net, "batch": b, "sampler": s, "steps": n})
                 for net, b, s, n in plan.peers for i in plan.peer_impls]
    if "e2e" in sections:
        jobs += [("e2e", {"impl": i, "net": net, "batch": b, "sampler": s, "steps": n})
                 for net, b, s, n in plan.e2e for i in plan.e2e_impls]
    return sorted(jobs, key=lambda j: _priority(*j))  # stable: the plan's order within a priority


def _priority(section: str, p: dict) -> int:
    """Run order: the step, then the cases the targets need (so a --time-budget keeps them), then the rest."""
    if section == "step":
        return 0
    if p["net"] == "cifar-ddpm" and p["batch"] == 1 and (p["sampler"], p["steps"]) in (("ddim", 50), ("ddpm", 1000)):
        return 1
    if section == "e2e" and (p["sampler"], p["steps"]) in (("ddim", 50), ("ddpm", 1000)):
        return 2
    return 3


@functools.lru_cache(maxsize=None)
def _forward_s(net: str, batch: int, device: str) -> float:
    """Seconds of one model call (for the cost estimate; CPU: from batch 1, scaled by batch)."""
    dev = torch.device(device)
    b = 1 if dev.type == "cpu" else batch
    model = get_model(net, device)
    x = torch.randn((b, *image_shape(net)), device=dev)
    t = torch.full((b,), 500, device=dev)
    with torch.inference_mode():
        model(x, t)
        sync(dev)
        t0 = time.perf_counter()
        model(x, t)
        sync(dev)
    return (time.perf_counter() - t0) * (batch / b)


def run_bench(mode: str = "quick", device: str | torch.device = "auto", out: Path | None = None,
              sections: tuple[str, ...] = ("step", "peers", "e2e"), time_budget_s: float = 0.0, threads: int | None = None,
              progress: bool = True, plots: bool = True) -> Path:
    """Run the benchmarks; writes results.json, results.md and PNG plots into out; returns out."""
    from tqdm import tqdm

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if threads:
        torch.set_num_threads(threads)
    plan = make_plan(mode, device)
    out = Path(out) if out else default_out(device)
    notes = []
    if device.type == "cpu":
        notes.append("CPU run: time.perf_counter timing; CUDA graphs and bf16 autocast rows are GPU-only.")
    if mode != "full":
        notes.append("torch.compile rows are skipped in --quick (compile time); run --full for them.")
    if "diffusers" in plan.peer_impls and diffusers_available() is None:
        notes.append("diffusers is not installed: the DDIMPipeline/DDPMPipeline rows are skipped (pip install -e .[bench]).")
    elif "diffusers" in plan.peer_impls:
        notes.append("diffusers rows: UNet2DModel with the same architecture and the same weights copied in "
                     "(unet_max_abs_diff in results.json); output_type='np' (includes its copy to the host).")
    notes.append("Weights are random (seed 0); x_T and noise: fastdiff Philox (engine) vs torch.randn (eager/compile/diffusers).")
    result = {"mode": mode, "machine": machine_info(device), "notes": notes, "rows": []}
    jobs = _jobs(plan, list(sections))
    start = time.perf_counter()
    bar = tqdm(jobs, desc=f"bench {mode}", disable=not progress, dynamic_ncols=True)
    last_section = None
    for section, params in bar:
        bar.set_postfix_str(f"{section} " + " ".join(str(v) for v in params.values()))
        if last_section and section != last_section:
            write_results(out, result, plots=False)
        last_section = section
        row = {"section": section, **params}
        try:
            if time_budget_s and time.perf_counter() - start > time_budget_s:
                row["skipped"] = f"time budget of {time_budget_s:.0f} s spent"
            elif section == "step":
                row = run_case(step_case(params["impl"], params["numel"], params["dtype"], device), device,
                               **plan.step_timing)
            else:
                est = _forward_s(params["net"], params["batch"], str(device)) * params["steps"] * \
                    (2 + plan.e2e_timing["min_runs"])
                if params["impl"] in ("compile",) and mode != "full":
                    row["skipped"] = "torch.compile: --full only"
                elif est > plan.case_budget_s:
                    row["skipped"] = f"estimated {est:.0f} s > {plan.case_budget_s:.0f} s per case on this device"
                else:
                    case = e2e_case(params["impl"], params["net"], params["batch"], params["sampler"], params["steps"],
                                    device)
                    case.section = section
                    row = run_case(case, device, **plan.e2e_timing)
        except Exception as exc:  # noqa: BLE001 - one failing case must not lose the others
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            warnings.warn(f"bench case {section} {params} failed: {row['error']}", RuntimeWarning, stacklevel=1)
        result["rows"].append(row)
    result["total_s"] = time.perf_counter() - start
    write_results(out, result, plots=plots)
    return out


# ================================================================================================
# CLI
# ================================================================================================
def add(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks: the step, end-to-end sampling, peers (JSON, Markdown, PNG)",
                       description="Benchmarks of the fused step, the sampling engine and its peers (shared design §5). "
                       "Writes results.json, results.md and PNG plots.")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", dest="mode", action="store_const", const="quick", help="small sizes, digits only (default)")
    g.add_argument("--full", dest="mode", action="store_const", const="full", help="every size, both nets, torch.compile rows")
    g.add_argument("--smoke", dest="mode", action="store_const", const="smoke", help=argparse.SUPPRESS)
    p.set_defaults(mode="quick")
    p.add_argument("--out", type=Path, help="output folder (default: benchmarks/results/<device>-<date>/)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:i] (default: auto)")
    p.add_argument("--sections", default="step,peers,e2e", help="comma-separated subset of step,peers,e2e")
    p.add_argument("--time-budget", type=float, default=0.0,
                   help="seconds; cases left when it is spent are recorded as skipped (default: 0 = none)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    p.add_argument("--no-plots", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run_cli)


def run_cli(a: argparse.Namespace) -> None:
    from .cli import pick_device

    device = pick_device(a.device)
    sections = tuple(s.strip() for s in a.sections.split(",") if s.strip())
    bad = set(sections) - {"step", "peers", "e2e"}
    if bad or not sections:
        raise ValueError(f"--sections: choose from step, peers, e2e; got {a.sections!r}")
    if a.threads is not None and a.threads < 1:
        raise ValueError("--threads must be >= 1")
    out = run_bench(a.mode, device, a.out, sections, a.time_budget, a.threads, progress=not a.quiet,
                    plots=not a.no_plots)
    result = json.loads((out / "results.json").read_text())
    done = sum("median_s" in r for r in result["rows"])
    print(f"{done}/{len(result['rows'])} cases measured in {result['total_s']:.0f} s → {out}/results.md")
    for t in result["targets"]:
        print(f"  {t['target']}: {t['value']:.2f} ({'met' if t['met'] else 'not met'})")
