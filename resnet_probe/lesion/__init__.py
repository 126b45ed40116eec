"""Lesions (Veit, Wilber, Belongie 2016): reversible block deletion and reordering, batched sweeps.

``with lesion(model, blocks=[...]):`` deletes blocks through the block anatomy of any supported
model; the sweeps evaluate many deletion sets (or block orders) in batched forward passes that
reuse the intact prefix activations, and return tidy tables with bootstrap intervals.
"""
from .bootstrap import BOOTSTRAP_METHODS, bootstrap_mean_ci
from .context import check_order, evaluation, lesion, reordered
from .engine import ENGINES, SetMetrics, batched_logits, evaluate_deletion_sets, evaluate_orders
from .inputs import as_tensors, example_chunks
from .reorder import kendall_tau, random_swaps, reorder_sweep, swappable_groups
from .sweeps import all_subsets_sweep, gate_closing_sweep, k_random_sweep, single_block_sweep
from .table import METRICS, SweepOptions

__all__ = [
    "BOOTSTRAP_METHODS", "ENGINES", "METRICS", "SetMetrics", "SweepOptions", "all_subsets_sweep",
    "as_tensors", "batched_logits", "check_order", "evaluate_deletion_sets", "evaluate_orders",
    "evaluation", "example_chunks", "gate_closing_sweep", "k_random_sweep", "kendall_tau", "lesion",
    "bootstrap_mean_ci", "random_swaps", "reorder_sweep", "reordered", "single_block_sweep", "swappable_groups",
]
