"""Evaluation copies of a network: as is, with BatchNorm folded, or folded and compiled block by block.

``evaluation_model(model, "compiled")`` folds every BatchNorm into its convolution
(``fold.fold_batchnorm``), then compiles, in place on that copy, every block and every top-level
part outside the blocks (the stem's layers, the head) with ``torch.compile`` and dynamic shapes.
Compiling block by block, rather than the whole forward pass, keeps the block anatomy: the lesion
engine calls each block on any number of rows (examples x variants), deleted or not, and every
intact block it runs is compiled code; ``model(x)`` runs the same compiled pieces in order. The
logits equal the folded copy's up to float rounding (kernels fuse and reorder sums).

Blocks of one class share their ``forward`` code, and torch.compile keeps one cache of compiled
variants per code object (one per block shape, stride and batch-size kind). Its default limit of 8
would leave the later blocks of a deep net running eagerly, so ``compile_blocks`` raises
``torch._dynamo.config.recompile_limit`` (a process-wide setting) to at least ``RECOMPILE_LIMIT``.

The compiled copy is for evaluation only: probes refuse it (attach them to the original or to the
folded copy), and it does not train.
"""
from __future__ import annotations

import torch
from torch import nn

from .anatomy import anatomy
from .fold import fold_batchnorm

EVALUATION_PATHS = ("eager", "folded", "compiled")
RECOMPILE_LIMIT = 64


def evaluation_model(model: nn.Module, path: str = "folded", mode: str | None = None) -> nn.Module:
    """The network to evaluate along ``path``.

    Args:
        model: a CIFAR net or torchvision ResNet (``anatomy`` supports it); it is not modified.
        path: ``eager`` (the model itself, as it is), ``folded`` (an eval-mode copy with BatchNorm
            folded into the convolutions) or ``compiled`` (that copy, compiled block by block; see
            the module docstring).
        mode: ``torch.compile`` mode for ``compiled`` (``None``: the default; on a GPU
            ``"max-autotune-no-cudagraphs"`` tunes the convolutions).

    Raises:
        ValueError: an unknown path, naming the valid ones.
    """
    if path not in EVALUATION_PATHS:
        raise ValueError(f"unknown evaluation path {path!r}; valid paths: {', '.join(EVALUATION_PATHS)}")
    if path == "eager":
        return model
    folded = fold_batchnorm(model)
    return compile_blocks(folded, mode) if path == "compiled" else folded


def compile_blocks(model: nn.Module, mode: str | None = None) -> nn.Module:
    """Compile, in place, every block of ``model`` and every top-level child holding no block; returns it.

    Each compiled module keeps its class, name and parameters (``nn.Module.compile``), so the anatomy,
    the lesion engine and ``state_dict`` see the same network.
    """
    blocks = [b.module for b in anatomy(model).blocks]
    block_ids = {id(b) for b in blocks}
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)
    for block in blocks:
        block.compile(dynamic=True, mode=mode)
    for child in model.children():
        if not any(id(m) in block_ids for m in child.modules()):
            child.compile(dynamic=True, mode=mode)
    return model


def compiled_module(model: nn.Module) -> str | None:
    """The name of the first module in ``model`` that runs compiled code (``""``: the model itself),
    or ``None`` when nothing is compiled."""
    for name, m in model.named_modules():
        if hasattr(m, "_orig_mod") or getattr(m, "_compiled_call_impl", None) is not None:
            return name
    return None
