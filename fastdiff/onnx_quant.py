"""The INT8 recipe for exported fastdiff denoisers (onnxruntime.quantization), shared by `fastdiff quantize`
(fastdiff.export.quantize: calibration on q_sample(training images, t)) and the engine's `int8=True`
(fastdiff.runtimes: calibration on the fp32 model's own sampling trajectory). This module is torch-free; its
callers build the calibration batches (fastdiff.export.quantize loads them with fastdiff.data, which needs torch).

Why the first recipe (QDQ, S8 activations x S8 weights, Conv/MatMul/Gemm) was hardly faster than fp32
(measured in docs/performance.md): ORT's CPU EP fuses DQ -> Conv -> Q into its int8 QLinearConv / QGemm only
for some S8 activation patterns; on cifar-ddpm 17 of the 77 convs (conv_in, the stride-2 downsamples, every
skip 1x1) and all 24 timestep-embedding Gemms stayed float ops that dequantize their int8 WEIGHTS on every
call (DequantizeLinear alone took 12 % of the run), and the digits net is mostly such small ops. With U8
activations - what MLAS's int8 kernels take natively (VNNI vpdpbusd, AMX tdpbusd: u8 x s8) - every
quantized node fuses. On CPUs without VNNI, u8 x s8 pair sums can saturate int16 (vpmaddubsw), so there the
weights use 7 bits (reduce_range). GroupNorm and SiLU stay float; quantizing Add/Concat/Resize too was
slower or less accurate in our measurements.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from .files import atomic_write
from .onnx_format import KEY_PRECISION

KEY_QUANT = "fastdiff.quantization"
OP_TYPES = ("Conv", "MatMul", "Gemm")
METHODS = ("minmax", "entropy", "percentile")
ACTIVATIONS = ("auto", "u8", "s8")  # auto: u8 (7-bit weights on CPUs without VNNI)


def has_vnni() -> bool:
    """Whether this CPU has 8-bit dot products without saturation (AVX512-VNNI, AVX-VNNI or AMX-INT8)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})
    return False


def recipe_name(activations: str = "auto") -> str:
    """'u8' (VNNI CPUs), 'u8r' (u8 with 7-bit weights: CPUs without VNNI) or 's8' (see the module docstring)."""
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations must be one of {', '.join(ACTIVATIONS)}; got {activations!r}")
    if activations == "auto":
        return "u8" if has_vnni() else "u8r"
    return activations


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence onnxruntime.quantization's prints and warnings (they go to stdout and the root logger)."""
    root, level = logging.getLogger(), logging.getLogger().level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def batches(feed: dict[str, np.ndarray], batch: int = 32) -> list[dict[str, np.ndarray]]:
    """A dict of equally long input arrays cut into calibration batches."""
    n = len(feed["x"])
    return [{k: v[i:i + batch] for k, v in feed.items()} for i in range(0, n, batch)]


def quantize_int8(src: Path | str, out: Path | str, calibration: Iterable[dict[str, np.ndarray]] | None, *,
                  method: str = "minmax", activations: str = "auto", dynamic: bool = False,
                  info: dict | None = None, progress: bool = False) -> dict:
    """Quantize the fp32 fastdiff ONNX file src to out (atomically), keeping src's metadata; returns the
    recipe (also stored under the fastdiff.quantization metadata key, with `info` added).

    calibration: batches of model inputs {x, t[, y]} (static); None with dynamic=True (weights only,
    activation ranges at run time). progress: a tqdm bar over the calibration batches (on stderr)."""
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_dynamic, quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    if not dynamic and calibration is None:
        raise ValueError("calibration batches are needed for static quantization (or pass dynamic=True)")
    src, out = Path(src), Path(out)
    name = recipe_name(activations)
    source = onnx.load(str(src), load_external_data=False)
    ops = {n.op_type for n in source.graph.node} | {n.op_type for f in source.functions for n in f.node}
    if not ops & set(OP_TYPES):
        raise ValueError(f"{src}: the graph has no {'/'.join(OP_TYPES)} node, so there is nothing to quantize (a "
                         "fastdiff denoiser export has many)")

    class Reader(CalibrationDataReader):
        def __init__(self, feeds):
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    with tempfile.TemporaryDirectory() as tmp, quiet():
        pre, qpath = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        if dynamic:
            quantize_dynamic(str(pre), str(qpath), per_channel=True, weight_type=QuantType.QInt8,
                             op_types_to_quantize=list(OP_TYPES))
        else:
            from tqdm import tqdm

            feeds = tqdm(calibration, desc="calibration", unit="batch", disable=not progress, dynamic_ncols=True,
                         total=len(calibration) if hasattr(calibration, "__len__") else None)
            quantize_static(str(pre), str(qpath), Reader(feeds), quant_format=QuantFormat.QDQ, per_channel=True,
                            op_types_to_quantize=list(OP_TYPES), weight_type=QuantType.QInt8,
                            activation_type=QuantType.QInt8 if name == "s8" else QuantType.QUInt8,
                            reduce_range=name == "u8r",
                            calibrate_method={"minmax": CalibrationMethod.MinMax,
                                              "entropy": CalibrationMethod.Entropy,
                                              "percentile": CalibrationMethod.Percentile}[method],
                            calibration_providers=["CPUExecutionProvider"])
        model = onnx.load(str(qpath))
    recipe = {"method": "dynamic" if dynamic else method, "ops": list(OP_TYPES),
              "format": "dynamic (s8 weights)" if dynamic else
              f"QDQ, per-channel s8 weights ({'7' if name == 'u8r' else '8'}-bit), {name[:2]} activations",
              "recipe": name, **(info or {})}
    meta = {p.key: p.value for p in source.metadata_props}
    del model.metadata_props[:]
    for k, v in {**meta, KEY_PRECISION: "int8", KEY_QUANT: json.dumps(recipe)}.items():
        model.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(model)
    atomic_write(out, lambda tmp: onnx.save_model(model, tmp, save_as_external_data=False))
    return recipe
