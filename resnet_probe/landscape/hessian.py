"""Extreme eigenvalues of the loss Hessian by power iteration on Hessian-vector products.

``H`` is the Hessian of the mean cross-entropy over a fixed image set with respect to every
trainable parameter, batch normalisation in eval mode (the checkpoint's running statistics). A
Hessian-vector product ``Hv`` is forward-mode differentiation of the gradient
(``torch.func.jvp`` of ``torch.func.grad``), summed over image chunks; ``H`` is never formed.

Power iteration ``v <- Hv / ||Hv||`` converges to the eigenvector of the eigenvalue of largest
magnitude; the Rayleigh quotient ``v·Hv`` (``v`` of unit norm) is the estimate, sign included. It
stops when two successive estimates differ by at most ``tol`` times the latest, or after ``iters``
products. At a minimum the largest-magnitude eigenvalue is the top one, ``λ_max``: the sharpest
curvature of the loss around the checkpoint. (The other end of the spectrum, ``λ_min``, is not
estimated: power iteration on ``H - λ_max I`` stalls on the bulk of near-zero eigenvalues when
``|λ_min| << λ_max``; Li et al. 2018 use a Lanczos solver for it.)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp

__all__ = ["Eigenvalue", "hessian_vector_product", "power_iteration", "top_eigenvalue"]

Vector = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Eigenvalue:
    """A power-iteration estimate.

    Attributes:
        value: the eigenvalue (of ``H``, the shift added back).
        iterations: Hessian-vector products used.
        converged: whether the stopping tolerance was reached within the budget.
    """

    value: float
    iterations: int
    converged: bool


def _dot(a: Vector, b: Vector) -> float:
    return float(sum((a[k].double() * b[k].double()).sum() for k in a))


def hessian_vector_product(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                           batch_size: int = 250) -> tuple[Callable[[Vector], Vector], Vector]:
    """``v -> Hv`` for the mean cross-entropy of ``model`` on ``images``, and the parameters ``θ``.

    The model must be in eval mode while the products are taken (``top_eigenvalue`` does so).
    """
    theta = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
    frozen = {k: p.detach() for k, p in model.named_parameters() if not p.requires_grad}
    buffers = dict(model.named_buffers())
    n = len(labels)

    def loss(params: Vector, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, ({**params, **frozen}, buffers), (x,))
        return F.cross_entropy(out, y, reduction="sum") / n

    def hvp(v: Vector) -> Vector:
        total = {k: torch.zeros_like(t) for k, t in theta.items()}
        for start in range(0, n, batch_size):
            x, y = images[start:start + batch_size], labels[start:start + batch_size]
            _, h = jvp(lambda p: grad(loss)(p, x, y), (theta,), (v,))
            for k in total:
                total[k] += h[k]
        return total

    return hvp, theta


def power_iteration(hvp: Callable[[Vector], Vector], like: Vector, *, iters: int = 20, tol: float = 1e-3,
                    seed: int = 0, shift: float = 0.0) -> Eigenvalue:
    """The largest-magnitude eigenvalue of ``H - shift I``, plus ``shift`` (module docstring; ``shift = 0``:
    of ``H``).

    Args:
        hvp: ``v -> Hv``.
        like: a vector of the right shapes (the parameters).
        iters: most Hessian-vector products.
        tol: relative change of the estimate at which to stop.
        seed: seed of the random start (a CPU generator).
        shift: the eigenvalue shift.
    """
    if iters < 1 or tol < 0:
        raise ValueError(f"power iteration needs iters >= 1 and tol >= 0; got iters={iters}, tol={tol}")
    g = torch.Generator().manual_seed(int(seed))
    v = {k: torch.randn(t.shape, generator=g, dtype=torch.float64).to(t) for k, t in like.items()}
    norm = _dot(v, v) ** 0.5
    v = {k: t / norm for k, t in v.items()}
    estimate, previous = 0.0, None
    for i in range(1, iters + 1):
        w = hvp(v)
        if shift:
            w = {k: w[k] - shift * v[k] for k in w}
        estimate = _dot(v, w)
        norm = _dot(w, w) ** 0.5
        if norm == 0:
            return Eigenvalue(shift, i, True)
        if previous is not None and abs(estimate - previous) <= tol * abs(estimate):
            return Eigenvalue(estimate + shift, i, True)
        previous = estimate
        v = {k: t / norm for k, t in w.items()}
    return Eigenvalue(estimate + shift, iters, False)


def top_eigenvalue(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, iters: int = 20,
                   tol: float = 1e-3, seed: int = 0, batch_size: int = 250) -> Eigenvalue:
    """The largest-magnitude eigenvalue of the loss Hessian at ``model``'s parameters, in eval mode."""
    was_training = model.training
    model.eval()
    try:
        hvp, theta = hessian_vector_product(model, images, labels, batch_size)
        return power_iteration(hvp, theta, iters=iters, tol=tol, seed=seed)
    finally:
        model.train(was_training)
