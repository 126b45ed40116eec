"""Filter-normalised random directions in parameter space (Li, Xu, Taylor, Studer, Goldstein 2018).

A loss surface is drawn along directions ``d`` around the trained parameters ``θ``:
``L(θ + α d1 + β d2)``. Raw Gaussian directions make surfaces of different nets incomparable,
because a ReLU net with batch normalisation is invariant to the scale of each filter. Li et al.
(section 4) therefore rescale each *filter* of a Gaussian direction to the norm of the corresponding
filter of the weights:

    d_{i,j} <- d_{i,j} / ||d_{i,j}|| * ||θ_{i,j}||,

where ``i`` is a parameter tensor with more than one dimension (convolution and linear weights)
and ``j`` indexes its first dimension (an output channel of a convolution, an output unit of a
linear layer). Parameters of one dimension (batch-norm scales and shifts, biases) get a zero
direction, as in the paper's experiments (``--xignore biasbn`` of their code). Buffers (batch-norm
running statistics) are not parameters and never move.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["Direction", "filter_normalised_direction", "random_directions", "direction_cosine"]

Direction = dict[str, torch.Tensor]
EPS = 1e-10   # Li et al.'s guard for an all-zero random filter


def filter_normalised_direction(model: nn.Module, generator: torch.Generator) -> Direction:
    """One filter-normalised Gaussian direction for every trainable parameter of ``model``.

    Args:
        model: the network whose parameters ``θ`` set the filter norms.
        generator: a CPU generator; the same state gives the same direction on any device.

    Returns:
        parameter name -> direction tensor (the parameter's shape, dtype and device): per filter the
        norm of ``θ``'s filter for parameters of two or more dimensions, zero for the others.
    """
    direction: Direction = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        theta = p.detach()
        if theta.dim() <= 1:
            direction[name] = torch.zeros_like(theta)
            continue
        d = torch.randn(theta.shape, generator=generator, dtype=torch.float64)
        w = theta.double().cpu().flatten(1)
        scale = w.norm(dim=1) / (d.flatten(1).norm(dim=1) + EPS)
        direction[name] = (d * scale.reshape(-1, *[1] * (theta.dim() - 1))).to(theta.dtype).to(theta.device)
    return direction


def random_directions(model: nn.Module, n: int, seed: int) -> list[Direction]:
    """``n`` independent filter-normalised directions drawn with ``seed`` (Li et al. use two for a
    surface; in millions of dimensions two Gaussian directions are nearly orthogonal)."""
    if n < 1:
        raise ValueError(f"n must be a positive number of directions; got {n}")
    generator = torch.Generator().manual_seed(int(seed))
    return [filter_normalised_direction(model, generator) for _ in range(n)]


def direction_cosine(a: Direction, b: Direction) -> float:
    """Cosine between two directions as flat vectors (near 0 for independent draws)."""
    dot = sum(float((a[k].double() * b[k].double()).sum()) for k in a)
    na = sum(float(a[k].double().square().sum()) for k in a) ** 0.5
    nb = sum(float(b[k].double().square().sum()) for k in b) ** 0.5
    return dot / (na * nb) if na and nb else float("nan")
