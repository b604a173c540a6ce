"""Range estimation for LSQ quantizers (kept apart from the quantizer, as torch.ao separates
observers from fake-quantizers): the LSQ formula, an MSE search, and activation statistics.

Plain functions of tensors and grid bounds that return step sizes; the quantizer applies them
(``LSQQuantizer.init_from_weight`` / ``init_from_samples``), so this module never imports it."""
from __future__ import annotations

import math

import torch

from .grid import MIN_SCALE

MSE_GRID = torch.linspace(0.2, 1.0, 41)  # candidate clipping ranges, as fractions of the max


def lsq_formula_scale(w: torch.Tensor, qmax: int, axis: int | None = None) -> torch.Tensor:
    """Esser et al.: s = 2 * mean|w| / sqrt(Qp)."""
    a = w.detach().abs().float()
    mean = a.mean() if axis is None else a.transpose(0, axis).flatten(1).mean(1)
    return (2 * mean / math.sqrt(qmax)).clamp_min(MIN_SCALE).reshape(-1)


@torch.no_grad()
def mse_scale(x: torch.Tensor, qmin: int, qmax: int, axis: int | None = None,
              offset: torch.Tensor | None = None) -> torch.Tensor:
    """Step size minimising ||q(x) - x||^2 over a grid of clipping ranges (per slice if axis)."""
    x = x.detach().float()
    rows = x.reshape(1, -1) if axis is None else x.transpose(0, axis).flatten(1)
    if offset is not None:
        rows = rows - offset.reshape(-1, 1)
    # The range the grid spans on the side that can hold the most levels.
    hi = rows.amax(1).clamp_min(0) / max(qmax, 1)
    lo = (-rows.amin(1)).clamp_min(0) / max(-qmin, 1) if qmin < 0 else torch.zeros_like(hi)
    full = torch.maximum(hi, lo).clamp_min(MIN_SCALE)
    best_err = torch.full_like(full, float("inf"))
    best = full.clone()
    for frac in MSE_GRID.tolist():
        s = (full * frac).unsqueeze(1)
        err = ((rows / s).round().clamp(qmin, qmax) * s - rows).pow(2).mean(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, s.squeeze(1), best)
    return best


def weight_scale(w: torch.Tensor, qmin: int, qmax: int, axis: int | None = None, method: str = "mse") -> torch.Tensor:
    """Step size(s) of a weight by ``method``: ``mse`` (``mse_scale``) or ``lsq`` (``lsq_formula_scale``)."""
    if method == "lsq":
        return lsq_formula_scale(w, qmax, axis)
    if method == "mse":
        return mse_scale(w, qmin, qmax, axis)
    raise ValueError(f"weight_init={method!r}: allowed values are 'mse', 'lsq'")


def flat_sample(x: torch.Tensor, limit: int = 1 << 20) -> torch.Tensor:
    """``x`` flattened to fp32, or a random sample of ``limit`` of its values when it is larger."""
    flat = x.detach().float().flatten()
    if flat.numel() > limit:
        idx = torch.randint(0, flat.numel(), (limit,), device=flat.device)
        flat = flat[idx]
    return flat


@torch.no_grad()
def activation_range(samples: torch.Tensor, qmin: int, qmax: int,
                     with_offset: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(step, offset) from a flat sample of calibration activations: the offset (LSQ+, when
    ``with_offset``; else None) at the minimum, then an MSE search of the step size over clipping
    ranges."""
    samples = samples.float()
    offset = samples.min().clamp_max(0).reshape(1) if with_offset else None
    return mse_scale(samples, qmin, qmax, None, offset), offset
