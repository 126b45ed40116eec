"""Exact gradient by path length: a backward pass carrying one cotangent per path length.

For blocks ``y_i = D_i(F_i(x_i) + S_i(x_i))`` the gradient at a block input is
``S_i^T D_i g + J_Fi^T D_i g``. Keeping a stack ``G[0..n]``, where ``G[k]`` is the summed gradient
of all paths that have gone through ``k`` branches so far, the backward step is

    G'[k] = S_i^T (D_i G[k]) + J_Fi^T (D_i G[k-1])

and after the last block and the stem, ``G[k]`` is the sum of the gradients at the image of the
``C(n, k)`` paths of length ``k`` (Veit, Wilber, Belongie 2016, section 5). Each step is linear, so
``sum_k G[k]`` is the ordinary input gradient. ``||G[k]||`` is the *net* gradient of all length-k
paths, cancellation between them included; Veit et al.'s Fig. 6 reports ``C(n, k)`` x the mean
magnitude of one path's gradient, which only sampling single paths estimates (``sampled``).
"""
from __future__ import annotations

import torch
from torch import nn

from ..lesion.context import evaluation
from ..models.wrappers import analysed_network
from .record import PathRecord, record_paths


def path_gradient_stack(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Gradient of the summed cross-entropy at the image, split by path length.

    Args:
        model: a residual, pre-activation or torchvision ResNet, evaluated in eval mode (its
            previous mode is restored); use float64 for exact comparisons. A (Distributed)DataParallel
            wrapper is looked through.
        x: images ``(B, C, H, W)``.
        y: labels ``(B,)``.

    Returns:
        ``(n + 1, B, C, H, W)``: entry ``k`` is the gradient carried by all paths through exactly
        ``k`` branches; the entries sum to the autograd gradient at ``x``.

    Raises:
        ValueError: the model has gated or shortcut-free blocks (see ``check_additive``).
    """
    model = analysed_network(model, "path gradients")
    with evaluation(model):
        record = record_paths(model, x, y)
        return stack_from_record(record)


def stack_from_record(record: PathRecord) -> torch.Tensor:
    """The path-length stack at the image from a recorded forward pass."""
    stack = record.top.unsqueeze(0)
    for i in reversed(range(len(record.names))):
        gated = stack * record.masks[i]
        through_shortcut = record.shortcut_vjp[i](gated)
        through_branch = record.branch_vjp[i](gated)
        stack = torch.cat([through_shortcut[:1], through_shortcut[1:] + through_branch[:-1],
                           through_branch[-1:]])
    return record.stem_vjp(stack).detach()
