"""CIFAR networks of depth 6n+2 (He et al. 2016, section 4.2).

A 3x3 conv (16 filters) + BN + ReLU stem, three stages of n blocks on 32/16/8 maps with 16/32/64
filters (times ``width``), global average pooling and a 10-way linear layer. With option A
shortcuts, n = 3, 5, 7, 9, 18, 200 gives ResNet-20/32/44/56/110/1202 with 0.27M, 0.46M, 0.66M,
0.85M, 1.7M and 19.4M parameters; the plain net of the same depth has exactly the same parameters.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from .blocks import (SHORTCUT_OPTIONS, HighwayBlock, PlainBlock, PreActBlock, ResidualBlock)

FAMILIES = ("plain", "residual", "highway", "preact")
STAGE_PLANES = (16, 32, 64)


def blocks_per_stage(depth: int) -> int:
    """n for a depth 6n+2 network; raises ValueError for any other depth."""
    if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError(f"depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, 1202, ...); got {depth!r}")
    return (depth - 2) // 6


def default_gate_bias(depth: int) -> float:
    """Carry-biased highway gate initialisation: -1, -2, -3 for ~10, ~20, 30+ layers (Srivastava et al.)."""
    if depth < 15:
        return -1.0
    if depth < 26:
        return -2.0
    return -3.0


class CifarNet(nn.Module):
    """A plain / residual / highway / pre-activation CIFAR network of depth 6n+2.

    Args:
        family: one of ``FAMILIES``.
        depth: total weighted layers, 6n+2.
        option: shortcut option at dimension changes, ``"A"`` (zero-pad), ``"B"`` (projection
            there) or ``"C"`` (projection everywhere). Plain networks take only ``"A"``: their
            blocks have no shortcut connection.
        width: filter multiplier for the stem and every stage.
        gate_bias: initial highway gate bias; ``None`` picks ``default_gate_bias(depth)``.
        num_classes: outputs of the final linear layer.
    """

    def __init__(self, family: str = "residual", depth: int = 20, option: str = "A",
                 width: int = 1, gate_bias: float | None = None, num_classes: int = 10):
        super().__init__()
        if family not in FAMILIES:
            raise ValueError(f"unknown family {family!r}; valid families: {', '.join(FAMILIES)}")
        if option not in SHORTCUT_OPTIONS:
            raise ValueError(f"unknown shortcut option {option!r}; valid options: {', '.join(SHORTCUT_OPTIONS)}")
        if family == "plain" and option != "A":
            raise ValueError("plain networks have no shortcut connections: option must be 'A' "
                             f"(options B/C apply to residual, highway, preact); got {option!r}")
        if not isinstance(width, int) or width < 1:
            raise ValueError(f"width must be a positive integer; got {width!r}")
        n = blocks_per_stage(depth)
        self.family, self.depth, self.option, self.width = family, depth, option, width
        self.gate_bias = default_gate_bias(depth) if gate_bias is None else float(gate_bias)

        planes = [p * width for p in STAGE_PLANES]
        stem = OrderedDict(conv=nn.Conv2d(3, planes[0], 3, padding=1, bias=False))
        if family != "preact":  # pre-activation blocks normalise their own input
            stem.update(bn=nn.BatchNorm2d(planes[0]), relu=nn.ReLU())
        self.stem = nn.Sequential(stem)

        in_planes = planes[0]
        for s, p in enumerate(planes, start=1):
            blocks = []
            for b in range(n):
                stride = 2 if (s > 1 and b == 0) else 1
                blocks.append(self._block(in_planes, p, stride))
                in_planes = p
            self.add_module(f"stage{s}", nn.Sequential(*blocks))

        head = OrderedDict()
        if family == "preact":
            head.update(bn=nn.BatchNorm2d(in_planes), relu=nn.ReLU())
        head.update(pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), fc=nn.Linear(in_planes, num_classes))
        self.head = nn.Sequential(head)
        self._init_weights()

    def _block(self, in_planes: int, planes: int, stride: int) -> nn.Module:
        if self.family == "plain":
            return PlainBlock(in_planes, planes, stride)
        if self.family == "residual":
            return ResidualBlock(in_planes, planes, stride, self.option)
        if self.family == "highway":
            return HighwayBlock(in_planes, planes, stride, self.option, self.gate_bias)
        return PreActBlock(in_planes, planes, stride, self.option)

    def _init_weights(self) -> None:
        # He et al. 2015 ("msra") initialisation, as the paper's CIFAR nets use.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def stages(self) -> list[nn.Sequential]:
        return [self.stage1, self.stage2, self.stage3]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.head(x)


def build_model(family: str = "residual", depth: int = 20, option: str = "A", width: int = 1,
                gate_bias: float | None = None, num_classes: int = 10) -> CifarNet:
    """Build a CIFAR net; see ``CifarNet`` for the arguments."""
    return CifarNet(family, depth, option, width, gate_bias, num_classes)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


CONFIG_KEYS = ("family", "depth", "option", "width", "gate_bias", "num_classes")


def seeded_model(seed: int, **config) -> CifarNet:
    """``torch.manual_seed(seed); build_model(**config)``, leaving the caller's CPU RNG state untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(**config)


def model_config(model: CifarNet) -> dict:
    """The constructor arguments that rebuild ``model``'s architecture (``CONFIG_KEYS``)."""
    if not isinstance(model, CifarNet):
        raise TypeError(f"expected a resnet_probe CifarNet; got {type(model).__name__}")
    return {k: model.head.fc.out_features if k == "num_classes" else getattr(model, k) for k in CONFIG_KEYS}
