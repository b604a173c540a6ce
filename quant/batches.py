"""Feeding calibration batches through a model (shared by calibration and BN re-estimation)."""
from __future__ import annotations

from typing import Callable, Iterable

from torch import nn


def run_batches(model: nn.Module, batches: Iterable, num_batches: int, forward: Callable | None = None) -> int:
    """Run up to ``num_batches`` batches through ``forward(model, batch)`` (default ``model(batch)``);
    return how many ran."""
    fwd = forward or (lambda mdl, b: mdl(b))
    used = 0
    for batch in batches:
        if used >= num_batches:
            break
        fwd(model, batch)
        used += 1
    return used
