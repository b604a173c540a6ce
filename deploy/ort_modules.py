"""Export-time modules of the integer targets (``ort``, ``npu``, ``tensorrt``; quant/targets.py has the rules):
the QDQ patterns their runtimes turn into integer kernels, each a module whose torch forward computes what
the ONNX ops it emits compute, in their order (QuantizeLinear divides by the scale and rounds half to even).

- ``ORTConv2d``: Q(x) [-> integer Clip for a sub-8-bit grid] -> DQ, DQ(int8 weight, per-channel scale
  with BN, QC and the output scale folded in: the codes do not change), DQ(int32 bias, scale s_x * s_w)
  -> Conv. Followed by the output Q of ``ORTAct`` / ``ORTOut`` this is QLinearConv.
  Targets with a float bias (TensorRT) put the folded bias into the Conv as it is; targets with narrow
  weights get positive per-channel scales (a channel with a negative folded scale stores negated codes).
- ``ORTAct``: Q/DQ of the conv output, then Sigmoid -> Q/DQ(1/256) and Mul (QLinearSigmoid, QLinearMul),
  or another activation in float (TensorRT: no conv-output Q, the activation fused into its conv), then
  the block output's encoding.
- ``ORTOut``: a head conv's output Q/DQ.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn
from ultralytics.nn.modules.block import C2f

from yolo_qat.quant import LSQQuantizer, QuantConv2d, replace_module
from yolo_qat.quant.act import FixedQuantizer, QuantAct, QuantOut
from yolo_qat.quant.targets import get_target

from .degenerate_bias import fit_int32_bias

INT32_MAX = 2**31 - 1


class IntQDQ(torch.autograd.Function):
    """y = (clamp(clamp(round(x / s) + zp, container), lo, hi) - zp) * s; lo/hi (codes) None for 8 bits."""

    @staticmethod
    def forward(ctx, x, scale, zp, lo, hi):
        cmin, cmax = (-128, 127) if zp.dtype == torch.int8 else (0, 255)
        z = zp.float()
        q = (torch.round(x / scale) + z).clamp(cmin, cmax)
        if lo is not None:
            q = q.clamp(float(lo), float(hi))
        return (q - z) * scale

    @staticmethod
    def symbolic(g, x, scale, zp, lo, hi):
        q = g.op("QuantizeLinear", x, scale, zp)
        if lo is not None:  # an integer Clip between Q and DQ keeps the neighbours integer (a float one would not)
            q = g.op("Clip", q, lo, hi)
        return g.op("DequantizeLinear", q, scale, zp)


class DequantizePerChannel(torch.autograd.Function):
    """An integer initializer (int8 weight or int32 bias) times its per-output-channel scale (axis 0).

    No zero-point input (ONNX's default: 0 of the input's type). With explicit int8 zero-point
    initializers, onnxruntime 1.32's exact-arithmetic mode for x86 without VNNI
    (``session.x64quantprecision``, which rewrites s8 weights to u8) fails to load the YOLO graphs
    ("Attempt to replace the existing tensor"); without them it loads and fuses the same."""

    @staticmethod
    def forward(ctx, t_int, scale):
        shape = [-1] + [1] * (t_int.dim() - 1)
        return t_int.float() * scale.view(shape)

    @staticmethod
    def symbolic(g, t_int, scale):
        return g.op("DequantizeLinear", t_int, scale, axis_i=0)


def _grid(q: LSQQuantizer | FixedQuantizer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(scale, zero point, lo, hi) tensors of an activation grid in its 8-bit container."""
    if isinstance(q, FixedQuantizer):
        lo = hi = None if q.bits == 8 else (torch.tensor(0, dtype=torch.uint8), torch.tensor(q.qmax, dtype=torch.uint8))
        return torch.tensor(q.step, dtype=torch.float32), torch.tensor(0, dtype=torch.uint8), lo, hi
    if not q.is_initialized:
        raise ValueError("an activation quantizer was never calibrated (run quant.calibrate before exporting)")
    if q.per_channel:
        raise ValueError("per-channel activation quantizers have no QuantizeLinear form onnxruntime fuses")
    s = q.scale.reshape(()).float().clone()
    if q.signed:
        zp, dtype, lo_c, hi_c = 0, torch.int8, q.qmin, q.qmax
    else:
        zp = int(q.zero_point_code().reshape(-1)[0]) if q.offset is not None else 0
        dtype, lo_c, hi_c = torch.uint8, q.qmin, q.qmax
    lo = hi = None
    if q.bits < 8:
        lo, hi = torch.tensor(lo_c, dtype=dtype), torch.tensor(hi_c, dtype=dtype)
    return s, torch.tensor(zp, dtype=dtype), lo, hi


