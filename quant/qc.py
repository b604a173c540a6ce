"""QC, quantization correction (Gupta & Asthana 2024, section 4 of METHOD.md), in pure PyTorch.

After QAT, a learnable affine ``y' = gamma * y + beta`` is put on the output of every quantized
conv (its pre-activation, before BN) and is the only thing trained for one short epoch; then it
folds away: into the BatchNorm that follows the conv, or into the conv's own per-channel output
scale and bias when there is no BN. The integer weights never change.

The correction lives in a wrapper module (``QCConv``) that replaces the conv in its parent, so it
is visible in ``print(model)``, pickles with the model, and leaves no hook behind once folded.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import fused as fused_lsq
from .act import QuantAct
from .convert import quant_convs, replace_module
from .grid import broadcast_scale
from .lsq import LSQQuantizer
from .qconv import QuantConv2d

GRANULARITIES = ("channel", "tensor")


class QCAffine(nn.Module):
    """``y -> gamma * y + beta`` over dim 1, starting at the identity.

    A disabled part (``scale=False`` / ``shift=False``) is a constant buffer, not a frozen
    Parameter: Ultralytics' trainer switches frozen Parameters back to trainable.
    """

    def __init__(self, channels: int, granularity: str = "channel", scale: bool = True, shift: bool = True):
        super().__init__()
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity={granularity!r}: allowed values are {GRANULARITIES}")
        if not (scale or shift):
            raise ValueError("QCAffine needs scale=True or shift=True (a correction with neither does nothing)")
        n = channels if granularity == "channel" else 1
        self.granularity = granularity
        gamma, beta = torch.ones(n), torch.zeros(n)
        if scale:
            self.gamma = nn.Parameter(gamma)
        else:
            self.register_buffer("gamma", gamma)
        if shift:
            self.beta = nn.Parameter(beta)
        else:
            self.register_buffer("beta", beta)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y * self.gamma.view(1, -1, 1, 1).to(y.dtype) + self.beta.view(1, -1, 1, 1).to(y.dtype)

    def extra_repr(self) -> str:
        return (f"granularity={self.granularity}, scale={isinstance(self.gamma, nn.Parameter)}, "
                f"shift={isinstance(self.beta, nn.Parameter)}")


class QCConv(nn.Module):
    """A QuantConv2d followed by its QC correction. Exposes the conv's attributes that wrapping
    code commonly reads (``out_channels``, ``weight``...) through ``conv``."""

    def __init__(self, conv: QuantConv2d, qc: QCAffine):
        super().__init__()
        self.conv, self.qc = conv, qc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.qc(self.conv(x))

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            # Ultralytics reads e.g. ``m.conv.weight`` / ``m.conv.out_channels`` on blocks.
            return getattr(super().__getattr__("conv"), name)


def insert_qc(model: nn.Module, granularity: str = "channel", scale: bool = True, shift: bool = True) -> int:
    """Wrap every QuantConv2d of ``model`` in a QCConv at the identity (in place). Returns the count."""
    if any(isinstance(m, QCConv) for m in model.modules()):
        raise ValueError("insert_qc: the model already has QC corrections (fold them first with fold_qc)")
    convs = quant_convs(model)
    if not convs:
        raise ValueError("insert_qc: QC needs a quantized model (no QuantConv2d found; run QAT first)")
    for name, conv in convs.items():
        qc = QCAffine(conv.out_channels, granularity, scale, shift).to(conv.weight.device)
        replace_module(model, name, QCConv(conv, qc))
    return len(convs)


def qc_modules(model: nn.Module) -> dict[str, QCConv]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QCConv)}


def qc_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in qc_modules(model).values() for p in m.qc.parameters()]


def set_batchnorm_eval(model: nn.Module) -> None:
    """BN in eval mode: normalise with the frozen running statistics and never update them."""
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            m.eval()


def freeze_for_qc(model: nn.Module) -> list[nn.Parameter]:
    """Make the QC corrections the only trainable tensors; BN in eval. Returns the trainable list.

    The model itself is left in whatever mode the caller needs (a YOLO loss needs train-mode
    outputs): call ``set_batchnorm_eval`` again after any ``model.train()``.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    params = qc_parameters(model)
    for p in params:
        p.requires_grad_(True)
    set_batchnorm_eval(model)
    return params


