"""Mixed precision that pays on the deploy target: per-layer widths under a budget, written as a recipe.

The same as `yolo-qat allocate` (yolo_qat/cli.py); `python mixed_precision.py --help` lists the flags."""
import sys

from yolo_qat.cli import main as yolo_qat


def main(argv=None) -> int:
    return yolo_qat(["allocate", *(sys.argv[1:] if argv is None else argv)], prog="mixed_precision.py")


if __name__ == "__main__":
    sys.exit(main())
