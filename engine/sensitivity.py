"""Mixed precision for YOLO: per-layer sensitivity of an FP checkpoint, bit allocation under a budget on a deploy
target, the recipe ``train_qat.py --config`` takes (mixed_precision.py is the command line).

The model-agnostic parts are quant/sensitivity.py (the proxy), quant/costs.py (what a width costs per target) and
quant/allocate.py (the exact multiple-choice knapsack). Here: the calibration batches from the dataset, the output
groups of a YOLO head, the mAP check of the proxy and the recipe file.
"""
from __future__ import annotations

import itertools
import json
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml
from torch import nn

from yolo_qat.engine.calib import calibration_loader, ensure_loss_args, preprocess
from yolo_qat.engine.validate import load_model, validate
from yolo_qat.models.facts import model_task, trained_imgsz
from yolo_qat.quant import QuantRecipe, calibrate, is_quantized, quant_convs, quantize_model
from yolo_qat.quant.allocate import Allocation, allocate
from yolo_qat.quant.costs import (COSTS, FLOAT, LayerGeometry, get_costs, is_float, option_cost, pays,
                                  weight_cost)
from yolo_qat.quant.recipe import BIT_CHOICES, dataclass_from
from yolo_qat.quant.sensitivity import (collect_inputs, layer_sensitivity, lowered, nsr, recipe_names,
                                        reference_outputs, spearman, sqnr_db)

PROXIES = ("loss", "noise")
RECIPE_FIELDS = ("per_channel", "act_mode", "weight_init", "exclude", "target")


def _setting(default, help: str):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class MixedPrecisionConfig:
    """The settings of mixed_precision.py beyond the recipe's (its flags and --config keys are generated from these)."""

    w_bits_choices: list = _setting([8, 4, 3], "candidate weight widths; the widest is the reference every other "
                                               "layer stays at while one layer is lowered")
    a_bits_choices: list = _setting([8, 4], "candidate activation widths (those below --a-bits-min are dropped)")
    keep_float: bool = _setting(False, "also offer keeping a conv in float (the recipe's exclude; FP16 on npu and "
                                       "tensorrt, FP32 on ort and sim): where 8 bits cost a layer most")
    a_bits_min: int | None = _setting(None, "activation floor: no layer's input goes below it (default: the "
                                            "narrowest the target convolves, quant/costs.py: npu and tensorrt 8)")
    budget_bytes: float | None = _setting(None, "budget: weight bytes of the quantized convs (--cost accounting)")
    budget_bits: float | None = _setting(None, "budget: average weight bits of the quantized convs (--cost accounting)")
    budget_bitops: float | None = _setting(None, "budget: bit-ops per image at --imgsz (MACs x runtime weight bits x "
                                                 "runtime activation bits)")
    cost: str = _setting("runtime", "weight accounting of --budget-bytes / --budget-bits: runtime (what the target's "
                                    "runtime holds: ort and tensorrt keep <= 4-bit weights in int8), onnx (the "
                                    "exported file) or packed (export.py --format packed)")
    proxy: str = _setting("loss", "sensitivity of a lowered layer: loss (increase of the model's training loss on the "
                                  "calibration batches, labels included) or noise (relative noise power added to the "
                                  "head's outputs: boxes relative to their size, scores, masks); both are measured")
    calib_images: int = _setting(64, "training images for calibration and the proxy")
    calib_batches: int = _setting(4, "batches that calibrate the model and measure the proxy")
    validate_layers: int = _setting(0, "check the proxy against mAP on this many layers (spread over the proxy's "
                                       "ranking, each lowered alone to its narrowest width): Spearman correlation")
    max_states: int = _setting(20000, "budget states of the allocation's dynamic programme (exact when the costs' "
                                      "common divisor leaves at most this many)")
    seed: int = _setting(0, "chooses the calibration images and seeds the random sample of activations calibration "
                            "ranges come from")

    def __post_init__(self):
        for name in ("w_bits_choices", "a_bits_choices"):
            try:
                vals = sorted({int(v) for v in getattr(self, name)}, reverse=True)
            except (TypeError, ValueError):
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: allowed values are integers "
                                 f"{BIT_CHOICES[0]}..{BIT_CHOICES[-1]}") from None
            if not vals or not set(vals) <= set(BIT_CHOICES):
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: give one or more of the integers "
                                 f"{BIT_CHOICES[0]}..{BIT_CHOICES[-1]}")
            setattr(self, name, vals)
        given = [k for k in ("budget_bytes", "budget_bits", "budget_bitops") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"{' and '.join(given)} are both set: give one budget")
        for k in given:
            if not getattr(self, k) > 0:
                raise ValueError(f"{k}={getattr(self, k)!r} is invalid: allowed values are > 0")
        if self.proxy not in PROXIES:
            raise ValueError(f"proxy={self.proxy!r} is invalid: allowed values are {PROXIES}")
        if self.cost not in ("runtime", "onnx", "packed"):
            raise ValueError(f"cost={self.cost!r} is invalid: allowed values are ('runtime', 'onnx', 'packed')")
        if self.calib_batches < 1 or self.calib_images < 1:
            raise ValueError("calib_batches and calib_images must be >= 1")
        if self.validate_layers < 0 or self.max_states < 1:
            raise ValueError("validate_layers must be >= 0 and max_states >= 1")

    @property
    def budget(self) -> tuple[str, float] | None:
        for unit in ("bytes", "bits", "bitops"):
            v = getattr(self, f"budget_{unit}")
            if v is not None:
                return unit, float(v)
        return None

    @property
    def measure(self) -> str:
        b = self.budget
        return "bitops" if b is not None and b[0] == "bitops" else self.cost

    @classmethod
    def from_any(cls, cfg) -> "MixedPrecisionConfig":
        return dataclass_from(cls, cfg, "mixed-precision config")


