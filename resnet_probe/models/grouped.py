"""S CIFAR nets of one architecture as one network whose layers are grouped by model.

Training several seeds side by side gives each kernel S times more work, which is what a small
CIFAR net needs on a modern GPU (DESIGN.md, section 8). Layout: the S input batches are stacked
along channels, ``(S, N, 3, H, W) -> (N, S*3, H, W)``; every activation is ``(N, S*C, H, W)`` with
channel block ``s`` belonging to model ``s``; convolutions use ``groups=S``, BatchNorm statistics
are per channel and so per model, option-A zero-padding pads each model's block, and the head
returns logits ``(S, N, classes)``. Nothing mixes models, so with the loss
``grouped_cross_entropy(...).sum()`` (the sum over models of each model's mean cross-entropy)
each model's gradients are its independent gradients, and per-parameter optimisers (SGD with
momentum, weight decay) update each model exactly as if it were trained alone.

The grouped weights are the per-model weights concatenated along their output axis (stacked for
the final linear layer): ``GroupedCifarNet.from_models`` copies models in, ``export`` copies them
out as ordinary ``CifarNet`` modules with a single model's state_dict keys.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .cifar import CifarNet, model_config, seeded_model
from .grouped_blocks import group_layers

class GroupedCifarNet(nn.Module):
    """S CIFAR nets of the same architecture, each initialised from its own seed, as one network.

    Model ``s`` equals ``torch.manual_seed(seeds[s]); build_model(family, depth, ...)`` (the
    caller's RNG state is left as it was).

    Args:
        family, depth, option, width, gate_bias, num_classes: the architecture, as ``CifarNet``.
        seeds: one seed per model; S = ``len(seeds)``.
    """

    def __init__(self, family: str = "residual", depth: int = 20, option: str = "A", width: int = 1,
                 gate_bias: float | None = None, num_classes: int = 10, seeds: Sequence[int] = (0,)):
        super().__init__()
        seeds = list(seeds)
        if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
            raise ValueError(f"seeds must be a non-empty list of integers, one per model; got {seeds!r}")
        config = dict(family=family, depth=depth, option=option, width=width, gate_bias=gate_bias,
                      num_classes=num_classes)
        self._assemble([seeded_model(s, **config) for s in seeds])
        self.seeds: list[int] | None = seeds

    @classmethod
    def from_models(cls, models: Sequence[CifarNet]) -> "GroupedCifarNet":
        """A grouped network holding copies of ``models``' weights and BatchNorm buffers.

        The models must share one architecture (``CONFIG_KEYS``); the result lives on the first
        model's device and dtype and is in its train/eval mode. BatchNorm ``num_batches_tracked``
        is one counter for all models: the first model's.

        Raises:
            ValueError: no models, or models of different architectures.
        """
        grouped = cls.__new__(cls)
        nn.Module.__init__(grouped)
        grouped._assemble(list(models))
        grouped.seeds = None
        return grouped

    def _assemble(self, models: list[CifarNet]) -> None:
        if not models:
            raise ValueError("from_models needs at least one model")
        configs = [model_config(m) for m in models]
        for i, c in enumerate(configs[1:], start=1):
            if c != configs[0]:
                raise ValueError(f"models must share one architecture; model 0 is {configs[0]}, "
                                 f"model {i} is {c}")
        self.config = configs[0]
        self.num_models = len(models)
        with torch.device("meta"):
            template = group_layers(CifarNet(**self.config), self.num_models)
        self.stem = template.stem
        self.stage1, self.stage2, self.stage3 = template.stage1, template.stage2, template.stage3
        self.head = template.head
        self.in_channels = self.stem.conv.in_channels // self.num_models

        shapes = self.state_dict()
        states = [m.state_dict() for m in models]
        ref = states[0]
        grouped = {}
        for key, shape_ref in shapes.items():
            ts = [sd[key].to(ref[key]) for sd in states]
            if ts[0].dim() == 0:
                grouped[key] = ts[0].clone()
            elif shape_ref.dim() == ts[0].dim() + 1:
                grouped[key] = torch.stack(ts)
            else:
                grouped[key] = torch.cat(ts)
        self.load_state_dict(grouped, assign=True)
        self.train(models[0].training)

    @property
    def stages(self) -> list[nn.Sequential]:
        return [self.stage1, self.stage2, self.stage3]

    def stack_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """The grouped input ``(N, S*3, H, W)`` from per-model batches ``(S, N, 3, H, W)``.

        A 4-D batch with 3 channels is one batch shared by every model; one with ``S*3`` channels
        is taken to be in the grouped layout already.

        Raises:
            ValueError: any other shape, naming the accepted ones.
        """
        s, c = self.num_models, self.in_channels
        if x.dim() == 5 and x.shape[0] == s and x.shape[2] == c:
            return x.transpose(0, 1).reshape(x.shape[1], s * c, *x.shape[3:])
        if x.dim() == 4 and x.shape[1] == c:
            return x.repeat(1, s, 1, 1)
        if x.dim() == 4 and x.shape[1] == s * c:
            return x
        raise ValueError(f"inputs must be per-model batches (S={s}, N, {c}, H, W), one shared batch "
                         f"(N, {c}, H, W) or grouped (N, {s * c}, H, W); got {tuple(x.shape)}")

    def forward_grouped(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(S, N, classes)`` from grouped inputs ``(N, S*3, H, W)``."""
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(S, N, classes)``; ``x`` as accepted by ``stack_inputs``."""
        return self.forward_grouped(self.stack_inputs(x))

    def export(self) -> list[CifarNet]:
        """Independent copies of the S models: ordinary ``CifarNet`` modules with the exact weights and
        BatchNorm buffers of their channel blocks, on this network's device and dtype, in its mode."""
        with torch.device("meta"):
            single = CifarNet(**self.config).state_dict()
        grouped = self.state_dict()
        out = []
        for s in range(self.num_models):
            sd = {}
            for key, ref in single.items():
                g = grouped[key]
                if ref.dim() == 0:
                    sd[key] = g.clone()
                elif g.dim() == ref.dim() + 1:
                    sd[key] = g[s].clone()
                else:
                    sd[key] = g.reshape(self.num_models, *ref.shape)[s].clone()
            with torch.device("meta"):
                model = CifarNet(**self.config)
            model.load_state_dict(sd, assign=True)
            out.append(model.train(self.training))
        return out

    def extra_repr(self) -> str:
        return f"num_models={self.num_models}, seeds={self.seeds}, config={self.config}"


def grouped_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each model's mean cross-entropy, shape ``(S,)``.

    Args:
        logits: ``(S, N, classes)``.
        targets: ``(S, N)`` class indices (per-model batches) or ``(N,)`` (one shared batch).

    Returns:
        ``loss[s] = mean_n CE(logits[s, n], targets[s, n])``; train on ``loss.sum()`` so that each
        model receives exactly its own gradient.
    """
    s, n, k = logits.shape
    if targets.dim() == 1:
        targets = targets.expand(s, n)
    ce = F.cross_entropy(logits.reshape(s * n, k), targets.reshape(s * n), reduction="none")
    return ce.reshape(s, n).mean(1)
