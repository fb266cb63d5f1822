"""`fastdiff serve`: the JSON API, dynamic batching, limits, path traversal, the token, shutdown, and the studio
page in a real browser (headless Chromium driven by Playwright; skipped with a reason when either is missing)."""
from __future__ import annotations

import io
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi", reason="fastdiff serve needs fastapi (pip install 'fastdiff[serve]')")
pytest.importorskip("uvicorn", reason="fastdiff serve needs uvicorn")
from fastapi.testclient import TestClient  # noqa: E402

from fastdiff import checkpoint, ops  # noqa: E402
from fastdiff.cli import main  # noqa: E402
from fastdiff.nn.unet import UNet  # noqa: E402
from fastdiff.request import SampleRequest  # noqa: E402
from fastdiff.serve import Limits, create_app, load_models  # noqa: E402
from fastdiff.serve.gallery import Gallery  # noqa: E402
from fastdiff.serve.models import sha256  # noqa: E402
from fastdiff.serve.server import LOOPBACK_NAMES, background, check_bind  # noqa: E402

from conftest import TINY  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
T = 100


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _save_tiny(folder: Path, num_classes: int) -> Path:
    torch.manual_seed(num_classes)
    cfg = type(TINY)(**{**TINY.to_dict(), "num_classes": num_classes})
    model = UNet(cfg)
    config = {"model": cfg.to_dict(), "schedule": {"num_train_timesteps": T}}
    checkpoint.save(folder, config, {f"ema.{k}": v for k, v in model.state_dict().items()}, {})
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve-models")
    return {"uncond": _save_tiny(root / "uncond", 0), "cond": _save_tiny(root / "cond", 3)}


@pytest.fixture(scope="module")
def models(runs):
    return load_models([runs["uncond"], runs["cond"]])


def _client(models, out: Path, **limits) -> TestClient:
    return TestClient(create_app(models, out, Limits(**limits)))


