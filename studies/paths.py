#!/usr/bin/env python
"""Paths study: path-length distribution and gradient per path length (Veit et al. 2016, Fig. 6)."""
from resnet_probe.studies.paths import main

raise SystemExit(0 if main() else 1)
