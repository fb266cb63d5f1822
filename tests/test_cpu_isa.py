"""The CPU kernel's ISA paths (csrc/cpu/: AVX-512, AVX2; the portable one in csrc/ops.cpp): each one this
CPU runs, forced in turn, gives bit-identical results - to each other, to the PyTorch reference and to the
golden normals - on odd sizes, partial Philox groups, channels_last, non-contiguous inputs and every dtype."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fastdiff import ops
from fastdiff.schedule import StepCoefs

pytestmark = pytest.mark.skipif(ops.backend() != "extension", reason="fastdiff._C not built")

GOLDEN = Path(__file__).with_name("golden_normals.json")
DDIM = StepCoefs(a=1.6, b=-1.2, clip_range=1.0, k_x0=0.8, k_x=0.1, k_m=0.45, sigma=0.3)
COEFS = {"noise": DDIM, "nonoise": DDIM._replace(sigma=0.0), "noclip": DDIM._replace(clip_range=math.inf)}
SHAPES = [(1, 1), (3, 5), (2, 17), (2, 3, 7, 5), (3, 4003), (2, 3, 29, 31), (1, 1, 16, 16)]


def _C():
    from fastdiff import _C

    return _C


def available() -> list[str]:
    """The ISA paths this CPU runs (the portable one always)."""
    found = []
    for isa in ("scalar", "avx2", "avx512"):
        try:
            _C()._set_cpu_isa(isa)
            found.append(isa)
        except ValueError:
            pass
    _C()._set_cpu_isa("auto")
    return found


@pytest.fixture
def run_each():
    """run_each(fn) -> {isa: fn()} with each available path forced; the best path is restored."""

    def run(fn):
        out = {}
        try:
            for isa in available():
                _C()._set_cpu_isa(isa)
                out[isa] = fn()
        finally:
            _C()._set_cpu_isa("auto")
        return out

    return run


def _inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 1.5).to(dtype)
    m = torch.randn(shape, generator=g).to(dtype)
    seeds = torch.randint(-(2**62), 2**62, (shape[0],), generator=g)
    return x, m, seeds


def _same(results: dict) -> None:
    (first, want), *rest = results.items()
    for isa, got in rest:
        assert got.stride() == want.stride() and got.dtype == want.dtype
        assert torch.equal(got.view(torch.int16 if got.element_size() == 2 else torch.int32),
                           want.view(torch.int16 if want.element_size() == 2 else torch.int32)), \
            f"{isa} differs from {first}: max |diff| {(got.float() - want.float()).abs().max().item()}"


def test_paths_are_named_and_settable() -> None:
    isas = available()
    assert isas[0] == "scalar" and _C().cpu_isa() == isas[-1]  # the default is the best one
    with pytest.raises(ValueError, match="isa"):
        _C()._set_cpu_isa("sse9")
    with pytest.raises(ValueError, match="isa"):
        _C()._set_cpu_isa(3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", list(COEFS))
@pytest.mark.parametrize("shape", SHAPES)
def test_bit_identical_contiguous(run_each, shape, dtype, kind) -> None:
    x, m, seeds = _inputs(shape, dtype)
    res = run_each(lambda: ops.reverse_step(x, m, seeds, 77, COEFS[kind]))
    res["reference"] = ops.reverse_step_reference(x, m, seeds, 77, COEFS[kind])
    _same(res)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(2, 3, 7, 5), (1, 5, 29, 31), (2, 130, 3, 3), (1, 1, 1, 3)])
def test_bit_identical_channels_last(run_each, shape, dtype) -> None:
    x, m, seeds = _inputs(shape, dtype, seed=1)
    x, m = x.contiguous(memory_format=torch.channels_last), m.contiguous(memory_format=torch.channels_last)
    res = run_each(lambda: ops.reverse_step(x, m, seeds, 5, DDIM))
    res["reference"] = ops.reverse_step_reference(x, m, seeds, 5, DDIM)
    _same(res)
    assert torch.equal(res["reference"], ops.reverse_step_reference(x.contiguous(), m.contiguous(), seeds, 5, DDIM))


def test_bit_identical_non_contiguous(run_each) -> None:
    x, m, seeds = _inputs((3, 6, 9, 11), torch.float32, seed=2)
    xs, ms = x[:, ::2, :, 1:], m.transpose(2, 3).contiguous().transpose(2, 3)[:, ::2, :, 1:]
    res = run_each(lambda: ops.reverse_step(xs, ms, seeds, 9, DDIM))
    res["reference"] = ops.reverse_step_reference(xs, ms, seeds, 9, DDIM)
    _same(res)


def test_golden_normals_every_path(run_each) -> None:
    """The committed golden normals (tests/golden_normals.json) through each path, contiguous and channels_last."""
    cases = json.loads(GOLDEN.read_text())["cases"]
    groups: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for c in cases:
        groups.setdefault((c["seed"], c["step"]), []).append((c["index"], int(c["bits"], 16)))
    unit = StepCoefs(0.0, 0.0, math.inf, 0.0, 0.0, 0.0, 1.0)  # out = z
    for (seed, step), want in groups.items():
        n = max(i for i, _ in want) + 1
        zeros, seeds = torch.zeros(1, n), torch.tensor([seed], dtype=torch.int64)
        for isa, z in run_each(lambda: ops.reverse_step(zeros, zeros, seeds, step, unit)).items():
            bits = z.view(torch.int32).reshape(-1).numpy().view(np.uint32)
            assert all(bits[i] == b for i, b in want), f"{isa}: seed={seed} step={step}"


def test_initial_noise_step(run_each) -> None:
    """The x_T step counter (2^32 - 1) and seeds at the int64 extremes."""
    x, m, _ = _inputs((2, 4 * 64 * 3 + 7), torch.float32, seed=3)
    seeds = torch.tensor([-(2**63), 2**63 - 1])
    res = run_each(lambda: ops.reverse_step(x, m, seeds, 2**32 - 1, DDIM))
    res["reference"] = ops.reverse_step_reference(x, m, seeds, 2**32 - 1, DDIM)
    _same(res)


def test_env_var_picks_the_path_at_load() -> None:
    env = {**os.environ, "FASTDIFF_CPU_ISA": "scalar"}
    code = "import torch; from fastdiff import _C; print(_C.cpu_isa())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "scalar"
    env["FASTDIFF_CPU_ISA"] = "bogus"
    out = subprocess.run([sys.executable, "-W", "always", "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "FASTDIFF_CPU_ISA" in out.stderr
    assert out.stdout.strip() == available()[-1]
