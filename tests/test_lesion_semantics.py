"""What deleting a block means, for every family, written out here from the papers' definitions.

Veit, Wilber, Belongie (2016): a deleted block leaves its shortcut. ``zero_branch`` gives
``ReLU(S(x))`` where a ReLU follows the addition (plain, residual, torchvision), ``S(x)`` where none
does (pre-activation); a highway block's gate is forced to carry (``T = 0``), leaving ``S(x)``;
``shortcut_only`` gives ``S(x)`` everywhere. ``S`` is the identity, option A's subsample and
zero-pad, or a 1x1 convolution and BatchNorm (options B at a dimension change and C everywhere;
torchvision's ``downsample``); a plain block, which has no shortcut, is replaced by option A's
mapping. The references below compute ``S`` from the blocks' parameters with explicit formulas, in
float64, and check one identity and one downsampling block of each family, both through the
``lesion`` context manager and through both sweep engines.
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
import torchvision

from resnet_probe.lesion import evaluate_deletion_sets, lesion
from resnet_probe.models import anatomy, build_model

from test_lesion_context import _randomise_bn

TOL = dict(rtol=1e-10, atol=1e-12)  # float64 throughout
MODELS = ["plain-A", "residual-A", "residual-B", "residual-C", "highway-A", "highway-B", "preact-A",
          "preact-C", "resnet18", "resnet50"]
POST_ADD_RELU = {"plain", "residual", "resnet18", "resnet50"}
# (identity block, downsampling block) by module path; resnet50's layer1.0 projects at stride 1
BLOCKS = {"resnet18": ("layer1.1", "layer2.0"), "resnet50": ("layer1.1", "layer1.0"),
          "cifar": ("stage2.1", "stage3.0")}


@functools.lru_cache(maxsize=None)
def _model(name: str):
    """The model, built once for both modes (lesions leave it as it was)."""
    torch.manual_seed(0)
    if name.startswith("resnet"):
        model = getattr(torchvision.models, name)(num_classes=10)
    else:
        family, option = name.split("-")
        model = build_model(family, 14, option=option)
    _randomise_bn(model)
    return model.double().eval()


def _batchnorm(x, bn):
    """Eval-mode BatchNorm written out: (x - running mean) / sqrt(running var + eps) * weight + bias."""
    shape = (1, -1, 1, 1)
    return ((x - bn.running_mean.view(shape)) / torch.sqrt(bn.running_var.view(shape) + bn.eps)
            * bn.weight.view(shape) + bn.bias.view(shape))


def _projection(x, conv, bn):
    return _batchnorm(F.conv2d(x, conv.weight, stride=conv.stride), bn)


def _zero_pad(x, planes):
    """Option A: every other row and column, the missing channels filled with zeros."""
    sub = x[:, :, ::2, ::2]
    return torch.cat([sub, sub.new_zeros(sub.shape[0], planes - sub.shape[1], *sub.shape[2:])], dim=1)


def _shortcut(name: str, module, x):
    """S(x) of a block from its parameters and its family's definition."""
    if name.startswith("resnet"):
        return x if module.downsample is None else _projection(x, module.downsample[0], module.downsample[1])
    family, option = name.split("-")
    planes = module.branch.conv2.weight.shape[0]
    reshapes = module.branch.conv1.stride != (1, 1) or x.shape[1] != planes
    if family != "plain" and (option == "C" or (option == "B" and reshapes)):
        return _projection(x, module.shortcut.conv, module.shortcut.bn)
    return _zero_pad(x, planes) if reshapes else x


def _deleted(name: str, module, x, mode: str):
    s = _shortcut(name, module, x)
    family = name.split("-")[0]
    return F.relu(s) if mode == "zero_branch" and family in POST_ADD_RELU else s


def _data(name: str):
    """Three images, small enough to keep float64 convolutions quick: 8x8 (CIFAR nets: 2x2 maps in
    stage 3), 16x16 (torchvision: 4x4 maps after the stem)."""
    size = 16 if name.startswith("resnet") else 8
    g = torch.Generator().manual_seed(7)
    return (torch.randn(3, 3, size, size, generator=g, dtype=torch.float64),
            torch.randint(0, 10, (3,), generator=g))


@pytest.mark.parametrize("mode", ["zero_branch", "shortcut_only"])
@pytest.mark.parametrize("name", MODELS)
def test_a_deleted_block_outputs_its_shortcut_as_its_family_defines(name, mode):
    model = _model(name)
    anat = anatomy(model)
    x, y = _data(name)
    paths = BLOCKS.get(name, BLOCKS["cifar"])
    with torch.no_grad():
        inputs = [anat.stem(x)]
        for b in anat.blocks:
            inputs.append(b.module(inputs[-1]))
    indices, expected_logits = [], []
    for path, downsampling in zip(paths, (False, True)):
        (i,) = anat.resolve(path)
        block = anat.blocks[i]
        assert block.downsampling == downsampling, path
        h = inputs[i]
        # a block's input follows a ReLU (or, pre-activation, a sum): shifted, it has negative values
        # too, so that zero_branch's ReLU is seen to act
        h_signed = h - h.mean()
        with torch.no_grad():
            expected = _deleted(name, block.module, h_signed, mode)
            intact = block.module(h_signed)
            with lesion(model, blocks=[path], mode=mode):
                got = block.module(h_signed)
            assert got.shape == expected.shape == intact.shape
            torch.testing.assert_close(got, expected, **TOL, msg=lambda m: f"{path}: {m}")
            assert not torch.allclose(got, intact)  # the block did change
            out = _deleted(name, block.module, h, mode)  # the whole model with that block deleted
            for b in anat.blocks[i + 1:]:
                out = b.module(out)
        indices.append(i)
        expected_logits.append(anat.head(out))
    for engine in ("batched", "loop"):
        result = evaluate_deletion_sets(model, [[i] for i in indices], x, y, mode=mode, engine=engine,
                                        return_logits=True)
        torch.testing.assert_close(result.logits, torch.stack(expected_logits), **TOL, msg=lambda m: f"{engine}: {m}")
