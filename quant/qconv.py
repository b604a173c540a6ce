"""QuantConv2d: a drop-in for nn.Conv2d that fake-quantizes its input and its weight."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .fp32 import KeepFP32
from .lsq import LSQQuantizer
from .range_init import init_weight_quantizer


class QuantConv2d(KeepFP32, nn.Conv2d):
    """Same parameters and state_dict keys as the nn.Conv2d it replaces (``weight``, ``bias``),
    plus ``weight_quantizer`` and ``input_quantizer``.

    ``out_scale`` (a per-output-channel buffer, absent until something is folded in) multiplies
    the integer-weight convolution before the bias is added: BatchNorm and QC corrections fold
    there, so the integer weights never change when the model is fused for deployment.
    The latent weight stays fp32 under ``.half()``: rounding it to fp16 could move integer codes.
    """

    def __init__(self, *args, w_bits: int = 4, a_bits: int = 4, per_channel: bool = False,
                 act_signed: bool = False, act_offset: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
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
        xq = self.input_quantizer(x.float())
        wq = self.weight_quantizer(self.weight.float())
        if self.out_scale is None:
            y = self._conv_forward(xq, wq, None if self.bias is None else self.bias.float())
        else:
            y = self._conv_forward(xq, wq, None) * self.out_scale.view(1, -1, 1, 1)
            if self.bias is not None:
                y = y + self.bias.float().view(1, -1, 1, 1)
        return y if dtype == torch.float32 else y.to(dtype)

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
