"""Curvature of a 2-D loss surface on its grid, and the share of the plane where it is non-convex.

Li et al. (2018, section 7) map the ratio ``|λ_min / λ_max|`` of the Hessian's extreme eigenvalues
over a surface: near zero where the loss curves upwards in every direction, large where it also
curves downwards (chaotic surfaces of deep nets without shortcuts). They use the eigenvalues of the
full Hessian at every point; here the Hessian is the 2-D one of the plotted surface ``L(α, β)``,
from central differences on the grid (exact for a quadratic surface): at an interior point with
steps ``h_α``, ``h_β``

    L_αα = (L(α+h, β) - 2 L(α, β) + L(α-h, β)) / h_α²       (L_ββ likewise)
    L_αβ = (L(α+h, β+h) - L(α+h, β-h) - L(α-h, β+h) + L(α-h, β-h)) / (4 h_α h_β)

and ``λ_min <= λ_max`` are the eigenvalues of ``[[L_αα, L_αβ], [L_αβ, L_ββ]]``. Curvature in the
plane bounds the full Hessian's: a surface that curves downwards in the plane has a negative
Hessian eigenvalue, though not conversely (Li et al.).

**Non-convex fraction**: the share of interior grid points where ``λ_min < 0`` and
``|λ_min| > tol * |λ_max|`` (default ``tol = 0.01``): the surface curves downwards along some
direction of the plane by more than 1 % of its strongest curvature there. The tolerance keeps
float32 rounding in nearly straight parts of the surface from counting; edge points are left out
(their differences need both neighbours).
"""
from __future__ import annotations

import numpy as np

__all__ = ["grid_curvatures", "nonconvex_mask", "nonconvex_fraction", "NONCONVEX_TOL"]

NONCONVEX_TOL = 0.01


def _steps(axis: np.ndarray, name: str) -> float:
    axis = np.asarray(axis, dtype=np.float64)
    if len(axis) < 3:
        raise ValueError(f"a curvature needs at least 3 grid points along {name}; got {len(axis)}")
    steps = np.diff(axis)
    if not np.allclose(steps, steps[0], rtol=1e-9, atol=0) or steps[0] <= 0:
        raise ValueError(f"the grid along {name} must be evenly spaced and increasing")
    return float(steps[0])


def grid_curvatures(loss: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(λ_min, λ_max)`` of the central-difference Hessian at every interior point.

    Args:
        loss: ``(len(ys), len(xs))`` surface, ``y`` down the rows (``plane_coordinates``' order).
        xs, ys: the evenly spaced coordinates.

    Returns:
        two ``(len(ys) - 2, len(xs) - 2)`` arrays.
    """
    L = np.asarray(loss, dtype=np.float64)
    hx, hy = _steps(xs, "x"), _steps(ys, "y")
    if L.shape != (len(ys), len(xs)):
        raise ValueError(f"loss has shape {L.shape}; expected (len(ys), len(xs)) = {(len(ys), len(xs))}")
    c = L[1:-1, 1:-1]
    lxx = (L[1:-1, 2:] - 2 * c + L[1:-1, :-2]) / hx ** 2
    lyy = (L[2:, 1:-1] - 2 * c + L[:-2, 1:-1]) / hy ** 2
    lxy = (L[2:, 2:] - L[2:, :-2] - L[:-2, 2:] + L[:-2, :-2]) / (4 * hx * hy)
    mean, radius = (lxx + lyy) / 2, np.sqrt(((lxx - lyy) / 2) ** 2 + lxy ** 2)
    return mean - radius, mean + radius


def nonconvex_mask(lam_min: np.ndarray, lam_max: np.ndarray, tol: float = NONCONVEX_TOL) -> np.ndarray:
    """True where the surface is locally non-convex (module docstring)."""
    return (lam_min < 0) & (np.abs(lam_min) > tol * np.abs(lam_max))


def nonconvex_fraction(loss: np.ndarray, xs: np.ndarray, ys: np.ndarray, tol: float = NONCONVEX_TOL) -> float:
    """Share of interior grid points where the surface is locally non-convex (module docstring)."""
    lam_min, lam_max = grid_curvatures(loss, xs, ys)
    return float(nonconvex_mask(lam_min, lam_max, tol).mean())
