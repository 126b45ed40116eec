"""Veit et al.'s sampled estimator: the gradient carried by single paths of a given length.

For a set ``A`` of ``k`` blocks, backpropagating through the branch (``J_F^T D``) at the blocks in
``A`` and through the shortcut only (``S^T D``) everywhere else follows exactly one of the
``2^n`` paths, of length ``k``; its gradient at the image is ``g_A``, and
``sum_{|A| = k} g_A = G[k]`` of the exact stack (``path_gradient_stack``). Veit, Wilber and
Belongie (2016, section 5) drew 1,000 sets per ``k`` and reported the mean magnitude ``||g_A||``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..lesion.context import evaluation
from ..lesion.sweeps import check_block_counts, joined_names
from ..models import anatomy
from ..models.wrappers import analysed_network
from .record import PathRecord, record_paths

if TYPE_CHECKING:
    from ..shards import Shard


def single_path_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor, branch_sets) -> torch.Tensor:
    """Gradient at the image of the single path through the branches of each given block set.

    Args:
        model: a residual, pre-activation or torchvision ResNet (evaluated in eval mode); a
            (Distributed)DataParallel wrapper is looked through.
        x: images ``(B, C, H, W)``.
        y: labels ``(B,)``.
        branch_sets: block sets (names, module paths or indices) whose branches the path uses.

    Returns:
        ``(S, B, C, H, W)``, one gradient per set.
    """
    model = analysed_network(model, "path gradients")
    anat = anatomy(model)
    use = np.zeros((len(branch_sets), len(anat.blocks)), dtype=bool)
    for row, s in zip(use, branch_sets):
        row[anat.resolve(s)] = True
    with evaluation(model):
        return paths_from_record(record_paths(model, x, y), use)


def paths_from_record(record: PathRecord, use: np.ndarray) -> torch.Tensor:
    """Single-path gradients at the image; ``use[s, i]``: path ``s`` goes through branch ``i``."""
    cot = record.top.unsqueeze(0).expand(len(use), *record.top.shape)
    for i in reversed(range(len(record.names))):
        gated = cot * record.masks[i]
        cot = None
        # which paths take the branch is known on the host: gather and scatter by index, no device sync
        for take, vjp in ((use[:, i], record.branch_vjp[i]), (~use[:, i], record.shortcut_vjp[i])):
            if not take.any():
                continue
            rows = torch.from_numpy(np.flatnonzero(take)).to(gated.device)
            part = vjp(gated.index_select(0, rows))
            if cot is None:
                cot = part.new_empty((len(use),) + part.shape[1:])
            cot.index_copy_(0, rows, part)
    return record.stem_vjp(cot).detach()


def sampled_path_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor, ks,
                           samples_per_k: int = 1000, seed: int = 0, sets_per_pass: int = 64,
                           batch_size: int | None = None, shard: "Shard | None" = None) -> pd.DataFrame:
    """Magnitude of the gradient of sampled single paths, ``samples_per_k`` paths per length ``k``.

    The magnitude of a path is ``||g_A||`` (L2 over the image) per example, averaged over the
    examples of ``x``.

    Args:
        model: a residual, pre-activation or torchvision ResNet (evaluated in eval mode); a
            (Distributed)DataParallel wrapper is looked through.
        x: images ``(B, C, H, W)``.
        y: labels ``(B,)``.
        ks: path lengths, each in ``0..n_blocks``.
        samples_per_k: sets ``A`` drawn uniformly per length (Veit et al. used 1,000).
        seed: seeds the draw.
        sets_per_pass: paths backpropagated together (bounds memory).
        batch_size: images recorded and backpropagated together (``None``: all of ``x`` at once).
        shard: evaluate only this rank's contiguous batches and gather every rank's per-example
            magnitudes in image order (``resnet_probe.shards``): one process's table, bit for bit.

    Returns:
        One row per sampled path: ``path_length``, ``sample``, ``branches`` (block names joined by
        ``+``) and ``magnitude``.
    """
    model = analysed_network(model, "path gradients")
    anat = anatomy(model)
    n = len(anat.blocks)
    check_block_counts(ks, n, "path lengths")
    if samples_per_k < 1 or sets_per_pass < 1:
        raise ValueError("samples_per_k and sets_per_pass must be positive")
    rng = np.random.default_rng(seed)
    use = np.zeros((len(ks) * samples_per_k, n), dtype=bool)
    lengths = np.repeat(np.asarray(ks, dtype=np.int64), samples_per_k)
    for row, k in zip(use, lengths):
        row[rng.choice(n, size=int(k), replace=False)] = True
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be positive; got {batch_size}")
    batches = [slice(b, b + (batch_size or len(x))) for b in range(0, len(x), batch_size or max(len(x), 1))]
    if shard is not None:
        batches = shard.units(batches)
    norms = []  # per batch of images: (paths, images) magnitudes
    with evaluation(model):
        for sl in batches:
            record = record_paths(model, x[sl], y[sl])
            norms.append(torch.cat([paths_from_record(record, use[start:start + sets_per_pass]).flatten(2)
                                    .norm(dim=-1).cpu() for start in range(0, len(use), sets_per_pass)]))
    per_example = torch.cat(norms, dim=1) if norms else torch.zeros(len(use), 0)
    if shard is not None:
        per_example = torch.from_numpy(shard.gather(per_example.numpy(), axis=1, what="path gradient magnitudes"))
    magnitude = [per_example[start:start + sets_per_pass].mean(dim=1).double()
                 for start in range(0, len(use), sets_per_pass)]
    return pd.DataFrame({
        "path_length": lengths,
        "sample": np.tile(np.arange(samples_per_k), len(ks)),
        "branches": [joined_names(anat, np.flatnonzero(row)) for row in use],
        "magnitude": torch.cat(magnitude).numpy(),
    })
