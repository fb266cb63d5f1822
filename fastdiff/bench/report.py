"""What a bench run writes: derived columns, the targets, results.json, results.md and the PNG plots.

Every file is written atomically (fastdiff.files): a crash mid-run leaves the previous version intact."""
from __future__ import annotations

import json
from pathlib import Path

from ..files import atomic_write, write_text
from .constants import MIB, fmt_size
from .timing import paired_speedup


def add_derived(rows: list[dict]) -> None:
    """Fraction of the same-run copy bandwidth for the step rows; speed-ups for the peer rows."""
    copy = {(r["numel"], r["dtype"]): r for r in rows if r["section"] == "step" and r.get("impl") == "copy"
            and "gbps" in r}
    for r in rows:
        if r["section"] == "step" and "gbps" in r and (r["numel"], r["dtype"]) in copy:
            c = copy[(r["numel"], r["dtype"])]  # (bytes / t) / (copy bytes / copy t), t paired round by round
            r["copy_fraction"] = r["bytes"] / c["bytes"] * speedup(c, r)
    engine = {(r["net"], r["batch"], r["sampler"], r["steps"]): r for r in rows
              if r["section"] == "peers" and r["impl"] == "engine" and "median_s" in r}
    for r in rows:
        key = (r.get("net"), r.get("batch"), r.get("sampler"), r.get("steps"))
        if r["section"] == "peers" and "median_s" in r and key in engine:
            r["engine_speedup"] = speedup(r, engine[key])
    model = {(r["net"], r["batch"], r["impl"]): r for r in rows if r["section"] == "model" and "median_s" in r}
    for r in rows:
        if r["section"] == "model" and "median_s" in r:
            if (r["net"], r["batch"], "torch") in model and r["impl"] != "fp32-peak":
                r["vs_torch"] = speedup(model[(r["net"], r["batch"], "torch")], r)
            if r["impl"] == "ort-int8" and (r["net"], r["batch"], "ort-fp32") in model:
                r["vs_ort_fp32"] = speedup(model[(r["net"], r["batch"], "ort-fp32")], r)
            if "gflop" in r:
                r["gflops"] = r["gflop"] / r["median_s"]
            peak = model.get((r["net"], r["batch"], "fp32-peak"))
            if "gflop" in r and peak and r is not peak:  # paired: (work / t) / (peak work / peak t)
                r["of_peak"] = r["gflop"] / peak["gflop"] * speedup(peak, r)


def fp32_bound(rows: list[dict], net: str, batch: int, per_step_s: float) -> str:
    """How many times faster than `per_step_s` a step can be if the fp32 forward ran at the best fp32 throughput of
    the run (the fp32-peak conv, or a forward if one ran faster) and nothing else took time; '' without the rows."""
    fp32 = [r for r in rows if r["section"] == "model" and r.get("impl") in ("fp32-peak", "torch", "ort-fp32")
            and "gflops" in r]
    work = [r["gflop"] for r in fp32 if (r["net"], r["batch"]) == (net, batch)]
    if not work:
        return ""
    best = max(r["gflops"] for r in fp32)
    return f"(fp32 bound {per_step_s / (work[0] / best):.1f}x: {work[0]:.2f} GFLOP a forward at {best:.0f} GFLOP/s)"


def speedup(slow: dict, fast: dict) -> float:
    """How many times faster `fast` ran than `slow`: the median of their same-round ratios where both were timed in
    the same interleaved rounds (timing.measure_interleaved), else the ratio of their medians."""
    a, b = slow.get("rounds_s"), fast.get("rounds_s")
    if a and b and len(a) == len(b):
        return paired_speedup(a, b)
    return slow["median_s"] / fast["median_s"]


