"""quantize_model: swap nn.Conv2d for QuantConv2d by a recipe; calibration of activations."""
from __future__ import annotations

import importlib
import itertools
from typing import Callable, Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .act import QuantAct, QuantOut, encoding_quantizers, fixed_quantizers, output_quantizers
from .batches import run_batches
from .bn_reestimate import reestimate_bn
from .lsq import LSQQuantizer
from .qconv import QuantConv2d
from .range_init import flat_sample
from .recipe import QuantRecipe
from .targets import Target, get_target

# A policy tells, for one family of models, which convs are "first" / "last" (kept at
# first_last_bits) and which must never be quantized. Model packages register theirs; quant/
# itself knows no model family. Signature: policy(model) -> dict(first=[...], last=[...],
# never=[...]) of module names, or None when the model is not of its family.
_POLICIES: list[Callable[[nn.Module], dict | None]] = []

# A policy registered by importing its package is skipped by a user who imported quant alone
# (Ultralytics' DFL conv got quantized, the head stayed at 4 bits). So the packages that register
# policies are also named here, by the module prefix of the model classes they handle, and
# imported on demand: only names, so quant/ imports no model library, and only for a model whose
# class (or a base class: user subclasses count) comes from that library.
POLICY_PROVIDERS: dict[str, str] = {"ultralytics.": "yolo_qat.models.policy"}


def register_policy(policy: Callable[[nn.Module], dict | None]) -> Callable:
    if policy not in _POLICIES:
        _POLICIES.insert(0, policy)
    return policy


def default_policy(model: nn.Module) -> dict:
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    return {"first": convs[:1], "last": convs[-1:], "never": []}


def _registered_roles(model: nn.Module) -> dict | None:
    for policy in _POLICIES:
        roles = policy(model)
        if roles is not None:
            return roles
    return None


def _import_providers(model: nn.Module) -> bool:
    """Import the policy packages named for the model's class hierarchy; True if any was imported."""
    wanted = [mod for cls in type(model).__mro__ for prefix, mod in POLICY_PROVIDERS.items()
              if cls.__module__.startswith(prefix)]
    imported = False
    for mod in dict.fromkeys(wanted):
        try:
            importlib.import_module(mod)
            imported = True
        except ModuleNotFoundError as e:
            # The provider package is not importable here (quant/ used without it): the fixed-
            # operator check in quantize_model still stands guard. A missing dependency *inside*
            # the provider is a real error and propagates.
            if e.name is None or not (mod == e.name or mod.startswith(e.name + ".")):
                raise
    return imported


def policy_roles(model: nn.Module) -> dict | None:
    """Layer roles from the first policy that claims the model (registered, or registered by a
    provider imported now for the model's class), or None when none does."""
    roles = _registered_roles(model)
    if roles is None and _import_providers(model):
        roles = _registered_roles(model)
    return roles


def layer_roles(model: nn.Module) -> dict:
    return policy_roles(model) or default_policy(model)


def fixed_operators(model: nn.Module) -> dict[str, str]:
    """{conv name: why} for convs that look like fixed operators rather than learned layers: those
    inside a module of class DFL (YOLO's distribution-focal-loss integral), and convs whose weight
    is frozen while other convs' weights train. A model loaded from a checkpoint often has every
    parameter frozen, so frozen-ness counts only when it sets a conv apart."""
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    found = {}
    for name, m in model.named_modules():
        if type(m).__name__ == "DFL":
            found.update({f"{name}.{n}" if n else name: "inside a DFL module"
                          for n, c in m.named_modules() if isinstance(c, nn.Conv2d)})
    trains = [n for n, c in convs.items() if c.weight.requires_grad]
    if trains:
        found.update({n: "weight frozen (requires_grad=False) while other convs train"
                      for n, c in convs.items() if not c.weight.requires_grad and n not in found})
    return found


