"""The network inside the wrappers a user may hand to an analysis.

Probes, lesions, reorderings, sweeps and path analyses all read a model through its block anatomy.
A ``DataParallel`` or ``DistributedDataParallel`` wrapper holds the network as ``.module`` and is
looked through. A ``torch.compile`` wrapper hides the network's blocks behind compiled code, so it
is refused with a message that names it and says what to pass instead; a network compiled in
place (``model.compile()``, or block by block by ``evaluation_model(model, "compiled")``) keeps its
blocks and is each tool's own business (probes refuse it, lesions run it).
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
    """The network ``tool`` reads through its block anatomy: ``model`` without its parallel wrappers.

    Args:
        model: the model as the user holds it.
        tool: what reads it, for the message (``"lesions"``, ``"path gradients"``).

    Raises:
        RuntimeError: ``model`` is a ``torch.compile`` wrapper (``OptimizedModule``), naming it and the
            module to pass instead.
    """
    network = unwrap_parallel(model)
    if hasattr(network, "_orig_mod"):
        raise RuntimeError(
            f"the model is compiled (a torch.compile wrapper of a {type(network._orig_mod).__name__}): "
            f"{tool} read its blocks, which the wrapper hides -- pass the module it compiled "
            "(`compiled._orig_mod`); a module compiled in place (`model.compile()`) keeps its blocks")
    return network
