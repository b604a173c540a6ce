"""BN re-estimation (Nagel et al. 2022): after QAT, recompute every BatchNorm's running statistics
with the quantized forward. During QAT the running averages mix statistics of many different
integer weights (oscillating ones flip every few steps); the final integer weights deserve
statistics of their own."""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .batches import run_batches


@torch.no_grad()
def reestimate_bn(model: nn.Module, batches: Iterable, num_batches: int = 50,
                  forward: Callable | None = None) -> int:
    """Reset and recompute the running mean / var of every BN over ``num_batches`` batches.

    ``momentum=None`` makes PyTorch keep a cumulative (equal-weight) average, so the result does
    not depend on batch order. Only the BN layers run in train mode (the rest of the model in
    eval, so e.g. detection heads take their inference path); modes and momenta are restored.
    ``forward(model, batch)`` runs one batch (default ``model(batch)``). Returns batches used.
    """
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not bns:
        raise ValueError("reestimate_bn: the model has no BatchNorm with running statistics")
    saved = [(m, m.momentum, m.training) for m in bns]
    model_mode = model.training
    backup = {id(m): (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in bns}
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    used = 0
    try:
        used = run_batches(model, batches, num_batches, forward)
    finally:
        model.train(model_mode)  # first the whole model, then each BN back to its own mode
        for m, momentum, training in saved:
            m.momentum = momentum
            m.train(training)
    if used == 0:
        # Never leave the model with reset (0, 1) statistics: that silently ruins it.
        for m in bns:
            mean, var, n = backup[id(m)]
            m.running_mean.copy_(mean), m.running_var.copy_(var), m.num_batches_tracked.copy_(n)
        raise ValueError("reestimate_bn: no batches were given")
    return used
