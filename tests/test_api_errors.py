"""The Python API's refusals: each mistake of an embedding program is a ValueError naming the argument, raised before
any work (never a raw IndexError, OverflowError, KeyError or a silent fallback)."""
from __future__ import annotations

import dataclasses
import math
import re
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import TINY
from fastdiff import ops
from fastdiff.checkpoint import BUNDLED_MODEL, load_model
from fastdiff.engine import Engine, generate
from fastdiff.multistep import MultistepCoefs
from fastdiff.nn.unet import UNet
from fastdiff.request import MAX_BATCH_SIZE
from fastdiff.sampling import make_seeds
from fastdiff.schedule import NoiseSchedule, StepCoefs

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def conditional() -> UNet:
    torch.manual_seed(0)
    return UNet(dataclasses.replace(TINY, num_classes=3)).eval()


@pytest.mark.parametrize("runtime", ["torch", "ort"])
def test_engine_checks_class_ids_against_the_model(runtime, conditional, tiny_model):
    pytest.importorskip("onnxruntime") if runtime == "ort" else None
    seeds = make_seeds(0, 2)
    engine = Engine(conditional, NoiseSchedule(), runtime=runtime)
    for ids in ([0, 3], [0, -2], [2**40, 0]):
        with pytest.raises(ValueError, match=r"class ids must be in \[0, 2\] \(or -1 for the null class\)"):
            engine.sample(seeds, (1, 8, 8), "ddim", 2, classes=torch.tensor(ids))
    unconditional = Engine(tiny_model, NoiseSchedule(), runtime="torch")
    with pytest.raises(ValueError, match="class ids were given but the model is unconditional"):
        unconditional.sample(seeds, (1, 8, 8), "ddim", 2, classes=torch.tensor([0, 1]), guidance=5.0)


def test_engine_takes_numpy_step_counts(tiny_model):
    engine = Engine(tiny_model, NoiseSchedule(), runtime="torch")
    out = engine.sample(make_seeds(0, 1), (1, 8, 8), "ddim", np.int64(2))
    assert torch.equal(out, engine.sample(make_seeds(0, 1), (1, 8, 8), "ddim", 2))


def test_batch_size_and_guidance_are_bounded(tiny_model, conditional):
    with pytest.raises(ValueError, match=rf"batch_size must be in \[1, {MAX_BATCH_SIZE}\]"):
        generate(tiny_model, NoiseSchedule(), (1, 8, 8), 10**7, steps=2, batch_size=10**7, runtime="torch")
    with pytest.raises(ValueError, match="guidance must be <= 1000; got 1e"):
        generate(conditional, NoiseSchedule(), (1, 8, 8), 1, steps=2, classes=1, num_classes=3, guidance=1e39)


@pytest.mark.parametrize("eta", [3.0, 1e160])
def test_a_huge_eta_is_named(eta, tiny_model):
    with pytest.raises(ValueError, match=f"eta={re.escape(str(eta))} is too large"):
        generate(tiny_model, NoiseSchedule(), (1, 8, 8), 1, steps=2, eta=eta, runtime="torch")


def test_checkpoint_metadata_and_config_errors_are_named(tmp_path):
    for name, metadata in (("bad", {"format": "fastdiff", "config": "{not json"}), ("none", {"format": "fastdiff"}),
                           ("list", {"format": "fastdiff", "config": "[1, 2]"})):
        save_file({"w": torch.zeros(3)}, str(tmp_path / f"{name}.safetensors"), metadata=metadata)
        with pytest.raises(ValueError, match=f"{name}.safetensors: its config metadata (is not valid JSON|is missing|"
                                             "must be a JSON object)"):
            load_model(tmp_path / f"{name}.safetensors")
    run = tmp_path / "run"
    shutil.copytree(BUNDLED_MODEL, run)
    (run / "config.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match="config.json is not a readable UTF-8 text file"):
        load_model(run)
    (run / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="config.json must be a JSON object; got list"):
        load_model(run)


@pytest.mark.parametrize("coefs,match", [
    ((1.0, 2.0), r"coefs must hold 7 numbers \(a, b, clip_range, k_x0, k_x, k_m, sigma\); got 2"),
    (StepCoefs(1.0, 0.0, -1.0, 1.0, 0.0, 0.0, 0.0), r"coefs.clip_range must be a number >= 0 \(inf: no clamp\)"),
    (StepCoefs(math.nan, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0), "coefs.a must be finite; got nan"),
    ("abcdefg", "coefs must be a fastdiff StepCoefs of 7 numbers; got str"),
])
def test_step_coefs_are_checked(coefs, match):
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match=match):
        ops.reverse_step(x, x, make_seeds(0, 1), 1, coefs)
    with pytest.raises(ValueError, match=match):
        ops.reverse_step_reference(x, x, make_seeds(0, 1), 1, coefs)


def test_multistep_coefs_are_checked():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="coefs.k_prev must be finite; got inf"):
        ops.multistep_step(x, x, x, make_seeds(0, 1), 1, MultistepCoefs(1.0, 0.0, 1.0, 1.0, math.inf, 0.0, 0.0))


@pytest.mark.parametrize("shape", [(-1, 4), (2.5,), "abc", 4])
def test_initial_noise_names_a_bad_shape(shape):
    with pytest.raises(ValueError, match="shape must be a sequence of sizes >= 0"):
        ops.initial_noise(make_seeds(0, 2), shape)


def test_scheduler_initial_noise_names_a_bad_shape():
    pytest.importorskip("diffusers")
    from fastdiff.diffusers import FusedDDIMScheduler

    sched = FusedDDIMScheduler()
    sched.set_seeds(3)
    with pytest.raises(ValueError, match=r"shape must be the full shape \(B, ...\)"):
        sched.initial_noise(4)
