"""``benchmarks.gpu_check``: its CPU dry run produces every row of both stages, and a stage keeps what it
measured (a row that raises, one that does not fit in the time left, one cut by the time limit)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks.gpu_check import Check, judge, line

ROOT = Path(__file__).resolve().parents[1]


def test_the_dry_run_writes_every_row_of_both_stages_on_the_cpu(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--device", "cpu", "--out",
                           str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    names = {}
    for stage in ("train", "eval"):
        payload = json.loads((tmp_path / f"gpu_check-{stage}.json").read_text())
        assert payload["dry_run"] is True and payload["stage"] == stage
        assert (tmp_path / f"gpu_check-{stage}.md").read_text().startswith(f"## gpu_check, stage {stage} (dry run)")
        bad = [(r["name"], r.get("error") or r.get("reason")) for r in payload["rows"]
               if r["status"] not in ("info", "dry-run")]
        assert not bad, bad
        names[stage] = [r["name"] for r in payload["rows"]]
        assert payload["environment"]["inductor_cache"]["dir"]
    assert names["train"][:2] == ["environment", "GPU tests (pytest -m gpu)"]
    for expected in ("ResNet-56 typical eager loop step", "ResNet-56 Lightning step (compiled, CUDA graphs)",
                     "ResNet-56 probes on / off", "2 x ResNet-56 side by side, per model-step",
                     "ResNet-110 Lightning step (compiled, CUDA graphs)",
                     "Highway-56 Lightning step (compiled, CUDA graphs)"):
        assert expected in names["train"]
    eval_rows = " / ".join(names["eval"])
    for expected in ("evaluation of 10k images, best path", "single-block deletion sweep", "k-deletion sweep",
                     "probe overhead: eval, streaming response probe (all sites)", "probe memory",
                     "science: residual-8", "science: plain-8"):
        assert expected in eval_rows
    assert "DRY-RUN  ResNet-56 Lightning step (compiled, CUDA graphs): " in proc.stdout  # one line per target
    assert "(target <= 6.5 ms)" in proc.stdout
    print(f"dry run: {time.monotonic() - start:.0f} s")


def _check(tmp_path, limit_s=60.0) -> Check:
    return Check(tmp_path, "train", limit_s, torch.device("cpu"), dry_run=False)


def test_a_stage_records_each_row_at_once_and_keeps_going_after_an_error(tmp_path, capsys):
    check = _check(tmp_path)
    check.run("fast", lambda c: [{"name": "fast", "measured": 5.0, "unit": "ms", "target": ["<=", 6.5]}])
    on_disk = json.loads(check.json_path.read_text())["rows"]
    assert [(r["name"], r["status"]) for r in on_disk] == [("fast", "pass")]

    def recompiles(c):
        raise RuntimeError("torch.compile reached its limit of 64 compiled variants of one function")
    check.run("compiled row", recompiles)
    check.run("slow", lambda c: [{"name": "slow", "measured": 7.0, "unit": "ms", "target": ["<=", 6.5]}])
    check.run("too long", lambda c: pytest.fail("a row that does not fit must not run"), needs_s=3600)
    check.cut()
    rows = json.loads(check.json_path.read_text())["rows"]
    assert [(r["name"], r["status"]) for r in rows] == [
        ("fast", "pass"), ("compiled row", "error"), ("slow", "fail"), ("too long", "skipped"),
        ("(between rows)", "cut")]
    assert "limit of 64 compiled variants" in rows[1]["error"] and "needs about 3600 s" in rows[3]["reason"]
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "PASS     fast: 5 ms (target <= 6.5 ms)" and out[2] == "FAIL     slow: 7 ms (target <= 6.5 ms)"
    md = check.json_path.with_suffix(".md").read_text()
    assert "| fail | slow | 7 ms | <= 6.5 |" in md


def test_a_target_without_a_measurement_fails_and_a_dry_run_judges_none():
    row = {"name": "x", "measured": None, "unit": "ms", "target": ["<=", 1.0]}
    assert judge(row, dry_run=False) == "fail" and judge(row, dry_run=True) == "dry-run"
    assert judge({"name": "env", "measured": None, "target": None}, dry_run=False) == "info"
    assert line({**row, "status": "fail"}) == "FAIL     x (target <= 1 ms)"
