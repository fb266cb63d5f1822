"""Where the Engine's ONNX Runtime forward spends its time on this CPU: ORT's own profiler, per operator type, on
one thread, beside the same machine's one-core convolution peak (a dense 3x3 conv in an ORT session of its own).

    .venv/bin/python benchmarks/ort_profile.py            # digits, batch 1 and 32 (one loop's share of batch 64)

The file profiled is the engine's (runtimes.engine_file: the U-Net body with GroupNorm as InstanceNormalization),
random weights (seed 0) as in `fastdiff bench`. The profiler adds a few µs to every node, so its total exceeds the
unprofiled forward; the "less overhead" column spreads that excess evenly over the nodes and takes it off (an
estimate, which matters at batch 1 only).
Writes benchmarks/results/<cpu>-<date>/ort_profile.{json,md}.
"""
from __future__ import annotations

import argparse
import collections
import json
import statistics
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from onnx import TensorProto, helper

from fastdiff import runtimes
from fastdiff.bench.cases import forward_gflop
from fastdiff.bench.models import get_model
from fastdiff.bench.runner import default_out, describe_machine
from fastdiff.bench.timing import measure
from fastdiff.files import write_json, write_text
from fastdiff.schedule import NoiseSchedule

PEAK_CONV = (1, 128, 32)  # batch, channels, side: big enough for MLAS to run at its best on one core


def one_thread_session(model: bytes | str, profile_dir: str | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = 1, 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if profile_dir:
        so.enable_profiling, so.profile_file_prefix = True, str(Path(profile_dir) / "ort")
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def median_ms(run, calls: int) -> float:
    """Median milliseconds of `calls` calls of run, after one warm-up call (fastdiff.bench.timing.measure)."""
    return measure(run, torch.device("cpu"), warmup=1, min_runs=calls, max_runs=calls)["median_s"] * 1e3


def peak_gflops(calls: int = 20) -> float:
    """GFLOP/s of one dense 3x3 conv (PEAK_CONV) in ORT on one thread."""
    b, c, hw = PEAK_CONV
    rng = np.random.default_rng(0)
    w = helper.make_tensor("w", TensorProto.FLOAT, [c, c, 3, 3], rng.standard_normal(c * c * 9).astype(np.float32))
    node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [b, c, hw, hw]) for n in ("x", "y")]
    proto = helper.make_model(helper.make_graph([node], "peak", io[:1], io[1:], [w]),
                              opset_imports=[helper.make_opsetid("", 17)])
    session = one_thread_session(proto.SerializeToString())
    x = rng.standard_normal((b, c, hw, hw)).astype(np.float32)
    return 2 * b * c * c * 9 * hw * hw / 1e9 / (median_ms(lambda: session.run(None, {"x": x}), calls) / 1e3)


def profile(net: str, batch: int, runs: int) -> dict:
    model, schedule = get_model(net, "cpu"), NoiseSchedule()
    path = runtimes.engine_file(model, schedule)
    bias = runtimes.BlockBias(model, schedule) if not model.config.num_classes else None
    x = np.random.default_rng(0).standard_normal((batch, *model.config.image_shape)).astype(np.float32)
    t = torch.full((batch,), 500)
    feed = {"x": x, "block_bias": bias(t).numpy()} if bias else {"x": x, "t": t.numpy()}
    plain = one_thread_session(str(path))
    forward_ms = median_ms(lambda: plain.run(None, feed), runs)
    with tempfile.TemporaryDirectory() as d:
        session = one_thread_session(str(path), d)
        for _ in range(runs):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    per_node = collections.defaultdict(list)  # (node, op type) -> its times, µs
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_node[(e["name"], e["args"]["op_name"])].append(e["dur"])
    by_op = collections.defaultdict(lambda: [0, 0.0])
    for (_, op), durs in per_node.items():
        by_op[op][0] += 1
        by_op[op][1] += statistics.median(durs[1:] or durs) / 1e3
    total = sum(ms for _, ms in by_op.values())
    overhead = max(0.0, total - forward_ms) / len(per_node)  # ms the profiler adds per node, spread evenly
    ops = sorted(({"op": op, "nodes": n, "ms": ms, "share": ms / total, "net_ms": max(0.0, ms - n * overhead)}
                  for op, (n, ms) in by_op.items()), key=lambda r: -r["ms"])
    conv_ms = max(1e-6, by_op["Conv"][1] - by_op["Conv"][0] * overhead)
    return {"net": net, "batch": batch, "forward_ms": forward_ms, "profiled_ms": total, "nodes": len(per_node),
            "gflop": forward_gflop(net, batch), "conv_ms": conv_ms,
            "conv_gflops": forward_gflop(net, batch) / (conv_ms / 1e3), "ops": ops}


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"# Where the ORT forward's time goes — {m['device_name']}", "",
             f"{m['date']} · {m['cpu']} ({m['cpu_cores']} cores) · ISA {' '.join(m.get('cpu_isa') or [])} · "
             f"onnxruntime {m.get('onnxruntime')} · one thread · `benchmarks/ort_profile.py`", "",
             f"One-core fp32 peak: a 3x3 conv {PEAK_CONV[1]}->{PEAK_CONV[1]} at {PEAK_CONV[2]}x{PEAK_CONV[2]} in ORT, "
             f"**{result['peak_gflops']:.0f} GFLOP/s**.", ""]
    for case in result["cases"]:
        lines += [f"## {case['net']}, batch {case['batch']}", "",
                  f"Forward {case['forward_ms']:.2f} ms unprofiled (median), {case['profiled_ms']:.2f} ms summed over "
                  f"{case['nodes']} nodes in the profile. Convolutions (less overhead): {case['conv_ms']:.2f} ms, "
                  f"{case['gflop']:.2f} GFLOP at {case['conv_gflops']:.0f} GFLOP/s "
                  f"({case['conv_gflops'] / result['peak_gflops']:.2f} of the one-core peak); everything else: "
                  f"{max(0.0, case['forward_ms'] - case['conv_ms']):.2f} ms "
                  f"({max(0.0, 1 - case['conv_ms'] / case['forward_ms']):.0%} of the forward).", "",
                  "| operator | nodes | ms per forward (profiled) | share | ms less overhead |",
                  "|---|---:|---:|---:|---:|"]
        lines += [f"| {r['op']} | {r['nodes']} | {r['ms']:.3f} | {r['share']:.1%} | {r['net_ms']:.3f} |"
                  for r in case["ops"]]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--net", default="digits")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--runs", type=int, default=100, help="forwards per case (fewer are taken at batch > 1)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    cases = [profile(args.net, b, max(10, args.runs // b)) for b in map(int, args.batches.split(","))]
    result = {"machine": describe_machine(torch.device("cpu")), "peak_gflops": peak_gflops(), "cases": cases}
    out = args.out or default_out(torch.device("cpu"))
    write_json(out / "ort_profile.json", result)
    write_text(out / "ort_profile.md", markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
