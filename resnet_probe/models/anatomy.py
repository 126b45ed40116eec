"""Block anatomy: the one interface through which probes, lesions and path analyses see a model.

``anatomy(model)`` returns the model as ``stem -> blocks -> head``; each block exposes its
``branch`` F, its ``shortcut`` S, its ``gate`` T (highway only), the ``combine`` step, the
per-layer response sites of its branch, and whether it is a *downsampling* block (its shortcut
changes shape; for torchvision this is ``downsample is not None``, which includes the stride-1
projection of Bottleneck ``layer1.0``). Reading the anatomy changes neither the model's outputs
nor its ``state_dict``: it holds references to existing modules and adds nothing to them.

Supported: this package's ``CifarNet`` (plain, residual, highway, preact), torchvision ResNets
built from ``BasicBlock`` / ``Bottleneck`` (resnet18...152, resnext, wide_resnet), timm's ``ResNet``
and ``ResNetV2`` families (``timm_adapter.py``), and any model built from blocks the user declared
with ``declare_block`` (``declared.py``). A
``GroupedCifarNet`` (S models side by side) has an anatomy only on request (``grouped=True``): its
blocks hold S models' channel blocks at once, which only per-model-aware tools (the gradient
probe) can read.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .cifar import CifarNet
from .grouped import GroupedCifarNet

LESION_MODES = ("zero_branch", "shortcut_only")


class BlockOps(Protocol):
    """What a block must provide: its parts and how they combine."""

    def branch(self, x: torch.Tensor) -> torch.Tensor: ...
    def shortcut(self, x: torch.Tensor) -> torch.Tensor: ...
    def combine(self, f: torch.Tensor, s: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor: ...


@dataclass(frozen=True, eq=False)
class BlockAnatomy:
    """One block of a model, seen through its anatomy.

    Attributes:
        name: ``stage{s}.block{b}`` (both 1-based).
        path: the module path in the model (``stage2.0``, ``layer3.4``).
        module: the block module itself.
        ops: its ``branch`` / ``shortcut`` / ``combine`` callables.
        layers: ``(name, module)`` pairs whose outputs are the branch's per-layer responses
            (each conv's output after its BN, before ReLU or addition; for pre-activation blocks
            each conv's output).
        shortcut_module: the module computing ``S(x)``, or ``None`` for the identity.
        gate_module: the module computing ``T(x)`` (highway), else ``None``.
        downsampling: the shortcut changes the shape of its input.
        post_activation: a ReLU follows the combine step (``ReLU(F + S)``).
        family: ``plain``, ``residual``, ``highway``, ``preact``, ``torchvision``, ``timm`` or
            ``declared``.
        branch_output: the module whose output is ``F(x)`` when it is not the last of ``layers``
            (a squeeze-excitation or drop-path module ending the branch).
    """

    name: str
    path: str
    stage: int
    index: int
    module: nn.Module
    ops: BlockOps
    layers: tuple[tuple[str, nn.Module], ...]
    shortcut_module: nn.Module | None
    gate_module: nn.Module | None
    downsampling: bool
    post_activation: bool
    family: str
    branch_output: nn.Module | None = None

    @property
    def branch_module(self) -> nn.Module:
        """The module whose output is ``F(x)``."""
        return self.layers[-1][1] if self.branch_output is None else self.branch_output

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """``F(x)``: the residual function (for highway nets, before the ReLU of ``H``)."""
        return self.ops.branch(x)

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        """``S(x)``: identity, zero-pad or projection."""
        return self.ops.shortcut(x)

    def gate(self, x: torch.Tensor) -> torch.Tensor | None:
        """``T(x)`` for highway blocks, else ``None``."""
        return None if self.gate_module is None else self.gate_module(x)

    def combine(self, f: torch.Tensor, s: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        return self.ops.combine(f, s, t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block's own forward pass."""
        return self.module(x)

    def recompose(self, x: torch.Tensor) -> torch.Tensor:
        """``combine(F(x), S(x), T(x))``: the block output rebuilt from its parts; equals ``forward``."""
        return self.combine(self.branch(x), self.shortcut(x), self.gate(x))

    def lesioned(self, x: torch.Tensor, mode: str = "zero_branch") -> torch.Tensor:
        """The block's output once deleted (Veit et al. 2016).

        ``zero_branch``: ``ReLU(S(x))`` for post-activation blocks (the exact identity on an
        identity-shortcut block, whose input is already non-negative), ``S(x)`` otherwise;
        ``shortcut_only``: ``S(x)``. Highway blocks: the gate forced to carry (T = 0), i.e. ``S(x)``.
        Plain blocks use their parameter-free shortcut mapping. Downsampling blocks keep their
        projection / zero-pad shortcut.
        """
        check_lesion_mode(mode)
        s = self.shortcut(x)
        if mode == "zero_branch" and self.post_activation and self.gate_module is None:
            return F.relu(s)
        return s


def check_lesion_mode(mode: str) -> None:
    if mode not in LESION_MODES:
        raise ValueError(f"unknown lesion mode {mode!r}; valid modes: {', '.join(LESION_MODES)}")


@dataclass(frozen=True, eq=False)
class Anatomy:
    """A model as ``head(block_n(...block_1(stem(x))))``.

    ``num_models`` is S for a grouped network (activations ``(N, S*C, ...)``, channel block ``s``
    belonging to model ``s``; parameters concatenated by model along their first axis), else 1.
    """

    model: nn.Module
    stem: Callable[[torch.Tensor], torch.Tensor]
    blocks: tuple[BlockAnatomy, ...]
    head: Callable[[torch.Tensor], torch.Tensor]
    num_models: int = 1
    by_name: dict[str, BlockAnatomy] = field(init=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "by_name", {b.name: b for b in self.blocks})

    def __len__(self) -> int:
        return len(self.blocks)

    def __iter__(self):
        return iter(self.blocks)

    def __getitem__(self, key: int | str) -> BlockAnatomy:
        return self.blocks[key] if isinstance(key, int) else self.by_name[key]

    @property
    def names(self) -> list[str]:
        return [b.name for b in self.blocks]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The model's forward pass through its anatomy; equals ``model(x)``."""
        x = self.stem(x)
        for b in self.blocks:
            x = b.module(x)
        return self.head(x)

    def resolve(self, blocks) -> list[int]:
        """Sorted indices of the given blocks: one or an iterable of names, module paths, (Python or
        NumPy) integer indices or ``BlockAnatomy``.

        Raises:
            ValueError: naming the valid block names and the index range.
        """
        if isinstance(blocks, (str, int, np.integer, BlockAnatomy)):
            blocks = [blocks]
        out = []
        for b in blocks:
            if isinstance(b, BlockAnatomy):
                b = b.name
            elif isinstance(b, np.integer):
                b = int(b)
            if isinstance(b, bool) or not isinstance(b, (int, str)):
                raise ValueError(f"blocks are given by name or index; got {b!r}")
            if isinstance(b, int):
                if not -len(self.blocks) <= b < len(self.blocks):
                    raise ValueError(f"block index {b} out of range 0..{len(self.blocks) - 1}; "
                                     f"valid names: {', '.join(self.names)}")
                out.append(b % len(self.blocks))
            elif b in self.by_name:
                out.append(self.blocks.index(self.by_name[b]))
            else:
                paths = {blk.path: i for i, blk in enumerate(self.blocks)}
                if b not in paths:
                    raise ValueError(f"unknown block {b!r}; valid names: {', '.join(self.names)} "
                                     f"(or module paths such as {self.blocks[0].path!r}, or indices "
                                     f"0..{len(self.blocks) - 1})")
                out.append(paths[b])
        return sorted(set(out))


SUPPORTED = ("resnet_probe CifarNet (plain, residual, highway, preact); torchvision ResNets built from "
             "BasicBlock/Bottleneck (resnet18...152, resnext*, wide_resnet*); timm ResNet (resnet*, "
             "resnext*, seresnet*, seresnext*, wide_resnet*, ecaresnet*, resnetblur*, resnetaa*, "
             "resnetrs*, senet154) and ResNetV2 (resnetv2_*); models built from blocks declared with "
             "resnet_probe.models.declare_block")
HOW_TO_DECLARE = ("declare the block type once, e.g. declare_block(BasicBlock, branch=['conv1', 'bn1', "
                  "F.relu, 'conv2', 'bn2'], shortcut='shortcut', combine='relu') (combine: relu = "
                  "ReLU(F + S), add = F + S, gate = F T + S (1 - T)); see help(resnet_probe.models.declare_block)")


def anatomy(model: nn.Module, grouped: bool = False) -> Anatomy:
    """The block anatomy of a supported model (``SUPPORTED``).

    Args:
        model: a CIFAR net, a torchvision or timm ResNet, or a model built from declared blocks.
        grouped: also accept a ``GroupedCifarNet`` (its anatomy has ``num_models = S``).

    Raises:
        TypeError: the model has no recognisable residual blocks (naming what is supported and how
            to declare a block), or it is a grouped network and ``grouped`` is false.
    """
    from .declared import declaration_of, declared_anatomy  # declared.py builds on this module's classes

    if isinstance(model, CifarNet):
        return _cifar_anatomy(model, model.family)
    if isinstance(model, GroupedCifarNet):
        if not grouped:
            raise TypeError(f"this GroupedCifarNet holds {model.num_models} models side by side; analyse "
                            "each one: GroupedCifarNet.export() (or GroupedClassifier.export_checkpoints) "
                            "gives them as ordinary CifarNets")
        return _cifar_anatomy(model, model.config["family"], model.num_models)
    if type(model).__module__.startswith("timm."):
        # Imported only for timm models: timm is optional and slow to import.
        from .timm_adapter import is_timm_resnet, timm_anatomy
        if is_timm_resnet(model):
            return timm_anatomy(model)
    # Imported only when needed: torchvision's model zoo is slow to import.
    from .torchvision_adapter import is_torchvision_resnet, torchvision_anatomy

    if is_torchvision_resnet(model):
        return torchvision_anatomy(model)
    if any(declaration_of(m) is not None for m in model.modules()):
        return declared_anatomy(model)
    raise TypeError(f"{type(model).__name__} has no recognisable residual blocks; supported: {SUPPORTED}. "
                    f"For other residual blocks, {HOW_TO_DECLARE}")


def _cifar_anatomy(model, family: str, num_models: int = 1) -> Anatomy:
    blocks = []
    for s, stage in enumerate(model.stages, start=1):
        for b, block in enumerate(stage):
            br = block.branch
            if family == "preact":
                layers = (("conv1", br.conv1), ("conv2", br.conv2))
            else:
                layers = (("conv1", br.bn1), ("conv2", br.bn2))
            shortcut = None if isinstance(block.shortcut, nn.Identity) else block.shortcut
            blocks.append(BlockAnatomy(
                name=f"stage{s}.block{b + 1}", path=f"stage{s}.{b}", stage=s, index=b + 1,
                module=block, ops=block, layers=layers, shortcut_module=shortcut,
                gate_module=block.gate, downsampling=block.downsampling,
                post_activation=block.post_activation, family=family))
    return Anatomy(model=model, stem=model.stem, blocks=tuple(blocks), head=model.head, num_models=num_models)
