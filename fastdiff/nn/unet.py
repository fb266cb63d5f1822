"""The DDPM U-Net (Ho et al. 2020): time embedding in every residual block, self-attention at chosen
resolutions, optional class conditioning with a null class for classifier-free guidance."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class UNetConfig:
    image_size: int = 32
    in_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    num_classes: int = 0  # 0: unconditional; else class ids 0..num_classes-1, and a null class

    def __post_init__(self) -> None:
        object.__setattr__(self, "ch_mult", tuple(self.ch_mult))
        object.__setattr__(self, "attn_resolutions", tuple(self.attn_resolutions))
        down = 2 ** (len(self.ch_mult) - 1)
        if self.image_size % down:
            raise ValueError(f"image_size {self.image_size} must be divisible by {down} (2 ** (len(ch_mult) - 1))")
        if self.ch % 32:
            raise ValueError(f"ch must be a multiple of 32 (GroupNorm groups); got {self.ch}")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images it was built for (and an export of it takes)."""
        return (self.in_channels, self.image_size, self.image_size)

    def check_image_shape(self, image_shape: tuple[int, ...]) -> None:
        """ValueError unless the U-Net takes images of this (C, H, W): its channels, sizes its levels can halve."""
        down = 2 ** (len(self.ch_mult) - 1)
        if len(image_shape) != 3 or image_shape[0] != self.in_channels or image_shape[1] % down or image_shape[2] % down:
            raise ValueError(f"image_shape must be ({self.in_channels}, H, W) with H and W multiples of {down} for "
                             f"this U-Net; got {tuple(image_shape)}")

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown U-Net config keys: {sorted(unknown)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, UNetConfig] = {
    # Small enough to train in minutes on a 2-core CPU; 16x16 upscaled digits.
    "digits": UNetConfig(image_size=16, in_channels=1, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1,
                         attn_resolutions=(), dropout=0.0),
    # The DDPM paper's CIFAR-10 network.
    "cifar-ddpm": UNetConfig(),
}


def preset(name: str, **overrides) -> UNetConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return UNetConfig.from_dict({**PRESETS[name].to_dict(), **overrides})


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps, as in the DDPM reference code."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / (half - 1))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], dim=1)


def norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, ch)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, temb: int, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.temb_proj = nn.Linear(temb, cout)
        self.norm2, self.dropout, self.conv2 = norm(cout), nn.Dropout(dropout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """bias: this block's time (and class) bias, temb_proj(silu(emb)), as [B or 1, cout, 1, 1]."""
        h = self.conv1(F.silu(self.norm1(x))) + bias
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Attention(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.norm, self.qkv, self.proj = norm(ch), nn.Conv2d(ch, 3 * ch, 1), nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).transpose(-1, -2).unbind(1)
        h = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.proj(h.transpose(-1, -2).reshape(B, C, H, W))


class Block(nn.Module):
    """A ResBlock, optionally followed by attention."""

    def __init__(self, cin: int, cout: int, temb: int, dropout: float, attn: bool):
        super().__init__()
        self.res = ResBlock(cin, cout, temb, dropout)
        self.attn = Attention(cout) if attn else nn.Identity()

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return self.attn(self.res(x, bias))


class UNet(nn.Module):
    """`eps_model(x, t, y=None)`: predicts ε, v or x0 for a batch of noisy images at timesteps t.
    y holds class ids; None, or ids < 0, select the null class (unconditional)."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = c = config
        temb = 4 * c.ch
        self.temb = nn.Sequential(nn.Linear(c.ch, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.class_emb = nn.Embedding(c.num_classes + 1, temb) if c.num_classes else None
        self.conv_in = nn.Conv2d(c.in_channels, c.ch, 3, padding=1)

        chans, res, cin = [c.ch], c.image_size, c.ch
        self.down = nn.ModuleList()
        for level, mult in enumerate(c.ch_mult):
            for _ in range(c.num_res_blocks):
                self.down.append(Block(cin, c.ch * mult, temb, c.dropout, res in c.attn_resolutions))
                cin = c.ch * mult
                chans.append(cin)
            if level != len(c.ch_mult) - 1:
                self.down.append(nn.Conv2d(cin, cin, 3, stride=2, padding=1))
                res //= 2
                chans.append(cin)
        self.mid = nn.ModuleList([Block(cin, cin, temb, c.dropout, True), Block(cin, cin, temb, c.dropout, False)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.ch_mult))):
            for _ in range(c.num_res_blocks + 1):
                self.up.append(Block(cin + chans.pop(), c.ch * mult, temb, c.dropout, res in c.attn_resolutions))
                cin = c.ch * mult
            if level != 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cin, cin, 3, padding=1)))
                res *= 2
        self.out = nn.Sequential(norm(cin), nn.SiLU(), nn.Conv2d(cin, c.in_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        return self.body(x, self.block_biases(self.embedding(t, y, x.dtype)))

    def embedding(self, t: torch.Tensor, y: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The time (+ class) embedding [B, 4 ch] of timesteps t [B] and class ids y (None or < 0: the null class)."""
        emb = self.temb(timestep_embedding(t, self.config.ch).to(dtype))
        if self.class_emb is not None:
            null = self.config.num_classes
            y = torch.full_like(t, null, dtype=torch.long) if y is None else torch.where(y < 0, null, y.long())
            emb = emb + self.class_emb(y)
        return emb

    def block_biases(self, emb: torch.Tensor) -> torch.Tensor:
        """Every residual block's bias temb_proj(silu(emb)), concatenated along dim 1: [B, sum of their widths].
        A function of (t, y) alone, so a sampler can compute it once per timestep (fastdiff.runtimes)."""
        act = F.silu(emb)
        return torch.cat([block.res.temb_proj(act) for block in self.blocks()], dim=1)

    def blocks(self) -> list[Block]:
        """The blocks in the order body() consumes their biases."""
        return [m for m in (*self.down, *self.mid, *self.up) if isinstance(m, Block)]

    def body(self, x: torch.Tensor, biases: torch.Tensor) -> torch.Tensor:
        """The network without its time path: x and block_biases(...) ([B or 1, sum of widths]) -> the prediction."""
        widths = [block.res.temb_proj.out_features for block in self.blocks()]
        bias = iter(biases[:, :, None, None].split(widths, dim=1))
        h = self.conv_in(x)
        skips = [h]
        for layer in self.down:
            h = layer(h, next(bias)) if isinstance(layer, Block) else layer(h)
            skips.append(h)
        for layer in self.mid:
            h = layer(h, next(bias))
        for layer in self.up:
            h = layer(torch.cat([h, skips.pop()], dim=1), next(bias)) if isinstance(layer, Block) else layer(h)
        return self.out(h)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
