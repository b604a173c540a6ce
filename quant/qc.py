"""QC, quantization correction (Gupta & Asthana 2024, section 4 of METHOD.md), in pure PyTorch.

After QAT, a learnable affine ``y' = gamma * y + beta`` is put on the output of every quantized
conv (its pre-activation, before BN) and is the only thing trained for one short epoch; then it
folds away: into the BatchNorm that follows the conv, or into the conv's own per-channel output
scale and bias when there is no BN. The integer weights never change.

The correction lives in a wrapper module (``QCConv``) that replaces the conv in its parent, so it
is visible in ``print(model)``, pickles with the model, and leaves no hook behind once folded.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .convert import _set_module, quant_convs
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
        _set_module(model, name, QCConv(conv, qc))
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
        conv, bn = getattr(m, "_modules", {}).get("conv"), getattr(m, "_modules", {}).get("bn")
        if isinstance(conv, QCConv) and isinstance(bn, _BatchNorm):
            prefix = f"{name}." if name else ""
            pairs[f"{prefix}conv"] = f"{prefix}bn"
    return pairs


@torch.no_grad()
def fold_into_bn(bn: _BatchNorm, gamma: torch.Tensor, beta: torch.Tensor) -> None:
    """Fold ``y -> gamma*y + beta`` into the eval-mode BN that follows it, exactly.

    BN(y') = k*(gamma*y + beta - mu) + b with k = w / sqrt(var + eps). Keeping mu and var (so a
    later re-estimation still sees sane statistics) this is BN with weight w*gamma and bias
    b + k*(beta + (gamma - 1)*mu): no division by gamma, so any gamma folds stably.
    """
    if not bn.affine or not bn.track_running_stats:
        raise ValueError("fold_qc: folding into BatchNorm needs affine=True and running statistics")
    c = bn.num_features
    gamma = gamma.detach().float().reshape(-1).expand(c).to(bn.weight.device)
    beta = beta.detach().float().reshape(-1).expand(c).to(bn.weight.device)
    mu = bn.running_mean.float()
    k = bn.weight.float() / (bn.running_var.float() + bn.eps).sqrt()
    new_bias = bn.bias.float() + k * (beta + (gamma - 1) * mu)
    bn.weight.copy_(bn.weight.float() * gamma)
    bn.bias.copy_(new_bias)


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
        _set_module(model, name, w.conv)
    return counts
