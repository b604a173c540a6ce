"""What the load limits and the recursive model-yaml rule cost: the safe loader of an earlier commit (default: the
one before them) against the working tree's, on yolov5s-size checkpoints, interleaved in one process.

    python benchmarks/load_cost.py                  # yolov5su: YOLO.save (fp16) and a W4A4 QAT checkpoint (fp32)
    python benchmarks/load_cost.py --repeats 31 --before <commit>

Prints the median load time of each loader and their ratio (new / old) per checkpoint. The old loader is that
commit's models/safe_load.py, imported beside the current one (both build their allowlist before timing).
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BEFORE = "0d77736"  # the last commit before the load limits and the recursive yaml rule


def old_loader(rev: str):
    """``safe_load`` of models/safe_load.py at ``rev``, imported as a module of the ``models`` package."""
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:models/safe_load.py"], check=True,
                         capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "safe_load_before.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("models._safe_load_before", path)
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = "models"
    spec.loader.exec_module(mod)
    return mod.safe_load


def checkpoints(d: Path) -> dict[str, Path]:
    import torch
    from ultralytics import YOLO

    from yolo_qat.models.checkpoint import save_checkpoint
    from yolo_qat.quant import calibrate, quantize_model

    yolo = YOLO("yolov5su.yaml")
    yolo.save(d / "yolov5su.pt")
    q = quantize_model(yolo.model, {"w_bits": 4, "a_bits": 4})
    calibrate(q, [torch.rand(1, 3, 64, 64)], num_batches=1)
    return {"yolov5su YOLO.save (fp16)": d / "yolov5su.pt",
            "yolov5su W4A4 QAT (fp32)": save_checkpoint(d / "yolov5su-w4a4.pt", q)}


def timed(load, path: Path, times: list) -> None:
    t = time.perf_counter()
    load(path)
    times.append((time.perf_counter() - t) * 1e3)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--before", default=BEFORE, help="commit whose models/safe_load.py is the old loader")
    a = ap.parse_args(argv)
    import torch

    from yolo_qat.models.safe_load import safe_load as new

    torch.set_num_threads(1)
    old = old_loader(a.before)
    with tempfile.TemporaryDirectory() as d:
        for name, path in checkpoints(Path(d)).items():
            old(path), new(path)  # allowlists built, files in the page cache
            t_old, t_new = [], []
            for _ in range(a.repeats):  # interleaved: load drift on a shared machine hits both alike
                timed(old, path, t_old)
                timed(new, path, t_new)
            mo, mn = statistics.median(t_old), statistics.median(t_new)
            print(f"{name} ({path.stat().st_size / 1e6:.1f} MB): before {mo:.1f} ms, now {mn:.1f} ms, "
                  f"ratio {mn / mo:.3f} (medians of {a.repeats})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
