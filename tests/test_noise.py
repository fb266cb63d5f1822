"""The noise contract: Philox known answers, golden normals (bit-exact), statistics."""
from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from fastdiff import noise, ops

GOLDEN = json.loads(Path(__file__).with_name("golden_normals.json").read_text())["cases"]
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# Random123 known-answer vectors for Philox4x32-10: (counter, key, result)
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def _golden_groups() -> dict[tuple[int, int], list[tuple[int, int]]]:
    groups = defaultdict(list)
    for c in GOLDEN:
        groups[(c["seed"], c["step"])].append((c["index"], int(c["bits"], 16)))
    return groups


def _bits(z) -> np.ndarray:
    z = z.cpu().numpy() if isinstance(z, torch.Tensor) else z
    return np.ascontiguousarray(z, dtype=np.float32).view(np.uint32)


@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_philox_known_answers(lib: str) -> None:
    for ctr, key, want in KAT:
        args = [np.array([v], dtype=np.int64) for v in (*ctr, *key)]
        if lib == "torch":
            args = [torch.from_numpy(a) for a in args]
        got = noise.philox4x32_10(*args)
        assert [int(r[0]) for r in got] == list(want)


def _check_golden(make_z) -> None:
    for (seed, step), cases in _golden_groups().items():
        n = max(i for i, _ in cases) + 1
        z = _bits(make_z(seed, step, n)).reshape(-1)
        for i, bits in cases:
            assert z[i] == bits, f"seed={seed} step={step} index={i}: {z[i]:#010x} != {bits:#010x}"


def test_golden_numpy() -> None:
    _check_golden(lambda s, k, n: noise.gaussian(np.array([s], dtype=np.int64), k, n))


def test_golden_torch() -> None:
    _check_golden(lambda s, k, n: noise.gaussian(torch.tensor([s], dtype=torch.int64), k, n))


def _op_noise(seed: int, step: int, n: int, device: str = "cpu", channels_last: bool = False) -> torch.Tensor:
    """z through the fused op: sigma = 1, every other coefficient 0, no clamp → out == z."""
    x = torch.zeros(1, n, device=device)
    seeds = torch.tensor([seed], dtype=torch.int64, device=device)
    return torch.ops.fastdiff.reverse_step(x, x, seeds, step, 0.0, 0.0, math.inf, 0.0, 0.0, 0.0, 1.0)


needs_ext = pytest.mark.skipif(ops.backend() != "extension", reason="fastdiff._C not built")


@needs_ext
def test_golden_cpu_kernel() -> None:
    _check_golden(_op_noise)


@needs_ext
def test_golden_cpu_kernel_channels_last() -> None:
    """The channels-last kernel maps memory positions to logical indices: same bits."""
    x = torch.zeros(2, 3, 5, 7).to(memory_format=torch.channels_last)
    seeds = torch.tensor([2**40 + 7, -3])
    out = torch.ops.fastdiff.reverse_step(x, x, seeds, 11, 0.0, 0.0, math.inf, 0.0, 0.0, 0.0, 1.0)
    assert out.is_contiguous(memory_format=torch.channels_last)
    want = noise.gaussian(seeds.numpy(), 11, 105).reshape(2, 3, 5, 7)
    assert np.array_equal(_bits(out.contiguous()), _bits(want))


@CUDA
@needs_ext
def test_golden_cuda_kernel() -> None:
    _check_golden(lambda s, k, n: _op_noise(s, k, n, "cuda"))


@CUDA
def test_golden_torch_cuda() -> None:
    _check_golden(lambda s, k, n: noise.gaussian(torch.tensor([s], dtype=torch.int64, device="cuda"), k, n))


@CUDA
@needs_ext
@pytest.mark.parametrize("n", [1, 7, 8, 4096 + 3])
def test_cuda_cpu_noise_identical(n: int) -> None:
    seeds = torch.tensor([0, -1, 2**40 + 7, 99], dtype=torch.int64)
    for layout in ("contiguous", "channels_last"):
        x = torch.zeros(4, n, 3, 1) if layout == "contiguous" else torch.zeros(4, 3, n, 1).to(
            memory_format=torch.channels_last)
        args = (0.0, 0.0, math.inf, 0.0, 0.0, 0.0, 1.0)
        cpu = torch.ops.fastdiff.reverse_step(x, x, seeds, 5, *args)
        xc = x.cuda()
        gpu = torch.ops.fastdiff.reverse_step(xc, xc, seeds.cuda(), 5, *args)
        assert np.array_equal(_bits(cpu.contiguous()), _bits(gpu.contiguous()))


