#!/usr/bin/env python
"""make demo: train small plain / highway / residual nets, run every study, one combined report."""
from resnet_probe.studies.quickstart import main

raise SystemExit(0 if main() else 1)
