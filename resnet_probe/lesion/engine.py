"""Evaluate many lesioned or reordered variants of one model in batched forward passes.

A *variant* says, for every position ``j`` of the block sequence, which block runs there
(``order[j]``) and whether it runs deleted (``deleted[j]``: its output is
``BlockAnatomy.lesioned(input, mode)``). The batched engine

1. runs the intact model once per chunk of examples and keeps every block's input (the prefix
   cache), so a variant that first differs from the intact model at position ``j`` restarts from
   the cached input of block ``j``: nothing before it is recomputed;
2. stacks the variants that are running into one batch (the examples replicated once per variant,
   at most ``max_batch`` rows at a time) and at every position applies, per sample, the full block
   or its lesioned output (``torch.where(deleted, lesioned, full)``, computing each only on the
   rows that need it).

The per-example logits equal those of evaluating each variant on its own under the ``lesion`` /
``reordered`` context managers (the ``engine="loop"`` path) up to float rounding: the batches have
other sizes, and a convolution kernel may add its products in another order at another batch size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..models import anatomy
from ..models.anatomy import Anatomy, check_lesion_mode
from ..models.fold import fold_batchnorm
from ..models.wrappers import analysed_network
from .context import check_order, evaluation, lesion, reordered
from .inputs import as_tensors, example_chunks

if TYPE_CHECKING:
    from ..shards import Shard

ENGINES = ("batched", "loop")
# Rows (examples x variants) per batched pass. A GPU wants wide passes; on a CPU, passes whose
# activations outgrow the cache are slower than the loop (ResNet-110, 64 images, single-block
# sweep on 2 idle cores: 7.7 s at 256 rows, 16.0 s at 2,048, the loop 14.6 s).
DEFAULT_MAX_BATCH = {"cuda": 4096, "cpu": 256}


def default_max_batch(device: torch.device) -> int:
    """Rows per batched pass on ``device`` (``DEFAULT_MAX_BATCH``; other devices as a CPU)."""
    return DEFAULT_MAX_BATCH.get(device.type, DEFAULT_MAX_BATCH["cpu"])


@dataclass(frozen=True)
class SetMetrics:
    """Per-example metrics of ``S`` variants of a model over ``N`` examples.

    Attributes:
        error: ``(S, N)``, 1 where the variant's top-1 prediction is wrong.
        loss: ``(S, N)``, cross-entropy of the variant's logits.
        kl: ``(S, N)``, ``KL(p_intact || p_variant)`` of the softmax outputs (nats).
        intact_error: ``(N,)``, the intact model's top-1 error.
        intact_loss: ``(N,)``, the intact model's cross-entropy.
        logits: ``(S, N, classes)`` when requested, else ``None``.
    """

    error: np.ndarray
    loss: np.ndarray
    kl: np.ndarray
    intact_error: np.ndarray
    intact_loss: np.ndarray
    logits: torch.Tensor | None = None


def evaluate_deletion_sets(model: nn.Module, deletion_sets, data, y: torch.Tensor | None = None, *,
                           mode: str = "zero_branch", batch_size: int = 256, max_batch: int | None = None,
                           engine: str = "batched", fold_bn: bool = False,
                           return_logits: bool = False, shard: "Shard | None" = None) -> SetMetrics:
    """Per-example error, loss and KL of the model with each set of blocks deleted.

    Args:
        model: a model that ``resnet_probe.models.anatomy`` supports (a (Distributed)DataParallel
            wrapper is looked through); evaluated in eval mode (its previous mode is restored).
        deletion_sets: sequence of block sets (names, module paths or indices); ``[]`` is intact.
        data: images ``(N, C, H, W)`` with labels ``y``, or a dataset / loader of ``(x, y)``.
        y: labels when ``data`` is a tensor.
        mode: ``zero_branch`` or ``shortcut_only``.
        batch_size: examples per chunk.
        max_batch: most rows (examples x variants) in one batched forward pass; ``None`` = by
            device (``DEFAULT_MAX_BATCH``).
        engine: ``batched`` (prefix cache + per-sample gates) or ``loop`` (one ``lesion`` context
            per set, the reference path).
        fold_bn: evaluate a copy with BatchNorm folded into the convolutions
            (``models.fold.fold_batchnorm``): fewer passes over the activations; the same logits up
            to float rounding.
        return_logits: keep every variant's logits in the result.
        shard: evaluate only this rank's contiguous chunks of ``batch_size`` images and gather every
            rank's per-example values in image order (``resnet_probe.shards``): the same ``SetMetrics``
            as one process, bit for bit. ``None``: one process.

    Returns:
        ``SetMetrics`` with one row per deletion set, in the given order.
    """
    check_lesion_mode(mode)
    model = analysed_network(model, "lesion sweeps")
    anat = anatomy(model)
    n = len(anat.blocks)
    sets = [anat.resolve(s) for s in deletion_sets]
    deleted = np.zeros((len(sets), n), dtype=bool)
    for row, idx in zip(deleted, sets):
        row[idx] = True
    order = np.tile(np.arange(n), (len(sets), 1))
    return _evaluate(model, anat, order, deleted, data, y, mode, batch_size, max_batch, engine, fold_bn,
                     return_logits, shard)


def evaluate_orders(model: nn.Module, orders, data, y: torch.Tensor | None = None, *,
                    batch_size: int = 256, max_batch: int | None = None, engine: str = "batched",
                    fold_bn: bool = False, return_logits: bool = False, shard: "Shard | None" = None) -> SetMetrics:
    """Per-example error, loss and KL of the model with its blocks run in each given order.

    Args:
        orders: sequence of orders; ``order[j]`` is the block index run at position ``j`` (only
            non-downsampling blocks move, within their stage; see ``reordered``).
        (the others as in ``evaluate_deletion_sets``; ``engine="loop"`` uses ``reordered``.)

    Returns:
        ``SetMetrics`` with one row per order.
    """
    model = analysed_network(model, "reordering sweeps")
    anat = anatomy(model)
    order = np.array([check_order(anat, o) for o in orders], dtype=np.int64).reshape(-1, len(anat.blocks))
    deleted = np.zeros(order.shape, dtype=bool)
    return _evaluate(model, anat, order, deleted, data, y, "zero_branch", batch_size, max_batch, engine,
                     fold_bn, return_logits, shard)


def _evaluate(model, anat, order, deleted, data, y, mode, batch_size, max_batch, engine, fold_bn,
              return_logits, shard=None) -> SetMetrics:
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; valid engines: {', '.join(ENGINES)}")
    if fold_bn:  # the folded copy has the same blocks, in the same order, under the same names
        model = fold_batchnorm(model)
        anat = anatomy(model)
    x, y = as_tensors(data, y)
    device = next(model.parameters()).device
    if max_batch is None:
        max_batch = default_max_batch(device)
    if max_batch < 1:
        raise ValueError(f"max_batch must be positive; got {max_batch}")
    chunks = list(example_chunks(len(x), batch_size))
    if shard is not None and shard.world_size == 1:
        shard = None
    if shard is not None:  # this rank's contiguous chunks: the forward passes one process runs on them
        chunks = shard.units(chunks)
    parts = {k: [] for k in ("error", "loss", "kl", "intact_error", "intact_loss", "logits")}
    with evaluation(model), torch.no_grad():
        for sl in chunks:
            xb, yb = x[sl].to(device), y[sl].to(device)
            if engine == "batched":
                intact, logits = batched_logits(anat, xb, order, deleted, mode, max_batch)
            else:
                intact, logits = _loop_logits(model, anat, xb, order, deleted, mode)
            for k, v in _metrics(logits, intact, yb).items():
                parts[k].append(v.cpu())
            if return_logits:
                parts["logits"].append(logits.cpu())
    if shard is not None:
        return _gathered(parts, shard, len(order), return_logits)
    cat = {k: torch.cat(v, dim=-1 if k != "logits" else 1) for k, v in parts.items() if v}
    return SetMetrics(error=cat["error"].numpy(), loss=cat["loss"].numpy(), kl=cat["kl"].numpy(),
                      intact_error=cat["intact_error"].numpy(), intact_loss=cat["intact_loss"].numpy(),
                      logits=cat.get("logits"))


def _gathered(parts: dict, shard: "Shard", n_sets: int, return_logits: bool) -> SetMetrics:
    """One rank's per-example metrics gathered from every rank, in image order (a rank without images
    contributes empty arrays)."""
    local = {}
    for k in ("error", "loss", "kl", "intact_error", "intact_loss"):
        empty = np.zeros((n_sets, 0) if k in ("error", "loss", "kl") else (0,))
        local[k] = torch.cat(parts[k], dim=-1).numpy() if parts[k] else empty
    if return_logits:
        local["logits"] = torch.cat(parts["logits"], dim=1).numpy() if parts["logits"] else None
    everything = shard.gather_objects(local, "per-example lesion metrics")
    out = {k: np.concatenate([r[k] for r in everything], axis=-1) for k in local if k != "logits"}
    if return_logits:
        out["logits"] = torch.from_numpy(np.concatenate([r["logits"] for r in everything
                                                         if r["logits"] is not None], axis=1))
    return SetMetrics(**out)


def _metrics(logits: torch.Tensor, intact: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-example error, cross-entropy and KL(intact || variant), in float64."""
    logq = F.log_softmax(logits.double(), dim=-1)
    logp = F.log_softmax(intact.double(), dim=-1)
    target = y.expand(logits.shape[:-1]).unsqueeze(-1)
    return {
        "error": (logits.argmax(-1) != y).double(),
        "loss": -logq.gather(-1, target).squeeze(-1),
        "kl": (logp.exp() * (logp - logq)).sum(-1),
        "intact_error": (intact.argmax(-1) != y).double(),
        "intact_loss": -logp.gather(-1, y.unsqueeze(-1)).squeeze(-1),
    }