def _wait(client, job_id: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = client.get(f"/api/jobs/{job_id}", params={"wait": 5}).json()  # a long poll
        if s["status"] in ("done", "error", "cancelled"):
            return s
    raise AssertionError(f"job {job_id} did not finish in {timeout} s")


def _pixels(client, url: str) -> np.ndarray:
    r = client.get(url)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    return np.asarray(Image.open(io.BytesIO(r.content))).astype(np.int16)


def _generate(client, **body) -> dict:
    r = client.post("/api/generate", json=body)
    assert r.status_code == 202, r.text
    return r.json()


# --- the API ------------------------------------------------------------------------------------------------
def test_advertised_ddim_defaults_are_what_jobs_run_with(models, tmp_path):
    with _client(models, tmp_path) as c:
        advertised = c.get("/api/models").json()["samplers"]["ddim"]
        job = _generate(c, model="uncond", steps=2, n=1, seed=0)  # no options: the defaults
        assert _wait(c, job["id"])["status"] == "done"
    assert advertised["use_clipped_model_output"] is job["params"]["use_clipped_model_output"] is True


def test_generate_writes_a_reproducible_run(models, runs, tmp_path):
    with _client(models, tmp_path) as c:
        assert c.get("/healthz").json()["ok"]
        listed = c.get("/api/models").json()
        assert [m["name"] for m in listed["models"]] == ["uncond", "cond"] and listed["default"] == "uncond"
        assert listed["models"][1]["num_classes"] == 3 and "path" not in json.dumps(listed["models"])
        job = _generate(c, model="uncond", steps=4, n=3, seed=11, eta=0.5)
        s = _wait(c, job["id"])
        assert s["status"] == "done" and s["steps_done"] == s["steps_total"] == 4 and len(s["images"]) == 3
        first = [_pixels(c, u) for u in s["images"]]
        assert all(p.shape == (8, 8) for p in first) and _pixels(c, s["grid"]).shape[0] > 8
        info = c.get(s["sidecar"]).json()
        assert info["seeds"] == [11, 12, 13] and info["model_sha256"] == sha256(runs["uncond"] / checkpoint.WEIGHTS)
        assert info["options"]["eta"] == 0.5 and info["count"] == 3  # the sidecar file as written
        assert info["reproduce"]["api"] == job["params"] and "--seed 11" in info["reproduce"]["cli"]
        on_disk = json.loads((tmp_path / f"{s['run']}.json").read_text())
        assert on_disk["seeds"] == [11, 12, 13] and len(list((tmp_path / s["run"]).glob("*.png"))) == 3
        history = c.get("/api/history").json()["runs"]
        assert history[0]["run"] == s["run"] and history[0]["images"] == s["images"]
        again = _wait(c, _generate(c, **history[0]["reproduce"]["api"])["id"])  # "reproduce"
        assert again["run"] != s["run"]
        assert all(np.array_equal(a, _pixels(c, u)) for a, u in zip(first, again["images"]))


def test_random_seed_is_reported_and_ids_are_unguessable(models, tmp_path):
    with _client(models, tmp_path) as c:
        jobs = [_generate(c, steps=2, n=1) for _ in range(3)]
        for job in jobs:
            assert isinstance(job["params"]["seed"], int) and len(job["id"]) >= 22
            assert _wait(c, job["id"])["status"] == "done"
        assert len({j["id"] for j in jobs}) == 3
        assert c.get("/api/jobs/" + "A" * 22).status_code == 404


@pytest.mark.parametrize("body,field", [
    ({"steps": 0}, "steps"), ({"steps": "5"}, "steps"), ({"steps": 1.5}, "steps"), ({"n": 0}, "n"),
    ({"n": True}, "n"), ({"seed": -1}, "seed"), ({"eta": -1.0}, "eta"), ({"sampler": "euler"}, "sampler"),
    ({"model": "nope"}, "model"), ({"model": "/etc/passwd"}, "model"), ({"class_id": 1}, "class_id"),
    ({"guidance": 3.0}, "guidance"), ({"ckpt": "/tmp/x"}, "ckpt"), ({"sampler": "ddpm", "eta": 0.5}, "eta"),
    ({"model": "cond", "class_id": 3}, "class_id"), ({"spacing": "sideways"}, "spacing"),
    ({"steps": 101}, "steps"),  # > the model's T (100)
])
def test_invalid_parameters_are_422_naming_the_field(models, tmp_path, body, field):
    with _client(models, tmp_path) as c:
        r = c.post("/api/generate", json=body)
        assert r.status_code == 422, r.text
        assert r.json()["field"] == field and r.json()["detail"]
    assert not any(tmp_path.iterdir())


def test_a_body_that_is_not_json_is_named(models, tmp_path):
    with _client(models, tmp_path) as c:
        r = c.post("/api/generate", content='{"steps": 2}')  # JSON text, but no Content-Type
        assert r.status_code == 422 and "Content-Type: application/json" in r.json()["detail"], r.text
        assert c.post("/api/generate", json={"steps": 2}).status_code == 202


def test_caps_and_full_queue_are_clear_4xx(models, tmp_path):
    with _client(models, tmp_path, max_n=2, max_steps=5, max_queue=1, window_ms=5000) as c:
        r = c.post("/api/generate", json={"n": 3, "steps": 2})
        assert r.status_code == 422 and r.json()["field"] == "n" and "--max-n" in r.json()["detail"]
        r = c.post("/api/generate", json={"steps": 6})
        assert r.status_code == 422 and r.json()["field"] == "steps" and "--max-steps" in r.json()["detail"]
        waiting = _generate(c)  # every field optional: ddim's 50 steps and n=4 are capped at the server's limits
        assert waiting["params"]["steps"] == 5 and waiting["params"]["n"] == 2  # (it waits out the 5 s window)
        r = c.post("/api/generate", json={"steps": 2, "n": 1})
        assert r.status_code == 429 and "--max-queue" in r.json()["detail"] and r.headers["retry-after"]
        assert c.get(f"/api/jobs/{waiting['id']}").json()["status"] == "queued"
    # leaving the client shuts the server down: the queued job is cancelled and wrote nothing
    assert not any(tmp_path.iterdir())


# --- dynamic batching ---------------------------------------------------------------------------------------
def test_batched_samples_equal_solo_samples(models):
    """The same noise bit for bit whatever the batch; the images equal to the model's float tolerance."""
    seeds = np.array([5, 6, 7, 100, 2**40], np.int64)
    t = torch.from_numpy(seeds)
    together = ops.initial_noise(t, (1, 8, 8))
    for i in range(len(seeds)):
        assert torch.equal(together[i:i + 1], ops.initial_noise(t[i:i + 1], (1, 8, 8)))
    for name, classes in (("uncond", None), ("cond", np.array([0, 2, 1, -1, 2], np.int64))):
        m = models[name]
        req = SampleRequest.checked(m.schedule, m.num_classes, 1, steps=6, eta=1.0, classes=None if classes is None
                                    else 0, guidance=1.0 if classes is None else 2.5)
        batch = m.sample(seeds, classes, req)
        solo = torch.cat([m.sample(seeds[i:i + 1], None if classes is None else classes[i:i + 1], req)
                          for i in range(len(seeds))])
        assert (batch - solo).abs().max().item() <= 1e-5, name


def test_concurrent_requests_share_one_batch_and_get_their_own_images(models, tmp_path):
    bodies = [dict(model="cond", steps=5, n=2, seed=1, class_id=0, guidance=2.0),
              dict(model="cond", steps=5, n=1, seed=50, class_id=2, guidance=2.0),
              dict(model="cond", steps=5, n=3, seed=9, class_id=-1, guidance=2.0)]
    odd = dict(model="cond", steps=4, n=1, seed=1, class_id=0, guidance=2.0)  # other steps: another batch
    with _client(models, tmp_path / "together", window_ms=800) as c:
        jobs = [_generate(c, **b) for b in [*bodies, odd]]
        together = [_wait(c, j["id"]) for j in jobs]
        pixels = [[_pixels(c, u) for u in s["images"]] for s in together]
    assert [s["batch_jobs"] for s in together] == [3, 3, 3, 1]
    assert [s["batch_images"] for s in together] == [6, 6, 6, 1]
    with _client(models, tmp_path / "alone", window_ms=0) as c:
        for body, got in zip(bodies, pixels):
            s = _wait(c, _generate(c, **body)["id"])
            assert s["batch_jobs"] == 1
            info = c.get(s["sidecar"]).json()
            assert info["seeds"] == list(range(body["seed"], body["seed"] + body["n"]))
            for a, u in zip(got, s["images"]):  # uint8 PNGs of floats equal to ~1e-6: at most one level apart
                assert np.abs(a - _pixels(c, u)).max() <= 1


# --- files and access -------------------------------------------------------------------------------------
def test_files_only_from_inside_the_output_folder(models, tmp_path):
    out, outside = tmp_path / "gallery", tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.json"
    secret.write_text('{"count": 1, "secret": "s3cr3t"}')
    with _client(models, out) as c:
        run = _wait(c, _generate(c, steps=2, n=1)["id"])["run"]
        (out / "evil.json").symlink_to(secret)
        (out / "linked").symlink_to(outside, target_is_directory=True)
        shutil.copy(ROOT / "fastdiff" / "assets" / "digits" / "config.json", outside / "0000.png")
        (out / run / "0001.png").symlink_to(secret)
        for url in ["/api/runs/..%2Foutside%2Fsecret/run.json", "/api/runs/%2e%2e/run.json",
                    "/api/runs/%2E%2E%2F%2E%2E%2Foutside/0000.png", f"/api/runs/{run}/..%2F..%2Foutside%2Fsecret.json",
                    "/api/runs/%2Fetc%2Fpasswd/run.json", f"/api/runs/{run}/%2Fetc%2Fpasswd",
                    "/api/runs/evil/run.json", "/api/runs/linked/0000.png", f"/api/runs/{run}/0001.png",
                    f"/api/runs/{run}/..", f"/api/runs/.{run}/run.json", "/static/..%2F..%2Fserve%2Fapp.py",
                    "/static/%2e%2e/app.py", "/api/runs/../../outside/secret.json"]:
            r = c.get(url)
            assert r.status_code in (400, 404), url
            assert "s3cr3t" not in r.text and '"fastdiff_version"' not in r.text, url
        assert c.get(f"/api/runs/{run}/0000.png").status_code == 200
        assert [h["run"] for h in c.get("/api/history").json()["runs"]] == [run]  # the symlinked sidecar is skipped
    g = Gallery(out)
    for run_name, file in [("..", "run.json"), ("../outside", "0000.png"), ("/etc", "passwd"), (run, "../x.png"),
                           (run, "/etc/passwd"), (run, "0000.PNG"), (".hidden", "grid.png"), (run, "..")]:
        assert g.file(run_name, file) is None


def test_token_is_checked_on_every_request(models, tmp_path):
    app = create_app(models, tmp_path, Limits(), token="tok-123")
    with TestClient(app) as c:
        for url in ["/", "/static/app.js", "/api/models", "/healthz", "/openapi.json", "/api/history"]:
            assert c.get(url).status_code == 401, url
            assert c.get(url, headers={"Authorization": "Bearer wrong"}).status_code == 401, url
        assert c.post("/api/generate", json={"steps": 2}).status_code == 401
        ok = {"Authorization": "Bearer tok-123"}
        job = c.post("/api/generate", json={"steps": 2, "n": 1}, headers=ok).json()
        assert c.get(f"/api/jobs/{job['id']}").status_code == 401
        assert c.get("/?token=tok-123").status_code == 200  # the page's link: sets an HttpOnly cookie
        assert c.cookies.get("fastdiff_token") == "tok-123"
        s = _wait(c, job["id"])  # now by the cookie, as the page's fetches and <img> loads
        assert c.get(s["images"][0]).status_code == 200
        c.cookies.clear()
        assert c.get(s["images"][0]).status_code == 401


def test_host_header_and_bind_checks(models, tmp_path, capsys):
    with TestClient(create_app(models, tmp_path, Limits(), allowed_hosts=LOOPBACK_NAMES),
                    base_url="http://127.0.0.1:7860") as c:
        assert c.get("/healthz").status_code == 200
        assert c.get("/healthz", headers={"host": "localhost:7860"}).status_code == 200
        assert c.get("/healthz", headers={"host": "evil.example:7860"}).status_code == 400  # DNS rebinding
    assert check_bind("127.0.0.1", None) is None and check_bind("::1", None) is None
    assert "warning" in check_bind("0.0.0.0", "t")
    assert main(["serve", "--host", "0.0.0.0", "--out", str(tmp_path)]) == 2
    assert "--token" in capsys.readouterr().err


def test_page_docs_and_headers_fetch_nothing_from_the_internet(models, tmp_path):
    with _client(models, tmp_path) as c:
        page = c.get("/")
        assert page.status_code == 200 and "/static/app.js" in page.text
        assert "default-src 'self'" in page.headers["content-security-policy"]
        docs = c.get("/docs")
        assert docs.status_code == 200 and "/openapi.json" in docs.text and "/api/generate" in docs.text
        assert "GenerateRequest" in json.dumps(c.get("/openapi.json").json())
        assert c.get("/redoc").status_code == 404
    for f in (ROOT / "fastdiff" / "serve" / "static").iterdir():
        text = f.read_text()
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, f.name


# --- models and shutdown ------------------------------------------------------------------------------------
def test_model_names_and_the_onnx_model(runs, tmp_path):
    pytest.importorskip("onnxruntime")
    from fastdiff.export.onnx import export_onnx
    from fastdiff.export.runtime import OnnxSampler

    path = export_onnx(runs["cond"], tmp_path / "tiny.onnx")
    served = load_models([runs["uncond"], runs["uncond"] / checkpoint.WEIGHTS], [path])
    assert list(served) == ["uncond", "uncond-2", "tiny"] and served["tiny"].kind == "onnx"
    m, runner = served["tiny"], OnnxSampler(path)
    req = SampleRequest.checked(m.schedule, 3, 3, steps=4, eta=1.0, seed=20, classes=1, guidance=2.0)
    ref = runner.sample(3, steps=4, eta=1.0, seed=20, classes=1, guidance=2.0)
    got = m.sample(req.seeds(0, 3), req.class_ids(0, 3), req).numpy()
    assert np.array_equal(got, ref)  # the runtime's own loop, on the same seeds
    mixed = m.sample(np.array([21, 5], np.int64), np.array([1, 1], np.int64), req).numpy()
    assert np.abs(mixed[0] - ref[1]).max() <= 1e-5  # any seeds, not only consecutive ones
    assert served["uncond"].sha256 == served["uncond-2"].sha256 == sha256(runs["uncond"] / checkpoint.WEIGHTS)


def test_shutdown_mid_job_leaves_no_file(models, tmp_path):
    with _client(models, tmp_path) as c:
        job = _generate(c, steps=100, n=4, eta=1.0)
        deadline = time.monotonic() + 60
        while (s := c.get(f"/api/jobs/{job['id']}").json())["steps_done"] < 2:  # live per-step progress
            assert time.monotonic() < deadline and s["status"] in ("queued", "running")
            time.sleep(0.01)
        assert s["status"] == "running" and s["steps_total"] == 100
        batcher = c.app.state.batcher
    assert batcher.get(job["id"])["status"] == "cancelled"
    assert sorted(os.listdir(tmp_path)) == []  # no PNG, no sidecar, no hidden partial folder


# --- the page in a real browser -----------------------------------------------------------------------------
def _skip(reason: str) -> None:
    print(f"SKIP test_studio_page_in_chromium: {reason}")
    pytest.skip(reason)


def test_studio_page_in_chromium(models, tmp_path):
    if not CHROMIUM.exists():
        _skip(f"{CHROMIUM} not found (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _skip("playwright is not installed (pip install playwright; its browsers are never downloaded)")
    out = tmp_path / "gallery"
    served = {**load_models(), "cond": models["cond"]}  # the shipped digits model first, a class-conditional one
    app = create_app(served, out, Limits(), allowed_hosts=LOOPBACK_NAMES)
    outside: list[str] = []
    with background(app) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS, timeout=60_000)
        try:
            page = browser.new_page(viewport={"width": 1180, "height": 820})
            page.set_default_timeout(60_000)
            page.on("request", lambda r: None if r.url.startswith(url) or r.url.startswith("data:")
                    else outside.append(r.url))
            page.goto(url + "/")
            page.wait_for_selector("body[data-ready='1']")
            assert page.input_value("#model") == "digits" and page.is_hidden("#class_id")
            page.select_option("#model", "cond")  # class and guidance appear for a class-conditional model
            assert page.is_visible("#class_id") and page.is_visible("#guidance")
            assert page.locator("#class_id option").count() == 4  # 0, 1, 2 and none
            page.select_option("#model", "digits")
            assert page.is_hidden("#class_id")
            page.select_option("#sampler", "ddim")
            page.fill("#steps", "5")
            page.fill("#eta", "0")
            page.fill("#n", "4")
            page.click("#seed-random")
            page.fill("#seed", "7")
            page.click("#generate")
            page.wait_for_function("() => { const i = [...document.querySelectorAll('#gallery img')];"
                                   " return i.length === 4 && i.every(x => x.complete && x.naturalWidth > 0); }")
            assert "done" in page.text_content("#status-text")
            assert page.locator("#gallery a[download]").count() == 8  # the image and its caption link
            page.wait_for_selector("#history li img")
            page.fill("#seed", "123")
            page.click("#history li button.reproduce")
            assert page.input_value("#seed") == "7" and page.input_value("#steps") == "5"
            shot = tmp_path / "serve.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert not outside, f"the page fetched from outside the server: {outside}"
    assert shot.stat().st_size > 10_000
    if os.environ.get("FASTDIFF_UPDATE_SCREENSHOT") == "1":  # refresh the screenshot docs/serve.md shows
        shutil.copy(shot, ROOT / "docs" / "serve.png")
    print(f"page screenshot: {shot}")
    sidecars = list(out.glob("*.json"))
    assert len(sidecars) == 1
    info = json.loads(sidecars[0].read_text())
    assert info["seeds"] == [7, 8, 9, 10] and info["steps"] == 5 and info["model"] == "digits"
    pngs = sorted((out / info["run"]).glob("*.png"))
    assert [p.name for p in pngs] == ["0000.png", "0001.png", "0002.png", "0003.png"]
    assert all(Image.open(p).size == (16, 16) for p in pngs) and (out / f"{info['run']}_grid.png").exists()


def test_diffusers_folder_is_served(runs, models, tmp_path):
    pytest.importorskip("diffusers")
    from fastdiff.interop.diffusers import save_diffusers

    model, schedule, _ = checkpoint.load_model(runs["uncond"])
    folder = save_diffusers(model, schedule, tmp_path / "tiny-pipe")
    served = load_models(diffusers=[folder])
    m = served["tiny-pipe"]
    assert m.kind == "diffusers" and m.image_shape == (1, 8, 8) and m.num_classes == 0 and len(m.sha256) == 64
    with _client(served, tmp_path / "gallery") as c:
        s = _wait(c, _generate(c, steps=4, n=2, seed=3)["id"])
        assert s["status"] == "done", s
        info = c.get(s["sidecar"]).json()
        assert info["model_kind"] == "diffusers" and "--diffusers" in info["reproduce"]["cli"]
    req = SampleRequest.checked(m.schedule, 0, 2, steps=4, seed=3)
    ours = models["uncond"].sample(req.seeds(0, 2), None, req)
    assert (m.sample(req.seeds(0, 2), None, req) - ours).abs().max().item() < 1e-3  # the same weights in diffusers
