"""benchmarks/speed.py and benchmarks/step_time.py at the smallest size, called in-process: every line
they print is there and its ratios are the finite ratios of the times (or memory) they measured.
Nothing here depends on how fast the machine is (no timing asserts, no timeouts)."""
import math
import re

import pytest
import torch

from benchmarks import speed, step_time
from yolo_qat.engine.distill import DistillationCriterion

# One thread: on a busy machine two intra-op threads can make each step ~30x slower (they spin-wait).
TINY = ["--imgsz", "64", "--batch", "2", "--steps", "1", "--threads", "1"]


@pytest.fixture(autouse=True)
def keep_threads():
    n = torch.get_num_threads()  # both scripts set their own thread count
    yield
    torch.set_num_threads(n)


def line_with(lines: list[str], label: str) -> str:
    found = [ln for ln in lines if label in ln]
    assert len(found) == 1, (label, lines)
    return found[0]


def ratio_in(line: str) -> str:
    m = re.search(r"=\s+(\S+)", line)
    assert m, line
    return m.group(1)


def test_speed_prints_all_ratios(capsys):
    res = speed.main(TINY)
    lines = capsys.readouterr().out.splitlines()
    t, mem = res["times_s"], res["memory_mb"]
    assert set(t) == {"fp_step", "qat_step", "qat_distill_step", "qat_pass", "qc_pass", "fp_eval", "q_eval"}
    assert all(math.isfinite(v) and v > 0 for v in t.values()), t
    assert any(ln.startswith("W4A4 vs FP, yolov5nu.yaml, imgsz 64, batch 2") for ln in lines), lines
    for label, num, den in (("training step   QAT / FP", "qat_step", "fp_step"),
                            ("training step   QAT+distill / FP", "qat_distill_step", "fp_step"),
                            ("training step   QAT+distill / QAT", "qat_distill_step", "qat_step"),
                            ("pass over 3 batches  QC / QAT", "qc_pass", "qat_pass"),
                            ("validation images/s  quant / FP", "fp_eval", "q_eval")):  # img/s: inverse times
        assert ratio_in(line_with(lines, label)) == f"{t[num] / t[den]:.3f}"

    assert set(mem) == {"fp", "q", "q-recompute", "q-distill"}
    grow = {k: v["peak_mb"] - v["base_mb"] for k, v in mem.items()}
    assert all(math.isfinite(v["base_mb"]) and math.isfinite(v["peak_mb"]) and v["base_mb"] > 0
               for v in mem.values()), mem
    memory, recompute = line_with(lines, "peak memory growth   quant / FP"), line_with(lines, "with --recompute-input")
    distill = line_with(lines, "with --distill")
    if grow["fp"] > 0:
        assert ratio_in(memory) == f"{grow['q'] / grow['fp']:.3f}"
        assert ratio_in(recompute) == f"{grow['q-recompute'] / grow['fp']:.3f}"
        assert ratio_in(distill) == f"{grow['q-distill'] / grow['fp']:.3f}"
    else:  # the documented output when the FP steps did not grow the resident set at all
        assert "n/a" in memory and "n/a" in recompute and "n/a" in distill


def test_step_time_prints_the_variants_ratios(capsys, monkeypatch):
    teacher_calls = []  # the distill step must run the teacher on the step's own batch
    forward = DistillationCriterion.teacher_outputs
    monkeypatch.setattr(DistillationCriterion, "teacher_outputs",
                        lambda self, img: teacher_calls.append(tuple(img.shape)) or forward(self, img))
    ratio = step_time.main(TINY)
    lines = capsys.readouterr().out.splitlines()
    assert math.isfinite(ratio) and ratio > 0
    to_fp = {}
    for variant in ("fp:", "w4a4:", "w4a4 recompute:", "w4a4 ref:", "w4a4 distill:"):
        line = next(ln for ln in lines if ln.strip().startswith(variant))  # the first --cfg's
        to_fp[variant] = float(line.rsplit("ratio to fp", 1)[1])
        assert math.isfinite(to_fp[variant])
    summary = next(ln for ln in lines if ln.startswith("ratio w4a4/fp = "))
    assert ratio_in(summary) == f"{ratio:.3f}" and "fused LSQ kernel" in summary
    kd = next(ln for ln in lines if ln.startswith("ratio w4a4+distill/fp = "))
    m = re.fullmatch(r"ratio w4a4\+distill/fp = (\S+), w4a4\+distill/w4a4 = (\S+)  \(.*\)", kd)
    assert m, kd
    assert float(m.group(1)) == to_fp["w4a4 distill:"]
    assert float(m.group(2)) == pytest.approx(to_fp["w4a4 distill:"] / to_fp["w4a4:"], rel=1e-2)
    # two --cfg (yolov5nu.yaml, yolov5n) x (warm-up + 1 timed step), each on the (2, 3, 64, 64) batch
    assert teacher_calls == [(2, 3, 64, 64)] * 4
    assert any(ln.strip().startswith("yolov5n ") and "[" in ln for ln in lines), lines