def grid_shift(q: LSQQuantizer) -> float:
    """How far (in steps) the integer zero point moves a grid trained with a float LSQ+ offset (0 if on-grid)."""
    if q.offset is None or q.integer_zero_point or q.signed:
        return 0.0
    z = float(-q.offset.detach().reshape(-1)[0] / q.scale.reshape(-1)[0])
    return abs(z - min(max(round(z), 0), q.qmax))


class _QDQ(nn.Module):
    """One activation grid as buffers (they become the Q/DQ initializers)."""

    def __init__(self, q):
        super().__init__()
        s, zp, lo, hi = _grid(q)
        self.register_buffer("scale", s)
        self.register_buffer("zero_point", zp)
        self.register_buffer("lo", lo)
        self.register_buffer("hi", hi)

    def forward(self, x):
        return IntQDQ.apply(x, self.scale, self.zero_point, self.lo, self.hi)


class ORTConv2d(nn.Module):
    """A BN-folded QuantConv2d as DQ(x) + DQ(int8 w) + DQ(int32 b) -> Conv (or a float bias: ``int32_bias``
    False); ``positive_scales``: negative per-channel weight scales become negated codes (narrow grid only);
    ``view_encoded``: a view input (a C2f split's slice) already comes out of a DequantizeLinear. ``name`` and
    ``out_quantizer`` (the quantizer of the conv's output) serve a bias that does not fit int32
    (deploy/degenerate_bias.py)."""

    def __init__(self, qconv: QuantConv2d, int32_bias: bool = True, positive_scales: bool = False,
                 view_encoded: bool = False, name: str = "conv", out_quantizer: LSQQuantizer | None = None):
        super().__init__()
        wq, aq = qconv.weight_quantizer, qconv.input_grid
        if not (wq.enabled and aq.enabled):
            raise ValueError("integer targets need quantized weights and inputs (an excluded or disabled "
                             "quantizer leaves a float conv)")
        if qconv.padding_mode != "zeros" or isinstance(qconv.padding, str):
            raise ValueError("the integer export takes zero padding with explicit pads only")
        self.w_bits, self.a_bits = qconv.w_bits, qconv.a_bits
        self.stride, self.padding, self.dilation, self.groups = qconv.stride, qconv.padding, qconv.dilation, qconv.groups
        # A shared input is already a DQ output of its producer's encoding: no Q/DQ here (the grid is for the bias)
        self.act = _QDQ(aq) if qconv.input_source is None or (qconv.input_is_view and not view_encoded) else None
        self.input_scale, self.input_zero_point = (float(v) for v in _grid(aq)[:2])
        self.shared_input = qconv.input_source is not None
        n = qconv.out_channels
        # BN, QC and the output scale go into the per-channel weight scale (the codes do not change); the bias
        # into the int32 accumulator at scale s_x * s_w, the product onnxruntime checks before it fuses.
        w_scale, b_scale = qconv.accumulator_scale()
        codes = qconv.integer_weight()
        if positive_scales:
            if wq.qmin != -wq.qmax:
                raise ValueError("positive weight scales need the narrow weight grid (a model trained for this "
                                 "target has it): negating a code of -2^(b-1) overflows")
            sign = torch.where(w_scale < 0, -1.0, 1.0)
            codes = codes * sign.view(-1, *[1] * (codes.dim() - 1))
            w_scale, b_scale = w_scale * sign, b_scale * sign
        bias = torch.zeros(n, dtype=torch.float64) if qconv.bias is None else qconv.bias.detach().double().reshape(-1)
        if int32_bias:  # channels whose bias overflows int32: a coarser weight step where that is exact, or a paragraph
            w_scale = fit_int32_bias(name, qconv, codes, w_scale, bias, out_quantizer)
            b_scale = qconv.input_grid.scale.reshape(()).float() * w_scale
        self.register_buffer("weight_int", codes.to(torch.int8))
        self.register_buffer("weight_scale", w_scale)
        self.int32_bias = int32_bias
        if int32_bias:
            b_int = torch.round(bias / b_scale.double())
            self.register_buffer("bias_int", b_int.to(torch.int32))
            self.register_buffer("bias_scale", b_scale)
        else:
            self.register_buffer("bias_float", bias.float())

    def forward(self, x):
        w = DequantizePerChannel.apply(self.weight_int, self.weight_scale)
        b = DequantizePerChannel.apply(self.bias_int, self.bias_scale) if self.int32_bias else self.bias_float
        x = self.act(x) if self.act is not None else x
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self):
        return f"w_bits={self.w_bits}, a_bits={self.a_bits}, weight={tuple(self.weight_int.shape)}"


