"""Deletion sweeps (Veit, Wilber, Belongie 2016): which blocks a trained network can lose.

Every sweep returns a tidy ``pandas.DataFrame`` with one row per deletion set: ``deleted`` (block
names joined by ``+``), ``k`` (set size), and the mean over examples of ``error`` (top-1),
``loss`` (cross-entropy) and ``kl`` (``KL(p_intact || p_lesioned)``), each with 95 % bootstrap
bounds ``*_lo`` / ``*_hi`` over the test examples. ``df.attrs`` holds the intact model's error
and loss. The model is evaluated in eval mode and its previous mode restored.

Extra keyword ``options`` of every sweep: ``max_batch``, ``confidence_level``, ``ci_method``,
``engine``, ``fold_bn``, ``shard`` (see ``SweepOptions``).
"""
from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..models import anatomy
from ..models.wrappers import analysed_network
from .engine import evaluate_deletion_sets
from .table import metrics_table, sweep_options


def joined_names(anat, idx) -> str:
    """The names of blocks ``idx``, joined by ``+`` (how tables name a set of blocks)."""
    return "+".join(anat.blocks[i].name for i in idx)


def _deletion_table(model, sets, meta, x, y, mode, seed, options, **attrs) -> pd.DataFrame:
    anat = anatomy(model)
    metrics = evaluate_deletion_sets(model, sets, x, y, mode=mode, batch_size=options.batch_size,
                                     max_batch=options.max_batch, engine=options.engine,
                                     fold_bn=options.fold_bn, shard=options.shard)
    for m, s in zip(meta, sets):
        m.setdefault("deleted", joined_names(anat, s))
        m.setdefault("k", len(s))
    return metrics_table(meta, metrics, options, seed, mode=mode, **attrs)


def _block_meta(block) -> dict:
    return {"block": block.name, "path": block.path, "stage": block.stage,
            "downsampling": block.downsampling}


def single_block_sweep(model: nn.Module, x, y: torch.Tensor | None = None, mode: str = "zero_branch",
                       batch_size: int = 256, n_resamples: int = 200, seed: int = 0,
                       **options) -> pd.DataFrame:
    """Delete each block on its own (Veit et al. 2016, Fig. 3).

    Args:
        model: a model that ``resnet_probe.models.anatomy`` supports; a (Distributed)DataParallel
            wrapper is looked through.
        x: images ``(N, C, H, W)`` (with labels ``y``), or a dataset / loader of ``(x, y)``.
        y: labels when ``x`` is a tensor.
        mode: ``zero_branch`` or ``shortcut_only``.
        batch_size: examples per chunk.
        n_resamples: bootstrap resamples per interval.
        seed: seeds the bootstrap.

    Returns:
        One row per block, in model order, with ``block``, ``path``, ``stage`` and
        ``downsampling`` beside the metric columns.
    """
    opts = sweep_options(batch_size=batch_size, n_resamples=n_resamples, **options)
    model = analysed_network(model, "lesion sweeps")
    anat = anatomy(model)
    sets = [[i] for i in range(len(anat.blocks))]
    meta = [_block_meta(b) for b in anat.blocks]
    return _deletion_table(model, sets, meta, x, y, mode, seed, opts)


def gate_closing_sweep(model: nn.Module, x, y: torch.Tensor | None = None, batch_size: int = 256,
                       n_resamples: int = 200, seed: int = 0, **options) -> pd.DataFrame:
    """Close each gated block's transform gate on its own (force it to carry, ``T = 0``).

    For a highway block, whose output is ``H(x) T(x) + S(x) (1 - T(x))``, a closed gate leaves
    ``S(x)``: the same output as deleting the block. Columns as ``single_block_sweep`` with
    ``gate_closed`` naming the block whose gate was closed.

    Raises:
        ValueError: the model has blocks without a gate (use ``single_block_sweep``).
    """
    model = analysed_network(model, "lesion sweeps")
    anat = anatomy(model)
    ungated = [b.name for b in anat.blocks if b.gate_module is None]
    if ungated:
        raise ValueError(f"gate_closing_sweep needs a gate in every block; {len(ungated)} blocks have "
                         f"none (e.g. {ungated[0]}); use single_block_sweep to delete them instead")
    opts = sweep_options(batch_size=batch_size, n_resamples=n_resamples, **options)
    sets = [[i] for i in range(len(anat.blocks))]
    meta = [{"gate_closed": b.name, **_block_meta(b)} for b in anat.blocks]
    return _deletion_table(model, sets, meta, x, y, "shortcut_only", seed, opts)


