"""Evaluation inputs for lesion sweeps: ``(x, y)`` tensors from tensors, datasets or loaders."""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Dataset, TensorDataset


def as_tensors(data, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and labels as two tensors.

    Args:
        data: an image tensor ``(N, C, H, W)`` (then ``y`` is required), a ``TensorDataset`` of
            ``(x, y)``, a map-style dataset of ``(x, y)`` pairs, or an iterable of ``(x, y)``
            batches such as a ``DataLoader``.
        y: integer labels ``(N,)`` when ``data`` is a tensor.

    Returns:
        ``(x, y)`` with ``x`` floating point and ``y`` int64.
    """
    if isinstance(data, torch.Tensor):
        if y is None:
            raise ValueError("labels y are required when the images are given as a tensor")
        x = data
    elif y is not None:
        raise ValueError("pass labels y only with an image tensor; datasets and loaders carry their own")
    elif isinstance(data, TensorDataset):
        if len(data.tensors) < 2:
            raise ValueError("the TensorDataset must hold (x, y)")
        x, y = data.tensors[0], data.tensors[1]
    elif isinstance(data, Dataset) and hasattr(data, "__len__"):
        pairs = [data[i] for i in range(len(data))]
        x = torch.stack([torch.as_tensor(p[0]) for p in pairs])
        y = torch.as_tensor([int(p[1]) for p in pairs])
    else:
        xs, ys = [], []
        for batch in data:
            xs.append(torch.as_tensor(batch[0]))
            ys.append(torch.as_tensor(batch[1]))
        if not xs:
            raise ValueError("the loader yielded no batches")
        x, y = torch.cat(xs), torch.cat(ys)
    y = torch.as_tensor(y)
    if not torch.is_floating_point(x):
        raise ValueError(f"images must be floating point (normalised as the model expects); got {x.dtype}")
    if y.dtype.is_floating_point or y.dim() != 1 or len(y) != len(x):
        raise ValueError(f"labels must be integers of shape ({len(x)},); got {tuple(y.shape)} {y.dtype}")
    if len(x) == 0:
        raise ValueError("no examples to evaluate")
    return x, y.long()


def example_chunks(n: int, batch_size: int) -> Iterator[slice]:
    """Consecutive slices of at most ``batch_size`` examples (a trailing single example joins the
    previous chunk, so no forward pass runs on a batch of one unless ``n == 1``).

    Per-example outputs of a forward pass do not depend on how the other examples are batched
    with them, except on CPU for batches of exactly one, which take another convolution kernel.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive; got {batch_size}")
    starts = list(range(0, n, batch_size))
    if len(starts) > 1 and n - starts[-1] == 1:
        starts.pop()
    for i, s in enumerate(starts):
        yield slice(s, starts[i + 1] if i + 1 < len(starts) else n)
