"""One recorded forward pass of an additive residual net, ready for backward passes path by path.

A net of ``n`` blocks ``y_i = D_i(F_i(x_i) + S_i(x_i))`` (``D_i`` the post-add ReLU, absent in
pre-activation blocks) unrolls into ``2^n`` paths (Veit, Wilber, Belongie 2016): at every block a
path goes through the branch ``F_i`` or the shortcut ``S_i``. At a fixed input the backward pass is
linear in the cotangent, so the gradient at the image splits exactly into one term per path. This
module runs the intact forward pass once, in eval mode, keeping for every block the vector-Jacobian
products ``J_F^T`` and ``S^T`` at its input and the ReLU mask ``D_i`` (1 where the block output is
positive; all ones without a post-add ReLU), plus ``stem^T`` and the loss gradient at the last
block's output.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import vjp, vmap

from ..models import anatomy
from ..models.anatomy import Anatomy
from ..models.wrappers import analysed_network

Vjp = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class PathRecord:
    """The linearised net at one input.

    Attributes:
        names: block names, in model order.
        branch_vjp: per block, ``c -> J_F(x_i)^T c`` for a stack of cotangents ``(K, B, ...)``.
        shortcut_vjp: per block, ``c -> S_i^T c`` for such a stack.
        masks: per block, ``D_i`` as a 0/1 tensor shaped like the block output.
        stem_vjp: ``c -> stem^T c`` for a stack, giving gradients at the image.
        top: ``(B, ...)`` gradient of the summed cross-entropy at the last block's output.
    """

    names: tuple[str, ...]
    branch_vjp: tuple[Vjp, ...]
    shortcut_vjp: tuple[Vjp, ...]
    masks: tuple[torch.Tensor, ...]
    stem_vjp: Vjp
    top: torch.Tensor


def _stacked(fn, primal: torch.Tensor) -> tuple[torch.Tensor, Vjp]:
    """``fn(primal)`` and its vjp, vectorised over a leading stack dimension of cotangents."""
    out, pullback = vjp(fn, primal)
    return out.detach(), vmap(lambda c: pullback(c)[0])


def check_additive(anat: Anatomy) -> None:
    """Raise unless every block combines as ``F + S`` (optionally followed by a ReLU).

    Raises:
        ValueError: naming the blocks that do not (gated highway blocks; plain blocks, which have
            no shortcut path).
    """
    f = torch.tensor([[-2.0, 0.5, 1.5, -0.25]])
    s = torch.tensor([[1.0, -1.0, 0.25, -0.5]])
    bad = []
    for b in anat.blocks:
        if b.gate_module is not None:
            bad.append(b.name)
            continue
        want = F.relu(f + s) if b.post_activation else f + s
        if not torch.equal(b.combine(f, s, None), want):
            bad.append(b.name)
    if bad:
        raise ValueError("the path decomposition needs blocks that add an identity-style shortcut to "
                         "their branch (output F(x) + S(x), optionally followed by a ReLU): residual, "
                         "pre-activation or torchvision ResNets. Blocks "
                         f"{', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''} do not (plain blocks have "
                         "no shortcut path; highway gates weight the two paths by T(x))")


def record_paths(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> PathRecord:
    """Run the model once on ``x`` and keep what path-by-path backward passes need.

    The caller puts the model in eval mode (batch statistics would couple the examples).

    Args:
        model: a residual / pre-activation / torchvision ResNet (see ``check_additive``); a
            (Distributed)DataParallel wrapper is looked through.
        x: images ``(B, C, H, W)``.
        y: labels ``(B,)``; the loss is the cross-entropy summed over the batch, so each example's
            gradient is that of its own loss.
    """
    anat = anatomy(analysed_network(model, "path gradients"))
    check_additive(anat)
    with torch.no_grad():  # function transforms still differentiate; no parameter graph is kept
        return _record(anat, x, y)


def _record(anat: Anatomy, x: torch.Tensor, y: torch.Tensor) -> PathRecord:
    h, stem_vjp = _stacked(anat.stem, x)
    branch, shortcut, masks = [], [], []
    for b in anat.blocks:
        f, f_vjp = _stacked(b.branch, h)
        s, s_vjp = _stacked(b.shortcut, h)
        h = b.combine(f, s, None)
        masks.append((h > 0).to(h.dtype) if b.post_activation else torch.ones_like(h))
        branch.append(f_vjp)
        shortcut.append(s_vjp)
    _, loss_vjp = vjp(lambda t: F.cross_entropy(anat.head(t), y, reduction="sum"), h)
    top = loss_vjp(torch.ones((), dtype=h.dtype, device=h.device))[0]
    return PathRecord(names=tuple(b.name for b in anat.blocks), branch_vjp=tuple(branch),
                      shortcut_vjp=tuple(shortcut), masks=tuple(m.detach() for m in masks),
                      stem_vjp=stem_vjp, top=top.detach())
