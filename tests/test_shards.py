"""Sharded analyses: 2 and 3 gloo ranks on the CPU give one process's tables, and a failed rank stops the run.

Counts, predictions and per-example arrays are compared bit for bit, float64 sums to 1e-12; the image
counts (7, 11, 4) do not divide by the number of ranks, and with 4 images in chunks of 2 one of 3 ranks
has no image at all.
"""
from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from resnet_probe.lesion import evaluate_deletion_sets, k_random_sweep, reorder_sweep, single_block_sweep
from resnet_probe.models import build_model
from resnet_probe.paths import sampled_path_gradients
from resnet_probe.shards import ONE, Shard, ShardFailure
from resnet_probe.studies.paths import exact_norms
from resnet_probe.studies.response_std import layer_responses

ROOT = Path(__file__).resolve().parents[1]
BATCH = 2  # images per chunk: the unit the ranks share out


def _model():
    torch.manual_seed(0)
    return build_model("residual", 14).eval()  # 6 blocks; two swappable ones per stage


def _data(n: int):
    g = torch.Generator().manual_seed(n)
    return torch.randn(n, 3, 12, 12, generator=g), torch.randint(0, 10, (n,), generator=g)


def _analyses(n: int, shard: Shard | None) -> dict:
    """Every sharded analysis on ``n`` images: the sweeps' tables, per-example arrays and probe tables."""
    model, (x, y) = _model(), _data(n)
    sweep = dict(batch_size=BATCH, n_resamples=30, shard=shard)
    m = evaluate_deletion_sets(model, [[], [1], [0, 3], [2, 4, 5]], x, y, batch_size=BATCH, return_logits=True,
                               shard=shard)
    responses, groups = layer_responses(model, x, batch_size=BATCH, group_size=3, shard=shard)
    return {
        "metrics": m,
        "single_block": single_block_sweep(model, x, y, **sweep),
        "k_random": k_random_sweep(model, x, y, ks=(1, 2), n_sets=3, seed=1, **sweep),
        "reorder": reorder_sweep(model, x, y, k_swaps=(1, 2), n_sets=2, seed=2, **sweep),
        "responses": responses, "groups": groups,
        "sampled_paths": sampled_path_gradients(model, x, y, ks=(0, 2, 6), samples_per_k=3, seed=3, sets_per_pass=4,
                                                batch_size=BATCH, shard=shard),
        "exact_norms": exact_norms(model, x, y, BATCH, shard),
    }


def _start(fn, args, world: int) -> None:
    """Run ``fn(rank, *args)`` in ``world`` forked processes (forked: no re-import, seconds less per rank)."""
    mp.start_processes(fn, args=args, nprocs=world, start_method="fork")


