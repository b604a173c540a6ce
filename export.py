"""Deployable artifacts of a quantized YOLO checkpoint: ONNX for its deploy target, or a bit-packed integer checkpoint.

The same as `yolo-qat export` (yolo_qat/cli.py); `python export.py --help` lists the flags."""
import sys

from yolo_qat.cli import main as yolo_qat


def main(argv=None) -> int:
    return yolo_qat(["export", *(sys.argv[1:] if argv is None else argv)], prog="export.py")


if __name__ == "__main__":
    sys.exit(main())