def candidate_widths(cfg: MixedPrecisionConfig, target: str) -> list[tuple[int, int]]:
    """(w, a) pairs from the choices, activations at or above the floor; ValueError for a floor the target's
    runtime cannot convolve."""
    floor = get_costs(target).act_floor
    a_min = cfg.a_bits_min if cfg.a_bits_min is not None else floor
    if a_min < floor:
        raise ValueError(f"a_bits_min={a_min} is below what target '{target}' convolves ({floor}-bit activations "
                         f"and up: quant/costs.py)")
    acts = [a for a in cfg.a_bits_choices if a >= a_min]
    if not acts:
        raise ValueError(f"no activation width of a_bits_choices={cfg.a_bits_choices} is >= the floor {a_min} "
                         f"(target '{target}'): add {a_min} to the choices")
    return [(w, a) for w in cfg.w_bits_choices for a in acts] + ([FLOAT] if cfg.keep_float else [])


# --------------------------------------------------------------------------------------------------- YOLO glue

def output_groups(model: nn.Module, out) -> list[torch.Tensor]:
    """Output groups of an Ultralytics detection / segmentation model's eval-mode output: decoded boxes (xywh,
    pixels), class scores, mask coefficients and prototypes where there are any; an anchor-based original model's
    prediction tensor as one group."""
    pred = out[0] if isinstance(out, (tuple, list)) else out
    proto = None
    if isinstance(pred, (tuple, list)):
        pred, proto = pred[0], pred[1]
    nc = len(getattr(model, "names", {}) or {}) or getattr(model, "nc", 0)
    groups = [pred.detach().float()]
    if pred.dim() == 3 and nc and pred.shape[1] >= 4 + nc and pred.shape[1] < pred.shape[2]:  # (B, 4+nc(+nm), A)
        p = pred.detach().float()
        groups = [p[:, :4], p[:, 4:4 + nc]] + ([p[:, 4 + nc:]] if p.shape[1] > 4 + nc else [])
    if isinstance(proto, torch.Tensor):
        groups.append(proto.detach().float())
    return groups


def yolo_outputs(model: nn.Module, img: torch.Tensor) -> list[torch.Tensor]:
    """``output_groups`` of one forward of ``img``."""
    return output_groups(model, model(img))


