#!/usr/bin/env python
"""Paths study: path-length distribution and gradient per path length (Veit et al. 2016, Fig. 6)."""
from resnet_probe.studies.command import main

raise SystemExit(main("paths"))
