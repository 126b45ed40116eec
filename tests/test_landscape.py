"""Loss landscapes (Li et al. 2018): each definition checked on cases with known answers.

Filter-normalised directions have the weights' per-filter norms and are zero on batch norm and
biases; every engine's surface equals a forward pass of a copy of the net moved to each grid point;
the surface at the origin is the net's own loss; power iteration finds the top eigenvalue of an
explicitly formed Hessian (float64); the grid curvature is exact on quadratic surfaces.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from resnet_probe.landscape import (filter_normalised_direction, grid_axis, grid_curvatures, loss_surface,
                                    nonconvex_fraction, plane_coordinates, power_iteration, random_directions,
                                    top_eigenvalue)
from resnet_probe.landscape.hessian import hessian_vector_product
from resnet_probe.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")   # small tensors: a 2-thread pool stalls on a shared machine


def with_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """``model`` in eval mode with batch-norm statistics and affine parameters away from their defaults."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
                m.weight.copy_(0.5 + torch.rand(m.num_features, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.num_features, generator=g))
    return model.eval()


def explicit_loss(model: nn.Module, directions, point, x, y) -> tuple[float, float]:
    """Loss and error of a copy of ``model`` whose parameters are set to ``θ + Σ c_k d_k`` by hand."""
    moved = copy.deepcopy(model).eval()
    with torch.no_grad():
        for name, p in moved.named_parameters():
            p.copy_(p + sum(float(c) * d[name] for c, d in zip(point, directions)))
        out = moved(x)
    return float(F.cross_entropy(out, y)), float((out.argmax(-1) != y).float().mean())


# ---- directions ---------------------------------------------------------------------------------

def test_filter_normalised_directions_have_the_weights_per_filter_norms_and_leave_bn_and_biases_alone():
    model = with_statistics(build_model("highway", 8))
    d = filter_normalised_direction(model, torch.Generator().manual_seed(0))
    assert set(d) == {n for n, _ in model.named_parameters()}
    for name, p in model.named_parameters():
        if p.dim() > 1:
            torch.testing.assert_close(d[name].flatten(1).norm(dim=1), p.detach().flatten(1).norm(dim=1),
                                       rtol=1e-5, atol=0)
            assert not torch.allclose(d[name], p.detach())       # a random direction, not the weights
        else:                                                     # BN scale / shift, linear and gate biases
            assert torch.count_nonzero(d[name]) == 0, name


def test_directions_are_reproducible_from_their_seed_and_independent_draws_are_nearly_orthogonal():
    model = build_model("residual", 8)
    a1, a2 = random_directions(model, 2, seed=3)
    b1, _ = random_directions(model, 2, seed=3)
    c1, _ = random_directions(model, 2, seed=4)
    assert all(torch.equal(a1[k], b1[k]) for k in a1)
    assert not torch.equal(a1["stem.conv.weight"], c1["stem.conv.weight"])
    flat1, flat2 = (torch.cat([d[k].flatten() for k in d]).double() for d in (a1, a2))
    assert abs(float(flat1 @ flat2 / (flat1.norm() * flat2.norm()))) < 0.05


# ---- surfaces -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(1)
    return torch.randn(12, 3, 32, 32, generator=g), torch.randint(0, 10, (12,), generator=g)


@pytest.mark.parametrize("family", ["plain", "residual", "highway", "preact"])
def test_every_engine_equals_one_explicit_forward_per_grid_point(family, images):
    x, y = images
    torch.manual_seed(0)
    model = with_statistics(build_model(family, 8))
    dirs = random_directions(model, 2, seed=0)
    coords = np.array([[-0.5, 0.25], [0.0, 0.0], [0.5, -0.5]])
    expected = np.array([explicit_loss(model, dirs, c, x, y) for c in coords])
    for engine in ("batched", "pointwise", "loop"):
        got = loss_surface(model, dirs, coords, x, y, engine=engine, points_per_pass=2, batch_size=5)
        np.testing.assert_allclose(got.loss, expected[:, 0], rtol=2e-5, err_msg=engine)
        np.testing.assert_allclose(got.error, expected[:, 1], atol=1.01 / len(y), err_msg=engine)  # a near-tie


def test_a_torchvision_resnet_surface_equals_explicit_forwards(images):
    x, y = images
    torch.manual_seed(0)
    model = with_statistics(torchvision.models.resnet18(num_classes=10))
    dirs = random_directions(model, 1, seed=0)
    coords = np.array([[-0.3], [0.0], [0.6]])
    got = loss_surface(model, dirs, coords, x[:8], y[:8], engine="batched", points_per_pass=3, batch_size=8)
    expected = [explicit_loss(model, dirs, c, x[:8], y[:8])[0] for c in coords]
    np.testing.assert_allclose(got.loss, expected, rtol=2e-5)


def test_the_surface_at_the_origin_is_the_nets_own_loss(images):
    x, y = images
    model = with_statistics(build_model("residual", 14))
    dirs = random_directions(model, 2, seed=5)
    centre = plane_coordinates(grid_axis(5, 1.0), grid_axis(5, 1.0))[12]
    assert tuple(centre) == (0.0, 0.0)
    got = loss_surface(model, dirs, [centre], x, y)
    with torch.no_grad():
        assert got.loss[0] == pytest.approx(float(F.cross_entropy(model(x), y)), rel=1e-5)


