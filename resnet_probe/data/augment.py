"""Batched CIFAR augmentation and normalisation, pure torch, on whatever device the images live.

He et al. 2016 (section 4.2): "4 pixels are padded on each side, and a 32x32 crop is randomly
sampled from the padded image or its horizontal flip", drawn independently for every image.
``random_crop_flip`` does that for a whole uint8 batch with one gather (no Python loop over
images), so on a GPU it runs where the data already is.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
PADDING = 4


def crop_flip_params(n: int, generator: torch.Generator | None = None, padding: int = PADDING,
                     device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image crop offsets and flip flags for ``n`` images.

    Args:
        n: number of images.
        generator: random source (its device decides where the draws happen); ``None`` uses
            torch's global generator.
        padding: zero padding on each side; offsets are drawn uniformly from ``0..2*padding``.
        device: where the returned tensors live (default: the generator's device).

    Returns:
        ``(dy, dx, flip)``: int64 row and column offsets into the padded image and a bool flag
        per image (``True`` = mirror left-right), each of shape ``(n,)``.
    """
    gen_device = generator.device if generator is not None else torch.device("cpu")
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=gen_device)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=gen_device)
    flip = torch.randint(0, 2, (n,), generator=generator, device=gen_device).bool()
    if device is not None:
        dy, dx, flip = (t.to(device, non_blocking=True) for t in (dy, dx, flip))
    return dy, dx, flip


def crop_flip(images: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor,
              padding: int = PADDING) -> torch.Tensor:
    """Crop window ``[dy:dy+H, dx:dx+W]`` of each zero-padded image, mirrored where ``flip``.

    Args:
        images: ``(N, C, H, W)`` tensor (any dtype, any device).
        dy, dx: ``(N,)`` integer offsets into the padded image, in ``0..2*padding``.
        flip: ``(N,)`` bool, mirror the crop left-right.
        padding: zero padding added on each side before cropping.

    Returns:
        ``(N, C, H, W)`` tensor of the same dtype and device.
    """
    n, c, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    dev = images.device
    rows = dy.to(dev)[:, None] + torch.arange(h, device=dev)                               # (N, H)
    cols = torch.arange(w, device=dev).expand(n, w)
    cols = torch.where(flip.to(dev)[:, None], cols.flip(1), cols) + dx.to(dev)[:, None]     # (N, W)
    # two gathers (rows, then columns) instead of one four-index advanced-indexing gather
    picked_rows = torch.gather(padded, 2, rows[:, None, :, None].expand(n, c, h, w + 2 * padding))
    return torch.gather(picked_rows, 3, cols[:, None, None, :].expand(n, c, h, w))


def random_crop_flip(images: torch.Tensor, generator: torch.Generator | None = None,
                     padding: int = PADDING) -> torch.Tensor:
    """Pad-``padding`` random crop + random horizontal flip, independently per image.

    Args:
        images: ``(N, C, H, W)`` batch, typically uint8, on any device.
        generator: random source; a CPU generator works for images on any device (the few
            per-image draws are moved over), a CUDA generator keeps the draws on the GPU.
        padding: zero padding on each side (4 in the paper).

    Returns:
        The augmented batch, same shape, dtype and device.
    """
    dy, dx, flip = crop_flip_params(len(images), generator, padding, device=images.device)
    return crop_flip(images, dy, dx, flip, padding)


_STATS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _scale_shift(device: torch.device, dtype: torch.dtype, mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    key = (str(device), dtype, tuple(mean), tuple(std))
    if key not in _STATS:
        m = torch.tensor(mean, dtype=torch.float64)
        s = torch.tensor(std, dtype=torch.float64)
        scale = (1.0 / (255.0 * s)).to(device=device, dtype=dtype).view(1, -1, 1, 1)
        shift = (-m / s).to(device=device, dtype=dtype).view(1, -1, 1, 1)
        _STATS[key] = (scale, shift)
    return _STATS[key]


def normalize(images: torch.Tensor, mean: tuple[float, ...] = CIFAR_MEAN, std: tuple[float, ...] = CIFAR_STD,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(x / 255 - mean) / std`` per channel, computed on the images' device.

    Args:
        images: ``(N, C, H, W)`` uint8 batch.
        mean, std: per-channel statistics of ``x / 255`` (CIFAR-10 training set by default).
        dtype: floating dtype of the result.

    Returns:
        The normalised batch as ``dtype``.
    """
    if images.dim() != 4 or images.shape[1] != len(mean):
        raise ValueError(f"normalize expects (N, {len(mean)}, H, W) images; got shape {tuple(images.shape)}")
    scale, shift = _scale_shift(images.device, dtype, mean, std)
    return torch.addcmul(shift, images.to(dtype), scale)
