"""Residual blocks declared by the user: name a block type's parts once, and every tool reads it.

A residual block computes a branch ``F(x)``, a shortcut ``S(x)`` and combines them. A block type
written anywhere (a paper's repository, a user's own file) is declared by naming those parts::

    declare_block(BasicBlock, branch=["conv1", "bn1", F.relu, "conv2", "bn2"],
                  shortcut="shortcut", combine="relu")

after which ``anatomy(model)`` finds every ``BasicBlock`` in any model, in forward order, and the
probes, lesions, reorderings, sweeps, path analyses and attributions work on it. The model's
stem (what runs before the first block) and head (what runs after the last) are read from its
``forward`` by ``torch.fx`` (``traced.py``); the blocks must run one after the other, as they do
when the stages are ``nn.Sequential`` containers.

Combine steps (``COMBINES``): ``relu`` = ``ReLU(F(x) + S(x))`` (He et al. 2016, post-activation),
``add`` = ``F(x) + S(x)`` (pre-activation, He et al. 2016b), ``gate`` =
``F(x) T(x) + S(x) (1 - T(x))`` with ``T`` the block's gate module applied to the block input
(Srivastava et al. 2015; the branch then includes the nonlinearity of ``H``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .anatomy import Anatomy, BlockAnatomy
from .traced import split_forward

COMBINES = ("relu", "add", "gate")
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm, nn.LayerNorm,
          nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

Step = Callable[[torch.Tensor], torch.Tensor]


def combine(kind: str, f: torch.Tensor, s: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
    """The block output from its parts under combine step ``kind`` (one of ``COMBINES``)."""
    if kind == "relu":
        return F.relu(f + s)
    if kind == "add":
        return f + s
    return f * t + s * (1 - t)


class StepOps:
    """``branch`` / ``shortcut`` / ``combine`` of one block, each part a chain of the block's own
    modules (or functions) applied in order.

    Args:
        branch: the steps of ``F``, or one function ``F(x)``.
        shortcut: the steps of ``S`` (empty: the identity).
        kind: the combine step, one of ``COMBINES``.
    """

    def __init__(self, branch: Sequence[Step] | Step, shortcut: Sequence[Step], kind: str):
        self.branch_steps = branch
        self.shortcut_steps = tuple(shortcut)
        self.kind = kind

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        if callable(self.branch_steps):
            return self.branch_steps(x)
        for step in self.branch_steps:
            x = step(x)
        return x

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        for step in self.shortcut_steps:
            x = step(x)
        return x

    def combine(self, f: torch.Tensor, s: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        return combine(self.kind, f, s, t)


def is_identity(module: nn.Module | None) -> bool:
    """``None``, ``nn.Identity`` or an empty ``nn.Sequential``: a shortcut that returns its input."""
    return module is None or isinstance(module, nn.Identity) or (
        isinstance(module, nn.Sequential) and len(module) == 0)


@dataclass(frozen=True)
class BlockDeclaration:
    """How a block type computes its parts; made by ``declare_block``.

    Attributes:
        block_type: the block class (subclasses share its declaration unless declared themselves).
        branch: names of the block's submodules and functions applied in order, or a function
            ``fn(block, x)`` returning ``F(x)``.
        shortcut: the name of the shortcut submodule; ``None`` (or a submodule that is ``None``,
            ``nn.Identity`` or an empty ``nn.Sequential``) is the identity.
        combine: one of ``COMBINES``.
        gate: the name of the submodule computing ``T(x)`` (``combine="gate"`` only).
        layers: names of the submodules whose outputs are the branch's per-layer responses.
        output: the name of the submodule whose output is ``F(x)``.
        downsampling: ``fn(block) -> bool``; ``None`` = the shortcut is not the identity.
    """

    block_type: type
    branch: tuple[str | Step, ...] | Callable[[nn.Module, torch.Tensor], torch.Tensor]
    shortcut: str | None
    combine: str
    gate: str | None
    layers: tuple[str, ...] | None
    output: str | None
    downsampling: Callable[[nn.Module], bool] | None


_DECLARED: dict[type, BlockDeclaration] = {}


def declare_block(block_type: type, *, branch, shortcut: str | None = None, combine: str = "relu",
                  gate: str | None = None, layers: Sequence[str] | None = None, output: str | None = None,
                  downsampling: Callable[[nn.Module], bool] | None = None) -> BlockDeclaration:
    """Declare a residual block type once; ``anatomy`` then reads every model built from it.

    Args:
        block_type: the ``nn.Module`` subclass of the block.
        branch: the residual function ``F``: a list of the block's submodule names (dotted paths
            allowed) and functions (e.g. ``F.relu``) applied in order, ending in a submodule; or a
            function ``fn(block, x)`` (then ``layers`` is required).
        shortcut: name of the submodule computing ``S(x)``; ``None`` for the identity.
        combine: ``relu`` (``ReLU(F + S)``), ``add`` (``F + S``) or ``gate``
            (``F T + S (1 - T)``, ``T`` from ``gate``).
        gate: name of the submodule computing ``T(x)`` from the block input (``combine="gate"``).
        layers: submodules whose outputs are the per-layer responses (probe sites
            ``branch.conv1``, ``branch.conv2``, ...); default: the normalisation layers in (or
            inside) the submodules named in ``branch`` when a normalisation layer comes last, else
            their convolutions (pre-activation order).
        output: submodule whose output is ``F(x)`` (the ``branch`` probe site); default: the last
            name in ``branch`` (or in ``layers`` for a function branch).
        downsampling: ``fn(block) -> bool``, whether a block's shortcut changes the shape; default:
            the shortcut is not the identity.

    Returns:
        The declaration (a later declaration of the same type replaces it).

    Raises:
        ValueError: a part is missing or of the wrong kind (naming the valid choices).
    """
    if not (isinstance(block_type, type) and issubclass(block_type, nn.Module)):
        raise ValueError(f"block_type must be an nn.Module subclass; got {block_type!r}")
    if combine not in COMBINES:
        raise ValueError(f"unknown combine {combine!r}; valid: relu (ReLU(F + S)), add (F + S), "
                         "gate (F T + S (1 - T))")
    if (combine == "gate") != (gate is not None):
        raise ValueError("gate= names the gate submodule exactly when combine='gate'")
    if callable(branch) and not isinstance(branch, (list, tuple)):
        if not layers:
            raise ValueError("a branch given as a function needs layers= (the submodules whose outputs "
                             "are its per-layer responses, the last or output= giving F(x))")
    else:
        branch = tuple(branch)
        if not branch or not all(isinstance(s, str) or callable(s) for s in branch):
            raise ValueError("branch is a non-empty list of submodule names and functions, or a "
                             "function fn(block, x)")
        if output is None and not isinstance(branch[-1], str):
            raise ValueError("the branch must end in a submodule (its output is F(x), the branch probe "
                             "site), or name that submodule with output=")
    for name, value in (("shortcut", shortcut), ("gate", gate), ("output", output)):
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{name} is a submodule name; got {value!r}")
    decl = BlockDeclaration(block_type=block_type, branch=branch, shortcut=shortcut, combine=combine,
                            gate=gate, layers=None if layers is None else tuple(layers), output=output,
                            downsampling=downsampling)
    _DECLARED[block_type] = decl
    return decl


def declared_blocks() -> tuple[type, ...]:
    """The block types declared so far."""
    return tuple(_DECLARED)


def declaration_of(module: nn.Module) -> BlockDeclaration | None:
    """The declaration of the module's class or of its nearest declared base class."""
    for cls in type(module).__mro__:
        if cls in _DECLARED:
            return _DECLARED[cls]
    return None


