"""Which ONNX Runtime session settings run fastdiff's exported U-Nets fastest on this CPU: intra-op threads,
graph optimisation level and thread spinning, every combination timed interleaved on one forward (the Engine's
own setting, `runtimes.OrtModel`, is the first row: threads = torch's, ORT_ENABLE_ALL, spinning on).

    .venv/bin/python benchmarks/ort_options.py            # digits, batch 1 and 64, fp32 and INT8

Writes benchmarks/results/<cpu>-<date>/ort_options.{json,md}.
"""
from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from fastdiff.bench import measure_interleaved, paired_speedup
from fastdiff.bench.models import onnx_path
from fastdiff.bench.runner import default_out, describe_machine
from fastdiff.files import write_json, write_text
from fastdiff.nn.unet import preset

LEVELS = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL, "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED}


def session(path: Path, threads: int, level: str, spinning: bool) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = LEVELS[level]
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def sweep(net: str, batch: int, int8: bool, budget_s: float) -> list[dict]:
    c = preset(net)
    rng = np.random.default_rng(0)
    feed = {"x": rng.standard_normal((batch, c.in_channels, c.image_size, c.image_size), dtype=np.float32),
            "t": np.full((batch,), 500, np.int64)}
    most = torch.get_num_threads()
    settings = [(most, "all", True)] + [s for s in itertools.product(sorted({1, most}), LEVELS, (True, False))
                                        if s != (most, "all", True)]
    fns = {}
    for threads, level, spin in settings:
        s = session(onnx_path(net, int8), threads, level, spin)
        f = dict(feed, **({"y": np.full((batch,), -1, np.int64)} if "y" in [i.name for i in s.get_inputs()] else {}))
        fns[(threads, level, spin)] = lambda s=s, f=f: s.run(None, f)
    times = measure_interleaved(fns, torch.device("cpu"), warmup=3, min_runs=10, max_runs=200, budget_s=budget_s)
    engine = times[settings[0]]["rounds_s"]
    return [{"net": net, "batch": batch, "precision": "int8" if int8 else "fp32", "threads": k[0], "level": k[1],
             "spinning": k[2], "median_ms": v["median_s"] * 1e3, "best_ms": v["min_s"] * 1e3, "rounds": v["runs"],
             "vs_engine": paired_speedup(engine, v["rounds_s"])} for k, v in times.items()]


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"# ONNX Runtime session settings — {m['device_name']}", "",
             f"{m['date']} · {m['cpu']} ({m['cpu_cores']} cores) · ISA {' '.join(m.get('cpu_isa') or [])} · "
             f"onnxruntime {m.get('onnxruntime')} · `benchmarks/ort_options.py`", "",
             "One forward, every setting timed interleaved; vs engine = the median same-round speed-up over the "
             "Engine's own setting (the first row of each block; > 1 would be faster).", "",
             "| net | batch | precision | threads | optimisation | spinning | median (ms) | best (ms) | vs engine |",
             "|---|---:|---|---:|---|:---:|---:|---:|---:|"]
    lines += [f"| {r['net']} | {r['batch']} | {r['precision']} | {r['threads']} | {r['level']} | "
              f"{'on' if r['spinning'] else 'off'} | {r['median_ms']:.2f} | {r['best_ms']:.2f} | {r['vs_engine']:.2f}x |"
              for r in result["rows"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--net", default="digits")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--budget", type=float, default=2.0, help="seconds per setting and case")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    device = torch.device("cpu")
    rows = [r for b in map(int, args.batches.split(",")) for int8 in (False, True)
            for r in sweep(args.net, b, int8, args.budget)]
    out = args.out or default_out(device)
    result = {"machine": describe_machine(device), "rows": rows}
    write_json(out / "ort_options.json", result)
    write_text(out / "ort_options.md", markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
