"""``probe(model, ...)``: a session that owns the hooks measuring a model, and its results.

    with probe(model, sites="stage2.*.branch") as session:
        model(x)
    session.table()          # tidy DataFrame: site, stage, block, kind, metric, value, ...

A session registers exactly its own hooks (and, for the gradients of CIFAR blocks, the sinks of
their gradient taps) when it is created and removes exactly those when it is closed (``close()``,
leaving the ``with`` block -- also on an exception or KeyboardInterrupt -- or when the session
object is garbage-collected), so sessions nest and re-running a notebook cell never stacks hooks.
``arm`` removes and re-attaches one probe's hooks between recordings. Attaching is all-or-nothing.
Probing never changes a model's outputs.

Compiled models. torch.compile does not re-trace when hooks are added: compiled code keeps the hooks
it was traced with, and its cache is shared by every instance of a class. So a model whose compiled
code (``model.compile()``, ``torch.compile(model)``, or another instance's) was traced before the
session attached runs without the session's hooks. A session accepts such a model (a
``torch.compile`` wrapper is looked through, like DataParallel), and warns at the first forward pass
of the model in which none of its hooks ran; run the model eagerly while it records
(``with torch.compiler.set_stance("force_eager"):``) to measure it. A model with compiled *parts*
(``evaluation_model(model, "compiled")``, or a block compiled in place) is refused: hooks around
those parts run while the ones inside do not, which no pass could reveal.
"""
from __future__ import annotations

import warnings
import weakref

import pandas as pd
import torch
from torch import nn

from ..models import anatomy
from ..models.compiled import compiled_module
from ..models.wrappers import analysed_network
from .gradient import GradientProbe
from .nonfinite import NonFiniteError, NonFiniteWatch
from .refinement import RefinementProbe
from .response import ResponseProbe
from .sites import all_sites, select_sites
from .stats import ChannelStats, all_reduce_stats

METRICS = ("response", "gradient", "refinement")
COLUMNS = ("site", "stage", "block", "kind", "metric", "value", "downsampling", "path", "step")


def refuse_compiled(model: nn.Module) -> None:
    """Raise if a part of ``model`` below its root runs compiled code: probe hooks around it would run
    while those inside it would not."""
    for child_name, child in model.named_children():
        name = compiled_module(child)
        if name is None:
            continue
        where = ".".join(filter(None, (child_name, name)))
        raise RuntimeError(
            f"{where!r} of the model runs compiled code (compiled block by block, as evaluation_model(..., "
            "'compiled') does, or compiled in place): hooks inside it would record nothing. Probe the "
            "model before compiling its parts, or its folded copy (evaluation_model(model, 'folded'))")


def refuse_meta(model: nn.Module) -> None:
    """Raise if ``model`` holds ``meta`` tensors (shapes without values): nothing could be measured."""
    meta = next((name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta), None)
    if meta is not None:
        raise ValueError(f"the model is on the meta device (e.g. {meta!r} has a shape but no values), so "
                         "there is nothing to measure: give it values first, e.g. "
                         "model.to_empty(device='cpu') and then load_state_dict(...)")


class _Canary:
    """Notices a forward pass of the model in which the probe's hooks did not run (compiled code
    traced before they were attached) and warns once. It watches the first block: a block's own hooks
    run whenever the block is called (also when a lesion replaces its forward), and compiled code
    traced without hooks skips them all alike."""

    def __init__(self, model_name: str):
        self.model_name, self.ran, self.warned = model_name, True, False

    def before(self, module, args) -> None:
        self.ran = False

    def mark(self, module, args) -> None:
        self.ran = True

    def after(self, module, args, output) -> None:
        if not self.ran and not self.warned:
            self.warned = True
            warnings.warn(
                f"{self.model_name} ran a forward pass in which none of the probe's hooks ran: it runs "
                "torch.compile'd code traced before the probe was attached, which keeps the hooks it was "
                "traced with, so nothing was recorded from it. Run the model eagerly while probing "
                "(with torch.compiler.set_stance(\"force_eager\"): ...), or attach the probe before the "
                "compiled code first runs", UserWarning, stacklevel=2)

    def hooks(self, model: nn.Module, first_block: nn.Module) -> list:
        """Handles of the hooks that open a forward pass, see the first block run, and check the pass."""
        return [model.register_forward_pre_hook(torch.compiler.disable(self.before)),
                first_block.register_forward_pre_hook(torch.compiler.disable(self.mark)),
                model.register_forward_hook(torch.compiler.disable(self.after))]


