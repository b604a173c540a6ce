"""YOLO-specific quantization sites of deploy targets that encode tensors (quant/targets.py ``encode_outputs``):
the residual sums of Bottlenecks get an 8-bit encoding (onnxruntime's QLinearAdd), for targets that ask for it
(``encode_concats``, TensorRT) the outputs of Concat layers too, and the model is run once
so that convs taking a block's output as it is share its encoding (quant.act.share_encodings).

The residual blocks and Concats change class in place (as QuantRepConv does), keeping their parameters and state-dict
keys; the sum goes through ``add_quantizer``, the
concatenation through ``cat_quantizer``.
"""
from __future__ import annotations

import torch
from torch import nn
from ultralytics.nn.modules import block as um
from ultralytics.nn.modules.conv import Concat as UltralyticsConcat

from yolo_qat.quant.act import output_quantizer

from . import common


def _residual_forward(self, x: torch.Tensor) -> torch.Tensor:
    y = self.cv2(self.cv1(x))
    return self.add_quantizer(x + y) if self.add else y


class QuantBottleneck(um.Bottleneck):
    """Ultralytics' Bottleneck (C2f, C3, ...) whose residual sum is quantized."""

    forward = _residual_forward


class QuantOriginalBottleneck(common.Bottleneck):
    """The original YOLOv5 Bottleneck (models.common) whose residual sum is quantized."""

    forward = _residual_forward


def _concat_forward(self, x):
    return self.cat_quantizer(torch.cat(x, self.d))


class QuantConcat(UltralyticsConcat):
    """Ultralytics' Concat whose output has one encoding (TensorRT: the convs reading it share one Q/DQ)."""

    forward = _concat_forward


class QuantOriginalConcat(common.Concat):
    forward = _concat_forward


def _swap_in(model: nn.Module, swaps: dict[type, type], attr: str, bits: int, signed: bool, when=None) -> int:
    """Give every module whose exact class is a key of ``swaps`` (and ``when(m)``) that value's class and an
    encoding quantizer under ``attr``; returns how many."""
    device = next(model.parameters()).device
    n = 0
    for m in model.modules():
        new = swaps.get(type(m))
        if new is not None and (when is None or when(m)):
            m.__class__ = new
            setattr(m, attr, output_quantizer(bits, signed=signed).to(device))
            n += 1
    return n


def quantize_concats(model: nn.Module, bits: int, signed: bool = False) -> int:
    return _swap_in(model, {UltralyticsConcat: QuantConcat, common.Concat: QuantOriginalConcat}, "cat_quantizer",
                    bits, signed)


def quantize_residuals(model: nn.Module, bits: int, signed: bool = False) -> int:
    return _swap_in(model, {um.Bottleneck: QuantBottleneck, common.Bottleneck: QuantOriginalBottleneck},
                    "add_quantizer", bits, signed, when=lambda m: m.add)


def yolo_sites(model: nn.Module, bits: int, signed: bool = False, concats: bool = False):
    """The ``sites`` hook of the YOLO policies: quantize the residual sums (``signed``: on the symmetric grid of
    targets with zero point 0) and, with ``concats``, the outputs of the model's Concat layers; return how to run
    the model once
    (a small image of the model's channels; its size a multiple of the largest stride)."""
    quantize_residuals(model, bits, signed)
    if concats:
        quantize_concats(model, bits, signed)
    ch = (getattr(model, "yaml", None) or {}).get("channels", 3)
    size = int(max(getattr(model, "stride", torch.tensor([32.0])).max().item(), 32)) * 2
    device = next(model.parameters()).device

    def run(m: nn.Module):
        return m(torch.zeros(1, ch, size, size, device=device))

    return run
