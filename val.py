"""Box and mask mAP of FP / QAT / QC checkpoints: Ultralytics' validator beside pycocotools COCOeval.

    python val.py --weights runs/qat/exp/weights/last.pt runs/qc/exp/weights/qc.pt --json results.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")  # nothing may be downloaded at run time
sys.path.insert(0, str(Path(__file__).resolve().parent))


PROG = "val.py"


def build_parser() -> argparse.ArgumentParser:
    from engine.cli_common import add_shared

    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shared(p, PROG, project="runs/val", weights_nargs="+",
               weights_help="one or more .pt checkpoints (FP, QAT or QC); predictions go to <project>/<name>/<i>_<stem>/")
    p.add_argument("--conf", type=float, default=0.001, help="confidence threshold of the predictions scored")
    p.add_argument("--iou", type=float, default=0.7, help="NMS IoU threshold")
    p.add_argument("--json", default=None, help="write per-checkpoint box/mask mAP (pycocotools) to this file")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    import models  # noqa: F401  (quantized checkpoints unpickle into its model classes)
    from engine.cli_common import input_error, output_dir
    from engine.validate import format_table, validate

    missing = [w for w in a.weights if not Path(w).is_file()]
    if missing:
        return input_error(PROG, f"checkpoint(s) {missing} do not exist: pass the paths of .pt files")
    base = output_dir(a)
    results = {}
    for i, w in enumerate(a.weights):
        try:
            results[w] = validate(w, a.data, imgsz=a.imgsz, batch=a.batch, device=a.device,
                                  save_dir=base / f"{i}_{Path(w).stem}", conf=a.conf, iou=a.iou)
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
