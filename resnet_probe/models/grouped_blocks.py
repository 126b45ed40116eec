"""Layers of S independent models laid side by side along the channel axis.

An activation of the grouped network has shape ``(N, S*C, H, W)``: channel block ``s`` (channels
``s*C .. (s+1)*C - 1``) belongs to model ``s``. A layer is *grouped* when model ``s``'s output block
depends only on model ``s``'s input block and parameters, so S models share one kernel launch:

- a convolution with ``groups=g`` becomes one with ``groups=S*g`` (its weight is the S weights
  concatenated along the output axis);
- a BatchNorm over ``S*C`` channels is already per model (statistics are per channel);
- option-A zero-padding pads each model's channel block, not the end of the whole tensor;
- the final linear layer is a batched matrix product with weight ``(S, classes, C)``, giving
  logits ``(S, N, classes)``;
- element-wise modules (ReLU, sigmoid, identity) and global pooling are grouped as they are.

``group_layers(module, S)`` turns one model's module tree into the grouped tree with the same
module names (so state_dict keys match a single model's); the new layers are created on the
``meta`` device and must be filled from weights (see ``GroupedCifarNet``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import ZeroPadShortcut, _Block

# Modules that act per channel or per element: grouped as they are.
CHANNELWISE = (nn.ReLU, nn.Sigmoid, nn.Identity, nn.AdaptiveAvgPool2d, nn.Flatten)
CONTAINERS = (nn.Sequential, _Block)


class GroupedZeroPadShortcut(nn.Module):
    """Option A for S models: subsample by ``stride``, then zero-pad each model's channel block.

    Args:
        num_models: S.
        extra: channels added to each model's block.
        stride: spatial subsampling.
    """

    def __init__(self, num_models: int, extra: int, stride: int):
        super().__init__()
        self.num_models, self.extra, self.stride = num_models, extra, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
        x = x[:, :, :: self.stride, :: self.stride]
        n, c, h, w = x.shape
        s, out = self.num_models, c + self.num_models * self.extra
        if channels_last:  # pad in NHWC order so the result stays channels_last
            x = F.pad(x.permute(0, 2, 3, 1).reshape(n, h, w, s, c // s), (0, self.extra))
            return x.reshape(n, h, w, out).permute(0, 3, 1, 2)
        x = F.pad(x.reshape(n, s, c // s, h, w), (0, 0, 0, 0, 0, self.extra))
        return x.reshape(n, out, h, w)

    def extra_repr(self) -> str:
        return f"num_models={self.num_models}, stride={self.stride}, extra_channels={self.extra}"


class GroupedLinear(nn.Module):
    """S linear layers: ``(N, S*C)`` features -> ``(S, N, out_features)`` logits.

    ``logits[s] = features[:, s*C:(s+1)*C] @ weight[s].T + bias[s]``.

    Args:
        num_models: S.
        in_features: C, features per model.
        out_features: outputs per model.
        bias: learn ``bias`` of shape ``(S, out_features)``.
    """

    def __init__(self, num_models: int, in_features: int, out_features: int, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.num_models, self.in_features, self.out_features = num_models, in_features, out_features
        self.weight = nn.Parameter(torch.empty(num_models, out_features, in_features, **kw))
        self.bias = nn.Parameter(torch.empty(num_models, out_features, **kw)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], self.num_models, self.in_features)
        out = torch.einsum("nsc,skc->snk", x, self.weight)
        return out if self.bias is None else out + self.bias[:, None, :]

    def extra_repr(self) -> str:
        return (f"num_models={self.num_models}, in_features={self.in_features}, "
                f"out_features={self.out_features}, bias={self.bias is not None}")


def grouped_layer(module: nn.Module, num_models: int) -> nn.Module | None:
    """The grouped counterpart of one leaf layer (on the meta device), or ``None`` if it is kept as is.

    Raises:
        TypeError: a layer that cannot be laid side by side, naming the supported ones.
    """
    meta = dict(device="meta")
    s = num_models
    if isinstance(module, nn.Conv2d):
        return nn.Conv2d(s * module.in_channels, s * module.out_channels, module.kernel_size,
                         stride=module.stride, padding=module.padding, dilation=module.dilation,
                         groups=s * module.groups, bias=module.bias is not None,
                         padding_mode=module.padding_mode, **meta)
    if isinstance(module, nn.BatchNorm2d):
        return nn.BatchNorm2d(s * module.num_features, eps=module.eps, momentum=module.momentum,
                              affine=module.affine, track_running_stats=module.track_running_stats, **meta)
    if isinstance(module, nn.Linear):
        return GroupedLinear(s, module.in_features, module.out_features, module.bias is not None, **meta)
    if isinstance(module, ZeroPadShortcut):
        return GroupedZeroPadShortcut(s, module.extra, module.stride)
    if isinstance(module, CHANNELWISE):
        return None
    supported = ", ".join(t.__name__ for t in (nn.Conv2d, nn.BatchNorm2d, nn.Linear, ZeroPadShortcut)
                          + CHANNELWISE + CONTAINERS)
    raise TypeError(f"cannot lay {type(module).__name__} side by side; supported layers: {supported}")


def group_layers(module: nn.Module, num_models: int) -> nn.Module:
    """Replace, in place, every layer below ``module`` by its grouped counterpart; return ``module``.

    Containers (``nn.Sequential`` and the CIFAR blocks, whose forward combines parts element-wise)
    keep their class and names, so the grouped tree has the state_dict keys of a single model.
    """
    for name, child in list(module.named_children()):
        if isinstance(child, CONTAINERS):
            group_layers(child, num_models)
            continue
        new = grouped_layer(child, num_models)
        if new is not None:
            setattr(module, name, new)
    return module
