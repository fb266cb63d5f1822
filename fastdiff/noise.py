"""Counter-based Gaussian noise (Philox4x32-10 + a portable Box-Muller), for NumPy and PyTorch.

This is the array twin of csrc/philox.h: the same operations in the same order, so the normals
are bit-identical to the C++/CUDA kernels (docs/design.md §3). Every function takes NumPy arrays
or torch tensors and uses only operators plus the tiny adapter below, so this module never
imports torch itself (the torch-free ONNX runtime imports it with NumPy only).

Integers are uint32 values held in int64 arrays; floats are float32; no fma, no libm.
"""
from __future__ import annotations

import sys
from typing import Any

import numpy as np

Array = Any  # np.ndarray or torch.Tensor

MASK32 = 0xFFFFFFFF
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85

# float32 constants, written as exact hex floats (the same literals as in csrc/philox.h)
_F = float.fromhex
LN_C9, LN_C7, LN_C5, LN_C3 = _F("0x1.c71c72p-4"), _F("0x1.24924ap-3"), _F("0x1.99999ap-3"), _F("0x1.555556p-2")
LN2 = _F("0x1.62e430p-1")
SQRT2 = _F("0x1.6a09e6p+0")
SIN_C3, SIN_C5, SIN_C7, SIN_C9 = _F("-0x1.555556p-3"), _F("0x1.111112p-7"), _F("-0x1.a01a02p-13"), _F("0x1.71de3ap-19")
COS_C2, COS_C4, COS_C6, COS_C8, COS_C10 = (
    -0.5, _F("0x1.555556p-5"), _F("-0x1.6c16c2p-10"), _F("0x1.a01a02p-16"), _F("-0x1.27e4fcp-22"))
PHI_STEP = _F("0x1.921fb6p-25")  # (pi/4) / 2^24 as float32
TWO_M24 = 2.0**-24
INITIAL_NOISE_STEP = 2**32 - 1  # the step counter of x_T; reverse steps use their timestep t


# --- adapter: the few calls that differ between NumPy and torch ---------------------------------
def _torch():
    """torch, which a tensor argument means is loaded already: this module never imports it."""
    return sys.modules["torch"]


def _is_np(a: Array) -> bool:
    return isinstance(a, (np.ndarray, np.generic))


def where(c: Array, a: Array, b: Array) -> Array:
    if _is_np(c):
        return np.where(c, a, b)
    return _torch().where(c, a, b)


def _sqrt(a: Array) -> Array:
    """Correctly rounded float32 sqrt. torch's CPU float32 sqrt is not (it is off by an ulp at
    times), so torch goes through float64, which rounds back to the correct float32."""
    if _is_np(a):
        return np.sqrt(a)
    torch = _torch()
    return a.to(torch.float64).sqrt().to(torch.float32)


def _to_f32(a: Array) -> Array:
    """Exact integer -> float32 (callers keep values below 2^24)."""
    if _is_np(a):
        return a.astype(np.float32)
    torch = _torch()
    return a.to(torch.float32)


def _f32_bits(a: Array) -> Array:
    """float32 -> its bit pattern as int64 (non-negative floats only)."""
    if _is_np(a):
        return a.view(np.int32).astype(np.int64)
    torch = _torch()
    return a.view(torch.int32).to(torch.int64)


def _bits_f32(a: Array) -> Array:
    """Bit pattern (int64, < 2^31) -> float32."""
    if _is_np(a):
        return a.astype(np.int32).view(np.float32)
    torch = _torch()
    return a.to(torch.int32).view(torch.float32)


# --- Philox4x32-10 ------------------------------------------------------------------------------
def _mulhilo(m: int, c: Array) -> tuple[Array, Array]:
    """(hi, lo) 32-bit halves of m * c without int64 overflow (c split in 16-bit halves)."""
    p_lo = c & 0xFFFF
    p_lo = p_lo * m  # < 2^48
    p_hi = (c >> 16) * m  # < 2^48
    mid = p_lo + ((p_hi & 0xFFFF) << 16)  # < 2^49
    return (p_hi >> 16) + (mid >> 32), mid & MASK32


def philox4x32_10(c0: Array, c1: Array, c2: Array, c3: Array, k0: Array | int, k1: Array | int
                  ) -> tuple[Array, Array, Array, Array]:
    """Random123 Philox4x32-10 of counter (c0..c3) under key (k0, k1); uint32 values in int64 arrays."""
    for r in range(10):
        if r:
            k0 = (k0 + PHILOX_W0) & MASK32
            k1 = (k1 + PHILOX_W1) & MASK32
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


