"""The studio page in a real browser (headless Debian Chromium driven by Playwright; skipped with a reason when
either is missing): "reproduce" re-runs every parameter of a run (every sampler and option, seeds beyond
2^53 exactly), the form starts within the server's limits, invalid input is named in #error, and a lost
server is said so."""
from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import torch

pytest.importorskip("fastapi", reason="fastdiff serve needs fastapi (pip install 'fastdiff[serve]')")
pytest.importorskip("uvicorn", reason="fastdiff serve needs uvicorn")

from fastdiff import checkpoint  # noqa: E402
from fastdiff.nn.unet import UNet  # noqa: E402
from fastdiff.serve import Limits, create_app, load_models  # noqa: E402
from fastdiff.serve.server import LOOPBACK_NAMES, background  # noqa: E402

from conftest import TINY  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
BIG = 2**60 + 1  # not a JS number: 2^60 + 1 rounds to 2^60


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-page-models")
    for name, classes in (("uncond", 0), ("cond", 3)):
        torch.manual_seed(classes)
        cfg = type(TINY)(**{**TINY.to_dict(), "num_classes": classes})
        config = {"model": cfg.to_dict(), "schedule": {"num_train_timesteps": 100}}
        checkpoint.save(root / name, config, {f"ema.{k}": v for k, v in UNet(cfg).state_dict().items()}, {})
    return load_models([root / "uncond", root / "cond"])


@pytest.fixture
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not found (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright; its browsers are never downloaded)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS, timeout=60_000)
        try:
            yield b
        finally:
            b.close()


def _open(browser, url: str):
    page = browser.new_page()
    page.set_default_timeout(60_000)
    page.goto(url + "/")
    page.wait_for_selector("body[data-ready='1']")
    return page


def _run(url: str, body: dict) -> dict:
    job = httpx.post(url + "/api/generate", json=body)
    assert job.status_code == 202, job.text
    for _ in range(60):
        s = httpx.get(f"{url}/api/jobs/{job.json()['id']}", params={"wait": 5}, timeout=30).json()
        if s["status"] == "done":
            return s
    raise AssertionError(f"job {s} did not finish")


def _generate(page) -> str:
    """Click Generate and wait for the run; its name."""
    before = page.text_content("#result-title")
    page.click("#generate")
    page.wait_for_function("(b) => document.querySelector('#result-title').textContent !== b || "
                           "!document.querySelector('#error').hidden", arg=before)
    assert page.is_hidden("#error"), page.text_content("#error")
    return page.text_content("#result-title").removeprefix("— ")


RUNS = [  # every sampler, options off their defaults, seeds beyond 2^53, a class-conditional run
    dict(model="uncond", sampler="dpmpp-2m", steps=4, n=1, seed=BIG, solver_order=1, final_sigmas_type="sigma_min",
         lower_order_final=False, spacing="trailing", clip_sample=True),
    dict(model="uncond", sampler="dpmpp-2m-sde", steps=3, n=2, seed=9),
    dict(model="uncond", sampler="ddpm", steps=3, n=2, seed=5, variance_type="fixed_large", spacing="linspace"),
    dict(model="cond", sampler="ddim", steps=3, n=1, seed=2**63 - 1, eta=0.05, use_clipped_model_output=False,
         class_id=2, guidance=2.5),
]


def test_reproduce_reruns_every_parameter_exactly(models, tmp_path, browser):
    out = tmp_path / "gallery"
    with background(create_app(models, out, Limits(), allowed_hosts=LOOPBACK_NAMES)) as url:
        done = [_run(url, body) for body in RUNS]
        page = _open(browser, url)
        samplers = page.eval_on_selector_all("#sampler option", "o => o.map(x => x.value)")
        assert sorted(samplers) == ["ddim", "ddpm", "dpmpp-2m", "dpmpp-2m-sde"]
        for body, s in zip(RUNS, done):
            item = page.locator("#history li", has=page.locator(f"code:has-text('{s['run']}')"))
            label = item.locator(".what").text_content()
            assert f"seed {body['seed']} " in label, label  # exact, beyond 2^53 too
            for k in ("solver_order", "final_sigmas_type", "lower_order_final", "spacing", "clip_sample",
                      "variance_type", "use_clipped_model_output"):
                if k in body:
                    assert f"{k}={str(body[k]).lower()}" in label, (k, label)
            item.locator("button", has_text="show").click()
            captions = page.eval_on_selector_all("#gallery figcaption", "f => f.map(x => x.textContent)")
            assert captions == [f"seed {body['seed'] + i} · download" for i in range(body["n"])], captions
            page.fill("#seed", "1")
            page.select_option("#sampler", "ddim")
            item.locator("button.reproduce").click()
            assert page.input_value("#seed") == str(body["seed"]) and page.is_hidden("#error")
            run = _generate(page)
            again = json.loads((out / f"{run}.json").read_text())
            assert again["reproduce"]["api"] == s["params"], body  # every parameter, the seed exactly
            page.click("#history-refresh")
            page.wait_for_selector(f"#history code:has-text('{run}')")


def test_form_follows_limits_and_names_what_is_wrong(models, tmp_path, browser):
    app = create_app(models, tmp_path / "gallery", Limits(max_n=2, max_steps=20), allowed_hosts=LOOPBACK_NAMES)
    with background(app) as url:
        page = _open(browser, url)
        assert page.input_value("#steps") == "20" and page.input_value("#n") == "2"
        page.select_option("#sampler", "ddpm")
        assert page.input_value("#steps") == "20"
        page.select_option("#sampler", "ddim")
        page.fill("#steps", "3")
        page.fill("#eta", "0.05")  # any value, not only multiples of a step
        page.fill("#seed", "7")
        run = _generate(page)
        assert json.loads((tmp_path / "gallery" / f"{run}.json").read_text())["options"]["eta"] == 0.05
        page.fill("#steps", "0")
        page.click("#generate")
        assert page.text_content("#error").startswith("Steps: ") and page.is_visible("#error")
        page.fill("#steps", "3")
        page.fill("#seed", "12x")
        page.click("#generate")
        assert page.text_content("#error").startswith("Seed: ")
        page.fill("#seed", "7")
        page.route("**/api/jobs/**", lambda route: route.abort())  # the server goes away mid-job
        page.click("#generate")
        page.wait_for_function("() => !document.querySelector('#error').hidden")
        assert page.text_content("#error") == "lost the connection to the server (is it still running?)"
        page.unroute("**/api/jobs/**")
        run = _generate(page)  # a valid submit clears the stale error
        assert page.is_hidden("#error") and run
