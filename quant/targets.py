"""Deploy targets: which tensors carry which quantizer, in one place.

A target is plain data read by the quantizer insertion (quant/convert.py), the QAT forward (the modules
it inserts) and the exporter (deploy/), so the model that trains is the model that runs.

- ``sim``: the paper's simulation (conv inputs and weights only; LSQ+ offsets anywhere on the real line).
  The default, and what every checkpoint made before targets existed is. Its Q/DQ export is a float
  graph to onnxruntime (float convs on dequantized weights): for inspection and exchange, not speed.
- ``ort``: onnxruntime's integer CPU kernels (x86 VNNI / AVX2, Arm dot-product). Its rules, probed with
  ../shared/deploy/ort_probe.py: QLinearConv forms from DQ(u8 input, integer zero point) + DQ(s8 weight,
  per channel) + DQ(int32 bias, scale s_x * s_w) -> Conv -> Q(output) with that Q the conv's only
  consumer; INT4 initializers keep the conv in float (int8 containers instead, codes exact); a sub-8-bit
  grid stays exact as an integer Clip between Q and DQ; SiLU -> QLinearSigmoid + QLinearMul when the
  sigmoid output is quantized; Concat, Add, Resize and MaxPool stay integer (QLinearConcat, QLinearAdd, u8)
  only between DequantizeLinear inputs and a QuantizeLinear output. So QAT for ``ort`` adds an 8-bit
  quantizer on every conv output (after BN and QC), the sigmoid's fixed 1/256 grid, an 8-bit encoding of
  every block output and residual sum (shared by the convs that take the tensor as it is, when their input
  grid has those bits), and puts every LSQ+ offset on the integer zero-point grid.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    name: str
    integer_zero_point: bool  # activation offsets on the integer zero-point grid (STE)
    output_bits: int | None  # bits of the conv-output quantizers (None: conv outputs stay float)
    encode_outputs: bool  # block outputs and residual sums get one 8-bit encoding each, which convs share
    int4_weights: bool  # <= 4-bit weights as INT4 initializers (opset 21); else an int8 container
    int32_bias: bool  # bias as a DequantizeLinear(int32) into the conv; else Mul/Add after it
    runtime: str  # what executes it as integer kernels


TARGETS = {
    "sim": Target("sim", integer_zero_point=False, output_bits=None, encode_outputs=False, int4_weights=True, int32_bias=False,
                  runtime="none: float convs on dequantized weights (the paper's simulation, inspection)"),
    "ort": Target("ort", integer_zero_point=True, output_bits=8, encode_outputs=True, int4_weights=False, int32_bias=True,
                  runtime="onnxruntime CPU: QLinearConv / QLinearSigmoid / QLinearMul"),
}
TARGET_NAMES = tuple(TARGETS)


def get_target(name: str | None) -> Target:
    """The target named ``name`` (None: ``sim``, what checkpoints without a target are)."""
    name = name or "sim"
    if name not in TARGETS:
        raise ValueError(f"target={name!r}: allowed values are {TARGET_NAMES}")
    return TARGETS[name]


def model_target(model) -> Target:
    """The target a quantized model was built for (its recipe's ``target``; ``sim`` for older ones)."""
    recipe = getattr(model, "quant_recipe", None) or {}
    return get_target(recipe.get("target"))
