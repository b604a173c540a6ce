"""Per-layer sensitivity of a quantized model: what lowering one conv alone costs, everything else as it is.

The model is quantized at the reference width and calibrated once (quant.convert). Lowering a conv to
(w_bits, a_bits) changes its two quantizers in place, their step sizes initialised as quantize_model and
calibrate would for that width (weights: ``weight_init`` on the weight; inputs: the MSE range search on a sample of
the layer's calibration inputs, kept from one pass), and puts them back afterwards: one calibration for all layers.

The proxy is the relative noise power that lowering adds to the model's outputs (on the same calibration batches),
against the reference model's outputs: NSR = sum (y - y_ref)^2 / sum (y_ref - mean y_ref)^2 per output group, averaged
over the groups (a model family says what its groups are: boxes, class scores, masks). Noise powers of independent
layers add up, so summed NSR is what an allocation under a budget minimises (quant/allocate.py).
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterable

import torch
from torch import nn

from .act import QuantOut
from .convert import quant_convs, set_quantizers_enabled
from .grid import qrange
from .qconv import QuantConv2d
from .range_init import flat_sample


def _flat_tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flat_tensors(o)]
    return []


def all_outputs(model: nn.Module, batch) -> list[torch.Tensor]:
    """Default output groups: every tensor the model returns, each its own group."""
    return [t.detach().float() for t in _flat_tensors(model(batch))]


@torch.no_grad()
def collect_inputs(model: nn.Module, batches: list, forward: Callable | None = None,
                   sample_per_layer: int = 1 << 18) -> dict[str, torch.Tensor]:
    """{conv name: flat sample of its float inputs} over ``batches``, observed as ``calibrate`` observes them
    (eval mode, weights quantized, activation quantizers off)."""
    forward = forward or (lambda m, b: m(b))
    samples: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for name, conv in quant_convs(model).items():
        samples[name] = []
        hooks.append(conv.register_forward_pre_hook(
            lambda mod, args, name=name: samples[name].append(flat_sample(args[0], sample_per_layer).cpu())))
    was_training = model.training
    model.eval()
    set_quantizers_enabled(model, False, weights=False)
    try:
        for b in batches:
            forward(model, b)
    finally:
        for h in hooks:
            h.remove()
        set_quantizers_enabled(model, True, weights=False)
        model.train(was_training)
    out = {}
    for name, parts in samples.items():
        if parts:
            s = torch.cat(parts)
            out[name] = s[torch.randperm(s.numel())[:sample_per_layer]] if s.numel() > sample_per_layer else s
    return out


def _state(q) -> tuple:
    """The grid and a copy of the quantizer's state dict (step, offset, initialised flag)."""
    return q.bits, q.qmin, q.qmax, {k: v.detach().clone() for k, v in q.state_dict().items()}


@torch.no_grad()
def _restore(q, state) -> None:
    q.bits, q.qmin, q.qmax, saved = state
    q.load_state_dict(saved)  # resizes a per-channel step and sets the initialised flag from the buffer


def _set_bits(q, bits: int) -> None:
    narrow = q.signed and q.qmin == -q.qmax  # targets with the narrow symmetric weight grid keep it
    q.bits = bits
    q.qmin, q.qmax = qrange(bits, q.signed)
    if narrow:
        q.qmin = -q.qmax


@contextlib.contextmanager
def lowered(conv: QuantConv2d, w_bits: int, a_bits: int, input_sample: torch.Tensor | None = None,
            weight_init: str = "mse"):
    """``conv`` at (w_bits, a_bits) inside the block, as it was afterwards. A conv that reads a shared encoding
    (``input_source``, deploy targets) of other bits quantizes its input itself meanwhile, as quantize_model leaves
    a conv whose bits differ from the encoding's. Activation steps need ``input_sample`` (``collect_inputs``).
    Weights wider than 8 bits (``quant.costs.FLOAT``) keep the conv in float, as a recipe's ``exclude`` does: both
    of its quantizers off (a shared encoding of its input stays: it belongs to the layer that makes the tensor)."""
    wq, aq = conv.weight_quantizer, conv.input_quantizer
    w_state, a_state = _state(wq), _state(aq)
    enabled = wq.enabled, aq.enabled
    source = conv.__dict__.get("input_source")
    try:
        if w_bits > 8:
            wq.enabled = aq.enabled = False
            yield conv
            return
        if w_bits != wq.bits:
            _set_bits(wq, w_bits)
            wq.init_from_weight(conv.weight.detach(), weight_init)
        if a_bits != aq.bits:
            if input_sample is None:
                raise ValueError(f"lowered: activation bits of {aq.name or 'this conv'} change to {a_bits}, which "
                                 f"needs a sample of its calibration inputs (quant.sensitivity.collect_inputs)")
            _set_bits(aq, a_bits)
            aq.init_from_samples(input_sample)
            if source is not None and (source.bits, source.signed) != (aq.bits, aq.signed):
                conv.__dict__["input_source"] = None
        yield conv
    finally:
        _restore(wq, w_state)
        _restore(aq, a_state)
        wq.enabled, aq.enabled = enabled
        if source is not None:
            conv.__dict__["input_source"] = source


