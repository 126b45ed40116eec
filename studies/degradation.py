#!/usr/bin/env python
"""He et al. Fig. 1/6: training and test error of plain vs residual nets at increasing depth."""
from resnet_probe.studies.command import main

raise SystemExit(main("degradation"))
