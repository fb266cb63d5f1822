"""`fastdiff serve` over HTTP: body errors (always JSON naming the field, never echoing the input), defaults
within the server's limits, conditional GETs and HEAD of run files, no server paths in what the API serves,
the Host guard, the token, the sweep of a killed server's partial folders, and Ctrl-C during a long poll."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi", reason="fastdiff serve needs fastapi (pip install 'fastdiff[serve]')")
pytest.importorskip("uvicorn", reason="fastdiff serve needs uvicorn")
import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from fastdiff import checkpoint  # noqa: E402
from fastdiff.cli import main  # noqa: E402
from fastdiff.nn.unet import UNet  # noqa: E402
from fastdiff.serve import Limits, create_app, load_models  # noqa: E402
from fastdiff.serve.gallery import Gallery  # noqa: E402
from fastdiff.serve.server import LOOPBACK_NAMES  # noqa: E402

from conftest import TINY  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve-http-models")
    out = {}
    for name, classes in (("uncond", 0), ("cond", 3)):
        torch.manual_seed(classes)
        cfg = type(TINY)(**{**TINY.to_dict(), "num_classes": classes})
        model = UNet(cfg)
        config = {"model": cfg.to_dict(), "schedule": {"num_train_timesteps": 100}}
        checkpoint.save(root / name, config, {f"ema.{k}": v for k, v in model.state_dict().items()}, {})
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def models(runs):
    return load_models([runs["uncond"], runs["cond"]])


def _wait(client, job_id: str) -> dict:
    for _ in range(100):
        s = client.get(f"/api/jobs/{job_id}", params={"wait": 5}).json()
        if s["status"] in ("done", "error", "cancelled"):
            return s
    raise AssertionError(f"job {job_id} did not finish")


def _post(client, content, ctype="application/json"):
    return client.post("/api/generate", content=content, headers={"Content-Type": ctype} if ctype else {})


# --- bodies -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("content,status,words", [
    ('{"n":1', 422, "body is not valid JSON: Expecting ',' delimiter at line 1 column 7"),
    ("not json", 422, "body is not valid JSON: Expecting value at line 1 column 1"),
    ("[" * 30_000, 422, "body is not valid JSON"),
    ("[1, 2]", 422, "body must be a JSON object"),
    ('"secret-input"', 422, "body must be a JSON object"),
    (b"\xff\xfe{}", 422, "body is not valid JSON"),
    ('{"seed": ' + "9" * 5000 + "}", 422, "body is not valid JSON"),
    (" " * 70_000, 413, "64 KiB"),
    ('{"ckpt": "' + "x" * 70_000 + '"}', 413, "64 KiB"),
])
def test_body_errors_are_json_naming_the_body(models, tmp_path, content, status, words):
    with TestClient(create_app(models, tmp_path)) as c:
        r = _post(c, content)
    assert r.status_code == status and r.headers["content-type"] == "application/json", r.text[:200]
    assert r.json()["field"] == "body" and words in r.json()["detail"], r.json()
    assert len(r.text) < 400  # the input is never echoed back


def test_rejected_values_are_not_echoed(models, tmp_path):
    with TestClient(create_app(models, tmp_path)) as c:
        r = c.post("/api/generate", json={"sampler": "s3cr3t" * 100, "steps": 2})
        assert r.status_code == 422 and r.json()["field"] == "sampler" and "s3cr3t" not in r.text
        r = c.post("/api/generate", json={"ckpt": "s3cr3t"})
        assert r.status_code == 422 and r.json()["field"] == "ckpt" and "s3cr3t" not in r.text
        assert set(r.json()) == {"detail", "field"}
        r = c.get("/api/jobs/x", params={"wait": "s3cr3t"})
        assert r.status_code == 422 and r.json()["field"] == "wait" and "s3cr3t" not in r.text


@pytest.mark.parametrize("ctype", [None, "text/json", "application/jsonx", "text/plain",
                                   "application/x-www-form-urlencoded"])
def test_a_non_json_content_type_gets_the_hint(models, tmp_path, ctype):
    with TestClient(create_app(models, tmp_path)) as c:
        r = _post(c, '{"steps": 2, "n": 1}', ctype)
        assert r.status_code == 422 and "Content-Type: application/json" in r.json()["detail"], r.text
        assert _post(c, '{"steps": 2, "n": 1}', "application/json; charset=utf-8").status_code == 202


def test_an_empty_body_is_an_empty_request(models, tmp_path):
    with TestClient(create_app(models, tmp_path)) as c:
        r = _post(c, "")
        assert r.status_code == 202, r.text
        assert r.json()["params"]["steps"] == 50 and r.json()["params"]["n"] == 4


def test_defaults_stay_within_the_servers_limits(models, tmp_path):
    with TestClient(create_app(models, tmp_path, Limits(max_n=2, max_steps=20))) as c:
        params = c.post("/api/generate", json={}).json()["params"]
        assert params["steps"] == 20 and params["n"] == 2
        assert c.post("/api/generate", json={"sampler": "ddpm"}).json()["params"]["steps"] == 20
        info = c.get("/api/models").json()
        assert info["models"][0]["default_steps"] == {"ddpm": 20, "ddim": 20, "dpmpp-2m": 20, "dpmpp-2m-sde": 20}
        assert set(info["samplers"]) == {"ddpm", "ddim", "dpmpp-2m", "dpmpp-2m-sde"}
        assert info["choices"]["spacing"] and info["limits"]["max_guidance"] >= 30


@pytest.mark.parametrize("body,field", [
    ({"model": ""}, "model"), ({"eta": 1e160, "n": 1, "steps": 2}, "eta"),
    ({"model": "cond", "class_id": 0, "guidance": 1e39, "n": 1, "steps": 2}, "guidance"),
])
def test_more_invalid_parameters_are_422(models, tmp_path, body, field):
    with TestClient(create_app(models, tmp_path)) as c:
        r = c.post("/api/generate", json=body)
        assert r.status_code == 422 and r.json()["field"] == field, r.text


# --- run files ----------------------------------------------------------------------------------------------
def test_run_files_revalidate_and_answer_head(models, runs, tmp_path):
    with TestClient(create_app(models, tmp_path)) as c:
        s = _wait(c, c.post("/api/generate", json={"steps": 2, "n": 1, "seed": 3}).json()["id"])
        for url in (s["images"][0], s["grid"], s["sidecar"]):
            r = c.get(url)
            assert r.status_code == 200 and r.headers["etag"] and r.headers["last-modified"], url
            assert c.get(url, headers={"If-None-Match": r.headers["etag"]}).status_code == 304, url
            assert c.get(url, headers={"If-Modified-Since": r.headers["last-modified"]}).status_code == 304, url
            assert c.get(url, headers={"If-None-Match": '"other"'}).status_code == 200, url
            head = c.head(url)
            assert head.status_code == 200 and head.content == b"" and head.headers["etag"] == r.headers["etag"]
        assert c.head("/").status_code == 200
        assert c.head("/api/runs/nope/0000.png").status_code == 404


def test_the_api_serves_no_server_path(models, runs, tmp_path):
    out = tmp_path / "gallery"
    with TestClient(create_app(models, out)) as c:
        s = _wait(c, c.post("/api/generate", json={"steps": 2, "n": 1, "seed": 3}).json()["id"])
        served = [c.get(s["sidecar"]).text, c.get("/api/history").text]
        info = c.get(s["sidecar"]).json()
    for text in served:
        assert str(tmp_path) not in text and str(runs["uncond"]) not in text and str(ROOT) not in text
    assert info["model_source"] == "uncond" and " --ckpt uncond " in info["reproduce"]["cli"]
    on_disk = json.loads((out / f"{s['run']}.json").read_text())  # the file keeps them
    assert on_disk["model_source"] == str(runs["uncond"]) and on_disk["images"] == str(out.resolve() / s["run"])


# --- access -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("host,ok", [
    ("127.0.0.1:7860", True), ("localhost", True), ("[::1]:7860", True), ("LOCALHOST:1", True),
    ("127.0.0.1:18761@evil.com", False), ("evil.com#127.0.0.1", False), ("127.0.0.1.evil.com", False),
    ("localhost:80:80", False), ("", False), ("127.0.0.1 evil", False),
])
def test_host_guard_parses_the_host(models, tmp_path, host, ok):
    with TestClient(create_app(models, tmp_path, allowed_hosts=LOOPBACK_NAMES)) as c:
        r = c.get("/healthz", headers={"host": host})
    assert (r.status_code == 200) == ok and (ok or r.json()["field"] == "Host"), host


def test_an_empty_token_is_refused_at_start(models, tmp_path, capsys, monkeypatch):
    for token in ("", " ", "a b"):
        with pytest.raises(ValueError, match="token"):
            create_app(models, tmp_path / "x", token=token)
    monkeypatch.setenv("FASTDIFF_TOKEN", "")  # `FASTDIFF_TOKEN= fastdiff serve`
    assert main(["serve", "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert "FASTDIFF_TOKEN" in err and "empty" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "y").exists()


# --- a killed server's leftovers, and Ctrl-C --------------------------------------------------------------
def test_partial_folders_of_a_killed_server_are_swept_at_start(models, tmp_path):
    out = tmp_path / "gallery"
    out.mkdir()
    dead = out / ".20260101-120000-0b6e22.k3x_9abc.partial"  # SampleSet's hidden folder of a served run
    dead.mkdir()
    (dead / "0000.png").write_bytes(b"png")
    keep = {".notes.partial": "dir", ".20260101-120000-0b6e22.k3x_9abd.partial": "foreign",
            ".20260101-120000-0b6e23.k3x_9abc.partial": "file", "20260101-120000-0b6e24": "dir"}
    for name, kind in keep.items():
        if kind == "file":
            (out / name).write_text("x")
        else:
            (out / name).mkdir()
            (out / name / ("0000.png" if kind == "dir" else "notes.txt")).write_text("x")
    (out / ".20260101-120000-0b6e25.abcdefgh.partial").symlink_to(out / ".notes.partial")
    first = Gallery(out)  # another server already uses the folder: nothing is swept
    (out / ".20260101-120000-0b6e26.abcdefgh.partial").mkdir()
    assert Gallery(out).swept == 0 and (out / ".20260101-120000-0b6e26.abcdefgh.partial").exists()
    first.close()
    assert first.swept == 1 and not dead.exists()
    with TestClient(create_app(models, out)):
        pass
    assert not (out / ".20260101-120000-0b6e26.abcdefgh.partial").exists()
    assert sorted(os.listdir(out)) == sorted([*keep, ".20260101-120000-0b6e25.abcdefgh.partial"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ctrl_c_during_a_long_poll_answers_cancelled(tmp_path):
    port, out = _free_port(), tmp_path / "gallery"
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "fastdiff", "serve", "--port", str(port), "--out", str(out),
                             "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):
            assert proc.poll() is None, proc.communicate()
            try:
                if httpx.get(base + "/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        job = httpx.post(base + "/api/generate", json={"steps": 1000, "n": 16, "seed": 1}).json()  # ~a minute
        while (s := httpx.get(f"{base}/api/jobs/{job['id']}").json())["steps_done"] < 1:
            assert s["status"] in ("queued", "running")
            time.sleep(0.05)
        answer: dict = {}
        poll = threading.Thread(target=lambda: answer.update(
            r=httpx.get(f"{base}/api/jobs/{job['id']}", params={"wait": 60}, timeout=120)))
        poll.start()
        time.sleep(1.0)  # let the long poll reach the server
        proc.send_signal(signal.SIGINT)
        poll.join(120)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    r = answer["r"]
    assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
    assert proc.returncode == 0
    for bad in ("Traceback", "CancelledError", "graceful shutdown exceeded"):
        assert bad not in stderr, stderr
    assert os.listdir(out) == []  # the cancelled run left nothing


def test_explicit_default_options_batch_with_omitted_ones(models, tmp_path):
    """The page sends every option; a client may send none: the same run, so they share a batch."""
    with TestClient(create_app(models, tmp_path, Limits(window_ms=800))) as c:
        a = c.post("/api/generate", json={"steps": 3, "n": 1, "seed": 1}).json()
        b = c.post("/api/generate", json={"steps": 3, "n": 1, "seed": 2, "eta": 0.0, "spacing": "leading",
                                          "clip_sample": True, "use_clipped_model_output": True}).json()
        assert a["params"] == {**b["params"], "seed": 1}  # every option as run, defaults included
        assert [_wait(c, j["id"])["batch_jobs"] for j in (a, b)] == [2, 2]
