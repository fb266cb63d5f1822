"""fastdiff.bench: the `bench` CLI writes JSON + Markdown + PNG; the case builders; the diffusers mapping."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

from fastdiff import bench, ops
from fastdiff.cli import main
from fastdiff.nn.unet import UNet
from fastdiff.schedule import NoiseSchedule

from conftest import TINY


def test_bench_smoke_writes_results(tmp_path) -> None:
    out = tmp_path / "res"
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # != --threads 1, so a leaked thread count shows
    try:
        assert main(["bench", "--smoke", "--out", str(out), "--quiet", "--threads", "1"]) == 0
        assert torch.get_num_threads() == 2, "bench --threads must restore torch's thread count when it returns"
    finally:
        torch.set_num_threads(threads)
    result = json.loads((out / "results.json").read_text())
    assert {"cpu", "cpu_cores", "torch", "cuda", "device_name", "date"} <= set(result["machine"])
    sections = {r["section"] for r in result["rows"]}
    assert sections == {"step", "model", "peers", "e2e"}
    measured = [r for r in result["rows"] if "median_s" in r]
    assert measured and all(r["median_s"] > 0 for r in measured)
    step = {r["impl"]: r for r in result["rows"] if r["section"] == "step"}
    assert step["copy"]["copy_fraction"] == pytest.approx(1.0) and step["fused"]["gbps"] > 0
    md = (out / "results.md").read_text()
    assert "| size | dtype | impl |" in md and "engine" in md
    assert (out / "latency_vs_steps.png").stat().st_size > 1000
    assert (out / "step_bandwidth.png").stat().st_size > 1000


def test_bench_smoke_times_peers_interleaved(tmp_path) -> None:
    out = tmp_path / "res"
    assert main(["bench", "--smoke", "--out", str(out), "--quiet", "--sections", "peers,model"]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    peers = [r for r in rows if r["section"] == "peers" and "median_s" in r]
    assert len(peers) >= 3 and len({len(r["rounds_s"]) for r in peers}) == 1, "one setting's peers share their rounds"
    engine = next(r for r in peers if r["impl"] == "engine")
    for r in peers:
        assert r["engine_speedup"] == pytest.approx(bench.paired_speedup(r["rounds_s"], engine["rounds_s"]))


def test_bench_smoke_times_step_impls_interleaved(tmp_path) -> None:
    out = tmp_path / "res"
    assert main(["bench", "--smoke", "--out", str(out), "--quiet", "--sections", "step"]) == 0
    rows = {r["impl"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert set(rows) == {"fused", "eager", "copy"} and len({len(r["rounds_s"]) for r in rows.values()}) == 1
    assert all(r["inner"] >= 1 and r["median_s"] > 0 for r in rows.values())
    fused, copy = rows["fused"], rows["copy"]
    want = fused["bytes"] / copy["bytes"] * bench.paired_speedup(copy["rounds_s"], fused["rounds_s"])
    assert fused["copy_fraction"] == pytest.approx(want) and copy["copy_fraction"] == pytest.approx(1.0)


def test_bench_update_replaces_only_the_rerun_rows(tmp_path, capsys) -> None:
    out = tmp_path / "res"
    run = ["bench", "--smoke", "--device", "cpu", "--out", str(out), "--quiet", "--sections", "step,model"]
    assert main(run) == 0  # the CPU: its ORT rows are measured (on a GPU run they are skipped rows)
    before = json.loads((out / "results.json").read_text())
    assert main(run + ["--update", "--only", "^model:ort"]) == 0
    after = json.loads((out / "results.json").read_text())
    assert [r["impl"] for r in after["rows"]] == [r["impl"] for r in before["rows"]]
    for old, new in zip(before["rows"], after["rows"]):
        rerun = old["section"] == "model" and old["impl"] == "ort-fp32"
        assert (old != new) == rerun, old
    assert "^model:ort" in after["notes"][-1] and after["machine"]["date"] == before["machine"]["date"]
    # the same cases again: one note, the newest (the earlier one is marked: two runs can share a second)
    after["notes"][-1] += " (the earlier re-run)"
    (out / "results.json").write_text(json.dumps(after))
    assert main(run + ["--update", "--only", "^model:ort"]) == 0
    again = json.loads((out / "results.json").read_text())["notes"]
    assert sum("^model:ort" in n for n in again) == 1 and "earlier re-run" not in again[-1]
    assert main(["bench", "--quick", "--out", str(out), "--update", "--only", "x", "--quiet"]) == 2
    assert "--update" in capsys.readouterr().err
    assert main(["bench", "--smoke", "--update", "--quiet"]) == 2  # no --only, no --out


def test_measure_interleaved_rotates_and_pairs_rounds() -> None:
    calls: list[str] = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    result = bench.measure_interleaved(fns, torch.device("cpu"), warmup=1, min_runs=4, max_runs=4, budget_s=0.0)
    assert calls[:3] == ["a", "b", "c"]  # warm-up
    assert calls[3:] == list("abc" "bca" "cab" "abc"), "each round starts one implementation later"
    assert all(len(r["rounds_s"]) == 4 and r["runs"] == 4 and r["min_s"] <= r["median_s"] for r in result.values())
    # a machine that slows down 10x half-way: the ratio of medians misleads, the paired ratio does not
    slow = [1.0, 1.0, 10.0, 10.0, 10.0]
    fast = [0.5, 0.5, 5.0, 5.0, 5.0]
    assert bench.paired_speedup(slow, fast) == pytest.approx(2.0)
    assert bench.speedup({"median_s": 10.0, "rounds_s": slow}, {"median_s": 5.0, "rounds_s": fast}) == 2.0
    assert bench.speedup({"median_s": 3.0}, {"median_s": 1.5}) == 2.0  # not paired: medians


def test_bench_rejects_bad_sections(tmp_path, capsys) -> None:
    assert main(["bench", "--smoke", "--out", str(tmp_path), "--sections", "step,nope"]) == 2
    assert "--sections" in capsys.readouterr().err


def test_eager_step_is_the_fused_mean() -> None:
    """The diffusers-style baseline computes the same update as the fused op (noise aside)."""
    schedule = NoiseSchedule()
    t, prev, coefs = bench.step_coefs_example(schedule)
    table = bench.alpha_table(schedule)
    g = torch.Generator().manual_seed(0)
    x, m = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    want = bench.diffusers_ddim_step(m, x, table[t], table[prev], eta=0.0)
    plan0 = dict(zip(*zip(*schedule.reverse_steps("ddim", 50, eta=0.0))))
    got = ops.reverse_step(x, m, torch.arange(2), t, plan0[t])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert coefs.sigma > 0  # the timed step draws noise


def test_step_case_shapes_and_bytes() -> None:
    case = bench.step_case("fused", 64 * 1024, "fp32", "cpu")
    assert case.bytes == 3 * 4 * 64 * 1024 and case.fn().numel() == 64 * 1024
    copy = bench.step_case("copy", 3072, "bf16", "cpu")
    assert copy.bytes == 2 * 2 * 3072
    assert bench.step_shape(3072 * 5) == (5, 3, 32, 32)


def test_diffusers_unet_same_weights_same_output() -> None:
    pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ours = UNet(TINY).eval()
    theirs = bench.to_diffusers_unet(ours)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 700])
    with torch.inference_mode():
        torch.testing.assert_close(theirs(x, t).sample, ours(x, t), rtol=1e-4, atol=1e-4)


def test_forward_gflop_counts_the_convolutions() -> None:
    """The roofline's work per forward: 2 FLOPs per multiply-add of every conv (counted here by hooks), plus the
    small matrix products; linear in the batch."""
    from fastdiff.bench.cases import forward_gflop

    model, macs = bench.get_model("digits", "cpu"), []

    def count(module, inputs, out):
        macs.append(out.numel() * module.in_channels * module.kernel_size[0] * module.kernel_size[1])

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        with torch.inference_mode():
            model(torch.zeros(1, *bench.image_shape("digits")), torch.full((1,), 500))
    finally:
        for h in hooks:
            h.remove()
    conv_gflop = 2 * sum(macs) / 1e9
    assert conv_gflop <= forward_gflop("digits", 1) <= 1.05 * conv_gflop
    assert forward_gflop("digits", 4) == pytest.approx(4 * forward_gflop("digits", 1))


def test_fp32_bound_and_of_peak() -> None:
    """of_peak pairs a forward with the same-run peak conv; the target's bound is per-step time / (work / peak)."""
    rows = [{"section": "model", "impl": "torch", "net": "digits", "batch": 64, "median_s": 0.08, "gflop": 8.0},
            {"section": "model", "impl": "fp32-peak", "net": "digits", "batch": 64, "median_s": 0.02, "gflop": 4.0}]
    bench.add_derived(rows)
    assert rows[0]["gflops"] == pytest.approx(100.0) and rows[1]["gflops"] == pytest.approx(200.0)
    assert rows[0]["of_peak"] == pytest.approx(0.5) and "vs_torch" not in rows[1]
    from fastdiff.bench.report import fp32_bound

    assert fp32_bound(rows, "digits", 64, per_step_s=0.08) == "(fp32 bound 2.0x: 8.00 GFLOP a forward at 200 GFLOP/s)"
    assert fp32_bound(rows, "digits", 1, per_step_s=0.08) == ""
    rows.append({"section": "model", "impl": "ort-fp32", "net": "digits", "batch": 1, "median_s": 0.001, "gflop": 0.5})
    bench.add_derived(rows)  # a forward faster than the probe: the bound takes the best throughput seen
    assert fp32_bound(rows, "digits", 64, per_step_s=0.08) == "(fp32 bound 5.0x: 8.00 GFLOP a forward at 500 GFLOP/s)"


