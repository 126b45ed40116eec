"""Where benchmark results are written: a run at a size other than the device's default keeps its own file."""
from __future__ import annotations

import json

from benchmarks.harness import record


def test_a_non_default_size_is_recorded_beside_the_default_run(tmp_path):
    rows = [{"case": "eval, no probe", "median_ms": 1.5}]
    small = record("probes", rows, config={"size": "small"}, device="cpu", results_dir=tmp_path)
    paper = record("probes", rows, config={"size": "paper"}, device="cpu", results_dir=tmp_path)
    date = json.loads(small.read_text())["environment"]["date"][:10]
    assert small.name == f"probes-cpu-{date}.json"
    assert paper.name == f"probes-cpu-paper-{date}.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"probes-cpu-{date}.json", f"probes-cpu-{date}.md", f"probes-cpu-paper-{date}.json",
         f"probes-cpu-paper-{date}.md"])
    assert json.loads(paper.read_text())["rows"] == rows
