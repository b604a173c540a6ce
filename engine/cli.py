"""``yolo-qat train`` (and ``python train_qat.py``): parse the flags (engine/train_flags.py; defaults < --config
recipe < command line), check them before anything slow, resolve the model source once, then the optional FP
stage and QAT through the pipeline API, and the FP-vs-QAT table."""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from yolo_qat import pipeline
from yolo_qat.engine.calib import resolve_data
from yolo_qat.engine.cli_common import InputError
from yolo_qat.engine.cli_main import run_main
from yolo_qat.engine.data_download import check_dataset
from yolo_qat.engine.demo import pin_threads, reference_lines
from yolo_qat.engine.device import announce, default_note, resolve_device
from yolo_qat.engine.settings import parse_with_config
from yolo_qat.engine.source import ModelSource, resolve_source
from yolo_qat.engine.train_flags import DEMO, build_parser
from yolo_qat.engine.training import TrainResult, check_loss_hyp, check_settings, check_ultralytics_args
from yolo_qat.engine.training import qat_config  # noqa: F401  (the QAT settings of parsed flags, for callers)
from yolo_qat.engine.validate import format_table, ultralytics_metrics
from yolo_qat.models.safe_load import MissingClassError, UnsafeCheckpointError, safe_load

PROG = "train_qat.py"


def parse_args(argv=None, prog: str = PROG) -> argparse.Namespace:
    demo = list(sys.argv[1:] if argv is None else argv) == []
    opt = parse_with_config(build_parser(prog), argv, DEMO if demo else None)  # no arguments at all: the offline demo
    opt.demo, opt.prog = demo, prog
    return opt


def resolve_inputs(opt) -> tuple[str, ModelSource]:
    """(dataset yaml, model source), checked; --imgsz left out becomes the checkpoint's training size (640 for
    a model yaml). The run's first step that reads files (and may generate the dataset)."""
    try:
        data = resolve_data(opt.data)
    except FileNotFoundError as e:
        raise InputError(str(e)) from None
    source = resolve_source(opt.weights or opt.cfg or DEMO["cfg"])
    opt.imgsz = opt.imgsz or source.imgsz
    return data, source


def check_data(data: str) -> None:
    """The dataset yaml, checked before any training: a missing split ends the run with one paragraph (its
    download: runs only with --download, engine/data_download.py), as do Ultralytics' checks of its keys."""
    try:
        check_dataset(data)
    except FileNotFoundError as e:
        raise InputError(str(e)) from None
    except (SyntaxError, TypeError, ValueError) as e:
        raise InputError(f"--data '{data}' is not a usable dataset yaml: {' '.join(str(e).split())}") from None


def runs_fp_stage(opt) -> bool:
    return opt.fp_epochs > 0 and not str(opt.weights or "").endswith(".pt")


def train_fp(opt, source: ModelSource, data: str) -> TrainResult:
    """The FP stage of this command line (``yolo_qat.train_fp`` with its flags)."""
    return pipeline.train_fp(source, data, **settings(opt))


def settings(opt) -> dict:
    """The parsed flags as the pipeline's keywords (the same names)."""
    return {k: v for k, v in vars(opt).items() if k not in ("demo", "prog", "config", "weights", "cfg", "data",
                                                             "resume", "trust_checkpoint", "download")}


def metrics_row(metrics: dict | None, task: str) -> dict:
    """A row of engine.validate.format_table from a trainer's metrics (Ultralytics' keys)."""
    return {"task": task, "ultralytics": ultralytics_metrics(dict(metrics or {}), task)}


