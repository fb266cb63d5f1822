"""A bounded load test of `fastdiff serve`: K concurrent clients on 127.0.0.1, a fixed number of requests each,
then it stops and checks every file the server wrote.

    .venv/bin/python benchmarks/load_serve.py                       # 8 clients x 40 requests, DDIM-10, digits
    .venv/bin/python benchmarks/load_serve.py --clients 4 --requests 10 --steps 5 --out /tmp/load

The server is the real command (`python -m fastdiff serve`, a subprocess on a free port: its own GIL). Each
client POSTs /api/generate (n cycling 1, 2, 4; distinct seeds), long-polls /api/jobs/{id}?wait=20 until done and
times it.
Reported: throughput, latency p50/p90/p99, mean batch size, errors (must be 0), lost or corrupt files (must be
0: every PNG decodes at the model's size, every sidecar's seeds, count and parameters match the request), and
batched-vs-solo: a few requests that shared a batch are re-run alone and their pixels compared. A one-client
pass of the same requests first gives the unbatched reference. Results: benchmarks/results/<cpu>-<date>/
serve_load.{json,md}, with fastdiff.machine.machine_info and os.getloadavg() before and after.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from fastdiff.machine import device_slug, machine_info  # noqa: E402



def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(out: Path, port: int, args: argparse.Namespace) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "fastdiff", "serve", "--port", str(port), "--out", str(out), "--device", "cpu",
           "--max-queue", str(max(64, 2 * args.clients)), "--batch-window-ms", str(args.window_ms)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    log = open(out.parent / "server.log", "w")  # a file, not a pipe: a full pipe would block the server
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)
    log.close()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {(out.parent / 'server.log').read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    stop_server(proc)
    raise RuntimeError("the server did not answer /healthz within 120 s")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def body(client: int, i: int, args: argparse.Namespace) -> dict:
    n = (1, 2, 4)[(client + i) % 3]
    return {"sampler": "ddim", "steps": args.steps, "eta": 0.0, "n": n, "seed": 1_000_000 * client + 1000 * i}


def one(http: httpx.Client, req: dict, deadline: float) -> dict:
    """POST, then poll until the job ends: the request's record (latency from POST to done)."""
    t0 = time.perf_counter()
    try:
        r = http.post("/api/generate", json=req)
        if r.status_code != 202:
            return {"request": req, "error": f"HTTP {r.status_code}: {r.text[:200]}"}
        job = r.json()["id"]
        while time.monotonic() < deadline:
            s = http.get(f"/api/jobs/{job}", params={"wait": 20}).json()  # a long poll: answers when done
            if s["status"] == "done":
                return {"request": req, "latency": time.perf_counter() - t0, "run": s["run"],
                        "batch_images": s["batch_images"], "batch_jobs": s["batch_jobs"], "params": s["params"]}
            if s["status"] in ("error", "cancelled"):
                return {"request": req, "error": f"job {s['status']}: {s['error']}"}
        return {"request": req, "error": "timed out"}
    except httpx.HTTPError as e:
        return {"request": req, "error": f"{type(e).__name__}: {e}"}


def engine_stats(base: str) -> dict:
    return httpx.get(f"{base}/healthz", timeout=10).json()["stats"]


def load(base: str, clients: int, requests: int, args: argparse.Namespace) -> tuple[list[dict], float, dict]:
    """Every request's record, the wall time, and the server's Engine batches and images during the pass."""
    records: list[list[dict]] = [[] for _ in range(clients)]
    stats0 = engine_stats(base)
    deadline = time.monotonic() + args.time_limit

    def client(k: int) -> None:
        with httpx.Client(base_url=base, timeout=30) as http:
            for i in range(requests):
                if time.monotonic() > deadline:
                    records[k].append({"request": body(k, i, args), "error": "time limit"})
                    continue
                records[k].append(one(http, body(k, i, args), deadline))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(args.time_limit + 60)
    seconds = time.perf_counter() - t0
    stats1 = engine_stats(base)
    batches, images = stats1["batches"] - stats0["batches"], stats1["images"] - stats0["images"]
    return [r for rs in records for r in rs], seconds, {"engine_batches": batches, "images": images,
                                                        "mean_images_per_batch": round(images / max(1, batches), 2),
                                                        "mean_requests_per_batch": round(
                                                            (stats1["jobs"] - stats0["jobs"]) / max(1, batches), 2)}


