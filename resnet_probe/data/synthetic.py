"""A built-in synthetic 10-class image set (32x32 RGB, uint8) for offline demos and fast tests.

Class k is a colour from a fixed palette (shared by classes 2j and 2j+1) overlaid with a
sinusoidal grating of a class-specific orientation (one of five angles) and frequency (coarse for
classes 0-4, fine for 5-9). Each image draws its own phase, contrast and colour jitter and gets
Gaussian pixel noise, so mean colour alone separates only pairs of classes: a network has to see
the texture to tell them all apart. Everything is a function of
``seed``: the same seed gives the same bytes on every machine.
"""
from __future__ import annotations

import math

import torch

from ._seeding import seeded_generator
from .source import DataSource

PALETTE = {  # RGB in [0, 1]; class k takes colour k // 2
    "red": (0.7, 0.3, 0.3), "yellow": (0.65, 0.65, 0.3), "green": (0.3, 0.65, 0.35),
    "blue": (0.3, 0.4, 0.7), "gray": (0.5, 0.5, 0.5),
}
ANGLES_DEG = (0, 36, 72, 108, 144)
FREQUENCIES = (2.0, 4.0)  # grating cycles per 32 pixels: coarse, fine
NOISE_STD = 0.08
COLOUR_JITTER = 0.1
_CHUNK = 4096


def synthetic_classes() -> tuple[str, ...]:
    """Class names, e.g. ``red/0deg/coarse``, in label order."""
    colours = list(PALETTE)
    return tuple(f"{colours[k // 2]}/{ANGLES_DEG[k % 5]}deg/{'coarse' if k < 5 else 'fine'}" for k in range(10))


def _render(labels: torch.Tensor, seed: int, split: str) -> torch.Tensor:
    n = len(labels)
    g = seeded_generator(seed, "synthetic", split, "params")
    phase = torch.rand(n, generator=g) * 2 * math.pi
    contrast = 0.15 + 0.15 * torch.rand(n, generator=g)
    jitter = (torch.rand(n, 3, generator=g) * 2 - 1) * COLOUR_JITTER
    palette = torch.tensor(list(PALETTE.values()))
    angle = torch.tensor(ANGLES_DEG, dtype=torch.float32).mul(math.pi / 180)[labels % 5]
    freq = torch.tensor(FREQUENCIES)[(labels >= 5).long()]
    coord = torch.arange(32, dtype=torch.float32)
    yy, xx = torch.meshgrid(coord, coord, indexing="ij")
    out = torch.empty((n, 3, 32, 32), dtype=torch.uint8)
    for c, start in enumerate(range(0, n, _CHUNK)):
        sl = slice(start, min(start + _CHUNK, n))
        u = xx * angle[sl].cos()[:, None, None] + yy * angle[sl].sin()[:, None, None]
        wave = torch.sin(2 * math.pi * freq[sl, None, None] * u / 32 + phase[sl, None, None])
        colour = palette[labels[sl] // 2] + jitter[sl]
        img = colour[:, :, None, None] + contrast[sl, None, None, None] * wave[:, None]
        noise = torch.randn(img.shape, generator=seeded_generator(seed, "synthetic", split, "noise", c))
        out[sl] = (img + NOISE_STD * noise).clamp_(0, 1).mul_(255).round_().to(torch.uint8)
    return out


def _balanced_labels(n: int, seed: int, split: str) -> torch.Tensor:
    labels = torch.arange(n, dtype=torch.int64) % 10
    return labels[torch.randperm(n, generator=seeded_generator(seed, "synthetic", split, "labels"))]


def make_synthetic(n_train: int = 50_000, n_test: int = 10_000, seed: int = 0) -> DataSource:
    """The synthetic 10-class set: balanced (class counts differ by at most one), deterministic in ``seed``.

    Args:
        n_train: training images (the CIFAR-10 size by default, so the 45k/5k split applies).
        n_test: test images.
        seed: determines every label and pixel.

    Returns:
        A ``DataSource`` of kind ``"synthetic"`` with ``synthetic=True``.
    """
    if n_train < 1 or n_test < 1:
        raise ValueError(f"n_train and n_test must be positive; got {n_train}, {n_test}")
    splits = {}
    for split, n in (("train", n_train), ("test", n_test)):
        labels = _balanced_labels(n, seed, split)
        splits[f"{split}_labels"] = labels
        splits[f"{split}_images"] = _render(labels, seed, split)
    return DataSource(
        name="synthetic", kind="synthetic", path=None, synthetic=True, classes=synthetic_classes(),
        description=(f"SYNTHETIC 10-class colour/grating images (seed {seed}), not CIFAR-10: "
                     "numbers measured on it say nothing about CIFAR-10"),
        details={"seed": seed}, **splits)
