"""Evaluation copies of a network with each BatchNorm folded into the convolution before it.

In eval mode a BatchNorm is a per-channel affine map, ``BN(z) = a * z + b`` with
``a = gamma / sqrt(running_var + eps)`` and ``b = beta - running_mean * a``. When it directly follows
a convolution ``z = W * x + c``, the pair is one convolution with weights ``a * W`` and bias
``a * c + b``. Folding removes one pass over every activation; the folded network computes the same
function up to float rounding (the new weights are computed in float64, then cast back).

A pair is folded when a plain ``nn.BatchNorm2d`` (not a subclass, which may do more) directly
follows the convolution: consecutive children of an ``nn.Sequential`` (CIFAR branches, stems,
projection shortcuts, torchvision ``downsample``), or ``convK`` / ``bnK`` of a torchvision
``BasicBlock``, ``Bottleneck`` or ``ResNet`` (whose forward applies ``bnK`` to ``convK``'s output).
A BatchNorm that precedes its convolution (pre-activation branches) is left as it is. Each folded BatchNorm is replaced by ``nn.Identity`` under the same
name, so the block anatomy, lesions and probes work on the copy unchanged (a probe on a former BN
site now reads the folded convolution's output, which is the same value; in a pre-activation net a
``conv`` site then reads the output of the BatchNorm that followed it).
"""
from __future__ import annotations

import copy

import torch
from torch import nn


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with every BatchNorm that directly follows a convolution folded in.

    Args:
        model: any network (the original is not modified).

    Returns:
        the folded copy, in eval mode, on the original's device and dtype.
    """
    folded = copy.deepcopy(model).eval()
    for module in folded.modules():
        for conv_name, bn_name in _pairs(module):
            conv, bn = getattr(module, conv_name), getattr(module, bn_name)
            setattr(module, conv_name, _folded_conv(conv, bn))
            setattr(module, bn_name, nn.Identity())
    return folded


def count_batchnorms(model: nn.Module) -> int:
    """Number of BatchNorm modules left in ``model``."""
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _pairs(module: nn.Module) -> list[tuple[str, str]]:
    """``(conv child name, BN child name)`` of every foldable pair directly inside ``module``."""
    children = list(module.named_children())
    if isinstance(module, nn.Sequential):
        return [(a, b) for (a, ma), (b, mb) in zip(children, children[1:]) if _foldable(ma, mb)]
    # Imported only when needed: torchvision's model zoo is slow to import.
    from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

    if isinstance(module, (BasicBlock, Bottleneck, ResNet)):
        names = dict(children)
        return [(f"conv{k}", f"bn{k}") for k in (1, 2, 3)
                if _foldable(names.get(f"conv{k}"), names.get(f"bn{k}"))]
    return []


def _foldable(conv, bn) -> bool:
    # exactly nn.BatchNorm2d: a subclass may do more (timm's BatchNormAct2d also applies an activation)
    return (isinstance(conv, nn.Conv2d) and type(bn) is nn.BatchNorm2d and bn.track_running_stats
            and bn.running_mean is not None and conv.out_channels == bn.num_features)


def _folded_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    out = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                    padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=True,
                    padding_mode=conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        w, mean, var = conv.weight.double(), bn.running_mean.double(), bn.running_var.double()
        gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(mean)
        beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(mean)
        bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(mean)
        scale = gamma / torch.sqrt(var + bn.eps)
        out.weight.copy_(w * scale.reshape(-1, 1, 1, 1))
        out.bias.copy_(bias * scale + beta - mean * scale)
    return out.train(conv.training)
