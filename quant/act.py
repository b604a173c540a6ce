"""Quantizers beyond the conv inputs: where an integer runtime quantizes a tensor, QAT does too.

onnxruntime's integer conv (QLinearConv) needs a QuantizeLinear right after the conv, as its only
consumer, and runs SiLU as QLinearSigmoid (a lookup table) and QLinearMul. So for deploy targets that
quantize those tensors (quant/targets.py) every quantized conv gets an 8-bit quantizer on its output,
after BN and any QC correction (``QuantAct.pre``, or ``QuantOut.quantizer`` for a conv without a block
around it), and a SiLU becomes ``pre(y) * sig(sigmoid(pre(y)))`` with the sigmoid on the fixed grid
1/256. The product goes, unquantized, to whatever comes next: a conv quantizes it with its own input
quantizer (in the runtime: QLinearMul with that conv's input parameters), other ops see it in float.

Model-agnostic: a "block" is any module with a ``conv`` (a QuantConv2d, possibly wrapped) and an
``act``; the caller (quant/convert.py) says which.
"""
from __future__ import annotations

import torch
from torch import nn

from .fp32 import KeepFP32
from .lsq import LSQQuantizer

SIGMOID_BITS = 8
SIGMOID_SCALE = 1.0 / 256  # torch.ao's fixed qparams of sigmoid: codes 0..255 cover [0, 1)


def output_quantizer(bits: int = 8, full_range: bool = False, signed: bool = False) -> LSQQuantizer:
    """An activation quantizer for a conv output or a tensor's encoding: unsigned LSQ+ grid with an integer
    zero point, or (``signed``, targets with symmetric activations) the signed grid with zero point 0;
    ``full_range``: initialised over the calibrated min..max (no clipping)."""
    q = LSQQuantizer(bits, signed=signed, learn_offset=not signed)
    q.is_activation = True
    q.integer_zero_point = not signed
    q.full_range = full_range
    return q


class _FixedRound(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, qmax):
        return torch.clamp(torch.round(x * (1.0 / scale)), 0, qmax) * scale

    @staticmethod
    def backward(ctx, g):  # straight through: the sigmoid output never leaves [0, 1] by much
        return g, None, None


class FixedQuantizer(KeepFP32, nn.Module):
    """Unsigned fake quantization on a fixed grid (no learnable state): ``scale * clamp(round(x / scale))``.
    The scale is a python float, not a Parameter, so no optimizer or EMA can move it."""

    def __init__(self, bits: int = SIGMOID_BITS, scale: float = SIGMOID_SCALE):
        super().__init__()
        self.bits, self.step, self.qmax = bits, float(scale), 2**bits - 1
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        return _FixedRound.apply(x.float(), self.step, self.qmax).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.bits}-bit unsigned fixed step {self.step:g}"


class QuantAct(nn.Module):
    """A block's activation with the runtime's quantizers: ``pre`` on its input (the conv output after
    BN and QC; None where the runtime fuses the activation into the conv, TensorRT), for SiLU the sigmoid
    on the fixed grid (with ``pre`` only), and ``out`` (when the target encodes block outputs) on the
    result: the encoding of the tensor every consumer sees (Concat, Add, Upsample, MaxPool, and the convs
    that take it as it is: ``share_encodings``)."""

    def __init__(self, act: nn.Module, bits: int | None = 8, out_bits: int | None = None, signed: bool = False):
        super().__init__()
        self.pre = output_quantizer(bits) if bits else None
        self.act = act
        self.sig = FixedQuantizer() if isinstance(act, nn.SiLU) and self.pre is not None else None
        self.out = output_quantizer(out_bits, signed=signed) if out_bits else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pre(x) if self.pre is not None else x
        y = y * self.sig(torch.sigmoid(y)) if self.sig is not None else self.act(y)
        return self.out(y) if self.out is not None else y


class QuantOut(nn.Module):
    """A conv that has no block around it (a head's final conv, bias inside), with an output quantizer.
    A QC correction wraps ``conv`` and so comes before the quantizer, as BN does for blocks."""

    def __init__(self, conv: nn.Module, bits: int = 8):
        super().__init__()
        # A head's logits: MSE clipping would saturate exactly the high-confidence detections (measured on a
        # W4A8 QAT yolov5nu-seg: -4.2 box mAP with the MSE range, the final convs' outputs in float: no loss).
        self.conv, self.quantizer = conv, output_quantizer(bits, full_range=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantizer(self.conv(x))

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:  # code that reads e.g. ``m.out_channels`` / ``m.bias`` of the head's conv
            return getattr(super().__getattr__("conv"), name)


# attributes under which a model family's sites (models/quant_sites.py) keep the encoding of a tensor they make:
# a residual sum, a concatenation
ENCODING_ATTRS = ("add_quantizer", "cat_quantizer")


def output_quantizers(model: nn.Module) -> dict[str, LSQQuantizer]:
    """{name: quantizer} of every quantizer a target adds beyond conv inputs: QuantAct.pre / .out,
    QuantOut.quantizer, and the ``add_quantizer`` of residual blocks (models/quant_sites.py)."""
    out = {}
    for n, m in model.named_modules():
        if isinstance(m, QuantAct):
            if m.pre is not None:
                out[f"{n}.pre"] = m.pre
            if m.out is not None:
                out[f"{n}.out"] = m.out
        elif isinstance(m, QuantOut):
            out[f"{n}.quantizer"] = m.quantizer
        else:
            for attr in ENCODING_ATTRS:
                if isinstance(getattr(m, attr, None), LSQQuantizer):
                    out[f"{n}.{attr}"] = getattr(m, attr)
    return out


def encoding_quantizers(model: nn.Module) -> list[LSQQuantizer]:
    """The quantizers whose output is a tensor's encoding (QuantAct.out, residual sums', concatenations')."""
    qs = [m.out for m in model.modules() if isinstance(m, QuantAct) and m.out is not None]
    return qs + [getattr(m, a) for m in model.modules() for a in ENCODING_ATTRS
                 if isinstance(getattr(m, a, None), LSQQuantizer)]


def fixed_quantizers(model: nn.Module) -> list[FixedQuantizer]:
    return [m for m in model.modules() if isinstance(m, FixedQuantizer)]
