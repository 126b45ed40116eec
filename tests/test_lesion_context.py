"""Reversible lesions and reorderings: what deleting a block means, and that nothing is left behind."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision

from resnet_probe.lesion import check_order, evaluation, lesion, reordered
from resnet_probe.models import FAMILIES, anatomy, build_model


def _net(family: str, depth: int = 14) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(family, depth).eval()
    _randomise_bn(model)
    return model


def _randomise_bn(model: torch.nn.Module) -> None:
    """Give BN layers non-trivial statistics, as a trained net has (fresh BN is the identity)."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
            m.bias.data.copy_(0.1 * torch.randn(m.num_features, generator=g))


def _images(n: int = 4, size: int = 16) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(2))


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("family", FAMILIES)
def test_empty_lesion_is_the_identity(family):
    model, x = _net(family), _images()
    with torch.no_grad():
        before = model(x)
        with lesion(model, blocks=[]) as deleted:
            during = model(x)
    assert deleted == ()
    assert torch.equal(before, during)


@pytest.mark.parametrize("family", ["residual", "plain"])
def test_zero_branch_on_an_identity_shortcut_block_returns_its_input(family):
    model, x = _net(family), _images()
    anat = anatomy(model)
    h = anat.stem(x)  # post-ReLU, so ReLU(S(h)) = h for the identity shortcut
    block = anat.blocks[0]
    assert not block.downsampling
    with torch.no_grad(), lesion(model, blocks=[block.name], mode="zero_branch"):
        assert torch.equal(block.module(h), h)


def test_zero_branch_on_a_torchvision_basic_block_returns_its_input():
    model = torchvision.models.resnet18(num_classes=10).eval()
    anat = anatomy(model)
    with torch.no_grad():
        h = anat.stem(_images(2, 32))
        with lesion(model, blocks=["layer1.0"]):
            assert torch.equal(anat.blocks[0].module(h), h)


@pytest.mark.parametrize("family", FAMILIES)
def test_lesioned_model_is_the_anatomy_forward_with_blocks_replaced(family):
    model, x = _net(family), _images()
    anat = anatomy(model)
    deleted = {1, 2, 5}  # includes stage2.block1, a downsampling block
    with torch.no_grad():
        h = anat.stem(x)
        for i, b in enumerate(anat.blocks):
            h = b.lesioned(h, "shortcut_only") if i in deleted else b.forward(h)
        expected = anat.head(h)
        with lesion(model, blocks=sorted(deleted), mode="shortcut_only"):
            assert torch.equal(model(x), expected)


def test_a_highway_lesion_is_the_gate_forced_to_carry():
    model, x = _net("highway"), _images()
    anat = anatomy(model)
    block = anat.blocks[2]
    with torch.no_grad():
        h = anat.stem(x)
        for b in anat.blocks[:2]:
            h = b.forward(h)
        s = block.shortcut(h)
        closed = block.combine(block.branch(h), s, torch.zeros_like(s))
        with lesion(model, blocks=[block.name]):
            assert torch.equal(block.module(h), closed)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_torchvision_lesions_restore_bitwise_also_after_an_exception(arch):
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(num_classes=10).eval()
    x, state = _images(2, 32), _state(model)
    names = anatomy(model).names
    with torch.no_grad():
        before = model(x)
        with lesion(model, blocks=names[1::2]):
            assert not torch.equal(model(x), before)
        assert torch.equal(model(x), before)
        with pytest.raises(RuntimeError, match="inside the lesion"):
            with lesion(model, blocks=names[:3], mode="shortcut_only"):
                raise RuntimeError("inside the lesion")
        assert torch.equal(model(x), before)
    assert _same_state(state, model.state_dict())
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_lesions_nest_and_unwind():
    model, x = _net("residual"), _images()
    with torch.no_grad():
        before = model(x)
        with lesion(model, blocks=[1]):
            one = model(x)
            with lesion(model, blocks=[1, 4], mode="shortcut_only"):
                assert not torch.equal(model(x), one)
            assert torch.equal(model(x), one)
        assert torch.equal(model(x), before)


def test_an_unknown_block_raises_naming_the_valid_ones():
    model = _net("residual", 8)
    with pytest.raises(ValueError, match="stage1.block1, stage2.block1, stage3.block1"):
        with lesion(model, blocks=["stage9.block1"]):
            pass
    with pytest.raises(ValueError, match="out of range 0..2"):
        with lesion(model, blocks=[3]):
            pass
    with pytest.raises(ValueError, match="zero_branch, shortcut_only"):
        with lesion(model, blocks=[0], mode="drop"):
            pass


def test_reordering_runs_blocks_in_the_given_order_and_restores():
    model, x = _net("residual", 20), _images()
    anat = anatomy(model)
    order = list(range(len(anat.blocks)))
    order[1], order[2] = order[2], order[1]
    order[7], order[8] = order[8], order[7]
    with torch.no_grad():
        before = model(x)
        h = anat.stem(x)
        for i in order:
            h = anat.blocks[i].forward(h)
        expected = anat.head(h)
        with reordered(model, order):
            assert torch.equal(model(x), expected)
        assert torch.equal(model(x), before)


def test_reordering_refuses_moves_across_stages_or_of_downsampling_blocks():
    anat = anatomy(_net("residual", 20))
    with pytest.raises(ValueError, match="permutation"):
        check_order(anat, [0, 0, 1, 2, 3, 4, 5, 6, 7])
    with pytest.raises(ValueError, match="same stage"):
        check_order(anat, [0, 1, 4, 3, 2, 5, 6, 7, 8])  # stage2.block2 into stage1
    with pytest.raises(ValueError, match="non-downsampling"):
        check_order(anat, [0, 1, 2, 4, 3, 5, 6, 7, 8])  # stage2.block1 is downsampling


def test_evaluation_restores_each_module_mode():
    model = _net("residual", 8).train()
    model.stage2.eval()
    with evaluation(model):
        assert not any(m.training for m in model.modules())
    assert model.training and model.stage1.training and not model.stage2.training


def test_zero_branch_keeps_the_post_add_relu_and_shortcut_only_drops_it():
    z = _images()[:, :1].expand(-1, 16, -1, -1).contiguous()  # has negative entries
    residual = anatomy(_net("residual")).blocks[0]
    preact = anatomy(_net("preact")).blocks[0]
    assert torch.equal(residual.lesioned(z, "zero_branch"), F.relu(z))
    assert torch.equal(residual.lesioned(z, "shortcut_only"), z)
    assert torch.equal(preact.lesioned(z, "zero_branch"), z)  # no ReLU after its addition
