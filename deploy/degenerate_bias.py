"""Convs whose int32 bias does not fit at the runtime's bias scale s_x * s_w: exported exactly where that is
possible, otherwise refused with one paragraph that names the layer, the cause and the fix.

The bias of an integer conv (``ort``, ``npu``) is an int32 code at s_x * s_w. When that product is tiny, because
the input step s_x calibrated to almost nothing (an untrained model calibrated on noise: the box branch's last conv
sees a near-constant input) or because training drove per-channel weight steps to the 1e-8 floor, the bias needs
more than 2^31 codes. Such a channel's input then hardly reaches its output: the whole input contributes at most
``delta = sum|w| * max|q - zp| * s_x``. When the output quantizer that follows the conv gives the same code for
every value within ``delta`` of the bias (the model's int32-rounded bias and the exported one, checked in float64
with a margin for float order), the input carries no information for that channel's output code. Its weight step
is then raised by the factor k that makes the int32 bias fit (``|b| / (s_x * s_w * k) = 2^30``: half the int32
range, the rest left to the accumulator), the weight codes unchanged, and the bias stored at s_x * (k * s_w) as
the runtime's rule wants. The exported channel computes its (re-rounded) bias plus k times the same input
contribution; the check covers that interval too (``k * delta``), so no output code changes. Input and weight
codes are untouched, so every activation code of the graph stays the model's, and the conv is still an integer
one (QLinearConv in onnxruntime). (A bias stored at a coarser step alone would not do: onnxruntime reads an int32
bias at s_x * s_w whatever its DequantizeLinear scale says.) Where some channel's output code does depend on the
input, no exact form exists and the export stops with a paragraph instead.
"""
from __future__ import annotations

import warnings

import torch

from yolo_qat.quant.grid import MIN_SCALE

INT32_MAX = 2**31 - 1
FIT_CODES = 2**30  # the bias code of a refitted channel: half the int32 range, the rest is accumulator headroom
_FLOOR = 100 * MIN_SCALE  # a step this small was clamped at (or driven to) the floor, not calibrated on data


class ExportWarning(UserWarning):
    """Something about the export the user should know (approximation, fallback); defined here, the lowest module
    that warns, and raised by deploy.onnx_qdq too."""


def _code(y: torch.Tensor, q) -> torch.Tensor:
    """The output quantizer's integer code of the values ``y`` (float64), as QuantizeLinear computes it."""
    s = float(q.scale.reshape(-1)[0])
    zp = 0 if q.signed or q.offset is None else float(q.zero_point_code().reshape(-1)[0])
    return (torch.round(y / s) + zp).clamp(q.qmin, q.qmax)


def _input_reach(qconv, codes: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """Per output channel, the most the whole input can move the conv's output (float64)."""
    aq = qconv.input_grid
    s_x = float(aq.scale.reshape(-1)[0])
    zp = 0 if aq.signed or aq.offset is None else float(aq.zero_point_code().reshape(-1)[0])
    span = max(zp - aq.qmin, aq.qmax - zp)
    w = codes.double().abs().flatten(1).sum(1) * w_scale.double().abs()
    return w * span * s_x


def _constant_output(bias, b_model, reach, b_export, reach_export, out_q) -> torch.Tensor:
    """Per channel: True where the output code is the same for every conv output the model (``b_model + e``,
    ``|e| <= reach``) or the export (``b_export + e'``, ``|e'| <= reach_export``) can compute."""
    s_o = float(out_q.scale.reshape(-1)[0])
    margin = 1e-3 * s_o + 1e-6 * bias.abs()  # float32 scales and summation order
    lo = torch.minimum(b_model - reach, b_export - reach_export) - margin
    hi = torch.maximum(b_model + reach, b_export + reach_export) + margin
    return _code(lo, out_q) == _code(hi, out_q)


def fit_int32_bias(name: str, qconv, codes, w_scale, bias, out_q) -> torch.Tensor:
    """The per-channel weight scales to export: unchanged where the int32 bias fits at s_x * s_w, and for a channel
    whose bias overflows and whose output code no input can change, the smallest that fits (module docstring).
    ValueError (one paragraph) where an overflowing channel's output depends on its input, or no output quantizer
    follows the conv."""
    s_x = qconv.input_grid.scale.reshape(()).float()
    b_scale = (s_x * w_scale).double()
    over = torch.round(bias / b_scale).abs() > INT32_MAX
    if not over.any():
        return w_scale
    if out_q is None:
        raise ValueError(_refusal(name, qconv, w_scale, bias, over, "no output quantizer follows it, so no exact "
                                                                     "integer form can be proven"))
    grow = (bias.abs() / (b_scale.abs() * FIT_CODES)).clamp_min(1.0)  # > 1 exactly where the bias overflows
    new_scale = torch.where(over, (w_scale.double() * grow).float(), w_scale)
    new_b_scale = (s_x * new_scale).double()
    reach = _input_reach(qconv, codes, w_scale)
    b_model = torch.round(bias / b_scale) * b_scale  # QuantConv2d's eval bias (accumulator_bias)
    b_export = torch.round(bias / new_b_scale) * new_b_scale
    const = _constant_output(bias, b_model, reach, b_export, reach * (new_scale.double() / w_scale.double()), out_q)
    if not bool(const[over].all()):
        raise ValueError(_refusal(name, qconv, w_scale, bias, over,
                                  f"in {int((over & ~const).sum())} of those channels the input can still change the "
                                  f"output code, so no coarser step gives the model's codes"))
    warnings.warn(f"{name}: the int32 bias of {int(over.sum())} of {over.numel()} channels does not fit at s_x * s_w "
                  f"(input step s_x = {float(s_x):.3g}) and no input can change those channels' output codes: their "
                  f"weight step is raised to the smallest whose bias fits (codes unchanged), which changes no output "
                  f"code (deploy/degenerate_bias.py)", ExportWarning, stacklevel=3)
    return new_scale


def _refusal(name, qconv, w_scale, bias, over, why) -> str:
    s_x = float(qconv.input_grid.scale.reshape(-1)[0])
    s_w = float(w_scale[over].abs().min())
    codes = float((bias / (s_x * w_scale.double())).abs().max())
    if s_w <= _FLOOR:
        cause = (f"per-channel weight steps collapsed to {s_w:.2g}, the {MIN_SCALE:g} floor: training drove them "
                 f"there")
        fix = ("retrain from the FP checkpoint with a lower --scale-lr, or export a checkpoint saved before the "
               "collapse")
    else:
        cause = (f"its input step s_x calibrated to {s_x:.2g}: the calibration images barely reach this layer (an "
                 f"untrained model, or calibration on noise)")
        fix = ("calibrate and train on real images of the task (train_qat.py --data), starting from a trained FP "
               "checkpoint")
    return (f"layer '{name}': its bias does not fit int32 at the runtime's bias scale s_x * s_w ({codes:.3g} codes, "
            f"the limit is 2^31 - 1) because {cause}; {why}. Fix: {fix}.")
