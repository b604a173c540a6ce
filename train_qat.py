"""QAT of Ultralytics YOLO detectors and segmenters (LSQ, dampening, freezing; EMA of weights and scales).

The same as `yolo-qat train` (yolo_qat/cli.py); `python train_qat.py --help` lists the flags."""
import sys

from yolo_qat.cli import main as yolo_qat


def main(argv=None) -> int:
    return yolo_qat(["train", *(sys.argv[1:] if argv is None else argv)], prog="train_qat.py")


if __name__ == "__main__":
    sys.exit(main())
