"""benchmarks/speed.py at a tiny size: every ratio line is printed (no timing asserts)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_speed_prints_all_ratios():
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks/speed.py"), "--imgsz", "64", "--batch", "2",
                          "--steps", "1"], capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    for label in ("QAT / FP", "QC / QAT", "quant / FP   =", "peak memory growth"):
        line = next(ln for ln in res.stdout.splitlines() if label in ln)
        assert "=" in line and "nan" not in line
