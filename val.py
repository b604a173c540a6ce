"""Box and mask mAP of FP / QAT / QC checkpoints and of exported ONNX files: Ultralytics' validator beside
pycocotools COCOeval.

    python val.py --weights runs/qat/exp/weights/last.pt runs/qc/exp/weights/qc.pt --json results.json
    python val.py --weights runs/qc/exp/weights/qc.pt runs/qc/exp/weights/qc.onnx --no-rect

A .onnx file is run by onnxruntime (CPUExecutionProvider) at its static input shape (batch and imgsz from its
metadata), on square letterboxed images; checkpoints validate on rectangular batches unless --no-rect.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")  # nothing may be downloaded at run time


PROG = "val.py"
DEFAULT_BATCH = 16


def build_parser() -> argparse.ArgumentParser:
    from yolo_qat.engine.cli_common import add_shared

    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shared(p, PROG, project="runs/val", weights_nargs="+", batch=None,
               weights_help="one or more .pt checkpoints (FP, QAT or QC) or exported .onnx files; predictions go to "
                            "<project>/<name>/<i>_<stem>/")
    for a in p._actions:
        if a.dest == "batch":
            a.help = f"images per batch (default: {DEFAULT_BATCH}; an .onnx file runs at the batch it was exported with)"
        elif a.dest == "imgsz":
            a.help += "; an .onnx file runs at the size it was exported at"
    p.add_argument("--rect", action=argparse.BooleanOptionalAction, default=True,
                   help="checkpoints: rectangular batches (each padded to its images' shape + half a stride), as the "
                        "trainer validates; --no-rect: square letterboxed imgsz batches, as an exported .onnx file is "
                        "run (compare a checkpoint with its export this way)")
    p.add_argument("--conf", type=float, default=0.001, help="confidence threshold of the predictions scored")
    p.add_argument("--iou", type=float, default=0.7, help="NMS IoU threshold")
    p.add_argument("--json", default=None, help="write per-checkpoint box/mask mAP (pycocotools) to this file")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    from yolo_qat.engine.data_download import allowing_downloads
    from yolo_qat.models.safe_load import trusting

    with trusting(a.trust_checkpoint), allowing_downloads(a.download):  # --trust-checkpoint, --download
        return validate_all(a)


def validate_all(a: argparse.Namespace) -> int:
    from yolo_qat import models  # noqa: F401  (quantized checkpoints unpickle into its model classes)
    from yolo_qat.engine.cli_common import input_error, output_dir
    from yolo_qat.engine.validate import format_table, validate

    from yolo_qat.engine.onnx_val import is_onnx, onnx_info, shape_notes

    missing = [w for w in a.weights if not Path(w).is_file()]
    if missing:
        return input_error(PROG, f"checkpoint(s) {missing} do not exist: pass the paths of .pt or .onnx files")
    onnx_files = [w for w in a.weights if is_onnx(w)]
    for w in onnx_files:  # before any work: a file that cannot be validated ends the run at once
        try:
            note = shape_notes(onnx_info(w), a.imgsz, a.batch)
        except (ValueError, FileNotFoundError) as e:
            return input_error(PROG, f"{w}: {e}")
        if note:
            print(f"{PROG}: note: {w}: {note}", file=sys.stderr)
    if onnx_files and a.rect and len(onnx_files) < len(a.weights):
        print(f"{PROG}: note: the checkpoints are validated on rectangular batches (each padded to its images' "
              f"shape + half a stride), the .onnx files on square letterboxed batches of their static size, so "
              f"their rows differ by that too; pass --no-rect (and the export's --imgsz) to compare a checkpoint "
              f"with its export on the same input.", file=sys.stderr)
    base = output_dir(a)
    results = {}
    for i, w in enumerate(a.weights):
        try:
            results[w] = validate(w, a.data, imgsz=a.imgsz, batch=a.batch or DEFAULT_BATCH, device=a.device,
                                  save_dir=base / f"{i}_{Path(w).stem}", conf=a.conf, iou=a.iou, rect=a.rect)
        except (ValueError, FileNotFoundError) as e:
            return input_error(PROG, f"{w}: {e}")
    print("\n" + format_table(results))
    if a.json:
        out = {w: {**r["pycocotools"], "predictions": r["predictions"], "ultralytics": r["ultralytics"]}
               for w, r in results.items()}
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(out, indent=2))
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
