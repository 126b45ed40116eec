"""Detection of NaN / Inf in measured activations and gradients, kept on the device until read.

Every measured tensor is reduced to a sum of squares anyway; that sum is non-finite exactly when
the tensor holds a NaN or an Inf (squares of finite float32/bfloat16 values cannot overflow
float64), and a float64 accumulator that has taken in a NaN or Inf stays non-finite. Each check
folds ``(event number, site)`` into one int64 on the device with a running minimum, so the first
site where a non-finite value appeared is known without any host synchronisation until it is read.

Gradient sites are checked one by one as they are measured (``check``). Response sites are checked
together, once per forward pass, from their accumulators (``check_all``): the first site is then
known to the resolution of one pass, and within that pass by site order (the forward order).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .stats import collective_device, distributed, zeros

_NONE = 2 ** 62


class NonFiniteError(FloatingPointError):
    """A probed activation or gradient held NaN or Inf.

    Attributes:
        site: the first site where it appeared.
    """

    def __init__(self, site: str):
        super().__init__(f"non-finite value (NaN or Inf) first appeared at {site}")
        self.site = site


class NonFiniteWatch:
    """The first site, in time, whose measured tensor held NaN or Inf."""

    def __init__(self):
        self.names: list[str] = []
        self._first: torch.Tensor | None = None
        self._tick = 0

    def register(self, name: str) -> int:
        """Add a site name; returns its index for ``check``."""
        self.names.append(name)
        return len(self.names) - 1

    def check(self, index: int, sumsq: torch.Tensor) -> None:
        """Record site ``index`` as non-finite now if ``sumsq`` (any shape) is not finite."""
        self._tick += 1
        code = self._tick * max(len(self.names), 1) + index
        with torch.no_grad():
            finite = torch.isfinite(sumsq).all()
            self._keep_earliest(torch.where(finite, _NONE, code))

    def check_all(self, first: int, values: list[torch.Tensor]) -> None:
        """Record, as one event, each of the sites ``first``, ``first + 1``, ... whose value is not finite.

        ``values[i]`` (any shape, on one device) belongs to site index ``first + i``.
        """
        if not values:
            return
        self._tick += 1
        with torch.no_grad():
            norms = torch._foreach_norm(values)
            dev = norms[0].device
            norms = torch.stack([n.to(dev) for n in norms])
            codes = torch.arange(first, first + len(values), device=dev) + self._tick * max(len(self.names), 1)
            self._keep_earliest(torch.where(torch.isfinite(norms), _NONE, codes).min())

    def _keep_earliest(self, code: torch.Tensor) -> None:
        """Fold a candidate event code (``_NONE``: nothing non-finite) into the running minimum."""
        if self._first is None:
            self._first = zeros((), code.device, torch.int64).fill_(_NONE)
        torch.minimum(self._first, code.to(self._first.device), out=self._first)

    def reset(self) -> None:
        self._tick = 0
        if self._first is not None:
            self._first.fill_(_NONE)

    def all_reduce(self, group=None) -> None:
        """Keep the earliest record over all ranks (no-op when not distributed)."""
        if not distributed():
            return
        dev = collective_device(group)
        v = (self._first.to(dev) if self._first is not None
             else torch.tensor(_NONE, dtype=torch.int64, device=dev)).reshape(1)
        dist.all_reduce(v, op=dist.ReduceOp.MIN, group=group)
        if self._first is None:
            self._first = zeros((), dev, torch.int64)
        self._first.copy_(v[0])

    def first(self) -> str | None:
        """The first non-finite site's name, or ``None`` (one host synchronisation)."""
        if self._first is None:
            return None
        code = int(self._first.item())
        if code >= _NONE:
            return None
        return self.names[code % max(len(self.names), 1)]
