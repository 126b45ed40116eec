"""Shattered gradients (Balduzzi et al. 2017): the definitions on cases with known answers, and the paper's claim
at initialisation.

A linear model's input gradient is the same everywhere, so its gradients correlate exactly 1 along any
line; the batched input gradients equal one autograd call per input; the correlation length is the
log-linear crossing of 1/2; and at initialisation a deep plain net's gradients decorrelate within a
distance over which a residual net's of the same depth stay almost parallel.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from resnet_probe.batchnorm import calibrate_batchnorm
from resnet_probe.models import build_model
from resnet_probe.shattered import (correlation_length, correlation_with_start, input_gradients, interpolation_line,
                                    random_line)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_linear_models_gradients_correlate_exactly_one_along_every_line():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10)).eval()
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(3, 8, 8, generator=g), torch.randn(3, 8, 8, generator=g)
    for line in (random_line(a, np.geomspace(1e-3, 1e2, 6), g), interpolation_line(a, b, 7)[0]):
        grads = input_gradients(model, line, torch.full((len(line),), 4), target="logit")
        torch.testing.assert_close(grads, model[1].weight[4].detach().reshape(1, 3, 8, 8).expand_as(grads))
        np.testing.assert_allclose(correlation_with_start(grads), 1.0, rtol=0, atol=1e-12)


def test_lines_start_at_the_image_and_hold_the_stated_distances():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(3, 4, 4, generator=g), torch.randn(3, 4, 4, generator=g)
    radii = np.array([0.01, 0.1, 1.0])
    line = random_line(a, radii, g)
    assert torch.equal(line[0], a)
    np.testing.assert_allclose((line[1:] - a).flatten(1).norm(dim=1).numpy(), radii, rtol=1e-5)
    line, dist = interpolation_line(a, b, 5)
    assert torch.equal(line[0], a) and torch.allclose(line[-1], b)
    np.testing.assert_allclose(dist, np.linspace(0, 1, 5) * float((b - a).norm()), rtol=1e-6)


@pytest.mark.parametrize("target", ["logit", "loss"])
def test_batched_input_gradients_equal_one_autograd_call_per_input(target):
    torch.manual_seed(0)
    model = calibrate_batchnorm(build_model("residual", 8), torch.randn(32, 3, 32, 32), 16)
    x, c = torch.randn(5, 3, 32, 32), torch.tensor([0, 3, 3, 9, 1])
    got = input_gradients(model, x, c, target=target, batch_size=2)
    for i in range(len(x)):
        xi = x[i:i + 1].clone().requires_grad_(True)
        out = model(xi)
        value = out[0, c[i]] if target == "logit" else nn.functional.cross_entropy(out, c[i:i + 1])
        (expected,) = torch.autograd.grad(value, xi)
        torch.testing.assert_close(got[i], expected[0], rtol=1e-4, atol=1e-6)


def test_input_gradients_refuse_a_net_in_train_mode():
    with pytest.raises(ValueError, match="eval mode"):
        input_gradients(build_model("plain", 8).train(), torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))


def test_the_correlation_length_is_the_log_linear_crossing_of_one_half():
    d = np.array([1.0, 10.0, 100.0])
    found = correlation_length(d, np.array([0.9, 0.7, 0.3]))
    assert found.bound == "" and found.value == pytest.approx(10 ** 1.5)       # halfway from 0.7 to 0.3 in log d
    assert correlation_length(d, np.array([0.4, 0.2, 0.1])) == type(found)(1.0, "below")
    assert correlation_length(d, np.array([0.9, 0.8, 0.6])) == type(found)(100.0, "above")


def test_calibrated_batchnorm_normalises_in_eval_mode_and_changes_no_parameter():
    torch.manual_seed(0)
    model = build_model("plain", 8)
    params = {k: v.clone() for k, v in model.named_parameters()}
    x = 3.0 + 2.0 * torch.randn(64, 3, 32, 32)
    calibrate_batchnorm(model, x, batch_size=16, batches=4)
    assert not model.training and all(m.momentum == 0.1 for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert all(torch.equal(params[k], v) for k, v in model.named_parameters())
    with torch.no_grad():
        stem = model.stem.bn(model.stem.conv(x))
    assert abs(float(stem.mean())) < 0.05 and float(stem.std()) == pytest.approx(1.0, abs=0.05)


def test_at_initialisation_deep_plain_gradients_shatter_where_residual_ones_stay_parallel():
    """Balduzzi et al. 2017: without shortcuts the correlation of nearby input gradients decays exponentially
    with depth; with them it stays high. At depth 56, a step of 0.01 (images have norm ~55) already decorrelates
    the plain net's gradients."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(64, 3, 32, 32, generator=g)
    corr = {}
    for family in ("plain", "residual"):
        torch.manual_seed(0)
        model = calibrate_batchnorm(build_model(family, 56), images, batch_size=32, batches=2)
        c = [correlation_with_start(input_gradients(model, random_line(images[i], np.array([0.01]), g),
                                                    torch.tensor([i % 10] * 2)))[1] for i in range(6)]
        corr[family] = float(np.mean(c))
    assert corr["residual"] > 0.9
    assert corr["plain"] < 0.5
