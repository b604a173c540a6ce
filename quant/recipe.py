"""QuantRecipe: what to quantize and at how many bits, as plain data (stored in checkpoints)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .targets import TARGET_NAMES, get_target

BIT_CHOICES = tuple(range(2, 9))
ACT_MODES = ("lsq+", "unsigned", "signed")
WEIGHT_INITS = ("mse", "lsq")


def _check_bits(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value not in BIT_CHOICES:
        raise ValueError(f"recipe field '{name}' = {value!r} is invalid: allowed values are the "
                         f"integers {BIT_CHOICES[0]}..{BIT_CHOICES[-1]}")
    return value


def _check_choice(name: str, value: Any, allowed: tuple) -> Any:
    if value not in allowed:
        raise ValueError(f"recipe field '{name}' = {value!r} is invalid: allowed values are {allowed}")
    return value


def dataclass_from(cls, value, what: str, allow_none: bool = True):
    """``value`` as an instance of the settings dataclass ``cls``: an instance as it is, a dict by its fields
    (None: the defaults, when allowed). ValueError naming ``what`` for unknown keys or another type."""
    if value is None and allow_none:
        return cls()
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a dict or {cls.__name__}, got {type(value).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = set(value) - known
    if unknown:
        raise ValueError(f"{what} has unknown field(s) {sorted(unknown)}: allowed fields are {sorted(known)}")
    return cls(**value)


@dataclass
class QuantRecipe:
    """Bits and granularity of a quantized model.

    ``first_last_bits``: bits of weights and activations of the first layer and the final
    prediction layers (which ones is model policy: see ``quant.convert.register_policy``).
    ``overrides``: ``{layer_name: {"w_bits": b, "a_bits": b}}``. ``exclude``: layer names kept float.
    ``act_mode``: ``lsq+`` (unsigned grid with learnable offset, for SiLU outputs), ``unsigned``
    or ``signed``.
    """

    # metadata "help": the text of the generated command-line flags (engine/settings.py)
    w_bits: int = field(default=4, metadata={"help": f"weight bits, {BIT_CHOICES[0]}..{BIT_CHOICES[-1]}"})
    a_bits: int = field(default=4, metadata={"help": f"activation bits, {BIT_CHOICES[0]}..{BIT_CHOICES[-1]}"})
    first_last_bits: int | None = field(default=8, metadata={
        "help": "bits of the stem and the final head convs; none: the same as the other layers"})
    per_channel: bool = field(default=False, metadata={"help": "per-output-channel weight step sizes"})
    act_mode: str = field(default="lsq+", metadata={
        "help": f"activation grid, one of {ACT_MODES}: lsq+ is unsigned with a learnable offset (SiLU goes below 0)"})
    weight_init: str = field(default="mse", metadata={
        "help": f"initial weight step size, one of {WEIGHT_INITS}: an MSE search, or 2 mean|w| / sqrt(Qp) (Esser et al.)"})
    overrides: dict = field(default_factory=dict, metadata={
        "help": "per-layer bits, a mapping {layer name: {w_bits: b, a_bits: b}}"})
    exclude: list = field(default_factory=list, metadata={"help": "names of layers kept in float"})
    target: str = field(default="sim", metadata={
        "help": f"deploy target whose quantization QAT simulates, one of {TARGET_NAMES}: sim is the paper's "
                "(conv inputs and weights), ort adds what onnxruntime's integer kernels quantize (conv outputs, "
                "sigmoid, integer zero points) so the export runs on them; npu: ort's rules with INT4 weights, 8-bit "
                "activations; tensorrt: signed symmetric 8-bit activations (act_mode lsq+ becomes signed), int8 "
                "weights; see quant/targets.py"})

    def __post_init__(self):
        _check_bits("w_bits", self.w_bits)
        _check_bits("a_bits", self.a_bits)
        if self.first_last_bits is not None:
            _check_bits("first_last_bits", self.first_last_bits)
        if not isinstance(self.per_channel, bool):
            raise ValueError(f"recipe field 'per_channel' = {self.per_channel!r} is invalid: allowed values are True, False")
        _check_choice("act_mode", self.act_mode, ACT_MODES)
        _check_choice("weight_init", self.weight_init, WEIGHT_INITS)
        if not isinstance(self.overrides, dict):
            raise ValueError("recipe field 'overrides' must be a mapping {layer_name: {'w_bits': b, 'a_bits': b}}")
        for name, o in self.overrides.items():
            if not isinstance(o, dict) or not set(o) <= {"w_bits", "a_bits"} or not o:
                raise ValueError(f"recipe field 'overrides[{name!r}]' = {o!r} is invalid: allowed keys are 'w_bits', 'a_bits'")
            for k, v in o.items():
                _check_bits(f"overrides[{name!r}].{k}", v)
        self.exclude = list(self.exclude)
        _check_choice("target", self.target, TARGET_NAMES)
        self._check_target()

    def _check_target(self) -> None:
        """What the deploy target's runtime executes (quant/targets.py): its activation grid and bit-width."""
        t = get_target(self.target)
        if t.symmetric_activations:
            if self.act_mode == "lsq+":  # the default grid; this target's default is the signed one
                self.act_mode = "signed"
            elif self.act_mode != "signed":
                raise ValueError(f"recipe field 'act_mode' = {self.act_mode!r} is invalid for target '{t.name}': it "
                                 "runs symmetric signed activations (zero point 0): use act_mode 'signed'")
        if t.activation_bits is not None:
            bits = {"a_bits": self.a_bits, "first_last_bits": self.first_last_bits}
            bits.update({f"overrides[{n!r}].a_bits": o["a_bits"] for n, o in self.overrides.items() if "a_bits" in o})
            bad = {k: v for k, v in bits.items() if v is not None and v != t.activation_bits}
            if bad:
                raise ValueError(f"recipe field(s) {bad} invalid for target '{t.name}': its runtime convolves "
                                 f"{t.activation_bits}-bit activations only (no mainstream runtime runs 4-bit "
                                 f"activations in convolutions). Use a_bits {t.activation_bits}, e.g. W4A8: "
                                 f"--w-bits 4 --a-bits {t.activation_bits}")

    @classmethod
    def from_any(cls, recipe: "QuantRecipe | dict") -> "QuantRecipe":
        return dataclass_from(cls, recipe, "recipe", allow_none=False)

    def to_dict(self) -> dict:
        return asdict(self)