def test_surfaces_leave_the_model_as_it_was(images):
    x, y = images
    model = with_statistics(build_model("plain", 8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dirs = random_directions(model, 2, seed=0)
    for engine in ("batched", "loop"):
        loss_surface(model, dirs, [[1.0, -1.0]], x, y, engine=engine)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.training


def test_bad_engine_and_mismatched_coordinates_are_refused(images):
    x, y = images
    model = build_model("plain", 8).eval()
    dirs = random_directions(model, 2, seed=0)
    with pytest.raises(ValueError, match="valid engines: auto, batched, pointwise, loop"):
        loss_surface(model, dirs, [[0.0, 0.0]], x, y, engine="fast")
    with pytest.raises(ValueError, match="1 columns but there are 2 directions"):
        loss_surface(model, dirs, [[0.0]], x, y)


# ---- Hessian ------------------------------------------------------------------------------------

def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(3, 4))
    return with_statistics(net).double()


def explicit_hessian(net: nn.Module, x, y) -> torch.Tensor:
    """The Hessian of the mean cross-entropy, formed entry by entry with autograd over the flat parameters."""
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for _, p in net.named_parameters()]
    flat = torch.cat([p.detach().flatten() for p in net.parameters()])
    buffers = dict(net.named_buffers())

    def loss(v):
        params, i = {}, 0
        for name, shape in zip(names, shapes):
            n = int(np.prod(shape))
            params[name] = v[i:i + n].reshape(shape)
            i += n
        return F.cross_entropy(torch.func.functional_call(net, (params, buffers), (x,)), y)
    return torch.autograd.functional.hessian(loss, flat)


def test_power_iteration_finds_the_top_eigenvalue_of_the_explicit_hessian_float64():
    net = tiny_net()
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(12, 2, 5, 5, generator=g, dtype=torch.float64), torch.randint(0, 4, (12,), generator=g)
    eig = torch.linalg.eigvalsh(explicit_hessian(net, x, y))
    top = eig[eig.abs().argmax()]
    second = eig.abs().sort().values[-2]
    assert second / top.abs() < 0.9                     # a gap power iteration resolves in a few hundred steps
    found = top_eigenvalue(net, x, y, iters=1000, tol=1e-13, seed=0, batch_size=5)
    assert found.converged
    assert found.value == pytest.approx(float(top), rel=1e-9)
    assert not net.training


def test_hessian_vector_products_equal_the_explicit_hessian_times_the_vector_float64():
    net = tiny_net()
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(6, 2, 5, 5, generator=g, dtype=torch.float64), torch.randint(0, 4, (6,), generator=g)
    hvp, theta = hessian_vector_product(net, x, y, batch_size=4)
    v = {k: torch.randn(t.shape, generator=g, dtype=torch.float64) for k, t in theta.items()}
    got = torch.cat([t.flatten() for t in hvp(v).values()])
    expected = explicit_hessian(net, x, y) @ torch.cat([t.flatten() for t in v.values()])
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_power_iteration_on_a_known_matrix_returns_the_signed_dominant_eigenvalue():
    a = torch.diag(torch.tensor([1.0, -5.0, 2.0], dtype=torch.float64))
    found = power_iteration(lambda v: {"w": a @ v["w"]}, {"w": torch.zeros(3, dtype=torch.float64)}, iters=500,
                            tol=1e-14)
    assert found.value == pytest.approx(-5.0, rel=1e-12)


# ---- curvature on the grid ----------------------------------------------------------------------

def test_grid_curvature_is_exact_on_a_quadratic_surface():
    xs, ys = grid_axis(7, 1.0), grid_axis(5, 0.5)
    gx, gy = np.meshgrid(xs, ys)
    a, b, c = 1.5, 0.25, -0.8                            # L = a x^2 + b y^2 + c x y + x - 2 y + 3
    loss = a * gx ** 2 + b * gy ** 2 + c * gx * gy + gx - 2 * gy + 3
    lam_min, lam_max = grid_curvatures(loss, xs, ys)
    expected = np.linalg.eigvalsh(np.array([[2 * a, c], [c, 2 * b]]))
    assert lam_min.shape == (3, 5)
    np.testing.assert_allclose(lam_min, expected[0], rtol=1e-9)
    np.testing.assert_allclose(lam_max, expected[1], rtol=1e-9)


def test_the_nonconvex_fraction_counts_the_points_that_bend_downwards():
    xs = ys = grid_axis(21, 1.0)
    gx, gy = np.meshgrid(xs, ys)
    assert nonconvex_fraction(gx ** 2 + 3 * gy ** 2, xs, ys) == 0.0    # a bowl
    assert nonconvex_fraction(gx ** 2 - gy ** 2, xs, ys) == 1.0        # a saddle everywhere
    # L = x^4 - x^2 + y^2: the grid's second difference in x is 12 x^2 + 2 h^2 - 2 (exact for a quartic), the
    # curvature in y is 2, so an interior point is non-convex where 12 x^2 + 2 h^2 - 2 < -0.01 * 2
    h = xs[1] - xs[0]
    inner = xs[1:-1]
    expected = np.mean(12 * inner ** 2 + 2 * h ** 2 - 2 < -0.02)
    assert 0 < expected < 1
    assert nonconvex_fraction(gx ** 4 - gx ** 2 + gy ** 2, xs, ys) == pytest.approx(expected)


def test_uneven_or_too_small_grids_are_refused():
    with pytest.raises(ValueError, match="evenly spaced"):
        grid_curvatures(np.zeros((3, 3)), np.array([0.0, 1.0, 3.0]), grid_axis(3, 1.0))
    with pytest.raises(ValueError, match="at least 3 grid points"):
        grid_curvatures(np.zeros((2, 3)), grid_axis(3, 1.0), grid_axis(2, 1.0))
