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


def test_step_time_prints_the_variants_ratios():
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks/step_time.py"), "--imgsz", "64", "--batch", "2",
                          "--steps", "1"], capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.splitlines()
    for variant in ("w4a4 ref:", "w4a4 recompute:"):
        assert any(ln.strip().startswith(variant) and "ratio to fp" in ln for ln in lines)
    assert any(ln.startswith("ratio w4a4/fp = ") and "fused LSQ kernel" in ln for ln in lines)