def default_bn_pairs(model: nn.Module) -> dict[str, str]:
    """{conv_name: bn_name} for the common conv-then-BN block layout: a parent with a ``conv``
    child (the QCConv) and a ``bn`` child (the BatchNorm that normalises its output)."""
    pairs = {}
    for name, m in model.named_modules():
        children = dict(m.named_children())
        conv, bn = children.get("conv"), children.get("bn")
        if isinstance(conv, QCConv) and isinstance(bn, _BatchNorm):
            prefix = f"{name}." if name else ""
            pairs[f"{prefix}conv"] = f"{prefix}bn"
    return pairs


@torch.no_grad()
def fold_into_bn(bn: _BatchNorm, gamma: torch.Tensor, beta: torch.Tensor) -> None:
    """Fold ``y -> gamma*y + beta`` into the eval-mode BN that follows it.

    BN(y') = k*(gamma*y + beta - mu) + b with k = w / sqrt(var + eps). Keeping mu and var (so a
    later re-estimation still sees sane statistics) this is BN with weight w*gamma and bias
    b + k*(beta + (gamma - 1)*mu): no division by gamma, so any gamma folds stably. Both are
    computed in float64 and rounded to fp32 once: the terms of the bias may cancel (|k*mu| large
    against the result), which costs nothing in float64, and each folded parameter ends within
    half an ulp of its exact value.
    """
    if not bn.affine or not bn.track_running_stats:
        raise ValueError("fold_qc: folding into BatchNorm needs affine=True and running statistics")
    c = bn.num_features

    def f64(t):  # on the CPU: float64 is not available on every device (MPS)
        return t.detach().cpu().double()

    gamma, beta = f64(gamma).reshape(-1).expand(c), f64(beta).reshape(-1).expand(c)
    w, b, mu = f64(bn.weight), f64(bn.bias), f64(bn.running_mean)
    k = w / (f64(bn.running_var) + bn.eps).sqrt()
    bn.bias.copy_((b + k * (beta + (gamma - 1) * mu)).float())
    bn.weight.copy_((w * gamma).float())


@torch.no_grad()
def fold_qc(model: nn.Module, bn_pairs: dict[str, str] | Callable[[nn.Module], dict[str, str]] | None = None) -> dict:
    """Fold every QC correction away (in place) and unwrap the convs. Returns
    ``{"into_bn": n, "into_conv": n}``.

    ``bn_pairs`` maps a QCConv's name to the BN that directly follows it (default:
    ``default_bn_pairs``). A correction with no BN after it goes into
    ``QuantConv2d.fold_affine`` (per-channel output scale and bias).
    """
    wrapped = qc_modules(model)
    pairs = (bn_pairs(model) if callable(bn_pairs) else bn_pairs) if bn_pairs is not None else default_bn_pairs(model)
    mods = dict(model.named_modules())
    counts = {"into_bn": 0, "into_conv": 0}
    for name, w in wrapped.items():
        gamma, beta = w.qc.gamma, w.qc.beta
        if name in pairs:
            fold_into_bn(mods[pairs[name]], gamma, beta)
            counts["into_bn"] += 1
        else:
            w.conv.fold_affine(gamma, beta)
            counts["into_conv"] += 1
        replace_module(model, name, w.conv)
    return counts


