"""The paper's train / validation split (He et al. 2016: 45k train, 5k val) and seeded subsets.

The JPEG pack is sorted by class, so every split and every size limit is taken from a seeded
permutation, never from the first N images.
"""
from __future__ import annotations

import torch

from ._seeding import seeded_generator


def train_val_split(n: int, val_size: int = 5000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint train / validation indices covering ``range(n)``.

    Args:
        n: number of training-set images (50,000 for CIFAR-10).
        val_size: images held out for validation (5,000 in the paper); 0 gives an empty val set.
        seed: seed of the permutation; the same ``(n, val_size, seed)`` always gives the same split.

    Returns:
        ``(train_idx, val_idx)``: int64 tensors of lengths ``n - val_size`` and ``val_size``, each in
        the order of the seeded permutation (so any prefix is a random, class-balanced-ish subset).
    """
    if n < 1:
        raise ValueError(f"n must be a positive number of images; got {n}")
    if not 0 <= val_size < n:
        raise ValueError(f"val_size must be in 0..{n - 1} for {n} images; got {val_size}")
    perm = torch.randperm(n, generator=seeded_generator(seed, "train_val_split", n))
    return perm[val_size:].clone(), perm[:val_size].clone()


def random_subset(n: int, limit: int | None, seed: int = 0, purpose: str = "subset") -> torch.Tensor:
    """``limit`` distinct indices of ``range(n)`` drawn by a seeded permutation (all of them, shuffled, if ``None``).

    Args:
        n: population size.
        limit: subset size, ``None`` or ``>= n`` for all.
        seed: seed of the permutation.
        purpose: label mixed into the seed so different subsets of one run are independent.

    Returns:
        int64 tensor of indices.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"a size limit must be a positive number of images (or None for all); got {limit}")
    perm = torch.randperm(n, generator=seeded_generator(seed, purpose, n))
    return perm if limit is None else perm[:limit].clone()