def batched_logits(anat: Anatomy, x: torch.Tensor, order: np.ndarray, deleted: np.ndarray,
                   mode: str = "zero_branch", max_batch: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of the intact model ``(B, classes)`` and of every variant ``(S, B, classes)``.

    Args:
        anat: the model's anatomy (call under ``torch.no_grad()`` and eval mode).
        x: one batch of examples.
        order: ``(S, n)`` block index run at each position.
        deleted: ``(S, n)`` whether the block at each position runs deleted.
        mode: lesion mode of deleted blocks.
        max_batch: most rows (examples x variants) in one forward pass.
    """
    n = len(anat.blocks)
    changed = (order != np.arange(n)) | deleted
    first = np.where(changed.any(1), changed.argmax(1), n)
    h = anat.stem(x)
    inputs = [h]
    for b in anat.blocks:
        h = b.module(h)
        inputs.append(h)
    intact = anat.head(h)
    logits = intact.new_empty((len(order),) + intact.shape)
    logits[torch.from_numpy(first == n)] = intact
    todo = np.flatnonzero(first < n)
    todo = todo[np.argsort(first[todo], kind="stable")]
    per_pass = max(1, max_batch // len(x))
    for start in range(0, len(todo), per_pass):
        ids = todo[start:start + per_pass]
        logits[torch.from_numpy(ids)] = _run_variants(anat, inputs, order[ids], deleted[ids], first[ids], mode)
    return intact, logits


def _run_variants(anat, inputs, order, deleted, first, mode) -> torch.Tensor:
    """Logits ``(V, B, classes)`` of variants that each restart from the cached input of their
    first changed position."""
    B = inputs[0].shape[0]
    running = np.zeros(0, dtype=np.int64)
    h = None
    for j in range(int(first.min()), len(anat.blocks)):
        joining = np.flatnonzero(first == j)
        if len(joining):
            new = inputs[j].repeat(len(joining), *([1] * (inputs[j].dim() - 1)))
            h = new if h is None else torch.cat([h, new])
            running = np.concatenate([running, joining])
        h = _apply_position(anat, h, order[running, j], deleted[running, j], B, mode)
    out = anat.head(h).view(len(running), B, -1)
    result = torch.empty_like(out)
    result[torch.from_numpy(running)] = out
    return result


def _apply_position(anat, h, blocks, deleted, B, mode) -> torch.Tensor:
    """Apply, to each variant's ``B`` rows of ``h``, its block at this position (full or deleted)."""
    ops = blocks * 2 + deleted
    kinds = np.unique(ops)

    def run(op, rows):
        block = anat.blocks[int(op) // 2]
        return block.lesioned(rows, mode) if op % 2 else block.module(rows)

    if len(kinds) == 1:
        return run(kinds[0], h)
    out = None
    for op in kinds:
        variants = np.flatnonzero(ops == op)
        rows = torch.from_numpy((variants[:, None] * B + np.arange(B)).ravel()).to(h.device)
        res = run(op, h.index_select(0, rows))
        if out is None:
            out = res.new_empty((h.shape[0],) + res.shape[1:])
        out.index_copy_(0, rows, res)
    return out


def _loop_logits(model, anat, x, order, deleted, mode) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference path: one forward pass of the model per variant under a context manager."""
    intact = model(x)
    identity = np.arange(len(anat.blocks))
    outs = []
    for o, d in zip(order, deleted):
        if (o == identity).all():
            ctx = lesion(model, blocks=np.flatnonzero(d).tolist(), mode=mode)
        elif not d.any():
            ctx = reordered(model, o.tolist())
        else:
            raise ValueError("a variant may delete blocks or reorder them, not both")
        with ctx:
            outs.append(model(x))
    logits = torch.stack(outs) if outs else intact.new_empty((0,) + intact.shape)
    return intact, logits
