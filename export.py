"""Deployable artifacts of a quantized (QAT or QC) YOLO checkpoint.

    python export.py --weights runs/qat/exp/weights/best.pt --format onnx               # INT4 weights (opset 21)
    python export.py --weights best.pt --format onnx --opset 17 --imgsz 320 --dynamic   # int8 containers
    python export.py --weights best.pt --data data/coco.yaml --project runs/export --name v5n   # checked on val images
    python export.py --weights best.pt --format packed                                  # bit-packed integer checkpoint

ONNX, for the deploy target the checkpoint was trained for (quant/targets.py; --target only confirms it):
``ort`` runs on onnxruntime's integer kernels (every quantized conv a QLinearConv: BN, QC and the output scale
folded into per-channel int8 weight scales, int32 biases, integer zero points); ``npu`` the same with INT4 weight
initializers (opset 21) and positive weight scales, for NPUs fed QDQ ONNX (QNN HTP, Ascend, CMSIS-NN); ``tensorrt``
Q/DQ with zero point 0 (signed int8) at every conv input and block output, int8 weights with positive scales and
float biases, for TensorRT's explicit quantization (trtexec --int8 --onnx=...); ``sim`` (the paper's simulation,
older checkpoints) has BN and QC as per-output-channel Mul after float convs on dequantized (INT4) weights.
Outputs are those of Ultralytics' own ONNX export (output0 [, output1]), so its NMS applies.
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


PROG = "export.py"
TARGET_NAMES = ("sim", "ort", "npu", "tensorrt")  # quant.targets.TARGET_NAMES (not imported here: --help stays instant)


def build_parser() -> argparse.ArgumentParser:
    from yolo_qat.engine.cli_common import add_shared

    ap = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # The artifacts go next to the checkpoint unless --project or --name is given; the device is the CPU,
    # where the graph is traced and onnxruntime (CPU provider) checks it.
    add_shared(ap, PROG, project=None, name=None, batch=1, device="cpu",
               data_help="dataset yaml whose validation images --verify runs on (default: random images)",
               weights_help="quantized checkpoint (.pt from train_qat.py / correct_qc.py), or an original "
                            "YOLOv5/YOLOv7 .pt")
    ap.add_argument("--format", choices=("onnx", "packed"), default="onnx")
    ap.add_argument("--target", choices=TARGET_NAMES, default=None,
                    help="deploy target (quant/targets.py); default: the one the checkpoint was trained for. ort: "
                         "onnxruntime's integer kernels (QLinearConv); npu: INT4 weights, u8 activations (opset 21); "
                         "tensorrt: signed int8, zero point 0; sim: the paper's simulation, a float graph")
    ap.add_argument("--opset", type=int, default=21, help="ONNX opset; >= 21 stores <= 4-bit weights as INT4 (sim and npu targets)")
    ap.add_argument("--dynamic", action=argparse.BooleanOptionalAction, default=False,
                    help="dynamic batch and image size (else --batch x 3 x --imgsz x --imgsz)")
    ap.add_argument("--offset-mode", choices=("exact", "zero_point"), default="exact",
                    help="LSQ+ offsets: exact Sub/Add around zp-0 Q/DQ, or rounded integer zero points")
    ap.add_argument("--output", help="output file (default: <project>/<name>/<checkpoint stem>.onnx / .qpk when "
                                     "--project or --name is given, else the weights path with .onnx / .qpk)")
    ap.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                    help="onnx: compare onnxruntime with the PyTorch model; packed: reload and compare; on --batch "
                         "random images, or on validation images of --data when it is given")
    return ap


def _mb(path: Path) -> str:
    return f"{path.stat().st_size / 1e6:.2f} MB"


def output_path(args, weights: Path) -> Path:
    from yolo_qat.engine.cli_common import output_dir

    suffix = ".onnx" if args.format == "onnx" else ".qpk"
    if args.output:
        return Path(args.output)
    if args.project is None and args.name is None:
        return weights.with_suffix(suffix)
    where = argparse.Namespace(project=args.project or "runs/export", name=args.name or "exp", exist_ok=args.exist_ok)
    return output_dir(where) / (weights.stem + suffix)


def verify_images(data, imgsz: int, batch: int) -> torch.Tensor:
    """``batch`` images of the dataset's val split (repeated if it has fewer), letterboxed to imgsz x imgsz by
    Ultralytics' own val transforms, in [0, 1]."""
    import torch
    from ultralytics.cfg import get_cfg
    from ultralytics.data import build_yolo_dataset

    from yolo_qat.engine.calib import resolve_data
    from yolo_qat.engine.data_download import check_dataset

    d = check_dataset(resolve_data(data))
    ds = build_yolo_dataset(get_cfg(overrides={"imgsz": imgsz}), d["val"], batch, d, mode="val", rect=False)
    return torch.stack([ds[i % len(ds)]["img"] for i in range(batch)]).float() / 255


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from yolo_qat.engine.data_download import allowing_downloads
    from yolo_qat.models.safe_load import trusting

    with trusting(args.trust_checkpoint), allowing_downloads(args.download):  # --trust-checkpoint, --download
        return export(args)