def _rank(rank: int, world: int, init: str, sizes: list[int], out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        shard = Shard(rank, world, timeout_s=60)
        results = {n: _analyses(n, shard) for n in sizes}
        if rank == 0:
            Path(out).write_bytes(pickle.dumps(results))
    finally:
        dist.destroy_process_group()


def _sharded(tmp_path, world: int, sizes: list[int]) -> dict:
    out = tmp_path / f"world{world}.pkl"
    _start(_rank, (world, f"file://{tmp_path / f'init{world}'}", sizes, str(out)), world)
    return pickle.loads(out.read_bytes())


def _assert_same(one: dict, many: dict) -> None:
    a, b = one["metrics"], many["metrics"]
    for k in ("error", "intact_error", "loss", "kl", "intact_loss"):
        np.testing.assert_array_equal(getattr(a, k), getattr(b, k), err_msg=k)  # per example, bit for bit
    assert torch.equal(a.logits, b.logits)
    for name in ("single_block", "k_random", "reorder", "sampled_paths"):
        pd.testing.assert_frame_equal(one[name], many[name], check_exact=True)  # means and bootstrap bounds too
        assert one[name].attrs == many[name].attrs or name == "sampled_paths"
    pd.testing.assert_frame_equal(one["groups"], many["groups"], check_exact=True)
    r1, r2 = one["responses"], many["responses"]
    pd.testing.assert_frame_equal(r1.drop(columns="value"), r2.drop(columns="value"))
    count = (r1["metric"] == "count").to_numpy()
    np.testing.assert_array_equal(r1["value"][count], r2["value"][count])
    np.testing.assert_allclose(r1["value"], r2["value"], rtol=1e-12, atol=0)  # float64 sums, order of additions
    np.testing.assert_array_equal(one["exact_norms"][0], many["exact_norms"][0])
    assert one["exact_norms"][1] == many["exact_norms"][1]


@pytest.mark.parametrize("world, sizes", [(2, [7]), (3, [11, 4])])
def test_sharded_analyses_equal_one_process(tmp_path, world, sizes):
    """Lesion sweeps (single-block, k-random, reordering), response statistics and path gradients sharded
    over gloo ranks give the tables of one process."""
    many = _sharded(tmp_path, world, sizes)
    for n in sizes:
        one = _analyses(n, None)
        assert one["metrics"].error.shape == (4, n)
        _assert_same(one, many[n])


def test_shard_spans_cover_every_image_once():
    """The ranks' contiguous spans partition the units, the first ``n % world`` ranks taking one more."""
    for n in (0, 1, 4, 7, 11, 50_000):
        for world in (1, 2, 3, 8):
            spans = [Shard(r, world).span(n) for r in range(world)]
            assert [i for s in spans for i in s] == list(range(n))
            assert max(map(len, spans)) - min(map(len, spans)) <= 1
    assert ONE.units([1, 2, 3]) == [1, 2, 3] and ONE.writer
    with pytest.raises(ValueError, match="rank must be in"):
        Shard(2, 2)


def _late_rank(rank: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2, timeout=timedelta(seconds=1))
    shard = Shard(rank, 2, timeout_s=1)
    if rank == 1:
        time.sleep(5)  # never joins the gather; exits after rank 0 has given up
        return
    start = time.monotonic()
    try:
        shard.gather(np.zeros((1, 3)), what="per-example values")
    except ShardFailure as e:
        Path(out).write_text(f"{time.monotonic() - start:.1f}\n{e}")


def test_a_rank_that_never_arrives_fails_the_collective_after_the_timeout(tmp_path):
    out = tmp_path / "message.txt"
    _start(_late_rank, (f"file://{tmp_path / 'init'}", str(out)), 2)
    elapsed, message = out.read_text().split("\n", 1)
    assert float(elapsed) < 4.5
    assert "rank 0 of 2: combining per-example values failed" in message and "1 s collective timeout" in message


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(p) for p in (task / "children").read_text().split()]
    return kids


def _rank_of(pid: int) -> int | None:
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    ranks = [e.split(b"=", 1)[1] for e in env if e.startswith(b"RANK=")]
    return int(ranks[0]) if ranks else None


def test_killing_a_rank_stops_the_run_and_marks_its_folder_failed(tmp_path):
    """SIGKILL of rank 1 of a two-process torchrun lesion study: torchrun stops rank 0, which marks the run
    folder failed, and everything ends within seconds."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "RESNET_PROBE_SHARD_TIMEOUT": "20"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--monitor-interval", "0.2",
           str(ROOT / "studies" / "lesion.py"), "torchvision:resnet18", "--scale", "tiny", "--data", "synthetic",
           "--out", str(tmp_path), "--device", "cpu", "--threads", "1", "--download", "false",
           "--settings.n_examples", "2000", "--settings.batch_size", "100", "--settings.attribution_methods", "[]"]
    agent = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        status = None
        while time.monotonic() < deadline and status is None:  # rank 0 has made the run folder
            found = list(tmp_path.glob("lesion/*/status.json"))
            status = found[0] if found else None
            time.sleep(0.2)
        assert status is not None, "no run folder appeared"
        time.sleep(2.0)  # the sweeps are running
        victims = [p for p in _children(agent.pid) if _rank_of(p) == 1]
        assert len(victims) == 1
        killed = time.monotonic()
        os.kill(victims[0], signal.SIGKILL)
        output, _ = agent.communicate(timeout=60)
        stopped_after = time.monotonic() - killed
    finally:
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)
    assert agent.returncode != 0
    assert stopped_after < 40, output
    state = pd.read_json(status, typ="series")
    assert state["state"] == "failed", output
    assert "rank 0 of 2" in state["error"] and "torchrun stops every rank" in state["error"]
    assert len(list(tmp_path.glob("lesion/*"))) == 1  # rank 1 wrote no folder of its own


def test_under_torchrun_only_sharded_studies_of_given_models_run(monkeypatch, tmp_path, capsys):
    """With several processes a study that does not shard, or a sharded one asked to train, stops in one line
    before any run folder exists."""
    from resnet_probe.studies.command import main
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main("highway", ["--out", str(tmp_path), "--data", "synthetic"]) == 2
    assert "highway does not split its images over processes" in capsys.readouterr().err
    assert main("lesion", ["--out", str(tmp_path), "--data", "synthetic"]) == 2
    assert "analyses given models and does not train" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