# ---------------------------------------------------------------------------------------------
# The per-layer check of a fold. Folded and unfolded layers are compared in float64, on the
# quantized input and weight the layer itself computes (folding changes neither): with the
# arithmetic noise gone, what is left is the rounding of the folded parameters to fp32, at most
# half an ulp of each (fold_into_bn, QuantConv2d.fold_affine). So a layer passes when
#     |folded - unfolded| <= eps32 * M_folded + (K + 8) * eps64 * (M_folded + M_unfolded)
# elementwise, M the sum of the magnitudes of the terms of the layer's output (every term's
# absolute value: conv(|xq|, |wq|) = steps x integer codes, |out_scale|, |bias|, |gamma|, |beta|,
# BN's |k| and |mu|) and K the conv's fan-in: one half-ulp rounding per folded parameter, with a
# factor 2 to spare, plus float64's own summation error. A constant share of the output's range
# cannot do this job: the box head of a barely trained YOLO outputs its bias almost unchanged
# everywhere (range 2e-7 at 2.0: one fp32 ulp is half of it), while a wrong fold moves outputs by
# the size of the correction, orders of magnitude above the bound.
# Second, each layer's fp32 forward (before and after folding) must agree with its float64
# evaluation within the worst-case fp32 summation bound (K + 8) * eps32 * M: proof that the
# float64 expression is what the module computes (e.g. that the bias follows the output scale).
# That evaluation takes the input as the forward does (a conv reading an encoding another module
# made, ``input_source``, takes it as it is) and the bias as the forward adds it (rounded to the
# int32 accumulator grid in eval on targets with an int32 bias). A fold into such a conv re-rounds
# its bias to the folded grid: the first comparison is of the parameters (the fold's algebra),
# and that shift goes into the tie band below.
# Third, the quantizer that takes the layer's output (found by tracing the run): as it is (a
# deploy target's conv-output quantizer, a head's output quantizer) or through an elementwise
# activation of bounded slope (TensorRT's fused SiLU, then the block output's encoding): the
# folded fp32 output may differ from the unfolded one by up to the sum of the bounds above (and
# the bias re-rounding), so an output within that distance of a rounding tie of that quantizer
# may land on either neighbouring code. Those outputs are counted (``ties``), not failed; a code
# that changes farther from a tie than that (``tie_ratio`` > 1) fails the check like the two
# bounds do.
EPS32 = torch.finfo(torch.float32).eps
EPS64 = torch.finfo(torch.float64).eps
_EXTRA_OPS = 8  # operations after the K-term sum: output scale, bias, QC scale and shift, BN's four
# A quantizer computes (x - b) / s as x * fl(1/s) - b * fl(1/s) in fp32: where it puts a rounding tie differs
# from the exact one by at most 3 ulps of |x| / s + |b| / s (here with one to spare).
_QUANTIZER_ULPS = 4
# Elementwise activations a folded layer's output may pass, in float, on its way to the quantizer (TensorRT fuses
# the SiLU into the conv; the block output's encoding comes after it): the largest slope of each, so a distance
# between two inputs bounds the distance between the outputs (SiLU: 1.0998 at x = 2.40), and the fp32 error of
# evaluating it, in ulps of the output (x / (1 + exp(-x)) with an exp within an ulp, here with margin).
_ACT_SLOPE = {nn.SiLU: 1.1, nn.ReLU: 1.0, nn.Identity: 1.0}
_ACT_ULPS = 4


class FoldCheckError(RuntimeError):
    """A folded layer does not compute what it did before folding (``layer``: its name; ``ratio``:
    its largest difference over the rounding bound). The model is left folded."""

    def __init__(self, message: str, layer: str, ratio: float, report: dict):
        super().__init__(message)
        self.layer, self.ratio, self.report = layer, ratio, report


def _chain(conv: QuantConv2d, qc: QCAffine | None, bn: _BatchNorm | None) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(x):
        y = conv(x)
        y = qc(y) if qc is not None else y
        return bn(y) if bn is not None else y
    return run


