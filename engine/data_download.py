"""A dataset yaml's ``download:`` runs only when the user asks for it.

Ultralytics' ``check_det_dataset`` (``autodownload=True`` by default, as its trainer and validator call it) runs a
yaml's ``download:`` field when a split's images are missing: ``exec`` of its Python, or its shell command when it
starts with ``bash ``. A data yaml is then code. Here it runs only with ``--download`` (every script that takes
``--data``: train_qat.py, correct_qc.py, val.py, export.py, benchmarks/reproduce.py, benchmarks/deploy_speed.py) or
``YOLO_QAT_DOWNLOAD=1`` (the Python API, DDP workers); otherwise a missing split is one paragraph naming the split,
the path and the flag (``MissingSplitError``).

The project's own calls go through ``check_dataset``; Ultralytics' trainer, validator and exporter call
``check_det_dataset`` themselves, so importing this module (``engine`` does) also points their module-level name at
the same guard (``_guard_ultralytics``), which only ever turns ``autodownload`` off, never on.
"""
from __future__ import annotations

import contextlib
import functools
import os
import re
import sys
from pathlib import Path

import ultralytics.data.utils as data_utils
import yaml
from ultralytics.data.utils import check_det_dataset

from yolo_qat.models.env_flag import env_flag

DOWNLOAD_ENV = "YOLO_QAT_DOWNLOAD"
DOWNLOAD_HOW = (f"--download (train_qat.py, correct_qc.py, val.py, export.py, benchmarks/reproduce.py) or the "
                f"environment variable {DOWNLOAD_ENV}=1 (Python API)")
# Where Ultralytics calls check_det_dataset by its module-level name (its trainer, validator and exporter).
_ULTRALYTICS_CALLERS = ("ultralytics.engine.trainer", "ultralytics.engine.validator", "ultralytics.engine.exporter")


class MissingSplitError(FileNotFoundError):
    """A dataset split whose images are missing, and its yaml's download was not asked for (one paragraph)."""


def download_allowed() -> bool:
    return os.environ.get(DOWNLOAD_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


@contextlib.contextmanager
def allowing_downloads(allow: bool):
    """Within the block, dataset yamls may run their ``download:`` (``--download``); through the environment, so
    that DDP workers started meanwhile inherit it. A no-op for ``allow=False`` (the variable still counts)."""
    with env_flag(DOWNLOAD_ENV, allow):
        yield


def missing_split_paragraph(dataset, split: str, path: str, has_download: bool) -> str:
    where = f"the dataset yaml '{dataset}' has no images for its '{split}' split: '{path}' does not exist"
    if not has_download:
        return f"{where}. Point '{split}:' at the image folder (relative to the yaml's 'path:')."
    return (f"{where}. Its 'download:' field would fetch them, but that runs code from the yaml (a Python or bash "
            f"script), so it runs only when you ask: pass {DOWNLOAD_HOW}, for a yaml you trust, or point '{split}:' "
            f"at images you already have.")


def _has_download(dataset) -> bool:
    path = Path(str(dataset))
    try:
        d = yaml.safe_load(path.read_text(encoding="utf-8", errors="ignore")) if path.is_file() else None
    except (yaml.YAMLError, OSError):
        return False
    return isinstance(d, dict) and bool(d.get("download"))


def _guarded_call(check, dataset, autodownload: bool = True, split: str = ""):
    """``check`` (Ultralytics' check_det_dataset) with the download allowed only when asked for."""
    try:
        return check(dataset, autodownload=autodownload and download_allowed(), split=split)
    except FileNotFoundError as e:
        m = re.search(r"images not found, missing path '([^']*)'", str(e))
        if m is None or isinstance(e, MissingSplitError):
            raise
        raise MissingSplitError(missing_split_paragraph(dataset, split or "val", m.group(1),
                                                        _has_download(dataset))) from None


def check_dataset(dataset, split: str = "") -> dict:
    """The dataset dict of a yaml (Ultralytics' ``check_det_dataset``), its ``download:`` run only when asked for;
    ``MissingSplitError`` (a FileNotFoundError, one paragraph) for a missing split otherwise."""
    return _guarded_call(getattr(check_det_dataset, "__wrapped__", check_det_dataset), dataset, split=split)


def missing_split_in(e: BaseException | None) -> MissingSplitError | None:
    """The MissingSplitError behind ``e`` (Ultralytics' trainer re-raises dataset errors as RuntimeError)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, MissingSplitError):
            return e
        e = e.__cause__ or e.__context__
    return None


def _guard_ultralytics() -> None:
    """Point ``check_det_dataset`` at the guard in Ultralytics' data utils (for modules that import it later) and in
    its trainer, validator and exporter where they are already imported (they hold the name themselves)."""
    for mod in [data_utils, *(sys.modules[n] for n in _ULTRALYTICS_CALLERS if n in sys.modules)]:
        check = getattr(mod, "check_det_dataset", None)
        if check is None or hasattr(check, "__wrapped__"):
            continue
        mod.check_det_dataset = functools.wraps(check)(functools.partial(_guarded_call, check))


_guard_ultralytics()