# --- normal transform (mirrors fd_radius / fd_sincos in csrc/philox.h) --------------------------
def _radius(u32: Array) -> Array:
    """sqrt(-2 ln u) with u = (2*(U>>9)+1) * 2^-24, from float32 + - * / sqrt only."""
    u = _to_f32(((u32 >> 9) << 1) + 1) * TWO_M24
    bits = _f32_bits(u)
    e = ((bits >> 23) & 0xFF) - 127
    mant = _bits_f32((bits & 0x7FFFFF) | 0x3F800000)
    big = mant > SQRT2
    mant = where(big, mant * 0.5, mant)
    e = where(big, e + 1, e)
    s = (mant - 1.0) / (mant + 1.0)
    s2 = s * s
    p = s2 * LN_C9 + LN_C7
    p = p * s2 + LN_C5
    p = p * s2 + LN_C3
    p = p * s2 + 1.0
    ln_u = (s * 2.0) * p + _to_f32(e) * LN2
    return _sqrt(ln_u * -2.0)


def _cos_sin(v32: Array) -> tuple[Array, Array]:
    """(cos θ, sin θ) of the angle encoded by V: octant from the top 3 bits, φ from the next 23."""
    o = v32 >> 29
    q = o >> 1
    h = (o & 1) == 1
    f = (v32 >> 6) & 0x7FFFFF
    f = where(h, 0x7FFFFF - f, f)
    phi = _to_f32((f << 1) + 1) * PHI_STEP
    p2 = phi * phi
    s = p2 * SIN_C9 + SIN_C7
    s = s * p2 + SIN_C5
    s = s * p2 + SIN_C3
    s = s * p2 + 1.0
    sin_p = phi * s
    c = p2 * COS_C10 + COS_C8
    c = c * p2 + COS_C6
    c = c * p2 + COS_C4
    c = c * p2 + COS_C2
    cos_p = c * p2 + 1.0
    sin_a = where(h, cos_p, sin_p)
    cos_a = where(h, sin_p, cos_p)
    odd = (q & 1) == 1
    cos_t = where(odd, sin_a, cos_a)
    sin_t = where(odd, cos_a, sin_a)
    cos_t = where((q == 1) | (q == 2), -cos_t, cos_t)
    sin_t = where(q >= 2, -sin_t, sin_t)
    return cos_t, sin_t


def box_muller(u32: Array, v32: Array) -> tuple[Array, Array]:
    """Two float32 normals (R cos θ, R sin θ) from two uint32 words."""
    r = _radius(u32)
    cos_t, sin_t = _cos_sin(v32)
    return r * cos_t, r * sin_t


def gaussian(seeds: Array, step: int, numel: int) -> Array:
    """Normals z[b, i] for i in [0, numel) of each sample, shape (len(seeds), numel), float32.

    seeds: int64 NumPy array or torch tensor (read as uint64 bits); the output is of the same
    library and on the same device.
    """
    if not 0 <= int(step) < 2**32:
        raise ValueError(f"step must be in [0, 2^32); got {step}")
    if numel < 0:
        raise ValueError(f"numel must be >= 0; got {numel}")
    groups = (numel + 3) // 4
    if _is_np(seeds):
        seeds = np.asarray(seeds, dtype=np.int64).reshape(-1, 1)
        g = np.arange(groups, dtype=np.int64).reshape(1, -1)
        zeros = np.zeros((1, groups), dtype=np.int64)
    else:
        torch = _torch()
        seeds = seeds.to(torch.int64).reshape(-1, 1)
        g = torch.arange(groups, dtype=torch.int64, device=seeds.device).reshape(1, -1)
        zeros = torch.zeros((1, groups), dtype=torch.int64, device=seeds.device)
    k0, k1 = seeds & MASK32, (seeds >> 32) & MASK32
    r0, r1, r2, r3 = philox4x32_10(g & MASK32, g >> 32, zeros + int(step), zeros, k0, k1)
    z0, z1 = box_muller(r0, r1)
    z2, z3 = box_muller(r2, r3)
    if _is_np(z0):
        z = np.stack([z0, z1, z2, z3], axis=-1)
    else:
        torch = _torch()
        z = torch.stack([z0, z1, z2, z3], dim=-1)
    return z.reshape(z.shape[0], 4 * groups)[:, :numel]