def _quantized_operands(conv: QuantConv2d, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp32 quantized input and weight the conv computes on (folding changes neither). A conv that
    takes an encoding another module made (``input_source``) convolves its input as it is: its own input
    quantizer never runs, and QAT trains the encoding away from it."""
    xq = x.float() if conv.input_source is not None else conv.input_quantizer(x.float())
    return xq.detach(), conv.weight_quantizer(conv.weight.float()).detach()


def _forward_bias(conv: QuantConv2d) -> torch.Tensor | None:
    """The bias the conv's forward adds: in eval on int32-bias targets, rounded to the accumulator grid."""
    if conv.bias is None or conv.training or not conv.int32_bias:
        return conv.bias
    return conv.accumulator_bias()


def layer_output_f64(conv: QuantConv2d, qc: QCAffine | None, bn: _BatchNorm | None, x: torch.Tensor,
                     magnitude: bool = False, conv_out: torch.Tensor | None = None,
                     as_run: bool = True) -> torch.Tensor:
    """``bn(qc(conv(x)))`` (BN in eval) in float64 from the layers' fp32 parameters, on the fp32
    quantized input and weight the conv computes itself. ``magnitude=True``: the same expression
    with every term replaced by its absolute value (subtractions become additions), the sum of
    magnitudes that bounds the rounding error of any evaluation of it. ``conv_out``: the float64
    convolution (of the magnitudes, with ``magnitude``), when already computed. ``as_run``: the bias
    as the forward adds it (``_forward_bias``); False: the bias parameter itself (the fold's algebra)."""
    f = torch.abs if magnitude else (lambda t: t)

    def ch(t):  # a per-channel (or per-tensor) parameter, broadcast over N, H, W
        return f(t.detach().double()).reshape(1, -1, 1, 1)

    if conv_out is None:
        xq, wq = _quantized_operands(conv, x)
        conv_out = conv.convolve(f(xq.double()), f(wq.double()))
    y = conv_out
    if conv.out_scale is not None:
        y = y * ch(conv.out_scale)
    bias = _forward_bias(conv) if as_run else conv.bias
    if bias is not None:
        y = y + ch(bias)
    if qc is not None:
        y = y * ch(qc.gamma) + ch(qc.beta)
    if bn is not None:
        k = bn.weight.detach().double() / (bn.running_var.double() + bn.eps).sqrt()
        y = (y + ch(bn.running_mean) if magnitude else y - ch(bn.running_mean)) * ch(k) + ch(bn.bias)
    return y


def _fan_in(conv: nn.Conv2d) -> int:
    return conv.in_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1]


def _max_ratio(diff: torch.Tensor, bound: torch.Tensor) -> tuple[float, int]:
    r = (diff / bound.clamp_min(torch.finfo(torch.float64).tiny)).flatten()
    i = int(r.argmax())
    return float(r[i]), i


def _evaluations(mods: tuple, x: torch.Tensor, conv_out: dict) -> dict[tuple[bool, bool], torch.Tensor]:
    """{(as_run, magnitude): float64 evaluation} of one layer (``layer_output_f64``); the as-run ones are the
    same tensors where the forward adds the bias parameter itself (no int32 rounding: most layers)."""
    e = {(False, m): layer_output_f64(*mods, x, m, conv_out.get(m), as_run=False) for m in (False, True)}
    rounded = _forward_bias(mods[0]) is not mods[0].bias
    e.update({(True, m): layer_output_f64(*mods, x, m, conv_out.get(m)) if rounded else e[False, m]
              for m in (False, True)})
    return e


