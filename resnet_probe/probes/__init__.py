"""Probes: streaming response statistics, gradient norms and gate saturation, through the block anatomy.

    from resnet_probe.probes import probe
    with probe(model, sites="*.branch") as session:    # any CifarNet or torchvision ResNet
        model(x)
    session.table()    # site, stage, block, kind, metric, value, downsampling, path, step

- ``probe`` / ``ProbeSession`` (session.py): owns its hooks; results as a tidy table;
- ``ChannelStats`` (stats.py): streaming per-channel count / sum / sum of squares in float64;
  every std is the unbiased one (``torch.std``'s default);
- sites (sites.py): ``stage{s}.block{b}.branch.conv{i}``, ``.branch``, ``.shortcut``, ``.out``, ``.gate``;
- ``ResponseProbe`` (response.py), ``GradientProbe`` (gradient.py), ``RefinementProbe`` (refinement.py:
  cos(F(x), -dL/dF) and ||F(x)|| / ||x|| per block, Jastrzebski et al. 2018), ``NonFiniteWatch`` (nonfinite.py).

``ProbeCallback`` (Lightning) lives in ``resnet_probe.probes.callback`` and is imported from there,
so that this package stays usable without Lightning.
"""
from .gradient import GRADIENT_METRICS, GradientProbe
from .nonfinite import NonFiniteError, NonFiniteWatch
from .refinement import REFINEMENT_METRICS, RefinementProbe
from .response import SATURATION, ResponseProbe
from .session import COLUMNS, METRICS, ProbeSession, probe, refuse_compiled
from .sites import KINDS, Site, all_sites, select_sites, site_names
from .stats import SUMMARY_METRICS, ChannelStats, all_reduce_stats, batch_moments

__all__ = ["COLUMNS", "ChannelStats", "GRADIENT_METRICS", "GradientProbe", "KINDS", "METRICS",
           "NonFiniteError", "NonFiniteWatch", "ProbeSession", "REFINEMENT_METRICS", "RefinementProbe", "ResponseProbe", "SATURATION",
           "SUMMARY_METRICS", "Site", "all_reduce_stats", "all_sites", "batch_moments", "probe",
           "refuse_compiled", "select_sites", "site_names"]