def targets(rows: list[dict], gpu: bool) -> list[dict]:
    """The targets of benchmarks/NOTES.md (GPU) and issue 14 (CPU) for the device of this run, evaluated on what
    it measured."""
    out = []
    step = [r for r in rows if r["section"] == "step" and r["impl"] == "fused" and "copy_fraction" in r
            and r["numel"] >= 16 * MIB]
    if step:
        worst = min(step, key=lambda r: r["copy_fraction"])
        out.append({"target": "fused step >= 0.90 of copy bandwidth at >= 16M elements", "value": worst["copy_fraction"],
                    "met": worst["copy_fraction"] >= 0.90, "detail": f"worst: {fmt_size(worst['numel'])} {worst['dtype']}"})

    def peer(impl: str, net: str = "cifar-ddpm", batch: int = 1, sampler: str = "ddim", steps: int = 50) -> dict | None:
        for r in rows:
            if (r["section"], r.get("impl"), r.get("net"), r.get("batch"), r.get("sampler"), r.get("steps")) == \
                    ("peers", impl, net, batch, sampler, steps) and "median_s" in r:
                return r
        return None

    if gpu:
        for impl, goal, text in (("diffusers", 3.0, "(H100) engine >= 3x diffusers DDIMPipeline (cifar-ddpm, batch 1, DDIM-50)"),
                                 ("compile", 1.2, "(H100) engine >= 1.2x torch.compile(max-autotune) eager loop (cifar-ddpm, b1, DDIM-50)")):
            r = peer(impl)
            if r and "engine_speedup" in r:
                out.append({"target": text, "value": r["engine_speedup"], "met": r["engine_speedup"] >= goal, "detail": ""})
        return out + _ddpm_vs_ddim(rows)
    for batch, goal in ((1, 5.0), (64, 2.0)):  # issue 14: the CPU targets
        r = peer("diffusers", "digits", batch, "ddim", 50)
        if r and "engine_speedup" in r:
            out.append({"target": f"(CPU) engine >= {goal:g}x diffusers DDIMPipeline (digits, batch {batch}, DDIM-50)",
                        "value": r["engine_speedup"], "met": r["engine_speedup"] >= goal,
                        "detail": fp32_bound(rows, "digits", batch, r["median_s"] / 50)})
    step1m = {r["impl"]: r for r in rows if r["section"] == "step" and r.get("numel") == MIB
              and r.get("dtype") == "fp32" and "median_s" in r}
    if "fused" in step1m and "eager" in step1m:
        v = speedup(step1m["eager"], step1m["fused"])
        out.append({"target": "(CPU) fused step >= 10x diffusers' DDIMScheduler.step (1M fp32, eta=1, clip)", "value": v,
                    "met": v >= 10, "detail": ""})
    for r in rows:
        if (r["section"], r.get("impl"), r.get("net"), r.get("batch")) == ("model", "ort-int8", "cifar-ddpm", 16) \
                and "vs_ort_fp32" in r:
            out.append({"target": "(CPU) INT8 >= 1.5x ORT fp32 (cifar-ddpm, batch 16, one forward)",
                        "value": r["vs_ort_fp32"], "met": r["vs_ort_fp32"] >= 1.5, "detail": ""})
    return out + _ddpm_vs_ddim(rows)


def _ddpm_vs_ddim(rows: list[dict]) -> list[dict]:
    out = []
    e2e = {(r["net"], r["batch"], r["sampler"], r["steps"]): r["median_s"] for r in rows
           if r["section"] == "e2e" and r["impl"] == "engine" and "median_s" in r}
    for (net, batch, s, n), v in sorted(e2e.items()):
        if s == "ddpm" and n == 1000 and (net, batch, "ddim", 50) in e2e:
            ratio = v / e2e[(net, batch, "ddim", 50)]
            out.append({"target": f"DDPM-1000 latency >= 19x DDIM-50 ({net}, batch {batch})", "value": ratio,
                        "met": ratio >= 19, "detail": ""})
    return out