def export(args: argparse.Namespace) -> int:
    import torch

    from yolo_qat import deploy
    from yolo_qat import models  # noqa: F401  (registers the YOLO policy, so checkpoints unpickle)
    from yolo_qat.deploy.verify import compare_onnxruntime
    from yolo_qat.engine.cli_common import input_error
    from yolo_qat.models.facts import trained_imgsz
    from yolo_qat.models.checkpoint import load_checkpoint
    from yolo_qat.models.facts import is_original as is_original_model
    from yolo_qat.models.original import prepare_original
    from yolo_qat.quant import is_quantized

    if args.device != "cpu":
        return input_error(PROG, f"--device {args.device}: export runs on the CPU (the graph is traced there and "
                                 f"checked with onnxruntime's CPU provider); pass --device cpu or leave it out")
    weights = Path(args.weights)
    try:
        model, _ = load_checkpoint(weights)
    except (FileNotFoundError, ValueError) as e:
        return input_error(PROG, e)
    if is_original_model(model):
        model = prepare_original(model)  # names, stride, channels as the rest of the project reads them
    imgsz = (args.imgsz or trained_imgsz(model),) * 2
    if args.verify and args.data is not None:  # a dataset that cannot be used ends the run before any file is written
        from yolo_qat.engine.calib import resolve_data
        from yolo_qat.engine.data_download import check_dataset

        try:
            check_dataset(resolve_data(args.data))
        except FileNotFoundError as e:
            return input_error(PROG, e)
    out = output_path(args, weights)
    warnings.simplefilter("always", deploy.ExportWarning)
    try:
        if args.format == "onnx":
            deploy.export_onnx(model, out, imgsz, args.opset, args.dynamic, args.offset_mode, batch=args.batch,
                               target=args.target)
        else:
            deploy.save_packed(model, out)
    except deploy.NothingQuantizedError as e:
        return input_error(PROG, f"'{weights}': {e}")
    except ValueError as e:
        return input_error(PROG, e)
    ratio = weights.stat().st_size / out.stat().st_size  # a float ONNX of an fp16 checkpoint is the larger one
    print(f"{PROG}: wrote {out} ({_mb(out)}); checkpoint {weights} is {_mb(weights)} "
          f"({f'{ratio:.1f}x larger' if ratio >= 1 else f'{1 / ratio:.1f}x smaller'})")
    if args.verify:
        try:
            x = (verify_images(args.data, imgsz[0], args.batch) if args.data is not None else
                 torch.rand(args.batch, 3, *imgsz, generator=torch.Generator().manual_seed(0)))
        except FileNotFoundError as e:
            return input_error(PROG, e)
        what = f"{len(x)} validation image(s) of {args.data}" if args.data is not None else "a random image" \
            if len(x) == 1 else f"{len(x)} random images"
        if args.format == "onnx":
            try:
                r = compare_onnxruntime(model, out, x)
            except ValueError as e:  # e.g. external data outside the file's folder (deploy/onnx_files.py)
                return input_error(PROG, e)
            codes = (f"; activation codes differing: {r['code_flips']} of {r['codes']}" if is_quantized(model)
                     else " (float model)")
            print(f"{PROG}: onnxruntime vs PyTorch{' fake-quant' if is_quantized(model) else ''} on {what}: "
                  f"max |diff| {r['max_abs']:.3g} (outputs up to {r['max_ref']:.3g}){codes}")
        else:
            with torch.no_grad():
                same = _first(deploy.load_packed(out)(x)).equal(_first(model(x)))
            print(f"{PROG}: packed checkpoint reloads to {'identical' if same else 'DIFFERENT'} outputs on {what}")
            if not same:
                return 1
    return 0


def _first(y):
    while isinstance(y, (tuple, list)):
        y = y[0]
    return y


if __name__ == "__main__":
    sys.exit(main())
