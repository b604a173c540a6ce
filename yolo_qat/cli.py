"""``yolo-qat <mode> [flags]``: one command with a mode per stage, as Ultralytics' ``yolo`` has, so that
installing the package puts one name on the PATH instead of generic ones such as ``val`` or ``export``
(a shell builtin). Each mode takes the flags of the script of the same job in the clone (train_qat.py,
correct_qc.py, val.py, export.py, mixed_precision.py), which call these modes."""
from __future__ import annotations

import os
import sys

os.environ.setdefault("YOLO_OFFLINE", "1")  # nothing may be downloaded at run time (before Ultralytics reads it)

from yolo_qat.engine import cli as train_cli  # noqa: E402
from yolo_qat.engine import cli_allocate, cli_export, cli_qc, cli_val  # noqa: E402

# mode -> (its main(argv, prog=...), the script of the clone that runs it, what it does)
MODES = {
    "train": (train_cli.main, "train_qat.py", "QAT from an FP checkpoint or a model yaml (optionally FP training "
                                              "first); no flags at all: the offline demo"),
    "qc": (cli_qc.main, "correct_qc.py", "quantization correction of a QAT checkpoint, folded into it"),
    "val": (cli_val.main, "val.py", "box / mask mAP of checkpoints and exported .onnx files"),
    "export": (cli_export.main, "export.py", "ONNX for the deploy target, or a bit-packed integer checkpoint"),
    "allocate": (cli_allocate.main, "mixed_precision.py", "per-layer widths under a budget, written as a recipe"),
}
USAGE = "usage: yolo-qat {" + ",".join(MODES) + "} [flags]   (yolo-qat <mode> --help for its flags)"


def help_text() -> str:
    lines = [USAGE, "", "Low-bit quantization-aware training of YOLO detectors and segmenters, and integer "
                        "deployment.", "", "modes:"]
    lines += [f"  {mode:<9} {what} (python {script} in the clone)" for mode, (_, script, what) in MODES.items()]
    return "\n".join(lines)


def main(argv=None, prog: str | None = None) -> int:
    """Run ``argv`` = [mode, *flags]; ``prog`` names the command in messages (default ``yolo-qat <mode>``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(help_text())
        return 0
    mode, flags = argv[0], argv[1:]
    if mode not in MODES:
        print(f"{USAGE}\nyolo-qat: error: unknown mode '{mode}': choose one of {', '.join(MODES)}", file=sys.stderr)
        return 2
    try:
        return MODES[mode][0](flags, prog=prog or f"yolo-qat {mode}")
    except SystemExit as e:  # argparse's --help and usage errors
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 2


def entrypoint() -> None:
    """The console script: ``yolo-qat`` as installed by pip."""
    sys.exit(main())
