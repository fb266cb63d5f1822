"""Scale-out (fastdiff.distributed, docs/scaling.md): 2-process gloo jobs on the CPU, launched with
`python -m torch.distributed.run` (or by hand, with torchrun's environment) as bounded subprocesses on 127.0.0.1.

Each launch costs a few seconds of two torch imports; the tests share launches where they can."""
from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastdiff import checkpoint, distributed
from fastdiff.cli import main, parser
from fastdiff.engine import generate
from fastdiff.nn.unet import UNet, UNetConfig

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_TIMEOUT = 240  # seconds per subprocess; a hang fails the test instead of the CI job
TRAIN = ["train", "--steps", "4", "--batch-size", "7", "--image-size", "8", "--lr", "2e-3", "--warmup", "2",
         "--class-cond", "--hflip", "--ckpt-every", "1", "--device", "cpu", "--quiet"]


@pytest.fixture(autouse=True)
def _deadline():
    """Every test here ends within 10 minutes, even if a subprocess timeout were missed."""
    def expire(*_):
        raise TimeoutError("test_distributed: test took longer than 600 s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(600)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "FASTDIFF_DIST_TIMEOUT": "60", **extra})
    return env


def torchrun(cwd: Path, *args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
           "127.0.0.1", "--master-port", str(free_port()), "-m", "fastdiff", *args]
    proc = subprocess.run(cmd, cwd=cwd, env=child_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("model")
    assert main(["train", "--steps", "2", "--batch-size", "8", "--image-size", "8", "--out", str(out), "--quiet",
                 "--device", "cpu"]) == 0
    return out


# --- pure helpers -----------------------------------------------------------------------------------
@pytest.mark.parametrize("n,parts", [(7, 2), (8, 2), (1, 3), (10, 4), (0, 2)])
def test_split_covers_in_order(n, parts):
    shares = [distributed.split(n, parts, r) for r in range(parts)]
    assert [i for lo, hi in shares for i in range(lo, hi)] == list(range(n))
    assert max(hi - lo for lo, hi in shares) - min(hi - lo for lo, hi in shares) <= 1


@pytest.mark.parametrize("n,bs,world", [(10, 3, 2), (5, 2, 2), (64, 256, 2), (1000, 256, 3), (9, 3, 3)])
def test_batch_share_is_whole_batches_of_one_process(n, bs, world):
    one = [(s, min(bs, n - s)) for s in range(0, n, bs)]  # SampleRequest.batches
    shares = [distributed.batch_share(n, bs, r, world) for r in range(world)]
    mine = [(lo + s, min(bs, hi - lo - s)) for lo, hi in shares for s in range(0, hi - lo, bs)]
    assert mine == one
    assert distributed.idle_ranks(n, bs, world) == sum(hi == lo for lo, hi in shares)


def test_rank_seeds_differ_and_rank0_keeps_the_seed():
    seeds = [distributed.rank_seed(5, r) for r in range(4)]
    assert seeds[0] == 5 and len(set(seeds)) == 4 and all(0 <= s < 2**63 for s in seeds)


@pytest.mark.parametrize("var,value", [("FASTDIFF_DIST_TIMEOUT", "soon"), ("FASTDIFF_DIST_TIMEOUT", "0"),
                                       ("FASTDIFF_DIST_TIMEOUT", "-3"), ("WORLD_SIZE", "two"), ("RANK", "2")])
def test_bad_environment_names_the_variable(monkeypatch, var, value):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv(var, value)
    with pytest.raises(ValueError, match=var if var != "RANK" else "RANK must be in"):
        distributed.timeout_s() if var == "FASTDIFF_DIST_TIMEOUT" else distributed.env_world()


def test_world_size_one_is_a_no_op(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert distributed.init("cpu") == torch.device("cpu") and distributed.world_size() == 1
    assert distributed.rank() == 0 and distributed.is_main() and distributed.timeout_s() == 600
    assert distributed.gather_shards(lambda lo, hi: torch.arange(lo, hi), 5, 2).tolist() == list(range(5))
    assert distributed.explain(RuntimeError("x"), "x") == "x"
    distributed.check_same("nothing", [torch.ones(2)])


def test_check_same_names_the_diverged_rank(monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    monkeypatch.setattr(distributed, "all_gather_objects", lambda obj, wait=False: [obj, obj, "other"])
    with pytest.raises(RuntimeError, match=r"ranks \[2\]"):
        distributed.check_same("the weights", [torch.ones(3)])


def test_every_option_passes_through_torchrun_except_the_abbreviation():
    """torchrun's parser rejects script options that abbreviate its own (`--n`: --nnodes, --nproc-per-node...);
    every other spelling of ours passes through, -n/--count included."""
    import torch.distributed.run as run

    sub = next(a for a in parser()._actions if isinstance(a.choices, dict))
    rejected = []
    for command, p in sub.choices.items():
        for opt in (o for action in p._actions for o in action.option_strings):
            try:
                with contextlib.redirect_stderr(io.StringIO()):
                    args = run.parse_args(["--nproc-per-node", "2", "-m", "fastdiff", command, opt, "1"])
                assert args.training_script_args == [command, opt, "1"]
            except SystemExit:
                rejected.append(opt)
    assert set(rejected) <= {"--n"}, rejected
    assert {"-n", "--count"} <= set(sub.choices["sample"]._option_string_actions)
    assert {"-n", "--count"} <= set(sub.choices["eval"]._option_string_actions)


def test_joined_sample_set_never_publishes_or_deletes(tmp_path):
    from fastdiff.images import SampleSet

    owner = SampleSet(tmp_path, "s")
    joined = SampleSet(tmp_path, "s", folder=owner.folder_in_progress)
    joined.add(torch.zeros(2, 1, 4, 4), start=1)
    owner.add(torch.zeros(1, 1, 4, 4), start=0)
    joined.abort()
    with pytest.raises(ValueError, match="owner"):
        joined.close({})
    with pytest.raises(RuntimeError, match="1 of 4 sample files"):
        owner.close({}, count=4)
    assert owner.close({}, count=3).exists() and json.loads((tmp_path / "s.json").read_text())["count"] == 3
    with pytest.raises(ValueError, match="not visible"):
        SampleSet(tmp_path, "s", folder=tmp_path / "missing")


# --- training under torchrun ----------------------------------------------------------------------
def _state(path: Path) -> tuple[dict, dict]:
    _, tensors, meta = checkpoint.load(path)
    return tensors, meta


def test_ddp_training_equals_one_process_and_resumes_exactly(tmp_path):
    """Global batch 7 over 2 ranks (4 + 3: the weighted path), class labels and flips sliced per rank. Every
    checkpoint (here: after every step) checks that the weights and EMA are bit-identical on both ranks."""
    torchrun(tmp_path, *TRAIN, "--out", "ddp")
    assert main([*TRAIN, "--out", str(tmp_path / "one")]) == 0
    ddp, ddp_meta = _state(tmp_path / "ddp")
    one, one_meta = _state(tmp_path / "one")
    assert ddp_meta["world_size"] == 2 and "rng.torch.1" in ddp
    np.testing.assert_allclose(ddp_meta["losses"], one_meta["losses"], rtol=1e-5)
    # the weights moved the same way: Adam's normalised steps turn rounding noise in near-zero gradients
    # into lr-sized differences of a few elements, so compare the whole update, not each element
    torch.manual_seed(0)  # --seed 0: the initial weights
    init = UNet(UNetConfig.from_dict(json.loads((tmp_path / "one" / checkpoint.CONFIG).read_text())["model"]))
    for prefix in ("model.", "ema."):
        keys = [k for k in one if k.startswith(prefix)]
        moved = {name: torch.cat([(w[k] - init.state_dict()[k[len(prefix):]]).flatten() for k in keys])
                 for name, w in (("ddp", ddp), ("one", one))}
        assert (moved["ddp"] - moved["one"]).norm() < 0.02 * moved["one"].norm(), prefix
    assert json.loads((tmp_path / "ddp" / "train_summary.json").read_text())["steps"] == 4

    # stopped after 2 steps, resumed to 4: bit for bit the uninterrupted run
    torchrun(tmp_path, *TRAIN, "--out", "resumed", "--steps", "2")
    torchrun(tmp_path, *TRAIN, "--out", "resumed", "--resume")
    resumed, resumed_meta = _state(tmp_path / "resumed")
    assert resumed_meta["losses"] == ddp_meta["losses"] and resumed.keys() == ddp.keys()
    assert [k for k in ddp if not torch.equal(ddp[k], resumed[k])] == []


def test_resume_with_another_world_size_is_a_clear_error(tmp_path, capsys):

    ckpt = tmp_path / "run"
    assert main([*TRAIN, "--steps", "1", "--out", str(ckpt)]) == 0
    _, tensors, meta = checkpoint.load(ckpt)
    config = json.loads((ckpt / checkpoint.CONFIG).read_text())
    checkpoint.save(ckpt, config, tensors, {**meta, "world_size": 2})  # as a 2-process run writes it
    assert main([*TRAIN, "--steps", "2", "--out", str(ckpt), "--resume"]) == 2
    assert "written by 2 process(es), this run has 1" in capsys.readouterr().err


# --- sampling and evaluation under torchrun -------------------------------------------------------
def _pngs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


def test_sharded_sampling_writes_the_files_one_process_writes(run_dir, tmp_path):
    args = ["sample", "--ckpt", str(run_dir), "--steps", "3", "--batch-size", "2", "--seed", "11", "--quiet",
            "--device", "cpu", "--name", "s"]
    assert main([*args, "--n", "5", "--out", str(tmp_path / "one")]) == 0
    torchrun(tmp_path, *args, "--count", "5", "--out", "two")
    one, two = tmp_path / "one", tmp_path / "two"
    assert list(_pngs(two / "s")) == [f"{i:04d}.png" for i in range(5)]
    assert _pngs(two / "s") == _pngs(one / "s")  # same batches on every rank: bit-identical
    assert (two / "s_grid.png").read_bytes() == (one / "s_grid.png").read_bytes()
    side_one, side_two = (json.loads((d / "s.json").read_text()) for d in (one, two))
    assert side_two.pop("processes") == 2
    for side in (side_one, side_two):
        for key in ("seconds", "images", "grid"):
            side.pop(key)
    assert side_one == side_two
    assert not list(two.glob(".*partial"))


def test_other_batch_size_same_noise_pixels_within_tolerance(run_dir):
    """A rank's images use seed + global index whatever its share: another batching changes pixels by rounding only."""
    model, schedule, _ = checkpoint.load_model(run_dir)
    shape, kw = (1, 8, 8), dict(seed=3, steps=3, device="cpu")
    one = generate(model, schedule, shape, 7, batch_size=2, **kw)
    parts = []
    for r in range(2):
        lo, hi = distributed.batch_share(7, 3, r, 2)
        parts.append(generate(model, schedule, shape, hi - lo, batch_size=3, **{**kw, "seed": 3 + lo}))
    torch.testing.assert_close(torch.cat(parts), one, rtol=0, atol=1e-4)


def test_sharded_eval_equals_one_process(run_dir, tmp_path):
    args = ["eval", "--ckpt", str(run_dir), "--steps", "2", "--etas", "0", "--ddpm-steps", "", "--batch-size", "3",
            "--quiet", "--device", "cpu"]
    assert main([*args, "--n", "8", "--out", str(tmp_path / "one")]) == 0
    torchrun(tmp_path, *args, "-n", "8", "--out", "two")
    one, two = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert two["processes"] == 2 and len(two["rows"]) == len(one["rows"]) == 1
    for a, b in zip(one["rows"], two["rows"]):
        assert {k: v for k, v in a.items() if k not in ("seconds", "grid")} == \
               {k: v for k, v in b.items() if k not in ("seconds", "grid")}
    assert Image.open(tmp_path / "two" / "grids" / "ddim-2-eta0.png").size == \
           Image.open(tmp_path / "one" / "grids" / "ddim-2-eta0.png").size


# --- a rank that dies or hangs --------------------------------------------------------------------
@pytest.mark.parametrize("victim,sig", [(0, signal.SIGKILL), (1, signal.SIGSTOP), (1, signal.SIGTERM)])
def test_lost_or_stopped_rank(tmp_path, victim, sig):
    """Killed (rank 0, the checkpoint writer) or hung (rank 1, SIGSTOP: the collective times out after
    FASTDIFF_DIST_TIMEOUT): the survivor exits 2 with `fastdiff train: error: rank N: ...`. Asked to stop
    (SIGTERM to rank 1 only): every rank stops after the same step, with a checkpoint, and exits 130. The
    checkpoint on disk always loads. Launched by hand with torchrun's environment (torchrun's agent would
    stop the survivor itself, as on a single node; here the survivor must notice, as on another node)."""
    out, port = tmp_path / "run", free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "fastdiff", *TRAIN, "--steps", "100000", "--out", str(out)], cwd=tmp_path,
        env=child_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), FASTDIFF_DIST_TIMEOUT="5"),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        deadline = time.time() + LAUNCH_TIMEOUT
        while not (out / checkpoint.WEIGHTS).exists():
            assert time.time() < deadline and all(p.poll() is None for p in procs), "no checkpoint was written"
            time.sleep(0.2)
        time.sleep(1.0)  # mid-run: checkpoints are being written every step
        procs[victim].send_signal(sig)
        watched = procs if sig == signal.SIGTERM else [procs[1 - victim]]
        errors = [p.communicate(timeout=60)[1] for p in watched]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()
    _, _, meta = checkpoint.load(out)
    assert meta["step"] >= 1 and meta["world_size"] == 2
    if sig == signal.SIGTERM:
        assert [p.returncode for p in procs] == [130, 130], errors
        assert all(f"checkpoint saved at step {meta['step']} of 100000" in err for err in errors), errors
        return
    lines = errors[0].strip().splitlines()
    assert watched[0].returncode == 2 and len(lines) == 1, errors[0]
    assert lines[0].startswith(f"fastdiff train: error: rank {1 - victim}: lost contact with the other processes")
