#!/usr/bin/env python
"""Highway study: transform-gate statistics per layer and the gate-closing lesion curve."""
from resnet_probe.studies.highway import main

raise SystemExit(0 if main() else 1)
