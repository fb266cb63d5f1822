"""INT8 quantization of an exported fastdiff model with onnxruntime.quantization, plus a report.

Importing this module needs no torch (onnxruntime, NumPy), but `quantize` does: its calibration images come
from fastdiff.data and the paired measure from fastdiff.metrics, both torch. Only the quantized file's runtime
(fastdiff.export.runtime) and the recipe itself (fastdiff.onnx_quant.quantize_int8) are torch-free.

Static (default): the recipe of fastdiff.onnx_quant (QDQ, per-channel int8 weights, u8 activations - 7-bit
weights on CPUs without VNNI - Conv/MatMul/Gemm only; why: its docstring), calibrated on
x_t = q_sample(x0, t, ε) with x0 from the training data and t stratified over ALL timesteps, each
paired with its t (and class id), so the activation ranges cover every noise level (timestep-aware
calibration, Q-Diffusion, Li et al. 2023). Dynamic: weights only, activation ranges at run time.

The report (<out>.report.json / .md) gives the size ratio int8/fp32, ORT CPU latency of both at
batch 1 and 16, the error of int8 vs fp32 outputs per timestep band on held-out x_t, and the paired
image quality (`paired_quality`: the same seeds' DDIM-50 η = 0 images of both, PSNR and max abs diff).
"""
from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tqdm import tqdm

from ..files import atomic_write, write_json
from ..onnx_quant import KEY_QUANT, METHODS, OP_TYPES, batches, quantize_int8  # noqa: F401  (KEY_QUANT: re-export)
from .runtime import OnnxSampler

PAIRED_STEPS = 50  # paired quality: DDIM-50, η = 0


def _dataset(source: str, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray | None]:
    """Training images (N, C, H, W) float32 in [-1, 1] and labels (or None), via fastdiff.data."""
    from ..data import load_data  # torch: the calibration images are loaded by fastdiff.data

    try:
        data = load_data(source, shape[1], shape[0])
    except (ValueError, FileNotFoundError) as e:
        text = str(e)
        raise ValueError(text if text.startswith("--data") else f"--data {source!r}: {text}") from None
    if tuple(data.image_shape) != tuple(shape):
        raise ValueError(f"--data {source!r} gives images of shape {data.image_shape}; the model expects {shape}")
    labels = data.labels.numpy().astype(np.int64) if data.labels is not None else None
    return data.images.numpy().astype(np.float32), labels


