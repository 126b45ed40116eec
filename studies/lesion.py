#!/usr/bin/env python
"""Lesion study: delete and reorder the blocks of trained ResNets (Veit et al. 2016)."""
from resnet_probe.studies.command import main

raise SystemExit(main("lesion"))
