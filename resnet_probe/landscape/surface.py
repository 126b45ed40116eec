"""Loss surfaces ``L(θ + Σ_k c_k d_k)`` on a grid of coordinates (Li et al. 2018).

The loss at a grid point is the mean cross-entropy of the network with parameters
``θ + c_1 d_1 + c_2 d_2`` (``directions``) over a fixed set of images, in eval mode: batch
normalisation uses the checkpoint's running statistics, which never move (the directions are zero on
batch-norm parameters, and running statistics are not parameters). The top-1 error is recorded too.

Engines (the same numbers, up to float32 rounding; the tests check it):

- ``loop``: Li et al.'s procedure and the reference: a copy of the model, the point's parameters
  written into it, one forward pass over the images per grid point, the model as it is.
- ``pointwise``: one grid point per pass through ``torch.func.functional_call``, with every
  batch norm folded into the convolution before it (``fold_batchnorm``; exact in eval mode because
  the directions leave batch norm alone, so a folded direction is the fold of ``θ + d`` minus the
  fold of ``θ``, computed in float64) and channels-last tensors.
- ``batched``: ``points_per_pass`` grid points per pass: their parameters stacked along a new first
  dimension and the folded network mapped over it with ``torch.func.vmap`` (convolutions become
  grouped convolutions, one group per point). This pays off where a pass is bound by kernel launches
  (small nets on a GPU); on a CPU a pass is bound by arithmetic, and grouped convolutions are slower
  than the same convolutions one point at a time (``benchmarks/bench_landscape.py``).
- ``auto``: ``batched`` on CUDA, ``pointwise`` elsewhere.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from ..models import fold_batchnorm
from .directions import Direction

__all__ = ["ENGINES", "SurfaceValues", "grid_axis", "plane_coordinates", "loss_surface"]

ENGINES = ("auto", "batched", "pointwise", "loop")


@dataclass(frozen=True)
class SurfaceValues:
    """The surface at ``P`` grid points.

    Attributes:
        coords: ``(P, K)`` coordinates along the ``K`` directions.
        loss: ``(P,)`` mean cross-entropy (nats) over the images.
        error: ``(P,)`` top-1 error (fraction) over the images.
    """

    coords: np.ndarray
    loss: np.ndarray
    error: np.ndarray


def grid_axis(points: int, span: float) -> np.ndarray:
    """``points`` evenly spaced coordinates from ``-span`` to ``span`` (Li et al.: [-1, 1])."""
    if points < 1 or span <= 0:
        raise ValueError(f"a grid axis needs points >= 1 and span > 0; got points={points}, span={span}")
    return np.linspace(-span, span, points) if points > 1 else np.zeros(1)


def plane_coordinates(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """``(len(ys) * len(xs), 2)`` coordinates of the plane, row by row: point ``i * len(xs) + j`` is
    ``(xs[j], ys[i])``, so ``loss.reshape(len(ys), len(xs))`` is the surface with ``y`` down the rows."""
    gx, gy = np.meshgrid(xs, ys)
    return np.stack([gx.ravel(), gy.ravel()], axis=1)


def loss_surface(model: nn.Module, directions: Sequence[Direction], coords, images: torch.Tensor,
                 labels: torch.Tensor, *, engine: str = "auto", points_per_pass: int = 8,
                 batch_size: int = 250) -> SurfaceValues:
    """Mean loss and error of ``model`` moved to each grid point, on ``images``.

    Args:
        model: the trained network (not modified; evaluated in eval mode).
        directions: ``K`` directions (``filter_normalised_direction``); a parameter missing from a
            direction does not move along it.
        coords: ``(P, K)`` coordinates of the grid points.
        images, labels: the fixed image set, on the model's device.
        engine: ``auto``, ``batched``, ``pointwise`` or ``loop`` (module docstring).
        points_per_pass: grid points per pass of the ``batched`` engine.
        batch_size: images per pass.
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; valid engines: {', '.join(ENGINES)}")
    coords = np.asarray(coords, dtype=np.float64).reshape(len(coords), -1)
    if coords.shape[1] != len(directions):
        raise ValueError(f"coords have {coords.shape[1]} columns but there are {len(directions)} directions")
    if points_per_pass < 1 or batch_size < 1:
        raise ValueError(f"points_per_pass and batch_size must be positive; got {points_per_pass}, {batch_size}")
    if engine == "auto":
        engine = "batched" if images.device.type == "cuda" else "pointwise"
    if engine == "loop":
        loss, error = _loop(model, directions, coords, images, labels, batch_size)
    else:
        net, base, dirs, buffers = _folded(model, directions)
        if images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        per_pass = points_per_pass if engine == "batched" else 1
        loss, error = np.zeros(len(coords)), np.zeros(len(coords))
        for start in range(0, len(coords), per_pass):
            chunk = coords[start:start + per_pass]
            params = _moved(base, dirs, chunk, stacked=engine == "batched")
            sums = _batched_sums if engine == "batched" else _point_sums
            loss[start:start + len(chunk)], error[start:start + len(chunk)] = sums(
                net, params, buffers, images, labels, batch_size)
        loss, error = loss / len(labels), error / len(labels)
    return SurfaceValues(coords, loss, error)


