"""Block anatomy for timm's ResNet families (``timm.models.resnet`` and ``timm.models.resnetv2``).

The adapter reads the blocks in place: every module, state_dict key and output stays as timm made
it. What each part is follows the blocks' own ``forward``:

- ``ResNet`` (resnet*, resnext*, seresnet*, seresnext*, wide_resnet*, ecaresnet*, resnetblur*,
  resnetaa*, resnetrs*, senet154; any ``drop_path_rate`` / ``drop_block_rate`` / ``aa_layer``),
  ``BasicBlock`` and ``Bottleneck``: ``F(x)`` is everything computed before ``x += shortcut``:
  conv-BN-(DropBlock)-act-(anti-aliasing) layers up to the last BN, then the attention module
  (squeeze-excitation, ECA, ...) and drop-path when present; ``S(x)`` is ``downsample(x)`` or
  ``x``; the block output is ``ReLU(F(x) + S(x))``.
- ``ResNetV2`` pre-activation blocks (resnetv2_*; ``PreActBasic`` / ``PreActBottleneck``,
  He et al. 2016b): ``F(x)`` is ``norm1`` (norm + activation) followed by the convs, each but the
  first preceded by its norm, then drop-path; ``S(x)`` is ``downsample(norm1(x))`` where the block
  has a projection (it shares ``norm1`` with the branch), else ``x``; the output is
  ``F(x) + S(x)``, with no activation after the addition.
- ``ResNetV2`` non-pre-activation ``Bottleneck`` (``preact=False``): conv-norm layers and
  drop-path; ``S(x)`` is ``downsample(x)`` or ``x``; the output is ``ReLU(F(x) + S(x))``.

``layer{s}.{b}`` (``stages.{s-1}.blocks.{b}`` for ResNetV2) becomes ``stage{s}.block{b+1}``; a
block is downsampling when it has a ``downsample`` module. The per-layer responses are each BN's
output (each conv's output in pre-activation blocks); the ``branch`` site is the module ending
``F``: drop-path, else attention, else the last of those layers.
"""
from __future__ import annotations

import torch
from timm.models import resnet, resnetv2
from torch import nn

from .anatomy import Anatomy, BlockAnatomy
from .declared import StepOps

_V1 = (resnet.BasicBlock, resnet.Bottleneck)
_PREACT = (resnetv2.PreActBasic, resnetv2.PreActBottleneck)


def is_timm_resnet(model: nn.Module) -> bool:
    return isinstance(model, (resnet.ResNet, resnetv2.ResNetV2))


def _present(*modules: nn.Module | None) -> list[nn.Module]:
    return [m for m in modules if m is not None and not isinstance(m, nn.Identity)]


def _chain(block: nn.Module, names: list[str]) -> list[nn.Module]:
    return _present(*(getattr(block, n, None) for n in names))


def _last_activation(block: nn.Module, path: str) -> None:
    act = block.act3 if hasattr(block, "act3") else block.act2
    if type(act) is not nn.ReLU:
        raise TypeError(f"{path} ends in {type(act).__name__}; the anatomy reads blocks whose output is "
                        "ReLU(F + S) or F + S")


def block_parts(block: nn.Module, path: str) -> dict:
    """``BlockAnatomy`` fields of one timm block (all but its name and position).

    Raises:
        TypeError: not a timm ResNet / ResNetV2 block, or its last activation is not a ReLU.
    """
    down = block.downsample
    if isinstance(block, _V1):
        _last_activation(block, path)
        convs = 2 if isinstance(block, resnet.BasicBlock) else 3
        order = (["conv1", "bn1", "drop_block", "act1", "aa", "conv2", "bn2"] if convs == 2 else
                 ["conv1", "bn1", "act1", "conv2", "bn2", "drop_block", "act2", "aa", "conv3", "bn3"])
        branch = _chain(block, order + ["se", "drop_path"])
        norms = [getattr(block, f"bn{i}") for i in range(1, convs + 1)]
        shortcut, kind = _present(down), "relu"
    elif isinstance(block, _PREACT):
        convs = 3 if isinstance(block, resnetv2.PreActBottleneck) else 2
        order = [n for i in range(1, convs + 1) for n in (f"norm{i}", f"conv{i}")]
        branch = _chain(block, order + ["drop_path"])
        norms = [getattr(block, f"conv{i}") for i in range(1, convs + 1)]  # pre-activation: conv outputs
        shortcut, kind = ([block.norm1, down] if down is not None else []), "add"
    elif isinstance(block, resnetv2.Bottleneck):
        _last_activation(block, path)
        branch = _chain(block, [n for i in (1, 2, 3) for n in (f"conv{i}", f"norm{i}")] + ["drop_path"])
        norms = [block.norm1, block.norm2, block.norm3]
        shortcut, kind = _present(down), "relu"
    else:
        raise TypeError(f"{path} is a {type(block).__name__}; the timm adapter reads timm.models.resnet "
                        "BasicBlock / Bottleneck and timm.models.resnetv2 PreActBasic / PreActBottleneck / "
                        "Bottleneck (declare other blocks with resnet_probe.models.declare_block)")
    return dict(ops=StepOps(branch, shortcut, kind),
                layers=tuple((f"conv{i}", m) for i, m in enumerate(norms, start=1)),
                shortcut_module=down, gate_module=None, downsampling=down is not None,
                post_activation=kind == "relu", family="timm", branch_output=branch[-1])


def _stages(model: nn.Module) -> list[tuple[str, nn.Module]]:
    if isinstance(model, resnetv2.ResNetV2):
        return [(f"stages.{i}.blocks", stage.blocks) for i, stage in enumerate(model.stages)]
    names = [f"layer{i}" for i in range(1, len(model.feature_info))]  # feature_info: the stem, then stages
    return [(name, getattr(model, name)) for name in names]


def _stem(model: nn.Module):
    if isinstance(model, resnetv2.ResNetV2):
        return model.stem

    def stem(x: torch.Tensor) -> torch.Tensor:
        return model.maxpool(model.act1(model.bn1(model.conv1(x))))
    return stem


def _head(model: nn.Module):
    if isinstance(model, resnetv2.ResNetV2):
        def head(x: torch.Tensor) -> torch.Tensor:
            return model.forward_head(model.norm(x))
        return head
    return model.forward_head


def timm_anatomy(model: nn.Module) -> Anatomy:
    blocks = []
    for s, (stage_path, stage) in enumerate(_stages(model), start=1):
        for b, block in enumerate(stage):
            path = f"{stage_path}.{b}"
            blocks.append(BlockAnatomy(name=f"stage{s}.block{b + 1}", path=path, stage=s, index=b + 1,
                                       module=block, **block_parts(block, path)))
    if not blocks:
        raise TypeError(f"this timm {type(model).__name__} has no residual blocks")
    return Anatomy(model=model, stem=_stem(model), blocks=tuple(blocks), head=_head(model))
