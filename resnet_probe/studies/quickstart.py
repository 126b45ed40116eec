"""The demo behind ``make demo``: train small plain / highway / residual nets, run every study, one report.

Question: do the three central effects of the papers show up in a few minutes on a CPU?
(1) the degradation problem: a deeper plain net ends with a higher training error than a shallower
one, a deeper residual net does not (He et al. 2016, Fig. 1); (2) residual branches respond less than
the same layers of a plain net (He et al. 2016, Fig. 7); (3) deleting one block of a residual net
hurts far less than deleting one block of a plain net (Veit et al. 2016, Fig. 3).

Steps, composed in Python: ``train_zoo`` (families x depths on the available data: the JPEG pack or
CIFAR-10 when found, synthetic data otherwise, said loudly), then ``degradation``, ``response_std``
and ``gradients`` on the zoo, ``lesion`` on its deepest plain, highway and residual nets, ``paths`` on
its deepest residual net, ``highway`` on its highway net, ``similarity`` (block CKA) on its deepest plain,
highway and residual nets, and a combined report whose headline
states each effect as a difference with a 95 % interval and a verdict (``effects``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import pandas as pd

from ..report import combine_runs
from . import degradation, gradients, highway, lesion, paths, response_std, similarity, train_zoo
from .spec import StudyCommand
from .effects import CONSISTENT, cell, degradation_effect, deletion_effect, response_effect
from .inputs import StudyData, Zoo, model_name
from .runs import StudyResult, study_config, study_run
from .train_zoo import ZooSettings

TITLE = "resnet_probe quickstart: why residual nets train"
ANALYSIS_MODULES = {"lesion": lesion, "paths": paths, "highway": highway, "similarity": similarity}
ANALYSES = tuple(ANALYSIS_MODULES)


@dataclass(frozen=True)
class QuickstartSettings:
    """What the quickstart runs on the zoo, and how large.

    Args:
        analyses: analysis studies run on the zoo's deepest nets (lesion, paths, highway, similarity).
        n_resamples: bootstrap resamples of the headline intervals.
        degradation: settings of the degradation study.
        response_std: settings of the response-std study.
        gradients: settings of the gradient study.
        lesion: settings of the lesion study (run on the deepest plain, highway and residual nets).
        paths: settings of the paths study (deepest residual net).
        highway: settings of the highway study.
        similarity: settings of the similarity study (deepest plain, highway and residual nets, compared in
            pairs of the same depth).
    """

    analyses: tuple[str, ...] = ANALYSES
    n_resamples: int = 1000
    degradation: degradation.DegradationSettings = field(default_factory=degradation.DegradationSettings.quick)
    response_std: response_std.ResponseSettings = field(default_factory=response_std.ResponseSettings.quick)
    gradients: gradients.GradientSettings = field(default_factory=gradients.GradientSettings.quick)
    lesion: lesion.LesionSettings = field(default_factory=lambda: lesion.LesionSettings(
        n_examples=1000, k_max=4, n_sets=5, k_swaps=(1, 2, 4), reorder_sets=3, attribution_examples=8))
    paths: paths.PathsSettings = field(default_factory=lambda: paths.PathsSettings(n_examples=32, n_samples=10))
    highway: highway.HighwaySettings = field(default_factory=lambda: highway.HighwaySettings(n_examples=500))
    similarity: similarity.SimilaritySettings = field(
        default_factory=lambda: similarity.SimilaritySettings(n_examples=500, minibatch=50))

    def __post_init__(self) -> None:
        unknown = sorted(set(self.analyses) - set(ANALYSES))
        if unknown:
            raise ValueError(f"unknown analyses {unknown}; valid: {', '.join(ANALYSES)}")
        if self.n_resamples < 1:
            raise ValueError(f"n_resamples must be positive; got {self.n_resamples}")

    @classmethod
    def quick(cls) -> "QuickstartSettings":
        return cls()

    @classmethod
    def paper(cls) -> "QuickstartSettings":
        return cls(degradation=degradation.DegradationSettings.paper(),
                   response_std=response_std.ResponseSettings.paper(), gradients=gradients.GradientSettings.paper(),
                   lesion=lesion.LesionSettings.paper(), paths=paths.PathsSettings.paper(),
                   highway=highway.HighwaySettings.paper(), similarity=similarity.SimilaritySettings.paper())

    @classmethod
    def tiny(cls) -> "QuickstartSettings":
        return cls(n_resamples=100, degradation=degradation.DegradationSettings.tiny(),
                   response_std=response_std.ResponseSettings.tiny(), gradients=gradients.GradientSettings.tiny(),
                   lesion=lesion.LesionSettings.tiny(), paths=paths.PathsSettings.tiny(),
                   highway=highway.HighwaySettings.tiny(), similarity=similarity.SimilaritySettings.tiny())


def trained_nets(scale: str) -> ZooSettings:
    """The zoo: ``train_zoo``'s nets at that scale."""
    return getattr(ZooSettings, scale)()


