"""``yolo-qat val`` (and ``python val.py``): the flags of validation, then ``yolo_qat.validate`` on each file and
one table (and --json)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from yolo_qat import pipeline
from yolo_qat.engine.cli_common import InputError, add_shared, output_dir
from yolo_qat.engine.cli_main import run_main
from yolo_qat.engine.onnx_val import is_onnx, onnx_info, shape_notes
from yolo_qat.engine.validate import format_table

PROG = "val.py"
DEFAULT_BATCH = 16
DESCRIPTION = """Box and mask mAP of FP / QAT / QC checkpoints and of exported ONNX files: Ultralytics' validator beside
pycocotools COCOeval.

    yolo-qat val --weights runs/qat/exp/weights/last.pt runs/qc/exp/weights/qc.pt --json results.json
    yolo-qat val --weights runs/qc/exp/weights/qc.pt runs/qc/exp/weights/qc.onnx --no-rect

A .onnx file is run by onnxruntime (CPUExecutionProvider) at its static input shape (batch and imgsz from its
metadata), on square letterboxed images; checkpoints validate on rectangular batches unless --no-rect.
(python val.py takes the same flags.)
"""


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shared(p, prog, project="runs/val", weights_nargs="+", batch=None,
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


def parse_args(argv=None, prog: str = PROG) -> argparse.Namespace:
    opt = build_parser(prog).parse_args(argv)
    opt.prog = prog
    return opt


def check_files(a: argparse.Namespace) -> None:
    """Every file exists and every .onnx file can be validated, before any work; notes on what differs."""
    missing = [w for w in a.weights if not Path(w).is_file()]
    if missing:
        raise InputError(f"checkpoint(s) {missing} do not exist: pass the paths of .pt or .onnx files")
    onnx_files = [w for w in a.weights if is_onnx(w)]
    for w in onnx_files:
        try:
            note = shape_notes(onnx_info(w), a.imgsz, a.batch)
        except (ValueError, FileNotFoundError) as e:
            raise InputError(f"{w}: {e}") from None
        if note:
            print(f"{a.prog}: note: {w}: {note}", file=sys.stderr)
    if onnx_files and a.rect and len(onnx_files) < len(a.weights):
        print(f"{a.prog}: note: the checkpoints are validated on rectangular batches (each padded to its images' "
              f"shape + half a stride), the .onnx files on square letterboxed batches of their static size, so "
              f"their rows differ by that too; pass --no-rect (and the export's --imgsz) to compare a checkpoint "
              f"with its export on the same input.", file=sys.stderr)


def run(a: argparse.Namespace) -> int:
    check_files(a)
    base = output_dir(a)
    results = {}
    for i, w in enumerate(a.weights):
        try:
            results[w] = pipeline.validate(w, a.data, imgsz=a.imgsz, batch=a.batch or DEFAULT_BATCH, device=a.device,
                                           save_dir=base / f"{i}_{Path(w).stem}", conf=a.conf, iou=a.iou, rect=a.rect)
        except (ValueError, FileNotFoundError) as e:
            raise InputError(f"{w}: {e}") from None
        except InputError as e:
            raise InputError(f"{w}: {e}") from None
    print("\n" + format_table(results))
    if a.json:
        out = {w: {**r["pycocotools"], "predictions": r["predictions"], "ultralytics": r["ultralytics"]}
               for w, r in results.items()}
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(out, indent=2))
        print(f"wrote {a.json}")
    return 0


def main(argv=None, prog: str = PROG) -> int:
    return run_main(prog, lambda args: parse_args(args, prog), run, argv)
