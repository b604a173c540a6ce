"""QC, quantization correction of a QAT checkpoint: an affine correction of every quantized conv's output, trained briefly and folded away.

The same as `yolo-qat qc` (yolo_qat/cli.py); `python correct_qc.py --help` lists the flags."""
import sys

from yolo_qat.cli import main as yolo_qat


def main(argv=None) -> int:
    return yolo_qat(["qc", *(sys.argv[1:] if argv is None else argv)], prog="correct_qc.py")


if __name__ == "__main__":
    sys.exit(main())