def check_files(out: Path, records: list[dict]) -> tuple[int, int, list[str]]:
    """(lost, corrupt, problems) over every finished request's files."""
    lost = corrupt = 0
    problems = []
    for r in records:
        if "run" not in r:
            continue
        req, run = r["request"], r["run"]
        sidecar, folder = out / f"{run}.json", out / run
        if not sidecar.is_file() or not folder.is_dir() or not (out / f"{run}_grid.png").is_file():
            lost += 1
            problems.append(f"{run}: missing files")
            continue
        try:
            info = json.loads(sidecar.read_text())
            ok = (info["seeds"] == list(range(req["seed"], req["seed"] + req["n"])) and info["count"] == req["n"]
                  and info["steps"] == req["steps"] and info["sampler"] == req["sampler"])
            pngs = sorted(folder.glob("*.png"))
            ok = ok and len(pngs) == req["n"]
            for p in pngs:
                with Image.open(p) as im:
                    im.load()
                    ok = ok and im.size == (16, 16)
        except Exception as e:  # noqa: BLE001 - any failure to read is corruption
            ok = False
            problems.append(f"{run}: {type(e).__name__}: {e}")
        if not ok:
            corrupt += 1
            problems.append(f"{run}: sidecar or PNGs do not match the request")
    return lost, corrupt, problems


def solo_check(base: str, out: Path, records: list[dict], count: int) -> float | None:
    """Re-run `count` requests that shared a batch, one at a time; the max |pixel difference| (uint8 levels)."""
    shared = [r for r in records if r.get("batch_jobs", 1) > 1][:count]
    if not shared:
        return None
    worst = 0
    with httpx.Client(base_url=base, timeout=30) as http:
        for r in shared:
            again = one(http, r["params"], time.monotonic() + 120)
            if "run" not in again:
                raise RuntimeError(f"solo re-run failed: {again.get('error')}")
            for i in range(r["request"]["n"]):
                a = np.asarray(Image.open(out / r["run"] / f"{i:04d}.png"), np.int16)
                b = np.asarray(Image.open(out / again["run"] / f"{i:04d}.png"), np.int16)
                worst = max(worst, int(np.abs(a - b).max()))
    return worst


def summary(records: list[dict], seconds: float, batching: dict) -> dict:
    done = [r for r in records if "run" in r]
    lat = sorted(r["latency"] for r in done)
    pct = (lambda q: round(float(np.percentile(lat, q)) * 1000, 1)) if lat else (lambda q: None)
    runs = {r["run"]: r for r in done}
    return {"requests": len(records), "completed": len(done), "errors": len(records) - len(done),
            "error_examples": [r["error"] for r in records if "error" in r][:5], "seconds": round(seconds, 2),
            "throughput_req_s": round(len(done) / seconds, 2), "throughput_img_s":
                round(sum(r["request"]["n"] for r in done) / seconds, 2),
            "latency_ms": {"p50": pct(50), "p90": pct(90), "p99": pct(99), "max": pct(100),
                           "mean": round(statistics.mean(lat) * 1000, 1) if lat else None},
            "mean_batch_images_per_request": round(statistics.mean(r["batch_images"] for r in done), 2) if done else None,
            "mean_batch_jobs_per_request": round(statistics.mean(r["batch_jobs"] for r in done), 2) if done else None,
            "runs": len(runs), **batching}