def k_random_sweep(model: nn.Module, x, y: torch.Tensor | None = None, ks=(1, 2, 3, 4, 5),
                   n_sets: int = 50, seed: int = 0, mode: str = "zero_branch", batch_size: int = 256,
                   n_resamples: int = 200, blocks=None, **options) -> pd.DataFrame:
    """Delete ``k`` blocks drawn at random, ``n_sets`` sets for each ``k`` (Veit et al. 2016, Fig. 5a).

    Args:
        ks: set sizes, each in ``0..len(blocks)``.
        n_sets: random sets per size (drawn uniformly, without repeating a block within a set).
        seed: seeds the sets and the bootstrap.
        blocks: the blocks sets are drawn from (names, paths or indices; ``None``: all blocks). Veit
            et al. drew from the blocks whose shortcut is an identity (``anatomy(model)`` blocks with
            ``downsampling`` false).
        (the others as in ``single_block_sweep``.)

    Returns:
        One row per set, with ``set`` numbering the sets of each ``k``.
    """
    opts = sweep_options(batch_size=batch_size, n_resamples=n_resamples, **options)
    model = analysed_network(model, "lesion sweeps")
    anat = anatomy(model)
    pool = np.arange(len(anat.blocks)) if blocks is None else np.asarray(anat.resolve(blocks))
    check_block_counts(ks, len(pool), "set sizes")
    rng = np.random.default_rng(seed)
    sets, meta = [], []
    for k in ks:
        for i in range(n_sets):
            sets.append(sorted(pool[rng.choice(len(pool), size=int(k), replace=False)].tolist()))
            meta.append({"set": i})
    return _deletion_table(model, sets, meta, x, y, mode, seed, opts)


def all_subsets_sweep(model: nn.Module, x, y: torch.Tensor | None = None, k: int = 2, cap: int = 2000,
                      seed: int = 0, mode: str = "zero_branch", batch_size: int = 256,
                      n_resamples: int = 200, **options) -> pd.DataFrame:
    """Delete every set of ``k`` blocks, or ``cap`` of them drawn at random when there are more.

    Args:
        k: set size.
        cap: most sets evaluated. When ``C(n, k) > cap`` a warning says so, the ``capped`` column
            is true and ``df.attrs["n_subsets"]`` gives how many sets exist.
        seed: seeds the sample of sets (when capped) and the bootstrap.

    Returns:
        One row per set, in lexicographic order of block indices.
    """
    opts = sweep_options(batch_size=batch_size, n_resamples=n_resamples, **options)
    model = analysed_network(model, "lesion sweeps")
    n = len(anatomy(model).blocks)
    check_block_counts([k], n, "set sizes")
    if cap < 1:
        raise ValueError(f"cap must be positive; got {cap}")
    total = math.comb(n, k)
    capped = total > cap
    if not capped:
        sets = [list(s) for s in itertools.combinations(range(n), k)]
    else:
        warnings.warn(f"all_subsets_sweep: {total} sets of {k} of {n} blocks exceed cap={cap}; "
                      f"evaluating {cap} sets drawn at random (seed {seed})", stacklevel=2)
        sets = _sample_subsets(n, k, cap, np.random.default_rng(seed))
    meta = [{"capped": capped} for _ in sets]
    return _deletion_table(model, sets, meta, x, y, mode, seed, opts, capped=capped, n_subsets=total)


def _sample_subsets(n: int, k: int, count: int, rng: np.random.Generator) -> list[list[int]]:
    """``count`` distinct k-subsets of ``range(n)``, uniformly at random, sorted."""
    total = math.comb(n, k)
    if total <= 4 * count:
        all_sets = list(itertools.combinations(range(n), k))
        picked = rng.choice(total, size=count, replace=False)
        return [list(all_sets[i]) for i in sorted(picked)]
    chosen: set[tuple[int, ...]] = set()
    while len(chosen) < count:
        chosen.add(tuple(sorted(rng.choice(n, size=k, replace=False).tolist())))
    return [list(s) for s in sorted(chosen)]


def check_block_counts(ks, n: int, what: str) -> None:
    """Raise ``ValueError`` unless every ``k`` in ``ks`` is an integer in ``0..n`` (``what`` names them)."""
    bad = [k for k in ks if not isinstance(k, (int, np.integer)) or not 0 <= k <= n]
    if bad:
        raise ValueError(f"{what} must be integers in 0..{n} (the number of blocks); got {bad}")
