"""correct_qc.py says so, in one line, when a run's QC budget (lr x steps) is far below the paper's one COCO epoch
(1,849 Adam steps x lr 1e-4): on the embedded data such budgets changed nothing (docs/paper-table.md, QC's
budget at small scale)."""
import pytest

from yolo_qat.engine.qc import PAPER_QC_BUDGET, budget_note
from yolo_qat.models.checkpoint import save_checkpoint
from builders import qat_like_model, tiny_dataset


def test_budget_note_only_far_below_the_paper():
    assert PAPER_QC_BUDGET == pytest.approx(0.1849)
    note = budget_note(16, 1e-4)  # one pass over 256 images at batch 16
    assert note.startswith("QC budget: 16 steps x lr 0.0001 = 0.0016, 116x below the paper's") and "\n" not in note
    assert budget_note(1849, 1e-4) is None and budget_note(185, 1e-3) is None  # the paper's, and matched to it
    assert budget_note(185, 1e-4).startswith("QC budget: 185 steps x lr 0.0001 = 0.019, 10x below")  # W3A3: +2.3
    assert budget_note(400, 1e-4) is None  # 4.6x below: not far
    assert budget_note(0, 1e-4) is None  # --steps 0: BN re-estimation or a fold only, nothing to train


def test_correct_qc_prints_the_line(tmp_path, capsys):
    import correct_qc

    data = tiny_dataset(tmp_path)
    q = save_checkpoint(tmp_path / "qat.pt", qat_like_model(data, cfg="yolov8n.yaml"))
    args = ["--weights", str(q), "--data", str(data), "--imgsz", "64", "--batch", "4", "--no-val", "--project",
            str(tmp_path / "qc")]
    assert correct_qc.main([*args, "--steps", "2", "--lr", "1e-4", "--name", "small"]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("QC budget:")]
    assert lines == [budget_note(2, 1e-4)]
    assert correct_qc.main([*args, "--steps", "2", "--lr", "0.1", "--name", "large"]) == 0  # 0.2: the paper's
    assert "QC budget:" not in capsys.readouterr().out


def _write(path, obj):
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def test_qc_budget_aggregates_seeds_from_cache(tmp_path, capsys):
    """benchmarks/qc_budget.py over several seeds: each row is mean (min..max) over the seeds that have it, with the
    paired difference to the same seed's run without QC; a per-seed table; --cached-points (measured on some seeds
    only) are tabulated where cached and never computed (the QAT weights here do not exist: computing would fail)."""
    import sys

    from conftest import ROOT

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import qc_budget

    out = tmp_path / "out"
    (tmp_path / "data.yaml").write_text("path: .\n")
    _write(out / "settings.json", {"data": str(tmp_path / "data.yaml"), "imgsz": 64, "batch": 4, "qc_steps": 185,
                                   "qc_lr": 0.001})
    noqc = {0: (0.250, 0.160), 1: (0.230, 0.150), 2: (0.240, 0.170)}
    for sd, (box, mask) in noqc.items():
        key = f"w4-lsq-ema0.99-s{sd}"
        _write(out / "cells" / f"qat-{key}.json", {"qat_key": key, "weights": str(tmp_path / "missing.pt"),
                                                   "ema_decay": 0.99})
        _write(out / "cells" / f"{key}--noqc.json", {"box": box, "mask": mask})
        _write(out / "cells" / f"{key}--qc-channel-both.json",  # reproduce.py's +QC cell: the 185 x 1e-3 point
               {"qc_steps": 185, "box": box + 0.01 * (sd + 1), "mask": mask + 0.005, "qc_report": {}})
        _write(out / "qc-budget" / f"{key}--qc16x0.0001.json", {"steps": 16, "box": box - 0.002 + 0.004 * sd,
                                                                 "mask": mask})
        _write(out / "qc-budget" / f"{key}--qat+12ep.json", {"steps": 192, "box": box + 0.03, "mask": mask + 0.02})
        _write(out / "qc-budget" / f"{key}--qat+12ep--qc185x0.001.json", {"box": box + 0.035, "mask": mask + 0.03})
    _write(out / "qc-budget" / "w4-lsq-ema0.99-s0--qc185x0.01.json", {"box": 0.272, "mask": 0.184})  # seed 0 only

    assert qc_budget.main(["--out", str(out), "--points", "185:1e-3", "16:1e-4", "--cached-points", "185:1e-2",
                           "185:1e-4", "--control-epochs", "12"]) == 0
    text = capsys.readouterr().out
    assert text == (out / "qc-budget.md").read_text()
    aggregated, per_seed = text.split("Per seed")
    rows = {line.split(" | ")[1]: line for line in aggregated.splitlines() if line.startswith("| 4 |")}
    assert rows["no QC"].startswith("| 4 | no QC | 0 | 0 1 2 | 24.0 (23.0..25.0) | 16.0 (15.0..17.0) | - | - |")
    # paired: +1, +2, +3 box; +0.5 mask each seed
    assert rows["QC 185 steps x lr 0.001"] == ("| 4 | QC 185 steps x lr 0.001 | 0.185 | 0 1 2 | 26.0 (25.0..27.0) | "
                                               "16.5 (15.5..17.5) | +2.0 (+1.0..+3.0), 3/3 up | "
                                               "+0.5 (+0.5..+0.5), 3/3 up |")
    assert "| +0.2 (-0.2..+0.6), 2/3 up |" in rows["QC 16 steps x lr 0.0001"]  # -0.2, +0.2, +0.6
    assert rows["QAT +192 steps, no QC"].startswith("| 4 | QAT +192 steps, no QC | - | 0 1 2 | 27.0 (26.0..28.0) |")
    assert "| +3.5 (+3.5..+3.5), 3/3 up | +3.0 (+3.0..+3.0), 3/3 up |" in rows["QAT +12ep, then QC 185 x 0.001"]
    # measured on seed 0 alone: its value and delta, no range; the point nobody cached has no row
    assert rows["QC 185 steps x lr 0.01"] == "| 4 | QC 185 steps x lr 0.01 | 1.85 | 0 | 27.2 | 18.4 | +2.2 | +2.4 |"
    assert "QC 185 steps x lr 0.0001" not in rows
    assert "| 4 | QC 185 steps x lr 0.01 | 1.85 | 27.2 / 18.4 (+2.2 / +2.4) | - | - |" in per_seed
    assert "| 4 | QC 16 steps x lr 0.0001 | 0.0016 | 24.8 / 16.0 (-0.2 / +0.0) | 23.2 / 15.0 (+0.2 / +0.0) | " \
           "24.6 / 17.0 (+0.6 / +0.0) |" in per_seed
