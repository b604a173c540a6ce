"""EMA of latent weights, quantizer scales / offsets and BN buffers (Gupta & Asthana, WACV 2024).

Ultralytics' ModelEMA already lerps every float state_dict entry after each optimizer step, which
includes LSQ step sizes and offsets (they are Parameters of the quantizers inside the model) and
BN running statistics; integer / bool state (``initialized`` flags, ``num_batches_tracked``) is
copied once at construction and never averaged, which is right for it. All it lacks is a
configurable decay / warm-up: its ``decay`` is fixed at 0.9999 with tau 2000.
"""
from __future__ import annotations

import math

from ultralytics.utils.torch_utils import ModelEMA

from .config import QATConfig


class QATModelEMA(ModelEMA):
    """ModelEMA with ``a_t = decay * (1 - exp(-t / tau))``; ``decay=0`` makes the EMA the raw model.

    With decay 0, ``lerp(ema, model, 1)`` returns ``model`` exactly (torch computes
    ``end - (end - start) * (1 - w)`` for w >= 0.5), so the "EMA" checkpoint is bit-identical to the
    raw LSQ model: the a = 0 row of the paper's ablation.
    """

    def __init__(self, model, decay: float = QATConfig.ema_decay, tau: float = QATConfig.ema_tau, updates: int = 0):
        if not 0.0 <= decay < 1.0 or tau <= 0:
            raise ValueError(f"EMA decay={decay!r}, tau={tau!r}: allowed are 0 <= decay < 1 and tau > 0")
        super().__init__(model, decay=decay, tau=tau, updates=updates)
        self.max_decay, self.tau = float(decay), float(tau)
        self.decay = self.decay_at  # ModelEMA.update calls self.decay(updates)

    def decay_at(self, t: int) -> float:
        return self.max_decay * (1.0 - math.exp(-t / self.tau))
