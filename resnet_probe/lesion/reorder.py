"""Reordering sweep (Veit, Wilber, Belongie 2016, Fig. 5b): error against how shuffled the blocks are.

A variant swaps ``k`` random pairs of blocks, each pair drawn within one stage among its
non-downsampling blocks (they all map a tensor of one shape to the same shape). How far the result
is from the trained order is Kendall's tau between the two orders (1: unchanged).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from scipy import stats
from torch import nn

from ..models import anatomy
from ..models.anatomy import Anatomy
from ..models.wrappers import analysed_network
from .engine import evaluate_orders
from .sweeps import joined_names
from .table import metrics_table, sweep_options


def swappable_groups(anat: Anatomy) -> list[list[int]]:
    """Per stage, the indices of its non-downsampling blocks, for stages with at least two."""
    groups: dict[int, list[int]] = {}
    for i, b in enumerate(anat.blocks):
        if not b.downsampling:
            groups.setdefault(b.stage, []).append(i)
    return [g for g in groups.values() if len(g) >= 2]


def random_swaps(anat: Anatomy, k: int, rng: np.random.Generator) -> list[int]:
    """An order made by ``k`` random swaps of two blocks of one stage (stage drawn in proportion to
    its number of swappable pairs, so every pair is equally likely).

    Raises:
        ValueError: no stage has two non-downsampling blocks.
    """
    groups = swappable_groups(anat)
    if not groups:
        raise ValueError("no stage has two non-downsampling blocks to swap; reordering needs a deeper net")
    pairs = np.array([len(g) * (len(g) - 1) / 2 for g in groups])
    order = list(range(len(anat.blocks)))
    for _ in range(k):
        g = groups[rng.choice(len(groups), p=pairs / pairs.sum())]
        a, b = rng.choice(g, size=2, replace=False)
        order[a], order[b] = order[b], order[a]
    return order


def kendall_tau(order) -> float:
    """Kendall's tau between ``order`` and the trained order ``0..n-1``."""
    return float(stats.kendalltau(np.arange(len(order)), np.asarray(order)).statistic)


def reorder_sweep(model: nn.Module, x, y: torch.Tensor | None = None, k_swaps=(1, 2, 4, 8, 16),
                  n_sets: int = 20, seed: int = 0, batch_size: int = 256, n_resamples: int = 200,
                  **options) -> pd.DataFrame:
    """Error, loss and KL of the model with its blocks shuffled by ``k`` random within-stage swaps.

    Args:
        model: a model that ``resnet_probe.models.anatomy`` supports; a (Distributed)DataParallel
            wrapper is looked through.
        x: images ``(N, C, H, W)`` (with labels ``y``), or a dataset / loader of ``(x, y)``.
        y: labels when ``x`` is a tensor.
        k_swaps: numbers of swaps.
        n_sets: random orders per number of swaps.
        seed: seeds the swaps and the bootstrap.
        batch_size: examples per chunk.
        n_resamples: bootstrap resamples per interval.
        options: ``max_batch``, ``confidence_level``, ``ci_method``, ``engine``, ``fold_bn``, ``shard``.

    Returns:
        One row per order: ``k_swaps``, ``set``, ``order`` (block indices by position, space
        separated), ``moved`` (names of blocks away from their trained position, joined by ``+``),
        ``kendall_tau`` and the metric columns (see ``resnet_probe.lesion.sweeps``).
    """
    opts = sweep_options(batch_size=batch_size, n_resamples=n_resamples, **options)
    model = analysed_network(model, "reordering sweeps")
    anat = anatomy(model)
    bad = [k for k in k_swaps if not isinstance(k, (int, np.integer)) or k < 0]
    if bad:
        raise ValueError(f"k_swaps must be non-negative integers; got {bad}")
    rng = np.random.default_rng(seed)
    orders, meta = [], []
    for k in k_swaps:
        for i in range(n_sets):
            order = random_swaps(anat, int(k), rng)
            orders.append(order)
            meta.append({"k_swaps": int(k), "set": i, "order": " ".join(map(str, order)),
                         "moved": joined_names(anat, [b for pos, b in enumerate(order) if pos != b]),
                         "kendall_tau": kendall_tau(order)})
    metrics = evaluate_orders(model, orders, x, y, batch_size=opts.batch_size,
                              max_batch=opts.max_batch, engine=opts.engine, fold_bn=opts.fold_bn,
                              shard=opts.shard)
    return metrics_table(meta, metrics, opts, seed)
