"""Allocated widths against uniform ones at the same average weight bits, before any QAT: each recipe is quantized
from the FP checkpoint, calibrated on the same batches and validated (Ultralytics' box / mask mAP50-95).

For each uniform ``W{b}A{a}`` (first and last layers at 8 bits, the project's default) the budget is its own average
weight bits in the measurement's accounting, and mixed_precision.py's allocation (from ``--sensitivity``) is made
under that budget with each proxy. Calibration draws a random sample of each layer's activations, so every recipe
is calibrated once per ``--seeds`` seed: the mean and [min, max] over them are printed. A quick look at what the
allocation buys where QAT has not recovered anything yet; the comparison after QAT is the Pareto sweep
(benchmarks/pareto.py; docs/mixed-precision.md).

``--float-bits [B ...]`` (a measurement made with ``--keep-float``) compares float against 8 bits per layer, the
only mixed precision TensorRT has: the FP checkpoint, uniform W8A8, the usual hand-made choice (W8A8 with the first
and last convs in float) and the allocation that keeps convs in float at that cost, and at each average of B bits.

    python benchmarks/mixed_precision_ptq.py --weights fp.pt --data d.yaml --sensitivity runs/mixed/exp/sensitivity.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROG = "mixed_precision_ptq.py"


def build_parser() -> argparse.ArgumentParser:
    from yolo_qat.engine.cli_common import add_shared

    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shared(p, PROG, project="runs/mixed_ptq", weights_help="the FP checkpoint the sensitivity was measured on")
    p.add_argument("--sensitivity", required=True, help="sensitivity.json of mixed_precision.py")
    p.add_argument("--w-bits", type=int, nargs="*", default=[4, 3],
                   help="uniform weight widths to compare with ('--w-bits' alone: none)")
    p.add_argument("--a-bits", type=int, default=8, help="activation width of the uniform recipes")
    p.add_argument("--float-bits", type=float, nargs="*",
                   help="compare keeping convs in float (see above); the allocations' average weight bits")
    p.add_argument("--calib-batches", type=int, default=4)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="calibration repeats: each seeds the random sample of activations calibration ranges come from")
    return p


def ptq_map(weights, data, recipe, batches, imgsz: int, batch: int, device, seed: int = 0) -> tuple[dict, dict]:
    """({layer: weight bits}, Ultralytics' box / mask mAP50-95 in %) of ``recipe`` calibrated on ``batches`` (the
    activation sample the ranges come from drawn after ``torch.manual_seed(seed)``)."""
    import torch

    from yolo_qat.engine.sensitivity import _img
    from yolo_qat.engine.validate import load_model, validate
    from yolo_qat.quant import calibrate, layer_bits, quantize_model
    from yolo_qat.quant.sensitivity import recipe_names

    model, _ = load_model(weights)
    model.to(device)
    quantize_model(model, recipe)
    torch.manual_seed(seed)
    calibrate(model, batches, num_batches=len(batches), forward=_img)
    names = recipe_names(model)
    bits = {names[n]: b[0] for n, b in layer_bits(model).items()}
    with tempfile.TemporaryDirectory() as tmp:
        r = validate(model, data, imgsz=imgsz, batch=batch, device=str(device), save_dir=tmp, verbose=False,
                     pycocotools=False, workers=0)
    return bits, {k: 100 * v for k, v in r["ultralytics"].items() if k in ("box.map", "mask.map")}


def run(opt) -> list[dict]:
    from yolo_qat import models  # noqa: F401
    from yolo_qat.models.facts import model_task
    from yolo_qat.engine.cli_common import InputError, output_dir
    from yolo_qat.engine.sensitivity import PROXIES, MixedPrecisionConfig, allocate_report, calibration_batches, recipe_dict
    from yolo_qat.engine.validate import load_model, validate
    from yolo_qat.models.facts import trained_imgsz
    from yolo_qat.quant import QuantRecipe
    from yolo_qat.quant.convert import default_policy, policy_roles
    from yolo_qat.quant.costs import FLOAT, LayerGeometry, weight_bits

    path = Path(opt.sensitivity)
    if not path.is_file():
        raise InputError(f"--sensitivity '{path}' does not exist: pass the sensitivity.json of mixed_precision.py")
    report = json.loads(path.read_text())
    if not Path(opt.weights).is_file():
        raise InputError(f"--weights '{opt.weights}' does not exist: pass the FP checkpoint the sensitivity was "
                         f"measured on ({report.get('weights')})")
    fp, _ = load_model(opt.weights)
    imgsz = opt.imgsz or report.get("imgsz") or trained_imgsz(fp)
    device = opt.device or "cpu"
    cfg = MixedPrecisionConfig(**{**report["config"], "calib_batches": opt.calib_batches, "budget_bits": None,
                                  "budget_bytes": None, "budget_bitops": None})
    batches = calibration_batches(opt.data, model_task(fp), imgsz, opt.batch, cfg, device)
    target = report["recipe"]["target"]
    geo = {layer["name"]: LayerGeometry.from_dict(layer) for layer in report["layers"]}
    total = sum(g.params for g in geo.values())

    def average(bits: dict) -> float:  # in the measurement's accounting (--cost); a layer not quantized is float
        return sum(g.params * weight_bits(target, g, bits.get(n, FLOAT[0]), cfg.cost)
                   for n, g in geo.items()) / total

    def row(name, recipe):
        runs = [ptq_map(opt.weights, opt.data, recipe, batches, imgsz, opt.batch, device, seed) for seed in opt.seeds]
        keys = list(runs[0][1])
        rows.append({"recipe": name, "avg_bits": average(runs[0][0]), "seeds": opt.seeds,
                     **{k: [m[k] for _, m in runs] for k in keys}})
        print(f"{name:<40} {rows[-1]['avg_bits']:.3f} bits ({cfg.cost})  " + "  ".join(
            f"{k} {sum(v) / len(v):.2f} [{min(v):.2f}, {max(v):.2f}]" for k, v in ((k, rows[-1][k]) for k in keys)),
            flush=True)

    base = {k: report["recipe"][k] for k in ("per_channel", "act_mode", "weight_init", "target", "exclude")}
    rows = []
    for w in opt.w_bits:
        row(f"uniform W{w}A{opt.a_bits} (first/last 8)", QuantRecipe(w_bits=w, a_bits=opt.a_bits, first_last_bits=8,
                                                                     **base))
        budget = rows[-1]["avg_bits"]
        for proxy in PROXIES:
            try:
                alloc = allocate_report(report, {**vars(cfg), "budget_bits": budget, "proxy": proxy})
            except ValueError as e:
                print(f"  allocation ({proxy}) at {budget:.3f} bits: {e}")
                continue
            row(f"allocated ({proxy}) at {budget:.3f} bits", recipe_dict(report, alloc))
    if opt.float_bits is not None:
        if not any("float" in layer["sensitivity"] for layer in report["layers"]):
            raise InputError(f"--float-bits: {path} measured no layer in float: measure with --keep-float")
        with tempfile.TemporaryDirectory() as tmp:
            r = validate(fp.to(device), opt.data, imgsz=imgsz, batch=opt.batch, device=str(device), save_dir=tmp,
                         verbose=False, pycocotools=False, workers=0)
        fp_map = {k: 100 * v for k, v in r["ultralytics"].items() if k in ("box.map", "mask.map")}
        rows.append({"recipe": "FP checkpoint", "avg_bits": 32.0, "seeds": [], **{k: [v] for k, v in fp_map.items()}})
        print(f"{'FP checkpoint':<40} " + "  ".join(f"{k} {v:.2f}" for k, v in fp_map.items()), flush=True)
        row("uniform W8A8 (all convs)", QuantRecipe(w_bits=8, a_bits=8, first_last_bits=None, **base))
        roles = policy_roles(fp) or default_policy(fp)
        ends = [n for n in roles["first"] + roles["last"] if n in geo and n not in base["exclude"]]
        row("W8A8, first/last convs in float", QuantRecipe(w_bits=8, a_bits=8, first_last_bits=None,
                                                           **{**base, "exclude": base["exclude"] + ends}))
        for budget in [rows[-1]["avg_bits"]] + list(opt.float_bits):
            alloc = allocate_report(report, {**vars(cfg), "budget_bits": budget, "keep_float": True})
            kept = sum(w[0] > 8 for w in alloc.widths.values())
            row(f"allocated ({cfg.proxy}), {kept} convs float, {budget:.3f} bits", recipe_dict(report, alloc))
    save = output_dir(opt)
    save.mkdir(parents=True, exist_ok=True)
    (save / "results.json").write_text(json.dumps(rows, indent=1))
    print(f"results: {save / 'results.json'}")
    return rows


def main(argv=None) -> int:
    from yolo_qat.engine.cli_common import InputError, input_error

    try:
        return 0 if run(build_parser().parse_args(argv)) is not None else 1
    except InputError as e:
        return input_error(PROG, e)
    except ValueError as e:
        return input_error(PROG, " ".join(str(e).split()))


if __name__ == "__main__":
    sys.exit(main())
