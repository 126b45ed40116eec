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

_MODULES: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()
_original_init = nn.Module.__init__


def _tracking_init(self, *args, **kwargs):
    _original_init(self, *args, **kwargs)
    _MODULES.add(self)


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
    before = set(id(m) for m in _MODULES if any(getattr(m, a, None) for a in _HOOK_DICTS))
    yield
    gc.collect()
    leaked = [m for m in _MODULES
              if id(m) not in before and any(getattr(m, a, None) for a in _HOOK_DICTS)]
    names = hooks_left(leaked)
    assert not names, f"hooks left registered after the test: {sorted(set(names))}"