def markdown(result: dict) -> str:
    m, cfg = result["machine"], result["config"]
    lines = [f"# fastdiff serve — load test ({m['cpu']}, {m['cpu_cores']} cores)", "",
             f"{m['date']} · torch {m['torch']} · fastdiff {m['fastdiff']} · model digits (shipped), CPU · "
             f"DDIM-{cfg['steps']} η=0 · n cycling 1/2/4 · batch window {cfg['window_ms']} ms · server torch threads "
             f"{cfg['torch_threads'] or 'default'} · "
             f"load average before {tuple(round(x, 2) for x in result['loadavg_before'])}, after "
             f"{tuple(round(x, 2) for x in result['loadavg_after'])}", "",
             "| pass | clients × requests | completed | errors | req/s | img/s | p50 ms | p90 ms | p99 ms | "
             "Engine batches | mean batch (images) | mean batch (requests) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, key in (("one client (reference)", "baseline"), ("concurrent", "load")):
        s = result.get(key)
        if s is None:
            continue
        c = cfg["baseline"] if key == "baseline" else cfg
        lines.append(f"| {name} | {c['clients']} × {c['requests']} | {s['completed']} | {s['errors']} | "
                     f"{s['throughput_req_s']} | {s['throughput_img_s']} | {s['latency_ms']['p50']} | "
                     f"{s['latency_ms']['p90']} | {s['latency_ms']['p99']} | {s['engine_batches']} | "
                     f"{s['mean_images_per_batch']} | {s['mean_requests_per_batch']} |")
    f = result["files"]
    lines += ["", f"- Files: {f['checked_runs']} runs checked, **lost {f['lost']}, corrupt {f['corrupt']}** "
                  "(every PNG decoded at 16×16; sidecar seeds, count, sampler and steps equal the request).",
              f"- Batched vs solo: {f['solo_requests']} requests that shared a batch re-run alone: max pixel "
              f"difference {f['batched_vs_solo_max_pixel_diff']} uint8 levels (float results equal to ~1e-6).",
              "- Mean batch: images (requests) per Engine call, from the server's counters over the pass.",
              "- Latency: POST to the answer of a long poll (`GET /api/jobs/{id}?wait=20`, which returns within 10 ms of the "
              "job finishing), server in its own process (`python -m fastdiff serve`), "
              "clients as threads of the benchmark process, all on this machine.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=40, help="per client")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--window-ms", type=float, default=20.0)
    p.add_argument("--threads", type=int, default=1, help="the server's torch threads (default 1: a small shared "
                                                          "CPU runs one thread best; 0: torch's default)")
    p.add_argument("--baseline-requests", type=int, default=40, help="one client's requests first (0: none)")
    p.add_argument("--solo-check", type=int, default=6, help="batched requests re-run alone to compare pixels")
    p.add_argument("--time-limit", type=float, default=900.0, help="seconds; requests after it count as errors")
    p.add_argument("--out", type=Path, help="results folder (default: benchmarks/results/<cpu>-<date>)")
    args = p.parse_args(argv)
    out = args.out or ROOT / "benchmarks" / "results" / f"{device_slug(torch.device('cpu'))}-{_dt.date.today()}"
    before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        gallery, port = Path(tmp) / "gallery", free_port()
        proc = start_server(gallery, port, args)
        base = f"http://127.0.0.1:{port}"
        try:
            baseline = None
            if args.baseline_requests:
                baseline = summary(*load(base, 1, args.baseline_requests, args))
                print("baseline:", json.dumps(baseline), flush=True)
            records, seconds, batching = load(base, args.clients, args.requests, args)
            result_load = summary(records, seconds, batching)
            print("load:", json.dumps(result_load), flush=True)
            lost, corrupt, problems = check_files(gallery, records)
            worst = solo_check(base, gallery, records, args.solo_check)
        finally:
            stop_server(proc)
        log = (Path(tmp) / "server.log").read_text()
    result = {"machine": machine_info(torch.device("cpu")), "loadavg_before": before, "loadavg_after": os.getloadavg(),
              "config": {"clients": args.clients, "requests": args.requests, "steps": args.steps,
                         "window_ms": args.window_ms, "torch_threads": args.threads or None, "model": "digits (shipped)", "sampler": "ddim", "eta": 0.0,
                         "n": [1, 2, 4], "baseline": {"clients": 1, "requests": args.baseline_requests}},
              "baseline": baseline, "load": result_load,
              "files": {"checked_runs": sum("run" in r for r in records), "lost": lost, "corrupt": corrupt,
                        "problems": problems[:20], "solo_requests": min(args.solo_check, sum(
                            r.get("batch_jobs", 1) > 1 for r in records)), "batched_vs_solo_max_pixel_diff": worst},
              "server_log_tail": log[-2000:]}
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve_load.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "serve_load.md").write_text(markdown(result))
    print(f"wrote {out / 'serve_load.json'} and serve_load.md")
    ok = result_load["errors"] == 0 and lost == 0 and corrupt == 0 and (worst is None or worst <= 1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
