"""Response probe: streaming statistics of layer responses, branch, shortcut, block output and gate.

What is measured (He et al. 2016, Fig. 7; Srivastava et al. 2015):

- the std of each 3x3 layer's response (its output after BN, before ReLU or addition), both the
  global std over (N, C, H, W) and the mean per-channel std;
- per block, the std of the branch output ``F(x)`` -- the headline *residual response std* --, of
  the shortcut ``S(x)`` and of the block output;
- per block, ``||F(x)|| / ||S(x)||`` with both norms taken over every example seen:
  ``sqrt(sum F^2) / sqrt(sum S^2)``;
- for highway gates ``T(x)``: their mean and the fraction of saturated values (T < 0.1 or T > 0.9).

Each value is reduced by a forward hook on the module that produces it, at the moment it is
produced, so in-place operations downstream (``out += identity``, ``ReLU(inplace=True)``) cannot
alter what is measured. An identity shortcut's ``S(x)`` is the block input, read by a forward
pre-hook on the block. A shortcut module that the block's forward never calls (plain nets keep the
parameter-free mapping a lesion would substitute) is evaluated on the block input, without
gradient, once the block has run. A model compiled after the probe is attached keeps recording the
eager values: the hooks are excluded from compilation, so compiled code breaks its graph at every
probed module and runs the hook as ordinary Python.

For a grouped network of S models side by side (``GroupedCifarNet``; activations ``(N, S*C, ...)``,
channel block ``s`` belonging to model ``s``) the per-channel sums are the same; every metric is then
reported per model from that model's channel block, in rows that carry ``model_index``.
"""
from __future__ import annotations

import warnings
import weakref
from collections import defaultdict

import torch
from torch import nn

from .nonfinite import NonFiniteWatch
from .sites import Site
from .stats import SUMMARY_METRICS, ChannelStats, batch_moments, mean_share, zeros

SATURATION = (0.1, 0.9)
RAW_SUMS_BELOW = 0.9  # a site's first batch decides: raw sums when its mean_share is below this


