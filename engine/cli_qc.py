"""``yolo-qat qc`` (and ``python correct_qc.py``): the flags of QC, then ``yolo_qat.correct_qc`` and its summary."""
from __future__ import annotations

import argparse
import dataclasses

from yolo_qat import pipeline
from yolo_qat.engine.cli_common import EXIT_FOLD, RunFailed, add_shared
from yolo_qat.engine.cli_main import run_main
from yolo_qat.engine.config import QCConfig
from yolo_qat.engine.correction import LABELS
from yolo_qat.engine.qc import budget_note, tie_note
from yolo_qat.engine.settings import FORMS, add_fields, config_from, parse_with_config
from yolo_qat.engine.validate import format_table
from yolo_qat.quant.qc import FoldCheckError

PROG = "correct_qc.py"
SHARED = ("imgsz", "batch", "device")  # QCConfig fields set by the shared flags (engine/cli_common.py)
DESCRIPTION = """QC, quantization correction: one short epoch that trains only an affine correction of every
quantized conv's output (BN statistics frozen), then folds it away. Optionally BN re-estimation.

    yolo-qat qc --weights runs/qat/exp/weights/last.pt --calib-images 512 --name exp
    yolo-qat qc --weights QAT.pt --bn-reestimate --steps 0      # BN re-estimation only
    yolo-qat qc --weights runs/qc/exp/weights/qc_unfolded.pt --steps 0   # fold saved corrections
    yolo-qat qc --weights QAT.pt --distill                       # + distillation from the FP model
    yolo-qat qc --weights QAT.pt --no-labels --source images/ --no-val   # label-free: distillation only

With --distill the teacher is --teacher, else the FP checkpoint the QAT run distilled from or started from (the
checkpoint records it). --no-labels (with --source DIR, any folder of images) needs no annotation at all.

Every flag can also be set in a --config yaml (keys: the flag names with '_'). Writes, under
<project>/<name>/ (runs/qc/exp, or exp-2, ... when it exists, unless --exist-ok):
  weights/qc_unfolded.pt  the trained corrections still as modules (QCConv), written before folding;
                          loads with models.checkpoint.load_checkpoint, folds later with the command
                          above (or quant.qc.fold_qc); not for val / export until folded
  weights/qc.pt           the folded model (integer weights unchanged): the one to validate and export
  qc_report.json          losses, the fold check per layer, mAP before / after
Each folded layer is checked against its unfolded self in float64, within the bound that rounding the
folded parameters to float32 allows; where a quantizer takes its output (ort and npu: every conv output;
tensorrt: the block's encoding after the fused SiLU), an output that sat within that bound of a rounding tie
may take the neighbouring code: those are counted as ties (in the summary and qc_report.json), not failures.
A fold that fails its check still leaves both checkpoints, prints which layer failed and by how much, and exits
with status 3. (python correct_qc.py takes the same flags.)
"""


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="yaml whose keys are any of these flags with '_'; the command line overrides it")
    add_shared(p, prog, project="runs/qc", weights_help="quantized (QAT) checkpoint .pt, or a qc_unfolded.pt to fold")
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


def parse_args(argv=None, prog: str = PROG) -> argparse.Namespace:
    opt = parse_with_config(build_parser(prog), argv)
    opt.prog = prog
    return opt


def qc_config(a: argparse.Namespace) -> QCConfig:
    """The QCConfig of the parsed flags (InputError for a value out of range)."""
    return config_from(QCConfig, a, "QC")


def run(a: argparse.Namespace) -> int:
    fields = {f.name for f in dataclasses.fields(QCConfig)}
    settings = {k: v for k, v in vars(a).items() if k in fields}
    try:
        res = pipeline.correct_qc(a.weights, a.data, val=a.val, distill=a.distill, labels=a.labels, project=a.project,
                                  name=a.name, exist_ok=a.exist_ok, **settings)
    except FoldCheckError as e:
        unfolded = e.paths.get("qc_unfolded.pt")
        report = e.paths.get("qc.pt")
        raise RunFailed(f"{e} Nothing is lost: the trained corrections, unfolded, are in {unfolded} (fold them again "
                        f"with `yolo-qat qc --weights {unfolded} --steps 0`), the folded model that failed the check "
                        f"is in {report}, and every layer's numbers are in the run's qc_report.json.",
                        code=EXIT_FOLD) from None
    print("\n".join(summary(res)))
    return 0


def summary(res) -> list[str]:
    report = res.report
    lines = [f"QC checkpoint: {res.weights}"]
    if "loss_before" in report and "loss_after" in report:
        lines.append(f"calibration loss {report['loss_before']:.4f} -> {report['loss_after']:.4f}")
    if "fold" in report:
        f = report["fold"]
        lines.append(f"fold check: every folded layer within its float32 rounding bound (worst {f.get('worst_layer')}: "
                     f"{f.get('worst_ratio', 0):.2g} of it); {tie_note(f)}; end to end max abs diff "
                     f"{f['max_abs_diff']:.3g} (output range {f['output_range']:.3g})")
    lines += [n for n in (budget_note(report.get("steps", 0), report["lr"]),) if n]  # far below the paper's
    if res.metrics:
        lines.append(format_table({LABELS[k]: r for k, r in res.metrics.items()}))
    return lines


def main(argv=None, prog: str = PROG) -> int:
    return run_main(prog, lambda args: parse_args(args, prog), run, argv)
