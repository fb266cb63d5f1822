"""Negative log-likelihood in bits/dim from DDPM's variational bound (Ho et al. 2020, eq. 5).

In Ho's notation (data x_0, latents x_1 ... x_T, ᾱ_t = alphas_cumprod[t - 1]; the network is called with
fastdiff timestep t - 1):

    L = KL(q(x_T | x_0) || N(0, I))                                  prior
      + Σ_{t=2..T} KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))     one Gaussian KL per timestep
      - log p(x_0 | x_1)                                              discretised Gaussian decoder, 256 levels

p(x_{t-1} | x_t) has the posterior mean of the predicted x0 (not clamped) and the variance of
`variance_type` (fixed_small: the posterior variance β̃_t; fixed_large: β_t); the decoder uses variance β_1.
The data are quantised to 256 levels in [-1, 1] first (what a PNG of them holds). With `timesteps` < T - 1
the sum over t is estimated from that many timesteps: the k/4 smallest exactly, one drawn uniformly in each
equal stratum of the rest (unbiased).
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from .request import check_int
from .schedule import VARIANCE_TYPES, NoiseSchedule

LEVELS = 256


def quantise(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] to the centres of 256 levels (bin width 2/255)."""
    return ((x.clamp(-1, 1) + 1) * (LEVELS - 1) / 2).round() * 2 / (LEVELS - 1) - 1


def _normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def decoder_nll(x0: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """-log p(x0) per element for a Gaussian discretised to 256 bins on [-1, 1] (edge bins open)."""
    half = 1.0 / (LEVELS - 1)
    inv = torch.exp(-log_scale)
    upper = _std_normal_cdf((x0 - mean + half) * inv)
    lower = _std_normal_cdf((x0 - mean - half) * inv)
    prob = torch.where(x0 < -0.999, upper, torch.where(x0 > 0.999, 1 - lower, upper - lower))
    return -torch.log(prob.clamp(min=1e-12))


@torch.inference_mode()
def bits_per_dim(model: Callable, schedule: NoiseSchedule, images: torch.Tensor, *, y: torch.Tensor | None = None,
                 timesteps: int | None = None, variance_type: str = "fixed_small", batch_size: int = 512,
                 seed: int = 0, progress: bool = False) -> dict:
    """The variational bound of `images` (N, C, H, W) in [-1, 1] under `model`, in bits/dim:
    {'bits_per_dim', 'stderr' (standard error of the mean over the images), 'prior', 'decoder', 'timesteps'}. The noise of x_t comes from a torch generator seeded with `seed`."""
    if variance_type not in VARIANCE_TYPES:
        raise ValueError(f"variance_type must be one of {', '.join(VARIANCE_TYPES)}; got {variance_type!r}")
    T = schedule.num_train_timesteps
    k = T - 1 if timesteps is None else check_int("timesteps", timesteps, 1, T - 1)
    x0 = quantise(images.float())
    n, dims = len(x0), x0[0].numel()
    ac = np.concatenate([[1.0], schedule.alphas_cumprod])  # ac[t] = ᾱ_t in Ho's notation, ac[0] = 1
    betas = 1 - ac[1:] / ac[:-1]
    gen = torch.Generator().manual_seed(seed)

    def predict_x0(xt: torch.Tensor, t: int, yy) -> torch.Tensor:
        tt = torch.full((len(xt),), t - 1, dtype=torch.long, device=xt.device)
        m = model(xt, tt, yy).float()
        a, b, _, _ = schedule._x0_eps(ac[t])
        return a * xt + b * m

    def term(t: int) -> torch.Tensor:
        """KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) per image (nats), t in [2, T]."""
        out = []
        for s in range(0, n, batch_size):
            x, yy = x0[s:s + batch_size], None if y is None else y[s:s + batch_size]
            noise = torch.randn(x.shape, generator=gen)
            xt = math.sqrt(ac[t]) * x + math.sqrt(1 - ac[t]) * noise
            c1 = math.sqrt(ac[t - 1]) * betas[t - 1] / (1 - ac[t])
            c2 = math.sqrt(1 - betas[t - 1]) * (1 - ac[t - 1]) / (1 - ac[t])
            post_var = (1 - ac[t - 1]) / (1 - ac[t]) * betas[t - 1]
            model_var = post_var if variance_type == "fixed_small" else betas[t - 1]
            true_mean, model_mean = c1 * x + c2 * xt, c1 * predict_x0(xt, t, yy) + c2 * xt
            kl = _normal_kl(true_mean, torch.tensor(math.log(post_var)), model_mean, torch.tensor(math.log(model_var)))
            out.append(kl.flatten(1).sum(1))
        return torch.cat(out)

    # prior and decoder
    prior_mean, prior_var = math.sqrt(ac[T]) * x0, 1 - ac[T]
    prior = _normal_kl(prior_mean, torch.tensor(math.log(prior_var)), torch.zeros(()), torch.zeros(())).flatten(1).sum(1)
    decoder = []
    for s in range(0, n, batch_size):
        x, yy = x0[s:s + batch_size], None if y is None else y[s:s + batch_size]
        x1 = math.sqrt(ac[1]) * x + math.sqrt(1 - ac[1]) * torch.randn(x.shape, generator=gen)
        decoder.append(decoder_nll(x, predict_x0(x1, 1, yy), torch.tensor(0.5 * math.log(betas[0]))).flatten(1).sum(1))
    decoder = torch.cat(decoder)

    # Σ_{t=2..T}: all of them, or: the k // 4 smallest timesteps exactly (their terms are the largest and change
    # fastest), and one timestep drawn uniformly from each of the remaining equal strata of the rest
    exact = k // 4 if k < T - 1 else 0
    rest = np.arange(2 + exact, T + 1)
    strata = [np.array([t]) for t in range(2, 2 + exact)] + list(np.array_split(rest, k - exact))
    rng = np.random.default_rng(seed)
    picks = [int(rng.choice(st)) for st in strata]
    per_stratum = []
    for st, t in zip(tqdm(strata, desc="nll", disable=not progress, leave=False, dynamic_ncols=True), picks):
        per_stratum.append(term(t) * len(st))  # (n,) nats: the stratum's sum, estimated by one timestep
    middle = torch.stack(per_stratum)  # (k, n)
    total = prior + decoder + middle.sum(0)
    scale = 1.0 / (dims * math.log(2))
    stderr = float(total.std() * scale / math.sqrt(n)) if n > 1 else 0.0
    return {"bits_per_dim": float(total.mean() * scale), "stderr": stderr, "prior": float(prior.mean() * scale),
            "decoder": float(decoder.mean() * scale), "timesteps": k, "n": n, "variance_type": variance_type}
