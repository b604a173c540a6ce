"""The pure parts of benchmarks/integer_qat.py, pipeline_matrix.py and deploy_speed.py --extra: row parsing, reading
a run's results.csv, the tables they print."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import integer_qat  # noqa: E402
import pipeline_matrix  # noqa: E402


def _results_csv(run: Path, maps: list[float], floor: list[int]) -> None:
    run.mkdir(parents=True)
    lines = ["                  epoch,   metrics/mAP50-95(B),  qat/steps_near_floor"]  # Ultralytics pads the names
    lines += [f"{i + 1},{m},{f}" for i, (m, f) in enumerate(zip(maps, floor))]
    (run / "results.csv").write_text("\n".join(lines) + "\n")


def test_rows_and_targets():
    rows = integer_qat.parse_rows(["fp", "ort-w4a8", "mine=--w-bits 3 --a-bits 8 --target npu"])
    assert rows == {"fp": None, "ort-w4a8": integer_qat.OURS["ort-w4a8"], "mine": "--w-bits 3 --a-bits 8 --target npu"}
    assert integer_qat.integer_target(rows["ort-w4a8"]) and integer_qat.integer_target(rows["mine"])
    assert not integer_qat.integer_target(integer_qat.OURS["sim-w4a8"]) and not integer_qat.integer_target(None)
    assert not integer_qat.integer_target("--target sim --w-bits 4")
    with pytest.raises(SystemExit, match="unknown"):
        integer_qat.parse_rows(["w5a5"])


def test_curve_and_floor_read_from_results_csv(tmp_path):
    _results_csv(tmp_path / "r", [0.25, 0.2625], [3, 0])
    assert integer_qat.curve(tmp_path / "r") == pytest.approx([25.0, 26.25])
    assert pipeline_matrix.steps_at_floor(tmp_path / "r") == 0  # the last epoch's count
    assert integer_qat.curve(tmp_path / "missing") == [] and pipeline_matrix.steps_at_floor(tmp_path) is None


def test_tables():
    class Opt:
        imgsz = 256

    rows = [{"row": "fp", "flags": None, "curve": [19.1, 23.7, 27.0], "checkpoint": {"box": 27.1}, "onnx": None},
            {"row": "ort-w4a8", "flags": "--target ort", "curve": [14.4, 24.1], "checkpoint": {"box": 26.04, "mask": 18.0},
             "onnx": {"box": 26.11, "mask": 18.2}}]
    text = integer_qat.table(rows, Opt)
    assert "| fp | 19.1 | 23.7 | 27.0 | 27.1 |  |  |" in text
    assert "| ort-w4a8 | 14.4 | 24.1 |  | 26.0 / 18.0 | 26.1 / 18.2 | `--target ort` |" in text
    cells = [{"cell": "ort:W4A8", "steps_at_floor": 0, "qc_folded": True, "qc_ties": 3, "exported": True,
              "box_checkpoint": 26.0, "box_onnx": 26.25, "failed": None},
             {"cell": "npu:W4A4", "steps_at_floor": None, "failed": "qat", "why": "train_qat.py: error: 8-bit only"}]
    text = pipeline_matrix.table(cells)
    assert "| ort:W4A8 | 0 | yes (3) | yes | 26.00 | 26.25 | +0.25 |  |" in text
    assert text.splitlines()[-1].endswith("| qat: train_qat.py: error: 8-bit only |")


def test_deploy_speed_extra_files(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    import deploy_speed

    graph = helper.make_graph([helper.make_node("Identity", ["images"], ["out"])], "g",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 320, 320])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3, 320, 320])])
    path = tmp_path / "theirs.onnx"
    onnx.save(helper.make_model(graph), path)
    assert deploy_speed.extra_files([f"theirs={path}"], [320, 640]) == \
        [{"label": "theirs", "kind": "extra", "imgsz": 320, "path": str(path.resolve())}]
    with pytest.raises(ValueError, match="not one of --imgsz"):
        deploy_speed.extra_files([f"theirs={path}"], [640])
    with pytest.raises(ValueError, match="LABEL=PATH"):
        deploy_speed.extra_files([str(path)], [320])


def test_seed_and_pair_tables():
    def row(name, box, mask, onnx=None):
        return {"row": name, "checkpoint": {"box": box, "mask": mask}, "onnx": onnx}

    by_seed = {0: [row("a", 30.0, 20.0, {"box": 30.25, "mask": 20.0}), row("b", 29.0, 21.0)],
               1: [row("a", 28.0, 19.0, {"box": 27.9, "mask": 19.1}), row("b", 28.5, 18.0)]}
    text = integer_qat.seed_table(by_seed)
    assert "| a | 2 | 29.0 (28.0..30.0) | 19.5 (19.0..20.0) | 29.1 (27.9..30.2) | 19.6 (19.1..20.0) | 0.25 |" in text
    assert "| b | 2 | 28.8 (28.5..29.0) | 19.5 (18.0..21.0) |  |  |  |" in text
    pairs = integer_qat.pair_table(by_seed, ["a:b"])
    assert "| a - b | +0.2 (-0.5..+1.0) | +0.0 (-1.0..+1.0) | 1/2 / 1/2 |" in pairs
