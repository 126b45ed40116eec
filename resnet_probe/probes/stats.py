"""Streaming per-channel statistics of activations: count, sum and sum of squares in float64.

A ``ChannelStats`` holds, for one measured site, the number of values seen per channel and the
per-channel sum and sum of squares, accumulated in float64 on the device of the activations. Its
memory is O(channels) whatever the number of examples; no activation is kept.

Definitions (``x`` the values of one channel, ``n`` their count; channel = dim 1):

- ``mean_c = sum_c / n``; ``var_c = (sumsq_c - sum_c^2 / n) / (n - 1)`` -- the *unbiased* (Bessel)
  estimate, the same as ``torch.std``'s default (``correction=1``); every std in this package uses it;
- *global std*: the unbiased std of all values over (N, C, H, W) taken together;
- *mean per-channel std*: the average over channels of ``sqrt(var_c)``;
- *rms*: ``sqrt(sum of all squares / number of values)``.

Each batch is first reduced in the activation's own precision (float32 for float32 / bfloat16 /
float16 activations, float64 for float64) to one sum and one sum of squares per channel, then added
to the float64 accumulators. Two reductions exist (see ``batch_moments``): *centred* pieces, accurate
whatever the mean, and *raw* sums, one read cheaper, used only where the squared mean is a small
part of the second moment (``mean_share``). Sums and counts merge exactly (``merge``), and
``all_reduce`` sums them over the ranks of ``torch.distributed`` before any division: never a mean
of means.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from . import native

SUMMARY_METRICS = ("count", "mean", "std", "channel_std_mean", "rms")


def distributed() -> bool:
    """Whether a ``torch.distributed`` process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def zeros(shape, device, dtype=torch.float64) -> torch.Tensor:
    """A normal (not inference-mode) zero tensor, so it can be updated in and out of inference mode."""
    with torch.inference_mode(False), torch.no_grad():
        return torch.zeros(shape, device=device, dtype=dtype)


def batch_moments(x: torch.Tensor, scratch: dict | None = None,
                  centred: bool = True) -> tuple[int, torch.Tensor]:
    """Per-channel ``(count, [sum; sum of squares])`` of one batch ``x`` of shape (N, C, ...).

    Centred (default): the sum of squares is rebuilt from centred pieces,
    ``sum x^2 = sum_r (M2_r + k_r mean_r^2)``, where each piece ``r`` (one example's channel of a
    contiguous tensor, else the whole channel) has its mean and centred sum of squares ``M2_r``
    reduced in the activation's precision: the rounding of the means then cancels out of the
    variance instead of being amplified by ``mean^2 / var``, as it would be for raw float32 sums of
    squares.

    Raw (``centred=False``, contiguous tensors only): each piece's plain sum and sum of squares,
    two reads of ``x`` (a sum and a norm) and no copy. The relative error of the variance is then
    about the float32 rounding times ``1 / (1 - mean_share)``; callers use it only where
    ``mean_share`` is small.

    On the CPU, contiguous float32 / float64 batches take neither: the one-read kernel
    (``native.channel_moments``) adds each value and its square in float64. Its sums are as exact
    as the centred pieces', whose float64 totals meet the same ``mean^2 / var`` cancellation when
    the variance is taken, so ``centred`` does not matter there.

    Args:
        x: the batch.
        scratch: a dict in which to keep working buffers between calls (one per shape), sparing an
            allocation per call: the centred copy (memory of one activation) and the raw per-piece
            sums (2 x N x C values); independent of the data size.
        centred: centred pieces (exact for any mean) or raw sums (cheaper; see above).

    Returns:
        the number of values per channel (a host int) and a (2, C) float64 tensor on ``x``'s device.
    """
    if x.dim() < 2:
        raise ValueError(f"expected an activation of shape (N, C, ...); got shape {tuple(x.shape)}")
    n_c, c = x.numel() // max(x.shape[1], 1), x.shape[1]
    if x.dtype not in (torch.float32, torch.float64):
        x = x.detach().float()
    m = native.channel_moments(x, scratch)  # reads x through a pointer: no autograd to keep out
    if m is not None:
        return n_c, m
    with torch.no_grad():
        x = x.detach()
        if x.numel() == 0:
            return 0, torch.zeros(2, c, dtype=torch.float64, device=x.device)
        if x.dim() >= 3 and x.is_contiguous():
            rows = x.reshape(x.shape[0], c, -1)  # a view: (example, channel, position)
            if not centred:
                pieces = _buffer(scratch, "pieces", (2, *rows.shape[:2]), rows)  # (sum; sum of squares, N, C)
                torch.sum(rows, 2, out=pieces[0])
                torch.linalg.vector_norm(rows, dim=2, out=pieces[1]).square_()
                return n_c, pieces.sum(1, dtype=torch.float64)
            k = rows.shape[2]
            mean = rows.mean(2, keepdim=True)
            m2 = torch.linalg.vector_norm(_centred(rows, mean, scratch), dim=2)
            mean = mean.squeeze(2)
        else:
            k = n_c
            mean = x.mean((0, *range(2, x.dim())), keepdim=True)
            m2 = torch.linalg.vector_norm(x - mean, dim=(0, *range(2, x.dim()))).reshape(1, c)
            mean = mean.reshape(1, c)
        a = torch.stack((mean, m2)).to(torch.float64)  # (2, pieces, C)
        s = a[0].sum(0) * k
        q = torch.addcmul(a[1].square(), a[0], a[0], value=k).sum(0)  # sum_r M2_r + k mean_r^2
        return n_c, torch.stack((s, q))