def _refuse_fixed_operators(model: nn.Module, exclude) -> None:
    fixed = {n: why for n, why in fixed_operators(model).items() if n not in set(exclude)}
    if not fixed:
        return
    shown = "; ".join(f"{n} ({why})" for n, why in list(fixed.items())[:5]) + ("; ..." if len(fixed) > 5 else "")
    raise ValueError(
        f"quantize_model: no layer policy claims this {type(model).__name__}, and it holds fixed operator(s) that "
        f"must not be quantized: {shown}. Without a policy they would be quantized and the first/last layers guessed. "
        f"Pass the policy of its model family (policy=...), or import the package that registers it (for "
        f"Ultralytics YOLO models this repo's 'models'; pass the YOLO object's .model, not the YOLO wrapper), or "
        f"list these convs in the recipe's 'exclude', or pass policy=quant.default_policy to quantize them anyway")


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` in place of the submodule called ``name`` (dotted, as ``named_modules`` gives it)."""
    parent_name, _, child = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name)
    except AttributeError:
        parent = None
    if not child or not isinstance(getattr(parent, child, None), nn.Module):
        sample = ", ".join([n for n, _ in model.named_modules() if n][:5])
        raise ValueError(f"replace_module: {type(model).__name__} has no submodule {name!r} to replace: allowed "
                         f"values are the dotted names of model.named_modules() (e.g. {sample}, ...), not the "
                         f"model itself ('')")
    setattr(parent, child, new)


def quantize_model(model: nn.Module, recipe: QuantRecipe | dict, policy: Callable | None = None,
                   finalize: bool = True) -> nn.Module:
    """Replace every nn.Conv2d by a QuantConv2d (in place; the model is returned).

    Layer roles come from ``policy``, else from the policy that claims the model (registered, or
    imported now through ``POLICY_PROVIDERS``); a model no policy claims gets ``default_policy``,
    unless it holds fixed operators (``fixed_operators``) not in the recipe's ``exclude``: then
    ValueError. A policy may also provide ``finalize(model)`` (e.g. to make the model's own
    ``fuse()`` quantization-aware).
    The report of what was done is ``layer_bits(model)``; the recipe is kept as
    ``model.quant_recipe`` (a plain dict) so that checkpoints carry it.
    """
    recipe = QuantRecipe.from_any(recipe)
    roles = policy(model) if policy is not None else policy_roles(model)
    if roles is None:
        _refuse_fixed_operators(model, recipe.exclude)
        roles = default_policy(model)
    convs = {n: m for n, m in model.named_modules() if type(m) is nn.Conv2d}
    if not convs and not any(isinstance(m, QuantConv2d) for m in model.modules()):
        raise ValueError("quantize_model: the model has no nn.Conv2d to quantize")
    all_names = {n for n, _ in model.named_modules()}
    for field_name, names in (("overrides", recipe.overrides), ("exclude", recipe.exclude)):
        missing = [n for n in names if n not in all_names]
        if missing:
            sample = ", ".join(sorted(convs)[:5])
            raise ValueError(f"recipe field '{field_name}' names layer(s) {missing} that do not exist in "
                             f"the model: allowed values are names of its Conv2d modules (e.g. {sample}, ...)")
    first_last = set(roles["first"]) | set(roles["last"])
    skip = set(roles["never"]) | set(recipe.exclude)
    act_signed = recipe.act_mode == "signed"
    act_offset = recipe.act_mode == "lsq+"
    for name, conv in convs.items():
        if name in skip:
            continue
        w_bits = a_bits = None
        if name in first_last and recipe.first_last_bits is not None:
            w_bits = a_bits = recipe.first_last_bits
        o = recipe.overrides.get(name, {})
        w_bits = o.get("w_bits", w_bits or recipe.w_bits)
        a_bits = o.get("a_bits", a_bits or recipe.a_bits)
        q = QuantConv2d.from_conv(conv, w_bits, a_bits, recipe.per_channel, act_signed, act_offset,
                                  recipe.weight_init)
        q.train(conv.training)
        replace_module(model, name, q)
    model.quant_recipe = recipe.to_dict()
    apply_target(model, get_target(recipe.target), roles.get("sites"), recipe.weight_init)
    name_quantizers(model)
    fin = roles.get("finalize")
    if finalize and fin is not None:
        fin(model)
    return model


def apply_target(model: nn.Module, target: Target, sites: Callable | None = None, weight_init: str = "mse") -> int:
    """Add the quantizers ``target`` puts beyond conv inputs (quant/act.py): integer zero points on every
    activation quantizer, an output quantizer on every quantized conv (in its block's activation when it
    has one, else around the conv), and where the target encodes block outputs, the encoding of each block's
    output, of the model's residual sums and, for ``encode_concats``, Concat outputs (``sites(model, bits, signed,
    concats)``, the model family's policy, which returns a function running the model once) and shared encodings
    (``share_encodings``). Weights go on the narrow grid where the target takes them (their step sizes initialised
    again by ``weight_init``). Returns the number of activation wrappers added (QuantAct, QuantOut)."""
    n = 0
    signed = target.symmetric_activations
    if target.output_bits is not None or target.encode_outputs:
        blocks = {id(m.conv): m for m in model.modules()
                  if isinstance(getattr(m, "conv", None), QuantConv2d) and isinstance(getattr(m, "act", None), nn.Module)
                  and not isinstance(m, QuantOut)}
        for name, conv in list(quant_convs(model).items()):
            if not conv.input_quantizer.enabled:
                continue
            block = blocks.get(id(conv))
            if block is not None:
                if not isinstance(block.act, QuantAct):
                    block.act = QuantAct(block.act, target.output_bits, target.encode_bits, signed).to(conv.weight.device)
                    n += 1
            elif target.output_bits is not None and not isinstance(_parent(model, name), QuantOut):
                replace_module(model, name, QuantOut(conv, target.output_bits).to(conv.weight.device))
                n += 1
        if target.encode_outputs and sites is not None:
            run = sites(model, target.encode_bits, signed, target.encode_concats)
            share_encodings(model, run)
    if target.integer_zero_point:
        for q in list(activation_quantizers(model).values()) + list(output_quantizers(model).values()):
            q.integer_zero_point = True
    if target.int32_bias:
        for conv in quant_convs(model).values():
            conv.int32_bias = True
    if target.narrow_weights:
        for conv in quant_convs(model).values():
            wq = conv.weight_quantizer
            if wq.qmin != -wq.qmax:
                wq.qmin = -wq.qmax
                wq.init_from_weight(conv.weight.detach(), weight_init)
    return n


def name_quantizers(model: nn.Module) -> None:
    """Give every LSQQuantizer its dotted name in ``model`` (``name``), for the messages that must say which
    layer (an uncalibrated activation quantizer in training: quant/lsq.py)."""
    for n, m in model.named_modules():
        if isinstance(m, LSQQuantizer):
            m.name = n


def _parent(model: nn.Module, name: str) -> nn.Module | None:
    return model.get_submodule(name.rpartition(".")[0]) if "." in name else model


def quant_convs(model: nn.Module) -> dict[str, QuantConv2d]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantConv2d)}


def layer_bits(model: nn.Module) -> dict[str, tuple[int, int]]:
    """{module_name: (w_bits, a_bits)} for every quantized conv."""
    return {n: (m.w_bits, m.a_bits) for n, m in quant_convs(model).items()}


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QuantConv2d) for m in model.modules())


def activation_quantizers(model: nn.Module) -> dict[str, LSQQuantizer]:
    return {n: m.input_quantizer for n, m in quant_convs(model).items()}


def weight_quantizers(model: nn.Module) -> dict[str, LSQQuantizer]:
    return {n: m.weight_quantizer for n, m in quant_convs(model).items()}


def set_quantizers_enabled(model: nn.Module, enabled: bool, weights: bool = True, activations: bool = True) -> None:
    for m in quant_convs(model).values():
        if weights:
            m.weight_quantizer.enabled = enabled
        if activations:
            m.input_quantizer.enabled = enabled
    if activations:  # the target's conv-output and sigmoid quantizers are activation quantizers too
        for q in list(output_quantizers(model).values()) + fixed_quantizers(model):
            q.enabled = enabled


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable, num_batches: int = 8,
              forward: Callable | None = None, sample_per_layer: int = 1 << 18) -> int:
    """Initialise every activation quantizer from ``num_batches`` batches.

    Activations are observed with activation quantization off (weights quantized), a random
    sample of each layer's inputs is kept, then each quantizer gets the LSQ+ offset at the minimum
    and the MSE-optimal step. ``forward(model, batch)`` runs one batch (default: ``model(batch)``).
    A model whose BatchNorms all hold their initial statistics (built from a yaml, never trained) gets BN
    statistics estimated on the same batches first. Returns the number of batches used.
    """
    aq = activation_quantizers(model)
    if not aq:
        raise ValueError("calibrate: the model has no quantized conv (call quantize_model first)")
    name_quantizers(model)  # models quantized before quantizers had names, or moved into a wrapper
    samples: dict[str, list[torch.Tensor]] = {n: [] for n in aq}
    hooks = []
    # The target's conv-output quantizers (quant/act.py) are observed on their own inputs.
    observed = {name: m for name, m in quant_convs(model).items()}
    for name, q in output_quantizers(model).items():
        aq[name], samples[name], observed[name] = q, [], q
    for name, m in observed.items():
        def hook(mod, args, name=name):
            samples[name].append(flat_sample(args[0], sample_per_layer).cpu())
        hooks.append(m.register_forward_pre_hook(hook))
    if _bn_never_trained(model):
        # BN at its initial statistics (a model built from its yaml): in eval mode every layer would shrink its
        # input (running var 1 instead of the real one), deep activations would calibrate to the step floor.
        # Estimate the statistics the first training steps would (quantizers off, as the FP model) first.
        batches = list(itertools.islice(iter(batches), num_batches))
        set_quantizers_enabled(model, False)
        try:
            reestimate_bn(model, batches, num_batches, forward)
        finally:
            set_quantizers_enabled(model, True)
    was_training = model.training
    model.eval()
    set_quantizers_enabled(model, False, weights=False)
    used = 0
    try:
        used = run_batches(model, batches, num_batches, forward)
    finally:
        for h in hooks:
            h.remove()
        set_quantizers_enabled(model, True, weights=False)
        model.train(was_training)
    if used == 0:
        raise ValueError("calibrate: no batches were given")
    for name, q in aq.items():
        if not samples[name]:
            continue  # a layer the forward never reached (e.g. an unused branch)
        s = torch.cat(samples[name])
        if s.numel() > sample_per_layer:
            s = s[torch.randperm(s.numel())[:sample_per_layer]]
        q.init_from_samples(s)
    return used


def _bn_never_trained(model: nn.Module) -> bool:
    """Every BatchNorm with running statistics still holds their initial values (mean 0, var 1)."""
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    return bool(bns) and all(not m.running_mean.any() and bool((m.running_var == 1).all()) for m in bns)


@torch.no_grad()
def share_encodings(model: nn.Module, run: Callable[[nn.Module], object]) -> int:
    """Convs whose input is a tensor some encoding quantizer produced (or a view of one: a C2f split), on a
    grid of the same bits and kind, take it as it is (``QuantConv2d.input_source``): one encoding per
    tensor, so the runtime sees DQ(tensor) -> Conv with nothing to requantize. Found by running the model
    once (``run(model)``) with quantization off. Returns the number of convs that now share."""
    produced: dict[int, LSQQuantizer] = {}
    takes: dict[str, LSQQuantizer] = {}
    hooks = [q.register_forward_hook(lambda q, a, y: produced.__setitem__(id(y), (q, y))) for q in encoding_quantizers(model)]

    def pre(conv, args, name):
        x = args[0]
        view = id(x) not in produced and x._base is not None
        hit = produced.get(id(x._base) if view else id(x))
        q = conv.input_quantizer
        if hit is not None and name in enabled and (hit[0].bits, hit[0].signed) == (q.bits, q.signed):
            takes[name] = hit[0], view

    convs = quant_convs(model)
    enabled = {n for n, c in convs.items() if c.input_quantizer.enabled}  # before the trace switches them off
    hooks += [c.register_forward_pre_hook(lambda c, a, n=n: pre(c, a, n)) for n, c in convs.items()]
    was_training = model.training
    set_quantizers_enabled(model, False)
    try:
        model.eval()
        run(model)
    finally:
        for h in hooks:
            h.remove()
        set_quantizers_enabled(model, True)
        model.train(was_training)
    for name, (src, view) in takes.items():
        convs[name].share_input(src, view)
    return len(takes)