class ORTAct(nn.Module):
    """QuantAct at export: Q/DQ of the conv output, then SiLU as Sigmoid -> Q/DQ -> Mul (or the activation)."""

    def __init__(self, qact):
        super().__init__()
        self.pre = _QDQ(qact.pre) if qact.pre is not None else None
        self.sig = _QDQ(qact.sig) if qact.sig is not None else None
        self.act = None if qact.sig is not None else qact.act
        self.out = _QDQ(qact.out) if getattr(qact, "out", None) is not None else None

    def forward(self, x):
        y = self.pre(x) if self.pre is not None else x
        y = y * self.sig(torch.sigmoid(y)) if self.sig is not None else self.act(y)
        return self.out(y) if self.out is not None else y


class ORTOut(nn.Module):
    def __init__(self, conv: ORTConv2d, quantizer: LSQQuantizer):
        super().__init__()
        self.conv, self.quantizer = conv, _QDQ(quantizer)

    def forward(self, x):
        return self.quantizer(self.conv(x))


def encoded_split_source(m: nn.Module) -> LSQQuantizer | None:
    """The encoding of a C2f's ``cv1`` output (its QuantAct's ``out``) when the export repeats it on both halves of
    the split (``swap_for_ort``): then the first Bottleneck's residual Add and the Concat take DequantizeLinear
    outputs, which onnxruntime runs as QLinearAdd / QLinearConcat (and the Split on u8), instead of float ops on the
    slices. The same values: the halves are on that grid already. None for any other module."""
    if not isinstance(m, C2f):
        return None
    act = getattr(m.cv1, "act", None)
    return act.out if isinstance(act, QuantAct) and act.out is not None else None


def _encoded_forward_split(self, x):
    y = [self.split_encoding(t) for t in self.cv1(x).split((self.c, self.c), 1)]
    y.extend(m(y[-1]) for m in self.m)
    return self.cv2(torch.cat(y, 1))


def conv_output_quantizers(model: nn.Module) -> dict[str, LSQQuantizer]:
    """{conv name: the quantizer of its output}: a block's QuantAct.pre beside its ``conv``, a QuantOut's own."""
    out = {}
    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(m, QuantOut):
            out[f"{prefix}conv"] = m.quantizer
        elif isinstance(getattr(m, "act", None), QuantAct) and m.act.pre is not None \
                and isinstance(getattr(m, "conv", None), QuantConv2d):
            out[f"{prefix}conv"] = m.act.pre
    return out


def swap_for_ort(model: nn.Module, target=None) -> dict[str, ORTConv2d]:
    """Replace (in place, on a BN-folded model) QuantAct, QuantOut and QuantConv2d by their export forms for
    ``target`` (an integer quant.targets.Target; None: ``ort``); returns {conv name: ORTConv2d}. The model must
    have been built for that target (its output quantizers and encodings are what the runtime quantizes)."""
    target = target or get_target("ort")
    split_sources = set()
    for m in list(model.modules()):  # before the QuantActs are replaced: the encoding is read from cv1's
        q = encoded_split_source(m)
        if q is not None:
            m.split_encoding = _QDQ(q)
            m.forward = types.MethodType(_encoded_forward_split, m)
            split_sources.add(id(q))
    out_quantizers = conv_output_quantizers(model)  # before QuantAct / QuantOut are replaced
    for name, m in list(model.named_modules()):
        if isinstance(m, QuantAct):
            replace_module(model, name, ORTAct(m))
    outs = {n for n, m in model.named_modules() if isinstance(m, QuantOut)}
    convs = {}
    for name, m in list(model.named_modules()):
        if isinstance(m, QuantConv2d):
            view_encoded = m.input_is_view and id(m.input_source) in split_sources
            convs[name] = ORTConv2d(m, target.int32_bias, target.narrow_weights, view_encoded, name,
                                    out_quantizers.get(name))
            replace_module(model, name, convs[name])
    for name in outs:
        m = model.get_submodule(name)
        replace_module(model, name, ORTOut(m.conv, m.quantizer))
    for name, m in list(model.named_modules()):  # the residual sums' encodings (models/quant_sites.py)
        if isinstance(m, LSQQuantizer) and m.is_activation:
            replace_module(model, name, _QDQ(m))
    return convs
