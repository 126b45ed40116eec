"""Every supported residual family, seen through one block anatomy, behaves as the model itself.

Families: this project's CIFAR nets, torchvision ResNets, every timm ResNet / ResNetV2 name of the
families the toolkit reads (built through timm's own entry points with one block per stage and
small widths, so each name keeps its block class and its building options: cardinality, base
width, squeeze-excitation, anti-aliasing, deep stems, average-pool downsampling, norm layers),
drop-path / drop-block variants, ResNetV2's post-activation bottleneck, and nets written the way
papers' repositories write them, read through ``declare_block``. References (block combine steps, shortcuts, lesioned outputs) are
written here from each family's own ``forward``, not taken from the anatomy.
"""
from __future__ import annotations

import copy
import fnmatch
import re
from dataclasses import dataclass
from functools import partial
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock as TvBasic, Bottleneck as TvBottleneck, ResNet as TvResNet

from resnet_probe.lesion import lesion
from resnet_probe.models import anatomy, build_model
from resnet_probe.paths import path_gradient_stack
from resnet_probe.probes import probe

import user_nets

try:
    import timm
    from timm.layers import StdConv2d
    from timm.models.resnetv2 import ResNetV2
except ImportError:  # the toolkit works without timm; only its cases are skipped
    timm = None

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- references written from each family's forward ---------------------------------------------

def _relu_add(f, s, t):
    return F.relu(f + s)


def _add(f, s, t):
    return f + s


COMBINE = {
    "relu": _relu_add,  # ReLU(F + S): CIFAR residual, torchvision, timm ResNet, paper BasicBlock
    "add": _add,  # F + S: pre-activation
    "plain": lambda f, s, t: F.relu(f),
    "cifar_highway": lambda f, s, t: F.relu(f) * t + s * (1 - t),  # H = ReLU(F)
    "gate": lambda f, s, t: f * t + s * (1 - t),  # the user's branch includes H's ReLU
}


def _identity(block, x):
    return x


def _own_shortcut(block, x):
    return block.shortcut(x)


def _downsample(block, x):
    return x if block.downsample is None else block.downsample(x)


def _preact_downsample(block, x):  # timm ResNetV2: the projection reads norm1(x)
    return x if block.downsample is None else block.downsample(block.norm1(x))


@dataclass(frozen=True)
class Case:
    build: Callable[[], nn.Module]
    combine: str
    shortcut: Callable
    size: int = 32
    needs_timm: bool = False
    float32_inside: bool = False  # timm's EvoNorm / FRN take their statistics in float32 even for float64


def _lesioned_reference(case: Case, block: nn.Module, x: torch.Tensor, mode: str) -> torch.Tensor:
    s = case.shortcut(block, x)
    post_activation = case.combine in ("relu", "plain")
    return F.relu(s) if mode == "zero_branch" and post_activation else s


# ---- model builders ------------------------------------------------------------------------------

