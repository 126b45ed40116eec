"""Suite-wide fixtures: no module may keep a hook after a test; shared small real-data models."""
from __future__ import annotations

import gc
import os
import weakref

import pytest
import torch
from torch import nn

torch.set_num_threads(min(2, os.cpu_count() or 1))
os.environ.setdefault("MPLBACKEND", "Agg")

# Keyed by id: some modules (torchmetrics) define __hash__ from state that exists only after __init__.
_MODULES: "weakref.WeakValueDictionary[int, nn.Module]" = weakref.WeakValueDictionary()
_original_init = nn.Module.__init__


def _tracking_init(self, *args, **kwargs):
    _original_init(self, *args, **kwargs)
    _MODULES[id(self)] = self


nn.Module.__init__ = _tracking_init

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def hooks_left(modules) -> list[str]:
    """Names of (module class, hook kind) pairs that still hold hooks."""
    out = []
    for m in list(modules):
        for attr in _HOOK_DICTS:
            if getattr(m, attr, None):
                out.append(f"{type(m).__name__}.{attr}")
    from torch.nn.modules import module as _m
    for attr in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks"):
        if getattr(_m, attr, None):
            out.append(f"global {attr}")
    return out


@pytest.fixture(autouse=True)
def no_hook_left_behind():
    """Every test must leave every module it touched without forward/backward hooks."""
    before = {k for k, m in list(_MODULES.items()) if any(getattr(m, a, None) for a in _HOOK_DICTS)}
    yield

    def leaked():
        return [m for k, m in list(_MODULES.items())
                if k not in before and any(getattr(m, a, None) for a in _HOOK_DICTS)]

    # Collect garbage only when something looks leaked: unreachable modules do not count.
    found = leaked()
    if found:
        gc.collect()
        found = leaked()
    names = hooks_left(found)
    assert not names, f"hooks left registered after the test: {sorted(set(names))}"


# ---- small nets trained on the real CIFAR-10 pack, shared by the science tests --------------------------
SCIENCE_BUDGET = dict(depth=20, train_limit=5000, val_size=1000, epochs=3, batch_size=128, seed=0)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny tensors: on a shared 2-core machine a 2-thread OpenMP pool
    stalls whenever one of its threads is descheduled (see ``studies.options.set_threads``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def pack_path():
    from pathlib import Path

    from resnet_probe.data import default_pack_path
    env = os.environ.get("RESNET_PROBE_DATA")
    path = Path(env) if env and Path(env).is_file() else default_pack_path()
    if path is None:
        pytest.skip("the CIFAR-10 JPEG pack (../shared/data/cifar10-jpeg.npz or $RESNET_PROBE_DATA) is not here")
    return path


@pytest.fixture(scope="session")
def trained_nets(pack_path):
    """Plain-20 and residual-20 trained on 5,000 pack images for 3 epochs (about a minute each on 2 cores)."""
    from resnet_probe.train.quick import train_quick
    nets = {}
    for family in ("plain", "residual"):
        module, metrics = train_quick(family, data=f"pack={pack_path}", **SCIENCE_BUDGET)
        nets[family] = (module.model.eval(), metrics)
    return nets


@pytest.fixture(scope="session")
def pack_test_slice(pack_path):
    """1,000 normalised images of the CIFAR-10 test split (a seeded subset) and their labels."""
    from resnet_probe.data import load_pack, normalize
    source = load_pack(pack_path, limit=1000, seed=1)
    return normalize(source.test_images), source.test_labels.long()


# ---- a tiny zoo and its data, shared by the study tests ---------------------------------------------------
@pytest.fixture(scope="session")
def tiny_data():
    """The synthetic data spec the study tests run on, loaded at the tiny zoo's size."""
    from resnet_probe.studies.inputs import load_data
    return load_data("synthetic", n_train=192, n_test=64)


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory, tiny_data):
    """``train_zoo`` at the tiny scale: plain-8/14, highway-14, residual-8/14, two optimizer steps each."""
    from resnet_probe.studies import train_zoo
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_zoo.run(train_zoo.ZooSettings.tiny(), tiny_data, out=tmp_path_factory.mktemp("zoo"))
    finally:
        torch.set_num_threads(before)


def check_report(run_dir, expected_tables=(), synthetic: bool = True) -> None:
    """A complete run with the tables, a valid PNG per figure embedded once in report.html, tidy tables."""
    import base64
    import re

    from PIL import Image

    from resnet_probe.report import open_run
    run = open_run(run_dir)
    assert run.state == "complete"
    assert set(expected_tables) <= set(run.tables), set(run.tables)
    html = (run.path / "report.html").read_text()
    assert ("SYNTHETIC DATA" in html) == synthetic
    assert run.figures
    for fig in run.figures:
        png = run.path / "figures" / f"{fig['name']}.png"
        with Image.open(png) as im:
            im.verify()
            assert im.size[0] > 100 and im.size[1] > 100
        embedded = re.search(rf'<figure id="fig-{re.escape(fig["name"])}"><img src="data:image/png;base64,([^"]+)"',
                             html)
        assert embedded, fig["name"]
        assert base64.b64decode(embedded[1]) == png.read_bytes()
    for name in run.tables:
        assert len(run.table(name)) > 0
        assert {"run", "seed", "model", "site", "metric", "value"} <= set(run.table(name).columns)
