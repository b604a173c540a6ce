"""Deployable artifacts of a quantized (QAT or QC) YOLO checkpoint.

    python export.py --weights runs/qat/exp/weights/best.pt --format onnx               # INT4 weights (opset 21)
    python export.py --weights best.pt --format onnx --opset 17 --imgsz 320 --dynamic   # int8 containers
    python export.py --weights best.pt --format packed                                  # bit-packed integer checkpoint

ONNX: BN and folded QC corrections become per-output-channel scales (Mul) after each integer conv;
weights are integer initializers + DequantizeLinear, activations QuantizeLinear/DequantizeLinear;
outputs are those of Ultralytics' own ONNX export (output0 [, output1]), so its NMS applies.
Original anchor-based YOLOv5 / YOLOv7 checkpoints (theirs as they are, or ours after QAT / QC) export
with yolov5's output layout instead: output0 (batch, anchors, 5+nc[+nm]) [, output1 protos
(batch, nm, h/4, w/4)], which the NMS of those repositories takes unchanged; a float one exports
as a fused float ONNX (Ultralytics' exporter does not take them). Any other float checkpoint is
refused with exit code 2: use `yolo export` for those.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")  # nothing may be downloaded at run time
ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="export.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", required=True,
                    help="quantized checkpoint (.pt from train_qat.py / correct_qc.py), or an original YOLOv5/YOLOv7 .pt")
    ap.add_argument("--format", choices=("onnx", "packed"), default="onnx")
    ap.add_argument("--opset", type=int, default=21, help="ONNX opset; >= 21 stores <= 4-bit weights as INT4")
    ap.add_argument("--imgsz", type=int, nargs="+", default=[640], help="export image size (h [w])")
    ap.add_argument("--dynamic", action="store_true", help="dynamic batch and image size")
    ap.add_argument("--offset-mode", choices=("exact", "zero_point"), default="exact",
                    help="LSQ+ offsets: exact Sub/Add around zp-0 Q/DQ, or rounded integer zero points")
    ap.add_argument("--output", help="output file (default: the weights path with .onnx / .qpk)")
    ap.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                    help="onnx: compare onnxruntime with the PyTorch model on a random image; packed: reload and compare")
    return ap


def _mb(path: Path) -> str:
    return f"{path.stat().st_size / 1e6:.2f} MB"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    import deploy
    import models  # noqa: F401  (registers the YOLO policy, so checkpoints unpickle)
    from deploy.verify import compare_onnxruntime
    from models.checkpoint import load_checkpoint
    from models.original import is_original_model, prepare_original
    from quant import is_quantized

    weights = Path(args.weights)
    try:
        model, _ = load_checkpoint(weights)
    except (FileNotFoundError, ValueError) as e:
        print(f"export.py: {e}", file=sys.stderr)
        return 2
    if is_original_model(model):
        model = prepare_original(model)  # names, stride, channels as the rest of the project reads them
    imgsz = tuple(args.imgsz * 2 if len(args.imgsz) == 1 else args.imgsz[:2])
    out = Path(args.output or weights.with_suffix(".onnx" if args.format == "onnx" else ".qpk"))
    warnings.simplefilter("always", deploy.ExportWarning)
    try:
        if args.format == "onnx":
            deploy.export_onnx(model, out, imgsz, args.opset, args.dynamic, args.offset_mode)
        else:
            deploy.save_packed(model, out)
    except deploy.NothingQuantizedError as e:
        print(f"export.py: '{weights}': {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"export.py: {e}", file=sys.stderr)
        return 2
    ratio = weights.stat().st_size / out.stat().st_size  # a float ONNX of an fp16 checkpoint is the larger one
    print(f"export.py: wrote {out} ({_mb(out)}); checkpoint {weights} is {_mb(weights)} "
          f"({f'{ratio:.1f}x larger' if ratio >= 1 else f'{1 / ratio:.1f}x smaller'})")
    if args.verify:
        x = torch.rand(1, 3, *imgsz, generator=torch.Generator().manual_seed(0))
        if args.format == "onnx":
            r = compare_onnxruntime(model, out, x)
            codes = (f"; activation codes differing: {r['code_flips']} of {r['codes']}" if is_quantized(model)
                     else " (float model)")
            print(f"export.py: onnxruntime vs PyTorch{' fake-quant' if is_quantized(model) else ''} on a random image: "
                  f"max |diff| {r['max_abs']:.3g} (outputs up to {r['max_ref']:.3g}){codes}")
        else:
            with torch.no_grad():
                same = _first(deploy.load_packed(out)(x)).equal(_first(model(x)))
            print(f"export.py: packed checkpoint reloads to {'identical' if same else 'DIFFERENT'} outputs")
            if not same:
                return 1
    return 0


def _first(y):
    while isinstance(y, (tuple, list)):
        y = y[0]
    return y


if __name__ == "__main__":
    sys.exit(main())
