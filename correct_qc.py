"""QC, quantization correction: one short epoch that trains only an affine correction of every
quantized conv's output (BN statistics frozen), then folds it away. Optionally BN re-estimation.

    python correct_qc.py --weights runs/qat/exp/weights/last.pt --calib-images 512 --name exp
    python correct_qc.py --weights QAT.pt --bn-reestimate --steps 0      # BN re-estimation only
    python correct_qc.py --weights runs/qc/exp/weights/qc_unfolded.pt --steps 0   # fold saved corrections

Writes, under <project>/<name>/:
  weights/qc_unfolded.pt  the trained corrections still as modules (QCConv), written before folding;
                          loads with models.checkpoint.load_checkpoint, folds later with the command
                          above (or quant.qc.fold_qc); not for val.py / export.py until folded
  weights/qc.pt           the folded model (integer weights unchanged): the one to validate and export
  qc_report.json          losses, the fold check per layer, mAP before / after
Each folded layer is checked against its unfolded self in float64, within the bound that rounding the
folded parameters to float32 allows. A fold that fails its check still leaves both checkpoints, prints
which layer failed and by how much, and exits with status 3.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")  # nothing may be downloaded at run time
sys.path.insert(0, str(Path(__file__).resolve().parent))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True, help="quantized (QAT) checkpoint .pt")
    p.add_argument("--data", default=None, help="dataset yaml (default: the embedded offline dataset)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--calib-images", type=int, default=None, help="calibration subset size (default: all)")
    size.add_argument("--calib-fraction", type=float, default=None, help="calibration subset as a share of train")
    p.add_argument("--seed", type=int, default=0, help="chooses the calibration subset and the batch order")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--steps", type=int, default=None,
                   help="budget in optimizer steps (overrides --epochs; 0: no QC training, and the corrections of a "
                        "qc_unfolded.pt are just folded)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--granularity", choices=("channel", "tensor"), default="channel")
    p.add_argument("--no-scale", action="store_true", help="no multiplicative correction (gamma)")
    p.add_argument("--no-shift", action="store_true", help="no additive correction (beta)")
    p.add_argument("--bn-reestimate", action="store_true", help="re-estimate BN statistics first (Nagel et al.)")
    p.add_argument("--bn-batches", type=int, default=50)
    p.add_argument("--augment", action="store_true", help="train on augmented images (default: letterbox only)")
    p.add_argument("--imgsz", type=int, default=None, help="default: the checkpoint's training size, else 640")
    p.add_argument("--batch", type=int, default=16)
    from engine.device import DEFAULT_HELP, device_arg  # the device is resolved and announced when parsed
    p.add_argument("--device", default="", type=device_arg("correct_qc.py"), help=DEFAULT_HELP)
    p.add_argument("--project", default="runs/qc")
    p.add_argument("--name", default="exp")
    p.add_argument("--no-val", action="store_true", help="skip the mAP before / after")
    return p.parse_args(argv)


def fail(msg: str) -> int:
    print(f"correct_qc.py: {msg}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    a = parse_args(argv)
    import models  # noqa: F401  (quantized checkpoints unpickle into its model classes)
    from models.checkpoint import load_checkpoint
    from quant import is_quantized
    from engine.qc import run_qc
    from quant.qc import FoldCheckError, qc_modules
    from engine.validate import format_table, trained_imgsz, validate

    try:
        model, ckpt = load_checkpoint(a.weights, device=a.device)
    except (FileNotFoundError, ValueError) as e:
        return fail(str(e))
    if not is_quantized(model):
        return fail(f"'{a.weights}' is a full-precision checkpoint: QC needs a quantized checkpoint (a QAT model "
                    f"with QuantConv2d layers, e.g. the output of train_qat.py)")
    imgsz = a.imgsz or trained_imgsz(model)
    save_dir = Path(a.project) / a.name
    val_kw = dict(imgsz=imgsz, batch=a.batch, device=a.device)
    results = {}
    resumed = bool(qc_modules(model))
    if resumed and not a.no_val:  # Ultralytics' fuse() does not know the correction modules: fold first
        print(f"correct_qc.py: '{a.weights}' carries trained QC corrections; validating only after they fold")
    try:
        if not a.no_val and not resumed:
            results["before (QAT)"] = validate(model, a.data, save_dir=save_dir / "val_before", **val_kw)
        model, report = run_qc(model, a.data, calib_images=a.calib_images, calib_fraction=a.calib_fraction,
                               epochs=a.epochs, steps=a.steps, lr=a.lr, granularity=a.granularity,
                               scale=not a.no_scale, shift=not a.no_shift, imgsz=imgsz, batch=a.batch,
                               bn_reestimate=a.bn_reestimate, bn_batches=a.bn_batches, seed=a.seed,
                               device=a.device, augment=a.augment, save_dir=save_dir,
                               weights_dir=save_dir / "weights",
                               checkpoint_extra={"train_args": ckpt.get("train_args") or {}},
                               report_extra={"source": str(a.weights), "data": a.data})
    except (ValueError, FileNotFoundError) as e:
        return fail(str(e))
    except FoldCheckError as e:
        save_dir.mkdir(parents=True, exist_ok=True)
        (save_dir / "qc_report.json").write_text(json.dumps(e.run_report, indent=2))
        unfolded = e.paths.get("qc_unfolded.pt")
        print(f"correct_qc.py: {e} Nothing is lost: the trained corrections, unfolded, are in {unfolded} (fold "
              f"them again with `python correct_qc.py --weights {unfolded} --steps 0`), the folded model that "
              f"failed the check is in {e.paths.get('qc.pt')}, and every layer's numbers are in "
              f"{save_dir / 'qc_report.json'}.", file=sys.stderr)
        return 3
    path = report["checkpoints"]["qc.pt"]
    if not a.no_val:
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
                       f"{f.get('worst_ratio', 0):.2g} of it); end to end max abs diff {f['max_abs_diff']:.3g} "
                       f"(output range {f['output_range']:.3g})")
    if results:
        summary.append(format_table(results))
    print("\n".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