def _randomise_norms(model: nn.Module) -> nn.Module:
    """Non-trivial norm statistics and affine parameters, as a trained net has (timm zero-inits
    the last BN of each branch, which would make every branch vanish)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if "Norm" not in type(m).__name__:
                continue
            for name, scale, offset in (("weight", 0.3, 1.0), ("bias", 0.1, 0.0)):
                p = getattr(m, name, None)
                if isinstance(p, nn.Parameter):
                    p.copy_(offset + scale * torch.randn(p.shape, generator=g))
            if getattr(m, "running_mean", None) is not None:
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return model


def _cifar(family):
    return lambda: build_model(family, 8)


def _tv(block, **kw):
    return lambda: TvResNet(block, [1, 1, 1, 1], num_classes=10, **kw)


TIMM_LISTED = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext*", "seresnet*",
               "seresnext*", "wide_resnet*", "resnetblur*", "resnetaa*", "resnetv2_*"]
V1_SMALL = dict(layers=(1, 1, 1, 1), channels=(32, 32, 32, 32))
V2_SMALL = dict(layers=(1, 1, 1, 1), channels=(128, 128, 128, 128))


def _timm(name: str, **options):
    """``name`` through its timm entry point, one block per stage and small widths."""
    def build():
        small = V2_SMALL if name.startswith("resnetv2") else V1_SMALL
        bit = re.fullmatch(r"resnetv2_\d+x(\d)_bit", name)
        if bit:  # BiT entry points fix the depth; these are their options (timm's _create_resnetv2_bit)
            return ResNetV2(**small, width_factor=int(bit.group(1)), stem_type="fixed",
                            conv_layer=partial(StdConv2d, eps=1e-8), num_classes=10, **options)
        return timm.create_model(name, pretrained=False, num_classes=10, **small, **options)
    return build


def _timm_names(module: str) -> list[str]:
    return timm.list_models(module=module) if timm is not None else []


LISTED = [n for n in _timm_names("resnet") + _timm_names("resnetv2")
          if any(fnmatch.fnmatchcase(n, p) for p in TIMM_LISTED)]
OTHER_TIMM = [n for n in _timm_names("resnet") if n not in LISTED]


def _timm_case(name: str, **options) -> Case:
    if name.startswith("resnetv2"):
        return Case(_timm(name, **options), "add", _preact_downsample, needs_timm=True,
                    float32_inside=name.endswith(("_evos", "_frn")))
    return Case(_timm(name, **options), "relu", _downsample, needs_timm=True)


CASES = {
    "cifar-plain": Case(_cifar("plain"), "plain", _own_shortcut, size=16),
    "cifar-residual": Case(_cifar("residual"), "relu", _own_shortcut, size=16),
    "cifar-highway": Case(_cifar("highway"), "cifar_highway", _own_shortcut, size=16),
    "cifar-preact": Case(_cifar("preact"), "add", _own_shortcut, size=16),
    "torchvision-resnet18": Case(_tv(TvBasic), "relu", _downsample),
    "torchvision-resnet50": Case(_tv(TvBottleneck), "relu", _downsample),
    "torchvision-resnext50_32x4d": Case(_tv(TvBottleneck, groups=32, width_per_group=4), "relu", _downsample),
    "torchvision-wide_resnet50_2": Case(_tv(TvBottleneck, width_per_group=128), "relu", _downsample),
    "paper-resnet-optionA": Case(lambda: user_nets.PaperResNet(user_nets.BasicBlock, [2, 1, 1]), "relu",
                                 _own_shortcut, size=16),
    "paper-resnet-optionB": Case(lambda: user_nets.PaperResNet(user_nets.BasicBlock, [1, 1, 1], option="B"),
                                 "relu", _own_shortcut, size=16),
    "user-preact": Case(user_nets.PreActNet, "add", _own_shortcut, size=16),
    "user-highway": Case(user_nets.HighwayNet, "gate", _identity, size=16),
    **{f"timm-{n}": _timm_case(n) for n in LISTED},
    "timm-resnet50-drop_path-drop_block": _timm_case("resnet50", drop_path_rate=0.5, drop_block_rate=0.5),
    "timm-seresnext50_32x4d-drop_path": _timm_case("seresnext50_32x4d", drop_path_rate=0.5),
    "timm-resnetv2_50-drop_path": _timm_case("resnetv2_50", drop_path_rate=0.5),
    # ResNetV2's post-activation Bottleneck (the backbone of timm's hybrid ViTs; no resnetv2_* name)
    "timm-ResNetV2-preact_False": Case(lambda: ResNetV2(**V2_SMALL, preact=False, num_classes=10), "relu",
                                       _downsample, needs_timm=True),
}
needs_timm = pytest.mark.skipif(timm is None, reason="timm is not installed")
PARAMS = [pytest.param(name, marks=needs_timm if c.needs_timm else (), id=name) for name, c in CASES.items()]
ADDITIVE = [p for p in PARAMS if CASES[p.values[0]].combine in ("relu", "add")]


def _model(name: str, dtype=torch.float32):
    return _instance(CASES[name], dtype)


def _instance(case: Case, dtype=torch.float32):
    torch.manual_seed(0)
    model = _randomise_norms(case.build()).eval().to(dtype)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, case.size, case.size, generator=g).to(dtype)
    y = torch.randint(0, 10, (2,), generator=g)
    return case, model, x, y


# ---- the invariants ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", PARAMS)
def test_the_anatomy_reads_the_model_without_changing_it(name):
    """Probed output == unprobed output (bitwise); the branch / shortcut / out sites hold the
    anatomy's F(x), S(x) and the block outputs; state_dict keys and values are untouched; an
    explicit forward built from branch, shortcut and the family's own combine is the model."""
    case, model, x, _ = _model(name)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        plain = model(x)
        anat = anatomy(model)
        with probe(model, sites="*", raw=True) as session:
            probed = model(x)
        assert torch.equal(probed, plain)
        h = anat.stem(x)
        for b in anat:
            f, s = b.branch(h), b.shortcut(h)
            assert torch.equal(session.raw(f"{b.name}.branch"), f), b.name
            assert torch.equal(session.raw(f"{b.name}.shortcut"), s), b.name
            h_next = COMBINE[case.combine](f, s, b.gate(h))
            assert torch.equal(session.raw(f"{b.name}.out"), h_next), b.name
            h = h_next
        assert torch.equal(anat.head(h), plain)
    after = model.state_dict()
    assert list(after) == list(state) and all(torch.equal(after[k], state[k]) for k in state)


