"""benchmarks/deploy_speed.py on a tiny setting (imgsz 64, one round): the table's structure, the op counts.

No timing is asserted: latencies on a shared 2-core machine say nothing at this size.
"""
import json
import sys
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import deploy_speed  # noqa: E402


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("deploy_speed")
    opt = deploy_speed.build_parser().parse_args(
        ["--imgsz", "64", "--threads", "1", "--repeats", "1", "--warmup", "0", "--bits", "W8A8", "--calib-images", "2",
         "--nc", "4", "--project", str(tmp), "--name", "t"])
    return deploy_speed.run(opt)


def test_table_structure(result):
    rows, out = result["rows"], result["dir"]
    targets = deploy_speed.export_targets()
    assert [r["file"] for r in rows][:2] == ["FP", "ORT PTQ W8A8"]
    assert len(rows) == 2 + len(targets)  # one size, one thread count, W8A8 per target
    assert all(r["imgsz"] == 64 and r["threads"] == 1 and r["runs"] == 1 and r["median_ms"] > 0 for r in rows)
    assert rows[0]["speed_vs_fp"] == pytest.approx(1.0)
    lines = result["table"].splitlines()
    assert lines[0].startswith("| file | imgsz | size MB | integer convs") and "1 thr: vs FP" in lines[0]
    assert len(lines) == 2 + len(rows) and all(line.count("|") == lines[0].count("|") for line in lines)
    assert (out / "table.md").is_file() and (out / "speed.png").stat().st_size > 0
    assert len(json.loads((out / "results.json").read_text())["rows"]) == len(rows)


def test_integer_convs(result):
    by = {r["file"]: r for r in result["rows"]}
    fp, ptq = by["FP"], by["ORT PTQ W8A8"]
    assert fp["integer_convs"] == fp["quantized_convs"] == 0 and fp["convs"] > 50
    assert ptq["quantized_convs"] >= fp["convs"] - 2 and ptq["integer_convs"] >= ptq["quantized_convs"] - 2
    assert deploy_speed.integer_conv_count(ptq["path"]) == ptq["integer_convs"]
    for r in result["rows"]:
        if r["kind"] == "ours":
            assert r["quantized_convs"] == fp["convs"] - 1  # all but the DFL conv
            if r["file"].endswith("(sim)"):
                assert r["integer_convs"] == 0  # float convs on dequantized weights: slower than FP


def test_count_on_a_hand_built_graph(tmp_path):
    """One QDQ conv that onnxruntime must fuse into a QLinearConv, and its float twin."""
    import numpy as np
    from onnx import numpy_helper

    w = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.int8), "w")
    inits = [w, numpy_helper.from_array(np.full(4, 0.01, np.float32), "ws"),
             numpy_helper.from_array(np.array(0.02, np.float32), "s"), numpy_helper.from_array(np.array(128, np.uint8), "z")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "ws"], ["wd"], axis=0),
             helper.make_node("Conv", ["xd", "wd"], ["y"], pads=[1, 1, 1, 1]),
             helper.make_node("QuantizeLinear", ["y", "s", "z"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "s", "z"], ["out"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), tmp_path / "q.onnx")
    assert deploy_speed.integer_conv_count(tmp_path / "q.onnx") == 1
    assert deploy_speed.quantized_conv_count(tmp_path / "q.onnx") == (1, 1)
    del nodes[4:]
    nodes[-1].output[0] = "out"
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", g.input, g.output, inits),
                                opset_imports=[helper.make_opsetid("", 13)]), tmp_path / "f.onnx")
    assert deploy_speed.integer_conv_count(tmp_path / "f.onnx") == 0  # no output Q: a float conv
