"""Where the toolkit keeps what it can rebuild (decoded data packs, the compiled probe kernel).

``$RESNET_PROBE_CACHE`` when set, else ``~/.cache/resnet_probe``; each user of it takes its own
sub-folder or file names.
"""
from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$RESNET_PROBE_CACHE``, or ``~/.cache/resnet_probe``."""
    return Path(os.environ.get("RESNET_PROBE_CACHE") or Path.home() / ".cache" / "resnet_probe")
