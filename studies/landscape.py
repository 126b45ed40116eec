#!/usr/bin/env python
"""Loss-landscape study: loss surfaces of plain vs residual nets along filter-normalised directions (Li et al. 2018)."""
from resnet_probe.studies.command import main

raise SystemExit(main("landscape"))
