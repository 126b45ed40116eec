"""CKA between block outputs of one or several networks on the same images, streamed over minibatches.

A block's representation of an image is its output (after the combine step: ``ReLU(F(x) + S(x))`` in a
post-activation residual net, ``ReLU(F(x))`` in a plain one, ``H T + x (1 - T)`` in a highway net),
flattened to one vector of ``C x H x W`` values, as Kornblith et al. (2019) and Nguyen et al. (2021) treat
convolutional layers. ``block_grams`` reads those outputs through the block anatomy with forward hooks and
keeps only each block's ``n x n`` Gram matrix (float64); ``stream_block_cka`` runs every network on each
minibatch and feeds all their blocks' Gram matrices to one ``MinibatchCKA``, so one pass gives the CKA
between any two blocks, of the same network or of two networks.
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import nn

from ..models import anatomy
from .cka import MIN_EXAMPLES, MinibatchCKA, gram

__all__ = ["BlockCKA", "BlockGrams", "block_grams", "stream_block_cka"]


class BlockGrams:
    """The Gram matrices of a network's block outputs from its last forward pass (see ``block_grams``).

    Attributes:
        names: the blocks' anatomy names (``stage1.block1``), in network order.
    """

    def __init__(self, names: list[str]):
        self.names = names
        self._latest: dict[str, torch.Tensor] = {}

    def record(self, name: str, output: torch.Tensor) -> None:
        self._latest[name] = gram(output)

    def take(self) -> torch.Tensor:
        """``(blocks, n, n)`` float64 Gram matrices of the last forward pass, in network order; clears them.

        Raises:
            RuntimeError: a block did not run since the last ``take``.
        """
        missing = [n for n in self.names if n not in self._latest]
        if missing:
            raise RuntimeError(f"no output recorded for {', '.join(missing)}: run the network before take()")
        grams = torch.stack([self._latest[n] for n in self.names])
        self._latest.clear()
        return grams


@contextmanager
def block_grams(model: nn.Module) -> Iterator[BlockGrams]:
    """Record the Gram matrix of every block's output on each forward pass of ``model``.

    Forward hooks on the anatomy's block modules compute ``X X^T`` of the flattened output as it is made,
    so no activation outlives its block. The hooks are removed on exit, also when the body raises;
    outputs are unchanged.
    """
    blocks = anatomy(model).blocks
    recorder = BlockGrams([b.name for b in blocks])
    handles = []
    try:
        for b in blocks:
            handles.append(b.module.register_forward_hook(
                lambda module, args, output, name=b.name: recorder.record(name, output)))
        yield recorder
    finally:
        for h in handles:
            h.remove()


@dataclass(frozen=True)
class BlockCKA:
    """CKA between the blocks of several networks, from one streamed pass.

    Attributes:
        cka: ``(R, R)`` float64, ``R`` the blocks of all networks in order (network 0's blocks first).
        hsic: ``(R, R)`` float64, the minibatch-averaged ``HSIC_1``.
        network: ``(R,)`` the index of each row's network.
        block: ``(R,)`` the block's position in its network (0-based).
        names: ``(R,)`` the blocks' anatomy names.
        minibatches: minibatches averaged.
        examples: images seen.
    """

    cka: np.ndarray
    hsic: np.ndarray
    network: np.ndarray
    block: np.ndarray
    names: tuple[str, ...]
    minibatches: int
    examples: int

    def between(self, a: int, b: int) -> np.ndarray:
        """``(blocks of a, blocks of b)``: CKA between every block of network ``a`` and every block of ``b``."""
        return self.cka[np.ix_(self.network == a, self.network == b)]


def stream_block_cka(models: Sequence[nn.Module], images: torch.Tensor, minibatch: int) -> BlockCKA:
    """Linear CKA between every pair of block outputs of ``models`` on ``images``.

    Each minibatch of ``minibatch`` images runs through every network (``torch.no_grad``, in the mode the
    networks are in: put them in eval mode); the Gram matrices of all their blocks update one
    ``MinibatchCKA``. Images beyond the last whole minibatch are not used (``examples`` says how many were),
    so every minibatch has the same size.

    Args:
        models: networks with a block anatomy, on the device of ``images``.
        images: ``(N, C, H, W)``.
        minibatch: images per minibatch (at least 4).

    Raises:
        ValueError: ``minibatch < 4`` or fewer images than one minibatch.
    """
    if minibatch < MIN_EXAMPLES:
        raise ValueError(f"minibatch must be at least {MIN_EXAMPLES} (the unbiased HSIC estimator divides by "
                         f"n(n-3)); got {minibatch}")
    if not models:
        raise ValueError("give at least one network")
    if len(images) < minibatch:
        raise ValueError(f"{len(images)} images is fewer than one minibatch of {minibatch}")
    names = [[b.name for b in anatomy(m).blocks] for m in models]
    acc = MinibatchCKA(sum(map(len, names)), device=images.device)
    with torch.no_grad(), ExitStack() as stack:
        recorders = [stack.enter_context(block_grams(m)) for m in models]
        for start in range(0, len(images) - minibatch + 1, minibatch):
            x = images[start:start + minibatch]
            grams = []
            for m, rec in zip(models, recorders):
                m(x)
                grams.append(rec.take())
            acc.update(torch.cat(grams))
    network = np.concatenate([np.full(len(n), i) for i, n in enumerate(names)])
    block = np.concatenate([np.arange(len(n)) for n in names])
    return BlockCKA(acc.cka().cpu().numpy(), acc.hsic.cpu().numpy(), network, block,
                    tuple(n for ns in names for n in ns), acc.minibatches, acc.examples)