def downstream_ties(quantizer, before: torch.Tensor, after: torch.Tensor, ref: torch.Tensor,
                    band: torch.Tensor) -> dict:
    """Where ``quantizer`` (an LSQQuantizer) gives the fp32 outputs ``before`` and ``after`` different codes:
    ``ties``, how many, and ``tie_ratio``, the largest distance of such an output's float64 value ``ref`` from
    the rounding tie between its codes over what ``band`` (how far before and after may lie apart, elementwise)
    and the quantizer's own fp32 arithmetic allow there (<= 1: every changed code sat on a tie; 0: none changed)."""
    changed = quantizer.codes(before) != quantizer.codes(after)
    n = int(changed.sum())
    if n == 0:
        return {"ties": 0, "tie_ratio": 0.0}
    ref, band = ref[changed], band[changed]
    idx = changed.nonzero(as_tuple=True)
    s = quantizer.scale_for(before).double().expand_as(before)[idx]
    b = quantizer.effective_offset(grad=False)
    b = torch.zeros_like(s) if b is None else \
        broadcast_scale(b.double(), before, quantizer.axis if quantizer.per_channel else None).expand_as(before)[idx]
    z = (ref - b) / s
    from_tie = (z - z.floor() - 0.5).abs()  # in steps: 0 on a tie, 0.5 on a code
    allowed = band / s + _QUANTIZER_ULPS * EPS32 * (ref.abs() + b.abs()) / s
    return {"ties": n, "tie_ratio": _max_ratio(from_tie, allowed)[0]}


@torch.no_grad()
def check_folded_layer(before: tuple, after: tuple, x: torch.Tensor, downstream=None) -> dict:
    """Compare one layer before folding (``(conv, qc, bn)``) and after (``(conv, None, bn)``) on
    its input ``x``. Returns the largest difference (``max_diff``), the output value there
    (``at_value``) and ratios that pass at <= 1: ``fold_ratio`` (float64 difference over the
    fold's rounding bound), ``fp32_ratio`` (fp32 forwards against their float64 evaluation,
    over the fp32 summation bound) and, with ``downstream`` (``(quantizer, activation)``: the quantizer
    that takes the layer's output, after that elementwise activation or, with None, as it is),
    ``ties`` (its codes that differ between the two forwards) and ``tie_ratio`` (``downstream_ties``)."""
    k = _fan_in(before[0])
    (xb, wb), (xa, wa) = _quantized_operands(before[0], x), _quantized_operands(after[0], x)
    shared = {}
    if torch.equal(xb, xa) and torch.equal(wb, wa):  # as folding must leave them: one float64 conv for both
        shared = {m: before[0].convolve(xb.double().abs() if m else xb.double(),
                                        wb.double().abs() if m else wb.double()) for m in (False, True)}
    ref, out = _evaluations(before, x, shared), _evaluations(after, x, shared)
    del shared
    diff = (out[False, False] - ref[False, False]).abs()
    fold_bound = EPS32 * out[False, True] + (k + _EXTRA_OPS) * EPS64 * (out[False, True] + ref[False, True])
    fold_ratio, i = _max_ratio(diff, fold_bound)
    fp32, y32, bounds = [], [], []
    for mods, e in ((before, ref), (after, out)):
        y = _chain(*mods)(x.float())
        bounds.append((k + _EXTRA_OPS) * EPS32 * e[True, True])
        fp32.append(_max_ratio((y.double() - e[True, False]).abs(), bounds[-1])[0])
        y32.append(y)
    # How far from a tie the unfolded float64 value can be when the two fp32 forwards straddle it: the unfolded fp32
    # output lies within its bound of that value, the folded one within every bound of the unfolded one (plus the
    # shift of the bias re-rounded to the folded accumulator grid, on int32-bias targets).
    shift = ((out[True, False] - out[False, False]) - (ref[True, False] - ref[False, False])).abs()
    band = 2 * bounds[0] + bounds[1] + fold_bound + shift
    j = int(diff.flatten().argmax())
    result = {"max_diff": float(diff.flatten()[j]), "at_value": float(ref[False, False].flatten()[j]),
              "fold_ratio": fold_ratio, "fold_diff_at_worst": float(diff.flatten()[i]), "fp32_ratio": max(fp32)}
    if downstream is not None:
        result.update(_ties_after(*downstream, y32, ref[True, False], band))
    return result


