"""diffusers' DDIMPipeline with its own DDIMScheduler vs with fastdiff's FusedDDIMScheduler, same run, same weights (CPU).

  .venv/bin/python benchmarks/diffusers_schedulers.py [--diffusers FOLDER] [--threads 1] [--runs 7]

Measures (medians; the two schedulers alternate run by run, so a change of load hits both alike):
  step   scheduler.step alone on tensors of several sizes (digits, CIFAR-10 and Stable Diffusion latent
         shapes), eta 0 and 1; the fused scheduler with and without pred_original_sample (one op call or two).
  e2e    DDIMPipeline end to end (50 steps, batch 16, eta 0 and 1) on the shipped digits model converted to a
         UNet2DModel (or --diffusers FOLDER), and the time spent inside scheduler.step per step of those runs.
Writes benchmarks/results/<cpu-slug>-<date>/diffusers_schedulers.{json,md}, with the load average before and after
(other jobs may share the cores).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffusers import DDIMPipeline, DDIMScheduler  # noqa: E402

from fastdiff import ops  # noqa: E402
from fastdiff.bench.runner import default_out  # noqa: E402
from fastdiff.checkpoint import BUNDLED_MODEL, load_model  # noqa: E402
from fastdiff.diffusers import FusedDDIMScheduler  # noqa: E402
from fastdiff.files import write_json, write_text  # noqa: E402
from fastdiff.interop.diffusers import load_diffusers, to_diffusers_pipeline  # noqa: E402
from fastdiff.machine import machine_info  # noqa: E402

STEP_SHAPES = {"digits 16x1x16x16": (16, 1, 16, 16), "cifar 16x3x32x32": (16, 3, 32, 32),
               "sd-latents 4x4x64x64": (4, 4, 64, 64), "sd-latents 1x4x128x128": (1, 4, 128, 128)}
IMPLS = ("diffusers", "fused", "fused, no x0")


def _schedulers() -> dict[str, object]:
    ref = DDIMScheduler()
    fused, lean = FusedDDIMScheduler.from_config(ref.config), FusedDDIMScheduler.from_config(ref.config)
    lean.return_pred_original_sample = False
    for s in (ref, fused, lean):
        s.set_timesteps(50)
    for s in (fused, lean):
        s.set_seeds(0)
    return dict(zip(IMPLS, (ref, fused, lean)))


def bench_steps(runs: int) -> list[dict]:
    """scheduler.step alone: seconds per call, alternating implementations within each round."""
    rows = []
    for name, shape in STEP_SHAPES.items():
        x, m = torch.randn(shape), torch.randn(shape)
        inner = max(1, int(2e6 / x.numel()))
        for eta in (0.0, 1.0):
            scheds, gen = _schedulers(), torch.Generator().manual_seed(0)
            t = int(scheds["diffusers"].timesteps[25])
            calls = {k: (lambda s=s, k=k: s.step(m, t, x, eta=eta, generator=gen if k == "diffusers" else None))
                     for k, s in scheds.items()}
            times: dict[str, list[float]] = {k: [] for k in calls}
            for fn in calls.values():
                fn()
            for _ in range(runs * 3):
                for k, fn in calls.items():
                    t0 = time.perf_counter()
                    for _ in range(inner):
                        fn()
                    times[k].append((time.perf_counter() - t0) / inner)
            med = {k: statistics.median(v) for k, v in times.items()}
            best = {k: min(v) for k, v in times.items()}
            rows.append({"shape": name, "numel": x.numel(), "eta": eta, "inner": inner, "rounds": runs * 3,
                         **{f"{k} s": v for k, v in med.items()}, **{f"{k} min s": v for k, v in best.items()},
                         "speedup": med["diffusers"] / med["fused"],
                         "speedup, no x0": med["diffusers"] / med["fused, no x0"],
                         "speedup (min)": best["diffusers"] / best["fused"],
                         "speedup, no x0 (min)": best["diffusers"] / best["fused, no x0"]})
            print(f"step {name} eta={eta:g}: " + ", ".join(f"{k} {v * 1e6:.1f} us (min {best[k] * 1e6:.1f})"
                                                          for k, v in med.items()))
    return rows


def bench_e2e(unet, runs: int, batch: int, steps: int) -> list[dict]:
    """DDIMPipeline end to end with each scheduler (same unet object), alternating runs."""
    rows = []
    for eta in (0.0, 1.0):
        pipes, step_time = {}, {}
        for k, sched in _schedulers().items():
            pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler())
            pipe.scheduler = sched  # DDIMPipeline() converts what it is given to DDIMScheduler; assign after
            pipe.set_progress_bar_config(disable=True)
            pipes[k], step_time[k] = pipe, []
            original = sched.step

            def timed(*args, _orig=original, _k=k, **kw):
                t0 = time.perf_counter()
                out = _orig(*args, **kw)
                step_time[_k].append(time.perf_counter() - t0)
                return out

            sched.step = timed
        wall: dict[str, list[float]] = {k: [] for k in pipes}
        out = {}
        for r in range(runs + 1):  # run 0: warm-up, not counted
            for k, pipe in pipes.items():
                n_before = len(step_time[k])
                t0 = time.perf_counter()
                out[k] = pipe(batch_size=batch, num_inference_steps=steps, eta=eta, output_type="np",
                              generator=torch.Generator().manual_seed(r)).images
                if r:
                    wall[k].append(time.perf_counter() - t0)
                else:
                    del step_time[k][n_before:]
        med = {k: statistics.median(v) for k, v in wall.items()}
        per_step = {k: statistics.median(v) for k, v in step_time.items()}
        row = {"eta": eta, "batch": batch, "steps": steps, "runs": runs, **{f"{k} s": v for k, v in med.items()},
               **{f"{k} min s": min(v) for k, v in wall.items()},
               **{f"{k} step s": v for k, v in per_step.items()}, "speedup": med["diffusers"] / med["fused"],
               "speedup (min)": min(wall["diffusers"]) / min(wall["fused"]),
               "step speedup": per_step["diffusers"] / per_step["fused"],
               "step share (diffusers)": per_step["diffusers"] * steps / med["diffusers"]}
        if eta == 0.0:
            row["max |image diff| fused vs diffusers"] = float(np.abs(out["fused"] - out["diffusers"]).max())
        rows.append(row)
        print(f"e2e eta={eta:g}: " + ", ".join(f"{k} {v:.3f} s" for k, v in med.items()) +
              "; per step: " + ", ".join(f"{k} {v * 1e6:.0f} us" for k, v in per_step.items()))
    return rows


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"# diffusers DDIMPipeline: DDIMScheduler vs fastdiff FusedDDIMScheduler ({m['date'][:10]})", "",
             f"{m['cpu']} ({', '.join(m['cpu_isa']) or 'ISA unknown'}), {m['cpu_cores']} cores, torch "
             f"{m['torch']} with {result['threads']} thread(s), diffusers {result['diffusers']}, step backend "
             f"{result['step_backend']}. Load average before / after: {result['load_average_before']} / "
             f"{result['load_average_after']} (other jobs share these cores; the schedulers alternate run by "
             "run, so a change of load hits them alike). Medians, and in brackets the best of the rounds (the "
             "figure least disturbed by the other jobs).", "",
             "## scheduler.step alone", "", "| shape | η | diffusers µs | fused µs | fused, no x0 µs | speedup | "
             "speedup, no x0 |", "|---|---:|---:|---:|---:|---:|---:|"]

    def us(r: dict, k: str) -> str:
        return f"{r[k + ' s'] * 1e6:.1f} ({r[k + ' min s'] * 1e6:.1f})"

    for r in result["step"]:
        lines.append(f"| {r['shape']} | {r['eta']:g} | {us(r, 'diffusers')} | {us(r, 'fused')} | "
                     f"{us(r, 'fused, no x0')} | {r['speedup']:.2f}× ({r['speedup (min)']:.2f}×) | "
                     f"{r['speedup, no x0']:.2f}× ({r['speedup, no x0 (min)']:.2f}×) |")
    e = result["e2e"][0]
    lines += ["", f"## DDIMPipeline end to end: {result['model']}, batch {e['batch']}, {e['steps']} steps", "",
              "| η | diffusers s | fused s | speedup | step µs diffusers | step µs fused | step µs fused, no x0 | "
              "step speedup | step share of diffusers' run |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["e2e"]:
        lines.append(f"| {r['eta']:g} | {r['diffusers s']:.3f} ({r['diffusers min s']:.3f}) | {r['fused s']:.3f} "
                     f"({r['fused min s']:.3f}) | {r['speedup']:.2f}× ({r['speedup (min)']:.2f}×) | "
                     f"{r['diffusers step s'] * 1e6:.0f} | {r['fused step s'] * 1e6:.0f} | "
                     f"{r['fused, no x0 step s'] * 1e6:.0f} | {r['step speedup']:.2f}× | "
                     f"{r['step share (diffusers)']:.1%} |")
    lines += ["", f"η = 0 images, fused vs diffusers: max |difference| "
              f"{result['e2e'][0]['max |image diff| fused vs diffusers']:.2e} (in [0, 1]).",
              "\"fused\" returns pred_original_sample as diffusers does (a second fused op call); \"no x0\" sets "
              "`scheduler.return_pred_original_sample = False` (one call). Step µs in the pipeline: time inside "
              "scheduler.step per call during the timed runs.", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--diffusers", type=Path, help="a diffusers folder to run instead of the shipped digits model")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1; the cores are shared)")
    p.add_argument("--runs", type=int, default=7, help="timed pipeline runs per scheduler (default: 7)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--out", type=Path, help="output folder (default: benchmarks/results/<cpu-slug>-<date>)")
    a = p.parse_args()
    import diffusers

    torch.set_num_threads(a.threads)
    load_before = os.getloadavg()
    if a.diffusers:
        unet, model_name = load_diffusers(a.diffusers)[0].unet, str(a.diffusers)
    else:
        model, schedule, _ = load_model(BUNDLED_MODEL)
        unet, model_name = to_diffusers_pipeline(model, "ddim", schedule).unet, "shipped digits model (UNet2DModel)"
    with torch.inference_mode():
        step_rows = bench_steps(a.runs)
        e2e_rows = bench_e2e(unet, a.runs, a.batch, a.steps)
    cpu = torch.device("cpu")
    result = {"what": "diffusers DDIMPipeline: DDIMScheduler vs FusedDDIMScheduler", "machine": machine_info(cpu),
              "threads": a.threads, "diffusers": diffusers.__version__, "step_backend": ops.backend(),
              "model": model_name, "load_average_before": [round(v, 2) for v in load_before],
              "load_average_after": [round(v, 2) for v in os.getloadavg()], "step": step_rows, "e2e": e2e_rows}
    out = a.out or ROOT / default_out(cpu)
    write_json(out / "diffusers_schedulers.json", result)
    write_text(out / "diffusers_schedulers.md", markdown(result))
    print(f"→ {out}/diffusers_schedulers.md")


if __name__ == "__main__":
    main()
