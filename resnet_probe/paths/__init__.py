"""Paths (Veit, Wilber, Belongie 2016): a residual net of n blocks as an ensemble of 2^n paths.

``path_length_distribution`` gives Binomial(n, 1/2); ``sampled_path_gradients`` is Veit et al.'s
estimator of the gradient magnitude of single paths of each length; ``path_gradient_stack`` splits
the input gradient exactly by path length (one backward pass with a stack of cotangents), giving
the net gradient all paths of a length carry together, a different quantity (see ``summary``);
``effective_paths`` finds the band of lengths carrying most of the gradient.
"""
from .exact import path_gradient_stack, stack_from_record
from .record import PathRecord, check_additive, record_paths
from .sampled import paths_from_record, sampled_path_gradients, single_path_gradients
from .summary import (PathBand, effective_paths, net_gradient_by_length, path_length_distribution,
                      sampled_path_magnitudes)

__all__ = ["PathBand", "PathRecord", "check_additive", "effective_paths", "net_gradient_by_length",
           "path_gradient_stack", "path_length_distribution", "paths_from_record", "record_paths",
           "sampled_path_gradients", "sampled_path_magnitudes", "single_path_gradients",
           "stack_from_record"]
