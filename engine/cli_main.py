"""The one ``main`` wrapper of every ``yolo-qat`` mode: parse, run within the scope of --trust-checkpoint and
--download, and turn what the user can fix into one paragraph on stderr with its exit status (2: input, 1: a
run that failed, 3: QC's fold check) instead of a traceback. Apart from engine/cli_common.py because it
imports the stages' error types, which cli_common's importers (engine/settings.py) must not pull in."""
from __future__ import annotations

from typing import Callable

from yolo_qat.engine.cli_common import EXIT_FAILED, InputError, RunFailed, input_error
from yolo_qat.engine.data_download import allowing_downloads, missing_split_in
from yolo_qat.engine.distill import TeacherMismatchError
from yolo_qat.engine.trainer import TrainingDiverged
from yolo_qat.models.safe_load import MissingClassError, UnsafeCheckpointError, trusting

# What Ultralytics' dataset checks say about a dataset it cannot use (raised as RuntimeError or FileNotFoundError).
DATASET_WORDS = ("No labels found", "No valid images", "Dataset", "images not found")


def run_main(prog: str, parse: Callable, run: Callable, argv=None) -> int:
    """``run(parse(argv))``'s exit status, or the status of the error it ended with (see the module)."""
    try:
        opt = parse(argv)
        with trusting(getattr(opt, "trust_checkpoint", False)), allowing_downloads(getattr(opt, "download", False)):
            return run(opt)
    except InputError as e:
        return input_error(prog, e)
    except RunFailed as e:
        return input_error(prog, e, code=e.code)
    except TrainingDiverged as e:  # not an input error: training failed
        return input_error(prog, e, code=EXIT_FAILED)
    except (UnsafeCheckpointError, MissingClassError, TeacherMismatchError) as e:  # e.g. found by the trainer
        return input_error(prog, e)
    except (RuntimeError, ValueError, FileNotFoundError) as e:
        if missing_split_in(e) is not None:  # found by Ultralytics' trainer, which re-raises it as RuntimeError
            return input_error(prog, missing_split_in(e))
        msg = str(e).strip()
        if any(w in msg for w in DATASET_WORDS):
            return input_error(prog, f"the dataset could not be used: {msg.splitlines()[0]} -- check that the "
                                     f"dataset yaml points at image folders with matching YOLO label .txt files")
        raise