# ---- engines -----------------------------------------------------------------------------------

def _point_at(directions: Sequence[Direction], c: np.ndarray, name: str, p: torch.Tensor) -> torch.Tensor:
    """``p + Σ_k c_k d_k[name]``, summed in float64."""
    moved = p.detach().double()
    for ck, d in zip(c, directions):
        if name in d:
            moved = moved + float(ck) * d[name].double()
    return moved.to(p.dtype)


def _loop(model, directions, coords, images, labels, batch_size) -> tuple[np.ndarray, np.ndarray]:
    net = copy.deepcopy(model).eval()
    theta = {k: p.detach().clone() for k, p in model.named_parameters()}
    loss, error = np.zeros(len(coords)), np.zeros(len(coords))
    with torch.no_grad():
        for i, c in enumerate(coords):
            for name, p in net.named_parameters():
                p.copy_(_point_at(directions, c, name, theta[name]))
            for start in range(0, len(labels), batch_size):
                x, y = images[start:start + batch_size], labels[start:start + batch_size]
                out = net(x)
                loss[i] += float(F.cross_entropy(out, y, reduction="sum").double())
                error[i] += float((out.argmax(-1) != y).sum())
    return loss / len(labels), error / len(labels)


def _folded(model: nn.Module, directions: Sequence[Direction]):
    """The folded network, its parameters ``θ'``, the folded directions and its buffers.

    The fold is affine in the convolution weights for fixed batch-norm parameters and statistics,
    so the folded direction ``d'`` is ``fold(θ + d) - fold(θ)``, both folds in float64.
    """
    bn_params = {f"{m}.{n}" if m else n for m, mod in model.named_modules()
                 if isinstance(mod, nn.modules.batchnorm._BatchNorm) for n, _ in mod.named_parameters(recurse=False)}
    moving = sorted(k for d in directions for k in bn_params if k in d and bool(d[k].any()))
    if moving:
        raise ValueError(f"the directions move batch-norm parameters ({moving[0]}, ...); folding needs them fixed "
                         "(Li et al.: zero on batch norm) - use engine='loop'")
    dtype = next(model.parameters()).dtype
    double = copy.deepcopy(model).double().eval()
    net = fold_batchnorm(model).eval()
    folded = {k: p.detach() for k, p in fold_batchnorm(double).named_parameters()}
    dirs = []
    for d in directions:
        moved = copy.deepcopy(double)
        with torch.no_grad():
            for name, p in moved.named_parameters():
                if name in d:
                    p.add_(d[name].double())
        dirs.append({k: _layout(p.detach() - folded[k], dtype) for k, p in fold_batchnorm(moved).named_parameters()})
    base = {k: _layout(v, dtype) for k, v in folded.items()}
    net = net.to(memory_format=torch.channels_last)
    return net, base, dirs, dict(net.named_buffers())


def _layout(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    t = t.to(dtype)
    return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t


def _moved(base: dict, dirs: list[dict], chunk: np.ndarray, stacked: bool) -> dict:
    """Parameters at the grid points of ``chunk``: ``(Q, *shape)`` when ``stacked``, else of the one point."""
    out = {}
    for name, theta in base.items():
        if stacked:
            c = torch.as_tensor(chunk, dtype=theta.dtype, device=theta.device)
            step = sum(c[:, k].reshape(-1, *[1] * theta.dim()) * d[name] for k, d in enumerate(dirs))
            out[name] = theta.unsqueeze(0) + step
        else:
            out[name] = theta + sum(float(ck) * d[name] for ck, d in zip(chunk[0], dirs))
    return out


def _point_sums(net, params, buffers, images, labels, batch_size) -> tuple[float, float]:
    loss = error = 0.0
    with torch.no_grad():
        for start in range(0, len(labels), batch_size):
            x, y = images[start:start + batch_size], labels[start:start + batch_size]
            out = functional_call(net, (params, buffers), (x,))
            loss += float(F.cross_entropy(out, y, reduction="sum").double())
            error += float((out.argmax(-1) != y).sum())
    return loss, error


def _batched_sums(net, params, buffers, images, labels, batch_size) -> tuple[np.ndarray, np.ndarray]:
    def logits(p, x):
        return functional_call(net, (p, buffers), (x,))

    points = next(iter(params.values())).shape[0]
    loss, error = torch.zeros(points, dtype=torch.float64), torch.zeros(points, dtype=torch.float64)
    with torch.no_grad():
        for start in range(0, len(labels), batch_size):
            x, y = images[start:start + batch_size], labels[start:start + batch_size]
            with warnings.catch_warnings():
                # adaptive average pooling falls back to a per-point loop for one view: a small part of a pass
                warnings.filterwarnings("ignore", message=".*batching rule for aten::as_strided_.*")
                out = vmap(logits, in_dims=(0, None))(params, x)        # (points, n, classes)
            ce = F.cross_entropy(out.flatten(0, 1), y.repeat(points), reduction="none").view(points, -1)
            loss += ce.double().sum(1).cpu()
            error += (out.argmax(-1) != y).double().sum(1).cpu()
    return loss.numpy(), error.numpy()
