"""Measurement sites of a model, named through its block anatomy, and their selection by pattern.

Every block ``stage{s}.block{b}`` of any supported model has these sites:

- ``stage{s}.block{b}.branch.conv{i}`` (kind ``layer``): the i-th 3x3 layer's response, i.e. the
  output of that conv after its BN, before ReLU or addition (He et al. 2016, Fig. 7);
- ``stage{s}.block{b}.branch`` (kind ``branch``): the branch output ``F(x)`` -- the last layer's
  response (or, where the branch ends in squeeze-excitation or drop-path, that module's output),
  the headline "residual response";
- ``stage{s}.block{b}.shortcut`` (kind ``shortcut``): ``S(x)``; the block input for an identity
  shortcut; for plain nets the parameter-free mapping the block would be replaced by;
- ``stage{s}.block{b}.out`` (kind ``out``): the block output;
- ``stage{s}.block{b}.gate`` (kind ``gate``, highway nets only): the transform gate ``T(x)``.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from torch import nn

from ..models import Anatomy, BlockAnatomy, anatomy

KINDS = ("layer", "branch", "shortcut", "out", "gate")


@dataclass(frozen=True, eq=False)
class Site:
    """One measured value of one block.

    Attributes:
        name: the site name (``stage2.block3.branch``).
        kind: one of ``KINDS``.
        block: the block's anatomy.
        module: the module whose output is the value; ``None`` when the value is the block input
            (identity shortcut).
        path: module path in the model of the producing module (the block path for its input).
    """

    name: str
    kind: str
    block: BlockAnatomy
    module: nn.Module | None
    path: str

    @property
    def stage(self) -> int:
        return self.block.stage

    @property
    def index(self) -> int:
        return self.block.index

    @property
    def downsampling(self) -> bool:
        return self.block.downsampling


def block_sites(block: BlockAnatomy, paths: dict[int, str]) -> list[Site]:
    """The sites of one block, in the order their values are produced within the block."""
    def where(m: nn.Module) -> str:
        return paths.get(id(m), block.path)

    out = []
    if block.gate_module is not None:
        out.append(Site(f"{block.name}.gate", "gate", block, block.gate_module, where(block.gate_module)))
    for lname, mod in block.layers:
        out.append(Site(f"{block.name}.branch.{lname}", "layer", block, mod, where(mod)))
    last = block.branch_module
    out.append(Site(f"{block.name}.branch", "branch", block, last, where(last)))
    sc = block.shortcut_module
    out.append(Site(f"{block.name}.shortcut", "shortcut", block, sc,
                    block.path if sc is None else where(sc)))
    out.append(Site(f"{block.name}.out", "out", block, block.module, block.path))
    return out


def all_sites(anat: Anatomy) -> list[Site]:
    """Every site of a model, block by block in forward order."""
    paths = {id(m): name for name, m in anat.model.named_modules()}
    return [s for b in anat.blocks for s in block_sites(b, paths)]


def site_names(model: nn.Module) -> list[str]:
    """Every site name of a supported model, in forward order."""
    return [s.name for s in all_sites(anatomy(model))]


def select_sites(sites: list[Site], patterns: str | list[str] | tuple[str, ...]) -> list[Site]:
    """The sites matching any of the fnmatch-style ``patterns`` (``"*"``, ``"stage2.*.branch"``).

    Raises:
        ValueError: a pattern matches no site; the message lists the valid site names.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    patterns = list(patterns)
    if not patterns:
        raise ValueError("no site pattern given; use '*' for every site")
    names = [s.name for s in sites]
    chosen: set[str] = set()
    for p in patterns:
        if not isinstance(p, str):
            raise ValueError(f"site patterns are strings; got {p!r}")
        hit = [n for n in names if fnmatch.fnmatchcase(n, p)]
        if not hit:
            raise ValueError(f"site {p!r} matches nothing; valid sites: {', '.join(names)} "
                             "(fnmatch patterns such as 'stage2.*.branch' select several)")
        chosen.update(hit)
    return [s for s in sites if s.name in chosen]
