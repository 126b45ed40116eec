"""Shattered gradients (Balduzzi, Frean, Leary, Lewis, Ma, McWilliams 2017): how fast do input gradients
decorrelate as the input moves?

Balduzzi et al. feed a network the inputs of a line and look at the gradient of its output with
respect to each input: in deep plain nets neighbouring gradients are nearly uncorrelated ("white
noise", the correlation decaying exponentially with depth, ~2^-L at initialisation), in residual
nets they stay correlated (decaying like 1/sqrt(L), more slowly still with batch normalisation).

Here the inputs are images along two kinds of line from a start image ``x_0``:

- ``random``: ``x_0 + r u`` for a Gaussian direction ``u`` of unit L2 norm and log-spaced radii
  ``r`` (small steps up to large ones: the correlation falls over orders of magnitude of distance);
- ``interpolation``: ``x_0 + t (x_1 - x_0)`` towards another image ``x_1``, ``t`` evenly spaced in
  [0, 1] (distance ``t ||x_1 - x_0||``).

At each point, ``g`` is the gradient with respect to the input of the ``target``: the logit of a
fixed class (``logit``, the start image's label; Balduzzi et al.'s nets have one output) or the
cross-entropy with that label (``loss``), the network in eval mode. The correlation of two
gradients is Pearson's over the input's coordinates (pixels x channels): ``corr(g, g') =
(g - mean g)·(g' - mean g') / (||g - mean g|| ||g' - mean g'||)``, exactly 1 for any two points of
a linear model (its gradient is the same everywhere). The study reports ``C(r)``, the mean over start
images of ``corr(g(x_0), g(x_0 + r u))``: the correlation as a function of the input distance.
Balduzzi et al. average ``corr(g_i, g_{i+k})`` over all pairs of an evenly spaced line (an
autocorrelation at lag ``k``); correlating with the start point instead lets one line span
distances from 10^-3 to 10^2. The *correlation length* is the distance at which ``C`` first falls
below 1/2 (interpolated linearly in log distance).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CorrelationLength", "LINE_KINDS", "TARGETS", "correlation_length", "correlation_with_start",
           "input_gradients", "interpolation_line", "random_line"]

LINE_KINDS = ("interpolation", "random")
TARGETS = ("logit", "loss")
HALF = 0.5


def interpolation_line(a: torch.Tensor, b: torch.Tensor, points: int) -> tuple[torch.Tensor, np.ndarray]:
    """``points`` evenly spaced inputs from ``a`` to ``b`` (both included) and their L2 distances from ``a``."""
    if points < 2:
        raise ValueError(f"a line needs at least 2 points; got {points}")
    t = torch.linspace(0, 1, points, dtype=torch.float64)
    line = a + t.to(a).reshape(-1, *[1] * a.dim()) * (b - a)
    return line, t.numpy() * float((b - a).double().norm())


def random_line(a: torch.Tensor, radii: np.ndarray, generator: torch.Generator) -> torch.Tensor:
    """``a`` followed by ``a + r u`` for each radius, ``u`` a Gaussian direction of unit L2 norm drawn from
    ``generator`` (CPU): ``(1 + len(radii), ...)`` inputs."""
    radii = np.asarray(radii, dtype=np.float64)
    if len(radii) < 1 or (radii <= 0).any():
        raise ValueError(f"a random line needs positive radii; got {radii}")
    u = torch.randn(a.shape, generator=generator, dtype=torch.float64)
    u = (u / u.norm()).to(a)
    r = torch.as_tensor(radii).to(a).reshape(-1, *[1] * a.dim())
    return torch.cat([a[None], a + r * u])


def input_gradients(model: nn.Module, inputs: torch.Tensor, classes: torch.Tensor, *, target: str = "logit",
                    batch_size: int = 256) -> torch.Tensor:
    """The gradient of ``target`` with respect to each input, ``inputs``' shape.

    Args:
        model: in eval mode (so each output depends on its own input only, and the gradient of the
            summed target is every input's own gradient).
        inputs: ``(N, ...)`` inputs.
        classes: ``(N,)`` the class whose logit (``logit``) or cross-entropy (``loss``) is differentiated.
        target: ``logit`` or ``loss``.
        batch_size: inputs per backward pass.
    """
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; valid targets: {', '.join(TARGETS)}")
    if model.training:
        raise ValueError("input gradients are taken in eval mode (in train mode batch norm mixes the inputs)")
    out = []
    for start in range(0, len(inputs), batch_size):
        x = inputs[start:start + batch_size].detach().clone().requires_grad_(True)
        c = classes[start:start + batch_size]
        logits = model(x)
        value = (logits.gather(1, c[:, None]).sum() if target == "logit"
                 else F.cross_entropy(logits, c, reduction="sum"))
        (g,) = torch.autograd.grad(value, x)
        out.append(g.detach())
    return torch.cat(out)


def correlation_with_start(gradients: torch.Tensor) -> np.ndarray:
    """``(T,)`` Pearson correlations (float64) of each gradient ``(T, ...)`` with the first, over their coordinates."""
    g = gradients.detach().flatten(1).double()
    g = g - g.mean(dim=1, keepdim=True)
    g = g / g.norm(dim=1, keepdim=True)
    return (g @ g[0]).cpu().numpy()


@dataclass(frozen=True)
class CorrelationLength:
    """Where a correlation curve first falls below 1/2.

    Attributes:
        value: the distance (interpolated linearly in log distance), or the bound.
        bound: ``""`` when measured; ``"below"`` when already under 1/2 at the first distance (the length is
            at most ``value``); ``"above"`` when never under 1/2 (at least ``value``, the last distance).
    """

    value: float
    bound: str = ""


def correlation_length(distance: np.ndarray, corr: np.ndarray) -> CorrelationLength:
    """Correlation length of ``corr`` over increasing positive ``distance`` (module docstring)."""
    distance, corr = np.asarray(distance, dtype=np.float64), np.asarray(corr, dtype=np.float64)
    if len(distance) != len(corr) or not len(distance) or (distance <= 0).any() or (np.diff(distance) <= 0).any():
        raise ValueError("distances must be positive and increasing, one per correlation")
    below = np.flatnonzero(corr < HALF)
    if not len(below):
        return CorrelationLength(float(distance[-1]), "above")
    k = int(below[0])
    if k == 0:
        return CorrelationLength(float(distance[0]), "below")
    d0, d1, c0, c1 = np.log(distance[k - 1]), np.log(distance[k]), corr[k - 1], corr[k]
    return CorrelationLength(float(np.exp(d0 + (c0 - HALF) / (c0 - c1) * (d1 - d0))))
