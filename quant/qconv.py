"""QuantConv2d: a drop-in for nn.Conv2d that fake-quantizes its input and its weight."""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from .fp32 import KeepFP32
from .lsq import LSQQuantizer


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: no device argument
        return torch.is_autocast_enabled() if device_type == "cuda" else torch.is_autocast_cpu_enabled()


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast gives convolutions on ``device_type`` now, or None when autocast is off there."""
    if not _autocast_on(device_type):
        return None
    try:
        return torch.get_autocast_dtype(device_type)
    except AttributeError:  # torch < 2.4
        return torch.get_autocast_gpu_dtype() if device_type == "cuda" else torch.get_autocast_cpu_dtype()


def _conv_dtype(device_type: str) -> torch.dtype:
    """The dtype a quantized conv runs in: fp32, or fp16 under fp16 autocast.

    fp16 holds every value of an 8-bit grid to within 0.12 of a step (11 significant bits; no code
    moves), but bf16 has 8: an 8-bit code times the step (plus the LSQ+ offset) rounds up to 0.7 of a
    step away, and 7-8% of the codes of an evenly used 8-bit grid become another code (measured:
    tests/quant/test_amp_cpu.py). So under bf16 autocast (``torch.autocast(dtype=torch.bfloat16)`` from
    Python, or CPU autocast, whose default is bf16) the quantized conv runs in fp32 on the exact grid
    values, as without autocast, and returns its usual dtype; the rest of the network stays in bf16.
    Ultralytics' AMP is fp16 on CUDA, so its training keeps the fp16 conv.
    """
    amp = _autocast_dtype(device_type)
    return torch.float16 if amp == torch.float16 else torch.float32


def _quantizer_input(x: torch.Tensor, conv_dtype: torch.dtype) -> torch.Tensor:
    """What the input quantizer gets: ``x`` as it is when the conv runs in fp16 (its output is cast to fp16
    there anyway, and on CUDA the Triton kernel reads and writes fp16 itself: no fp32 copy of the activation,
    and the copy it keeps for the backward is the 2-byte input; values and input gradients are the same bit for
    bit), else ``x.float()`` (an fp32 conv, bf16 autocast included, needs the exact fp32 grid values)."""
    return x if conv_dtype == torch.float16 else x.float()


class _RecomputedInputConv(torch.autograd.Function):
    """``conv(input_quantizer(x), wq, bias)`` that keeps only ``x`` and ``wq`` (in the conv's dtype) for the backward.

    Autograd would keep ``x`` (for the quantizer's gradient) and the quantized input (for the
    convolution's). Here the backward recomputes the fake quantization from ``x`` (one elementwise
    pass), runs the same ``aten.convolution_backward`` autograd would, and sends the input
    gradient back through the recomputed quantizer: bit-identical gradients, one activation-sized
    tensor less per conv. ``qparams`` are the quantizer's learnable tensors (step size, offset),
    inputs here only so that their gradients have somewhere to go.
    """

    @staticmethod
    def forward(ctx, x, wq, bias, conv, dtype, *qparams):
        # ``x`` in its own dtype (that is what is kept: an fp16 input under AMP keeps 2 bytes an element); the
        # quantizer gets what it gets in the plain path (``_quantizer_input``). The conv runs in ``dtype`` (``_conv_dtype``) with
        # autocast off and explicit casts: what autocast does to the plain path's conv, so under fp16 autocast
        # outputs and gradients are bit-identical to it as well.
        with torch.no_grad():
            xq = conv.input_quantizer(_quantizer_input(x, dtype))
        wc = wq.to(dtype)  # the weight as the conv gets it (and as autograd would keep it)
        ctx.conv, ctx.has_bias, ctx.dtype = conv, bias is not None, dtype
        ctx.save_for_backward(x, wc)
        with torch.autocast(x.device.type, enabled=False):
            return F.conv2d(xq.to(dtype), wc, None if bias is None else bias.to(dtype), conv.stride,
                            conv.padding, conv.dilation, conv.groups)

    @staticmethod
    def backward(ctx, grad_y):
        x, wc = ctx.saved_tensors
        conv, need, dtype = ctx.conv, ctx.needs_input_grad, ctx.dtype
        with torch.enable_grad():
            xr = x.detach().requires_grad_(need[0])
            xq = conv.input_quantizer(_quantizer_input(xr, dtype))
        with torch.autocast(x.device.type, enabled=False):
            grad_xq, grad_w, grad_b = torch.ops.aten.convolution_backward(
                grad_y.to(dtype).contiguous(), xq.detach().to(dtype), wc, [wc.shape[0]] if ctx.has_bias else None,
                conv.stride, conv.padding, conv.dilation, False, [0, 0], conv.groups,
                [True, need[1], ctx.has_bias and need[2]])
        # back to the fp32 operands' dtype, as the backward of autocast's casts does
        grad_xq = grad_xq.float()
        grad_w = grad_w.float() if grad_w is not None else None
        grad_b = grad_b.float() if grad_b is not None else None
        qparams = list(conv.input_quantizer.parameters())  # what forward got, in the same order
        targets = ([xr] if need[0] else []) + [p for p, n in zip(qparams, need[5:]) if n]
        grads = iter(torch.autograd.grad(xq, targets, grad_xq, allow_unused=True) if targets else ())
        grad_x = next(grads) if need[0] else None
        return (grad_x, grad_w, grad_b, None, None, *[next(grads) if n else None for n in need[5:]])


# Traced as it trains, the fake quantization exports as constants and the graph never reads its input.
EXPORT_REFUSAL = ("a QuantConv2d is being exported to ONNX in its training form, which would write a graph that ignores "
                  "its input: export through yolo_qat, which swaps in the export form of each quantized layer "
                  "(`yolo-qat export`, `yolo_qat.export(weights)`, or Ultralytics' `model.export(format='onnx')` with "
                  "yolo_qat imported before the YOLO object is made)")


class QuantConv2d(KeepFP32, nn.Conv2d):
    """Same parameters and state_dict keys as the nn.Conv2d it replaces (``weight``, ``bias``),
    plus ``weight_quantizer`` and ``input_quantizer``.

    ``out_scale`` (a per-output-channel buffer, absent until something is folded in) multiplies
    the integer-weight convolution before the bias is added: BatchNorm and QC corrections fold
    there, so the integer weights never change when the model is fused for deployment.
    The latent weight stays fp32 under ``.half()``: rounding it to fp16 could move integer codes.

    ``recompute_input`` (off by default; ``set_recompute_input`` switches a whole model): in
    training, keep only the conv's input for the backward and recompute its fake quantization
    there (``_RecomputedInputConv``), instead of keeping both the input (for the quantizer's
    gradient) and the quantized input (for the convolution's). One activation-sized tensor less
    per quantized conv: about the peak memory of the FP model (benchmarks/speed.py: 1.03x instead
    of 1.50x) for one more elementwise pass per conv (benchmarks/step_time.py: 1.28-1.35x FP instead of
    1.16-1.20x). Outputs and gradients are bit-identical (tests/quant/test_qconv_recompute.py), under fp16 and bf16
    autocast too (tests/quant/test_amp_cpu.py).

    Under bf16 autocast the conv runs in fp32 (``_conv_dtype``: bf16 would move 8-bit codes); under fp16
    autocast in fp16, as autocast runs any conv.
    """

    recompute_input: bool = False  # class default too: models pickled before the option existed
    # Deploy targets whose runtime adds the bias to the int32 accumulator (quant/targets.py) set this: in eval
    # the bias is then rounded to that grid, s_x * s_w (* out_scale), as the exported file rounds it.
    int32_bias: bool = False
    # A quantizer elsewhere in the model whose output this conv takes as its input, already on that grid (one
    # encoding per tensor, quant.act.share_encodings); None: the conv quantizes its own input. A plain
    # attribute, not a submodule: the quantizer belongs to the module that produces the tensor.
    input_source = None
    input_is_view = False

    def __init__(self, *args, w_bits: int = 4, a_bits: int = 4, per_channel: bool = False,
                 act_signed: bool = False, act_offset: bool = True, recompute_input: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.recompute_input = recompute_input
        # the quantizers live where the layer's weight is (a model already on CUDA stays there)
        self.weight_quantizer = LSQQuantizer(w_bits, signed=True, per_channel=per_channel, axis=0,
                                             channels=self.out_channels).to(self.weight.device)
        self.input_quantizer = LSQQuantizer(a_bits, signed=act_signed, learn_offset=act_offset).to(self.weight.device)
        self.input_quantizer.is_activation = True
        self.register_buffer("out_scale", None)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, w_bits: int, a_bits: int, per_channel: bool = False,
                  act_signed: bool = False, act_offset: bool = True,
                  weight_init: str = "mse") -> "QuantConv2d":
        q = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
                w_bits=w_bits, a_bits=a_bits, per_channel=per_channel, act_signed=act_signed,
                act_offset=act_offset, device=conv.weight.device, dtype=torch.float32)
        with torch.no_grad():
            q.weight.copy_(conv.weight.float())
            if conv.bias is not None:
                q.bias.copy_(conv.bias.float())
        q.weight.requires_grad_(conv.weight.requires_grad)
        q.weight_quantizer.init_from_weight(q.weight, weight_init)
        return q

    @property
    def w_bits(self) -> int:
        return self.weight_quantizer.bits

    @property
    def a_bits(self) -> int:
        return self.input_quantizer.bits

    def quantized_weight(self) -> torch.Tensor:
        return self.weight_quantizer(self.weight)

    def integer_weight(self) -> torch.Tensor:
        """``weight_quantizer.codes(weight)``: the integer weight the forward uses and the deployed
        layer stores (deploy/: ONNX initializers, packed checkpoints)."""
        return self.weight_quantizer.codes(self.weight)

    def convolve(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """This conv's geometry (stride, padding and its mode, dilation, groups) applied to the given
        operands, in their dtype: what the forward runs on the quantized input and weight."""
        return self._conv_forward(x, weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            raise RuntimeError(EXPORT_REFUSAL)
        dtype = x.dtype
        conv_dtype = _conv_dtype(x.device.type)
        amp = _autocast_on(x.device.type)
        # bf16 autocast: the conv in fp32 on the exact grid values (``_conv_dtype``), autocast off around it
        with torch.autocast(x.device.type, enabled=False) if amp and conv_dtype == torch.float32 else nullcontext():
            wq = self.weight_quantizer(self.weight.float())
            folded = self.out_scale is not None  # the bias comes after the output scale, not inside the conv
            bias = self.bias if self.bias is None or self.training or not self.int32_bias else self.accumulator_bias()
            conv_bias = None if folded or bias is None else bias.float()
            if self.input_source is not None:  # already quantized by the module that made it
                y = self.convolve(_quantizer_input(x, conv_dtype), wq, conv_bias)
            elif self._recomputes(x):
                y = _RecomputedInputConv.apply(x, wq, conv_bias, self, conv_dtype, *self.input_quantizer.parameters())
            else:
                y = self.convolve(self.input_quantizer(_quantizer_input(x, conv_dtype)), wq, conv_bias)
            if folded:
                y = y * self.out_scale.view(1, -1, 1, 1)
                if bias is not None:
                    y = y + bias.float().view(1, -1, 1, 1)
        return y if y.dtype == dtype else y.to(dtype)

    @torch.no_grad()
    def accumulator_scale(self) -> torch.Tensor:
        """(weight scale per output channel with out_scale folded in, bias scale s_x * that), both fp32: the
        DequantizeLinear scales of the exported weight and int32 bias (deploy/ort_modules.py)."""
        s_w = self.weight_quantizer.scale.double().reshape(-1).expand(self.out_channels)
        if self.out_scale is not None:
            s_w = s_w * self.out_scale.double().reshape(-1)
        w_scale = s_w.float()
        return w_scale, self.input_grid.scale.reshape(()).float() * w_scale

    @property
    def input_grid(self):
        """The quantizer whose grid this conv's input is on: its own, or the shared ``input_source``."""
        return self.input_source if self.input_source is not None else self.input_quantizer

    def share_input(self, source, view: bool = False) -> None:
        """Take inputs as ``source`` (an LSQQuantizer producing them) quantized them (see ``input_source``).
        ``view``: the input is a slice of that tensor (a C2f split): the export repeats the encoding after the
        split (same scale and zero point: the same values) so that the runtime's conv still starts at a DQ."""
        self.__dict__["input_source"] = source
        self.input_is_view = view

    @torch.no_grad()
    def accumulator_bias(self) -> torch.Tensor:
        """The bias as the runtime adds it: round(b / (s_x * s_w)) steps of s_x * s_w (an int32 code each)."""
        _, b_scale = self.accumulator_scale()
        return (torch.round(self.bias.double() / b_scale.double()) * b_scale.double()).float()

    def _recomputes(self, x: torch.Tensor) -> bool:
        q = self.input_quantizer
        # An uninitialised quantizer (outside training, see LSQQuantizer.forward) initialises itself from its
        # first input: that must run once, not twice. Under autocast the recomputing conv runs in the dtype
        # the plain path's conv gets (``_conv_dtype``), so it is on there too.
        return (self.recompute_input and torch.is_grad_enabled() and q.enabled and q.is_initialized
                and self.padding_mode == "zeros" and not isinstance(self.padding, str)
                and not torch.jit.is_tracing() and not torch.jit.is_scripting())

    @torch.no_grad()
    def fold_affine(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        """Fold ``y -> scale * y + shift`` (per output channel) into out_scale and bias.

        Each new parameter is computed in float64 and rounded to fp32 once, so it is the fp32
        value nearest the exact one (half an ulp off at most): the only error folding adds, and
        the bound ``quant.qc.check_folded_layer`` holds it to.
        """
        def f64(t):  # on the CPU: float64 is not available on every device (MPS)
            return t.detach().cpu().double()

        dev = self.weight.device
        scale = f64(scale).reshape(-1).expand(self.out_channels)
        shift = f64(shift).reshape(-1).expand(self.out_channels)
        bias = f64(self.bias) if self.bias is not None else torch.zeros_like(scale)
        old_scale = f64(self.out_scale) if self.out_scale is not None else torch.ones_like(scale)
        self.out_scale = (old_scale * scale).float().to(dev)
        new_bias = (bias * scale + shift).float().to(dev)
        if self.bias is None:
            self.bias = nn.Parameter(new_bias)
        else:
            self.bias.copy_(new_bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", w_bits={self.w_bits}, a_bits={self.a_bits}"


def set_recompute_input(model: nn.Module, on: bool = True) -> int:
    """Switch ``recompute_input`` on every QuantConv2d of ``model`` (training memory vs step time);
    returns how many convs it set."""
    convs = [m for m in model.modules() if isinstance(m, QuantConv2d)]
    for m in convs:
        m.recompute_input = bool(on)
    return len(convs)
