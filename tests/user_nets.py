"""Residual nets written the way papers' repositories write them, and their block declarations.

``PaperResNet`` / ``BasicBlock`` / ``LambdaLayer`` follow the common CIFAR ResNet of paper
repositories: ``self.shortcut = nn.Sequential()`` for the identity, a lambda layer that subsamples
and zero-pads (option A) or a 1x1 projection (option B), functional ReLUs, one ``nn.Sequential``
per stage and ``F.avg_pool2d(out, out.size()[3])`` in ``forward``. ``PreActNet`` keeps its
pre-activation branch in one ``nn.Sequential`` (``residual_function``); ``HighwayNet`` has a
transform gate and a branch declared as a function.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from resnet_probe.models import declare_block


class LambdaLayer(nn.Module):
    def __init__(self, lambd):
        super().__init__()
        self.lambd = lambd

    def forward(self, x):
        return self.lambd(x)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes, planes, stride=1, option="A"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            if option == "A":
                pad = planes // 4
                self.shortcut = LambdaLayer(
                    lambda x: F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, pad, pad), "constant", 0))
            else:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                    nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        out = F.relu(out)
        return out


class PaperResNet(nn.Module):
    def __init__(self, block, num_blocks, num_classes=10, option="A"):
        super().__init__()
        self.in_planes = 16
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._make_layer(block, 16, num_blocks[0], 1, option)
        self.layer2 = self._make_layer(block, 32, num_blocks[1], 2, option)
        self.layer3 = self._make_layer(block, 64, num_blocks[2], 2, option)
        self.linear = nn.Linear(64, num_classes)

    def _make_layer(self, block, planes, num_blocks, stride, option):
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(block(self.in_planes, planes, s, option))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer1(out)
        out = self.layer2(out)
        out = self.layer3(out)
        out = F.avg_pool2d(out, out.size()[3])
        out = out.view(out.size(0), -1)
        return self.linear(out)


class PreActBlock(nn.Module):
    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.residual_function = nn.Sequential(
            nn.BatchNorm2d(in_planes), nn.ReLU(),
            nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False),
            nn.BatchNorm2d(planes), nn.ReLU(),
            nn.Conv2d(planes, planes, 3, 1, 1, bias=False))
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x):
        return self.residual_function(x) + self.shortcut(x)


class PreActNet(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.stages = nn.Sequential(nn.Sequential(PreActBlock(8, 8), PreActBlock(8, 8)),
                                    nn.Sequential(PreActBlock(8, 16, 2)))
        self.bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        out = self.stages(self.conv(x))
        out = F.relu(self.bn(out))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


class HighwayBlock(nn.Module):
    def __init__(self, planes):
        super().__init__()
        self.h = nn.Sequential(nn.Conv2d(planes, planes, 3, padding=1, bias=False), nn.BatchNorm2d(planes),
                               nn.ReLU(), nn.Conv2d(planes, planes, 3, padding=1, bias=False),
                               nn.BatchNorm2d(planes), nn.ReLU())
        self.gate = nn.Sequential(nn.Conv2d(planes, planes, 3, padding=1), nn.Sigmoid())
        nn.init.constant_(self.gate[0].bias, -1.0)

    def forward(self, x):
        t = self.gate(x)
        return self.h(x) * t + x * (1 - t)


class HighwayNet(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.blocks = nn.Sequential(HighwayBlock(8), HighwayBlock(8), HighwayBlock(8))
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


declare_block(BasicBlock, branch=["conv1", "bn1", F.relu, "conv2", "bn2"], shortcut="shortcut",
              combine="relu")
declare_block(PreActBlock, branch=["residual_function"], shortcut="shortcut", combine="add")
declare_block(HighwayBlock, branch=lambda block, x: block.h(x), layers=["h.1", "h.4"], output="h",
              combine="gate", gate="gate")
