import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("YOLO_OFFLINE", "1")
# OpenMP's default busy-waiting makes 2 threads 36-100x slower than 1 on a loaded 2-core machine
# (measured at load 9): CI runs beside other jobs. Must be set before torch loads libgomp.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

from builders import tiny_dataset  # noqa: E402

torch.set_num_threads(1)  # what Ultralytics' select_device sets on a 2-core machine


def pytest_collection_modifyitems(items):
    """tests/e2e/ runs whole pipelines (training, installs, subprocesses): marked slow so that a quick local loop can
    leave it out (pytest -m "not slow"); CI runs everything."""
    e2e = ROOT / "tests" / "e2e"
    for item in items:
        if e2e in Path(item.fspath).parents:
            item.add_marker("slow")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The embedded dataset at its smallest (8 train / 4 val images, 64 px): one copy per test module, since
    tests write caches and runs beside it."""
    return tiny_dataset(tmp_path_factory.mktemp("ds"))
