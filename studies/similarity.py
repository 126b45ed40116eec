#!/usr/bin/env python
"""Similarity study: linear CKA between the blocks of each net and between the same blocks of two nets."""
from resnet_probe.studies.command import main

raise SystemExit(main("similarity"))
