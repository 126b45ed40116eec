"""The notebooks open cleanly in JupyterLab and run top to bottom on the runs ``make demo`` writes.

The run folders come from the quickstart at the tiny scale (nets trained for two steps) on the CIFAR-10
JPEG pack when it is here (synthetic images only when it is not), written under ``runs/`` as ``make
demo`` writes them, and from the landscape, shattered-gradients and refinement studies at the tiny scale on
the quickstart's deepest plain and residual nets (the quickstart does not run them); every notebook is
executed with nbclient on the ``python3`` kernel and must finish without a cell error. Notebooks only
read runs: none of them trains.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
REQUIRED = {"lesion_run", "response_std_depths", "similarity_run", "torchvision_probes", "landscape_run",
            "shattered_run", "refinement_run"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder whose ``runs/`` holds a tiny quickstart (a train_zoo run and a run of every study it runs) and a
    tiny landscape, shattered-gradients and refinement run on its deepest plain and residual nets."""
    from resnet_probe.data import default_pack_path
    from resnet_probe.studies import landscape, quickstart, refinement, shattered
    from resnet_probe.studies.inputs import Zoo, load_data
    from resnet_probe.studies.train_zoo import ZooSettings

    root = tmp_path_factory.mktemp("notebook_work")
    env = os.environ.get("RESNET_PROBE_DATA")
    pack = Path(env) if env and Path(env).is_file() else default_pack_path()
    spec = f"pack={pack}" if pack is not None else "synthetic"
    data = load_data(spec, n_train=192, n_test=64)
    done = quickstart.run(quickstart.QuickstartSettings.tiny(), None, data, out=root / "runs",
                          train=ZooSettings.tiny(), scale="tiny")
    deepest = Zoo(done.zoo.deepest(("plain", "residual")))
    landscape.run(landscape.LandscapeSettings.tiny(), deepest, data, out=root / "runs", scale="tiny")
    shattered.run(shattered.ShatteredSettings.tiny(), deepest, data, out=root / "runs", scale="tiny")
    refinement.run(refinement.RefinementSettings.tiny(), deepest, data, out=root / "runs", scale="tiny")
    return {"root": root, "synthetic": pack is None,
            "lesion": max((root / "runs" / "lesion").iterdir())}


def test_the_required_notebooks_exist():
    assert REQUIRED <= {p.stem for p in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_clean_nbformat4_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.nbformat == 4
    assert nb.metadata["kernelspec"]["name"] == "python3"
    assert nb.cells[0].cell_type == "markdown"
    assert sum(c.cell_type == "markdown" for c in nb.cells) >= 3
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None
            assert "train_quick" not in cell.source and ".fit(" not in cell.source   # notebooks never retrain


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes_on_tiny_runs(path, workdir, monkeypatch):
    from nbclient import NotebookClient
    monkeypatch.delenv("RESNET_PROBE_RUN", raising=False)       # each finds the newest run under runs/
    monkeypatch.delenv("RESNET_PROBE_WEIGHTS", raising=False)
    monkeypatch.delenv("RESNET_PROBE_IMAGEFOLDER", raising=False)
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(workdir["root"])}})
    client.execute()          # raises CellExecutionError naming the failing cell
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    if path.stem == "lesion_run":
        assert workdir["lesion"].name in text     # the newest lesion run under runs/
        assert "without stage" in text          # the by-hand deletion ran, on the run's own data
        assert ("SYNTHETIC" in text) == workdir["synthetic"]
    if path.stem == "similarity_run":
        found = re.search(r"largest difference from the table ([0-9.e+-]+)", text)
        assert found and float(found[1]) < 1e-9       # the CKA recomputed from the reopened model and images
        assert "minibatches of 4: finite = True" in text
    if path.stem == "landscape_run":
        assert "loss by hand" in text                      # the centre re-computed on the run's own images
    if path.stem == "refinement_run":
        found = re.search(r"largest difference from the table ([0-9.e+-]+)", text)
        assert found and float(found[1]) < 1e-4       # per-image cosines and ratios by autograd, float32
        assert "share of images with a positive cosine, per block" in text
    if path.stem == "shattered_run":
        assert "gradient correlation at distance" in text      # the by-hand gradients, on the run's own images
