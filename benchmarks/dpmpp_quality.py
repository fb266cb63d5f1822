"""DPM-Solver++ 2M / 2M-SDE vs DDIM (η = 0) on the shipped digits model: FID vs steps, plus the fused multistep
step's time beside diffusers' DPMSolverMultistepScheduler.step and its fraction of copy bandwidth.

    .venv/bin/python benchmarks/dpmpp_quality.py --threads 1

Writes benchmarks/results/quality-digits-cpu-<date>/dpmpp.{json,md,png}.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import time
from pathlib import Path

import numpy as np
import torch

from fastdiff import metrics, ops
from fastdiff.checkpoint import BUNDLED_MODEL, load_model
from fastdiff.engine import generate
from fastdiff.files import write_json
from fastdiff.machine import machine_info
from fastdiff.schedule import NoiseSchedule

SAMPLERS = ("ddim", "dpmpp-2m", "dpmpp-2m-sde")
STEPS = (5, 10, 15, 20, 50)
N = 297  # the held-out test set's size
NUMEL = 1 << 20  # 1 M fp32 elements for the step benchmark
ROOT = Path(__file__).parent / "results"


def _best_of(fn, repeats: int = 20, warmup: int = 3) -> float:
    """Median seconds of fn() over `repeats` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def step_rows() -> list[dict]:
    """The fused multistep step vs diffusers' step (a second-order step mid-run) at 1 M fp32 elements."""
    from diffusers import DPMSolverMultistepScheduler

    shape = (4, 4, 256, 256)
    g = torch.Generator().manual_seed(0)
    x, m, xp = (torch.randn(shape, generator=g) for _ in range(3))
    seeds = torch.arange(shape[0], dtype=torch.int64)
    src, dst = torch.randn(NUMEL), torch.empty(NUMEL)
    copy_s = _best_of(lambda: dst.copy_(src))
    copy_bw = 2 * 4 * NUMEL / copy_s
    rows = [{"name": "copy (1 M fp32)", "seconds": copy_s, "bytes": 8 * NUMEL, "gb_s": copy_bw / 1e9}]
    for sampler, algorithm in (("dpmpp-2m", "dpmsolver++"), ("dpmpp-2m-sde", "sde-dpmsolver++")):
        plan = NoiseSchedule().reverse_steps(sampler, 20)
        t, coefs = plan[10]
        fused_s = _best_of(lambda: ops.multistep_step(x, m, xp, seeds, t, coefs))
        sched = DPMSolverMultistepScheduler(algorithm_type=algorithm)
        sched.set_timesteps(20)

        def diffusers_step():
            sched._step_index, sched.lower_order_nums, sched.model_outputs = 10, 2, [xp, xp]
            sched.step(m, t, x, generator=g)

        theirs_s = _best_of(diffusers_step)
        moved = 5 * 4 * NUMEL  # x, m, x0_prev in; out, x0 out
        rows.append({"name": f"{sampler} fused step", "seconds": fused_s, "bytes": moved, "gb_s": moved / fused_s / 1e9,
                     "fraction_of_copy_bw": moved / fused_s / copy_bw, "diffusers_seconds": theirs_s,
                     "speedup_vs_diffusers": theirs_s / fused_s})
    return rows


def quality_rows(n: int, steps: tuple[int, ...], batch_size: int, quiet: bool) -> list[dict]:
    model, schedule, _ = load_model(BUNDLED_MODEL)
    shape = (model.config.in_channels, model.config.image_size, model.config.image_size)
    generate(model, schedule, shape, 8, sampler="ddim", steps=1)  # warm-up (ORT export / load)
    rows = []
    for sampler in SAMPLERS:
        for s in steps:
            options = {"eta": 0.0} if sampler == "ddim" else {}
            start = time.perf_counter()
            images = generate(model, schedule, shape, n, seed=0, sampler=sampler, steps=s, batch_size=batch_size,
                              **options)
            seconds = time.perf_counter() - start
            row = {"sampler": sampler, "steps": s, **metrics.evaluate(images), "seconds": round(seconds, 3)}
            rows.append(row)
            if not quiet:
                print(f"{sampler:>13}-{s:<3} FID {row['fid']:6.2f} [{row['fid_ci95'][0]:.2f}, "
                      f"{row['fid_ci95'][1]:.2f}]  {seconds:6.1f} s", flush=True)
    return rows


