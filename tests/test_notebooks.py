"""The notebooks open cleanly in JupyterLab and run top to bottom on run folders made here.

The run folders come from the studies at a tiny size (nets trained for two steps on synthetic
images); every notebook is executed with nbclient on the ``python3`` kernel and must finish without
a cell error. Notebooks only read runs: none of them trains.
"""
from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
REQUIRED = {"lesion_run", "response_std_depths", "torchvision_probes"}
LESION_TINY = ["--k-max", "2", "--n-sets", "2", "--k-swaps", "1", "--n-resamples", "20", "--set", "reorder_sets=2",
               "--set", "attribution_examples=8", "--set", "attribution_methods=('gradient_x_activation',)"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder with ``runs/lesion/<id>`` and ``runs/response_std/<id>`` made from tiny trained nets."""
    from resnet_probe.data import CifarDataModule, make_synthetic
    from resnet_probe.studies import lesion, response_std
    from resnet_probe.train.quick import train_quick

    root = tmp_path_factory.mktemp("notebook_work")
    source = make_synthetic(192, 32, seed=0)
    ckpts = {}
    for family, depth in (("residual", 8), ("residual", 14)):
        dm = CifarDataModule.from_source(source, batch_size=64, val_size=64, train_limit=128, augment=False)
        out = root / "nets" / f"{family}-{depth}"
        train_quick(family, depth, data=dm, epochs=1, out_dir=out)
        ckpts[(family, depth)] = str(out / "checkpoints" / "last.ckpt")
    runs = str(root / "runs")
    common = ["--data", "synthetic", "--n-examples", "32", "--out", runs]
    response = response_std.main([*ckpts.values(), *common])
    lesion_run = lesion.main([ckpts[("residual", 14)], *common, *LESION_TINY])
    return {"root": root, "response_std": response, "lesion": lesion_run}


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
    # lesion_run finds the newest run under runs/ by itself; the others are pointed at a run
    if path.stem == "response_std_depths":
        monkeypatch.setenv("RESNET_PROBE_RUN", str(workdir["response_std"]))
    elif path.stem == "torchvision_probes":
        monkeypatch.setenv("RESNET_PROBE_RUN", str(workdir["lesion"]))
    else:
        monkeypatch.delenv("RESNET_PROBE_RUN", raising=False)
    monkeypatch.delenv("RESNET_PROBE_WEIGHTS", raising=False)
    monkeypatch.delenv("RESNET_PROBE_IMAGEFOLDER", raising=False)
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(workdir["root"])}})
    client.execute()          # raises CellExecutionError naming the failing cell
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    if path.stem == "lesion_run":
        assert workdir["lesion"].name in text     # the newest lesion run under runs/
        assert "without stage" in text          # the by-hand deletion ran
