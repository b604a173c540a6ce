"""``yolo-qat export`` (and ``python export.py``): the flags of export, then ``yolo_qat.export``."""
from __future__ import annotations

import argparse

from yolo_qat import pipeline
from yolo_qat.engine.cli_common import add_shared
from yolo_qat.engine.cli_main import run_main
from yolo_qat.engine.exporting import FORMATS
from yolo_qat.quant.targets import TARGET_NAMES

PROG = "export.py"
DESCRIPTION = """Deployable artifacts of a quantized (QAT or QC) YOLO checkpoint.

    yolo-qat export --weights runs/qat/exp/weights/best.pt --format onnx               # INT4 weights (opset 21)
    yolo-qat export --weights best.pt --format onnx --opset 17 --imgsz 320 --dynamic   # int8 containers
    yolo-qat export --weights best.pt --data data/coco.yaml --project runs/export --name v5n   # checked on val images
    yolo-qat export --weights best.pt --format packed                                  # bit-packed integer checkpoint

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
refused with exit code 2: use `yolo export` for those. (python export.py takes the same flags.)
"""


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    # The artifacts go next to the checkpoint unless --project or --name is given; the device is the CPU,
    # where the graph is traced and onnxruntime (CPU provider) checks it.
    add_shared(ap, prog, project=None, name=None, batch=1, device="cpu",
               data_help="dataset yaml whose validation images --verify runs on (default: random images)",
               weights_help="quantized checkpoint (.pt from yolo-qat train / qc), or an original YOLOv5/YOLOv7 .pt")
    ap.add_argument("--format", choices=FORMATS, default="onnx")
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


def parse_args(argv=None, prog: str = PROG) -> argparse.Namespace:
    opt = build_parser(prog).parse_args(argv)
    opt.prog = prog
    return opt


def run(a: argparse.Namespace) -> int:
    pipeline.export(a.weights, a.target, a.format, data=a.data, imgsz=a.imgsz, batch=a.batch, opset=a.opset,
                    dynamic=a.dynamic, offset_mode=a.offset_mode, output=a.output, project=a.project, name=a.name,
                    exist_ok=a.exist_ok, verify=a.verify, device=a.device, prog=a.prog)
    return 0


def main(argv=None, prog: str = PROG) -> int:
    return run_main(prog, lambda args: parse_args(args, prog), run, argv)
