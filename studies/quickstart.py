#!/usr/bin/env python
"""make demo: train small plain / highway / residual nets, run every study, one combined report."""
from resnet_probe.studies.command import main

raise SystemExit(main("quickstart"))
