"""The per-epoch logs of a resumed run, made to agree with the checkpoint it resumes from.

Ultralytics writes an epoch's row of ``results.csv`` (and the trainer its rows of ``oscillations.csv``) before
that epoch's checkpoint: a run killed in between leaves a row for an epoch that ``last.pt`` does not hold, which
the resumed run then logs again; and the ``time`` column (seconds since the trainer started) restarts at 0.
On resume, ``trim_epoch_logs`` drops the rows past the checkpoint's epoch and returns the time already spent,
which ``continued_clock`` adds to the time column of the rows written after it.
"""
from __future__ import annotations

import csv
import os
from contextlib import contextmanager
from pathlib import Path

from ultralytics.utils import RANK


def trim_csv(path: str | Path, last_epoch: int) -> list[dict]:
    """Keep the header and the rows whose ``epoch`` column (1-based, the first column) is <= ``last_epoch``;
    return the kept rows as dicts (stripped keys). A missing file gives []. Rewritten atomically."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    if not lines:
        return []
    keep, rows = [lines[0]], []
    head = [h.strip() for h in next(csv.reader([lines[0]]))]
    for line in lines[1:]:
        values = next(csv.reader([line]), [])
        try:
            epoch = float(values[0])
        except (IndexError, ValueError):
            continue  # a torn last line of the killed process
        if epoch <= last_epoch:
            keep.append(line if line.endswith("\n") else line + "\n")
            rows.append(dict(zip(head, (v.strip() for v in values))))
    if len(keep) != len(lines) or not lines[-1].endswith("\n"):
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        tmp.write_text("".join(keep), encoding="utf-8")
        os.replace(tmp, path)
    return rows


def trim_epoch_logs(trainer, ckpt: dict) -> float:
    """On resume from ``ckpt`` (its ``epoch``: the 0-based epoch it saved): drop the rows of later epochs from
    results.csv and oscillations.csv; return the time column's value of the last row kept (0 when none)."""
    if RANK not in {-1, 0} or ckpt is None:
        return 0.0
    last = int(ckpt.get("epoch", -1)) + 1  # the csv's epoch column is 1-based
    rows = trim_csv(trainer.csv, last)
    trim_csv(Path(trainer.save_dir) / "oscillations.csv", last)
    try:
        return float(rows[-1]["time"]) if rows else 0.0
    except (KeyError, ValueError):
        return 0.0


@contextmanager
def continued_clock(trainer):
    """Around Ultralytics' ``save_metrics``: its time column counts on from the resumed run's last row.
    Only that column: the trainer's own clock (``args.time``, the epoch-time estimate) stays this process's."""
    offset = getattr(trainer, "resumed_time", 0.0)
    trainer.train_time_start -= offset
    try:
        yield
    finally:
        trainer.train_time_start += offset
