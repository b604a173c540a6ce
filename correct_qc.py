"""QC, quantization correction: one short epoch that trains only an affine correction of every
quantized conv's output (BN statistics frozen), then folds it away. Optionally BN re-estimation.

    python correct_qc.py --weights runs/qat/exp/weights/last.pt --calib-images 512 --name exp
    python correct_qc.py --weights QAT.pt --bn-reestimate --steps 0      # BN re-estimation only
    python correct_qc.py --weights runs/qc/exp/weights/qc_unfolded.pt --steps 0   # fold saved corrections
    python correct_qc.py --weights QAT.pt --distill                       # + distillation from the FP model
    python correct_qc.py --weights QAT.pt --no-labels --source images/ --no-val   # label-free: distillation only

With --distill the teacher is --teacher, else the FP checkpoint the QAT run distilled from or started from (the
checkpoint records it). --no-labels (with --source DIR, any folder of images) needs no annotation at all.

Every flag can also be set in a --config yaml (keys: the flag names with '_'). Writes, under
<project>/<name>/ (runs/qc/exp, or exp-2, ... when it exists, unless --exist-ok):
  weights/qc_unfolded.pt  the trained corrections still as modules (QCConv), written before folding;
                          loads with models.checkpoint.load_checkpoint, folds later with the command
                          above (or quant.qc.fold_qc); not for val.py / export.py until folded
  weights/qc.pt           the folded model (integer weights unchanged): the one to validate and export
  qc_report.json          losses, the fold check per layer, mAP before / after
Each folded layer is checked against its unfolded self in float64, within the bound that rounding the
folded parameters to float32 allows; where a quantizer takes its output (ort and npu: every conv output;
tensorrt: the block's encoding after the fused SiLU), an output that sat within that bound of a rounding tie
may take the neighbouring code: those are counted as ties (in the summary and qc_report.json), not failures. A fold that fails its check
still leaves both checkpoints, prints which layer failed and by how much, and exits with status 3.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")  # nothing may be downloaded at run time


PROG = "correct_qc.py"
SHARED = ("imgsz", "batch", "device")  # QCConfig fields set by the shared flags (engine/cli_common.py)


def build_parser() -> argparse.ArgumentParser:
    from yolo_qat.engine.cli_common import add_shared
    from yolo_qat.engine.config import QCConfig
    from yolo_qat.engine.settings import FORMS, add_fields

    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="yaml whose keys are any of these flags with '_'; the command line overrides it")
    add_shared(p, PROG, project="runs/qc", weights_help="quantized (QAT) checkpoint .pt, or a qc_unfolded.pt to fold")
    p.add_argument("--val", action=argparse.BooleanOptionalAction, default=True,
                   help="mAP before and after QC on --data (--no-val skips both)")
    p.add_argument("--distill", action=argparse.BooleanOptionalAction, default=False,
                   help="add distillation from the FP teacher to the QC loss (teacher: --teacher, else the FP model "
                        "the QAT checkpoint records)")
    p.add_argument("--labels", action=argparse.BooleanOptionalAction, default=True,
                   help="--no-labels: QC on the unlabelled images of --source DIR, the loss is the distillation term "
                        "alone (implies --distill)")
    add_fields(p.add_argument_group(f"QC (QCConfig; {FORMS})"), QCConfig, skip=SHARED)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    from yolo_qat.engine.settings import parse_with_config

    return parse_with_config(build_parser(), argv)


def qc_config(a: argparse.Namespace):
    """The QCConfig of the parsed flags (InputError for a value out of range)."""
    from yolo_qat.engine.config import QCConfig
    from yolo_qat.engine.settings import config_from

    return config_from(QCConfig, a, "QC")


def resolve_distillation(a: argparse.Namespace, ckpt: dict) -> None:
    """--distill / --no-labels / --source / --teacher into QCConfig's teacher and source (InputError when they
    do not go together)."""
    from yolo_qat.engine.cli_common import InputError
    from yolo_qat.engine.distill import checkpoint_teacher

    label_free = not a.labels
    if label_free and not a.source:
        raise InputError("--no-labels runs QC on a folder of unlabelled images: name it with --source DIR")
    if a.source and not label_free:
        raise InputError(f"--source '{a.source}' is label-free QC on a folder of images: add --no-labels to confirm "
                         f"(the QC loss is then the distillation term alone), or drop --source to use --data")
    if a.teacher and not (a.distill or label_free):
        raise InputError(f"--teacher '{a.teacher}' is set but distillation is off: add --distill, or drop --teacher")
    if (a.distill or label_free) and not a.teacher:
        try:
            a.teacher = checkpoint_teacher(ckpt)
        except (ValueError, FileNotFoundError) as e:
            raise InputError(str(e)) from None
        print(f"{PROG}: distilling from {a.teacher} (the FP model recorded in '{a.weights}')")


def main(argv=None) -> int:
    from yolo_qat.engine.cli_common import InputError, input_error

    from yolo_qat.engine.data_download import allowing_downloads
    from yolo_qat.models.safe_load import trusting

    try:
        a = parse_args(argv)
        with trusting(a.trust_checkpoint), allowing_downloads(a.download):  # --trust-checkpoint, --download
            return run(a)
    except InputError as e:
        return input_error(PROG, e)


def run(a: argparse.Namespace) -> int:
    from yolo_qat import models  # noqa: F401  (quantized checkpoints unpickle into its model classes)
    from yolo_qat.models.checkpoint import load_checkpoint
    from yolo_qat.quant import is_quantized
    from yolo_qat.engine.cli_common import InputError, input_error, output_dir
    from yolo_qat.engine.qc import budget_note, run_qc, tie_note
    from yolo_qat.quant.qc import FoldCheckError, qc_modules
    from yolo_qat.engine.validate import format_table, validate
    from yolo_qat.models.facts import trained_imgsz

    try:
        model, ckpt = load_checkpoint(a.weights, device=a.device)
    except (FileNotFoundError, ValueError) as e:
        raise InputError(str(e)) from None
    if not is_quantized(model):
        raise InputError(f"'{a.weights}' is a full-precision checkpoint: QC needs a quantized checkpoint (a QAT model "
                         f"with QuantConv2d layers, e.g. the output of train_qat.py)")
    a.imgsz = a.imgsz or trained_imgsz(model)
    resolve_distillation(a, ckpt)
    qc = qc_config(a)
    save_dir = output_dir(a)
    val_kw = dict(imgsz=qc.imgsz, batch=qc.batch, device=qc.device)
    results = {}
    resumed = bool(qc_modules(model))
    if resumed and a.val:  # Ultralytics' fuse() does not know the correction modules: fold first
        print(f"{PROG}: '{a.weights}' carries trained QC corrections; validating only after they fold")
    try:
        if a.val and not resumed:
            results["before (QAT)"] = validate(model, a.data, save_dir=save_dir / "val_before", **val_kw)
        model, report = run_qc(model, None if qc.source else a.data, **qc.to_dict(), save_dir=save_dir, weights_dir=save_dir / "weights",
                               checkpoint_extra={"train_args": ckpt.get("train_args") or {}},
                               report_extra={"source": str(a.weights), "data": a.data})
    except (ValueError, FileNotFoundError) as e:
        raise InputError(str(e)) from None
    except FoldCheckError as e:
        save_dir.mkdir(parents=True, exist_ok=True)
        (save_dir / "qc_report.json").write_text(json.dumps(e.run_report, indent=2))
        unfolded = e.paths.get("qc_unfolded.pt")
        return input_error(PROG, f"{e} Nothing is lost: the trained corrections, unfolded, are in {unfolded} (fold "
                                 f"them again with `python correct_qc.py --weights {unfolded} --steps 0`), the folded "
                                 f"model that failed the check is in {e.paths.get('qc.pt')}, and every layer's "
                                 f"numbers are in {save_dir / 'qc_report.json'}.", code=3)
    path = report["checkpoints"]["qc.pt"]
    if a.val:
        results["after (QC)"] = validate(model, a.data, save_dir=save_dir / "val_after", **val_kw)
        report["map"] = {k: {"ultralytics": r["ultralytics"], "pycocotools": r["pycocotools"]}
                         for k, r in results.items()}
    (save_dir / "qc_report.json").write_text(json.dumps(report, indent=2))
    summary = [f"QC checkpoint: {path}"]
    if "loss_before" in report and "loss_after" in report:
        summary.append(f"calibration loss {report['loss_before']:.4f} -> {report['loss_after']:.4f}")
    if "fold" in report:
        f = report["fold"]
        summary.append(f"fold check: every folded layer within its float32 rounding bound (worst {f.get('worst_layer')}: "
                       f"{f.get('worst_ratio', 0):.2g} of it); {tie_note(f)}; end to end max abs diff "
                       f"{f['max_abs_diff']:.3g} (output range {f['output_range']:.3g})")
    summary += [n for n in (budget_note(report.get("steps", 0), report["lr"]),) if n]  # far below the paper's
    if results:
        summary.append(format_table(results))
    print("\n".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
