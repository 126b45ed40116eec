#!/usr/bin/env python
"""Train plain / highway / residual CIFAR nets over depths and seeds (checkpoints + curves)."""
from resnet_probe.studies.train_zoo import main

raise SystemExit(0 if main() else 1)
