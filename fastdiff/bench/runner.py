"""The runner behind `fastdiff bench`: the jobs of a suite in priority order, a cost estimate per case, the
machine record, and the result files rewritten after each section."""
from __future__ import annotations

import ctypes
import datetime as _dt
import functools
import json
import os
import re
import subprocess
import time
import warnings
from pathlib import Path

import torch

from .. import ops
from ..interop.diffusers import diffusers_available
from ..machine import device_slug, machine_info
from .cases import Case, e2e_case, model_case, run_case, run_group, step_case
from .constants import SECTIONS
from .models import get_model, get_ort_model, image_shape
from .report import write_results
from .suite import Suite, make_suite
from .timing import sync

Job = tuple[str, dict]  # (section, the case's parameters)


def describe_machine(device: torch.device) -> dict:
    """fastdiff.machine.machine_info plus what a benchmark also depends on: the step backend, diffusers'
    version and (GPU) the NVIDIA driver."""
    info = {**machine_info(device), "step_backend": ops.backend(), "step_cpu_isa": ops.cpu_isa(),
            "diffusers": diffusers_available(), "onnxruntime": _onnxruntime()}
    if device.type == "cuda":
        info["driver"] = _nvidia_driver()
    info["malloc"] = _steady_malloc()
    return info


def _steady_malloc() -> str:
    """Keep freed memory in glibc's heap for the run: tensors up to 32 MiB come from the heap instead of fresh
    mmap pages. By default glibc maps a large block freshly, or trims the heap, depending on the history of the
    process, and the page faults of those fresh pages made the same eager step take 8 ms in one run and 16 ms in
    another (1 M fp32, 2-core EPYC). Every implementation of the run gets the same allocator."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's mallopt parameters
        if libc.mallopt(m_mmap_threshold, 32 << 20) and libc.mallopt(m_trim_threshold, 256 << 20):
            return "glibc: mmap threshold 32 MiB, trim threshold 256 MiB (mallopt)"
    except (OSError, AttributeError):
        pass
    return "default"


def _onnxruntime() -> str | None:
    try:
        import onnxruntime

        return onnxruntime.__version__
    except ImportError:
        return None


def _nvidia_driver() -> str | None:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or None
    except Exception:  # noqa: BLE001 - no nvidia-smi, or it failed: the driver is unknown
        return None


def default_out(device: torch.device) -> Path:
    """benchmarks/results/<device-slug>-<date>, relative to the current working directory."""
    return Path("benchmarks") / "results" / f"{device_slug(device)}-{_dt.date.today().isoformat()}"


def _jobs(suite: Suite, sections: list[str]) -> list[Job]:
    jobs = []
    if "step" in sections:
        jobs += [("step", {"impl": i, "numel": n, "dtype": d}) for d in suite.step_dtypes for n in suite.step_sizes
                 for i in suite.step_impls]
    if "model" in sections:
        jobs += [("model", {"impl": i, "net": net, "batch": b}) for net, b in suite.model for i in suite.model_impls]
    if "peers" in sections:
        jobs += [("peers", {"impl": i, "net": net, "batch": b, "sampler": s, "steps": n})
                 for net, b, s, n in suite.peers for i in suite.peer_impls]
    if "e2e" in sections:
        jobs += [("e2e", {"impl": i, "net": net, "batch": b, "sampler": s, "steps": n})
                 for net, b, s, n in suite.e2e for i in suite.e2e_impls]
    return sorted(jobs, key=lambda j: _priority(*j))  # stable: the suite's order within a priority


def _priority(section: str, p: dict) -> int:
    """Run order: the step, then the cases the targets need (so a --time-budget keeps them), then the rest."""
    if section == "step":
        return 0
    if section == "model":
        return 1 if p["net"] == "cifar-ddpm" and p["batch"] == 16 else 2
    if p["net"] == "cifar-ddpm" and p["batch"] == 1 and (p["sampler"], p["steps"]) in (("ddim", 50), ("ddpm", 1000)):
        return 1
    if p["net"] == "digits" and p["batch"] in (1, 64) and (p["sampler"], p["steps"]) == ("ddim", 50):
        return 1  # the CPU targets: engine vs diffusers
    if section == "e2e" and (p["sampler"], p["steps"]) in (("ddim", 50), ("ddpm", 1000)):
        return 2
    return 3


@functools.lru_cache(maxsize=None)
def _forward_s(net: str, batch: int, device: str, kind: str = "torch") -> float:
    """Seconds of one model call at `batch` (for the cost estimate); kind: torch, ort-fp32 or ort-int8 (the runtime
    the case runs). CPU: timed at min(batch, 8), scaled linearly. Batch 1 alone misleads: a small net's batch-1
    call is mostly per-call overhead that does not scale (64 digits calls at batch 1 take several times one call
    at batch 64), and a full-size call of a large net would cost more than the estimate is meant to save."""
    dev = torch.device(device)
    model = get_model(net, device) if kind == "torch" else get_ort_model(net, kind == "ort-int8")

    def once(b: int) -> float:
        x = torch.randn((b, *image_shape(net)), device=dev)
        t = torch.full((b,), 500, device=dev)
        with torch.inference_mode():
            model(x, t)
            sync(dev)
            t0 = time.perf_counter()
            model(x, t)
            sync(dev)
        return time.perf_counter() - t0

    if dev.type != "cpu":
        return once(batch)
    probe = min(batch, 8)
    return once(probe) * batch / probe


def _kind(impl: str, device: torch.device) -> str:
    """Which network runtime an e2e/peer/model case runs (for its cost estimate)."""
    if device.type == "cuda" or impl in ("engine-torch", "engine-bf16", "eager", "compile", "diffusers", "torch", "fp32-peak"):
        return "torch"
    return "ort-int8" if impl in ("engine-int8", "ort-int8") else "ort-fp32"


def _notes(mode: str, device: torch.device, suite: Suite) -> list[str]:
    notes = []
    if device.type == "cpu":
        notes.append("CPU run: time.perf_counter timing; CUDA graphs and bf16 autocast rows are GPU-only.")
    if mode != "full":
        notes.append("torch.compile rows are skipped in --quick (compile time); run --full for them.")
    elif device.type == "cpu":
        notes.append("torch.compile peer rows are GPU rows (max-autotune compile time on a small CPU exceeds a case's "
                     "budget); the step section keeps its compiled step.")
    if device.type == "cpu":
        notes.append("Runtimes: engine = Engine(runtime='auto') = ONNX Runtime model + fused torch step; engine-torch = "
                     "the eager torch model + fused step; engine-int8 = the INT8 ONNX model; engine-unsplit = the engine with "
                     "the batch in one loop (workers=1; the default splits a batch into one loop per thread); ort-fp32/ort-int8 = the "
                     "torch-free ONNX sampler (fastdiff.export.runtime: NumPy step); model = one forward alone.")
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        if load > 0.5 * (os.cpu_count() or 1):
            notes.append(f"LOAD: the 1-minute load average was {load:.1f} on {os.cpu_count()} cores at the start: other "
                         "jobs shared the CPU, so medians are inflated; 'best' (the fastest run) is the least disturbed "
                         "figure, and each row records the load average when it finished.")
    if "diffusers" in suite.peer_impls and diffusers_available() is None:
        notes.append("diffusers is not installed: the DDIMPipeline/DDPMPipeline rows are skipped (pip install -e .[bench]).")
    elif "diffusers" in suite.peer_impls:
        notes.append("diffusers rows: UNet2DModel with the same architecture and the same weights copied in "
                     "(unet_max_abs_diff in results.json); output_type='np' (includes its copy to the host).")
    notes.append("Peers of one setting (and the runtimes of one forward, the step impls of one size) are timed interleaved: "
                 "each round runs every implementation once (a step sample: ~5 ms of back-to-back calls), in a rotated order; a speed-up is the median of same-round ratios, so a slow spell "
                 "of a shared machine slows both sides of it alike.")
    notes.append("Weights are random (seed 0); x_T and noise: fastdiff Philox (engine) vs torch.randn (eager/compile/diffusers).")
    return notes


def _group_key(section: str, p: dict) -> tuple:
    """Jobs with the same key do the same work and are timed interleaved (cases.run_group): the peers of one
    (net, batch, sampler, steps), the runtimes of one forward, the step impls of one (size, dtype); every e2e job
    is timed alone."""
    if section == "peers":
        return (section, p["net"], p["batch"], p["sampler"], p["steps"])
    if section == "model":
        return (section, p["net"], p["batch"])
    if section == "step":
        return (section, p["numel"], p["dtype"])
    return (section, id(p))


def _groups(jobs: list[Job]) -> list[list[Job]]:
    """Consecutive jobs with the same _group_key (the priority sort keeps a setting's jobs together)."""
    groups: list[list[Job]] = []
    for job in jobs:
        if groups and _group_key(*groups[-1][0]) == _group_key(*job):
            groups[-1].append(job)
        else:
            groups.append([job])
    return groups


def _prepare(section: str, params: dict, mode: str, suite: Suite, device: torch.device) -> Case | dict:
    """The case of one job, or (estimated beyond the case budget, or --full only) the row saying why it is skipped."""
    if section == "step":
        return step_case(params["impl"], params["numel"], params["dtype"], device)
    forward = _forward_s(params["net"], params["batch"], str(device), _kind(params["impl"], device))
    if section == "model":
        est = forward * (1 + suite.model_timing["warmup"] + suite.model_timing["min_runs"])
        if est > suite.case_budget_s:
            return {"section": section, **params, "skipped": f"estimated {est:.0f} s > {suite.case_budget_s:.0f} s"}
        return model_case(params["impl"], params["net"], params["batch"], device)
    est = forward * params["steps"] * (2 + suite.e2e_timing["min_runs"])
    if params["impl"] in ("compile",) and mode != "full":
        return {"section": section, **params, "skipped": "torch.compile: --full only"}
    if est > suite.case_budget_s:
        return {"section": section, **params,
                "skipped": f"estimated {est:.0f} s > {suite.case_budget_s:.0f} s per case on this device"}
    case = e2e_case(params["impl"], params["net"], params["batch"], params["sampler"], params["steps"], device)
    case.section = section
    return case


def _run_group(group: list[Job], mode: str, suite: Suite, device: torch.device) -> list[dict]:
    """The rows of one group of jobs: prepared, then timed (alone, or interleaved when there are several)."""
    prepared: list[Case | dict] = []
    for section, params in group:
        try:
            prepared.append(_prepare(section, params, mode, suite, device))
        except Exception as exc:  # noqa: BLE001 - one failing case must not lose the others
            prepared.append(_error_row(section, params, exc))
    cases = [c for c in prepared if isinstance(c, Case)]
    section = group[0][0]
    timing = {"step": suite.step_timing, "model": suite.model_timing}.get(section, suite.e2e_timing)
    try:
        if section == "e2e" or len(cases) == 1:
            rows = [run_case(c, device, **timing) for c in cases]
        else:
            rows = run_group(cases, device, **timing)
    except Exception as exc:  # noqa: BLE001
        rows = [_error_row(c.section, c.params, exc) for c in cases]
    done = iter(rows)
    return [next(done) if isinstance(c, Case) else c for c in prepared]


def _error_row(section: str, params: dict, exc: Exception) -> dict:
    text = str(exc).splitlines()[0][:200] if str(exc) else ""
    row = {"section": section, **params, "error": f"{type(exc).__name__}: {text}"}
    warnings.warn(f"bench case {section} {params} failed: {row['error']}", RuntimeWarning, stacklevel=2)
    return row


def _previous(out: Path, mode: str, machine: dict) -> dict:
    """The results.json an --update run replaces rows of: the same mode, the same CPU/GPU and thread count."""
    path = out / "results.json"
    if not path.is_file():
        raise ValueError(f"--update: {path} does not exist (run the full suite into --out first)")
    base = json.loads(path.read_text())
    same = [k for k in ("device_name", "cpu", "cpu_isa", "torch_threads", "malloc") if base["machine"].get(k) != machine.get(k)]
    if base["machine"].get("cpu_id") and base["machine"]["cpu_id"] != machine.get("cpu_id"):  # older files lack it
        same.append("cpu_id")
    if base.get("mode") != mode or same:
        raise ValueError(f"--update: {path} is a {base.get('mode')} run on another machine or setting "
                         f"({', '.join(same) or 'mode'} differ); write to a new --out instead")
    return base


def _key(row: dict) -> tuple:
    return (row["section"],) + tuple((k, row[k]) for k in ("impl", "net", "batch", "sampler", "steps", "numel", "dtype")
                                     if k in row)


def _merged(base: dict, new: dict, only: str | None) -> dict:
    """base with the rows of new in place of the ones with the same case (new ones appended), and a note."""
    fresh = {_key(r): r for r in new["rows"]}
    rows = [fresh.pop(_key(r), r) for r in base["rows"]] + list(fresh.values())
    when = new["machine"]["date"]
    same = f"the cases matching {only!r} ("  # an earlier re-run of the same cases: all its rows are replaced now
    notes = [n for n in base.get("notes", []) if not (n.startswith("Re-run at") and same in n)]
    notes += [f"Re-run at {when} (load average {new['machine'].get('load_average')}): {same}{len(new['rows'])} rows); "
              f"the rest are from {base['machine']['date']}."]
    return {**base, "rows": rows, "notes": notes}


def run_bench(mode: str = "quick", device: str | torch.device = "auto", out: Path | None = None,
              sections: tuple[str, ...] = SECTIONS, time_budget_s: float = 0.0, threads: int | None = None,
              progress: bool = True, plots: bool = True, only: str | None = None, update: bool = False) -> Path:
    """Run the benchmarks (docs/design.md §5); writes results.json, results.md and PNG plots into out
    (default: default_out(device)); returns out. threads sets torch's CPU threads for the run only; only: a
    regular expression a case's "section:name" must match (e.g. re-running the key rows when the load is low);
    update: replace those rows in out/results.json (a run of the same mode on the same machine) instead of writing
    a new file."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    threads_before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run(mode, device, Path(out) if out else default_out(device), sections, time_budget_s, progress, plots,
                    only, update)
    finally:
        if torch.get_num_threads() != threads_before:
            torch.set_num_threads(threads_before)


def _run(mode: str, device: torch.device, out: Path, sections: tuple[str, ...], time_budget_s: float, progress: bool,
         plots: bool, only: str | None = None, update: bool = False) -> Path:
    from tqdm import tqdm

    suite = make_suite(mode, device)
    result = {"mode": mode, "machine": describe_machine(device), "notes": _notes(mode, device, suite), "rows": []}
    result["machine"]["load_average_start"] = result["machine"].get("load_average")
    jobs = _jobs(suite, list(sections))
    base = _previous(out, mode, result["machine"]) if update else None
    if only:
        pattern = re.compile(only)
        jobs = [j for j in jobs if pattern.search(f"{j[0]}:" + "-".join(str(v) for v in j[1].values()))]
        result["only"] = only
    start = time.perf_counter()
    bar = tqdm(total=len(jobs), desc=f"bench {mode}", disable=not progress, dynamic_ncols=True)
    last_section = None
    for group in _groups(jobs):
        section, params = group[0]
        bar.set_postfix_str(f"{section} " + " ".join(str(v) for k, v in params.items() if k != "impl"))
        if last_section and section != last_section:
            write_results(out, result if base is None else _merged(base, result, only), plots=False)
        last_section = section
        if time_budget_s and time.perf_counter() - start > time_budget_s:
            rows = [{"section": s, **p, "skipped": f"time budget of {time_budget_s:.0f} s spent"} for s, p in group]
        else:
            rows = _run_group(group, mode, suite, device)
        result["rows"] += rows
        bar.update(len(group))
    bar.close()
    elapsed = time.perf_counter() - start
    if base is None:
        result["total_s"] = elapsed
        result["machine"]["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    else:  # total_s: the seconds of every run that wrote the file
        result = {**_merged(base, result, only), "total_s": (base.get("total_s") or 0.0) + elapsed}
    write_results(out, result, plots=plots)
    return out