@pytest.mark.parametrize("name", PARAMS)
def test_an_empty_lesion_is_the_identity_and_one_block_lesions_match_the_reference(name):
    case, model, x, _ = _model(name)
    anat = anatomy(model)
    with torch.no_grad():
        intact = model(x)
        with lesion(model, []):
            assert torch.equal(model(x), intact)
        for i, b in enumerate(anat):
            for mode in ("zero_branch", "shortcut_only"):
                with lesion(model, [i], mode=mode):
                    got = model(x)
                handle = b.module.register_forward_hook(
                    lambda m, args, out, mode=mode: _lesioned_reference(case, m, args[0], mode))
                try:
                    want = model(x)
                finally:
                    handle.remove()
                assert torch.equal(got, want), (b.name, mode)
        assert torch.equal(model(x), intact)


@pytest.mark.parametrize("name", ADDITIVE)
def test_the_path_length_stack_sums_to_the_input_gradient(name):
    case, model, x, y = _model(name, torch.float64)
    stack = path_gradient_stack(model, x, y)
    assert stack.shape == (len(anatomy(model)) + 1, *x.shape)
    x = x.clone().requires_grad_(True)
    grad = torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), x)[0]
    rtol, atol = (1e-5, 1e-6) if case.float32_inside else (1e-9, 1e-10)  # atol: of the largest entry
    torch.testing.assert_close(stack.sum(0), grad, rtol=rtol, atol=atol * grad.abs().max().item())


@pytest.mark.parametrize("name", ["cifar-plain", "cifar-highway", "user-highway"])
def test_the_path_stack_refuses_nets_without_an_additive_shortcut(name):
    _, model, x, y = _model(name, torch.float64)
    with pytest.raises(ValueError, match="add an identity-style shortcut"):
        path_gradient_stack(model, x, y)


@needs_timm
@pytest.mark.parametrize("name", ["timm-resnet50-drop_path-drop_block", "timm-seresnext50_32x4d-drop_path",
                                  "timm-resnetv2_50-drop_path"])
def test_drop_path_and_drop_block_are_part_of_the_branch_in_training(name):
    """In train mode a block's output is still combine(F, S) with the same random draws: drop-block
    and drop-path run inside F, before the addition."""
    case, model, x, _ = _model(name)
    model.train()
    anat = anatomy(model)
    last = anat[-1]  # drop-path grows with depth; drop-block acts in the last two stages
    h = anat.stem(x).detach()
    for b in anat.blocks[:-1]:
        h = b.module(h).detach()
    outputs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        outputs.append(last.module(h))
        torch.manual_seed(seed)
        mine = COMBINE[case.combine](last.branch(h), case.shortcut(last.module, h), None)
        assert torch.equal(outputs[-1], mine), seed
    assert not torch.equal(*outputs)  # the two seeds drop differently: dropping is active


@needs_timm
@pytest.mark.parametrize("name", OTHER_TIMM)
def test_other_timm_resnets_are_read_by_the_same_adapter(name):
    """ecaresnet*, resnetrs*, senet154, the c/d/s/t stems, GroupNorm and deeper variants: the
    explicit forward from the anatomy is the model's own output."""
    _, model, x, _ = _instance(_timm_case(name))
    with torch.no_grad():
        anat = anatomy(model)
        h = anat.stem(x)
        for b in anat:
            h = _relu_add(b.branch(h), _downsample(b.module, h), None)
        assert torch.equal(anat.head(h), model(x))
