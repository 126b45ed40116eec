"""``python -m resnet_probe.report RUN_DIR``: re-draw a run's figures and rewrite its reports."""
import sys

from .rebuild import rebuild_main

sys.exit(rebuild_main())
