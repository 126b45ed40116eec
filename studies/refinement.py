#!/usr/bin/env python
"""Refinement study: per block, the cosine between the branch output and the negative loss gradient, and ||F(x)|| / ||x||."""
from resnet_probe.studies.command import main

raise SystemExit(main("refinement"))