def markdown(result: dict) -> str:
    """results.md: the machine, the notes, the targets and one table per section."""
    m, rows = result["machine"], result["rows"]
    isa = " ".join(m.get("cpu_isa") or []) or "unknown"
    lines = [f"# fastdiff bench ({result['mode']}) — {m['device_name']}", "",
             f"{m['date']} · {m['cpu']}{' [' + m['cpu_id'] + ']' if m.get('cpu_id') else ''} ({m['cpu_cores']} cores, {m['torch_threads']} torch threads) · ISA {isa}"
             f" · torch {m['torch']} · CUDA {m['cuda']} · step backend {m['step_backend']}"
             f" · step CPU path {m.get('step_cpu_isa', '?')} · onnxruntime {m.get('onnxruntime') or 'not installed'}"
             f" · diffusers {m['diffusers'] or 'not installed'} · malloc {m.get('malloc', 'default')}"
             f" · load average at start {m.get('load_average')}"
             f", at the end {m.get('load_average_end')}", ""]
    lines += [f"- {n}" for n in result.get("notes", [])] + [""]
    tg = result.get("targets") or []
    if tg:
        lines += ["## Targets", "", "| target | value | met |", "|---|---:|:---:|"]
        lines += [f"| {t['target']} {t['detail']} | {t['value']:.2f} | {'yes' if t['met'] else 'no'} |" for t in tg]
        lines.append("")
    step = [r for r in rows if r["section"] == "step"]
    if step:
        lines += ["## (a) The reverse step alone (DDIM, eta=1, clip on)", "",
                  "bytes that must move = 3 tensors (read x, m; write out); copy = `dst.copy_(src)` (2 tensors).", "",
                  "| size | dtype | impl | time (µs) | GB/s | of copy BW |", "|---:|---|---|---:|---:|---:|"]
        for r in step:
            if "skipped" in r or "error" in r:
                lines.append(f"| {fmt_size(r['numel'])} | {r['dtype']} | {r['impl']} | {r.get('skipped') or r.get('error')} | | |")
                continue
            frac = f"{r['copy_fraction']:.2f}" if "copy_fraction" in r else ""
            lines.append(f"| {fmt_size(r['numel'])} | {r['dtype']} | {r['impl']} | {r['median_s'] * 1e6:.1f} | "
                         f"{r['gbps']:.1f} | {frac} |")
        lines.append("")
    mr = [r for r in rows if r["section"] == "model"]
    if mr:
        lines += ["## (m) One forward of the network", "", "torch = eager; ort-fp32 / ort-int8 = the engine's ONNX Runtime "
                  "model (IOBinding); fp32-peak = a dense 3x3 conv in torch's oneDNN, the machine's fp32 convolution throughput "
                  "in the same rounds; GFLOP/s = the forward's convolutions and matrix products (2 per multiply-add) / "
                  "median; of peak = that over the peak row's, paired round by round.", "",
                  "| net | batch | impl | latency (ms) | best (ms) | vs torch | int8 vs ort-fp32 | GFLOP/s | of peak |"
                  " load |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in mr:
            head = f"| {r['net']} | {r['batch']} | {r['impl']} |"
            if "skipped" in r or "error" in r:
                lines.append(f"{head} {r.get('skipped') or r.get('error')} | | | | | | |")
                continue
            vt = f"{r['vs_torch']:.2f}x" if "vs_torch" in r else ""
            vo = f"{r['vs_ort_fp32']:.2f}x" if "vs_ort_fp32" in r else ""
            gf = f"{r['gflops']:.0f}" if "gflops" in r else ""
            op = f"{r['of_peak']:.2f}" if "of_peak" in r else ""
            lines.append(f"{head} {r['latency_ms']:.2f} | {r['best_ms']:.2f} | {vt} | {vo} | {gf} | {op} | "
                         f"{r.get('load_avg_1m') or 0:.1f} |")
        lines.append("")
    for sec, title in (("peers", "(c) Peers: same network, same weights"), ("e2e", "(b) End to end: the engine")):
        sr = [r for r in rows if r["section"] == sec]
        if not sr:
            continue
        extra = " engine speed-up |" if sec == "peers" else ""
        lines += [f"## {title}", "", f"| net | batch | sampler | impl | latency (ms) | best (ms) | images/s | first call (s) "
                  f"|{extra} load |", "|---|---:|---|---|---:|---:|---:|---:|" + ("---:|" if sec == "peers" else "") + "---:|"]
        for r in sr:
            head = f"| {r['net']} | {r['batch']} | {r['sampler']}-{r['steps']} | {r['impl']} |"
            if "skipped" in r or "error" in r:
                lines.append(f"{head} {r.get('skipped') or r.get('error')} | | | | |" + (" |" if sec == "peers" else ""))
                continue
            sp = f" {r['engine_speedup']:.2f}x |" if sec == "peers" and "engine_speedup" in r else (" |" if sec == "peers" else "")
            lines.append(f"{head} {r['latency_ms']:.1f} | {r.get('best_ms', r['latency_ms']):.1f} | {r['images_per_s']:.2f} | "
                         f"{r.get('first_call_s', 0):.1f} |{sp} {r.get('load_avg_1m') or 0:.1f} |")
        lines.append("")
    return "\n".join(lines)


def write_markdown(path: Path, result: dict) -> None:
    write_text(path, markdown(result))


def write_plots(out: Path, result: dict) -> list[Path]:
    """latency_vs_steps.png (the e2e rows) and step_bandwidth.png (the step rows); returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    rows = result["rows"]
    title = result["machine"]["device_name"]

    def save(fig, name: str) -> None:
        fig.tight_layout()
        made.append(out / name)
        atomic_write(made[-1], lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
        plt.close(fig)

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
    save(fig, "latency_vs_steps.png")

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
    save(fig, "step_bandwidth.png")
    return made


def write_results(out: Path, result: dict, plots: bool = True) -> None:
    """Add the derived columns and the targets to result, then write results.json, results.md (and the plots)."""
    add_derived(result["rows"])
    result["targets"] = targets(result["rows"], gpu=result["machine"].get("device", "cpu").startswith("cuda"))
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "results.json", json.dumps(result, indent=1, default=str))
    write_markdown(out / "results.md", result)
    if plots:
        write_plots(out, result)
