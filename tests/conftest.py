"""Suite-wide fixtures: no module may keep a hook after a test; shared small real-data models."""
from __future__ import annotations

import gc
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import weakref
from pathlib import Path

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


# ---- where tests run: the CPU unless `pytest -m gpu`; compiling tests in a child process -------------
# Tests marked `compiled` run torch.compile. Inductor's CPU code generation is broken under an
# ATEN_CPU_CAPABILITY override (C++ compile errors, wrong values), so those tests run only with the
# native capability; and it has corrupted the heap on some CPUs, so they run in one child process per
# session (`pytest_runtest_protocol` below), where a crash fails the test that was running, not pytest.
COMPILED_CHILD = "RESNET_PROBE_COMPILED_CHILD"  # in the child: the file it writes its reports to
COMPILED_CHILD_TIMEOUT_S = 1800


def pytest_configure(config):
    config.addinivalue_line("markers", "compiled: runs torch.compile (native CPU capability only; run in a "
                                       "child process)")
    gpu_run = re.search(r"(?<!not )\bgpu\b", config.option.markexpr or "")
    if not gpu_run and COMPILED_CHILD not in os.environ:
        # Unmarked tests stay on the CPU where CUDA exists (no bf16, no compilation by default); set
        # before anything initialises CUDA, and inherited by the processes tests start.
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


def pytest_collection_modifyitems(config, items):
    cpu_only = os.environ.get("CUDA_VISIBLE_DEVICES") == ""
    override = os.environ.get("ATEN_CPU_CAPABILITY")
    for item in items:
        if cpu_only and item.get_closest_marker("gpu"):
            item.add_marker(pytest.mark.skip(reason="GPU tests run with `pytest -m gpu` (CUDA is hidden from "
                                                    "the other tests)"))
        if override and item.get_closest_marker("compiled"):
            item.add_marker(pytest.mark.skip(reason=f"torch.compile runs only with the native CPU capability; "
                                                    f"ATEN_CPU_CAPABILITY={override} overrides it"))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    """A `compiled` test runs, fixtures and all, in the session's child process; its phases' reports
    come back and are logged here as if it had run in this process."""
    if COMPILED_CHILD in os.environ or item.get_closest_marker("compiled") is None:
        return None
    skip = next((m for m in item.iter_markers("skip")), None)  # skips added above run nothing anywhere
    ihook = item.ihook
    ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    phases = ([{"when": "setup", "outcome": "skipped", "text": skip.kwargs.get("reason", "")}] if skip
              else _compiled_reports(item.session, item.nodeid))
    for phase in phases:
        skipped = phase["outcome"] == "skipped"
        longrepr = (str(item.path), item.location[1] + 1, f"Skipped: {phase['text']}") if skipped else (
            phase["text"] or None)
        ihook.pytest_runtest_logreport(report=pytest.TestReport(
            item.nodeid, item.location, {k: 1 for k in item.keywords}, phase["outcome"], longrepr, phase["when"],
            duration=phase.get("duration", 0.0)))
    ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    # this process set nothing up for the test; tear down what the next test does not share, as
    # pytest's own protocol would
    item.session._setupstate.teardown_exact(nextitem)
    return True


_REPORTS: dict[str, list[dict]] = {}  # nodeid -> its phases' reports from a child process


def _compiled_reports(session, nodeid: str) -> list[dict]:
    """The reports of ``nodeid`` from a child process that runs every compiled test not run yet;
    after a crash, a new child runs the ones after the test that crashed."""
    while nodeid not in _REPORTS:
        pending = [i.nodeid for i in session.items if i.get_closest_marker("compiled") is not None
                   and not any(True for _ in i.iter_markers("skip")) and i.nodeid not in _REPORTS]
        with tempfile.TemporaryDirectory(prefix="rp-compiled-") as tmp:
            log = Path(tmp) / "reports.jsonl"
            log.touch()
            try:
                proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *pending],
                                      cwd=session.config.rootpath, env={**os.environ, COMPILED_CHILD: str(log)},
                                      capture_output=True, text=True, timeout=COMPILED_CHILD_TIMEOUT_S)
                ended, output = f"exit status {proc.returncode}", proc.stdout + proc.stderr
                if proc.returncode < 0:
                    ended = f"signal {signal.Signals(-proc.returncode).name}"
            except subprocess.TimeoutExpired as err:
                ended, output = f"no result within {COMPILED_CHILD_TIMEOUT_S} s", f"{err.stdout or ''}"
            lines = [json.loads(line) for line in log.read_text().splitlines()]
        tail = "\n".join(output.splitlines()[-40:])
        phases: dict[str, list[dict]] = {}
        for r in lines:
            phases.setdefault(r["nodeid"], [])
            if r["when"] != "start":
                phases[r["nodeid"]].append(r)
        for test, reports in phases.items():
            if not any(r["when"] == "teardown" for r in reports):  # the child died while it ran
                reports = [r for r in reports if r["when"] == "setup" and r["outcome"] == "passed"]
                reports.append({"when": "call", "outcome": "failed", "text": f"the child process running the "
                                f"compiled tests ended ({ended}) during this test: a crash in compiled code?\n{tail}"})
            _REPORTS[test] = reports
        if not phases:  # it could not run them: report rather than try again
            _REPORTS.update({test: [{"when": "setup", "outcome": "failed", "text": f"the child process ran none "
                                     f"of the compiled tests ({ended}):\n{tail}"}] for test in pending})
    return _REPORTS[nodeid]


def pytest_runtest_logstart(nodeid, location):
    if COMPILED_CHILD in os.environ:
        _child_write({"nodeid": nodeid, "when": "start"})


def pytest_runtest_logreport(report):
    if COMPILED_CHILD in os.environ:
        text = report.longreprtext if report.failed else (
            report.longrepr[2].removeprefix("Skipped: ") if report.skipped and isinstance(report.longrepr, tuple)
            else "")
        _child_write({"nodeid": report.nodeid, "when": report.when, "outcome": report.outcome, "text": text,
                      "duration": report.duration})


def _child_write(record: dict) -> None:
    with open(os.environ[COMPILED_CHILD], "a") as f:
        f.write(json.dumps(record) + "\n")
