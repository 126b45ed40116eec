#!/usr/bin/env python
"""Highway study: transform-gate statistics per layer and the gate-closing lesion curve."""
from resnet_probe.studies.command import main

raise SystemExit(main("highway"))
