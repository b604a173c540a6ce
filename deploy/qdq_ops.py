"""torch.autograd.Functions whose ``symbolic`` emits ONNX QuantizeLinear / DequantizeLinear.

Why custom symbolics instead of torch.fake_quantize_*: those export only 8-bit ranges and would
store weights as float initializers quantized at run time. Here weights are integer
initializers, activations get an explicit Clip for sub-8-bit grids, and the torch forward
computes what the emitted ONNX ops compute (same op order), so the traced model and the ONNX
graph agree up to float accumulation order.
Every argument is a tensor (module buffers -> ONNX initializers) or None (op omitted): python
scalars become constants inside the traced Function body, which the TorchScript exporter's
peephole pass (torch 2.14) cannot handle.
"""
from __future__ import annotations

import torch

from yolo_qat.quant import broadcast_scale


class QDQActivation(torch.autograd.Function):
    """y = DQ(Q(clip(x - offset, lo, hi), s, zp), s, zp) + offset.

    ``zp``'s dtype is the container: uint8 (unsigned grids) or int8 (signed). ``offset`` (real
    units) is an LSQ+ offset kept outside the integer grid because it is not an integer number of
    steps (None: no offset). ``lo``/``hi`` clip a sub-8-bit grid inside its 8-bit container
    (None for 8 bits: the container saturates at the grid's ends).
    """

    @staticmethod
    def forward(ctx, x, scale, zp, offset, lo, hi):
        t = x - offset if offset is not None else x
        if lo is not None:
            t = torch.maximum(torch.minimum(t, hi), lo)
        cmin, cmax = (-128, 127) if zp.dtype == torch.int8 else (0, 255)
        z = zp.float()
        y = ((torch.round(t / scale) + z).clamp(cmin, cmax) - z) * scale
        return y + offset if offset is not None else y

    @staticmethod
    def symbolic(g, x, scale, zp, offset, lo, hi):
        t = g.op("Sub", x, offset) if offset is not None else x
        if lo is not None:
            t = g.op("Clip", t, lo, hi)
        y = g.op("DequantizeLinear", g.op("QuantizeLinear", t, scale, zp), scale, zp)
        return g.op("Add", y, offset) if offset is not None else y


class DequantizeWeight(torch.autograd.Function):
    """Integer weight initializer (int8 container) times its scale: per tensor (0-d scale) or per
    output channel (1-d scale, ONNX axis 0). No zero point: weights are symmetric."""

    @staticmethod
    def forward(ctx, w_int, scale):
        return w_int.float() * broadcast_scale(scale, w_int, 0 if scale.dim() == 1 else None)

    @staticmethod
    def symbolic(g, w_int, scale):
        per_channel = scale.type().dim() == 1
        return g.op("DequantizeLinear", w_int, scale, axis_i=0) if per_channel else g.op("DequantizeLinear", w_int, scale)