def run(settings: QuickstartSettings, models: Zoo | None, data: StudyData, *, out: str | Path = "runs",
        seeds: Sequence[int] = (0,), device: str = "auto", train: ZooSettings | None = None,
        scale: str | None = None) -> StudyResult:
    """Train the zoo (or take ``models``, a train_zoo run's ``Zoo``), run every study on it, write one report."""
    start = time.perf_counter()
    train = train or trained_nets(scale or "quick")
    common = dict(out=out, seeds=seeds, device=device, scale=scale)
    timings: dict[str, float] = {}

    def timed(name: str, fn, *args, **kwargs) -> StudyResult:
        t = time.perf_counter()
        print(f"quickstart: {name}", flush=True)
        result = fn(*args, **kwargs)
        timings[name] = time.perf_counter() - t
        return result

    children = []
    if models is None:
        zoo_run = timed("train_zoo", train_zoo.run, train, data, out=out, seeds=seeds, device=device, scale=scale)
        zoo = zoo_run.zoo
        children.append(zoo_run.path)
    else:
        zoo = models
        children += zoo.folders
    results = {"degradation": timed("degradation", degradation.run, settings.degradation, zoo, data, **common),
               "response_std": timed("response_std", response_std.run, settings.response_std, zoo, data, **common),
               "gradients": timed("gradients", gradients.run, settings.gradients, zoo, data, **common)}
    deepest = zoo.deepest(("plain", "highway", "residual"))
    for_study = {"lesion": deepest, "paths": [m for m in deepest if m.family == "residual"],
                 "highway": [m for m in deepest if m.family == "highway"], "similarity": deepest}
    for name in settings.analyses:
        if for_study[name]:
            results[name] = timed(name, ANALYSIS_MODULES[name].run, getattr(settings, name), Zoo(for_study[name]),
                                  data, **common)
    children += [r.path for r in results.values()]
    config = study_config(models=[str(f) for f in zoo.folders], data=data.spec, seeds=seeds, device=device, out=out,
                          scale=scale, settings=settings, train=train)
    with study_run("quickstart", config, title=TITLE, data=zoo.data or data.provenance(),
                   source_file=__file__) as r:
        tables = headline(r, settings, zoo, results)
        _texts(r, zoo, settings, train, seeds, timings, time.perf_counter() - start)
        combine_runs(r, children)
    print(f"quickstart: finished in {time.perf_counter() - start:.0f} s", flush=True)
    return StudyResult(r.path, tables, zoo)


def headline(run, settings: QuickstartSettings, zoo: Zoo, results: dict[str, StudyResult]) -> dict[str, pd.DataFrame]:
    """The three effects (``effects``): a headline table, the tidy ``effects`` table and its figure."""
    deep = max(m.depth for m in zoo.of(("plain", "residual")))
    plain, residual = model_name("plain", deep), model_name("residual", deep)
    pair = f"depth {deep}: {plain} minus {residual}"   # names no single family, so it takes no family colour
    n = settings.n_resamples
    deg, gaps = degradation_effect(zoo.tables["train_errors"], n)
    resp, values = response_effect(results["response_std"].tables["groups"], plain, residual, n)
    lesion_tables = results["lesion"].tables if "lesion" in results else {}
    dele = (deletion_effect(lesion_tables["deletion_per_image"], plain, residual, n)
            if "deletion_per_image" in lesion_tables else None)
    depths = sorted({m.depth for m in zoo.of(("plain", "residual"))})
    rows = [{"effect": "(1) deeper plain nets train worse (He Fig. 1)",
             "measured": f"training error (eval mode), depth {depths[-1]} minus depth {depths[0]}: plain "
                         f"{cell(gaps['plain']) if 'plain' in gaps else 'n/a'}, residual "
                         f"{cell(gaps['residual']) if 'residual' in gaps else 'n/a'}",
             "plain minus residual [95 % CI]": cell(deg), "verdict": deg.verdict, "interval": deg.how},
            {"effect": "(2) residual responses are smaller (He Fig. 7)",
             "measured": f"mean branch F(x) std over blocks, depth {deep}: plain {_mean(values.get('plain'))}, "
                         f"residual {_mean(values.get('residual'))}",
             "plain minus residual [95 % CI]": cell(resp, digits=3, unit=""), "verdict": resp.verdict,
             "interval": resp.how}]
    tidy = [{"effect": 1, "model": pair, "metric": "gap_difference_pp", "value": deg.value,
             "lo": deg.lo, "hi": deg.hi},
            {"effect": 2, "model": pair, "metric": "branch_std_difference", "value": resp.value,
             "lo": resp.lo, "hi": resp.hi}]
    if dele is not None:
        single = lesion_tables["single_block"]
        mean_rows = single[single["metric"] == "mean_error_increase_pp"].groupby("model")["value"].mean()
        measured = ", ".join(f"{m} {mean_rows[m]:+.1f} pp" for m in mean_rows.index)
        rows.append({"effect": "(3) deleting a residual block hurts far less (Veit Fig. 3)",
                     "measured": f"mean error increase per deleted non-downsampling block: {measured}",
                     "plain minus residual [95 % CI]": cell(dele), "verdict": dele.verdict, "interval": dele.how})
        tidy.append({"effect": 3, "model": pair, "metric": "deletion_difference_pp",
                     "value": dele.value, "lo": dele.lo, "hi": dele.hi})
    df = pd.DataFrame(tidy).assign(run=run.path.name, seed=-1, site="network")
    run.add_table("effects", df)
    run.add_figure("effects", "bar", "effects", section="The three effects", x="model", col="metric", lo="lo",
                   hi="hi", sharey=False, xlabel="", ylabel="plain minus residual",
                   title="Each effect as plain minus residual, with its 95 % interval (the paper predicts > 0)",
                   caption="(1) gap_difference_pp: depth gap of the training error, plain minus residual (pp); "
                           "(2) branch_std_difference: mean branch response std, plain minus residual; "
                           "(3) deletion_difference_pp: mean error increase per deleted block, plain minus "
                           "residual (pp).")
    run.add_headline(_scale_line(zoo), title="Scale of this run")
    run.add_headline(pd.DataFrame(rows), title="Three effects, measured on this run")
    return {"effects": df}


