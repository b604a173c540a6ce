"""Deploy targets: which tensors carry which quantizer, in one place.

A target is plain data read by the quantizer insertion (quant/convert.py), the QAT forward (the modules
it inserts) and the exporter (deploy/), so the model that trains is the model that runs.

- ``sim``: the paper's simulation (conv inputs and weights only; LSQ+ offsets anywhere on the real line).
  The default, and what every checkpoint made before targets existed is. Its Q/DQ export is a float
  graph to onnxruntime (float convs on dequantized weights): for inspection and exchange, not speed.
- ``ort``: onnxruntime's integer CPU kernels (x86 VNNI / AVX2, Arm dot-product). Its rules, probed on small
  graphs (docs/deploy-ort.md): QLinearConv forms from DQ(u8 input, integer zero point) + DQ(s8 weight,
  per channel) + DQ(int32 bias, scale s_x * s_w) -> Conv -> Q(output) with that Q the conv's only
  consumer; INT4 initializers keep the conv in float (int8 containers instead, codes exact); a sub-8-bit
  grid stays exact as an integer Clip between Q and DQ; SiLU -> QLinearSigmoid + QLinearMul when the
  sigmoid output is quantized; Concat, Add, Resize and MaxPool stay integer (QLinearConcat, QLinearAdd, u8)
  only between DequantizeLinear inputs and a QuantizeLinear output. So QAT for ``ort`` adds an 8-bit
  quantizer on every conv output (after BN and QC), the sigmoid's fixed 1/256 grid, an 8-bit encoding of
  every block output and residual sum (shared by the convs that take the tensor as it is, when their input
  grid has those bits), and puts every LSQ+ offset on the integer zero-point grid.
- ``npu``: NPUs fed QDQ ONNX (Snapdragon HTP through onnxruntime's QNN provider, Ascend, Cortex-M with
  CMSIS-NN): ``ort``'s activation rules (u8 with integer zero points, conv outputs, sigmoid, encodings,
  int32 bias) with 4-bit weights as INT4 initializers (opset 21), weights on the narrow symmetric grid
  [-(2^(b-1)-1), 2^(b-1)-1] so that a channel whose folded scale is negative (BN's gamma < 0) becomes
  negated codes with a positive scale, exactly. 8-bit activations only: no NPU runs 4-bit activations
  in convolutions (W4A8 is the deployable 4-bit model).
- ``tensorrt``: TensorRT's explicit-quantization INT8 (Q/DQ in front of each conv's input and weight; it
  fuses BN, SiLU and a following Q into the conv itself). Symmetric signed 8-bit activations (zero point
  0) at every conv input; no conv-output or sigmoid quantizers (the activation runs inside the fused
  conv, in float); each block output, residual sum and Concat output gets one 8-bit encoding, taken as it is by the
  convs that read it (one Q per tensor, so TensorRT can fuse it into the producer), int8 weights on the
  narrow grid with positive per-channel scales (4-bit codes in int8 containers, exact: TensorRT has no
  INT4 convolution), float bias (TensorRT folds it). 8-bit activations only.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    name: str
    integer_zero_point: bool  # activation offsets on the integer zero-point grid (STE)
    output_bits: int | None  # bits of the conv-output quantizers (None: conv outputs stay float)
    encode_bits: int | None  # block outputs and residual sums get one encoding of these bits, which convs share
    int4_weights: bool  # <= 4-bit weights as INT4 initializers (opset 21); else an int8 container
    int32_bias: bool  # bias as a DequantizeLinear(int32) into the conv; else Mul/Add after it
    runtime: str  # what executes it as integer kernels
    symmetric_activations: bool = False  # signed activation grids, zero point 0 (no LSQ+ offset)
    narrow_weights: bool = False  # weight codes in [-(2^(b-1)-1), 2^(b-1)-1]; exported scales positive
    activation_bits: int | None = None  # the only activation bit-width the runtime convolves (None: any)
    encode_concats: bool = False  # Concat outputs get one encoding too (read by several convs: one Q, not one each)

    @property
    def encode_outputs(self) -> bool:
        return self.encode_bits is not None

    @property
    def integer(self) -> bool:
        """The export runs on the runtime's integer kernels (ORTConv2d and friends, deploy/ort_modules.py)."""
        return self.name != "sim"


TARGETS = {
    "sim": Target("sim", integer_zero_point=False, output_bits=None, encode_bits=None, int4_weights=True, int32_bias=False,
                  runtime="none: float convs on dequantized weights (the paper's simulation, inspection)"),
    "ort": Target("ort", integer_zero_point=True, output_bits=8, encode_bits=8, int4_weights=False, int32_bias=True,
                  runtime="onnxruntime CPU: QLinearConv / QLinearSigmoid / QLinearMul"),
    "npu": Target("npu", integer_zero_point=True, output_bits=8, encode_bits=8, int4_weights=True, int32_bias=True,
                  narrow_weights=True, activation_bits=8,
                  runtime="NPUs from QDQ ONNX opset 21 (QNN HTP, Ascend, CMSIS-NN): INT4/INT8 weights, u8 activations"),
    "tensorrt": Target("tensorrt", integer_zero_point=False, output_bits=None, encode_bits=8, int4_weights=False,
                       int32_bias=False, symmetric_activations=True, narrow_weights=True, activation_bits=8,
                       encode_concats=True,
                       runtime="TensorRT explicit INT8: Q/DQ conv inputs (s8, zero point 0), int8 weights, fused BN/SiLU"),
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


def check_continued_target(model, requested: str | None, source: str = "the checkpoint") -> None:
    """QAT continues a quantized checkpoint as it is: a ``requested`` target other than the one it was built for
    (``sim``, the recipe's default, counts as no request) cannot apply to it, and is an error, not ignored."""
    have = model_target(model).name
    if requested not in (None, "sim") and requested != have:
        raise ValueError(f"{source} was quantized for target '{have}'; QAT continues a quantized checkpoint as it "
                         f"is, so --target {requested} cannot apply to it. Start QAT for '{requested}' from the FP "
                         f"checkpoint: train_qat.py --weights <FP .pt> --target {requested}")
