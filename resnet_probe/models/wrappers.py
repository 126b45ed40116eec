"""The network inside the wrappers a user may hand to an analysis.

Probes, lesions, reorderings, sweeps and path analyses all read a model through its block anatomy.
A ``DataParallel`` or ``DistributedDataParallel`` wrapper holds the network as ``.module``, and a
``torch.compile`` wrapper holds the eager network it compiled; both are looked through, so every
tool measures the eager network (the compiled code is not what it runs). Parts of a network
compiled in place (block by block by ``evaluation_model(model, "compiled")``) are each tool's own
business: lesions run them, probes refuse them (their hooks would not run inside compiled code).
"""
from __future__ import annotations

from torch import nn

PARALLEL_WRAPPERS = (nn.DataParallel, nn.parallel.DistributedDataParallel)


def unwrap_parallel(model: nn.Module) -> nn.Module:
    """The network inside (nested) ``DataParallel`` / ``DistributedDataParallel`` wrappers, else ``model``."""
    while isinstance(model, PARALLEL_WRAPPERS):
        model = model.module
    return model


def analysed_network(model: nn.Module, tool: str) -> nn.Module:
    """The network ``tool`` reads through its block anatomy: ``model`` without its parallel and
    ``torch.compile`` wrappers (nested in any order).

    Args:
        model: the model as the user holds it.
        tool: what reads it (``"lesions"``, ``"path gradients"``); kept for callers' messages.
    """
    while True:
        network = unwrap_parallel(model)
        inner = getattr(network, "_orig_mod", None)  # torch.compile's OptimizedModule keeps the eager module here
        if not isinstance(inner, nn.Module):
            return network
        model = inner
