"""Batch-norm running statistics set from data, for networks evaluated in eval mode before any training.

A freshly initialised net has running means 0 and variances 1, so in eval mode its batch norms
do not normalise at all, and it computes another function than the one training starts from (train
mode, batch statistics). ``calibrate_batchnorm`` sets every running statistic to the average of the
batch statistics over a few batches of images, which makes eval mode normalise as training does,
while keeping each output a function of its own input only.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["calibrate_batchnorm"]


def calibrate_batchnorm(model: nn.Module, images: torch.Tensor, batch_size: int, batches: int = 8) -> nn.Module:
    """Set every batch norm's running statistics to the cumulative average over ``batches`` batches of
    ``images`` (train-mode forwards without gradients); return ``model`` in eval mode.

    Parameters are not changed; each batch norm's ``momentum`` is restored afterwards.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None          # cumulative moving average: every batch weighs the same
    model.train()
    try:
        with torch.no_grad():
            for start in range(0, min(len(images), batches * batch_size), batch_size):
                model(images[start:start + batch_size])
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.eval()
    return model
