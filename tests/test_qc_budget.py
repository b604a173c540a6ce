"""correct_qc.py says so, in one line, when a run's QC budget (lr x steps) is far below the paper's one COCO epoch
(1,849 Adam steps x lr 1e-4): on the embedded data such budgets changed nothing (README, QC's budget at small
scale), and the benchmark's QC was 16 steps x 1e-4 before issue 21."""
import pytest

from engine.qc import PAPER_QC_BUDGET, budget_note
from models.checkpoint import save_checkpoint
from test_qc import qat_like_model, tiny_dataset


def test_budget_note_only_far_below_the_paper():
    assert PAPER_QC_BUDGET == pytest.approx(0.1849)
    note = budget_note(16, 1e-4)  # the CPU benchmark's QC before issue 21: one pass over 256 images at batch 16
    assert note.startswith("QC budget: 16 steps x lr 0.0001 = 0.0016, 116x below the paper's") and "\n" not in note
    assert budget_note(1849, 1e-4) is None and budget_note(185, 1e-3) is None  # the paper's, and matched to it
    assert budget_note(185, 1e-4).startswith("QC budget: 185 steps x lr 0.0001 = 0.019, 10x below")  # W3A3: +1.0
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
