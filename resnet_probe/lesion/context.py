"""Reversible lesions and reorderings of a model's blocks (Veit, Wilber, Belongie 2016).

``with lesion(model, blocks=[...]):`` deletes blocks: each deleted block's output becomes
``BlockAnatomy.lesioned(input, mode)`` (``zero_branch``: ``ReLU(S(x))`` for post-activation
blocks, else ``S(x)``; ``shortcut_only``: ``S(x)``; a highway block's gate is forced to carry,
``T = 0``, so it outputs ``S(x)``). ``with reordered(model, order):`` runs the blocks in another
order. Both work through the block anatomy for every supported model.

How: for the duration of the ``with`` block, each affected block module gets an instance-level
``forward`` that computes the replacement, so a deleted block's branch is not computed at all and
hooks registered on the block itself still fire (and see the lesioned output). On exit, also after
an exception, the previous ``forward`` is restored; no parameter, buffer or hook is added, so the
``state_dict`` is untouched and outputs afterwards are bitwise identical to before. Contexts nest.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from ..models import anatomy
from ..models.anatomy import Anatomy, check_lesion_mode
from ..models.wrappers import analysed_network

_NO_OVERRIDE = object()


@contextlib.contextmanager
def override_forwards(replacements: dict[nn.Module, Callable[[torch.Tensor], torch.Tensor]]) -> Iterator[None]:
    """Give modules a temporary instance ``forward``; restore the previous one on exit."""
    saved: list[tuple[nn.Module, object]] = []
    try:
        for module, fn in replacements.items():
            saved.append((module, module.__dict__.get("forward", _NO_OVERRIDE)))
            module.forward = fn
        yield
    finally:
        for module, previous in reversed(saved):
            if previous is _NO_OVERRIDE:
                del module.__dict__["forward"]
            else:
                module.forward = previous


def current_forward(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The module's forward as it stands now (an active override, else its class's method)."""
    return module.__dict__.get("forward") or type(module).forward.__get__(module)


@contextlib.contextmanager
def lesion(model: nn.Module, blocks: Iterable = (), mode: str = "zero_branch") -> Iterator[tuple[str, ...]]:
    """Delete blocks of ``model`` inside a ``with`` statement.

    Args:
        model: a model that ``resnet_probe.models.anatomy`` supports; a (Distributed)DataParallel
            wrapper is looked through.
        blocks: block names (``stage2.block3``), module paths (``layer3.4``) or indices; empty
            deletes nothing (the model is then exactly itself).
        mode: ``zero_branch`` or ``shortcut_only`` (see ``BlockAnatomy.lesioned``).

    Returns:
        A context manager yielding the names of the deleted blocks, in model order.

    Raises:
        ValueError: an unknown block (naming the valid ones) or lesion mode.
        RuntimeError: the model is a ``torch.compile`` wrapper (pass the module it compiled).
    """
    check_lesion_mode(mode)
    anat = anatomy(analysed_network(model, "lesions"))
    deleted = [anat.blocks[i] for i in anat.resolve(blocks)]
    replacements = {b.module: _lesioned_forward(b, mode) for b in deleted}
    with override_forwards(replacements):
        yield tuple(b.name for b in deleted)


def _lesioned_forward(block, mode: str):
    def forward(x: torch.Tensor) -> torch.Tensor:
        return block.lesioned(x, mode)
    return forward


def check_order(anat: Anatomy, order: Sequence[int]) -> list[int]:
    """Validate a block order: a permutation that moves only non-downsampling blocks within a stage.

    ``order[j]`` is the index of the block that runs at position ``j``. Such blocks have the same
    input and output shape, so any permutation among them is a valid network.

    Raises:
        ValueError: not a permutation of ``0..n-1``, or a moved block is downsampling or leaves its stage.
    """
    order = [int(i) for i in order]
    n = len(anat.blocks)
    if sorted(order) != list(range(n)):
        raise ValueError(f"order must be a permutation of 0..{n - 1}; got {order}")
    for pos, i in enumerate(order):
        if pos == i:
            continue
        here, moved = anat.blocks[pos], anat.blocks[i]
        if here.downsampling or moved.downsampling or here.stage != moved.stage:
            raise ValueError(f"block {moved.name} cannot run at the position of {here.name}: only "
                             "non-downsampling blocks of the same stage can be reordered")
    return order


@contextlib.contextmanager
def reordered(model: nn.Module, order: Sequence[int]) -> Iterator[list[int]]:
    """Run the blocks of ``model`` in another order inside a ``with`` statement (Veit et al. 2016).

    Args:
        model: a model that ``resnet_probe.models.anatomy`` supports; a (Distributed)DataParallel
            wrapper is looked through.
        order: ``order[j]`` is the index of the block that runs at position ``j``; only
            non-downsampling blocks may move, and only within their stage.

    Returns:
        A context manager yielding the validated order.
    """
    anat = anatomy(analysed_network(model, "reorderings"))
    order = check_order(anat, order)
    originals = [current_forward(b.module) for b in anat.blocks]
    replacements = {anat.blocks[pos].module: originals[i] for pos, i in enumerate(order) if pos != i}
    with override_forwards(replacements):
        yield order


@contextlib.contextmanager
def evaluation(model: nn.Module) -> Iterator[nn.Module]:
    """Put every module in eval mode; restore each module's previous mode on exit."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training
