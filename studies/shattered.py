#!/usr/bin/env python
"""Shattered-gradients study: input-gradient correlation against input distance (Balduzzi et al. 2017)."""
from resnet_probe.studies.command import main

raise SystemExit(main("shattered"))
