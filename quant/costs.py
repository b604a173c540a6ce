"""What a weight or activation bit width costs on each deploy target, as data (beside quant/targets.py).

Three accountings of a conv's weights, because the targets disagree on what a narrower width buys:

- ``runtime``: the bits per weight the runtime holds and moves when it runs the layer (memory, weight traffic);
- ``onnx``: the bits per weight of the file ``export.py --format onnx`` writes for the target (its initializers);
- ``packed``: the bits per weight of ``export.py --format packed`` (sub-byte codes, any target): the download size.

and one of compute, bit-ops (MACs x runtime weight bits x runtime activation bits, AIMET's measure; nominal: a
runtime's speed also depends on its kernels, and Qualcomm's HTP gains from INT4 weights through weight traffic).

What each target does with a width below 8 (sources: TARGETS.md, the runtimes' docs and our probes of onnxruntime):

- ``ort``: onnxruntime's QLinearConv takes int8 weights and u8 activations only; 4-bit codes run exactly in those
  containers (the CPU conv selector has INT4 switched off). A narrower width saves nothing at runtime nor in the
  ONNX file: only the packed checkpoint shrinks.
- ``npu``: INT4 weight initializers (opset 21) for every <= 4-bit weight, so the file shrinks everywhere; Qualcomm's
  HTP runs INT4 weights with a gain only on 1x1 convolutions with more than 32 output channels at stride 1 (its INT4
  guide), elsewhere the weight is widened to INT8. Activations 8-bit only.
- ``tensorrt``: no INT4 convolution: weights in int8 containers in the file and at runtime; activations 8-bit only.
  INT8 is the minimum that pays.
- ``sim``: no runtime (float convs on dequantized weights, for inspection): ``runtime`` is the nominal accounting of
  papers (b-bit weights cost b bits, b-bit activations b bits); its file stores <= 4-bit weights as INT4.

A width pays on a target only if it costs less there than a wider one (``pays``): the allocator (quant/allocate.py)
is only ever offered widths that pay, so it never buys accuracy loss the runtime does not turn into a gain.

``FLOAT`` is the width of a conv kept unquantized (a recipe's ``exclude``): what the target runs such a layer in,
FP16 where the runtime has it (TensorRT builds with FP16 enabled, Qualcomm's HTP), FP32 on onnxruntime's CPU kernels
and in the ``sim`` accounting; the exported ONNX and the packed checkpoint hold its weights in fp32.
"""
from __future__ import annotations

from dataclasses import dataclass

from .targets import TARGET_NAMES, get_target

COST_KINDS = ("runtime", "onnx", "packed")
FLOAT = (32, 32)  # (w_bits, a_bits) of a conv kept in float: wider than every integer width


def is_float(width) -> bool:
    """``width`` keeps the conv unquantized (weights wider than the 8-bit integer widths)."""
    return width[0] > 8


@dataclass(frozen=True)
class LayerGeometry:
    """What the cost of one conv depends on. ``macs``: multiply-accumulates per image at the measured input size."""

    name: str
    in_channels: int
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    groups: int
    params: int
    macs: int

    @classmethod
    def of_conv(cls, name: str, conv, out_hw: tuple[int, int]) -> "LayerGeometry":
        kh, kw = conv.kernel_size
        params = conv.weight.numel()
        return cls(name, conv.in_channels, conv.out_channels, (kh, kw), tuple(conv.stride), conv.groups, params,
                   params * int(out_hw[0]) * int(out_hw[1]))

    def to_dict(self) -> dict:
        return {"name": self.name, "in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel": list(self.kernel), "stride": list(self.stride), "groups": self.groups,
                "params": self.params, "macs": self.macs}

    @classmethod
    def from_dict(cls, d: dict) -> "LayerGeometry":
        return cls(d["name"], d["in_channels"], d["out_channels"], tuple(d["kernel"]), tuple(d["stride"]),
                   d["groups"], d["params"], d["macs"])


def htp_int4_rule(layer: LayerGeometry) -> bool:
    """Qualcomm HTP gains from INT4 weights on this conv: 1x1 kernel, more than 32 output channels, stride 1."""
    return layer.kernel == (1, 1) and layer.out_channels > 32 and layer.stride == (1, 1)


@dataclass(frozen=True)
class TargetCosts:
    """Containers are the widths a target stores / runs a value in: a b-bit value costs the smallest container
    >= b (None: the width itself, nominal). ``int4_runtime_rule``: a <= 4-bit weight runs in 4 bits only on
    the layers where it holds (else in the next container up)."""

    name: str
    runtime_weight: tuple[int, ...] | None
    onnx_weight: tuple[int, ...]
    runtime_act: tuple[int, ...] | None
    act_floor: int  # the narrowest activation width the runtime convolves (an allocation never goes below it)
    float_bits: int  # what a conv kept in float runs in (weights and activations)
    int4_runtime_rule: str | None = None
    note: str = ""


