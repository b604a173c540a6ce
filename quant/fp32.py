"""Keep a module's own float tensors in fp32 whatever dtype the model around it is cast to."""
from __future__ import annotations

import torch


class KeepFP32:
    """Mixin for nn.Module: ``.half()``/``.to(dtype)`` still move these tensors between devices but
    leave them fp32, restored from the original values so no precision is lost on the way.
    Why: Ultralytics halves whole models on save; half step sizes or latent weights would move
    integer codes, and the fake-quant math is meant to run in fp32 anyway."""

    def _apply(self, fn, recurse=True):
        def own(store):
            return {k: t.data for k, t in store.items() if t is not None and t.dtype == torch.float32}

        params, buffers = own(self._parameters), own(self._buffers)
        super()._apply(fn, recurse)
        for store, saved in ((self._parameters, params), (self._buffers, buffers)):
            for k, old in saved.items():
                t = store[k]
                if t is not None and t.dtype != torch.float32:
                    t.data = old.to(device=t.device)
        return self
