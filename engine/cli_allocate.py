"""``yolo-qat allocate`` (and ``python mixed_precision.py``): per-layer sensitivity of an FP checkpoint and one
width per layer under a budget (engine/sensitivity.py), written as a recipe that ``yolo-qat train --config`` takes."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from yolo_qat.engine.cli_common import InputError, add_shared, output_dir
from yolo_qat.engine.cli_main import run_main
from yolo_qat.engine.sensitivity import RECIPE_FIELDS, MixedPrecisionConfig, mixed_precision, save_report
from yolo_qat.engine.settings import FORMS, add_fields, config_from, parse_with_config
from yolo_qat.quant import QuantRecipe

PROG = "mixed_precision.py"
DESCRIPTION = """Mixed precision that pays on the deploy target: per-layer sensitivity of an FP checkpoint, one width per
layer under a budget, written as a recipe that yolo-qat train --config takes as it is.

    yolo-qat allocate --weights fp.pt --data d.yaml --target npu --per-channel --budget-bits 6.5
    yolo-qat allocate --weights fp.pt --target sim --budget-bytes 1.2e6 --validate-layers 16
    yolo-qat allocate --sensitivity runs/mixed/exp/sensitivity.json --budget-bits 5 --out r5.yaml
    yolo-qat train --weights fp.pt --config runs/mixed/exp/recipe.yaml --method lsq --epochs 20

Each quantized conv is lowered alone from the reference (the widest candidate) to every candidate width that pays
on the target (quant/costs.py: ort and tensorrt keep <= 4-bit weights in int8, so nothing below 8 pays at their
runtime; npu runs INT4 weights faster only on 1x1 convs with > 32 output channels at stride 1), the noise this adds
to the model's outputs on calibration batches is its sensitivity, and an exact knapsack (quant/allocate.py) picks the
widths of least summed sensitivity within the budget. Outputs in <project>/<name>/: sensitivity.json (reusable with
--sensitivity for other budgets) and recipe.yaml (or --out). (python mixed_precision.py takes the same flags.)
"""


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="yaml whose keys are any of these flags with '_'; the command line overrides it")
    add_shared(p, prog, project="runs/mixed", weights_required=False,
               weights_help="FP checkpoint (any Ultralytics or original YOLOv5/YOLOv7 .pt) whose layers are measured")
    p.add_argument("--sensitivity", help="sensitivity.json of an earlier run: allocate again without measuring")
    p.add_argument("--out", help="recipe yaml to write (default: <project>/<name>/recipe.yaml)")
    add_fields(p.add_argument_group(f"recipe of the measurement (QuantRecipe; {FORMS})"), QuantRecipe,
               only=set(RECIPE_FIELDS))
    add_fields(p.add_argument_group("widths, budget and proxy"), MixedPrecisionConfig)
    return p


def parse_args(argv=None, prog: str = PROG) -> argparse.Namespace:
    opt = parse_with_config(build_parser(prog), argv)
    opt.prog = prog
    return opt


def earlier_report(path, prog: str) -> dict:
    """The sensitivity.json of an earlier run (InputError when it is not one)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--sensitivity '{path}' does not exist: pass the sensitivity.json of an earlier run")
    try:
        report = json.loads(path.read_text())
        report["layers"], report["recipe"], report["reference"]  # noqa: B018  (the keys allocation reads)
    except (ValueError, KeyError, TypeError):
        raise InputError(f"--sensitivity '{path}' is not a sensitivity.json written by {prog}") from None
    return report


def run(opt) -> int:
    cfg = config_from(MixedPrecisionConfig, opt, "mixed-precision")
    if cfg.budget is None:
        raise InputError("no budget: give one of --budget-bytes (weight bytes), --budget-bits (average weight bits) "
                         "or --budget-bitops (bit-ops per image)")
    report = None
    if opt.sensitivity:
        report = earlier_report(opt.sensitivity, opt.prog)
    elif not opt.weights:
        raise InputError("--weights is required (the FP checkpoint to measure), or --sensitivity FILE of an earlier "
                         "run")
    elif not Path(opt.weights).is_file() or not str(opt.weights).endswith(".pt"):
        raise InputError(f"--weights '{opt.weights}' is not a .pt file: pass the FP checkpoint QAT will start from")
    # the reference width (every layer at the widest candidate) with the flags' granularity, grids and target
    ref = argparse.Namespace(**{k: getattr(opt, k) for k in RECIPE_FIELDS}, w_bits=max(cfg.w_bits_choices),
                             a_bits=max(cfg.a_bits_choices), first_last_bits=None)
    recipe = config_from(QuantRecipe, ref, "recipe").to_dict()
    recipe = {k: recipe[k] for k in RECIPE_FIELDS}
    save = output_dir(opt)
    out = Path(opt.out) if opt.out else save / "recipe.yaml"
    try:
        res = mixed_precision(opt.weights, opt.data, recipe, cfg, out=out, imgsz=opt.imgsz, batch=opt.batch,
                              device=opt.device or "cpu", report=report)
    except (ValueError, FileNotFoundError) as e:
        raise InputError(" ".join(str(e).split())) from None
    if report is None:
        save.mkdir(parents=True, exist_ok=True)
        print(f"sensitivity: {save_report(res['report'], save / 'sensitivity.json')}")
    elif cfg.keep_float and not any("float" in layer["sensitivity"] for layer in report["layers"]):
        print(f"{opt.prog}: note: {opt.sensitivity} measured no layer in float (it was made without --keep-float): "
              f"measure again with --keep-float to offer it", file=sys.stderr)
    if report is not None and report.get("measure") != cfg.measure:
        print(f"{opt.prog}: note: {opt.sensitivity} measured the widths that pay under '{report.get('measure')}', "
              f"this budget counts '{cfg.measure}': widths that pay only under it were not measured and are not "
              f"offered", file=sys.stderr)
    print("\n" + res["table"])
    val = res["report"].get("validation")
    if val:
        for proxy, per in val["spearman"].items():
            print(f"{proxy} proxy vs mAP drop of one layer lowered, Spearman over {len(val['layers'])} layers: "
                  + ", ".join(f"{k} {v:.3f}" for k, v in per.items()))
    print(f"\nrecipe: {res['path']}  (yolo-qat train --weights {res['report']['weights']} --config {res['path']})")
    return 0


def main(argv=None, prog: str = PROG) -> int:
    return run_main(prog, lambda args: parse_args(args, prog), run, argv)