def test_targets_follow_the_device_of_the_run() -> None:
    """A GPU run is held to the GPU targets only, a CPU run to the CPU ones (the H200 run of 2026-12-04 listed the
    CPU targets, with a CPU 'fp32 bound' computed from GPU throughput)."""
    from fastdiff.bench.report import targets

    def peer(impl: str, net: str, batch: int, speedup: float) -> dict:
        return {"section": "peers", "impl": impl, "net": net, "batch": batch, "sampler": "ddim", "steps": 50,
                "median_s": 1.0, "engine_speedup": speedup}

    rows = [peer("diffusers", "cifar-ddpm", 1, 4.0), peer("diffusers", "digits", 1, 6.0)]
    on_gpu = [t["target"] for t in targets(rows, gpu=True)]
    on_cpu = [t["target"] for t in targets(rows, gpu=False)]
    assert on_gpu == ["(H100) engine >= 3x diffusers DDIMPipeline (cifar-ddpm, batch 1, DDIM-50)"]
    assert on_cpu == ["(CPU) engine >= 5x diffusers DDIMPipeline (digits, batch 1, DDIM-50)"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_machine_record_names_the_allocator_setting() -> None:
    """The bench keeps freed memory in glibc's heap for the run (page faults of fresh mmap pages made the eager step's
    time vary 2x between runs) and says so in the machine record; --update refuses a file made otherwise."""
    from fastdiff.bench.runner import describe_machine

    assert describe_machine(torch.device("cpu"))["malloc"].startswith("glibc: mmap threshold 32 MiB")


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="reads /proc/cpuinfo")
def test_machine_record_names_the_cpu_generation(tmp_path, capsys) -> None:
    """'AMD EPYC' names Zen 2 to Zen 5 alike: the record keeps family/model, results.md shows it, and --update
    refuses a file measured on another generation."""
    from fastdiff.machine import cpu_id

    family = re.search(r"^cpu family\s*:\s*(\d+)", Path("/proc/cpuinfo").read_text(), re.M)
    if family is None:
        pytest.skip("this /proc/cpuinfo has no 'cpu family' (not x86)")
    assert f"family {family.group(1)} model " in cpu_id()
    out = tmp_path / "res"
    assert main(["bench", "--smoke", "--out", str(out), "--quiet", "--sections", "step"]) == 0
    assert f"[{cpu_id()}]" in (out / "results.md").read_text()
    data = json.loads((out / "results.json").read_text())
    data["machine"]["cpu_id"] = "AuthenticAMD family 99 model 1 stepping 0"
    (out / "results.json").write_text(json.dumps(data))
    assert main(["bench", "--smoke", "--out", str(out), "--quiet", "--sections", "step", "--update",
                 "--only", "^step:fused"]) == 2
    assert "cpu_id" in capsys.readouterr().err