class ResponseProbe:
    """Streaming response statistics at a set of sites.

    Args:
        sites: the sites to measure.
        watch: where non-finite values are recorded.
        raw: also keep a CPU copy of every measured tensor (memory grows with the data).
        num_models: S, the models laid side by side in the network (1 for an ordinary network).
    """

    def __init__(self, sites: list[Site], watch: NonFiniteWatch, raw: bool = False, num_models: int = 1):
        self.sites = list(sites)
        self.num_models = num_models
        self.stats = {s.name: ChannelStats() for s in self.sites}
        self.saturated: dict[str, torch.Tensor | None] = {s.name: None for s in self.sites
                                                          if s.kind == "gate"}
        self.raw: dict[str, list[torch.Tensor]] | None = {s.name: [] for s in self.sites} if raw else None
        self.watch_first = [watch.register(s.name) for s in self.sites][0]  # sites are registered consecutively
        self.watch = watch
        self.active = True
        self._pending: dict[int, torch.Tensor] = {}
        self._memo: tuple | None = None
        self._scratch: dict = {}
        self._centred: dict[str, bool] = {}  # per site group, decided by its first batch
        self._undecided: dict[str, tuple[int, torch.Tensor]] = {}  # first-batch moments awaiting that
        self._unchecked: set[str] = set()  # site groups recorded since the last finiteness check
        self._warned_undefined: set[str] = set()  # sites already named in an undefined-statistic warning

    # -- hook plan ----------------------------------------------------------------------------
    def hooks(self) -> list[tuple[nn.Module, str, object]]:
        """``(module, "pre" | "forward", fn)`` for every hook this probe needs, one per module and kind."""
        by_module: dict[int, list[Site]] = defaultdict(list)
        modules: dict[int, nn.Module] = {}
        pre: dict[int, tuple[nn.Module, list[Site], list[Site]]] = {}
        fallback: dict[int, tuple[nn.Module, Site]] = {}
        for s in self.sites:
            if s.kind == "shortcut" and s.module is None:
                entry = pre.setdefault(id(s.block.module), (s.block.module, [], []))
                entry[1].append(s)
                continue
            if s.kind == "shortcut":
                entry = pre.setdefault(id(s.block.module), (s.block.module, [], []))
                entry[2].append(s)
                fallback[id(s.block.module)] = (s.block.module, s)
            by_module[id(s.module)].append(s)
            modules[id(s.module)] = s.module
        plan = []
        for key, (block, identity, stash) in pre.items():
            plan.append((block, "pre", self._pre_hook(identity, stash)))
        for key, sites in by_module.items():
            plan.append((modules[key], "forward", self._output_hook(sites)))
        for key, (block, site) in fallback.items():
            plan.append((block, "forward", self._fallback_hook(site)))
        # torch.compile must not trace the hooks (their bookkeeping is Python state): compiled code
        # breaks its graph at each probed module and runs the hook eagerly, so values stay exact.
        return [(module, kind, torch.compiler.disable(fn)) for module, kind, fn in plan]

    def _output_hook(self, sites: list[Site]):
        measured_shortcuts = [id(s.block.module) for s in sites if s.kind == "shortcut"]

        def hook(module, args, output):
            if self.active:
                self.record(sites, output)
                for key in measured_shortcuts:  # S(x) came from its own module: no fallback needed
                    self._pending.pop(key, None)
        return hook

    def _pre_hook(self, identity: list[Site], stash: list[Site]):
        def hook(module, args):
            if self.active and args:
                if identity:
                    self.record(identity, args[0])
                if stash:
                    self._pending[id(module)] = args[0]
        return hook

    def _fallback_hook(self, site: Site):
        def hook(module, args, output):
            x = self._pending.pop(id(module), None)
            if x is not None and self.active:
                with torch.no_grad():
                    site.module(x)  # its own forward hook records S(x)
        return hook

    # -- recording ----------------------------------------------------------------------------
    def record(self, sites: list[Site], x: torch.Tensor) -> None:
        """Add the tensor ``x`` (the value of every site in ``sites``) to their statistics."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"site {sites[0].name} produced a {type(x).__name__}, not a tensor")
        key = sites[0].name
        if key in self._unchecked:  # a new forward pass
            self.check_finite()
        self._unchecked.add(key)
        centred = self._centred.get(key, True)
        count, m = self._moments(x, centred)
        if key not in self._centred:
            self._undecided.setdefault(key, (count, m))
        for s in sites:
            self.stats[s.name].add_moments(count, m)
        for s in sites:
            if s.kind == "gate":
                self._count_saturated(s.name, x)
            if self.raw is not None:
                self.raw[s.name].append(x.detach().to("cpu", copy=True))

    def _moments(self, x: torch.Tensor, centred: bool) -> tuple[int, torch.Tensor]:
        """``batch_moments(x)``, reused when ``x`` is the very tensor just reduced and unmodified since.

        An identity shortcut's ``S(x)`` is usually the previous block's output: one reduction serves
        both sites. Tensors without a version counter (inference mode) are always reduced afresh.
        A site's first batch is reduced centred; later batches use raw sums when that first batch's
        squared mean was under ``RAW_SUMS_BELOW`` of its second moment, and centred pieces otherwise
        (decided for every new site group at once, in ``check_finite``, with one host read).
        Below 0.9 the raw sums' error is amplified at most tenfold: measured on float32 batches, the
        per-channel std then stays within 3e-7 (relative) of the float64 reference.
        """
        version = None if x.is_inference() else x._version
        memo = self._memo
        if version is not None and memo is not None and memo[0]() is x and memo[1] == version:
            return memo[2], memo[3]
        count, m = batch_moments(x, self._scratch, centred)
        self._memo = None if version is None else (weakref.ref(x), version, count, m)
        return count, m

    def check_finite(self) -> None:
        """Pass every site's accumulators to the non-finite watch, as one event (no host sync), and
        decide how new site groups reduce their later batches (``_moments``)."""
        self._unchecked.clear()
        self._decide_reductions()
        held = [self.stats[s.name].moments for s in self.sites]
        dev = next((m.device for m in held if m is not None), None)
        if dev is None:
            return
        if any(m is None for m in held):
            empty = torch.zeros((), dtype=torch.float64, device=dev)
            held = [empty if m is None else m for m in held]
        self.watch.check_all(self.watch_first, held)

    def _decide_reductions(self) -> None:
        """Raw sums or centred pieces for each site group seen once so far (one host read for all)."""
        if not self._undecided:
            return
        shares = [mean_share(count, m) for count, m in self._undecided.values()]
        dev = shares[0].device
        for key, share in zip(self._undecided, torch.stack([s.to(dev) for s in shares]).tolist()):
            self._centred[key] = share >= RAW_SUMS_BELOW
        self._undecided.clear()

    def _count_saturated(self, name: str, t: torch.Tensor) -> None:
        lo, hi = SATURATION
        with torch.no_grad():
            outside = torch.logical_or(t < lo, t > hi).reshape(t.shape[0], self.num_models, -1)
            n = outside.sum((0, 2), dtype=torch.float64)  # per model
            if self.saturated[name] is None:
                self.saturated[name] = zeros(self.num_models, n.device)
            self.saturated[name].add_(n)

    def release(self) -> None:
        """Stop recording and drop working buffers (results stay)."""
        self.active = False
        self._pending.clear()
        self._memo = None
        self._scratch.clear()

    def reset(self) -> None:
        for st in self.stats.values():
            st.reset()
        for v in self.saturated.values():
            if v is not None:
                v.zero_()
        if self.raw is not None:
            for v in self.raw.values():
                v.clear()
        self._pending.clear()
        self._memo = None
        self._centred.clear()
        self._undecided.clear()
        self._unchecked.clear()
        self._warned_undefined.clear()

    def reducible(self) -> tuple[list[ChannelStats], list[torch.Tensor]]:
        """The accumulators ``all_reduce`` sums: statistics and gate saturation counts."""
        stats = [self.stats[s.name] for s in self.sites]
        dev = next((st.moments.device for st in stats if st.moments is not None), torch.device("cpu"))
        for k, v in self.saturated.items():
            if v is None:
                self.saturated[k] = zeros(self.num_models, dev)
        return stats, list(self.saturated.values())

    # -- results ------------------------------------------------------------------------------
    def rows(self) -> list[dict]:
        """Tidy rows ``(site, kind, metric, value, ...)`` for every site with data (one host sync); with
        several models side by side, one row per model, labelled ``model_index``."""
        seen = [s for s in self.sites if self.stats[s.name].count > 0]
        self._warn_undefined(seen)
        blocks = {}
        for s in seen:
            blocks.setdefault(s.block.name, {})[s.kind] = s
        S = self.num_models
        values, keys = [], []  # values[i]: (S, metrics) float64; keys[i]: (Site, row site, kind, metrics, path)
        for s in seen:
            st = self.stats[s.name]
            metrics, columns = list(SUMMARY_METRICS), [st.summary(S).reshape(S, -1)]
            if s.kind == "gate":
                metrics.append("saturated_fraction")
                columns.append((self.saturated[s.name] / (st.count * st.channels / S)).reshape(S, 1))
            values.append(torch.cat(columns, dim=1))
            keys.append((s, s.name, s.kind, metrics, None))
        for bname, kinds in blocks.items():
            if "branch" in kinds and "shortcut" in kinds:
                f, sc = self.stats[kinds["branch"].name], self.stats[kinds["shortcut"].name]
                values.append((f.norms(S) / sc.norms(S)).reshape(S, 1))
                b = kinds["branch"]
                keys.append((b, bname, "ratio", ["norm_ratio"], b.block.path))
        if not values:
            return []
        flat = torch.cat([v.to(values[0].device) for v in values], dim=1).cpu().tolist()  # (S, all values)
        rows = []
        for model, per_model in enumerate(flat):
            it = iter(per_model)
            for s, site, kind, metrics, path in keys:
                for metric in metrics:
                    row = _row(site, s, kind, metric, next(it), path=path)
                    rows.append({**row, "model_index": model} if S > 1 else row)
        return rows

    def _warn_undefined(self, seen: list[Site]) -> None:
        """Warn, once per site, where an unbiased std is NaN because fewer than two values were seen:
        per channel for ``channel_std_mean``; per site (and model) for ``std`` too when it has one
        channel."""
        short = [s for s in seen if self.stats[s.name].count < 2 and s.name not in self._warned_undefined]
        if not short:
            return
        self._warned_undefined.update(s.name for s in short)
        one_channel = any(self.stats[s.name].channels == self.num_models for s in short)
        names = ", ".join(s.name for s in short[:3]) + (f" and {len(short) - 3} more" if len(short) > 3 else "")
        metrics = "channel_std_mean and std are" if one_channel else "channel_std_mean is"
        warnings.warn(f"{metrics} NaN at {names}: each channel there has held one value so far (a batch "
                      "of 1 on a 1x1 map), and an unbiased std needs at least two; record more examples",
                      RuntimeWarning, stacklevel=4)

    def raw_values(self, site: str) -> torch.Tensor:
        """Every captured value of ``site`` concatenated along the batch (needs ``raw=True``)."""
        if self.raw is None:
            raise ValueError("raw values were not captured; open the probe with raw=True")
        if site not in self.raw:
            raise ValueError(f"unknown site {site!r}; probed sites: {', '.join(self.raw)}")
        if not self.raw[site]:
            raise ValueError(f"no value captured at {site} yet")
        return torch.cat(self.raw[site])


def _row(site: str, s: Site, kind: str, metric: str, value: float, path: str | None = None) -> dict:
    return {"site": site, "stage": s.stage, "block": s.index, "kind": kind, "metric": metric,
            "value": value, "downsampling": s.downsampling, "path": s.path if path is None else path}
