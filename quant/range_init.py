"""Range estimation for LSQ quantizers (kept apart from the quantizer, as torch.ao separates
observers from fake-quantizers): the LSQ formula, an MSE search, and activation statistics."""
from __future__ import annotations

import math

import torch

from .lsq import MIN_SCALE, LSQQuantizer

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


@torch.no_grad()
def init_weight_quantizer(q: LSQQuantizer, w: torch.Tensor, method: str = "mse") -> None:
    axis = q.axis if q.per_channel else None
    if method == "lsq":
        s = lsq_formula_scale(w, q.qmax, axis)
    elif method == "mse":
        s = mse_scale(w, q.qmin, q.qmax, axis)
    else:
        raise ValueError(f"weight_init={method!r}: allowed values are 'mse', 'lsq'")
    q.set_scale(s)


def _sample(x: torch.Tensor, limit: int = 1 << 20) -> torch.Tensor:
    flat = x.detach().float().flatten()
    if flat.numel() > limit:
        idx = torch.randint(0, flat.numel(), (limit,), device=flat.device)
        flat = flat[idx]
    return flat


@torch.no_grad()
def init_activation_quantizer(q: LSQQuantizer, samples: torch.Tensor) -> None:
    """From a flat sample of calibration activations: the offset (LSQ+) at the minimum, then an
    MSE search of the step size over clipping ranges."""
    samples = samples.float()
    offset = None
    if q.offset is not None:
        offset = samples.min().clamp_max(0).reshape(1)
    s = mse_scale(samples, q.qmin, q.qmax, None, offset)
    q.set_scale(s, offset=offset)


def init_quantizer_from_tensor(q: LSQQuantizer, x: torch.Tensor) -> None:
    """Fallback when a quantizer runs uninitialised: weights get the MSE formula, activations the
    statistics of this one batch. `quant.calibrate` is the intended path for activations."""
    if q.is_activation:
        init_activation_quantizer(q, _sample(x))
    else:
        init_weight_quantizer(q, x)
