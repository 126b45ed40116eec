"""Building blocks of the CIFAR plain / residual / highway / pre-activation networks.

Every block has the same anatomy (He et al. 2016; Srivastava et al. 2015):

- ``branch``: the residual function ``F(x) = BN(conv3x3(ReLU(BN(conv3x3(x)))))``;
- ``shortcut``: ``S(x)``, identity or a dimension-matching mapping (options A / B / C);
- ``gate`` (highway only): ``T(x) = sigmoid(W_T x + b_T)``, a 3x3 conv of the block input;
- ``combine(f, s, t)``: how the block output is made from those parts;
- ``grad_sink``: ``None``, or the sink of an open gradient tap (``gradient_tap.Tap``), which the
  block output then passes through (the identity, whose backward measures the output's gradient
  norm; the one mechanism of activation-gradient measurement, see ``gradient_tap``).

Plain blocks keep a parameter-free shortcut module that their forward never uses: it is the mapping
a lesion replaces the block by (identity where shapes match, option A at a dimension change).
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from .gradient_tap import tapped

SHORTCUT_OPTIONS = ("A", "B", "C")


def conv3x3(in_planes: int, planes: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=bias)


class Branch(nn.Sequential):
    """Post-activation residual function ``F(x) = BN(conv3x3(ReLU(BN(conv3x3(x)))))``.

    Args:
        in_planes: input channels.
        planes: output channels of both convolutions.
        stride: stride of the first convolution (2 at a stage change).
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__(OrderedDict(
            conv1=conv3x3(in_planes, planes, stride),
            bn1=nn.BatchNorm2d(planes),
            relu=nn.ReLU(),
            conv2=conv3x3(planes, planes),
            bn2=nn.BatchNorm2d(planes),
        ))


class PreActBranch(nn.Sequential):
    """Pre-activation residual function ``conv3x3(ReLU(BN(conv3x3(ReLU(BN(x))))))`` (He et al. 2016b)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__(OrderedDict(
            bn1=nn.BatchNorm2d(in_planes),
            relu1=nn.ReLU(),
            conv1=conv3x3(in_planes, planes, stride),
            bn2=nn.BatchNorm2d(planes),
            relu2=nn.ReLU(),
            conv2=conv3x3(planes, planes),
        ))


class ZeroPadShortcut(nn.Module):
    """Option A: subsample by ``stride`` and zero-pad the extra channels; no parameters."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.extra = planes - in_planes
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, extra_channels={self.extra}"


class Projection(nn.Sequential):
    """Options B / C: ``BN(conv1x1(x))`` with the block's stride."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__(OrderedDict(
            conv=nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
            bn=nn.BatchNorm2d(planes),
        ))


def make_shortcut(option: str, in_planes: int, planes: int, stride: int) -> nn.Module:
    """The shortcut ``S`` for a block of the given shape under option A, B or C (He et al. 2016, 4.1)."""
    if option not in SHORTCUT_OPTIONS:
        raise ValueError(f"unknown shortcut option {option!r}; valid options: {', '.join(SHORTCUT_OPTIONS)}")
    changes_shape = stride != 1 or in_planes != planes
    if option == "C" or (option == "B" and changes_shape):
        return Projection(in_planes, planes, stride)
    if changes_shape:
        return ZeroPadShortcut(in_planes, planes, stride)
    return nn.Identity()


class _Block(nn.Module):
    """Shared parts: ``branch``, ``shortcut``, ``downsampling``; subclasses define ``combine``."""

    family: str = ""
    post_activation: bool = True

    def __init__(self, branch: nn.Module, shortcut: nn.Module, downsampling: bool):
        super().__init__()
        self.branch = branch
        self.shortcut = shortcut
        self.downsampling = downsampling
        self.gate: nn.Module | None = None
        self.grad_sink: torch.Tensor | None = None  # set by an open gradient tap

    def combine(self, f: torch.Tensor, s: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.gate(x) if self.gate is not None else None
        return tapped(self.combine(self.branch(x), self.shortcut(x), t), self.grad_sink)


class ResidualBlock(_Block):
    """``ReLU(F(x) + S(x))`` (He et al. 2016, Fig. 2)."""

    family = "residual"

    def __init__(self, in_planes: int, planes: int, stride: int = 1, option: str = "A"):
        shortcut = make_shortcut(option, in_planes, planes, stride)
        super().__init__(Branch(in_planes, planes, stride), shortcut, stride != 1 or in_planes != planes)

    def combine(self, f, s, t=None):
        return F.relu(f + s)


class PlainBlock(_Block):
    """``ReLU(F(x))``: the residual block without its shortcut; same layers and parameters."""

    family = "plain"

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        # Unused by forward: the parameter-free mapping a lesion substitutes for the block.
        shortcut = make_shortcut("A", in_planes, planes, stride)
        super().__init__(Branch(in_planes, planes, stride), shortcut, stride != 1 or in_planes != planes)

    def combine(self, f, s, t=None):
        return F.relu(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return tapped(F.relu(self.branch(x)), self.grad_sink)


class HighwayBlock(_Block):
    """``H(x) T(x) + S(x) (1 - T(x))`` with ``H = ReLU(F(x))`` and ``T = sigmoid(W_T x + b_T)``.

    Srivastava et al. 2015. The gate is a 3x3 conv of the block input with the block's stride, so
    it has the shape of ``H``; its bias starts negative so that the block starts carry-biased.

    Args:
        gate_bias: initial value of ``b_T``.
    """

    family = "highway"
    post_activation = False

    def __init__(self, in_planes: int, planes: int, stride: int = 1, option: str = "A",
                 gate_bias: float = -2.0):
        shortcut = make_shortcut(option, in_planes, planes, stride)
        super().__init__(Branch(in_planes, planes, stride), shortcut, stride != 1 or in_planes != planes)
        self.gate = nn.Sequential(OrderedDict(conv=conv3x3(in_planes, planes, stride, bias=True),
                                              sigmoid=nn.Sigmoid()))
        nn.init.constant_(self.gate.conv.bias, gate_bias)

    def combine(self, f, s, t):
        return F.relu(f) * t + s * (1 - t)


class PreActBlock(_Block):
    """``F'(x) + S(x)`` with BN-ReLU before each conv (He et al. 2016b)."""

    family = "preact"
    post_activation = False

    def __init__(self, in_planes: int, planes: int, stride: int = 1, option: str = "A"):
        shortcut = make_shortcut(option, in_planes, planes, stride)
        super().__init__(PreActBranch(in_planes, planes, stride), shortcut,
                         stride != 1 or in_planes != planes)

    def combine(self, f, s, t=None):
        return f + s
