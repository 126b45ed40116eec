"""Run folders, tidy tables, seaborn figures and HTML / Markdown reports for the studies.

A study is short::

    from resnet_probe.report import new_run, format_ci

    run = new_run("degradation", out="runs", config=cfg, data=datamodule.provenance(), source_file=__file__)
    run.add_table("curves", curves)        # tidy: run, seed, model, site, metric, value, step (+ split, ...)
    run.add_figure("error_curves", "line", "curves", x="step", hue="model", style="split",
                   dashes={"train": [4, 2], "test": ""}, query="metric == 'error'",
                   xlabel="iteration", ylabel="error (%)", title="Training on CIFAR-10 (He et al. Fig. 1)")
    run.add_text("Method", "Each net trained with the paper recipe ...")
    run.add_headline(table_of_formatted_numbers, title="Test error, mean ± std over 3 seeds")
    run.finish()                           # draws figures, writes report.md + report.html, prints the path

``with new_run(...) as run:`` does the same and marks the run ``failed`` / ``interrupted`` (in
``status.json``) when the study raises; inside it SIGTERM is handled like Ctrl-C (``RunTerminated``,
a ``KeyboardInterrupt``; run marked ``interrupted``). ``status.json`` records the writing process
(pid, host, start) and its last save, so a study killed outright (SIGKILL) is found out:
``resnet-probe report`` says "the process that wrote it is gone". Earlier run folders are never touched.

Public API
----------
- ``new_run(study, out="runs", config=None, *, data=None, source_file=None, title=None, argv=None) -> Run``
- ``open_run(path) -> Run``; ``find_run(study)``: the run a notebook reads
- ``Run``: ``path``, ``state``, ``status``, ``tables``, ``figures``, ``provenance``, ``table(name)``,
  ``add_table(name, df)``, ``add_figure(name, kind, table, *, section=None, caption=None, **spec)``,
  ``add_text(section, markdown)``, ``add_headline(df_or_markdown, *, title=None)``, ``set_data(dict)``,
  ``set_title(title)``, ``mark(state)``, ``link_child(run_or_path)``, ``write_report()``, ``finish()``
- ``combine_runs(run, children, title=None)``: one report over several runs
- ``rebuild(run_dir) -> Path`` / ``rebuild_main(argv=None)``: ``resnet-probe report RUN_DIR
  [--allow-incomplete]`` (an incomplete run, or a table whose row count differs from the recorded
  one, is refused)
- figure kinds ``FIGURE_KINDS`` (line, bar, scatter, heatmap, layer_profile, contour) and their spec keys
  ``SPEC_KEYS``: see ``resnet_probe/report/figures.py``
- numbers: ``t_mean_ci``, ``format_ci``, ``format_mean_std``, ``summarise_over_seeds``
- ``validate_tidy``, ``TIDY_RECOMMENDED``, ``RunFolderError``, ``FigureError``
- ``screenshot(html, png)`` in ``resnet_probe.report.screenshot`` (headless Chromium)
"""
from .combine import combine_runs
from .find import find_run
from .figures import FIGURE_KINDS, SPEC_KEYS
from .folder import STATES, RunFolderError
from .rebuild import FigureError, rebuild, rebuild_main
from .interrupt import RunTerminated
from .run import Run, new_run, open_run
from .tables import TIDY_RECOMMENDED, TIDY_REQUIRED, validate_tidy
from .uncertainty import format_ci, format_mean_std, summarise_over_seeds, t_mean_ci

__all__ = ["FIGURE_KINDS", "FigureError", "Run", "RunFolderError", "RunTerminated", "SPEC_KEYS", "STATES",
           "TIDY_RECOMMENDED", "TIDY_REQUIRED", "combine_runs", "find_run", "format_ci", "format_mean_std", "t_mean_ci",
           "new_run", "open_run",           "rebuild", "rebuild_main", "summarise_over_seeds", "validate_tidy"]
