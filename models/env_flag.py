"""A process-wide yes/no setting carried by an environment variable (so DDP workers started meanwhile inherit it)."""
from __future__ import annotations

import contextlib
import os


@contextlib.contextmanager
def env_flag(name: str, on: bool):
    """Within the block, ``name=1`` when ``on``; the previous value (or its absence) comes back after. A no-op for
    ``on=False``: a variable the user set still counts."""
    if not on:
        yield
        return
    old = os.environ.get(name)
    os.environ[name] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old