def recipe_names(model: nn.Module) -> dict[str, str]:
    """{quantized conv's module name: the name a recipe gives it}. Deploy targets wrap a head's final conv in a
    ``QuantOut`` (its output quantizer), which moves the conv to ``<name>.conv``; recipes (``overrides``,
    ``exclude``) name the conv of the FP model, i.e. the wrapper's place."""
    wrapped = {n for n, m in model.named_modules() if isinstance(m, QuantOut)}
    return {n: (n.rpartition(".")[0] if n.rpartition(".")[0] in wrapped and n.endswith(".conv") else n)
            for n in quant_convs(model)}


def nsr(out: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    """Mean over output groups of sum (out - ref)^2 / sum (ref - mean ref)^2 (0: identical)."""
    vals = []
    for o, r in zip(out, ref):
        var = (r - r.mean()).pow(2).sum().item()
        err = (o - r).pow(2).sum().item()
        vals.append(err / var if var > 0 else (0.0 if err == 0 else math.inf))
    return sum(vals) / len(vals) if vals else 0.0


def sqnr_db(noise: float) -> float:
    """The NSR as a signal-to-quantization-noise ratio in dB (inf for no noise)."""
    return math.inf if noise <= 0 else -10 * math.log10(noise)


@torch.no_grad()
def reference_outputs(model: nn.Module, batches: list, outputs: Callable = all_outputs) -> list[list[torch.Tensor]]:
    was_training = model.training
    model.eval()
    try:
        return [outputs(model, b) for b in batches]
    finally:
        model.train(was_training)


@torch.no_grad()
def layer_sensitivity(model: nn.Module, widths: dict[str, Iterable[tuple[int, int]]], batches: list,
                      samples: dict[str, torch.Tensor] | None = None, outputs: Callable = all_outputs,
                      weight_init: str = "mse", reference: list | None = None,
                      progress: Callable[[int, int, str], None] | None = None,
                      noise: Callable[[list, list], float] | None = None) -> dict[str, dict[tuple[int, int], float]]:
    """{conv name: {(w_bits, a_bits): NSR of the model's outputs with that conv alone lowered}} for the widths
    asked per conv (its current width gives 0 without a run). ``batches`` are the model's inputs (the calibration
    batches); ``samples`` the convs' calibration inputs (needed where activation bits change); ``noise(out, ref)``
    the proxy of one batch's outputs against the reference's (default ``nsr`` of the output groups; a dict of floats
    gives several proxies from one forward, averaged per key)."""
    noise = noise or nsr
    convs = quant_convs(model)
    missing = sorted(set(widths) - set(convs))
    if missing:
        raise ValueError(f"layer_sensitivity: {missing[:5]} are not quantized convs of the model")
    ref = reference if reference is not None else reference_outputs(model, batches, outputs)
    was_training = model.training
    model.eval()
    result: dict[str, dict[tuple[int, int], float]] = {}
    todo = sum(len(list(w)) for w in widths.values())
    done = 0
    try:
        for name, ws in widths.items():
            conv = convs[name]
            result[name] = {}
            for w, a in ws:
                done += 1
                if (w, a) == (conv.w_bits, conv.a_bits):
                    result[name][(w, a)] = None
                    continue
                with lowered(conv, w, a, (samples or {}).get(name), weight_init):
                    errs = [noise(outputs(model, b), r) for b, r in zip(batches, ref)]
                result[name][(w, a)] = _mean(errs)
                if progress is not None:
                    progress(done, todo, name)
    finally:
        model.train(was_training)
    zero = _mean([noise(r, r) for r in ref[:1]])  # the proxy's value for no change, in its own form
    for per in result.values():
        for w, v in per.items():
            if v is None:
                per[w] = zero
    return result


def _mean(vals: list):
    """Mean of floats, or per key of dicts of floats (a ``noise`` function may return several proxies at once)."""
    if isinstance(vals[0], dict):
        return {k: sum(v[k] for v in vals) / len(vals) for k in vals[0]}
    return sum(vals) / len(vals)


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); nan when either side is constant."""
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"spearman: need two sequences of the same length >= 2, got {len(x)} and {len(y)}")
    rx, ry = ranks(list(x)), ranks(list(y))
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx, vy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return cov / math.sqrt(vx * vy) if vx > 0 and vy > 0 else math.nan
