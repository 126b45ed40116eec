"""Gradient by path length: the exact stack, Veit et al.'s sampled estimator, and how they agree."""
from __future__ import annotations

import itertools
from math import comb

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from resnet_probe.models import anatomy, build_model
from resnet_probe.paths import (effective_paths, net_gradient_by_length, path_gradient_stack,
                                path_length_distribution, sampled_path_gradients,
                                sampled_path_magnitudes, single_path_gradients)

from test_lesion_context import _randomise_bn


def _net(family="residual", depth=8, **kw):
    torch.manual_seed(0)
    model = build_model(family, depth, **kw)
    _randomise_bn(model)
    return model.double()


def _data(n=2, size=8, seed=6):
    """``n`` float64 images of ``size`` x ``size`` and their labels, from a fixed seed."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, size, size, generator=g, dtype=torch.float64),
            torch.randint(0, 10, (n,), generator=g))


def _autograd_input_gradient(model, x, y):
    model.eval()
    x = x.clone().requires_grad_(True)
    return torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), x)[0]


def _assert_close(actual, expected):
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=1e-8, atol=1e-12 * scale)


def test_path_lengths_are_binomial():
    for n in (1, 3, 54):
        pmf = path_length_distribution(n)
        np.testing.assert_allclose(pmf, [comb(n, k) / 2 ** n for k in range(n + 1)], rtol=1e-12)


@pytest.mark.parametrize("family, depth, option", [("residual", 8, "A"), ("residual", 20, "A"),
                                                   ("residual", 8, "B"), ("preact", 8, "A")])
def test_the_path_length_stack_sums_to_the_input_gradient(family, depth, option):
    model = _net(family, depth, option=option).train()
    x, y = _data()
    stack = path_gradient_stack(model, x, y)
    assert model.training  # evaluated in eval mode, mode restored
    assert stack.shape == (len(anatomy(model).blocks) + 1, *x.shape)
    _assert_close(stack.sum(0), _autograd_input_gradient(model, x, y))


def test_the_path_length_stack_of_torchvision_resnet18_sums_to_the_input_gradient():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    _randomise_bn(model)
    model = model.double()
    x, y = _data(size=32)
    stack = path_gradient_stack(model, x, y)
    assert stack.shape[0] == 9
    _assert_close(stack.sum(0), _autograd_input_gradient(model, x, y))


def _two_block_net():
    """A depth-8 CIFAR net cut to its first two blocks (stage1.block1, stage2.block1)."""
    model = _net()
    model.stage3 = nn.Sequential()
    model.head.fc = nn.Linear(32, 10).double()
    return model.eval()


def test_the_stack_of_a_two_block_net_is_the_hand_enumeration_of_its_four_paths():
    model = _two_block_net()
    anat = anatomy(model)
    assert len(anat.blocks) == 2
    x, y = _data()
    x = x.clone().requires_grad_(True)
    h0 = anat.stem(x)
    b1, b2 = anat.blocks
    f1, s1 = b1.branch(h0), b1.shortcut(h0)
    h1 = F.relu(f1 + s1)
    f2, s2 = b2.branch(h1), b2.shortcut(h1)
    h2 = F.relu(f2 + s2)
    loss = F.cross_entropy(anat.head(h2), y, reduction="sum")
    grad = lambda out, inp, cot: torch.autograd.grad(out, inp, cot, retain_graph=True)[0]  # noqa: E731
    top = grad(loss, h2, None)
    at_h1 = {"S": grad(s2, h1, top * (h2 > 0)), "F": grad(f2, h1, top * (h2 > 0))}
    paths = {}
    for second, g in at_h1.items():
        for first, part in (("S", s1), ("F", f1)):
            paths[first + second] = grad(h0, x, grad(part, h0, g * (h1 > 0)))
    stack = path_gradient_stack(model, x.detach(), y)
    _assert_close(stack[0], paths["SS"])
    _assert_close(stack[1], paths["FS"] + paths["SF"])
    _assert_close(stack[2], paths["FF"])


def test_single_paths_summed_over_all_sets_of_k_blocks_are_the_stack_entry_k():
    model = _net(depth=14)
    x, y = _data()
    n = len(anatomy(model).blocks)
    subsets = [s for k in range(n + 1) for s in itertools.combinations(range(n), k)]
    single = single_path_gradients(model, x, y, subsets)
    stack = path_gradient_stack(model, x, y)
    sizes = np.array([len(s) for s in subsets])
    for k in range(n + 1):
        _assert_close(single[torch.from_numpy(sizes == k)].sum(0), stack[k])


def test_sampled_magnitudes_agree_with_the_enumeration_within_sampling_error():
    model = _net(depth=14)
    x, y = _data()
    anat = anatomy(model)
    n = len(anat.blocks)
    sampled = sampled_path_gradients(model, x, y, ks=[2, 3], samples_per_k=200, seed=1, sets_per_pass=200)
    summary = sampled_path_magnitudes(sampled, n)
    for k in (2, 3):
        subsets = list(itertools.combinations(range(n), k))
        enumerated = single_path_gradients(model, x, y, subsets).flatten(2).norm(dim=-1).mean(1).numpy()
        exact_by_path = {"+".join(anat.blocks[i].name for i in s): m for s, m in zip(subsets, enumerated)}
        rows = sampled[sampled["path_length"] == k]
        np.testing.assert_allclose(rows["magnitude"], [exact_by_path[b] for b in rows["branches"]], rtol=1e-10)
        row = summary.set_index("path_length").loc[k]
        assert row["n_paths"] == len(subsets) and row["n_samples"] == 200
        assert abs(row["per_path_magnitude"] - enumerated.mean()) < 4 * enumerated.std() / np.sqrt(200)


def test_net_gradient_is_the_norm_of_the_stack_entry():
    model = _net(depth=14)
    x, y = _data()
    stack = path_gradient_stack(model, x, y)
    table = net_gradient_by_length(stack)
    norms = stack.flatten(2).norm(dim=-1).mean(1).numpy()
    np.testing.assert_allclose(table["net_gradient_norm"], norms, rtol=1e-12)
    assert table["net_share"].sum() == pytest.approx(1.0)


def _veit_total_and_net(model, x, y):
    """Per length k: C(n, k) x the mean single-path magnitude over ALL length-k paths (Veit's total, enumerated)
    and ||G[k]|| of the exact stack, per image averaged over the images."""
    n = len(anatomy(model).blocks)
    net = path_gradient_stack(model, x, y).flatten(2).norm(dim=-1).mean(1).numpy()
    veit = []
    for k in range(n + 1):
        subsets = [list(s) for s in itertools.combinations(range(n), k)]
        paths = single_path_gradients(model, x, y, subsets)                  # (C(n, k), B, ...)
        veit.append(paths.flatten(2).norm(dim=-1).sum(0).mean().item())    # = C(n, k) x mean magnitude
    return np.array(veit), net


def _linear_preact_net():
    """A pre-activation net whose branches act as positive multiples of the shortcut map: identity 3x3 taps,
    BN biases large enough that every ReLU passes, so each path's gradient is a positive multiple of the
    same vector and no two paths can cancel."""
    model = _net("preact", depth=8)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.zero_()
                for c in range(min(m.in_channels, m.out_channels)):
                    m.weight[c, c, 1, 1] = 0.5 if m.kernel_size == (3, 3) else 1.0
            elif isinstance(m, nn.BatchNorm2d):
                m.running_mean.zero_()
                m.running_var.fill_(1.0)
                m.weight.fill_(0.8)
                m.bias.fill_(1e3)
    return model


def test_veits_total_equals_the_net_gradient_only_where_paths_cannot_cancel():
    """||G[k]|| = ||sum_A g_A|| <= sum_A ||g_A|| (Veit's total): equal on a net whose path gradients all point
    the same way, strictly smaller on a trained-like net where they cancel."""
    x, y = _data(n=2, size=8)
    veit, net = _veit_total_and_net(_linear_preact_net(), x, y)
    np.testing.assert_allclose(net, veit, rtol=1e-9)
    veit, net = _veit_total_and_net(_net("residual", depth=8), x, y)
    assert (net <= veit * (1 + 1e-12)).all()
    assert (net[1:-1] < 0.95 * veit[1:-1]).any()                           # cancellation between paths


def test_effective_paths_is_the_shortest_band_holding_the_mass():
    table = pd.DataFrame({"path_length": range(6), "total_magnitude": [0.0, 1.0, 8.0, 1.0, 0.0, 0.0]})
    assert effective_paths(table, mass=0.8) == effective_paths(table, mass=0.8)
    band = effective_paths(table, mass=0.8)
    assert (band.lo, band.hi, band.share) == (2, 2, pytest.approx(0.8))
    band = effective_paths(table, mass=0.9)
    assert (band.lo, band.hi) == (1, 2)
    assert (effective_paths(table, mass=1.0).lo, effective_paths(table, mass=1.0).hi) == (1, 3)


@pytest.mark.parametrize("family", ["plain", "highway"])
def test_nets_without_additive_shortcuts_are_refused(family):
    x, y = _data()
    with pytest.raises(ValueError, match="needs blocks that add an identity-style shortcut"):
        path_gradient_stack(_net(family), x, y)
