"""QDQConv2d: the export-time form of a (fused) QuantConv2d.

Activation Q/DQ -> Conv with DequantizeLinear(integer weight) -> Mul(out_scale) -> Add(bias).
BN and folded QC corrections live in ``out_scale`` / ``bias``; the integer weights are
``QuantConv2d.integer_weight()``, the codes the fake-quant forward uses.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from yolo_qat.quant import QuantConv2d, replace_module

from .qdq_ops import DequantizeWeight, QDQActivation

OFFSET_MODES = ("exact", "zero_point")


@dataclass
class ActivationGrid:
    """How one activation quantizer maps onto ONNX Q/DQ (all real-valued fields in fp32 units)."""

    scale: float
    zero_point: int
    offset: float  # kept as explicit Sub/Add (0: none)
    lo: float | None
    hi: float | None
    signed: bool
    zp_shift: float = 0.0  # |rounded grid origin - trained offset| in steps (zero_point mode only)


def activation_grid(q, offset_mode: str = "exact") -> ActivationGrid:
    """LSQ(+) quantizer -> Q/DQ parameters.

    An LSQ+ offset b is an integer zero point only if b / s is an integer. ``exact`` keeps b as a
    Sub/Add around a zero-point-0 Q/DQ pair (the fake-quant math, unchanged). ``zero_point``
    rounds zp = round(-b / s) (the usual asymmetric uint8 layout, what integer kernels expect);
    that shifts the grid by ``zp_shift`` steps, reported so the caller can warn.
    """
    if offset_mode not in OFFSET_MODES:
        raise ValueError(f"offset_mode={offset_mode!r}: allowed values are {OFFSET_MODES}")
    if not q.is_initialized:
        raise ValueError("activation quantizer was never calibrated (run quant.calibrate before exporting)")
    s = float(q.scale.reshape(-1)[0])
    b = float(q.offset.reshape(-1)[0]) if q.offset is not None else 0.0
    qmin, qmax = q.qmin, q.qmax
    zp, shift = 0, 0.0
    if b and offset_mode == "zero_point" and not q.signed:
        zp_float = -b / s
        zp_round = int(round(zp_float))
        if 0 <= zp_round <= 255:  # else (offset > 0 or huge) it cannot be a uint8 zero point: stay exact
            zp, shift, b = zp_round, abs(zp_float - zp_round), 0.0
    # Codes of the grid in the container: round(t / s) + zp in [qmin, qmax] (unsigned: [0, qmax]).
    # With zp the real range is [(qmin - zp) s, (qmax - zp) s]; clip only when the container is wider.
    lo = hi = None
    if q.bits < 8:
        lo, hi = (qmin - zp) * s, (qmax - zp) * s
    return ActivationGrid(s, zp, b, lo, hi, q.signed, shift)


class QDQConv2d(nn.Module):
    """Inference-only conv built from a QuantConv2d; forward == the ONNX graph it exports to."""

    def __init__(self, qconv: QuantConv2d, offset_mode: str = "exact"):
        super().__init__()
        wq = qconv.weight_quantizer
        if not wq.enabled:
            raise ValueError("weight quantizer disabled: there is no integer weight to export")
        self.w_bits, self.a_bits = qconv.w_bits, qconv.a_bits
        self.stride, self.padding, self.dilation, self.groups = qconv.stride, qconv.padding, qconv.dilation, qconv.groups
        if qconv.padding_mode != "zeros" or isinstance(qconv.padding, str):
            raise ValueError("QDQConv2d exports zero padding with explicit pads only")
        # int8 is the container of every width 2..8; the ONNX post-pass may narrow it to INT4.
        self.register_buffer("weight_int", qconv.integer_weight().to(torch.int8))
        scale = wq.scale.float().clone()
        self.register_buffer("weight_scale", scale if wq.per_channel else scale.reshape(()))
        self.register_buffer("out_scale", None if qconv.out_scale is None else qconv.out_scale.float().view(1, -1, 1, 1).clone())
        self.register_buffer("bias", None if qconv.bias is None else qconv.bias.detach().float().view(1, -1, 1, 1).clone())
        aq = qconv.input_quantizer
        self.act = activation_grid(aq, offset_mode) if aq.enabled else None
        # Activation grid as buffers (they become ONNX initializers; None = op omitted).
        a = self.act
        f32 = lambda v: None if a is None or v is None else torch.tensor(v, dtype=torch.float32)  # noqa: E731
        self.register_buffer("act_scale", f32(a and a.scale))
        self.register_buffer("act_zero_point", None if a is None else
                             torch.tensor(a.zero_point, dtype=torch.int8 if a.signed else torch.uint8))
        self.register_buffer("act_offset", f32(a.offset) if a is not None and a.offset else None)
        self.register_buffer("act_lo", f32(a and a.lo))
        self.register_buffer("act_hi", f32(a and a.hi))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is not None:
            x = QDQActivation.apply(x, self.act_scale, self.act_zero_point, self.act_offset, self.act_lo, self.act_hi)
        w = DequantizeWeight.apply(self.weight_int, self.weight_scale)
        y = F.conv2d(x, w, None, self.stride, self.padding, self.dilation, self.groups)
        if self.out_scale is not None:
            y = y * self.out_scale
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"w_bits={self.w_bits}, a_bits={self.a_bits}, weight={tuple(self.weight_int.shape)}"


def swap_quant_convs(model: nn.Module, offset_mode: str = "exact") -> dict[str, QDQConv2d]:
    """Replace every QuantConv2d by a QDQConv2d in place; returns {name: new module}."""
    swapped = {}
    for name, m in list(model.named_modules()):
        if isinstance(m, QuantConv2d):
            swapped[name] = QDQConv2d(m, offset_mode)
            replace_module(model, name, swapped[name])
    return swapped
