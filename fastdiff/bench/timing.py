"""Timing of the benchmark cases: medians after warm-up; CUDA events on GPU, time.perf_counter on CPU."""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (no-op on the CPU)."""
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
    return _stats(times, inner)


def calibrate_inner(fn: Callable[[], Any], device: torch.device, target_s: float) -> int:
    """Calls per timed sample so that one sample lasts about target_s (short kernels)."""
    fn()
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    dt = max(time.perf_counter() - t0, 1e-7)
    return max(1, min(1000, int(target_s / dt)))


def measure_interleaved(fns: dict[str, Callable[[], Any]], device: torch.device, *, warmup: int = 1,
                        min_runs: int = 5, max_runs: int = 100, budget_s: float = 2.0,
                        inner: dict[str, int] | None = None) -> dict[str, dict]:
    """measure() for several implementations of the same work, timed in rounds: each round times one sample of
    every fn (inner[name] back-to-back calls, default 1), in an order rotated round by round, so a slow spell of a
    shared machine hits all of them alike.

    budget_s is per implementation (the rounds stop after len(fns) * budget_s). Each result also holds its
    per-round times ("rounds_s"): round r of two implementations was timed within seconds, so their ratio
    r by r (paired_speedup) is the fair comparison where the machine's speed drifts."""
    names = list(fns)
    inner = {name: (inner or {}).get(name, 1) for name in names}
    for _ in range(warmup):
        for name in names:
            fns[name]()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    start, rounds = time.perf_counter(), 0
    while rounds < max_runs and (rounds < min_runs or time.perf_counter() - start < budget_s * len(names)):
        shift = rounds % len(names)
        for name in names[shift:] + names[:shift]:
            fn, n = fns[name], inner[name]
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            sync(device)
            times[name].append((time.perf_counter() - t0) / n)
        rounds += 1
    return {name: _stats(ts, inner[name]) | {"rounds_s": ts} for name, ts in times.items()}


def paired_speedup(slow: list[float], fast: list[float]) -> float:
    """Median over rounds of slow[r] / fast[r] (same-round times of two implementations)."""
    return statistics.median(s / f for s, f in zip(slow, fast, strict=True))


def _stats(times: list[float], inner: int = 1) -> dict:
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return {"median_s": statistics.median(times), "min_s": min(times), "q1_s": q[0], "q3_s": q[2],
            "runs": len(times), "inner": inner}