@dataclass(frozen=True)
class DeclaredParts:
    """One block's parts, resolved from its declaration."""

    ops: StepOps
    layers: tuple[tuple[str, nn.Module], ...]
    output: nn.Module
    shortcut_module: nn.Module | None
    gate_module: nn.Module | None
    downsampling: bool


def resolve_parts(block: nn.Module, decl: BlockDeclaration, path: str) -> DeclaredParts:
    """Look up the declared submodules on one block instance.

    Raises:
        TypeError: a declared name is not a submodule of the block at ``path``.
    """
    def sub(name: str) -> nn.Module | None:
        try:
            return block.get_submodule(name)
        except AttributeError:
            if name and "." not in name and getattr(block, name, False) is None:
                return None  # torchvision-style: an optional part set to None
            children = ", ".join(n for n, _ in block.named_children())
            raise TypeError(f"{path} ({type(block).__name__}) has no submodule {name!r} named in its "
                            f"declaration; its submodules: {children}") from None

    if isinstance(decl.branch, tuple):
        steps = tuple(sub(s) if isinstance(s, str) else s for s in decl.branch)
        named = [(s, sub(s)) for s in decl.branch if isinstance(s, str)]
        branch = tuple(s for s in steps if s is not None)
    else:
        named = []
        branch = lambda x, fn=decl.branch: fn(block, x)  # noqa: E731
    if decl.layers is not None:
        modules = [sub(n) for n in decl.layers]
    else:  # the norms (post-activation order) or convs (pre-activation) inside the named steps
        inside = [m for _, step in named if step is not None for m in step.modules()
                  if isinstance(m, _NORMS + _CONVS)]
        kinds = _NORMS if inside and isinstance(inside[-1], _NORMS) else _CONVS
        modules = [m for m in inside if isinstance(m, kinds)]
    output = sub(decl.output) if decl.output else (named[-1][1] if named else modules[-1])
    if output is None:
        raise TypeError(f"{path}: the submodule giving F(x) is None; name another with output=")
    shortcut = sub(decl.shortcut) if decl.shortcut else None
    shortcut = None if is_identity(shortcut) else shortcut
    gate = sub(decl.gate) if decl.gate else None
    down = decl.downsampling(block) if decl.downsampling else shortcut is not None
    return DeclaredParts(ops=StepOps(branch, () if shortcut is None else (shortcut,), decl.combine),
                         layers=tuple((f"conv{i}", m) for i, m in enumerate(modules, start=1)),
                         output=output, shortcut_module=shortcut, gate_module=gate, downsampling=bool(down))


def declared_anatomy(model: nn.Module) -> Anatomy:
    """The anatomy of a model built from declared blocks.

    Blocks are numbered in the order ``forward`` runs them; a stage is the module holding them
    (``layer2`` for ``layer2.0``, ``layer2.1``, ...: one ``nn.Sequential`` per stage), numbered
    in order of first use.
    """
    stem, paths, head = split_forward(model, lambda m: declaration_of(m) is not None)
    stage_of: dict[str, int] = {}
    counts: dict[int, int] = {}
    blocks = []
    for path in paths:
        block = model.get_submodule(path)
        decl = declaration_of(block)
        parts = resolve_parts(block, decl, path)
        s = stage_of.setdefault(path.rpartition(".")[0], len(stage_of) + 1)
        counts[s] = b = counts.get(s, 0) + 1
        blocks.append(BlockAnatomy(
            name=f"stage{s}.block{b}", path=path, stage=s, index=b, module=block, ops=parts.ops,
            layers=parts.layers, shortcut_module=parts.shortcut_module, gate_module=parts.gate_module,
            downsampling=parts.downsampling, post_activation=decl.combine == "relu", family="declared",
            branch_output=parts.output))
    return Anatomy(model=model, stem=stem, blocks=tuple(blocks), head=head)