def test_transform_accuracy() -> None:
    """The float32 Box-Muller is within ~1e-5 (relative) of the exact float64 one."""
    rng = np.random.default_rng(0)
    u, v = (rng.integers(0, 2**32, 200_000, dtype=np.int64) for _ in range(2))
    zc, zs = noise.box_muller(u, v)
    uu = ((u >> 9) * 2 + 1) * 2.0**-24
    r = np.sqrt(-2 * np.log(uu))
    o, f = v >> 29, (v >> 6) & 0x7FFFFF
    f = np.where(o & 1, 0x7FFFFF - f, f)
    theta = (o >> 1) * (np.pi / 2) + np.where(o & 1, np.pi / 2 - (2 * f + 1) * np.pi / 2**26, (2 * f + 1) * np.pi / 2**26)
    tol = 2e-6 * np.maximum(r, 1) + 1e-6
    assert np.all(np.abs(zc - r * np.cos(theta)) <= tol)
    assert np.all(np.abs(zs - r * np.sin(theta)) <= tol)


def test_gaussian_shapes_and_validation() -> None:
    seeds = np.array([1, 2, 3], dtype=np.int64)
    assert noise.gaussian(seeds, 0, 0).shape == (3, 0)
    z = noise.gaussian(seeds, 0, 10)
    assert z.shape == (3, 10) and z.dtype == np.float32
    assert np.array_equal(z[:, :7], noise.gaussian(seeds, 0, 7))  # prefix-stable: z depends on i only
    zt = noise.gaussian(torch.from_numpy(seeds), 0, 10)
    assert isinstance(zt, torch.Tensor) and zt.dtype == torch.float32
    with pytest.raises(ValueError, match="step"):
        noise.gaussian(seeds, -1, 4)
    with pytest.raises(ValueError, match="step"):
        noise.gaussian(seeds, 2**32, 4)


def test_noise_module_is_torch_free() -> None:
    import subprocess
    import sys
    code = ("import sys, numpy as np; import fastdiff.noise as n; n.gaussian(np.arange(2), 3, 9); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_statistics() -> None:
    seeds = np.array([0, 1, 2, 3, -1, 2**40 + 7, 123456789, 2**33], dtype=np.int64)
    z = noise.gaussian(seeds, 17, 1 << 17).astype(np.float64)  # 1M normals
    flat = z.ravel()
    n = flat.size
    assert abs(flat.mean()) < 5 / math.sqrt(n)
    assert abs(flat.var() - 1) < 5 * math.sqrt(2 / n)
    assert abs(stats.skew(flat)) < 0.02 and abs(stats.kurtosis(flat)) < 0.03
    assert stats.kstest(flat, "norm").pvalue > 1e-3
    tol = 5 / math.sqrt(z.shape[1])
    corr = np.corrcoef(z)  # across seeds
    assert np.abs(corr - np.eye(len(seeds))).max() < tol
    for lag in (1, 2, 3, 4, 5):  # neighbouring elements (within and across Philox groups / pairs)
        for row in z:
            assert abs(np.corrcoef(row[:-lag], row[lag:])[0, 1]) < tol
    z2 = noise.gaussian(seeds, 18, 1 << 17).astype(np.float64)  # across steps
    for a, b in zip(z, z2):
        assert abs(np.corrcoef(a, b)[0, 1]) < tol
    # pairs from one Box-Muller draw are uncorrelated, also in their squares (independence check)
    pairs = z.reshape(len(seeds), -1, 2)
    assert abs(np.corrcoef(pairs[..., 0].ravel() ** 2, pairs[..., 1].ravel() ** 2)[0, 1]) < 5 / math.sqrt(n / 2)


def test_radius_exponent_split_same_for_every_input() -> None:
    """csrc/philox.h splits u into (e, mant) by one subtraction from its bits; noise._radius (the readable form)
    compares, halves and selects. The two must agree for every one of the 2^23 values u takes."""
    k = np.arange(1 << 23, dtype=np.uint32)  # U >> 9
    assert np.array_equal(((k << 9) >> 8) | 1, (k << 1) + 1)  # (U >> 8) | 1 == 2 * (U >> 9) + 1
    u = ((k << 1) + 1).astype(np.float32) * np.float32(2.0**-24)
    bits = u.view(np.uint32)
    big = ((bits & 0x7FFFFF) | 0x3F800000).view(np.float32) > noise.SQRT2
    e_old = ((bits >> 23) & 0xFF).astype(np.int64) - 127 + big
    mant_old = np.where(big, ((bits & 0x7FFFFF) | 0x3F000000), ((bits & 0x7FFFFF) | 0x3F800000))  # x 0.5: exact
    t = bits - np.uint32(0x3504F4)
    e_new = (t >> 23).astype(np.int64) - 126
    mant_new = (t & 0x7FFFFF) + np.uint32(0x3504F4 + (126 << 23))
    assert big.any() and not big.all()
    assert np.array_equal(e_old, e_new) and np.array_equal(mant_old, mant_new)
