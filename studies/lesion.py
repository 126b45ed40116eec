#!/usr/bin/env python
"""Lesion study: delete and reorder the blocks of trained ResNets (Veit et al. 2016)."""
from resnet_probe.studies.lesion import main

raise SystemExit(0 if main() else 1)
