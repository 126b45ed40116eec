"""The benchmark harness: where results are written (a run at a size other than the device's default
keeps its own file) and what its CPU peak-memory figure counts."""
from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.harness import record

ROOT = Path(__file__).resolve().parents[1]


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


# A process whose glibc heap keeps 128 MB it has freed; the figure must still count the 95 MB more
# that a function allocating 96 blocks of 1 MB needs than one allocating one block (the first block
# also brings the child's first use of that code, a few MB that depend on the installation), and
# count nothing for a function that allocates nothing.
_FREED_HEAP = """
import ctypes, torch
from benchmarks.harness import M_MMAP_THRESHOLD, peak_memory
libc = ctypes.CDLL(None)
libc.mallopt(M_MMAP_THRESHOLD, 4 << 20)  # blocks of 1 MB come from the heap
libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: the heap keeps what is freed
held = [torch.ones(2**18) for _ in range(128)]
del held
print(*(peak_memory(lambda k=k: [torch.ones(2**18) for _ in range(k)], "cpu") for k in (96, 1)),
      peak_memory(lambda: None, "cpu"))
"""


@pytest.mark.skipif(not (Path("/proc/self/clear_refs").exists() and platform.libc_ver()[0] == "glibc"),
                    reason="needs Linux /proc/self/clear_refs and glibc")
def test_cpu_peak_memory_counts_what_fn_allocates_where_the_process_keeps_freed_memory():
    out = subprocess.run([sys.executable, "-c", _FREED_HEAP], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    many, one, nothing = (int(v) / 2**20 for v in out)
    assert 94 <= many - one <= 100
    assert nothing <= 1
