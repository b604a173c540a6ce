"""The command-line conventions every script shares (train_qat.py, correct_qc.py, val.py, export.py,
benchmarks/reproduce.py): the same flags with one meaning each, one boolean style, one error format.

- ``--weights --trust-checkpoint --data --download --imgsz --batch --device --project --name --exist-ok`` (``add_shared``);
- booleans are ``--flag`` / ``--no-flag`` (``argparse.BooleanOptionalAction``) everywhere;
- a bad input is one paragraph ``<script>: error: <what is wrong and how to fix it>`` on stderr and exit
  status 2, the format and status of argparse's own errors (``InputError`` + ``input_error``); a run that
  fails after it started ends the same way with status 1, or 3 for QC's fold check (``RunFailed``);
  engine/cli_main.py's ``run_main`` is the one wrapper that maps them;
- outputs go to ``<project>/<name>/`` (``runs/<task>/<name>/`` by default), made unique as Ultralytics'
  trainer does (``exp``, ``exp-2``, ...) unless ``--exist-ok`` (``output_dir``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ultralytics.utils.files import increment_path

from yolo_qat.engine.device import DEFAULT_HELP, device_arg

EXIT_FAILED = 1  # the run started and failed (training diverged, an output failed its check)
EXIT_INPUT = 2  # argparse exits with 2 on a bad flag; a bad value found later is the same kind of error
EXIT_FOLD = 3  # QC's fold check failed: both checkpoints are kept, so the run is not lost

HELP = {
    "data": "dataset yaml (default: the embedded offline dataset, generated on first use)",
    "imgsz": "image size, one int (default: the size the checkpoint was trained at, 640 when it does not say)",
    "batch": "images per batch",
    "project": "outputs go to <project>/<name>/",
    "name": "run name: outputs go to <project>/<name>/ (<name>-2, -3, ... when it exists, unless --exist-ok)",
    "exist_ok": "write into an existing <project>/<name>/ instead of making a new one",
    "download": "let the dataset yaml's 'download:' fetch a missing split (the same as YOLO_QAT_DOWNLOAD=1): it "
                "runs the yaml's Python or bash script, so only for yamls you trust. Without it a missing split is "
                "an error naming the split and its path",
    "trust_checkpoint": "load every checkpoint in full (torch.load weights_only=False; the same as "
                        "YOLO_QAT_TRUST_CHECKPOINT=1): only for files you trust, since a .pt can run code when "
                        "unpickled. Without it, checkpoints load safely and one naming anything beyond the YOLO "
                        "module classes and plain data is refused (docs/safe-loading.md)",
}


class InputError(Exception):
    """A problem with what the user passed: reported as one paragraph, no traceback (``input_error``)."""


class RunFailed(Exception):
    """The run started and failed: reported as one paragraph ending the command with exit status ``code``."""

    def __init__(self, message, code: int = EXIT_FAILED):
        super().__init__(message)
        self.code = code


def input_error(prog: str, message, code: int = EXIT_INPUT) -> int:
    """Print ``<prog>: error: <message>`` to stderr and return the exit status to end with."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    return code


def add_shared(p: argparse.ArgumentParser, prog: str, *, project: str | None, weights_help: str | None,
               weights_nargs: str | None = None, weights_required: bool = True, imgsz: int | None = None,
               batch: int = 16, device: str = "", device_now: bool = True, name: str | None = "exp",
               exist_ok: bool = False, data_help: str = HELP["data"]) -> None:
    """The shared flags; the keywords are the script's defaults. ``weights_help=None`` leaves --weights out
    (a script that reads no checkpoint of its own). ``device_now``: resolve and announce --device while
    parsing (an unavailable device is then argparse's error); train_qat.py resolves it later itself
    (multi-GPU, and the device of a resumed run when --device is left out)."""
    if weights_help is not None:
        p.add_argument("--weights", nargs=weights_nargs, required=weights_required, help=weights_help)
        p.add_argument("--trust-checkpoint", action=argparse.BooleanOptionalAction, default=False,
                       help=HELP["trust_checkpoint"])
    p.add_argument("--data", help=data_help)
    p.add_argument("--download", action=argparse.BooleanOptionalAction, default=False, help=HELP["download"])
    p.add_argument("--imgsz", type=int, default=imgsz, help=HELP["imgsz"])
    p.add_argument("--batch", type=int, default=batch, help=HELP["batch"])
    p.add_argument("--device", default=device, type=device_arg(prog) if device_now else str,
                   help=DEFAULT_HELP if device == "" else f"{DEFAULT_HELP.split(' (')[0]} (default: {device})")
    p.add_argument("--project", default=project, help=HELP["project"])
    p.add_argument("--name", default=name, help=HELP["name"])
    p.add_argument("--exist-ok", action=argparse.BooleanOptionalAction, default=exist_ok, help=HELP["exist_ok"])


def output_dir(opt: argparse.Namespace) -> Path:
    """``<project>/<name>``, or the next free ``<name>-N`` when it exists and --exist-ok is off: the rule of
    Ultralytics' trainer (train_qat.py's runs), so every script names its outputs alike."""
    return Path(increment_path(Path(opt.project) / opt.name, exist_ok=opt.exist_ok))
