"""The benchmark cases: one timed thing each (the reverse step alone, or one whole sampling run), and the row
of results.json that timing one gives."""
from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .. import ops
from ..interop.diffusers import diffusers_available
from ..sampling import make_seeds
from ..schedule import NoiseSchedule, StepCoefs
from .baselines import alpha_table, compiled_step, diffusers_ddim_step, eager_loop
from .constants import DTYPE_NAMES, MODEL_IMPLS, PEAK_CONV, PEER_IMPLS, STEP_IMPLS
from .models import (get_compiled, get_engine, get_model, get_onnx_sampler, get_ort_model, get_pipeline,
                     image_shape)
from .timing import calibrate_inner, measure, measure_interleaved, sync


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


def step_coefs_example(schedule: NoiseSchedule | None = None) -> tuple[int, int, StepCoefs]:
    """(t, t_prev, fused StepCoefs): the middle step of DDIM-50, eta = 1 (noise drawn)."""
    schedule = schedule or NoiseSchedule()
    steps = schedule.reverse_steps("ddim", 50, eta=1.0)
    t, coefs = steps[len(steps) // 2]
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
    table = alpha_table(NoiseSchedule(), "cpu" if impl == "eager" else device)
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
        if impl in ("engine-int8", "engine-unsplit") and device.type == "cuda":
            return Case("e2e", params, skip="an ONNX Runtime row: CPU only")
        engine = get_engine(net, dev, dtype, runtime="torch" if impl == "engine-torch" else "auto",
                            int8=impl == "engine-int8", workers=1 if impl == "engine-unsplit" else None)
        seeds = make_seeds(0, batch, device)

        def run_engine() -> torch.Tensor:
            seeds.add_(batch)  # new seeds each call: new samples from the same graph
            return engine.sample(seeds, shape, sampler, steps, **options)

        return Case("e2e", params, run_engine, info={"graphs": engine.use_graphs, "runtime": engine.runtime})
    if impl in ("ort-fp32", "ort-int8"):
        if device.type == "cuda":
            return Case("e2e", params, skip="the torch-free ONNX sampler rows are CPU rows")
        onnx = get_onnx_sampler(net, impl == "ort-int8")
        return Case("e2e", params, lambda: onnx.sample(batch, sampler=sampler, steps=steps, batch_size=batch, **options),
                    info={"runtime": "onnxruntime (torch-free sampler, NumPy step)"})
    if impl == "eager":
        model = get_model(net, dev)
        return Case("e2e", params, lambda: eager_loop(model, NoiseSchedule(), batch, shape, sampler, steps, device))
    if impl == "compile":
        model, ddim, ddpm = get_compiled(net, dev)
        table = alpha_table(NoiseSchedule(), device)
        mark = torch.compiler.cudagraph_mark_step_begin if device.type == "cuda" else None
        return Case("e2e", params, lambda: eager_loop(model, NoiseSchedule(), batch, shape, sampler, steps, device,
                                                      step_fn=ddim if sampler == "ddim" else ddpm, table=table,
                                                      before_model=mark))
    version = diffusers_available()
    if version is None:
        return Case("e2e", params, skip="diffusers is not installed (pip install -e .[bench])")
    pipe, diff = get_pipeline(net, dev, sampler)
    return Case("e2e", params, lambda: pipe(batch_size=batch, num_inference_steps=steps, output_type="np", **options),
                info={"diffusers": version, "weights": "copied from the fastdiff U-Net", "unet_max_abs_diff": diff})


def model_case(impl: str, net: str, batch: int, device: torch.device | str) -> Case:
    """One forward of the network at timestep 500 (eager torch, or the engine's ORT model, fp32 / INT8), or the
    same-run fp32 peak (a dense conv); info["gflop"]: the forward's floating-point work (torch's FlopCounterMode:
    convolutions and matrix products, 2 per multiply-add)."""
    device = torch.device(device)
    params = {"impl": impl, "net": net, "batch": batch}
    if impl not in MODEL_IMPLS:
        raise ValueError(f"impl must be one of {MODEL_IMPLS}; got {impl!r}")
    if device.type == "cuda" and (impl != "torch" or not torch.cuda.is_available()):
        return Case("model", params, skip="ONNX Runtime rows are CPU rows" if impl != "torch" else "no CUDA device")
    if impl == "fp32-peak":
        return _peak_case(params, device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn((batch, *image_shape(net)), generator=g).to(device)
    t = torch.full((batch,), 500, dtype=torch.long, device=device)
    model = get_model(net, str(device)) if impl == "torch" else get_ort_model(net, impl == "ort-int8")
    return Case("model", params, lambda: model(x, t), info={"gflop": forward_gflop(net, batch)})


@functools.lru_cache(maxsize=None)
def forward_gflop(net: str, batch: int) -> float:
    """GFLOP of one fp32 forward of the preset at `batch` (counted on the CPU model, batch-linear)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = get_model(net, "cpu")
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(torch.zeros((1, *image_shape(net))), torch.full((1,), 500))
    return counter.get_total_flops() * batch / 1e9


def _peak_case(params: dict, device: torch.device) -> Case:
    b, c, hw = PEAK_CONV
    conv = torch.nn.Conv2d(c, c, 3, padding=1).to(device, memory_format=torch.channels_last)
    x = torch.randn(b, c, hw, hw, device=device).contiguous(memory_format=torch.channels_last)
    gflop = 2 * b * c * c * 9 * hw * hw / 1e9
    return Case("model", params, lambda: conv(x), info={"gflop": gflop, "what": f"conv3x3 {b}x{c}x{hw}x{hw} -> {c}"})


def _context(case: Case):
    return torch.no_grad() if case.params.get("impl") == "compile" else torch.inference_mode()


def _head(case: Case) -> dict:
    return {"section": case.section, **case.params, **case.info}


def _first_call(case: Case, device: torch.device) -> float:
    """Seconds of the first call (compile / capture / export / autotune happen there)."""
    t0 = time.perf_counter()
    with _context(case):
        case.fn()
    sync(device)
    return time.perf_counter() - t0


def _finish(case: Case, row: dict) -> dict:
    if case.bytes:
        row["bytes"] = case.bytes
        row["gbps"] = case.bytes / row["median_s"] / 1e9
    if case.section != "step":
        row["latency_ms"] = row["median_s"] * 1e3
        row["best_ms"] = row["min_s"] * 1e3
        row["images_per_s"] = case.params["batch"] / row["median_s"]
    row["load_avg_1m"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return row


def _step_inner(fn: Callable[[], Any], device: torch.device) -> int:
    """Calls per timed sample of a step case: a call takes microseconds, a sample ~5 ms (2 ms on CUDA)."""
    return calibrate_inner(fn, device, 2e-3 if device.type == "cuda" else 5e-3)


def run_case(case: Case, device: torch.device, **timing: Any) -> dict:
    """Time a case (timing: measure's keyword arguments); the row of results.json."""
    row = _head(case)
    if case.skip:
        return {**row, "skipped": case.skip}
    if case.section == "step":
        with _context(case):
            timing = {**timing, "inner": _step_inner(case.fn, device)}
            row.update(measure(case.fn, device, **timing))
    else:
        row["first_call_s"] = _first_call(case, device)
        with _context(case):
            row.update(measure(case.fn, device, **timing))
    return _finish(case, row)


def run_group(cases: list[Case], device: torch.device, **timing: Any) -> list[dict]:
    """Time cases of the same work (the peers of one setting, the runtimes of one forward, the step impls of one
    size) interleaved, round by round (timing.measure_interleaved: its keyword arguments); their rows, in the cases' order."""
    rows = [{**_head(c), "skipped": c.skip} if c.skip else _head(c) for c in cases]
    live = {c.params["impl"]: (c, row) for c, row in zip(cases, rows) if not c.skip}
    for case, row in live.values():
        row["first_call_s"] = _first_call(case, device)

    def call(case: Case) -> Callable[[], None]:
        def run() -> None:
            with _context(case):
                case.fn()
        return run

    fns = {impl: call(c) for impl, (c, _) in live.items()}
    if cases and cases[0].section == "step":
        timing = {**timing, "inner": {impl: _step_inner(fn, device) for impl, fn in fns.items()}}
    results = measure_interleaved(fns, device, **timing)
    for impl, (case, row) in live.items():
        row.update(results[impl])
        _finish(case, row)
    return rows
