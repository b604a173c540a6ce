"""Weight oscillations in QAT (Nagel et al., ICML 2022): tracking, dampening, iterative freezing.

Pure PyTorch. ``OscillationTracker`` is an nn.Module that lives *beside* the model (not inside it),
so the trainer's EMA, which averages every float entry of the model's state_dict, never averages
oscillation frequencies or frozen masks; the tracker's own state_dict goes into the checkpoint.
Schedules are small objects called once per optimizer step with the training progress in [0, 1].
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .qconv import QuantConv2d


class DelayedCosine:
    """``None`` (off) before ``start`` (a fraction of training), then a cosine from ``begin`` to ``end``.

    Nagel et al. leave both dampening and freezing off for the first quarter of QAT so that weights
    can still move freely while the grid settles, then anneal their strength.
    """

    def __init__(self, begin: float, end: float, start: float = 0.25):
        if not 0.0 <= start < 1.0:
            raise ValueError(f"schedule start={start!r}: allowed values are fractions in [0, 1)")
        self.begin, self.end, self.start = float(begin), float(end), float(start)

    def __call__(self, progress: float) -> float | None:
        if progress < self.start:
            return None
        t = min((progress - self.start) / (1.0 - self.start), 1.0)
        return self.end + (self.begin - self.end) * 0.5 * (1.0 + math.cos(math.pi * t))

    def __repr__(self) -> str:
        return f"DelayedCosine({self.begin} -> {self.end} after {self.start:.0%})"


def dampening_loss(convs: dict[str, QuantConv2d] | list[QuantConv2d]) -> torch.Tensor:
    """sum over layers of ||q(w).detach() - clamp(w, -Qn*s, Qp*s)||^2.

    The quantized weight is a constant target, so the gradient pulls each latent weight towards the
    centre of its current bin (away from the rounding threshold where it oscillates); the clamp keeps
    clipped weights from being pulled to the grid edge, and passes a gradient to the scale there.
    """
    layers = list(convs.values()) if isinstance(convs, dict) else list(convs)
    if not layers:
        raise ValueError("dampening_loss: no quantized convs given")
    total = layers[0].weight.new_zeros(())
    for m in layers:
        q = m.weight_quantizer
        w = m.weight.float()
        s = q.scale_for(w, grad=True)
        target = (w.detach() / s.detach()).round().clamp(q.qmin, q.qmax) * s.detach()
        clipped = torch.minimum(torch.maximum(w, q.qmin * s), q.qmax * s)
        total = total + (target - clipped).pow(2).sum()
    return total


class OscillationTracker(nn.Module):
    """Per-weight oscillation frequency and iterative freezing for a set of QuantConv2d layers.

    After every optimizer step call ``update(convs)``: the integer weight ``w_int`` is compared with
    the previous one; a change whose sign is opposite to the last non-zero change is an oscillation,
    and ``f <- m * osc + (1 - m) * f``. An EMA of ``w_int`` (same momentum) gives the value a weight
    is frozen at. ``freeze(convs, threshold)`` freezes every weight with ``f > threshold`` at
    ``round(EMA of w_int)``, and ``apply_frozen(convs)`` writes frozen codes back into the latent
    weights (``w = code * s`` with the current step size), so their integer value never changes
    however the optimizer moves them or the scale.
    All state is in buffers: the trainer re-enables ``requires_grad`` on every float Parameter.

    No step-time method reads a device value on the host: ``update`` and ``apply_frozen``
    are pure tensor code, ``freeze(..., count=False)`` returns the count as a tensor, and whether
    anything can be frozen at all is a Python flag (set by ``freeze`` and by ``load_state_dict``), so
    a run that never freezes skips ``apply_frozen`` without looking at the masks.
    """

    def __init__(self, convs: dict[str, QuantConv2d], momentum: float = 0.01):
        super().__init__()
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"oscillation momentum={momentum!r}: allowed values are in (0, 1]")
        self.momentum = momentum
        self.names = list(convs)
        for i, (name, m) in enumerate(convs.items()):
            w_int = m.integer_weight()
            # Codes of <= 8-bit weights fit int8: a quarter of the float memory in every checkpoint.
            self.register_buffer(f"prev_int_{i}", w_int.to(torch.int8))
            self.register_buffer(f"last_dir_{i}", torch.zeros_like(w_int, dtype=torch.int8))
            self.register_buffer(f"freq_{i}", torch.zeros_like(w_int))
            self.register_buffer(f"int_ema_{i}", w_int.clone())
            self.register_buffer(f"frozen_{i}", torch.zeros_like(w_int, dtype=torch.bool))
            self.register_buffer(f"frozen_int_{i}", torch.zeros_like(w_int, dtype=torch.int8))
        self._may_have_frozen = False  # Python mirror: True once freeze() ran with a threshold or a state loaded one

    def _buf(self, field: str, i: int) -> torch.Tensor:
        return getattr(self, f"{field}_{i}")

    def _layers(self, convs: dict[str, QuantConv2d]):
        missing = [n for n in self.names if n not in convs]
        if missing:
            raise ValueError(f"OscillationTracker: layers {missing[:3]} are not in the model it tracks")
        return [(i, convs[n]) for i, n in enumerate(self.names)]

    @torch.no_grad()
    def update(self, convs: dict[str, QuantConv2d]) -> None:
        m = self.momentum
        for i, conv in self._layers(convs):
            w_int = conv.integer_weight()
            delta = torch.sign(w_int - self._buf("prev_int", i).float()).to(torch.int8)
            last = self._buf("last_dir", i)
            osc = ((delta != 0) & (last != 0) & (delta != last)).float()
            self._buf("freq", i).mul_(1 - m).add_(osc, alpha=m)
            last.copy_(torch.where(delta != 0, delta, last))
            self._buf("prev_int", i).copy_(w_int)
            self._buf("int_ema", i).mul_(1 - m).add_(w_int, alpha=m)

    @torch.no_grad()
    def freeze(self, convs: dict[str, QuantConv2d], threshold: float | None, count: bool = True,
               max_bits: int = 8):
        """Freeze the not-yet-frozen weights whose frequency exceeds ``threshold``, in layers of at most ``max_bits``
        weight bits; return how many (an int, which reads the count on the host; ``count=False``: a 0-d tensor on
        the model's device, no sync)."""
        if threshold is None:
            return 0
        self._may_have_frozen = True
        n = []
        for i, conv in self._layers(convs):
            if conv.w_bits > max_bits:
                continue
            frozen = self._buf("frozen", i)
            new = (self._buf("freq", i) > threshold) & ~frozen
            q = conv.weight_quantizer
            code = self._buf("int_ema", i).round().clamp(q.qmin, q.qmax).to(torch.int8)
            self._buf("frozen_int", i).copy_(torch.where(new, code, self._buf("frozen_int", i)))
            frozen |= new
            n.append(new.sum())
        total = torch.stack(n).sum() if n else torch.zeros((), dtype=torch.long)
        return int(total) if count else total

    @torch.no_grad()
    def apply_frozen(self, convs: dict[str, QuantConv2d]) -> None:
        if not self._may_have_frozen:
            return
        for i, conv in self._layers(convs):
            frozen = self._buf("frozen", i)
            s = conv.weight_quantizer.scale_for(conv.weight)
            conv.weight.data.copy_(torch.where(frozen, self._buf("frozen_int", i).float() * s, conv.weight.data))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # once per load (a resume), not per step
        self._may_have_frozen = any(bool(self._buf("frozen", i).any()) for i in range(len(self.names)))

    # -- reporting --------------------------------------------------------------------------------
    @torch.no_grad()
    def layer_stats(self, threshold: float) -> dict[str, dict[str, float]]:
        """{layer: {"osc_share": share of weights with f > threshold, "frozen_share", "mean_freq", "n"}}."""
        out = {}
        for i, name in enumerate(self.names):
            f = self._buf("freq", i)
            out[name] = {"osc_share": float((f > threshold).float().mean()),
                         "frozen_share": float(self._buf("frozen", i).float().mean()),
                         "mean_freq": float(f.mean()), "n": f.numel()}
        return out

    @torch.no_grad()
    def overall_stats(self, threshold: float) -> dict[str, float]:
        """Shares over all tracked weights (weighted by layer size)."""
        stats = self.layer_stats(threshold)
        total = sum(s["n"] for s in stats.values()) or 1
        return {k: sum(s[k] * s["n"] for s in stats.values()) / total
                for k in ("osc_share", "frozen_share", "mean_freq")}


class Dampening:
    """The dampening regulariser with its schedule: ``lambda(progress) * dampening_loss(convs)``.

    Returns a plain zero (no graph, nothing to backpropagate) while the schedule is off, so the
    warm-up costs nothing; lambda is cosine-annealed from 0 up to ``final_lambda``.
    """

    def __init__(self, final_lambda: float, start: float = 0.25):
        if final_lambda < 0:
            raise ValueError(f"dampening lambda={final_lambda!r}: allowed values are >= 0")
        self.schedule = DelayedCosine(0.0, final_lambda, start)

    def weight(self, progress: float) -> float:
        lam = self.schedule(progress)
        return 0.0 if lam is None else lam

    def __call__(self, convs, progress: float) -> torch.Tensor:
        lam = self.weight(progress)
        if lam == 0.0:
            return torch.zeros(())
        return lam * dampening_loss(convs)
