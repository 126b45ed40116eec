"""Block attributions (captum) read at each block's output; every block output is a cut of the net."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision

from resnet_probe.attribution import block_attributions
from resnet_probe.models import anatomy, build_model

from test_lesion_context import _randomise_bn
from test_paths import _data as random_batch


def _data(n=3, size=8):
    return random_batch(n, size, seed=8)


def _target_logit_gain(model, x, y):
    model.eval()
    with torch.no_grad():
        gain = model(x).gather(1, y[:, None]) - model(torch.zeros_like(x)).gather(1, y[:, None])
    return gain.mean().item()


@pytest.mark.parametrize("method", ["integrated_gradients", "conductance"])
def test_integrated_attributions_at_every_block_sum_to_the_logit_gain(method):
    torch.manual_seed(0)
    model = build_model("residual", 8)
    _randomise_bn(model)
    model = model.double().train()
    x, y = _data()
    df = block_attributions(model, x, y, method=method, n_steps=64)
    assert model.training
    assert list(df["block"]) == anatomy(model).names and (df["method"] == method).all()
    # completeness: all of the input's influence passes through each block output
    np.testing.assert_allclose(df["attribution_signed"], _target_logit_gain(model, x, y), rtol=2e-2)
    assert df["share"].sum() == pytest.approx(1.0)


def test_gradient_x_activation_on_torchvision_is_block_output_times_its_gradient():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)  # in-place ReLUs inside every block
    _randomise_bn(model)
    model = model.double().eval()
    x, y = _data(n=2, size=32)
    df = block_attributions(model, x, y, method="gradient_x_activation", blocks=["layer2.1", "layer4.0"])
    anat = anatomy(model)
    outputs = []
    h = anat.stem(x)
    for b in anat.blocks:
        h = b.forward(h)
        outputs.append(h)
    logit = anat.head(h).gather(1, y[:, None]).sum()
    picked = [outputs[i] for i in anat.resolve(["layer2.1", "layer4.0"])]
    grads = torch.autograd.grad(logit, picked)
    expected = [(o * g).abs().flatten(1).sum(1).mean().item() for o, g in zip(picked, grads)]
    assert list(df["path"]) == ["layer2.1", "layer4.0"]
    np.testing.assert_allclose(df["attribution"], expected, rtol=1e-10)
    assert all(p.grad is None for p in model.parameters())


def test_unknown_method_or_target_raises_naming_the_valid_ones():
    model = build_model("residual", 8)
    x, y = _data()
    with pytest.raises(ValueError, match="gradient_x_activation, integrated_gradients, conductance"):
        block_attributions(model, x.float(), y, method="saliency")
    with pytest.raises(ValueError, match="label, prediction"):
        block_attributions(model, x.float(), y, target="logit")
