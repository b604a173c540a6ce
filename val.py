"""Box and mask mAP of FP / QAT / QC checkpoints and exported ONNX files (Ultralytics' validator beside pycocotools).

The same as `yolo-qat val` (yolo_qat/cli.py); `python val.py --help` lists the flags."""
import sys

from yolo_qat.cli import main as yolo_qat


def main(argv=None) -> int:
    return yolo_qat(["val", *(sys.argv[1:] if argv is None else argv)], prog="val.py")


if __name__ == "__main__":
    sys.exit(main())
