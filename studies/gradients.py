#!/usr/bin/env python
"""Per-block gradient norms during training: plain vs highway vs residual."""
from resnet_probe.studies.command import main

raise SystemExit(main("gradients"))