def _remove(handles: list) -> None:
    while handles:
        handles.pop().remove()


def _remove_all(hooks: dict[str, list]) -> None:
    for handles in hooks.values():
        _remove(handles)


class ProbeSession:
    """Hooks measuring a model, and what they recorded. Build it with ``probe``."""

    def __init__(self, model: nn.Module, sites="*", metrics=("response",), raw: bool = False,
                 strict: bool = False):
        if isinstance(metrics, str):
            metrics = (metrics,)
        bad = [m for m in metrics if m not in METRICS]
        if bad or not metrics:
            raise ValueError(f"unknown metrics {bad or list(metrics)}; valid metrics: {', '.join(METRICS)}")
        model = analysed_network(model, "probes")
        refuse_compiled(model)
        refuse_meta(model)
        self.model = model
        self._canary = _Canary(type(model).__name__)
        self.anatomy = anatomy(model, grouped=True)
        self.strict = strict
        chosen = select_sites(all_sites(self.anatomy), sites)
        self.watch = NonFiniteWatch()
        num_models = self.anatomy.num_models
        self.response = ResponseProbe(chosen, self.watch, raw, num_models) if "response" in metrics else None
        names = {s.block.name for s in chosen}
        blocks = [b for b in self.anatomy.blocks if b.name in names]
        self.gradient = GradientProbe(blocks, self.watch, num_models) if "gradient" in metrics else None
        self.refinement = RefinementProbe(blocks, self.watch, num_models) if "refinement" in metrics else None
        self.sites = [s.name for s in chosen]
        self._warned: set[str] = set()
        self._parts = {name: part for name, part in (("response", self.response), ("gradient", self.gradient),
                                                     ("refinement", self.refinement)) if part is not None}
        self._hooks: dict[str, list] = {name: [] for name in self._parts}  # per measured metric
        self._armed = dict.fromkeys(self._parts, False)
        self._finalizer = weakref.finalize(self, _remove_all, self._hooks)
        try:
            for name in self._parts:
                self._attach(name)
        except BaseException:
            self.close()
            raise

    def _attach(self, metric: str) -> None:
        handles = self._hooks[metric]
        try:
            hooked = False
            for module, kind, fn in self._parts[metric].hooks():
                if kind == "attach":
                    handles.append(fn())
                    continue
                register = module.register_forward_pre_hook if kind == "pre" else module.register_forward_hook
                handles.append(register(fn))
                hooked = True
            if hooked:
                handles += self._canary.hooks(self.model, self.anatomy.blocks[0].module)
        except BaseException:
            _remove(handles)
            raise
        self._armed[metric] = True

    # -- lifetime -----------------------------------------------------------------------------
    def close(self) -> None:
        """Remove this session's hooks and taps (idempotent); its results stay readable."""
        if self.response is not None:
            self.response.release()
        for part in (self.gradient, self.refinement):
            if part is not None:
                part.active = False
        self._finalizer()
        self._armed = dict.fromkeys(self._armed, False)

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def __enter__(self) -> "ProbeSession":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()
        if exc_type is None:
            self.check_finite()

    # -- recording control ----------------------------------------------------------------------
    def record_gradients(self, step: int | None = None) -> None:
        """Read per-block parameter-gradient norms now (call after ``loss.backward()``) and close the step."""
        if self.gradient is None:
            raise ValueError("this session does not measure gradients; open it with "
                             "metrics=('response', 'gradient')")
        self.gradient.record(step)

    def record_refinement(self, step: int | None = None) -> None:
        """Close the refinement sums accumulated since the last record as one step labelled ``step`` (rows of
        the sums not yet recorded carry step ``None``; recording is needed only to label steps)."""
        if self.refinement is None:
            raise ValueError("this session does not measure refinement; open it with metrics=('refinement',)")
        self.refinement.record(step)

    def arm(self, response: bool | None = None, gradient: bool | None = None,
            refinement: bool | None = None) -> None:
        """Attach (``True``) or remove (``False``) the hooks and taps of the response / gradient probe.

        What was recorded stays. A disarmed probe leaves nothing on the model: it adds nothing to a
        forward pass, and a network compiled while it is disarmed is traced without it. The gradient
        probe's taps on CIFAR blocks (``GradientProbe``) are part of the traced graph, so they may be
        opened and closed around compiled steps; hooks are not (compiled code keeps the hooks it was
        traced with), so a probe that uses hooks records while the network runs eagerly
        (``ProbeCallback`` runs those steps and epochs under ``torch.compiler.set_stance("force_eager")``);
        the refinement probe uses hooks. ``None`` leaves a probe as it is.

        Raises:
            RuntimeError: arming a closed session.
        """
        for metric, on in (("response", response), ("gradient", gradient), ("refinement", refinement)):
            if on is None or metric not in self._parts or on == self._armed[metric]:
                continue
            if on:
                if self.closed:
                    raise RuntimeError("this probe session is closed")
                self._attach(metric)
            else:
                _remove(self._hooks[metric])
                self._armed[metric] = False

    @property
    def armed(self) -> dict[str, bool]:
        """``{metric: hooks or taps attached}`` for each metric this session measures."""
        return dict(self._armed)

    def reset(self) -> None:
        """Forget everything recorded so far (the hooks stay as they are)."""
        for part in (self.response, self.gradient, self.refinement):
            if part is not None:
                part.reset()
        self.watch.reset()
        self._warned.clear()

    def all_reduce(self, group=None, metrics=METRICS) -> None:
        """Sum counts and sums over the ranks of ``torch.distributed`` (no-op when not initialised).

        Call once, on every rank, after the last batch and before reading: afterwards every rank
        holds the statistics of all the data. Squared activation-gradient norms are summed too, and the
        refinement probe's counts, sums and sums of squares; parameter-gradient norms are not (DDP has
        already averaged the gradients themselves).

        Args:
            group: the process group (default: the world).
            metrics: which of ``"response"`` / ``"gradient"`` / ``"refinement"`` to reduce.
        """
        stats, extra = [], []
        if self.response is not None and "response" in metrics:
            stats, extra = self.response.reducible()
        if self.gradient is not None and "gradient" in metrics:
            extra = extra + self.gradient.reducible()
        if self.refinement is not None and "refinement" in metrics:
            extra = extra + self.refinement.reducible()
        all_reduce_stats(stats, extra, group=group)
        self._check_response_finite()
        self.watch.all_reduce(group=group)

    # -- results ------------------------------------------------------------------------------
    @property
    def stats(self) -> dict[str, ChannelStats]:
        """Per-site streaming statistics."""
        return {} if self.response is None else self.response.stats

    @property
    def nonfinite(self) -> str | None:
        """The first site where a NaN or Inf was measured, or ``None`` (one host synchronisation)."""
        self._check_response_finite()
        return self.watch.first()

    def _check_response_finite(self) -> None:
        if self.response is not None:
            self.response.check_finite()

    def check_finite(self) -> None:
        """Warn (or, with ``strict=True``, raise ``NonFiniteError``) if a non-finite value was measured."""
        site = self.nonfinite
        if site is None:
            return
        if self.strict:
            raise NonFiniteError(site)
        if site not in self._warned:
            self._warned.add(site)
            warnings.warn(f"non-finite value (NaN or Inf) first appeared at {site}", RuntimeWarning,
                          stacklevel=2)

    def raw(self, site: str) -> torch.Tensor:
        """Every captured value of ``site``, concatenated along the batch (needs ``raw=True``)."""
        if self.response is None:
            raise ValueError("this session does not measure responses")
        return self.response.raw_values(site)

    def state_bytes(self) -> int:
        """Bytes held by the streaming statistics (independent of the number of examples)."""
        return sum(st.nbytes for st in self.stats.values())

    def table(self) -> pd.DataFrame:
        """Tidy long table of results: ``COLUMNS`` (``step`` is set for gradient rows only).

        Response metrics per site: ``count``, ``mean``, ``std`` (global, unbiased, over N, C, H, W),
        ``channel_std_mean`` (mean over channels of the per-channel std), ``rms``; gates add
        ``saturated_fraction``; kind ``ratio`` rows (site = block name) hold ``norm_ratio``
        = ||F(x)|| / ||S(x)||. Gradient rows, per block and recorded step: ``param_grad_norm`` and
        ``activation_grad_norm``, and what they are relative to, ``param_norm``, ``param_count`` and
        ``activation_count`` (see ``GradientProbe``). Refinement rows (kind ``refinement``, site = block
        name, per recorded step and for the sums not yet recorded, step ``<NA>``):
        ``refinement_cos_mean`` / ``_std`` / ``_count``, the cosine between the branch output and the
        negative loss gradient there over the examples, and ``branch_to_input_norm_mean`` / ``_std`` /
        ``_count``, ``||F(x_n)|| / ||x_n||`` (see ``RefinementProbe``). For a grouped network every row is per model:
        the extra column ``model_index``.
        """
        self.check_finite()
        return self._frame()

    def _frame(self) -> pd.DataFrame:
        rows = []
        if self.response is not None:
            rows += self.response.rows()
        if self.gradient is not None:
            rows += self.gradient.rows()
        if self.refinement is not None:
            rows += self.refinement.rows()
        columns = list(COLUMNS) + (["model_index"] if self.anatomy.num_models > 1 else [])
        df = pd.DataFrame(rows, columns=columns)
        df["step"] = df["step"].astype("Int64")
        return df

    def _repr_html_(self) -> str:
        df = self._frame()
        state = "closed" if self.closed else "attached"
        head = (f"<p><b>ProbeSession</b> ({state}) on {type(self.model).__name__}: "
                f"{len(self.sites)} sites</p>")
        first_nonfinite = self.nonfinite
        if first_nonfinite is not None:
            head += f"<p>non-finite value first at <code>{first_nonfinite}</code></p>"
        if df.empty:
            return head + "<p>no values recorded yet</p>"
        parts = [head]
        per_model = ["model_index"] if "model_index" in df.columns else []
        resp = df[~df["kind"].isin(["gradient", "refinement"])]
        if not resp.empty:
            parts.append(resp.pivot_table(index=["site", "kind", *per_model], columns="metric", values="value",
                                          sort=False).to_html(float_format="{:.4g}".format))
        grad = df[df["kind"] == "gradient"]
        if not grad.empty:
            parts.append("<p>gradient norms, mean over recorded steps</p>")
            parts.append(grad.pivot_table(index=["site", *per_model], columns="metric", values="value",
                                          aggfunc="mean", sort=False).to_html(float_format="{:.4g}".format))
        refined = df[df["kind"] == "refinement"]
        if not refined.empty:
            parts.append("<p>refinement (cosine with the negative loss gradient, ||F(x)|| / ||x||), "
                         "mean over recorded steps</p>")
            parts.append(refined.pivot_table(index=["site", *per_model], columns="metric", values="value",
                                             aggfunc="mean", sort=False).to_html(float_format="{:.4g}".format))
        return "\n".join(parts)

    def __repr__(self) -> str:
        state = "closed" if self.closed else "attached"
        return f"ProbeSession({state}, {len(self.sites)} sites on {type(self.model).__name__})"


