"""Offline sample quality: FID / KID in the feature space of a small digits classifier shipped with the package.

The classifier (`DigitsNet`, made by scripts/train_classifier.py) sees 1x16x16 images in [-1, 1]; other sizes
are resized (bilinear, antialiased), RGB is averaged to grey. Its 64-wide penultimate layer is the feature
space, small enough that FID over a few hundred samples is meaningful. The floor to report beside an FID is
`real_floor()`: the same distance between real training and held-out test digits.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ASSETS = Path(__file__).parent / "assets"
CLASSIFIER = ASSETS / "digits_classifier.safetensors"
IMAGE_SIZE = 16
FEATURE_DIM = 64
NUM_CLASSES = 10


class DigitsNet(nn.Module):
    """conv16-conv32-pool-conv32-pool → 64 features → 10 logits (~48 k parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 4 * 4, FEATURE_DIM),
        )
        self.head = nn.Linear(FEATURE_DIM, NUM_CLASSES)
        # Set after training so real training digits have mean 0 and an average per-feature variance of 1.
        self.register_buffer("feature_mean", torch.zeros(FEATURE_DIM))
        self.register_buffer("feature_scale", torch.ones(1))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate layer (before its ReLU), centred and scaled, (N, 64)."""
        return (self.body(x) - self.feature_mean) / self.feature_scale

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor) -> None:
        """Set feature_mean / feature_scale from real images x."""
        f = self.body(x)
        self.feature_mean.copy_(f.mean(0))
        self.feature_scale.copy_(f.var(0).mean().sqrt())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.body(x)))


def prepare(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """(N, C, H, W) images in [-1, 1] (torch or numpy) → float32 (N, 1, 16, 16) on the CPU."""
    from .data import resize

    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"images must be (N, C, H, W) with C = 1 or 3; got shape {tuple(x.shape)}")
    x = x.detach().float().cpu()
    if not torch.isfinite(x).all():
        raise ValueError("images hold NaN or inf")
    if x.shape[1] == 3:
        x = x.mean(1, keepdim=True)
    return resize(x.clamp(-1, 1), IMAGE_SIZE)


@lru_cache(maxsize=4)
def load_classifier(path: str | Path = CLASSIFIER) -> DigitsNet:
    """The shipped classifier (safetensors only, no pickle), in eval mode."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"classifier weights {path} not found; make them with scripts/train_classifier.py")
    net = DigitsNet()
    try:
        net.load_state_dict(load_file(str(path)))
    except Exception as e:  # noqa: BLE001 - a corrupt or foreign file
        raise ValueError(f"{path}: not readable DigitsNet weights ({e})") from None
    return net.eval().requires_grad_(False)


