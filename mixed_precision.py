"""Mixed precision that pays on the deploy target: per-layer sensitivity of an FP checkpoint, one width per layer
under a budget, written as a recipe that train_qat.py --config takes as it is.

    python mixed_precision.py --weights fp.pt --data d.yaml --target npu --per-channel --budget-bits 6.5
    python mixed_precision.py --weights fp.pt --target sim --budget-bytes 1.2e6 --validate-layers 16
    python mixed_precision.py --sensitivity runs/mixed/exp/sensitivity.json --budget-bits 5 --out r5.yaml
    python train_qat.py --weights fp.pt --config runs/mixed/exp/recipe.yaml --method lsq --epochs 20

Each quantized conv is lowered alone from the reference (the widest candidate) to every candidate width that pays
on the target (quant/costs.py: ort and tensorrt keep <= 4-bit weights in int8, so nothing below 8 pays at their
runtime; npu runs INT4 weights faster only on 1x1 convs with > 32 output channels at stride 1), the noise this adds
to the model's outputs on calibration batches is its sensitivity, and an exact knapsack (quant/allocate.py) picks the
widths of least summed sensitivity within the budget. Outputs in <project>/<name>/: sensitivity.json (reusable with
--sensitivity for other budgets) and recipe.yaml (or --out).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")  # nothing may be downloaded at run time

PROG = "mixed_precision.py"


def build_parser() -> argparse.ArgumentParser:
    from yolo_qat.engine.cli_common import add_shared
    from yolo_qat.engine.sensitivity import RECIPE_FIELDS, MixedPrecisionConfig
    from yolo_qat.engine.settings import FORMS, add_fields
    from yolo_qat.quant import QuantRecipe

    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="yaml whose keys are any of these flags with '_'; the command line overrides it")
    add_shared(p, PROG, project="runs/mixed", weights_required=False,
               weights_help="FP checkpoint (any Ultralytics or original YOLOv5/YOLOv7 .pt) whose layers are measured")
    p.add_argument("--sensitivity", help="sensitivity.json of an earlier run: allocate again without measuring")
    p.add_argument("--out", help="recipe yaml to write (default: <project>/<name>/recipe.yaml)")
    add_fields(p.add_argument_group(f"recipe of the measurement (QuantRecipe; {FORMS})"), QuantRecipe,
               only=set(RECIPE_FIELDS))
    add_fields(p.add_argument_group("widths, budget and proxy"), MixedPrecisionConfig)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    from yolo_qat.engine.settings import parse_with_config

    return parse_with_config(build_parser(), argv)


def run(opt) -> int:
    from yolo_qat import models  # noqa: F401  (registers the YOLO layer policy; checkpoints unpickle into its classes)
    from yolo_qat.engine.cli_common import InputError, output_dir
    from yolo_qat.engine.sensitivity import RECIPE_FIELDS, MixedPrecisionConfig, mixed_precision, save_report
    from yolo_qat.engine.settings import config_from
    from yolo_qat.quant import QuantRecipe

    cfg = config_from(MixedPrecisionConfig, opt, "mixed-precision")
    if cfg.budget is None:
        raise InputError("no budget: give one of --budget-bytes (weight bytes), --budget-bits (average weight bits) "
                         "or --budget-bitops (bit-ops per image)")
    report = None
    if opt.sensitivity:
        path = Path(opt.sensitivity)
        if not path.is_file():
            raise InputError(f"--sensitivity '{path}' does not exist: pass the sensitivity.json of an earlier run")
        try:
            report = json.loads(path.read_text())
            report["layers"], report["recipe"], report["reference"]  # noqa: B018  (the keys allocation reads)
        except (ValueError, KeyError, TypeError):
            raise InputError(f"--sensitivity '{path}' is not a sensitivity.json written by {PROG}") from None
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
    elif report.get("measure") != cfg.measure:
        print(f"{PROG}: note: {opt.sensitivity} measured the widths that pay under '{report.get('measure')}', this "
              f"budget counts '{cfg.measure}': widths that pay only under it were not measured and are not offered",
              file=sys.stderr)
    print("\n" + res["table"])
    val = res["report"].get("validation")
    if val:
        for proxy, per in val["spearman"].items():
            print(f"{proxy} proxy vs mAP drop of one layer lowered, Spearman over {len(val['layers'])} layers: "
                  + ", ".join(f"{k} {v:.3f}" for k, v in per.items()))
    print(f"\nrecipe: {res['path']}  (python train_qat.py --weights {res['report']['weights']} --config {res['path']})")
    return 0


def main(argv=None) -> int:
    from yolo_qat.engine.cli_common import InputError, input_error
    from yolo_qat.engine.data_download import allowing_downloads
    from yolo_qat.models.safe_load import MissingClassError, UnsafeCheckpointError, trusting

    try:
        opt = parse_args(argv)
        with trusting(opt.trust_checkpoint), allowing_downloads(opt.download):
            return run(opt)
    except InputError as e:
        return input_error(PROG, e)
    except (UnsafeCheckpointError, MissingClassError) as e:
        return input_error(PROG, e)


if __name__ == "__main__":
    sys.exit(main())
