"""Counter-based seeds: one integer per (seed, purpose, counter) tuple, the same on every platform.

Deriving each random stream from its coordinates (e.g. ``(seed, "epoch", 7)``) instead of
advancing one long-lived generator means any stream can be rebuilt without replaying the ones
before it: a loader resumed at epoch 7 draws exactly what an uninterrupted run drew there.
"""
from __future__ import annotations

import hashlib

import torch


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed determined by ``parts`` (ints and strings), independent of Python's hash salt."""
    text = "\x1f".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def seeded_generator(*parts: int | str) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``derive_seed(*parts)``."""
    return torch.Generator().manual_seed(derive_seed(*parts))