def _ties_after(quantizer, act: nn.Module | None, y32: list[torch.Tensor], ref: torch.Tensor,
                band: torch.Tensor) -> dict:
    """``downstream_ties`` for a quantizer that takes the layer's outputs (``y32``: before and after folding) as they
    are, or after the elementwise ``act``: then the band grows by its slope and by its own fp32 evaluation error
    (of the unfolded output, of the folded one, and of the float64 value's distance argument)."""
    if act is None:
        return downstream_ties(quantizer, *y32, ref, band)
    ref = act(ref)
    return downstream_ties(quantizer, act(y32[0]), act(y32[1]), ref,
                           _ACT_SLOPE[type(act)] * band + 3 * _ACT_ULPS * EPS32 * ref.abs())


def _layer_ratio(r: dict) -> float:
    return max(r["fold_ratio"], r["fp32_ratio"], r.get("tie_ratio", 0.0))


def _trace(model: nn.Module, wrapped: dict, pairs: dict, run: Callable[[], object],
           max_images: int) -> tuple[dict[str, torch.Tensor], dict[str, tuple[str, nn.Module | None]]]:
    """Run ``run()`` once with hooks; return each wrapped layer's input (its first ``max_images``, on the CPU)
    and, where one takes the layer's output, ``(quantizer name, activation or None)``: an enabled LSQQuantizer
    that takes the output as it is, or the encoding (``out``) of a QuantAct that applies only an elementwise
    activation of known slope to it first (``tensorrt``). None where the output goes on in float (``sim``: a SiLU
    whose output several convs quantize each their own way)."""
    mods = dict(model.named_modules())
    inputs: dict[str, torch.Tensor] = {}
    consumers: dict[str, tuple[str, nn.Module | None]] = {}
    last = {}  # the output of the folded layer that ran last (only it: the others' outputs may be freed)

    def record_output(n, y):
        last.clear()
        last.update(layer=n, y=y)

    def record_input(n, x):  # returns None: a pre-hook's return value would replace the layer's input
        if n not in inputs:
            inputs[n] = x[:max_images].detach().cpu()

    def record_consumer(found, x):  # the very tensor: nothing computed on it in between (an Identity passes it on)
        if last and x is last["y"]:
            consumers.setdefault(last["layer"], found)

    hooks = []
    for n, w in wrapped.items():
        hooks.append(w.register_forward_pre_hook(lambda m, a, n=n: record_input(n, a[0])))
        end = mods[pairs[n]] if n in pairs else w
        hooks.append(end.register_forward_hook(lambda m, a, y, n=n: record_output(n, y)))
    for qn, q in mods.items():
        if isinstance(q, LSQQuantizer) and q.enabled:
            found = (qn, None)
        elif isinstance(q, QuantAct) and q.pre is None and q.out is not None and q.out.enabled \
                and type(q.act) in _ACT_SLOPE:
            found = (f"{qn}.out", q.act)  # the module, not its name: Ultralytics shares one SiLU across blocks
        else:
            continue
        hooks.append(q.register_forward_pre_hook(lambda m, a, found=found: record_consumer(found, a[0])))
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return inputs, consumers


