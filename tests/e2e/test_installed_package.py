"""The package as pip installs it (not the clone): from another directory it imports as ``yolo_qat`` alone, claims no
generic top-level name, and reads the original YOLOv5/YOLOv7 checkpoints and the previous release's files, whose
pickles spell ``models.*`` / ``quant.*`` at the top level."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT.parent / "shared" / "fixtures" / "original-yolo"
PREV = ROOT / "tests" / "fixtures" / "prev-release"
GENERIC = {"models", "quant", "engine", "deploy", "data", "configs", "utils", "tests", "benchmarks"}
SKIP_COPY = shutil.ignore_patterns(".git", ".venv*", "datasets", "runs", "build", "*.egg-info", "__pycache__", "tests",
                                   "docs", "benchmarks")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """``pip install --target`` of a copy of the clone (offline: no build isolation, no dependencies)."""
    base = tmp_path_factory.mktemp("pkg")
    src, target = base / "src", base / "site"
    shutil.copytree(ROOT, src, ignore=SKIP_COPY)
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--no-index", "--target", str(target), str(src)], capture_output=True, text=True)
    if r.returncode != 0 and "setuptools" in r.stderr.lower() and "no module named" in r.stderr.lower():
        pytest.skip("setuptools is not installed in this environment, so the package cannot be built offline")
    assert r.returncode == 0, r.stderr[-3000:]
    return target


def run_installed(target: Path, code: str, cwd: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(target), "YOLO_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_only_the_project_namespace_is_installed(installed):
    top = {p.name for p in installed.iterdir()}
    assert {"yolo_qat", "bin"} <= top and not (top & GENERIC), top
    assert (installed / "bin" / "yolo-qat").is_file()
    pkg = installed / "yolo_qat"
    for data_file in ("models/yolov5n.yaml", "models/yolov7-tiny.yaml", "data/coco.yaml", "configs/ema_w4a4.yaml",
                      "quant/csrc/lsq_cpu.cpp"):
        assert (pkg / data_file).is_file(), data_file


CHECK = r"""
import importlib, json, pkgutil, sys
import torch
before = set(sys.modules)
import yolo_qat
mods = [m.name for m in pkgutil.walk_packages(yolo_qat.__path__, "yolo_qat.")
        if "triton" not in m.name and not m.name.endswith("__main__")]  # __main__ runs the command
for name in mods:
    importlib.import_module(name)
new_top = sorted({k.split(".")[0] for k in set(sys.modules) - before})
from yolo_qat.deploy import load_packed
from yolo_qat.models.checkpoint import load_checkpoint
fix, prev = %r, %r
classes = {}
for name in ("yolov5n-orig.pt", "yolov5n-seg-orig.pt", "yolov7-tiny-orig.pt"):
    model, _ = load_checkpoint(f"{fix}/{name}")
    classes[name] = type(model).__module__ + "." + type(model).__name__
model, _ = load_checkpoint(f"{prev}/qat-yolov5nu-tiny-w4a4.pt")
packed = load_packed(f"{prev}/qat-yolov5nu-tiny-w4a4.qpk")
refs = torch.load(f"{prev}/qat-yolov5nu-tiny-w4a4.refs.pt", weights_only=True)
with torch.no_grad():
    y, yp = model(refs["x"])[0], packed(refs["x"])[0]
rel = lambda a, b: float((a - b).abs().max() / b.abs().max())
files = {m.__name__: getattr(m, "__file__", "") or "" for k, m in list(sys.modules.items()) if k.startswith("yolo_qat")}
print(json.dumps({"new_top": new_top, "n_modules": len(mods), "classes": classes, "rel": rel(y, refs["checkpoint"]),
                  "rel_packed": rel(yp, refs["packed"]), "files": files}))
"""


def test_installed_package_imports_alone_and_loads_old_checkpoints(installed, tmp_path):
    res = run_installed(installed, CHECK % (str(FIX), str(PREV)), cwd=tmp_path)
    assert res["n_modules"] > 40
    assert not set(res["new_top"]) & GENERIC, res["new_top"]
    assert all(f.startswith(str(installed)) for f in res["files"].values() if f), \
        [f for f in res["files"].values() if f and not f.startswith(str(installed))]
    assert res["classes"] == {"yolov5n-orig.pt": "yolo_qat.models.yolo.DetectionModel",
                              "yolov5n-seg-orig.pt": "yolo_qat.models.yolo.SegmentationModel",
                              "yolov7-tiny-orig.pt": "yolo_qat.models.yolo.DetectionModel"}
    # the previous release's outputs, up to another processor's float summation order
    assert res["rel"] < 1e-4 and res["rel_packed"] < 1e-4, res


@pytest.mark.parametrize("how", ["console-script", "python-m"])
def test_installed_command_runs_from_another_directory(installed, tmp_path, how):
    cmd = [str(installed / "bin" / "yolo-qat")] if how == "console-script" else [sys.executable, "-m", "yolo_qat"]
    env = {**os.environ, "PYTHONPATH": str(installed), "YOLO_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([*cmd, "val", "--help"], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "usage: yolo-qat val" in r.stdout, (r.stdout[-2000:], r.stderr[-2000:])
    r = subprocess.run([*cmd, "nonsense"], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "unknown mode 'nonsense'" in r.stderr, r.stderr[-2000:]