def noisy_inputs(images: np.ndarray, labels: np.ndarray | None, idx: np.ndarray, t: np.ndarray,
                 alphas_cumprod: np.ndarray, num_classes: int, rng: np.random.Generator, null_share: float = 0.1
                 ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Model inputs {x, t[, y]} with x = q_sample(images[idx], t, ε), plus (x0, ε)."""
    x0 = images[idx]
    eps = rng.standard_normal(x0.shape).astype(np.float32)
    ac = alphas_cumprod[t].reshape(-1, 1, 1, 1)
    x = (np.sqrt(ac) * x0 + np.sqrt(1 - ac) * eps).astype(np.float32)
    feed = {"x": x, "t": t.astype(np.int64)}
    if num_classes:
        y = labels[idx] if labels is not None and labels.max() < num_classes else np.full(len(idx), -1, np.int64)
        feed["y"] = np.where(rng.random(len(idx)) < null_share, -1, y).astype(np.int64)  # the null class too
    return feed, x0, eps


def stratified_timesteps(n: int, T: int, rng: np.random.Generator) -> np.ndarray:
    """n timesteps, one from each of n equal strata of [0, T), in random order."""
    return rng.permutation(np.minimum(((np.arange(n) + rng.random(n)) * T / n).astype(np.int64), T - 1))


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def latency_ms(session: ort.InferenceSession, feed: dict[str, np.ndarray], warmup: int = 3, repeats: int = 20) -> float:
    """Median wall time of one call (ms) after warm-up."""
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def _target(pred_type: str, x0: np.ndarray, eps: np.ndarray, ac: np.ndarray) -> np.ndarray:
    if pred_type == "epsilon":
        return eps
    if pred_type == "sample":
        return x0
    ac = ac.reshape(-1, 1, 1, 1)
    return np.sqrt(ac) * eps - np.sqrt(1 - ac) * x0


def paired_quality(fp32: Path | str, int8: Path | str, n: int = 64, *, steps: int = PAIRED_STEPS, seed: int = 0,
                   batch_size: int = 64) -> dict:
    """The same seeds' DDIM-`steps` η = 0 images from the fp32 and the INT8 file: PSNR (dB, images in [-1, 1])
    and max abs difference (fastdiff.metrics.paired_fidelity, the measure `fastdiff eval` uses too)."""
    from ..metrics import paired_fidelity

    kw = dict(sampler="ddim", steps=steps, seed=seed, eta=0.0, batch_size=batch_size)
    ref = OnnxSampler(fp32, providers=["CPUExecutionProvider"]).sample(n, **kw)
    got = OnnxSampler(int8, providers=["CPUExecutionProvider"]).sample(n, **kw)
    return {"n": n, "sampler": f"ddim-{steps}", "eta": 0.0, "seed": seed, **paired_fidelity(got, ref)}


def quantize(onnx_path: Path | str, out: Path | str, *, method: str = "minmax", dynamic: bool = False,
             calib_size: int = 256, data: str = "digits", seed: int = 0, bands: int = 4, eval_per_band: int = 64,
             repeats: int = 20, paired_n: int = 16, activations: str = "auto", verbose: bool = True,
             progress: bool = False) -> dict:
    """Quantize onnx_path to out (INT8) and write <out>.report.json / .md; returns the report.
    paired_n: images of the paired quality measure (0: skip it); activations: fastdiff.onnx_quant.recipe_name;
    progress: progress bars over the calibration and the report's parts."""
    onnx_path, out = Path(onnx_path), Path(out)
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    for name, v, low in (("calib_size", calib_size, 1), ("bands", bands, 1), ("eval_per_band", eval_per_band, 1),
                         ("repeats", repeats, 1), ("paired_n", paired_n, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"{name} must be an integer >= {low}; got {v!r}")
    if out.resolve() == onnx_path.resolve():
        raise ValueError("out must differ from the input model")
    fp32 = OnnxSampler(onnx_path, providers=["CPUExecutionProvider"])  # validates the file and reads its metadata
    if fp32.precision != "fp32":
        raise ValueError(f"{onnx_path} is an {fp32.precision} export; quantize the fp32 export")
    T, shape, classes = fp32.num_train_timesteps, fp32.image_shape, fp32.num_classes
    ac = fp32.schedule.alphas_cumprod
    rng = np.random.default_rng(seed)
    images, labels = _dataset(data, shape)
    order = rng.permutation(len(images))
    n_eval = bands * eval_per_band
    n_cal = min(calib_size, max(1, len(images) // 2))  # evaluation images are held out from calibration
    calib_idx = np.resize(order[:n_cal], calib_size)
    eval_idx = np.resize(order[n_cal:] if len(images) > n_cal else order, n_eval)

    feeds = None
    if not dynamic:
        t = stratified_timesteps(calib_size, T, rng)
        feed, _, _ = noisy_inputs(images, labels, calib_idx, t, ac, classes, rng)
        feeds = batches(feed, 32)
    info = quantize_int8(onnx_path, out, feeds, method=method, dynamic=dynamic, activations=activations,
                         info={"calib_size": 0 if dynamic else calib_size, "data": data, "seed": seed},
                         progress=progress)
    int8 = OnnxSampler(out, providers=["CPUExecutionProvider"])

    report = {"fp32": str(onnx_path), "int8": str(out), **info, "onnxruntime": ort.__version__, "cpu_count": os.cpu_count(),
              "size_fp32_bytes": onnx_path.stat().st_size, "size_int8_bytes": out.stat().st_size}
    report["size_ratio"] = round(report["size_int8_bytes"] / report["size_fp32_bytes"], 4)
    parts = [("latency_ms", lambda: _latencies(onnx_path, out, shape, classes, T, repeats)),
             ("error_bands", lambda: _error_bands(fp32, int8, images, labels, eval_idx, bands, eval_per_band, rng))]
    if paired_n:
        parts.append(("paired", lambda: paired_quality(onnx_path, out, paired_n, seed=seed)))
    with tqdm(total=len(parts), desc="report", unit="part", disable=not progress, dynamic_ncols=True) as bar:
        for key, measure in parts:
            bar.set_postfix_str(key)
            report[key] = measure()
            bar.update()
    write_json(Path(f"{out}.report.json"), report)
    atomic_write(Path(f"{out}.report.md"), lambda tmp: Path(tmp).write_text(markdown(report)))
    if verbose:
        print(summary(report))
    return report


def _latencies(fp32: Path, int8: Path, shape: tuple, classes: int, T: int, repeats: int) -> dict:
    sessions = {"fp32": _session(fp32), "int8": _session(int8)}
    rng = np.random.default_rng(1)
    result = {}
    for batch in (1, 16):
        feed = {"x": rng.standard_normal((batch, *shape)).astype(np.float32),
                "t": rng.integers(0, T, batch).astype(np.int64)}
        if classes:
            feed["y"] = rng.integers(-1, classes, batch).astype(np.int64)
        ms = {k: latency_ms(s, feed, repeats=repeats) for k, s in sessions.items()}
        result[f"batch{batch}"] = {"fp32": round(ms["fp32"], 3), "int8": round(ms["int8"], 3),
                                   "speedup": round(ms["fp32"] / ms["int8"], 3)}
    return result


def _error_bands(fp32: OnnxSampler, int8: OnnxSampler, images, labels, idx, bands: int, per_band: int,
                 rng: np.random.Generator) -> list[dict]:
    T, sched = fp32.num_train_timesteps, fp32.schedule
    rows = []
    for k in range(bands):
        lo, hi = k * T // bands, (k + 1) * T // bands
        band_idx = idx[k * per_band:(k + 1) * per_band]
        t = rng.integers(lo, max(hi, lo + 1), len(band_idx))
        feed, x0, eps = noisy_inputs(images, labels, band_idx, t, sched.alphas_cumprod, fp32.num_classes, rng)
        a, b = fp32.predict(**feed), int8.predict(**feed)
        target = _target(sched.prediction_type, x0, eps, sched.alphas_cumprod[t])
        rows.append({"t_range": [lo, hi - 1], "samples": len(band_idx),
                     "rel_rmse": float(np.sqrt(np.mean((b - a) ** 2)) / max(np.sqrt(np.mean(a**2)), 1e-12)),
                     "max_abs": float(np.abs(b - a).max()),
                     "target_mse_fp32": float(np.mean((a - target) ** 2)),
                     "target_mse_int8": float(np.mean((b - target) ** 2))})
    return rows


def markdown(r: dict) -> str:
    lines = ["# INT8 quantization report", "", f"- fp32: `{r['fp32']}`", f"- int8: `{r['int8']}` ({r['format']})",
             f"- method: {r['method']}, calibration samples: {r['calib_size']} from `{r['data']}` (seed {r['seed']}), "
             f"onnxruntime {r['onnxruntime']}", "",
             f"Size: {r['size_fp32_bytes'] / 1e6:.3f} MB → {r['size_int8_bytes'] / 1e6:.3f} MB "
             f"(ratio {r['size_ratio']:.3f})", "", "| batch | fp32 ms | int8 ms | speed-up |", "|---|---|---|---|"]
    for k, v in r["latency_ms"].items():
        lines.append(f"| {k.removeprefix('batch')} | {v['fp32']:.2f} | {v['int8']:.2f} | {v['speedup']:.2f}× |")
    lines += ["", "Error of int8 vs fp32 model outputs on held-out x_t (target MSE: vs the training target):", "",
              "| t | rel. RMSE | max abs | target MSE fp32 | target MSE int8 |", "|---|---|---|---|---|"]
    for b in r["error_bands"]:
        lines.append(f"| {b['t_range'][0]}–{b['t_range'][1]} | {b['rel_rmse']:.4f} | {b['max_abs']:.4f} | "
                     f"{b['target_mse_fp32']:.4f} | {b['target_mse_int8']:.4f} |")
    if "paired" in r:
        p = r["paired"]
        lines += ["", f"Paired images ({p['n']} seeds, {p['sampler']} η = 0, int8 vs fp32): PSNR {p['psnr_db']:.1f} dB, "
                      f"max abs difference {p['max_abs_diff']:.3f} (images in [-1, 1])."]
    return "\n".join(lines) + "\n"


def summary(r: dict) -> str:
    lat = "; ".join(f"{k}: {v['fp32']:.2f} → {v['int8']:.2f} ms" for k, v in r["latency_ms"].items())
    err = ", ".join(f"{b['t_range'][0]}-{b['t_range'][1]}: {b['rel_rmse']:.3f}" for b in r["error_bands"])
    pair = (f"  paired {r['paired']['sampler']} images: PSNR {r['paired']['psnr_db']:.1f} dB, max abs diff "
            f"{r['paired']['max_abs_diff']:.3f}\n" if "paired" in r else "")
    return (f"int8 ({r['method']}) → {r['int8']}\n  size {r['size_int8_bytes'] / 1e6:.2f} MB, "
            f"{r['size_ratio']:.3f} of fp32\n  latency {lat}\n  rel. RMSE by t band {err}\n{pair}"
            f"  report: {r['int8']}.report.json / .md")