@torch.no_grad()
def fold_qc_checked(model: nn.Module, run: Callable[[], object],
                    bn_pairs: dict[str, str] | Callable[[nn.Module], dict[str, str]] | None = None,
                    max_images: int = 2) -> dict:
    """``fold_qc`` with every folded layer checked (``check_folded_layer``) on the input it sees
    during ``run()`` (e.g. ``lambda: model(images)``, BN in eval; the first ``max_images`` of the
    batch: a wrong fold shows at every position, and float64 convolutions are slow), and against
    the quantizer that takes its output, when one does. The check runs on CPU copies of the layers,
    whatever the model's device: float64 everywhere, no TF32.
    Returns the fold counts, the per-layer results (``layers``), the worst layer and ``ties`` (outputs
    that sat on a rounding tie of the next quantizer and took the other code; ``tie_layers``: in how
    many layers); raises ``FoldCheckError`` (one paragraph: which layer, by how much) after folding
    everything if a layer fails."""
    wrapped = qc_modules(model)
    pairs = (bn_pairs(model) if callable(bn_pairs) else bn_pairs) if bn_pairs is not None else default_bn_pairs(model)
    inputs, consumers = _trace(model, wrapped, pairs, run, max_images)

    def cpu(m):
        return copy.deepcopy(m).cpu() if m is not None else None

    def snapshot(n):  # (conv, qc, bn) of layer n as the model holds it now, copied to the CPU
        mods = dict(model.named_modules())
        w, bn = mods[n], mods[pairs[n]] if n in pairs else None
        conv, qc = (w.conv, w.qc) if isinstance(w, QCConv) else (w, None)
        return tuple(cpu(m) for m in (conv, qc, bn))

    before = {n: snapshot(n) for n in wrapped}
    quantizers = dict(model.named_modules())
    downstream = {n: (cpu(quantizers[q]), cpu(act)) for n, (q, act) in consumers.items()}
    counts = fold_qc(model, pairs)
    layers = {}
    # The CPU copies run the plain reference fake-quant (bit for bit what the fused kernels give): on a GPU
    # machine the CPU kernel would otherwise be compiled (40-165 s) just for this check.
    with fused_lsq.reference_only():
        for n, parts in before.items():
            if n in inputs:
                r = check_folded_layer(parts, snapshot(n), inputs[n], downstream.get(n))
                q, act = consumers.get(n, (None, None))
                layers[n] = {"into": "bn" if n in pairs else "conv", "downstream": q,
                             "through": type(act).__name__ if act is not None else None, **r}
    report = {**counts, "layers": layers, "unchecked": sorted(set(before) - set(layers)),
              "ties": sum(r.get("ties", 0) for r in layers.values()),
              "tie_layers": sum(r.get("ties", 0) > 0 for r in layers.values())}
    if layers:
        worst = max(layers, key=lambda n: _layer_ratio(layers[n]))
        report.update(worst_layer=worst, worst_ratio=_layer_ratio(layers[worst]))
        if not report["worst_ratio"] <= 1.0:
            raise FoldCheckError(_failure_message(layers, worst), worst, report["worst_ratio"], report)
    return report


def _failure_message(layers: dict, worst: str) -> str:
    r = layers[worst]
    where = "the BatchNorm after it" if r["into"] == "bn" else "the conv's output scale and bias"
    failing = sum(_layer_ratio(v) > 1 for v in layers.values())
    top = max(r["fold_ratio"], r["fp32_ratio"], r.get("tie_ratio", 0.0))
    if r["fold_ratio"] == top:
        what = (f"the folded layer's output differs from the unfolded one by up to {r['max_diff']:.3g} (at an output "
                f"of {r['at_value']:.4g}), {r['fold_ratio']:.3g} times the bound that rounding the folded parameters "
                f"to float32 allows there (eps32 x the magnitudes summed)")
    elif r["fp32_ratio"] == top:
        what = (f"its float32 forward differs from its float64 evaluation by {r['fp32_ratio']:.3g} times the "
                f"worst-case float32 summation bound, i.e. the module does not compute what its parameters say")
    else:
        what = (f"{r['ties']} outputs take another code of the quantizer after it ('{r['downstream']}') than before "
                f"folding, one of them {r['tie_ratio']:.3g} times farther from a rounding tie than the float32 "
                f"bounds allow")
    return (f"QC fold check failed at layer '{worst}' (correction folded into {where}): {what}; {failing} of "
            f"{len(layers)} folded layers fail. Rounding alone cannot do this: it is a bug in the folding code "
            f"(quant/qc.py, QuantConv2d.fold_affine) or a layer it does not handle.")