def probe(model: nn.Module, sites="*", metrics=("response",), raw: bool = False,
          strict: bool = False) -> ProbeSession:
    """Attach probes to ``model``; use as ``with probe(model, ...) as session:``.

    Args:
        model: any model ``resnet_probe.models.anatomy`` supports (CIFAR nets, torchvision
            ResNets); a (Distributed)DataParallel or ``torch.compile`` wrapper is looked through (for
            compiled models see the module docstring). On a ``GroupedCifarNet`` every metric is
            measured per model (rows carry ``model_index``).
        sites: site names or fnmatch patterns (``"*"``, ``"stage2.*.branch"``); see ``sites.py``.
        metrics: ``"response"`` (streaming activation statistics), ``"gradient"`` (per-step
            gradient norms; call ``session.record_gradients()`` after each backward) and/or
            ``"refinement"`` (per block, the cosine between the branch output and the negative loss
            gradient there, and ``||F(x)|| / ||x||``, over the examples of every backward pass: run the
            forward pass with gradients enabled and call ``loss.backward()``, e.g. of
            ``F.cross_entropy(logits, y, reduction="sum")``; ``loss.backward(inputs=session.refinement.sinks)``
            skips the parameter gradients. See ``resnet_probe.probes.refinement``).
        raw: also keep a CPU copy of every measured activation (memory grows with the data).
        strict: raise ``NonFiniteError`` instead of warning when a NaN/Inf was measured (checked
            when results are read and when the ``with`` block ends).

    Returns:
        the attached ``ProbeSession``. Its hooks live as long as it does: keep a reference (the
        ``with`` statement does); a dropped session removes its hooks when garbage-collected.

    Raises:
        ValueError: unknown metric, a site pattern matching nothing (lists the valid sites), or a
            model on the ``meta`` device.
        RuntimeError: a part of the model below its root runs compiled code (``refuse_compiled``).
    """
    return ProbeSession(model, sites=sites, metrics=metrics, raw=raw, strict=strict)