def yolo_eval(model: nn.Module, batch: dict) -> dict:
    """One forward of a calibration batch (a preprocessed dataloader batch with its labels): the output groups and
    the training loss per image (Ultralytics' criterion on the eval-mode predictions: BN with running statistics)."""
    out = model(batch["img"])
    loss, _ = model.loss(batch, out)
    return {"groups": output_groups(model, out), "loss": float(loss.detach().sum()) / batch["img"].shape[0]}


def yolo_proxies(out: dict, ref: dict) -> dict:
    """Both proxies of one batch: the loss increase and the output noise (``yolo_noise``)."""
    return {"loss": out["loss"] - ref["loss"], "noise": yolo_noise(out["groups"], ref["groups"])}


def yolo_noise(out: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    """Mean over output groups of the relative noise power. For an anchor-free head the box error is taken relative
    to the reference box's size (mAP's IoU thresholds scale with it: 2 px move a 10 px box as much as 20 px move a
    100 px one) and, like the mask-coefficient error, weighted by the reference's best class score per anchor (the
    anchors NMS keeps), so that background anchors, which no detection uses, do not swamp them."""
    if len(ref) >= 2 and ref[0].dim() == 3 and ref[0].shape[1] == 4:
        w = ref[1].amax(1, keepdim=True)  # (B, 1, A)
        wsum = w.sum().clamp_min(1e-12)
        size = ref[0][:, 2:4].clamp_min(1.0)
        vals = [(((out[0] - ref[0]) / torch.cat([size, size], 1)).pow(2) * w).sum().item() / wsum.item()]
        for i, (o, r) in enumerate(zip(out[1:], ref[1:]), 1):
            if i == 1 or r.dim() != 3 or r.shape[-1] != w.shape[-1]:
                vals.append(nsr([o], [r]))
                continue
            mean = (r * w).sum((0, 2), keepdim=True) / wsum
            var = ((r - mean).pow(2) * w).sum().item()
            err = ((o - r).pow(2) * w).sum().item()
            vals.append(err / var if var > 0 else (0.0 if err == 0 else math.inf))
        return sum(vals) / len(vals)
    return nsr(out, ref)


def layer_geometry(model: nn.Module, imgsz: int, device="cpu") -> dict[str, LayerGeometry]:
    """Shapes and MACs of every quantized conv at a square ``imgsz`` input (one forward)."""
    convs = quant_convs(model)
    hw = {}
    hooks = [c.register_forward_hook(lambda m, a, y, n=n: hw.__setitem__(n, tuple(y.shape[-2:])))
             for n, c in convs.items()]
    ch = (getattr(model, "yaml", None) or {}).get("channels", 3)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, ch, imgsz, imgsz, device=device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    names = recipe_names(model)  # the layers' names in a recipe (a deploy target's QuantOut moves head convs)
    return {n: LayerGeometry.of_conv(names[n], c, hw.get(n, (0, 0))) for n, c in convs.items()}


def calibration_batches(data, task: str, imgsz: int, batch: int, cfg: MixedPrecisionConfig, device) -> list[dict]:
    """``cfg.calib_batches`` letterboxed batches (images and labels) of a seeded subset of the training split."""
    with tempfile.TemporaryDirectory() as tmp:
        loader, _ = calibration_loader(data, task, imgsz=imgsz, batch=batch, n_images=cfg.calib_images, seed=cfg.seed,
                                       shuffle=False, save_dir=Path(tmp))
        out = [preprocess(b, device) for b in itertools.islice(loader, cfg.calib_batches)]
        if hasattr(loader, "close"):
            loader.close()
    return out


def _img(model, batch):
    return model(batch["img"])


def reference_recipe(recipe: dict, cfg: MixedPrecisionConfig) -> QuantRecipe:
    """Every layer at the widest candidate (the reference; first and last layers too: they are allocated like the
    rest), the recipe's granularity, grids, target and excluded layers."""
    r = {k: v for k, v in (recipe or {}).items() if k in RECIPE_FIELDS}
    return QuantRecipe(w_bits=max(cfg.w_bits_choices), a_bits=max(cfg.a_bits_choices), first_last_bits=None, **r)


def measure(weights, data=None, recipe: dict | None = None, cfg: MixedPrecisionConfig | dict | None = None,
            imgsz: int | None = None, batch: int = 16, device="cpu", log=print) -> dict:
    """Per-layer sensitivity of the FP checkpoint (or FP model) ``weights`` on the target of ``recipe``: a report
    (plain data, json-able) with every quantized conv's geometry and the proxy of each candidate width that pays
    on the target under the budget's measure, and with ``cfg.validate_layers`` its mAP check."""
    cfg = MixedPrecisionConfig.from_any(cfg)
    ref_recipe = reference_recipe(recipe, cfg)
    target = ref_recipe.target
    widths = candidate_widths(cfg, target)
    model, name = load_model(weights)
    if is_quantized(model):
        raise ValueError(f"'{name}' is already quantized: measure sensitivity on the FP checkpoint QAT starts from")
    task = model_task(model)
    imgsz = imgsz or trained_imgsz(model)
    model = model.to(device).eval()
    t0 = time.time()
    batches = calibration_batches(data, task, imgsz, batch, cfg, device)
    quantize_model(model, ref_recipe)
    model.to(device)
    torch.manual_seed(cfg.seed)  # calibration and the lowered layers' ranges sample activations at random
    calibrate(model, batches, num_batches=len(batches), forward=_img)
    model.eval()
    ensure_loss_args(model)
    geometry = layer_geometry(model, imgsz, device)
    samples = collect_inputs(model, batches, forward=_img)
    measure_name = cfg.measure
    todo = {}
    for n, g in geometry.items():
        ok = [w for w in widths if pays(target, g, w, widths, measure_name)]
        todo[n] = ok
    if cfg.budget is not None:  # before the measurement: an impossible budget is known from the costs alone
        costs = {n: {w: (option_cost(target, geometry[n], w, measure_name),) for w in ws} for n, ws in todo.items()}
        check_budget(costs, cfg, geometry, target)
    ref = reference_outputs(model, batches, yolo_eval)
    log(f"mixed precision: {len(todo)} quantized convs, reference W{ref_recipe.w_bits}A{ref_recipe.a_bits}, target "
        f"{target}, {sum(len(v) - 1 for v in todo.values())} lowered widths to measure on {len(batches)} batches")
    last = [time.time()]

    def progress(done, total, layer):
        if time.time() - last[0] > 10 or done == total:
            last[0] = time.time()
            log(f"  proxy {done}/{total} ({layer}), {time.time() - t0:.0f} s")

    sens = layer_sensitivity(model, todo, batches, samples, yolo_eval, ref_recipe.weight_init, ref, progress,
                             noise=yolo_proxies)
    report = {"weights": name, "task": task, "imgsz": imgsz, "recipe": ref_recipe.to_dict(), "config": asdict(cfg),
              "reference": [ref_recipe.w_bits, ref_recipe.a_bits], "measure": measure_name, "proxy": cfg.proxy,
              "proxies": {"loss": "training loss per image, one conv lowered minus all at the reference",
                          "noise": "mean over output groups of the relative noise power (yolo_noise), one conv "
                                   "lowered vs all at the reference"},
              "layers": [{**geometry[n].to_dict(),
                          "sensitivity": {width_key(w): s for w, s in sens[n].items()}} for n in geometry],
              "seconds": round(time.time() - t0, 1)}
    if cfg.validate_layers:
        report["validation"] = validate_proxy(model, data, imgsz, batch, device, sens, samples, ref_recipe,
                                              cfg.validate_layers, task, cfg.proxy, log)
    return report


def validate_proxy(model, data, imgsz, batch, device, sens, samples, ref_recipe, n_layers, task, proxy="loss",
                   log=print) -> dict:
    """mAP of the model with one layer lowered to its narrowest measured width, for ``n_layers`` layers spread evenly
    over the ``proxy``'s ranking, against the reference model's; Spearman correlation of each proxy with the drop
    (box, and for a segmenter mask and the mean of both)."""
    ref_width = (ref_recipe.w_bits, ref_recipe.a_bits)
    lowest = {n: min((w for w in s if w != ref_width and not is_float(w)), default=None) for n, s in sens.items()}
    ranked = sorted((n for n in sens if lowest[n] is not None), key=lambda n: sens[n][lowest[n]][proxy])
    if len(ranked) < 2:
        raise ValueError("validate_layers: fewer than two layers have a lowered width to check")
    k = min(n_layers, len(ranked))
    picked = list(dict.fromkeys(ranked[round(i * (len(ranked) - 1) / max(k - 1, 1))] for i in range(k)))
    keys = ("box.map", "mask.map") if task == "segment" else ("box.map",)

    def score():
        with tempfile.TemporaryDirectory() as tmp:
            r = validate(model, data, imgsz=imgsz, batch=batch, device=str(device), save_dir=tmp, verbose=False,
                         pycocotools=False, workers=0)
        return {k: 100 * r["ultralytics"][k] for k in keys}

    t0 = time.time()
    ref = score()
    convs = quant_convs(model)
    names = recipe_names(model)
    rows = []
    for i, n in enumerate(picked):
        w, a = lowest[n]
        with lowered(convs[n], w, a, samples.get(n), ref_recipe.weight_init):
            m = score()
        drops = {f"{k} drop": ref[k] - m[k] for k in keys}
        if task == "segment":
            drops["mean drop"] = sum(drops.values()) / len(keys)
        rows.append({"layer": names[n], "width": f"w{w}a{a}", **sens[n][(w, a)], **drops})
        log(f"  mAP check {i + 1}/{len(picked)}: {names[n]} W{w}A{a}: "
            + ", ".join(f"{p} {v:.3g}" for p, v in sens[n][(w, a)].items()) + "; "
            + ", ".join(f"{k} {m[k]:.2f} (ref {ref[k]:.2f})" for k in keys) + f", {time.time() - t0:.0f} s")
    metrics = [k for k in rows[0] if k.endswith(" drop")]
    out = {"reference_map": ref, "layers": rows,
           "spearman": {p: {k[:-5]: spearman([r[p] for r in rows], [r[k] for r in rows]) for k in metrics}
                        for p in PROXIES}}
    for p, per in out["spearman"].items():
        log(f"  {p} proxy vs mAP drop, Spearman over {len(rows)} layers: "
            + ", ".join(f"{k} {v:.3f}" for k, v in per.items()))
    return out


# ---------------------------------------------------------------------------------------------- allocation

def width_key(width: tuple[int, int]) -> str:
    """A width as sensitivity.json names it: ``w4a8``, or ``float`` for a conv kept unquantized."""
    return "float" if is_float(width) else f"w{width[0]}a{width[1]}"


def _width_key(key: str) -> tuple[int, int]:
    if key == "float":
        return FLOAT
    w, a = key[1:].split("a")
    return int(w), int(a)


def width_label(target: str, width: tuple[int, int]) -> str:
    """``W4A8``, or the float the target runs a conv kept unquantized in (``FP16``, ``FP32``)."""
    return f"FP{get_costs(target).float_bits}" if is_float(width) else "W%dA%d" % width


def proxy_value(v, proxy: str, base=None):
    """The sensitivity the allocation minimises: (the chosen proxy, the other one as the tie-breaker) of a measured
    width, each clipped at 0 (a loss that went down is measurement noise of a tiny change: no width is worth buying
    for it; the output noise then still tells those widths apart). ``base``: the layer's value kept in float, where
    measured: every width then counts what it loses against float (float itself 0, the reference its gain)."""
    if not isinstance(v, dict):
        return max(float(v) - float(base or 0.0), 0.0)
    other = next(p for p in PROXIES if p != proxy)
    b = base or {}
    return (max(float(v[proxy]) - float(b.get(proxy, 0.0)), 0.0),
            max(float(v[other]) - float(b.get(other, 0.0)), 0.0))


def allocation_options(report: dict, measure: str, proxy: str = "loss",
                       keep_float: bool = False) -> tuple[dict, dict[str, LayerGeometry]]:
    """{layer: {width: (cost, sensitivity)}} from a report: its measured widths that pay under ``measure``, with the
    ``proxy``'s sensitivity; float where it was measured and ``keep_float``."""
    target = report["recipe"]["target"]
    geo, options = {}, {}
    for layer in report["layers"]:
        g = LayerGeometry.from_dict(layer)
        geo[g.name] = g
        base = layer["sensitivity"].get("float")
        ws = {_width_key(k): proxy_value(v, proxy, base) for k, v in layer["sensitivity"].items()
              if keep_float or k != "float"}
        ok = [w for w in ws if pays(target, g, w, list(ws), measure)]
        options[g.name] = {w: (option_cost(target, g, w, measure), ws[w]) for w in ok}
    return options, geo


def budget_in_cost_units(report: dict, cfg: MixedPrecisionConfig, geo: dict[str, LayerGeometry]) -> int:
    unit, value = cfg.budget
    if unit == "bytes":
        return int(math.floor(value * 8))
    if unit == "bits":
        return int(math.floor(value * sum(g.params for g in geo.values())))
    return int(math.floor(value))


def allocate_report(report: dict, cfg: MixedPrecisionConfig | dict | None = None) -> Allocation:
    """The allocation of ``report``'s layers under ``cfg``'s budget (ValueError when none is given, or when the
    budget is below what the target's narrowest paying widths cost)."""
    cfg = MixedPrecisionConfig.from_any(cfg)
    if cfg.budget is None:
        raise ValueError("no budget: give one of budget_bytes, budget_bits, budget_bitops")
    measure = cfg.measure
    target = report["recipe"]["target"]
    options, geo = allocation_options(report, measure, cfg.proxy, cfg.keep_float)
    budget = budget_in_cost_units(report, cfg, geo)
    check_budget(options, cfg, geo, target)
    return allocate(options, budget, cfg.max_states)


def check_budget(options: dict, cfg: MixedPrecisionConfig, geo: dict[str, LayerGeometry], target: str) -> None:
    """ValueError (one paragraph: what the narrowest paying widths cost, and why on this target) when the budget is
    below the cheapest allocation of ``options`` ({layer: {width: (cost, ...)}})."""
    budget = budget_in_cost_units({}, cfg, geo)
    low = sum(min(c for c, *_ in o.values()) for o in options.values())
    if low <= budget:
        return
    total = sum(g.params for g in geo.values())
    floor = {"bytes": f"{low / 8:,.0f} bytes", "bits": f"{low / max(total, 1):.2f} average bits",
             "bitops": f"{low:.4g} bit-ops"}[cfg.budget[0]]
    hint = ""
    if cfg.measure in ("runtime", "onnx"):
        hint = (f" On '{target}': {COSTS[target].note}. --cost packed budgets the packed checkpoint "
                f"(export.py --format packed) instead.")
    raise ValueError(f"budget {cfg.budget[1]:g} {cfg.budget[0]} cannot be met on target '{target}' ({cfg.measure} "
                     f"accounting): the narrowest widths that pay there cost {floor}.{hint}")


def recipe_dict(report: dict, alloc: Allocation) -> dict:
    """The recipe train_qat.py --config takes: the reference width as the default, ``overrides`` for the lowered
    layers, the measured recipe's granularity, grids, target and exclusions, plus the layers kept in float."""
    r = report["recipe"]
    ref_w, ref_a = report["reference"]
    overrides = {n: {"w_bits": w, "a_bits": a} for n, (w, a) in alloc.widths.items()
                 if (w, a) != (ref_w, ref_a) and not is_float((w, a))}
    kept_float = [n for n, w in alloc.widths.items() if is_float(w) and n not in r["exclude"]]
    out = {"w_bits": ref_w, "a_bits": ref_a, "first_last_bits": None, "per_channel": r["per_channel"],
           "act_mode": r["act_mode"], "weight_init": r["weight_init"], "target": r["target"],
           "exclude": list(r["exclude"]) + kept_float, "overrides": overrides}
    QuantRecipe(**out)  # the file must load: checked here, not in the QAT run
    return out


def write_recipe(path, report: dict, alloc: Allocation, cfg: MixedPrecisionConfig) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    unit, value = cfg.budget
    head = (f"# mixed_precision.py: per-layer widths for target '{report['recipe']['target']}' from "
            f"{report['weights']}\n"
            f"# budget {value:g} {unit} ({cfg.measure} accounting): cost {alloc.cost} of {alloc.budget}, summed "
            f"{cfg.proxy} proxy "
            f"{alloc.sensitivity:.4g}{'' if alloc.exact else ' (costs rounded up to ' + str(alloc.unit) + ')'}\n"
            f"# use: python train_qat.py --weights {report['weights']} --config {path} [QAT flags]\n")
    path.write_text(head + yaml.safe_dump(recipe_dict(report, alloc), sort_keys=False))
    return path


def allocation_table(report: dict, alloc: Allocation, cfg: MixedPrecisionConfig) -> str:
    """One line per layer: geometry, chosen width, its proxies (loss increase; output noise as an SQNR in dB) and its
    cost, then the totals beside the uniform reference."""
    target = report["recipe"]["target"]
    measure = cfg.measure
    _, geo = allocation_options(report, measure, cfg.proxy)
    sens = {layer["name"]: {_width_key(k): v for k, v in layer["sensitivity"].items()} for layer in report["layers"]}
    ref = tuple(report["reference"])
    unit = "bit-ops" if measure == "bitops" else "weight bytes"
    scale = 1 if measure == "bitops" else 1 / 8
    lines = [f"{'layer':<28} {'kernel':>7} {'c_out':>5} {'params':>8} {'width':>6} {'loss +':>9} {'SQNR dB':>7} "
             f"{unit + ' (' + measure + ')':>22}"]
    for n, g in geo.items():
        w = alloc.widths[n]
        v = sens[n].get(w, 0.0)
        loss, noise = (v.get("loss", math.nan), v.get("noise", math.nan)) if isinstance(v, dict) else (v, v)
        k = f"{g.kernel[0]}x{g.kernel[1]}/{g.stride[0]}"
        lines.append(f"{n:<28} {k:>7} {g.out_channels:>5} {g.params:>8} {width_label(target, w):>6} {loss:>9.3g} "
                     f"{sqnr_db(noise):>7.1f} {option_cost(target, g, w, measure) * scale:>22,.0f}")
    ref_cost = sum(option_cost(target, g, ref, measure) for g in geo.values())
    n_float = sum(is_float(w) for w in alloc.widths.values())
    params = sum(g.params for g in geo.values())
    avg = sum(weight_cost(target, g, alloc.widths[n][0], cfg.cost) for n, g in geo.items()) / max(params, 1)
    lines.append(f"total: {alloc.cost * scale:,.0f} {unit} ({alloc.cost / max(ref_cost, 1):.3f} of uniform "
                 f"W{ref[0]}A{ref[1]}: {ref_cost * scale:,.0f}), average weight bits {avg:.2f} ({cfg.cost}), summed "
                 f"{cfg.proxy} proxy {alloc.sensitivity:.4g}, "
                 f"{sum(w != ref and not is_float(w) for w in alloc.widths.values())} of {len(geo)} layers lowered"
                 + (f", {n_float} kept in {width_label(target, FLOAT)}" if n_float else "") + "; "
                 f"{'exact' if alloc.exact else 'optimal for costs rounded up to %d' % alloc.unit}")
    if n_float:
        lines.append(f"({width_label(target, FLOAT)} rows: the loss change and SQNR of that conv in float against "
                     f"all at W{ref[0]}A{ref[1]}; a negative loss change is what float wins back)")
    return "\n".join(lines)


def mixed_precision(weights, data=None, recipe: dict | None = None, cfg: MixedPrecisionConfig | dict | None = None,
                    out: str | Path | None = None, imgsz: int | None = None, batch: int = 16, device="cpu",
                    report: dict | None = None, log=print) -> dict:
    """Measure (unless a ``report`` of an earlier measurement is given), allocate under ``cfg``'s budget, write the
    recipe to ``out``. Returns {"report", "allocation", "recipe", "table", "path"}."""
    cfg = MixedPrecisionConfig.from_any(cfg)
    if report is None:
        report = measure(weights, data, recipe, cfg, imgsz, batch, device, log)
    alloc = allocate_report(report, cfg)
    table = allocation_table(report, alloc, cfg)
    path = write_recipe(out, report, alloc, cfg) if out is not None else None
    return {"report": report, "allocation": alloc, "recipe": recipe_dict(report, alloc), "table": table, "path": path}


def save_report(report: dict, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    return path
