"""Block anatomy for torchvision ResNets (``BasicBlock`` and ``Bottleneck``).

The adapter reads the blocks in place: it keeps every module, state_dict key and output as
torchvision made them. ``layer{s}.{b}`` becomes ``stage{s}.block{b+1}``; a block is downsampling
when it has a ``downsample`` module (which includes Bottleneck ``layer1.0``'s stride-1 projection).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from .anatomy import Anatomy, BlockAnatomy


def is_torchvision_resnet(model: nn.Module) -> bool:
    return isinstance(model, ResNet)


class TorchvisionBlockOps:
    """``branch`` / ``shortcut`` / ``combine`` of a torchvision block, computed from its own modules.

    ``F(x)`` is the block's conv-BN(-ReLU) chain up to its last BN; ``S(x)`` is ``downsample(x)`` or
    ``x``; the block output is ``ReLU(F(x) + S(x))``.
    """

    def __init__(self, block: BasicBlock | Bottleneck):
        self.block = block
        n = 3 if isinstance(block, Bottleneck) else 2
        self.chain = [(getattr(block, f"conv{i}"), getattr(block, f"bn{i}")) for i in range(1, n + 1)]

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for i, (conv, bn) in enumerate(self.chain):
            out = bn(conv(out))
            if i < len(self.chain) - 1:
                out = F.relu(out)
        return out

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.block.downsample is None else self.block.downsample(x)

    def combine(self, f: torch.Tensor, s: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        return F.relu(f + s)


def _stem(model: ResNet):
    def stem(x: torch.Tensor) -> torch.Tensor:
        return model.maxpool(model.relu(model.bn1(model.conv1(x))))
    return stem


def _head(model: ResNet):
    def head(x: torch.Tensor) -> torch.Tensor:
        return model.fc(torch.flatten(model.avgpool(x), 1))
    return head


def torchvision_anatomy(model: ResNet) -> Anatomy:
    blocks = []
    for s in range(1, 5):
        for b, block in enumerate(getattr(model, f"layer{s}")):
            if not isinstance(block, (BasicBlock, Bottleneck)):
                raise TypeError(f"layer{s}.{b} is a {type(block).__name__}; expected torchvision "
                                "BasicBlock or Bottleneck")
            ops = TorchvisionBlockOps(block)
            layers = tuple((f"conv{i}", bn) for i, (_, bn) in enumerate(ops.chain, start=1))
            blocks.append(BlockAnatomy(
                name=f"stage{s}.block{b + 1}", path=f"layer{s}.{b}", stage=s, index=b + 1,
                module=block, ops=ops, layers=layers, shortcut_module=block.downsample,
                gate_module=None, downsampling=block.downsample is not None,
                post_activation=True, family="torchvision"))
    if not blocks:
        raise TypeError("this torchvision ResNet has no residual blocks")
    return Anatomy(model=model, stem=_stem(model), blocks=tuple(blocks), head=_head(model))
