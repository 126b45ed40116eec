"""How much each block matters by attribution (captum), to set beside what deleting it does.

For every block the attribution is taken at the block's output ``y_i`` (the layer is the block
module) for the logit of the target class:

- ``gradient_x_activation``: ``y_i * d logit / d y_i`` (captum ``LayerGradientXActivation``);
- ``integrated_gradients``: ``(y_i - y_i') * integral of d logit / d y_i`` along the straight line
  from the baseline's block output ``y_i'`` to ``y_i`` (``LayerIntegratedGradients``);
- ``conductance``: the flow of integrated gradients from the input through ``y_i``
  (``LayerConductance``, Dhamdhere et al. 2018).

Every block output is a cut of the network (all of the input's influence on the logit passes
through it), so the last two are *complete*: per example they sum over the block output to
``logit(x) - logit(baseline)`` up to the integral's discretisation error.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from captum.attr import LayerConductance, LayerGradientXActivation, LayerIntegratedGradients
from torch import nn

from .lesion.context import evaluation
from .lesion.inputs import as_tensors, example_chunks
from .models import anatomy

ATTRIBUTION_METHODS = ("gradient_x_activation", "integrated_gradients", "conductance")
TARGETS = ("label", "prediction")


def block_attributions(model: nn.Module, x, y: torch.Tensor | None = None,
                       method: str = "gradient_x_activation", target: str = "label",
                       n_steps: int = 32, batch_size: int = 64, blocks=None) -> pd.DataFrame:
    """Per-block attribution of the target logit to the block's output.

    Args:
        model: a model that ``resnet_probe.models.anatomy`` supports; evaluated in eval mode (its
            previous mode is restored).
        x: images ``(N, C, H, W)`` (with labels ``y``), or a dataset / loader of ``(x, y)``.
        y: labels when ``x`` is a tensor.
        method: one of ``ATTRIBUTION_METHODS``.
        target: attribute the logit of the true ``label`` or of the model's ``prediction``.
        n_steps: integration steps for ``integrated_gradients`` / ``conductance`` (baseline: a
            black image, all zeros).
        batch_size: examples per captum call.
        blocks: block names / paths / indices to attribute (default: all).

    Returns:
        One row per block: ``block``, ``path``, ``stage``, ``downsampling``, ``method``,
        ``attribution`` (mean over examples of the sum of ``|attr|`` over the block output),
        ``attribution_signed`` (mean of the plain sum), ``share`` (``attribution`` over its sum
        across the rows).
    """
    if method not in ATTRIBUTION_METHODS:
        raise ValueError(f"unknown attribution method {method!r}; valid methods: {', '.join(ATTRIBUTION_METHODS)}")
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; valid targets: {', '.join(TARGETS)}")
    anat = anatomy(model)
    chosen = [anat.blocks[i] for i in (range(len(anat.blocks)) if blocks is None else anat.resolve(blocks))]
    x, y = as_tensors(x, y)
    device = next(model.parameters()).device
    absolute = np.zeros(len(chosen))
    signed = np.zeros(len(chosen))
    with evaluation(model):
        for sl in example_chunks(len(x), batch_size):
            xb = x[sl].to(device)
            if target == "label":
                tb = y[sl].to(device)
            else:
                with torch.no_grad():
                    tb = model(xb).argmax(-1)
            for j, block in enumerate(chosen):
                attr = _attribute(model, block.module, method, xb, tb, n_steps).detach()
                absolute[j] += attr.abs().flatten(1).sum(1).double().sum().item()
                signed[j] += attr.flatten(1).sum(1).double().sum().item()
    df = pd.DataFrame({
        "block": [b.name for b in chosen], "path": [b.path for b in chosen],
        "stage": [b.stage for b in chosen], "downsampling": [b.downsampling for b in chosen],
        "method": method, "attribution": absolute / len(x), "attribution_signed": signed / len(x),
    })
    df["share"] = df["attribution"] / df["attribution"].sum()
    df.attrs.update(n_examples=len(x), target=target, n_steps=n_steps)
    return df


def _attribute(model, layer, method, x, target, n_steps) -> torch.Tensor:
    if method == "gradient_x_activation":
        return LayerGradientXActivation(model, layer).attribute(x, target=target)
    baselines = torch.zeros_like(x)
    if method == "integrated_gradients":
        return LayerIntegratedGradients(model, layer).attribute(x, baselines=baselines, target=target,
                                                                n_steps=n_steps)
    return LayerConductance(model, layer).attribute(x, baselines=baselines, target=target, n_steps=n_steps)
