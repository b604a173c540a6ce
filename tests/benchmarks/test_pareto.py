"""benchmarks/pareto.py: the allocation at a uniform recipe's weight bytes, the costs read from a model's widths,
and the sweep's resumability, table, CSV and plot (the trained points faked: a real point is minutes of QAT)."""
import csv
import json
import random
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import pareto  # noqa: E402
from yolo_qat import models  # noqa: E402,F401  (the YOLO layer policy)


def yolo():
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    return DetectionModel("yolov8n.yaml", nc=3, verbose=False)


def sensitivity_report(fp: Path, imgsz: int) -> dict:
    """mixed_precision.py's report for target ort with made-up proxies (W2 measured too: the sweep drops it)."""
    from yolo_qat.engine.sensitivity import layer_geometry
    from yolo_qat.quant import QuantRecipe, quantize_model

    recipe = QuantRecipe(w_bits=8, a_bits=8, first_last_bits=None, per_channel=True, target="ort")
    geo = layer_geometry(quantize_model(yolo(), recipe), imgsz)
    rng = random.Random(0)
    layers = [{**g.to_dict(), "sensitivity": {"w8a8": {"loss": 0.0, "noise": 0.0},
                                              "w4a8": {"loss": rng.random(), "noise": rng.random()},
                                              "w3a8": {"loss": 2 + rng.random(), "noise": 2 + rng.random()},
                                              "w2a8": {"loss": 0.0, "noise": 0.0}}} for g in geo.values()]
    return {"weights": str(fp), "task": "detect", "imgsz": imgsz, "recipe": recipe.to_dict(), "reference": [8, 8],
            "measure": "packed", "layers": layers}


def test_allocation_at_a_uniform_recipes_bytes(tmp_path):
    from yolo_qat.models.checkpoint import save_checkpoint

    fp = save_checkpoint(tmp_path / "fp.pt", yolo())
    opt = pareto.parse_args(["--weights", str(fp), "--data", "d.yaml", "--imgsz", "64", "--out", str(tmp_path)])
    report = sensitivity_report(fp, 64)
    params = sum(layer["params"] for layer in report["layers"])
    w8 = pareto.recipe_costs(fp, pareto.uniform_recipe("W8A8", "ort"), 64, "ort")
    assert w8["params"] == params and w8["packed_bytes"] == params and w8["avg_w_bits"] == 8
    uni = pareto.recipe_costs(fp, pareto.uniform_recipe("W4A8", "ort"), 64, "ort")
    assert 4 < uni["avg_w_bits"] < 4.5  # first and last layers at 8
    assert uni["runtime_bytes"] == params  # ort keeps 4-bit codes in int8 containers
    assert uni["bitops"] < w8["bitops"]
    recipe = yaml.safe_load(pareto.allocated_recipe(opt, "alloc@W4A8", report, tmp_path).read_text())
    widths = {o["w_bits"] for o in recipe["overrides"].values()}
    assert widths <= {4, 3} and 4 in widths  # W2 was measured but is not a --w-bits-choices width
    alloc = pareto.recipe_costs(fp, recipe, 64, "ort")
    assert 0.98 * uni["packed_bytes"] <= alloc["packed_bytes"] <= uni["packed_bytes"]  # equal weight bytes
    by_bits = yaml.safe_load(pareto.allocated_recipe(opt, "alloc:5", report, tmp_path).read_text())
    assert pareto.recipe_costs(fp, by_bits, 64, "ort")["avg_w_bits"] <= 5
    with pytest.raises(SystemExit, match="expected WxAy"):
        pareto.parse_args(["--weights", "a", "--data", "d", "--imgsz", "64", "--points", "W4"])


def fake_costs(bits: float) -> dict:
    return {"packed_bytes": 1000 * bits, "runtime_bytes": 8000, "onnx_bytes": 8000, "avg_w_bits": bits,
            "bitops": 1e9 * bits, "params": 1000}


