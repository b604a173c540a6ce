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


def parse_args(argv=None):
    from engine.device import DEFAULT_HELP as DEVICE_HELP, device_arg

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", nargs="+", required=True, help="one or more .pt checkpoints (FP, QAT or QC)")
    p.add_argument("--data", default=None, help="dataset yaml (default: the embedded offline dataset)")
    p.add_argument("--imgsz", type=int, default=None, help="default: the checkpoint's training size, else 640")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--device", default="", type=device_arg("val.py"), help=DEVICE_HELP)
    p.add_argument("--conf", type=float, default=0.001, help="confidence threshold of the predictions scored")
    p.add_argument("--iou", type=float, default=0.7, help="NMS IoU threshold")
    p.add_argument("--project", default="runs/val", help="predictions go to <project>/<name>/<checkpoint stem>")
    p.add_argument("--name", default="exp")
    p.add_argument("--json", default=None, help="write per-checkpoint box/mask mAP (pycocotools) to this file")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    import models  # noqa: F401  (quantized checkpoints unpickle into its model classes)
    from engine.validate import format_table, validate

    results = {}
    for i, w in enumerate(a.weights):
        if not Path(w).is_file():
            print(f"val.py: checkpoint '{w}' does not exist", file=sys.stderr)
            return 2
        save_dir = Path(a.project) / a.name / f"{i}_{Path(w).stem}"
        try:
            results[w] = validate(w, a.data, imgsz=a.imgsz, batch=a.batch, device=a.device, save_dir=save_dir,
                                  conf=a.conf, iou=a.iou)
        except (ValueError, FileNotFoundError) as e:
            print(f"val.py: {w}: {e}", file=sys.stderr)
            return 2
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
