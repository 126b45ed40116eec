"""Run every benchmark in turn with the same arguments: ``python -m benchmarks.run_all [--size paper]``."""
from __future__ import annotations

import importlib
import sys

BENCHMARKS = ("bench_train", "bench_probes", "bench_lesion", "bench_landscape")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    for name in BENCHMARKS:
        print(f"== {name}", flush=True)
        importlib.import_module(f"benchmarks.{name}").main(argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