@torch.inference_mode()
def _run(images: torch.Tensor | np.ndarray, fn: str, batch_size: int = 512) -> torch.Tensor:
    x, net = prepare(images), load_classifier()
    return torch.cat([getattr(net, fn)(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def features(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """Classifier features, float64 (N, 64)."""
    return _run(images, "features").double().numpy()


def probabilities(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """Softmax class probabilities, (N, 10)."""
    return _run(images, "forward").softmax(-1).double().numpy()


def frechet_distance(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """|mu1 - mu2|² + tr(s1 + s2 - 2 (s1 s2)^½) for Gaussians N(mu1, s1), N(mu2, s2)."""
    import warnings

    from scipy import linalg

    with warnings.catch_warnings():  # a singular product (few samples) is handled just below
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():  # singular product: nudge the diagonals (as pytorch-fid does)
        offset = np.eye(len(s1)) * 1e-6
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        if np.abs(covmean.imag).max() > 1e-3 * max(1.0, np.abs(covmean.real).max()):
            raise ValueError(f"sqrtm gave a large imaginary component ({np.abs(covmean.imag).max():.3g})")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean), 0.0))


def _check(feats_a: np.ndarray, feats_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"features must be (N, D) arrays of one width; got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"need at least 2 samples in each set; got {len(a)} and {len(b)}")
    return a, b


def fid(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets."""
    a, b = _check(feats_a, feats_b)
    return frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def kid(feats_a: np.ndarray, feats_b: np.ndarray, subsets: int = 100, subset_size: int | None = None,
        seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance: unbiased MMD² with k(x, y) = (x·y / d + 1)³, averaged over random subsets
    of min(subset_size, len a, len b) samples (default: half the smaller set, at most 1000, so that the
    subsets differ and the std means something); returns (mean, std)."""
    a, b = _check(feats_a, feats_b)
    if subsets < 1 or (subset_size is not None and subset_size < 2):
        raise ValueError(f"need subsets >= 1 and subset_size >= 2; got {subsets}, {subset_size}")
    small = min(len(a), len(b))
    m, d = min(subset_size or max(small // 2, 2), small, 1000 if subset_size is None else small), a.shape[1]
    rng = np.random.default_rng(seed)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)  # torch (float64): honours torch's thread setting
    out = np.empty(subsets)
    for i in range(subsets):
        x, y = ta[rng.choice(len(a), m, replace=False)], tb[rng.choice(len(b), m, replace=False)]
        kxx, kyy, kxy = ((x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3)
        off = (kxx.sum() - kxx.trace() + kyy.sum() - kyy.trace()) / (m * (m - 1))
        out[i] = float(off - 2 * kxy.mean())
    return float(out.mean()), float(out.std())


@lru_cache(maxsize=2)
def real_features(split: str) -> np.ndarray:
    """Features of the bundled digits split ('train' or 'test'), cached."""
    from .data import load_digits

    return features(load_digits(IMAGE_SIZE, split).images)


def real_floor(n: int | None = None, seed: int = 0) -> dict:
    """FID / KID between real digits: n (default all 1500) train images vs the 297 held-out test images —
    the best a generator can be expected to score with n samples."""
    train, test = real_features("train"), real_features("test")
    if n is not None:
        if n < 2:
            raise ValueError(f"n must be >= 2; got {n}")
        train = train[np.random.default_rng(seed).permutation(len(train))[:n]]
    k_mean, k_std = kid(train, test)
    lo, hi = fid_interval(train, test, seed=seed)
    return {"n": len(train), "fid": fid(train, test), "fid_ci95": [lo, hi], "kid_mean": k_mean, "kid_std": k_std}


def classifier_accuracy() -> float:
    """Accuracy of the shipped classifier on the held-out test split."""
    from .data import load_digits

    data = load_digits(IMAGE_SIZE, "test")
    return float((probabilities(data.images).argmax(1) == data.labels.numpy()).mean())


def confident_fraction(images: torch.Tensor | np.ndarray, threshold: float = 0.8) -> float:
    """Share of images the classifier assigns a class with max softmax >= threshold."""
    return float((probabilities(images).max(1) >= threshold).mean())


def fid_interval(feats_a: np.ndarray, feats_b: np.ndarray, rounds: int = 200, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Bootstrap confidence interval of fid(a, b): both sets resampled with replacement `rounds` times; the
    percentiles are shifted by the bootstrap's bias (resampling duplicates samples, which inflates FID), so
    the interval is centred on the estimate's own sampling spread."""
    a, b = _check(feats_a, feats_b)
    rng = np.random.default_rng(seed)
    values = [fid(a[rng.integers(len(a), size=len(a))], b[rng.integers(len(b), size=len(b))]) for _ in range(rounds)]
    bias = float(np.mean(values)) - fid(a, b)
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2]) - bias
    return max(float(lo), 0.0), float(hi)


def inception_score(probs: np.ndarray, eps: float = 1e-12) -> float:
    """exp E_x KL(p(y|x) || p(y)) in the shipped classifier (1 ... 10 for 10 classes): high when each image is
    one clear digit and the digits are balanced — the Inception Score with the digits classifier."""
    p = np.asarray(probs, np.float64)
    marginal = p.mean(0, keepdims=True)
    return float(np.exp((p * (np.log(p + eps) - np.log(marginal + eps))).sum(1).mean()))


def paired_fidelity(images: torch.Tensor | np.ndarray, reference: torch.Tensor | np.ndarray) -> dict:
    """Same seeds, two paths: PSNR (dB, peak-to-peak 2 for images in [-1, 1]) and the max abs difference."""
    a = np.asarray(images, np.float64)
    b = np.asarray(reference, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired images must have one shape; got {a.shape} and {b.shape}")
    mse = float(((a - b) ** 2).mean())
    return {"psnr_db": float("inf") if mse == 0 else float(10 * np.log10(4.0 / mse)),
            "max_abs_diff": float(np.abs(a - b).max())}


def evaluate(images: torch.Tensor | np.ndarray, threshold: float = 0.8, ci_rounds: int = 200) -> dict:
    """FID (with a bootstrap 95 % interval) and KID against the held-out test digits, the Inception-Score
    analog, the confident fraction and the class histogram."""
    probs = probabilities(images)
    feats, ref = features(images), real_features("test")
    k_mean, k_std = kid(feats, ref)
    lo, hi = fid_interval(feats, ref, rounds=ci_rounds)
    return {"n": len(feats), "fid": fid(feats, ref), "fid_ci95": [lo, hi], "kid_mean": k_mean, "kid_std": k_std,
            "inception_score": inception_score(probs), "confident": float((probs.max(1) >= threshold).mean()),
            "class_histogram": np.bincount(probs.argmax(1), minlength=NUM_CLASSES).tolist()}
