"""results.csv / oscillations.csv after a crash between an epoch's log write and its checkpoint, then --resume
(engine/resume_log.py): one row per epoch, and the time column goes on from the checkpoint's row."""
import csv
import os
import subprocess
import sys
from pathlib import Path


from yolo_qat.engine.resume_log import trim_csv

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--imgsz", "64", "--batch", "4", "--workers", "0", "--calib-batches", "1", "--warmup-epochs", "0",
        "--exist-ok"]


def test_trim_csv_keeps_rows_up_to_the_epoch(tmp_path):
    p = tmp_path / "results.csv"
    p.write_text("epoch,time,x\n1,2.5,0.1\n2,5,0.2\n3,7.5,0.3\n3,1")  # the last line torn by the kill
    rows = trim_csv(p, 2)
    assert p.read_text() == "epoch,time,x\n1,2.5,0.1\n2,5,0.2\n" and rows[-1] == {"epoch": "2", "time": "5", "x": "0.2"}
    assert trim_csv(p, 2) == rows and p.read_text() == "epoch,time,x\n1,2.5,0.1\n2,5,0.2\n"  # nothing to drop
    assert trim_csv(tmp_path / "missing.csv", 1) == []
    assert trim_csv(p, 0) == [] and p.read_text() == "epoch,time,x\n"


# The process dies after Ultralytics wrote epoch 2's rows and before epoch 2's checkpoint (last.pt: epoch 1).
CRASH_SCRIPT = """
import os, sys
sys.path.insert(0, {root!r})
import train_qat  # noqa: F401  (sets YOLO_OFFLINE, sys.path)
from yolo_qat.engine.cli import main
from yolo_qat.engine.trainer import QATTrainerMixin

save = QATTrainerMixin.save_model
def save_model(self):
    if self.epoch == 1:
        assert (self.save_dir / "results.csv").read_text().count("\\n") == 3  # header + epochs 1 and 2 logged
        os._exit(17)
    return save(self)
QATTrainerMixin.save_model = save_model
sys.exit(main({args!r}))
"""


def read(path):
    with open(path, newline="", encoding="utf-8") as f:
        return [{k.strip(): v.strip() for k, v in r.items()} for r in csv.DictReader(f)]


def test_crash_between_log_and_checkpoint_then_resume(data, tmp_path):
    run = tmp_path / "runs/crash"
    args = ["--data", str(data), "--cfg", "yolov5nu", "--epochs", "3", "--method", "lsq", "--ema-decay", "0.9",
            "--ema-tau", "2", "--project", str(tmp_path / "runs"), "--name", "crash", *TINY]
    env = {**os.environ, "YOLO_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", CRASH_SCRIPT.format(root=str(ROOT), args=args)], cwd=tmp_path,
                       capture_output=True, text=True, env=env)
    assert r.returncode == 17, r.stderr[-3000:]
    before = read(run / "results.csv")
    assert [x["epoch"] for x in before] == ["1", "2"]  # epoch 2 logged, its checkpoint never written
    osc_layers = sum(x["epoch"] == "1" for x in read(run / "oscillations.csv"))
    assert osc_layers > 10 and sum(x["epoch"] == "2" for x in read(run / "oscillations.csv")) == osc_layers

    r = subprocess.run([sys.executable, str(ROOT / "train_qat.py"), "--resume", str(run / "weights/last.pt")],
                       cwd=tmp_path, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = read(run / "results.csv")
    assert [x["epoch"] for x in rows] == ["1", "2", "3"]  # epoch 2 once: the resumed run's
    assert rows[0] == before[0]  # the checkpoint's epochs are kept as they were
    times = [float(x["time"]) for x in rows]
    assert times[0] < times[1] < times[2] and times[1] > times[0] + 0.01  # counts on from epoch 1's row
    osc = [x["epoch"] for x in read(run / "oscillations.csv")]
    assert [osc.count(e) for e in ("1", "2", "3")] == [osc_layers] * 3