def _mean(values) -> str:
    return "n/a" if not values else f"{sum(values) / len(values):.3f}"


def _scale_line(zoo: Zoo) -> str:
    final = zoo.tables["final"]
    errors = final[final["metric"].isin(["train_eval_error_percent", "test_error_percent"])]
    per = errors.groupby(["model", "metric"], sort=False)["value"].mean().unstack()
    models = ", ".join(f"{m} {per.loc[m, 'train_eval_error_percent']:.1f} / {per.loc[m, 'test_error_percent']:.1f} %"
                       for m in per.index)
    steps = int(final.loc[final["metric"] == "steps", "value"].max())
    seeds = final["seed"].nunique()
    return (f"Nets trained for {steps:,} optimizer steps on the data below ({seeds} seed{'s' if seeds > 1 else ''}); "
            f"final training (eval mode) / test error: {models}. Small nets trained briefly: the effects of the "
            "papers need their full training (`--scale paper`, for a GPU); here each verdict says only whether "
            "this run resolves the effect.")


def _texts(run, zoo: Zoo, s: QuickstartSettings, train: ZooSettings, seeds, timings: dict, seconds: float) -> None:
    data = zoo.data or {}
    if data.get("synthetic") or data.get("kind") == "synthetic":
        run.add_text("Data", "**These nets were trained on SYNTHETIC images, not CIFAR-10** (no CIFAR-10 data was "
                             "found). The three effects are properties of training on natural images at depth; on "
                             "the synthetic set they may not show, and a missing effect here says nothing about "
                             "the papers. Point `--data` at the JPEG pack or a torchvision CIFAR-10 root.")
    run.add_text("How to read the headline", "Each effect is a difference between the plain and the residual net "
                 "of the same depth whose sign the paper predicts positive, with a 95 % interval: a paired bootstrap "
                 "over the evaluation images (the same images for both nets) for one seed, a Student-t interval "
                 "over seeds for several. The verdict says *" + CONSISTENT + "* only when the whole interval lies "
                 "above zero. (1) uses the training error measured after training in eval mode on "
                 f"{train.train_eval_examples:,} training images; (2) the branch output std after its last BN, "
                 f"mean over blocks, on {s.response_std.n_examples:,} test images; (3) the mean over the "
                 f"non-downsampling blocks of the error increase when that block alone is deleted, on "
                 f"{s.lesion.n_examples:,} test images. Training: {train.describe(seeds, 'cpu')}")
    run.add_text("Highway nets", "Closing a highway block's gate (T = 0) is the highway analogue of deleting a "
                 "residual block, and its cost is often the smallest of the three families here. That is expected "
                 "of briefly trained highway nets: their gate biases start negative (carry-biased), so most gate "
                 "values stay near 0 and each block already passes mostly its input; closing the gate removes "
                 "only the small transform share (see the highway study's mean T per layer).")
    lines = [f"- {k}: {v:.0f} s" for k, v in timings.items()] + [f"- total: {seconds:.0f} s"]
    run.add_text("Timings", "\n".join(lines))


COMMAND = StudyCommand(
    name="quickstart", run=run, settings=QuickstartSettings, inputs="zoo", train=trained_nets, threads=1,
    description="Train small plain / highway / residual nets and run every study on them (degradation, response "
                "std, gradients, lesion, paths, highway, similarity): one report whose headline states three effects of the "
                "papers with intervals.")