COSTS: dict[str, TargetCosts] = {
    "sim": TargetCosts("sim", runtime_weight=None, onnx_weight=(4, 8), runtime_act=None, act_floor=2, float_bits=32,
                       note="no runtime: nominal bits (the papers' accounting); the ONNX stores <= 4-bit weights "
                            "as INT4"),
    "ort": TargetCosts("ort", runtime_weight=(8,), onnx_weight=(8,), runtime_act=(8,), act_floor=2, float_bits=32,
                       note="int8 weight / u8 activation containers: narrower widths run exactly but save nothing at "
                            "runtime or in the ONNX (packed checkpoint only)"),
    "npu": TargetCosts("npu", runtime_weight=(4, 8), onnx_weight=(4, 8), runtime_act=(8,), act_floor=8,
                       float_bits=16, int4_runtime_rule="htp",
                       note="INT4 initializers everywhere; HTP runs INT4 weights only on 1x1, >32 output channels, "
                            "stride 1 convs; 8-bit activations"),
    "tensorrt": TargetCosts("tensorrt", runtime_weight=(8,), onnx_weight=(8,), runtime_act=(8,), act_floor=8,
                            float_bits=16,
                            note="no INT4 convolution: int8 weights in the file and at runtime; 8-bit activations"),
}
assert set(COSTS) == set(TARGET_NAMES), "every deploy target needs its cost data"

RULES = {"htp": htp_int4_rule}


def get_costs(target: str) -> TargetCosts:
    if target not in COSTS:
        raise ValueError(f"target={target!r}: allowed values are {tuple(COSTS)}")
    return COSTS[target]


def _container(bits: int, containers: tuple[int, ...] | None) -> int:
    if containers is None:
        return bits
    fit = [c for c in containers if c >= bits]
    return min(fit) if fit else bits


def weight_bits(target: str, layer: LayerGeometry, w_bits: int, kind: str = "runtime") -> int:
    """Bits one weight of ``layer`` costs at ``w_bits`` on ``target`` in accounting ``kind`` (``COST_KINDS``)."""
    c = get_costs(target)
    if kind not in COST_KINDS:
        raise ValueError(f"cost kind {kind!r}: allowed values are {COST_KINDS}")
    if w_bits > 8:  # FLOAT: a conv kept unquantized
        return c.float_bits if kind == "runtime" else 32
    if kind == "packed":
        return w_bits
    if kind == "onnx":
        return _container(w_bits, c.onnx_weight)
    containers = c.runtime_weight
    if c.int4_runtime_rule is not None and containers is not None and not RULES[c.int4_runtime_rule](layer):
        containers = tuple(b for b in containers if b > 4) or containers
    return _container(w_bits, containers)


def act_bits(target: str, a_bits: int) -> int:
    """Bits one input activation costs at runtime (bit-ops)."""
    if a_bits > 8:
        return get_costs(target).float_bits
    return _container(a_bits, get_costs(target).runtime_act)


def weight_cost(target: str, layer: LayerGeometry, w_bits: int, kind: str = "runtime") -> int:
    """The layer's weights in bits."""
    return layer.params * weight_bits(target, layer, w_bits, kind)


def bitops(target: str, layer: LayerGeometry, w_bits: int, a_bits: int) -> int:
    """MACs x runtime weight bits x runtime activation bits, per image."""
    return layer.macs * weight_bits(target, layer, w_bits, "runtime") * act_bits(target, a_bits)


def option_cost(target: str, layer: LayerGeometry, width: tuple[int, int], measure: str) -> int:
    """Cost of ``width`` = (w_bits, a_bits) under ``measure``: a weight accounting of ``COST_KINDS`` (bits) or
    ``bitops``."""
    w, a = width
    if measure == "bitops":
        return bitops(target, layer, w, a)
    return weight_cost(target, layer, w, measure)


def runs(target: str, width: tuple[int, int]) -> bool:
    """The target's runtime convolves this width at all (its activation floor; weights 2..8 run everywhere, in
    containers where narrower; ``FLOAT`` everywhere)."""
    if is_float(width):
        return True
    t = get_target(target)
    return width[1] >= get_costs(target).act_floor and (t.activation_bits is None or width[1] == t.activation_bits)


def pays(target: str, layer: LayerGeometry, width: tuple[int, int], widths, measure: str) -> bool:
    """``width`` is worth offering for ``layer`` under ``measure``: no other of ``widths`` at least as wide in weights
    and activations costs as little or less (a width the runtime ignores costs what the wider one does and only
    loses accuracy)."""
    mine = option_cost(target, layer, width, measure)
    return not any(other != width and other[0] >= width[0] and other[1] >= width[1]
                   and option_cost(target, layer, other, measure) <= mine for other in widths)


MEASURES = COST_KINDS + ("bitops",)


def paying_widths(target: str, layer: LayerGeometry, widths, measures=MEASURES) -> list[tuple[int, int]]:
    """The widths of ``widths`` (``(w_bits, a_bits)`` pairs) the target runs and that pay on ``layer`` under at least
    one of ``measures``, widest first."""
    ok = sorted({tuple(w) for w in widths if runs(target, tuple(w))}, reverse=True)
    return [w for w in ok if any(pays(target, layer, w, ok, m) for m in measures)]
