#!/usr/bin/env python
"""Per-block gradient norms during training: plain vs highway vs residual."""
from resnet_probe.studies.gradients import main

raise SystemExit(0 if main() else 1)
