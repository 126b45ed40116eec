"""Loss landscapes (Li, Xu, Taylor, Studer, Goldstein 2018, "Visualizing the Loss Landscape of Neural Nets").

``random_directions`` draws filter-normalised directions (zero on batch norm and biases);
``loss_surface`` evaluates the loss on a grid of points along them, many points per pass;
``grid_curvatures`` / ``nonconvex_fraction`` summarise a 2-D surface's curvature on its grid;
``top_eigenvalue`` gives the Hessian's top eigenvalue by power iteration on
Hessian-vector products.
"""
from .curvature import NONCONVEX_TOL, grid_curvatures, nonconvex_fraction, nonconvex_mask
from .directions import Direction, direction_cosine, filter_normalised_direction, random_directions
from .hessian import Eigenvalue, hessian_vector_product, power_iteration, top_eigenvalue
from .surface import ENGINES, SurfaceValues, grid_axis, loss_surface, plane_coordinates

__all__ = ["Direction", "ENGINES", "Eigenvalue", "NONCONVEX_TOL", "SurfaceValues", "direction_cosine",
           "filter_normalised_direction", "grid_axis", "grid_curvatures", "hessian_vector_product",
           "loss_surface", "nonconvex_fraction", "nonconvex_mask", "plane_coordinates",
           "power_iteration", "random_directions", "top_eigenvalue"]