def mean_share(count: int, moments: torch.Tensor) -> torch.Tensor:
    """The largest share, over channels, of the squared mean in the second moment:
    ``max_c (sum_c^2 / n) / sumsq_c`` (0 for zero-mean channels, 1 for constant ones), a 0-d float64
    tensor on the device of ``moments`` (no host read)."""
    s, q = moments.to(torch.float64)
    share = torch.where(q > 0, s * s / max(count, 1) / q, torch.ones_like(q))
    return share.max()


def _centred(x: torch.Tensor, mean: torch.Tensor, scratch: dict | None) -> torch.Tensor:
    return torch.sub(x, mean, out=_buffer(scratch, "centred", x.shape, x))


def _buffer(scratch: dict | None, role: str, shape, like: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor of ``shape`` with ``like``'s dtype and device, kept in ``scratch``; a
    normal tensor even when made in inference mode, so later batches outside it can reuse it."""
    key = (role, tuple(shape), like.dtype, like.device)
    buf = None if scratch is None else scratch.get(key)
    if buf is None:
        with torch.inference_mode(False):
            buf = torch.empty(shape, dtype=like.dtype, device=like.device)
        if scratch is not None:
            scratch[key] = buf
    return buf


class ChannelStats:
    """Streaming per-channel count, sum and sum of squares of one site's activations (float64).

    The accumulators are allocated on the device of the first batch and stay there; reading a
    statistic is the only host synchronisation.
    """

    def __init__(self):
        self.count = 0
        self.moments: torch.Tensor | None = None

    # -- accumulation -------------------------------------------------------------------------
    def update(self, x: torch.Tensor) -> torch.Tensor:
        """Add a batch of shape (N, C, ...); returns its (2, C) float64 moments (sum; sum of squares)."""
        count, m = batch_moments(x)
        self.add_moments(count, m)
        return m

    def add_moments(self, count: int, moments: torch.Tensor) -> None:
        """Add ``count`` values per channel whose per-channel sums are ``moments`` (2, C)."""
        if self.moments is None:
            self.moments = zeros(moments.shape, moments.device)
        elif self.moments.shape != moments.shape:
            raise ValueError(f"channel count changed: accumulated {self.moments.shape[1]}, "
                             f"got {moments.shape[1]}")
        if moments.requires_grad or moments.device != self.moments.device:
            moments = moments.detach().to(self.moments.device)
        self.moments.add_(moments)  # neither side carries autograd history
        self.count += int(count)

    def merge(self, other: "ChannelStats") -> "ChannelStats":
        """Add another accumulator's values to this one (exact: sums and counts add); returns self."""
        if other.moments is not None:
            self.add_moments(other.count, other.moments)
        return self

    def reset(self) -> None:
        """Forget every value seen (keeps the buffers, zeroed)."""
        self.count = 0
        if self.moments is not None:
            with torch.no_grad():
                self.moments.zero_()

    def all_reduce(self, group=None) -> "ChannelStats":
        """Sum counts and sums over all ranks (no-op without ``torch.distributed``); returns self."""
        all_reduce_stats([self], group=group)
        return self

    # -- definitions --------------------------------------------------------------------------
    @property
    def channels(self) -> int:
        return 0 if self.moments is None else self.moments.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes of accumulator state (independent of the number of examples)."""
        return 0 if self.moments is None else self.moments.numel() * self.moments.element_size()

    def _need(self) -> torch.Tensor:
        if self.moments is None or self.count == 0:
            raise ValueError("no values recorded yet")
        return self.moments

    @property
    def sum(self) -> torch.Tensor:
        return self._need()[0]

    @property
    def sumsq(self) -> torch.Tensor:
        """Per-channel sum of squares (uncentred)."""
        return self._need()[1]

    @property
    def mean(self) -> torch.Tensor:
        """Per-channel mean."""
        return self.sum / self.count

    @property
    def var(self) -> torch.Tensor:
        """Per-channel unbiased variance ``(sumsq - sum^2/n) / (n - 1)``."""
        return _unbiased_var(self.sum, self.sumsq, self.count)

    @property
    def channel_std(self) -> torch.Tensor:
        """Per-channel unbiased std."""
        return self.var.sqrt()

    @property
    def channel_std_mean(self) -> torch.Tensor:
        """Mean over channels of the per-channel std."""
        return self._summarised("channel_std_mean")

    @property
    def global_mean(self) -> torch.Tensor:
        return self._summarised("mean")

    @property
    def global_std(self) -> torch.Tensor:
        """Unbiased std over all values (N, C, H, W) together."""
        return self._summarised("std")

    @property
    def norm(self) -> torch.Tensor:
        """``sqrt(sum of squares of all values)``: the L2 norm over every example seen."""
        return self.norms()[0]

    @property
    def rms(self) -> torch.Tensor:
        return self._summarised("rms")

    def _summarised(self, metric: str) -> torch.Tensor:
        return self.summary()[SUMMARY_METRICS.index(metric)]

    def summary(self, parts: int = 1) -> torch.Tensor:
        """``SUMMARY_METRICS`` as a float64 tensor on the device (no host synchronisation).

        Args:
            parts: split the channels into this many equal consecutive blocks (the models of a
                grouped network) and summarise each: shape ``(parts, len(SUMMARY_METRICS))``;
                ``parts=1`` gives shape ``(len(SUMMARY_METRICS),)``, the whole site.
        """
        m = self._need()
        if self.channels % parts:
            raise ValueError(f"{self.channels} channels do not split into {parts} equal blocks")
        s, q = m.reshape(2, parts, -1).unbind(0)  # (parts, C / parts) each
        n = self.count
        n_all = n * s.shape[1]
        channel_std = _unbiased_var(s, q, n).sqrt().mean(1)
        out = torch.stack((torch.full_like(channel_std, float(n_all)), s.sum(1) / n_all,
                           _unbiased_var(s.sum(1), q.sum(1), n_all).sqrt(), channel_std,
                           (q.sum(1) / n_all).sqrt()), dim=1)
        return out[0] if parts == 1 else out

    def norms(self, parts: int = 1) -> torch.Tensor:
        """``norm`` of each of ``parts`` equal consecutive channel blocks, shape ``(parts,)``."""
        return self.sumsq.reshape(parts, -1).sum(1).sqrt()


def _unbiased_var(s: torch.Tensor, q: torch.Tensor, n: int) -> torch.Tensor:
    if n < 2:
        return torch.full_like(s, math.nan)
    return ((q - s * s / n) / (n - 1)).clamp_min(0.0)


def collective_device(group=None) -> torch.device:
    """The device ``torch.distributed`` collectives of this group need (CUDA for NCCL)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum_(tensors: list[torch.Tensor], group=None) -> None:
    """Sum each tensor over all ranks, in place, with one collective (no-op when not distributed)."""
    if not distributed() or not tensors:
        return
    dev = collective_device(group)
    flat = torch.cat([t.detach().reshape(-1).to(dev, torch.float64) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    offset = 0
    with torch.no_grad():
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset:offset + n].view_as(t).to(t.device, t.dtype))
            offset += n


def all_reduce_stats(stats: list[ChannelStats], extra: list[torch.Tensor] = (), group=None) -> None:
    """Sum counts and per-channel sums of every accumulator (and ``extra`` tensors) over all ranks.

    A rank that saw no value at a site contributes zeros: channel counts are agreed first.
    """
    if not distributed():
        return
    dev = collective_device(group)
    channels = torch.tensor([s.channels for s in stats], dtype=torch.int64, device=dev)
    dist.all_reduce(channels, op=dist.ReduceOp.MAX, group=group)
    for s, c in zip(stats, channels.tolist()):
        if s.moments is None and c > 0:
            s.moments = zeros((2, c), dev)
    counts = torch.tensor([float(s.count) for s in stats], dtype=torch.float64, device=dev)
    held = [s.moments for s in stats if s.moments is not None]
    all_reduce_sum_([counts, *held, *extra], group=group)
    for s, c in zip(stats, counts.tolist()):
        s.count = int(round(c))
