"""Regenerate tests/golden_normals.json from the NumPy implementation of the noise contract.

    python tests/make_golden.py

The file pins z(seed, step, index) as float32 bit patterns; every implementation (NumPy, torch
reference, C++ and CUDA kernels) is tested against it bit for bit. Only regenerate it when the
contract itself changes on purpose.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fastdiff.noise import gaussian

SEEDS = [0, 1, 12345, 2**40 + 7, -1, -(2**63), 2**63 - 1, -987654321]
STEPS = [0, 1, 999, 2**32 - 1]
INDICES = [0, 1, 2, 3, 4, 5, 6, 7, 41, 1000, 12345, 2**14 + 3]
PATH = Path(__file__).with_name("golden_normals.json")


def make() -> dict:
    cases = []
    for seed in SEEDS:
        for step in STEPS:
            z = gaussian(np.array([seed], dtype=np.int64), step, max(INDICES) + 1)[0]
            for i in INDICES:
                bits = int(z[i:i + 1].view(np.uint32)[0])
                cases.append({"seed": seed, "step": step, "index": i, "bits": f"0x{bits:08x}", "value": float(z[i])})
    return {"contract": "fastdiff noise: Philox4x32-10 + float32 Box-Muller (docs/design.md §3)", "cases": cases}


if __name__ == "__main__":
    data = make()
    rows = ",\n  ".join(json.dumps(c) for c in data["cases"])
    PATH.write_text(f'{{"contract": {json.dumps(data["contract"])},\n "cases": [\n  {rows}\n ]}}\n')
    print(f"wrote {PATH}")
