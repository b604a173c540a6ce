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
from .convert import quant_convs, replace_module
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
EPS32 = torch.finfo(torch.float32).eps
EPS64 = torch.finfo(torch.float64).eps
_EXTRA_OPS = 8  # operations after the K-term sum: output scale, bias, QC scale and shift, BN's four


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
    """The fp32 quantized input and weight the conv computes itself (folding changes neither)."""
    return conv.input_quantizer(x.float()).detach(), conv.weight_quantizer(conv.weight.float()).detach()


def layer_output_f64(conv: QuantConv2d, qc: QCAffine | None, bn: _BatchNorm | None, x: torch.Tensor,
                     magnitude: bool = False, conv_out: torch.Tensor | None = None) -> torch.Tensor:
    """``bn(qc(conv(x)))`` (BN in eval) in float64 from the layers' fp32 parameters, on the fp32
    quantized input and weight the conv computes itself. ``magnitude=True``: the same expression
    with every term replaced by its absolute value (subtractions become additions), the sum of
    magnitudes that bounds the rounding error of any evaluation of it. ``conv_out``: the float64
    convolution (of the magnitudes, with ``magnitude``), when already computed."""
    f = torch.abs if magnitude else (lambda t: t)

    def ch(t):  # a per-channel (or per-tensor) parameter, broadcast over N, H, W
        return f(t.detach().double()).reshape(1, -1, 1, 1)

    if conv_out is None:
        xq, wq = _quantized_operands(conv, x)
        conv_out = conv.convolve(f(xq.double()), f(wq.double()))
    y = conv_out
    if conv.out_scale is not None:
        y = y * ch(conv.out_scale)
    if conv.bias is not None:
        y = y + ch(conv.bias)
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


@torch.no_grad()
def check_folded_layer(before: tuple, after: tuple, x: torch.Tensor) -> dict:
    """Compare one layer before folding (``(conv, qc, bn)``) and after (``(conv, None, bn)``) on
    its input ``x``. Returns the largest difference (``max_diff``), the output value there
    (``at_value``) and two ratios that pass at <= 1: ``fold_ratio`` (float64 difference over the
    fold's rounding bound) and ``fp32_ratio`` (fp32 forwards against their float64 evaluation,
    over the fp32 summation bound)."""
    k = _fan_in(before[0])
    (xb, wb), (xa, wa) = _quantized_operands(before[0], x), _quantized_operands(after[0], x)
    shared = {}
    if torch.equal(xb, xa) and torch.equal(wb, wa):  # as folding must leave them: one float64 conv for both
        shared = {m: before[0].convolve(xb.double().abs() if m else xb.double(),
                                        wb.double().abs() if m else wb.double()) for m in (False, True)}
    ref, mag_ref = (layer_output_f64(*before, x, m, shared.get(m)) for m in (False, True))
    out, mag_out = (layer_output_f64(*after, x, m, shared.get(m)) for m in (False, True))
    diff = (out - ref).abs()
    fold_ratio, i = _max_ratio(diff, EPS32 * mag_out + (k + _EXTRA_OPS) * EPS64 * (mag_out + mag_ref))
    fp32 = [_max_ratio((_chain(*mods)(x.float()).double() - y).abs(), (k + _EXTRA_OPS) * EPS32 * m)[0]
            for mods, y, m in ((before, ref, mag_ref), (after, out, mag_out))]
    j = int(diff.flatten().argmax())
    return {"max_diff": float(diff.flatten()[j]), "at_value": float(ref.flatten()[j]), "fold_ratio": fold_ratio,
            "fold_diff_at_worst": float(diff.flatten()[i]), "fp32_ratio": max(fp32)}


@torch.no_grad()
def fold_qc_checked(model: nn.Module, run: Callable[[], object],
                    bn_pairs: dict[str, str] | Callable[[nn.Module], dict[str, str]] | None = None,
                    max_images: int = 2) -> dict:
    """``fold_qc`` with every folded layer checked (``check_folded_layer``) on the input it sees
    during ``run()`` (e.g. ``lambda: model(images)``, BN in eval; the first ``max_images`` of the
    batch: a wrong fold shows at every position, and float64 convolutions are slow). The check runs
    on CPU copies of the layers, whatever the model's device: float64 everywhere, no TF32.
    Returns the fold counts, the per-layer results (``layers``) and the worst layer; raises
    ``FoldCheckError`` (one paragraph: which layer, by how much) after folding everything if a
    layer fails."""
    wrapped = qc_modules(model)
    pairs = (bn_pairs(model) if callable(bn_pairs) else bn_pairs) if bn_pairs is not None else default_bn_pairs(model)
    inputs: dict[str, torch.Tensor] = {}
    hooks = [w.register_forward_pre_hook(lambda m, a, n=n: inputs.__setitem__(n, a[0][:max_images].detach().cpu()))
             for n, w in wrapped.items()]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()

    def snapshot(n):  # (conv, qc, bn) of layer n as the model holds it now, copied to the CPU
        mods = dict(model.named_modules())
        w, bn = mods[n], mods[pairs[n]] if n in pairs else None
        conv, qc = (w.conv, w.qc) if isinstance(w, QCConv) else (w, None)
        return tuple(copy.deepcopy(m).cpu() if m is not None else None for m in (conv, qc, bn))

    before = {n: snapshot(n) for n in wrapped}
    counts = fold_qc(model, pairs)
    layers = {}
    # The CPU copies run the plain reference fake-quant (bit for bit what the fused kernels give): on a GPU
    # machine the CPU kernel would otherwise be compiled (40-165 s) just for this check.
    with fused_lsq.reference_only():
        for n, parts in before.items():
            if n in inputs:
                layers[n] = {"into": "bn" if n in pairs else "conv",
                             **check_folded_layer(parts, snapshot(n), inputs[n])}
    report = {**counts, "layers": layers, "unchecked": sorted(set(before) - set(layers))}
    if layers:
        worst = max(layers, key=lambda n: max(layers[n]["fold_ratio"], layers[n]["fp32_ratio"]))
        report.update(worst_layer=worst, worst_ratio=max(layers[worst]["fold_ratio"], layers[worst]["fp32_ratio"]))
        if not report["worst_ratio"] <= 1.0:
            raise FoldCheckError(_failure_message(layers, worst), worst, report["worst_ratio"], report)
    return report


def _failure_message(layers: dict, worst: str) -> str:
    r = layers[worst]
    where = "the BatchNorm after it" if r["into"] == "bn" else "the conv's output scale and bias"
    failing = sum(max(v["fold_ratio"], v["fp32_ratio"]) > 1 for v in layers.values())
    if r["fold_ratio"] >= r["fp32_ratio"]:
        what = (f"the folded layer's output differs from the unfolded one by up to {r['max_diff']:.3g} (at an output "
                f"of {r['at_value']:.4g}), {r['fold_ratio']:.3g} times the bound that rounding the folded parameters "
                f"to float32 allows there (eps32 x the magnitudes summed)")
    else:
        what = (f"its float32 forward differs from its float64 evaluation by {r['fp32_ratio']:.3g} times the "
                f"worst-case float32 summation bound, i.e. the module does not compute what its parameters say")
    return (f"QC fold check failed at layer '{worst}' (correction folded into {where}): {what}; {failing} of "
            f"{len(layers)} folded layers fail. Rounding alone cannot do this: it is a bug in the folding code "
            f"(quant/qc.py, QuantConv2d.fold_affine) or a layer it does not handle.")