def run(opt, callbacks: dict | None = None) -> dict:
    if opt.resume:
        return resume(opt, callbacks)
    qat = check_settings(opt, fp_stage=runs_fp_stage(opt))  # bits, method, Ultralytics' ranges: before anything slow
    use_device(opt)
    if getattr(opt, "demo", False):
        pin_threads()  # the thread count changes the numbers: the demo's reference is for 1 thread
    data, source = resolve_inputs(opt)
    check_data(data)
    check_loss_hyp(opt, source)
    rows = {}
    if not source.is_checkpoint and opt.fp_epochs > 0:
        fp = train_fp(opt, source, data)
        rows["FP (trained here)"] = metrics_row(fp.metrics, source.task)
        source = resolve_source(str(fp.weights))
    elif source.is_checkpoint:
        with tempfile.TemporaryDirectory() as tmp:  # Ultralytics' numbers only: nothing to keep
            rows["FP (--weights)"] = pipeline.validate(source, data, imgsz=opt.imgsz, batch=opt.batch,
                                                       device=opt.device, save_dir=tmp, pycocotools=False,
                                                       workers=opt.workers)
    res = pipeline.train_qat(source, data, callbacks=callbacks, **settings(opt))
    bits = f"W{qat.recipe['w_bits']}A{qat.recipe['a_bits']}"
    rows[f"QAT {bits} {qat.method}" + ("+EMA" if qat.ema_decay else "")] = metrics_row(res.metrics, source.task)
    rows.update({k: metrics_row(m, source.task) for k, m in getattr(res.trainer, "extra_rows", {}).items()})
    print("\n" + format_table(rows))
    if getattr(opt, "demo", False):
        print(reference_lines())
    print(f"\nQAT run: {res.save_dir}  (weights/last.pt, weights/best.pt, results.csv, oscillations.csv, args.yaml)")
    return rows


def resume(opt, callbacks=None) -> dict:
    path = opt.resume if isinstance(opt.resume, str) else None
    if path is None:
        runs = sorted(Path(opt.project).glob("*/weights/last.pt"), key=lambda p: p.stat().st_mtime)
        if not runs:
            raise InputError(f"--resume: no run to resume under '{opt.project}': pass the path of a run's weights/last.pt")
        path = str(runs[-1])
    if not Path(path).is_file():
        raise InputError(f"--resume '{path}' does not exist: pass the path of a QAT run's weights/last.pt")
    try:
        ckpt = safe_load(path)
    except (UnsafeCheckpointError, MissingClassError) as e:
        raise InputError(f"--resume: {e}") from None
    except Exception as e:  # noqa: BLE001  (any unreadable file is one paragraph, not a traceback)
        raise InputError(f"--resume '{path}' is not a readable checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or "train_state" not in ckpt or "qat_args" not in ckpt:
        raise InputError(f"--resume '{path}' is not the last.pt of an unfinished train_qat.py run (it holds no QAT "
                         f"training state); start a new run with --weights instead")
    if ckpt.get("epoch", -1) + 1 >= ckpt["train_args"]["epochs"]:
        raise InputError(f"--resume '{path}': the run already finished all {ckpt['train_args']['epochs']} epochs")
    check_ultralytics_args({"workers": opt.workers}, {})
    use_device(opt, ckpt["train_args"].get("device"))
    res = pipeline.resume_qat(path, device=opt.device, workers=opt.workers, callbacks=callbacks, ckpt=ckpt)
    rows = {"QAT (resumed)": metrics_row(res.metrics, res.task)}
    print("\n" + format_table(rows))
    return rows


def use_device(opt, resumed_device=None) -> None:
    """Resolve --device before anything slow and say which it is. Left out: Ultralytics' choice, or on
    --resume the run's own device (as Ultralytics resumes every argument not given)."""
    request, note = opt.device, default_note(opt.device)
    if request in (None, "") and resumed_device not in (None, ""):
        request, note = resumed_device, "the resumed run's device; --device to change it"
    try:
        opt.device = resolve_device(request, multi=True)
    except ValueError as e:
        raise InputError(f"--device: {e}") from None
    announce(getattr(opt, "prog", PROG), opt.device, note)


def main(argv=None, callbacks: dict | None = None, prog: str = PROG) -> int:
    """The command: exit status 0, 2 for an input error (one paragraph on stderr), 1 when training diverged."""
    def train(opt) -> int:
        run(opt, callbacks)
        return 0

    return run_main(prog, lambda args: parse_args(args, prog), train, argv)
