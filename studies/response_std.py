#!/usr/bin/env python
"""He et al. Fig. 7: per-layer response std of trained nets, in network order and sorted."""
from resnet_probe.studies.command import main

raise SystemExit(main("response_std"))
