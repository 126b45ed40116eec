#!/usr/bin/env python
"""Train plain / highway / residual CIFAR nets over depths and seeds (checkpoints + curves)."""
from resnet_probe.studies.command import main

raise SystemExit(main("train_zoo"))
