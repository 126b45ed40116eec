#!/usr/bin/env python
"""He et al. Fig. 7: per-layer response std of trained nets, in network order and sorted."""
from resnet_probe.studies.response_std import main

raise SystemExit(0 if main() else 1)