def write_markdown(results: dict, path: Path) -> None:
    q, lines = results["quality"], []
    fid = {(r["sampler"], r["steps"]): r for r in q}
    steps = sorted({r["steps"] for r in q})
    lines += [f"# DPM-Solver++ vs DDIM on the shipped digits model (n = {results['n']}, CPU)", "",
              f"Measured {results['machine']['date']} on {results['machine']['cpu']} "
              f"({results['threads']} torch thread(s)); load average before / after: "
              f"{results['load_before']} / {results['load_after']}.", "",
              "FID (95 % bootstrap interval) against the 297 held-out digits; DDIM with η = 0.", "",
              "| sampler | " + " | ".join(f"S = {s}" for s in steps) + " |",
              "|---|" + "---|" * len(steps)]
    for sampler in SAMPLERS:
        cells = [f"{fid[sampler, s]['fid']:.2f} [{fid[sampler, s]['fid_ci95'][0]:.2f}, "
                 f"{fid[sampler, s]['fid_ci95'][1]:.2f}]" if (sampler, s) in fid else "" for s in steps]
        lines.append(f"| {sampler} | " + " | ".join(cells) + " |")
    t = results.get("target")
    if t:
        lines += ["", f"Target: DPM-Solver++ 2M at 15 steps within 10 % of DDIM-50's FID: {t['dpmpp_2m_15']:.2f} vs "
                      f"{t['ddim_50']:.2f} (ratio {t['ratio']:.3f}) -> {'met' if t['met'] else 'not met'}."]
    lines += ["", "## The fused multistep step (1 M fp32 elements)", "",
              "| row | time (ms) | GB/s | of copy bandwidth | diffusers step (ms) | speed-up |", "|---|---|---|---|---|---|"]
    for r in results["step"]:
        lines.append(f"| {r['name']} | {r['seconds'] * 1e3:.3f} | {r['gb_s']:.2f} | "
                     f"{r.get('fraction_of_copy_bw', 1.0):.2f} | "
                     f"{r['diffusers_seconds'] * 1e3:.3f} | {r['speedup_vs_diffusers']:.1f}x |"
                     if "diffusers_seconds" in r else f"| {r['name']} | {r['seconds'] * 1e3:.3f} | {r['gb_s']:.2f} "
                                                      f"| 1.00 | | |")
    lines += ["", "Bytes moved by the fused step: x, model output, x0_prev read; out, x0 written (5 x 4 MB)."]
    path.write_text("\n".join(lines) + "\n")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for sampler in SAMPLERS:
        rows = sorted((r for r in results["quality"] if r["sampler"] == sampler), key=lambda r: r["steps"])
        s = [r["steps"] for r in rows]
        ax.plot(s, [r["fid"] for r in rows], marker="o", label=sampler)
        ax.fill_between(s, [r["fid_ci95"][0] for r in rows], [r["fid_ci95"][1] for r in rows], alpha=0.15)
    ax.set_xscale("log")
    ax.set_xticks(STEPS, [str(s) for s in STEPS])
    ax.set_xlabel("sampling steps S")
    ax.set_ylabel(f"FID (n = {results['n']}, lower is better)")
    ax.set_title("DPM-Solver++ vs DDIM (η = 0), shipped digits model")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1; the cores are shared)")
    p.add_argument("--n", type=int, default=N, help=f"images per row (default: {N})")
    p.add_argument("--steps", type=int, nargs="+", default=list(STEPS))
    p.add_argument("--batch-size", type=int, default=N)
    p.add_argument("--out", type=Path, help="output folder (default: results/quality-digits-cpu-<date>)")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    out = a.out or ROOT / f"quality-digits-cpu-{dt.date.today().isoformat()}"
    out.mkdir(parents=True, exist_ok=True)
    load_before = [round(v, 2) for v in os.getloadavg()]
    results = {"n": a.n, "threads": a.threads, "step_backend": ops.backend(), "cpu_isa": ops.cpu_isa(),
               "machine": machine_info(torch.device("cpu")), "load_before": load_before}
    results["quality"] = quality_rows(a.n, tuple(a.steps), a.batch_size, a.quiet)
    results["step"] = step_rows()
    results["load_after"] = [round(v, 2) for v in os.getloadavg()]
    fid = {(r["sampler"], r["steps"]): r["fid"] for r in results["quality"]}
    if ("dpmpp-2m", 15) in fid and ("ddim", 50) in fid:
        ratio = fid["dpmpp-2m", 15] / fid["ddim", 50]
        results["target"] = {"dpmpp_2m_15": fid["dpmpp-2m", 15], "ddim_50": fid["ddim", 50], "ratio": ratio,
                             "met": ratio <= 1.10}
    write_json(out / "dpmpp.json", results)
    write_markdown(results, out / "dpmpp.md")
    plot(results, out / "dpmpp.png")
    print(f"-> {out}/dpmpp.md")


if __name__ == "__main__":
    main()