def test_sweep_keeps_finished_points_and_writes_table_csv_and_plot(tmp_path, monkeypatch, capsys):
    trained = []
    box = {"W4A8": 20.0, "alloc@W4A8": 22.0, "W3A3": 15.0, "alloc@W3A3": 15.1}

    def our_point(opt, name, flags, seed, out):
        trained.append((name, seed))
        s = box[name] + 0.2 * seed  # the seed spread is 0.2 for every point
        return {"checkpoint": {"box": s - 1}, "file": {"box": s}, "file_path": "x.onnx", "export_error": None,
                **fake_costs(4.1 if "4" in name else 3.0)}

    def peer_point(opt, name, seed, out):
        trained.append((name, seed))
        if name == "ultra-qat8":
            return None  # ModelOpt absent
        return {"checkpoint": None, "file": None, "file_path": None, "export_error": "ultra-int8 failed: no onnxslim",
                **fake_costs(8)}

    monkeypatch.setattr(pareto, "our_point", our_point)
    monkeypatch.setattr(pareto, "peer_point", peer_point)
    monkeypatch.setattr(pareto, "sensitivity_report", lambda opt, out: {})
    monkeypatch.setattr(pareto, "allocated_recipe", lambda opt, spec, report, out: tmp_path / "r.yaml")
    out = tmp_path / "sweep"
    argv = ["--weights", "fp.pt", "--data", "d.yaml", "--imgsz", "64", "--points", "W4A8", "alloc@W4A8", "W3A3",
            "alloc@W3A3", "--peers", "ultra-int8", "ultra-qat8", "--seeds", "0", "1", "--out", str(out), "--time-repeats", "0"]
    assert pareto.main(argv) == 0
    assert len(trained) == 1 + 2 * 5 and len(list((out / "points").glob("*.json"))) == 1 + 2 * 4
    text = capsys.readouterr().out
    assert "[2/11] W4A8 seed 0: mAP50-95 box 20.00 (file)" in text and "elapsed" in text
    assert "ultra-qat8 seed 1: skipped: nvidia-modelopt" in text
    md = (out / "pareto.md").read_text()
    assert "| alloc@W4A8 - W4A8 | 4.10 / 4.10 | +2.00 (+2.00..+2.00) over 2 seeds | -, 2/2 | 0.20 / 0.20 | yes |" in md
    assert "| alloc@W3A3 - W3A3 | 3.00 / 3.00 | +0.10 (+0.10..+0.10) over 2 seeds | -, 2/2 | 0.20 / 0.20 | no |" in md
    assert "no onnxslim" in md and "| W4A8 | uniform | 0,1 |" in md and "20.10 (20.00..20.20)" in md
    rows = list(csv.DictReader((out / "points.csv").open()))
    assert len(rows) == 9 and {r["scored_on"] for r in rows if r["kind"] != "peer"} == {"file"}
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    # a rerun trains nothing that is stored (only the skipped peer is tried again); one deleted point is redone
    trained.clear()
    (out / "points" / "W3A3-seed1.json").unlink()
    assert pareto.main(argv) == 0
    assert sorted(trained) == [("W3A3", 1), ("ultra-qat8", 0), ("ultra-qat8", 1)]
    assert "W4A8 seed 0: kept" in capsys.readouterr().out
    assert json.loads((out / "points" / "W3A3-seed1.json").read_text())["file"] == {"box": 15.2}


def test_every_points_file_is_timed_beside_the_fp_onnx(tmp_path):
    """One file per point (the lowest seed's that exists), timed in one run with the FP ONNX; the table gets the
    columns. Latencies are not asserted (a shared machine): only that each is a measured, finite ratio."""
    from benchmarks.deploy_speed import export_fp
    from yolo_qat.engine.validate import load_model
    from yolo_qat.models.checkpoint import save_checkpoint

    fp = save_checkpoint(tmp_path / "fp.pt", yolo())
    opt = pareto.parse_args(["--weights", str(fp), "--data", "d.yaml", "--imgsz", "64", "--out", str(tmp_path / "o"),
                             "--time-repeats", "2"])

    onnx = export_fp(load_model(fp)[0], tmp_path / "a.onnx", 64)
    rows = [{"point": "W4A8", "kind": "uniform", "seed": 0, "file_path": str(tmp_path / "gone.onnx"), **fake_costs(4)},
            {"point": "W4A8", "kind": "uniform", "seed": 1, "file_path": str(onnx), **fake_costs(4)},
            {"point": "ultra-int8", "kind": "peer", "seed": None, "file_path": None, **fake_costs(8)}]
    for r in rows:
        r.update(checkpoint=None, file={"box": 1.0}, export_error=None)
    speed = pareto.time_files(opt, rows)
    assert set(speed) == {"fp", "W4A8"} and speed["W4A8"]["path"] == str(onnx)  # seed 0's file is gone
    assert all(v["median_ms"] > 0 and v["speed_vs_fp"] > 0 for v in speed.values())
    assert json.loads((tmp_path / "o" / "speed" / "speed.json").read_text()).keys() == speed.keys()
    table = pareto.summary_table(rows, speed)
    assert "| ms | vs FP |" in table and f"{speed['W4A8']['speed_vs_fp']:.2f}x" in table


def test_paired_comparison_reports_the_t_statistic_and_the_seeds_ahead():
    def row(point, kind, seed, box):
        return {"point": point, "kind": kind, "seed": seed, "avg_w_bits": 4.0, "file": {"box": box}}

    rows = [row("W4A8", "uniform", s, 20.0 + s) for s in range(3)]
    rows += [row("alloc@W4A8", "allocated", s, 20.0 + s + d) for s, d in enumerate((1.0, 2.0, 3.0))]
    # differences 1, 2, 3: mean 2, standard deviation 1, standard error 1/sqrt(3): t = 2 sqrt(3) = 3.46
    assert ("| alloc@W4A8 - W4A8 | 4.00 / 4.00 | +2.00 (+1.00..+3.00) over 3 seeds | +3.46, 3/3 | 4.00 / 2.00 | no |"
            in pareto.comparison_table(rows))
