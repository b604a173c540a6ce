"""QuantConv2d: a drop-in for nn.Conv2d that fake-quantizes its input and its weight."""
from __future__ import annotations

from functools import partial

import torch
from torch import nn

from .fp32 import KeepFP32
from .lsq import LSQQuantizer
from .range_init import init_weight_quantizer

try:  # selective activation checkpointing: torch >= 2.4
    from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts
except ImportError:  # older torch: the input is kept as before (more memory, same results)
    checkpoint = None


def _recompute_all_but_conv(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op == torch.ops.aten.convolution.default else \
        CheckpointPolicy.PREFER_RECOMPUTE


_RECOMPUTE_CONTEXT = partial(create_selective_checkpoint_contexts, _recompute_all_but_conv) if checkpoint else None


class QuantConv2d(KeepFP32, nn.Conv2d):
    """Same parameters and state_dict keys as the nn.Conv2d it replaces (``weight``, ``bias``),
    plus ``weight_quantizer`` and ``input_quantizer``.

    ``out_scale`` (a per-output-channel buffer, absent until something is folded in) multiplies
    the integer-weight convolution before the bias is added: BatchNorm and QC corrections fold
    there, so the integer weights never change when the model is fused for deployment.
    The latent weight stays fp32 under ``.half()``: rounding it to fp16 could move integer codes.

    ``recompute_input`` (off by default; ``set_recompute_input`` switches a whole model): in
    training, keep only the conv's input for the backward and recompute its fake quantization
    there, instead of keeping both the input (for the quantizer's gradient) and the quantized input
    (for the convolution's). One activation-sized tensor less per quantized conv: about the peak
    memory of the FP model (benchmarks/speed.py: 1.04x instead of 1.50x) for a slower step
    (checkpointing costs ~2-4 ms per conv on CPU: 1.47x instead of 1.12x FP in
    benchmarks/step_time.py). Outputs and gradients are bit-identical (tests/test_qconv_recompute.py).
    """

    recompute_input: bool = False  # class default too: models pickled before the option existed

    def __init__(self, *args, w_bits: int = 4, a_bits: int = 4, per_channel: bool = False,
                 act_signed: bool = False, act_offset: bool = True, recompute_input: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.recompute_input = recompute_input
        self.weight_quantizer = LSQQuantizer(w_bits, signed=True, per_channel=per_channel, axis=0,
                                             channels=self.out_channels)
        self.input_quantizer = LSQQuantizer(a_bits, signed=act_signed, learn_offset=act_offset)
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
        init_weight_quantizer(q.weight_quantizer, q.weight, weight_init)
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
        """The integer codes the deployed layer stores."""
        q = self.weight_quantizer
        s = q.scale.reshape(-1, 1, 1, 1) if q.per_channel else q.scale
        # w * (1 / s), as the fake-quant forward computes it, so a tie rounds the same way in both.
        return (self.weight.detach().float() * (1.0 / s)).round().clamp(q.qmin, q.qmax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        wq = self.weight_quantizer(self.weight.float())
        if self._recomputes(x):
            y = checkpoint(self._forward_quantized, x.float(), wq, use_reentrant=False,
                           context_fn=_RECOMPUTE_CONTEXT)
        else:
            y = self._forward_quantized(x.float(), wq)
        return y if dtype == torch.float32 else y.to(dtype)

    def _recomputes(self, x: torch.Tensor) -> bool:
        q = self.input_quantizer
        # An uninitialised quantizer initialises itself from its first input: that must run once, not twice.
        return (checkpoint is not None and self.recompute_input and torch.is_grad_enabled() and q.enabled
                and q._is_init and not torch.jit.is_tracing() and not torch.jit.is_scripting())

    def _forward_quantized(self, x: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
        xq = self.input_quantizer(x)
        if self.out_scale is None:
            y = self._conv_forward(xq, wq, None if self.bias is None else self.bias.float())
        else:
            y = self._conv_forward(xq, wq, None) * self.out_scale.view(1, -1, 1, 1)
            if self.bias is not None:
                y = y + self.bias.float().view(1, -1, 1, 1)
        return y

    @torch.no_grad()
    def fold_affine(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        """Fold ``y -> scale * y + shift`` (per output channel) into out_scale and bias."""
        scale = scale.detach().float().reshape(-1).expand(self.out_channels)
        shift = shift.detach().float().reshape(-1).expand(self.out_channels)
        bias = self.bias.float() if self.bias is not None else torch.zeros_like(scale)
        self.out_scale = scale.clone() if self.out_scale is None else self.out_scale * scale
        new_bias = bias * scale + shift
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
