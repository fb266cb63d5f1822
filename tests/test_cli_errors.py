"""The CLI's error path: SIGTERM, one-line argparse errors, and arguments refused before any long work."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from fastdiff.cli import main

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def one_error_line(capsys, command: str) -> str:
    """The single stderr line of a refused command (asserts there is exactly one, and no traceback)."""
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"fastdiff {command}: error: "), lines
    return lines[0]


def test_sigterm_during_sample_cleans_up_and_exits_143(tmp_path):
    out = tmp_path / "s"
    cmd = [sys.executable, "-m", "fastdiff", "sample", "--n", "100000", "--steps", "50", "--batch-size", "4",
           "--out", str(out), "--quiet"]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        end = time.time() + 120
        while not any(out.glob(".*.partial/*.png")):  # sampling is under way: the first batch is written
            assert time.time() < end and proc.poll() is None, "sampling did not start"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    lines = [x for x in err.splitlines() if x.strip()]
    assert lines == ["fastdiff sample: terminated (SIGTERM)"], err
    assert list(out.iterdir()) == []


def test_sigterm_handler_is_restored(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    assert main(["sample", "--steps", "0"]) == 2
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.parametrize("args,match", [
    (["sample", "--steps", "abc"], "argument --steps: invalid int value: 'abc'"),
    (["sample", "--sampler", "euler"], "argument --sampler: invalid choice"),
    (["sample", "--n", "1e3"], "invalid int value: '1e3'"),
    (["sample", "--ckpt", "a", "--onnx", "b"], "argument --onnx: not allowed with argument --ckpt"),
    (["export"], "the following arguments are required: --out"),
])
def test_argparse_errors_are_one_line(capsys, args, match):
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    line = one_error_line(capsys, args[0])
    assert match in line and line.endswith(f"(see fastdiff {args[0]} --help)")


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory) -> dict:
    """The shipped model exported (fp32) and dynamically quantized (int8)."""
    d = tmp_path_factory.mktemp("onnx")
    fp32, int8 = d / "model.onnx", d / "model.int8.onnx"
    assert main(["export", "--out", str(fp32)]) == 0
    assert main(["quantize", "--onnx", str(fp32), "--out", str(int8), "--dynamic", "--repeats", "1",
                 "--paired-n", "0", "--quiet"]) == 0
    return {"fp32": fp32, "int8": int8}


def refused(capsys, args: list[str], *matches: str) -> str:
    """Run a command that must be refused: status 2, one error line holding every match."""
    assert main(args) == 2
    line = one_error_line(capsys, args[0])
    assert all(m in line for m in matches), line
    return line


@pytest.mark.parametrize("opset", ["16", "24", "99"])
def test_export_opset_out_of_range_is_refused_up_front(capsys, tmp_path, opset):
    from fastdiff.onnx_export import max_opset

    refused(capsys, ["export", "--out", str(tmp_path / "m.onnx"), "--opset", opset], "--opset",
            f"[17, {max_opset()}]", f"got {opset}")
    assert not any(tmp_path.iterdir())


def test_max_opset_exports(tmp_path):
    from fastdiff.onnx_export import max_opset

    assert max_opset() >= 17
    assert main(["export", "--out", str(tmp_path / "m.onnx"), "--opset", str(max_opset())]) == 0


@pytest.mark.parametrize("args,matches", [
    (["eval", "--quick", "--nll", "--nll-timesteps", "0"], ["--nll-timesteps", ">= 1", "got 0"]),
    (["eval", "--steps", "10", "--etas", "0,2", "--ddpm-steps", "", "--n", "8"], ["--etas 2", "eta=2.0", "[0, 1]"]),
    (["eval", "--quick", "--seed", "-1"], ["--seed", "got -1"]),
    (["eval", "--quick", "--ddpm-steps", "5000"], ["steps must be in [1, 1000]"]),
])
def test_eval_refuses_bad_rows_before_sampling(capsys, tmp_path, monkeypatch, args, matches):
    from fastdiff import engine

    monkeypatch.setattr(engine, "generate", lambda *a, **k: pytest.fail("sampled before refusing"))
    out = tmp_path / "eval"
    refused(capsys, [*args, "--out", str(out), "--quiet"], *matches)
    assert not out.exists()


def test_eval_out_that_is_a_file_is_refused(capsys, tmp_path):
    (tmp_path / "text.txt").write_text("x")
    refused(capsys, ["eval", "--quick", "--out", str(tmp_path / "text.txt")], "--out", "not a folder")


def test_eval_refuses_swapped_onnx_precisions(capsys, tmp_path, onnx_files):
    refused(capsys, ["eval", "--quick", "--out", str(tmp_path / "e"), "--onnx", str(onnx_files["int8"]),
                     "--onnx-int8", str(onnx_files["fp32"])], "--onnx ", "an int8 model", "expected an fp32")
    refused(capsys, ["eval", "--quick", "--out", str(tmp_path / "e"), "--onnx-int8", str(onnx_files["fp32"])],
            "--onnx-int8", "an fp32 model", "expected an int8")
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("args,matches", [
    (["--calib-size", "1000000000"], ["--calib-size", "[1, 65536]"]),
    (["--calib-size", "0"], ["--calib-size"]),
    (["--seed", "-1"], ["--seed", "got -1"]),
    (["--paired-n", "-1"], ["--paired-n"]),
    (["--dynamic", "--method", "entropy"], ["--method entropy", "--dynamic"]),
])
def test_quantize_refuses_bad_arguments(capsys, tmp_path, onnx_files, args, matches):
    out = tmp_path / "q.onnx"
    refused(capsys, ["quantize", "--onnx", str(onnx_files["fp32"]), "--out", str(out), *args], *matches)
    assert not any(tmp_path.iterdir())


def test_quantize_unwritable_out_is_refused_before_calibration(capsys, tmp_path, monkeypatch, onnx_files):
    from fastdiff.export import quantize

    monkeypatch.setattr(quantize, "quantize", lambda *a, **k: pytest.fail("calibrated before refusing"))
    (tmp_path / "blocker").write_text("a file, not a folder")
    refused(capsys, ["quantize", "--onnx", str(onnx_files["fp32"]), "--out", str(tmp_path / "blocker" / "q.onnx")],
            "--out", "blocker")


@pytest.mark.parametrize("quiet", [False, True])
def test_quantize_shows_calibration_progress(capsys, tmp_path, onnx_files, quiet):
    args = ["quantize", "--onnx", str(onnx_files["fp32"]), "--out", str(tmp_path / "q.onnx"), "--calib-size", "64",
            "--repeats", "1", "--paired-n", "0"]
    assert main(args + (["--quiet"] if quiet else [])) == 0
    err = capsys.readouterr().err
    assert ("calibration" in err and "2/2" in err) != quiet, err


@pytest.mark.parametrize("args,matches", [
    (["train", "--steps", "20", "--batch-size", "1000000000"], ["--batch-size", "[1, 65536]"]),
    (["train", "--steps", "0"], ["--steps 0", "expected an integer >= 1"]),
    (["serve", "--threads", "0"], ["--threads", ">= 1"]),
    (["sample", "--onnx", "/dev/zero"], ["--onnx /dev/zero", "not a regular file"]),
])
def test_errors_name_the_flag_and_the_expectation(capsys, tmp_path, args, matches):
    refused(capsys, [*args, "--out", str(tmp_path / "out")], *matches)
    assert not (tmp_path / "out").exists()


def test_serve_refuses_a_port_in_use_before_anything_else(capsys, tmp_path):
    pytest.importorskip("uvicorn")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        refused(capsys, ["serve", "--port", str(port), "--out", str(tmp_path / "g3")],
                f"--port {port}: address already in use")
    assert capsys.readouterr().out == "" and not (tmp_path / "g3").exists()


def test_sample_onnx_on_cuda_without_a_cuda_provider_is_refused(capsys, tmp_path, onnx_files):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has a CUDA provider")
    refused(capsys, ["sample", "--onnx", str(onnx_files["fp32"]), "--device", "cuda", "--out", str(tmp_path / "s")],
            "--device cuda", "no CUDA provider")
    assert not (tmp_path / "s").exists()


def test_warnings_are_one_line(capsys, monkeypatch):
    import warnings

    from fastdiff.cli import info

    monkeypatch.setattr(info, "run", lambda a: warnings.warn("the ORT runtime is not used here", RuntimeWarning))
    assert main(["info"]) == 0
    assert capsys.readouterr().err == "fastdiff info: warning: the ORT runtime is not used here\n"



def test_serve_names_an_out_it_cannot_make(capsys, tmp_path):
    (tmp_path / "file").write_text("x")
    with socket.socket() as s:  # a port free a moment ago
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    refused(capsys, ["serve", "--port", str(port), "--out", str(tmp_path / "file" / "gallery")], "--out",
            "not writable")
