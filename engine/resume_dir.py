"""Where a resumed run writes: the directory of the ``last.pt`` it resumes, whatever the checkpoint says.

Ultralytics' resume takes ``save_dir`` / ``project`` / ``name`` from the checkpoint's ``train_args``, so an edited
``last.pt`` could make the run create and overwrite ``weights/*.pt``, ``results.csv``, ... in any directory the user
can write (another run's weights included). The run directory is told by the file's own path instead
(``.../<run>/weights/last.pt`` -> ``.../<run>``; a ``last.pt`` elsewhere -> its folder), and a checkpoint that records
another directory gets a one-line note.
"""
from __future__ import annotations

import sys
from pathlib import Path


def run_dir_of(last: str | Path) -> Path:
    """The run directory a ``last.pt`` belongs to: the folder above ``weights/``, else the file's folder."""
    p = Path(last).resolve()
    return p.parent.parent if p.parent.name == "weights" else p.parent


def resumed_save_dir(last: str | Path, recorded: str | Path | None) -> Path:
    """``run_dir_of(last)``; prints one note when the checkpoint recorded another ``save_dir``."""
    run = run_dir_of(last)
    if recorded and Path(recorded).expanduser().resolve() != run:
        print(f"resume: note: '{last}' records the run directory '{recorded}'; resuming into the file's own run "
              f"directory '{run}' (a resumed run writes only beside the checkpoint it continues)", file=sys.stderr)
    return run
