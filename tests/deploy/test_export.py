"""ONNX Q/DQ export of quantized YOLO models, checked in onnxruntime against the fake-quant model.

Tolerance: where onnxruntime and PyTorch quantize every activation to the same code, outputs
differ only by float accumulation order (conv sums): measured <= 3e-4 on outputs of up to ~760
(box coordinates in pixels), i.e. < 1e-6 relative; asserted at 1e-5 relative. They can differ by
one code where an activation lies within ~1e-5 of a step of a half-step (a rounding tie that the
two runtimes' float arithmetic decides differently): then the test asserts that the first
divergence is such a tie. Untrained random-weight nets amplify one flipped code a lot (one W8
flip can move a box by pixels), which is why outputs are compared on flip-free images only.
"""
import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper
from ultralytics.nn.tasks import DetectionModel, SegmentationModel
from ultralytics.utils.nms import non_max_suppression

from yolo_qat import deploy
from yolo_qat.deploy.verify import compare_onnxruntime, reference_outputs
from yolo_qat.models.checkpoint import save_checkpoint
from yolo_qat.quant import calibrate, layer_bits, layer_roles, quantize_model
from builders import build, calibrated_copy, images

ROOT = Path(__file__).resolve().parents[2]
CFGS = {"det": ("yolov5nu.yaml", DetectionModel), "seg": ("yolov8n-seg.yaml", SegmentationModel)}
IMGSZ = 64
_FP = {}


def quantized(kind, bits):
    if kind not in _FP:
        _FP[kind] = build(*CFGS[kind])
    return calibrated_copy(_FP[kind], {"w_bits": bits, "a_bits": bits, "first_last_bits": 8, "per_channel": bits == 4},
                           IMGSZ)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{(kind, bits): (model, onnx path)}, exported once per module (opset 21: INT4 weights)."""
    out = {}
    for kind in CFGS:
        for bits in (4, 8):
            q = quantized(kind, bits)
            out[kind, bits] = q, deploy.export_onnx(q, tmp_path_factory.mktemp("onnx") / f"{kind}{bits}.onnx", IMGSZ)
    return out


def detections(pred, nc=3):
    return non_max_suppression(torch.as_tensor(pred), conf_thres=0.001, iou_thres=0.7, nc=nc)[0]


@pytest.mark.parametrize("kind,bits", [("det", 4), ("det", 8), ("seg", 4), ("seg", 8)])
def test_onnxruntime_matches_fake_quant(exported, kind, bits):
    q, path = exported[kind, bits]
    flip_free = 0
    for seed in range(4):
        r = compare_onnxruntime(q, path, images(1, IMGSZ, 50 + seed))
        assert [o.shape for o in r["outputs"]] == [tuple(t.shape) for t in r["refs"]]
        if r["code_flips"]:
            # The first divergence must be a rounding tie (unrounded value at a half-step).
            assert r["first_flip_tie_distance"] < 1e-3, r["first_flip_tie_distance"]
            continue
        flip_free += 1
        assert r["max_abs"] <= 1e-5 * r["max_ref"], (r["max_abs"], r["max_ref"])
        a, b = detections(r["outputs"][0])[:10], detections(r["refs"][0])[:10]
        assert len(b) >= 3 and len(a) == len(b)  # an untrained model at conf 0.001 still has candidates
        assert torch.equal(a[:, 5], b[:, 5])  # classes
        torch.testing.assert_close(a[:, :5], b[:, :5], atol=1e-3, rtol=1e-5)  # boxes and scores
    assert flip_free >= 1


def test_output_layout_is_ultralytics(exported):
    """Same output names and shapes as Ultralytics' ONNX export (eval-mode Detect/Segment output)."""
    for (kind, bits), (q, path) in exported.items():
        m = onnx.load(str(path))
        names = [o.name for o in m.graph.output]
        assert names == (["output0", "output1"] if kind == "seg" else ["output0"])
        shapes = [[d.dim_value for d in o.type.tensor_type.shape.dim] for o in m.graph.output]
        assert shapes == [list(t.shape) for t in reference_outputs(q, images(1, IMGSZ))]
        meta = {p.key: p.value for p in m.metadata_props}
        assert meta["task"] == ("segment" if kind == "seg" else "detect") and int(meta["stride"]) == 32


def _weights(path):
    m = onnx.load(str(path))
    inits = {t.name: t for t in m.graph.initializer}
    layers = json.loads({p.key: p.value for p in m.metadata_props}["quant_layers"])
    return m, inits, layers


def test_integer_weights_in_range_and_first_last_8bit(exported):
    for (kind, bits), (q, path) in exported.items():
        m, inits, layers = _weights(path)
        assert {n: (v["w_bits"], v["a_bits"]) for n, v in layers.items()} == layer_bits(q)
        roles = layer_roles(q)
        for n in roles["first"] + roles["last"]:
            assert layers[n]["w_bits"] == layers[n]["a_bits"] == 8
        dq_inputs = {n.input[0] for n in m.graph.node if n.op_type == "DequantizeLinear"}
        for n, v in layers.items():
            t = inits[v["weight"]]
            assert v["weight"] in dq_inputs
            b = v["w_bits"]
            assert t.data_type == (TensorProto.INT4 if b <= 4 else TensorProto.INT8)
            w = numpy_helper.to_array(t).astype(np.int64)
            assert w.min() >= -(2 ** (b - 1)) and w.max() <= 2 ** (b - 1) - 1, (n, w.min(), w.max())
        # No float copy of a quantized weight: every Conv weight comes from a DequantizeLinear.
        dq_out = {n.output[0] for n in m.graph.node if n.op_type == "DequantizeLinear"}
        convs = [n for n in m.graph.node if n.op_type == "Conv"]
        assert sum(c.input[1] in dq_out for c in convs) == len(layers) == len(convs) - 1  # all but the DFL conv
        ops = {n.op_type for n in m.graph.node}
        assert {"QuantizeLinear", "DequantizeLinear", "Mul"} <= ops and "BatchNormalization" not in ops


def test_old_opset_falls_back_to_int8_container(exported, tmp_path):
    q, path21 = exported["det", 4]
    with pytest.warns(deploy.ExportWarning, match="int8 container"):
        p = deploy.export_onnx(q, tmp_path / "o17.onnx", IMGSZ, opset=17)
    m, inits, layers = _weights(p)
    _, inits21, _ = _weights(path21)
    for n, v in layers.items():
        t = inits[v["weight"]]
        assert t.data_type == TensorProto.INT8
        b = v["w_bits"]
        w = numpy_helper.to_array(t)
        assert w.min() >= -(2 ** (b - 1)) and w.max() <= 2 ** (b - 1) - 1
        assert np.array_equal(w, numpy_helper.to_array(inits21[v["weight"]]).astype(np.int8))  # same codes
    r = compare_onnxruntime(q, p, images(1, IMGSZ, 50))
    assert r["code_flips"] or r["max_abs"] <= 1e-5 * r["max_ref"]


def test_float_checkpoint_is_refused(tmp_path):
    fp = build(*CFGS["det"])
    with pytest.raises(deploy.NothingQuantizedError, match="nothing quantized to export"):
        deploy.export_onnx(fp, tmp_path / "fp.onnx", IMGSZ)
    ckpt = save_checkpoint(tmp_path / "fp.pt", fp)
    r = subprocess.run([sys.executable, str(ROOT / "export.py"), "--weights", str(ckpt), "--imgsz", str(IMGSZ)],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and "nothing quantized to export" in r.stderr, r.stderr
    assert not (tmp_path / "fp.onnx").exists()


def test_qc_folded_dynamic_export(tmp_path):
    """QC corrections folded into QuantConv2d.fold_affine (head convs: out_scale + bias) export as
    the Mul/Add after the integer conv; a dynamic graph runs another batch size and image size."""
    q = quantized("det", 4)
    g = torch.Generator().manual_seed(0)
    for m in q.modules():
        if isinstance(m, torch.nn.Module) and hasattr(m, "fold_affine") and m.bias is not None:
            m.fold_affine(1 + 0.1 * torch.randn(m.out_channels, generator=g), 0.1 * torch.randn(m.out_channels, generator=g))
    p = deploy.export_onnx(q, tmp_path / "dyn.onnx", IMGSZ, dynamic=True)
    x = images(2, 96, seed=21)
    r = compare_onnxruntime(q, p, x)
    assert r["outputs"][0].shape == (2, 7, (96 // 8) ** 2 + (96 // 16) ** 2 + (96 // 32) ** 2)
    assert (r["code_flips"] and r["first_flip_tie_distance"] < 1e-3) or r["max_abs"] <= 1e-5 * r["max_ref"], r["max_abs"]


# ------------------------------------------------------------------------------------------------------------
# The original anchor-based YOLOv5 / YOLOv7 models (models.yolo): yolov5's export layout, output0 (B, N, 5+nc[+nm])
# and output1 protos (B, nm, H/4, W/4), float (fused) and Q/DQ. Same tolerance as above, applied per column
# group (box pixels, then scores and mask coefficients), so that scores are not hidden behind pixel coordinates.

from yolo_qat.deploy.verify import run_onnx  # noqa: E402
from yolo_qat.models.original import load_original  # noqa: E402
from builders import EXPECTED_8BIT, FIX, FIXTURES, RECIPE, needs_fixtures  # noqa: E402

NO = {"yolov5n": 8, "yolov5n-seg": 40, "yolov7-tiny": 8}  # 5 + nc (3) [+ nm (32)]
N_ANCHORS = 3 * ((IMGSZ // 8) ** 2 + (IMGSZ // 16) ** 2 + (IMGSZ // 32) ** 2)


@pytest.fixture(scope="module")
def exported_original(tmp_path_factory):
    """{(name, 'fp' | 'w4a4'): (model, onnx path)}: the fixtures' float models, exported with dynamic axes
    (so they also run at the size of the original code's reference outputs), and W4A4 copies, static."""
    if not FIX.is_dir():
        pytest.skip(f"fixtures not found at {FIX}")
    d, out = tmp_path_factory.mktemp("original"), {}
    for name, f in FIXTURES.items():
        fp = load_original(FIX / f)[0]
        out[name, "fp"] = fp, deploy.export_onnx(fp, d / f"{name}-fp.onnx", IMGSZ, dynamic=True)
        q = quantize_model(copy.deepcopy(fp), RECIPE).eval()
        calibrate(q, [images(4, IMGSZ, s) for s in range(2)], num_batches=2)
        out[name, "w4a4"] = q, deploy.export_onnx(q, d / f"{name}-w4a4.onnx", IMGSZ)
    return out


def column_groups(t):
    t = torch.as_tensor(t)
    return [t[..., :4], t[..., 4:]] if t.dim() == 3 else [t]


def yolov5_nms(pred, nc=3, conf=0.001, iou=0.6, max_det=300):
    """What yolov5's / yolov7's non_max_suppression does with output0 of one image (written here from
    its definition): score = objectness x class score, xywh -> xyxy, NMS per class."""
    import torchvision

    p = torch.as_tensor(pred)[0]
    best, cls = (p[:, 5:5 + nc] * p[:, 4:5]).max(1)
    keep = best > conf
    xy, wh, best, cls = p[keep, :2], p[keep, 2:4], best[keep], cls[keep]
    boxes = torch.cat((xy - wh / 2, xy + wh / 2), 1)
    i = torchvision.ops.batched_nms(boxes, best, cls, iou)[:max_det]
    return torch.cat((boxes[i], best[i, None], cls[i, None].float()), 1)


@needs_fixtures
@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_original_float_onnx_reproduces_the_original_code(exported_original, name):
    """The float ONNX of an original checkpoint, run on refs.pt's input (2 x 128 x 128, another batch and
    size than exported: dynamic axes), gives the outputs of the original yolov5 / yolov7 code, to the
    fixtures' own tolerance (1e-4 relative, tests/models/test_original_yolo.py)."""
    _, path = exported_original[name, "fp"]
    refs = torch.load(FIX / "refs.pt")
    outs = run_onnx(path, refs["x"])
    want = [refs[name]] + ([refs[name + "-proto"]] if name.endswith("-seg") else [])
    assert [o.shape for o in outs] == [tuple(t.shape) for t in want]
    for o, r in zip(outs, want):
        for a, b in zip(column_groups(o), column_groups(r)):
            assert (a - b).abs().max() <= 1e-4 * b.abs().max()
    outs = run_onnx(path, images(1, 96, 3)[:, :, :64])  # 64 x 96: a non-square dynamic shape
    assert outs[0].shape == (1, 3 * (8 * 12 + 4 * 6 + 2 * 3), NO[name])
    m = onnx.load(str(path))
    ops = {n.op_type for n in m.graph.node}
    assert not ops & {"BatchNormalization", "QuantizeLinear", "DequantizeLinear"}


@needs_fixtures
@pytest.mark.parametrize("kind", ["fp", "w4a4"])
@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_original_onnx_matches_pytorch_in_yolov5_layout(exported_original, name, kind):
    model, path = exported_original[name, kind]
    m = onnx.load(str(path))
    seg = name.endswith("-seg")
    assert [o.name for o in m.graph.output] == (["output0", "output1"] if seg else ["output0"])
    flip_free = 0
    for seed in range(3):
        x = images(1, IMGSZ, 60 + seed)
        r = compare_onnxruntime(model, path, x)
        with torch.no_grad():
            y = model.eval()(x)  # not export mode: (pred, maps) / (pred, proto, maps), the original eval output
        assert [o.shape for o in r["outputs"]] == [(1, N_ANCHORS, NO[name])] + [(1, 32, IMGSZ // 4, IMGSZ // 4)] * seg
        if r["code_flips"]:
            assert r["first_flip_tie_distance"] < 1e-3, r["first_flip_tie_distance"]
            continue
        flip_free += 1
        for o, ref in zip(r["outputs"], y[:1 + seg]):
            for a, b in zip(column_groups(o), column_groups(ref)):
                assert (a - b).abs().max() <= 1e-5 * b.abs().max(), ((a - b).abs().max(), b.abs().max())
        assert_same_detections(yolov5_nms(r["outputs"][0]), yolov5_nms(y[0]))
    assert flip_free >= 1


def assert_same_detections(a, b):
    """The same boxes, scores and classes, in any order: an untrained model has many nearly equal scores
    (1e-7 apart), whose order float rounding may swap."""
    assert len(b) >= 3 and len(a) == len(b)  # an untrained model at conf 0.001 still has candidates
    free = list(range(len(b)))
    for d in a:
        j = next((j for j in free if b[j, 5] == d[5] and torch.allclose(b[j, :5], d[:5], atol=1e-3, rtol=1e-5)), None)
        assert j is not None, d
        free.remove(j)


@needs_fixtures
@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_original_qdq_graph(exported_original, name):
    """Every conv takes integer weights (nothing is 'never' in anchor-based heads), the stem and head
    prediction convs at 8 bits, the rest INT4; metadata names the layout."""
    q, path = exported_original[name, "w4a4"]
    m, inits, layers = _weights(path)
    assert {n: (v["w_bits"], v["a_bits"]) for n, v in layers.items()} == layer_bits(q)
    assert {n for n, v in layers.items() if v["w_bits"] == 8} == EXPECTED_8BIT[name]
    for n, v in layers.items():
        assert inits[v["weight"]].data_type == (TensorProto.INT8 if n in EXPECTED_8BIT[name] else TensorProto.INT4)
    dq_out = {n.output[0] for n in m.graph.node if n.op_type == "DequantizeLinear"}
    convs = [n for n in m.graph.node if n.op_type == "Conv"]
    assert len(convs) == len(layers) and all(c.input[1] in dq_out for c in convs)
    meta = {p.key: p.value for p in m.metadata_props}
    assert "5+nc" in meta["description"] and meta["task"] == ("segment" if name.endswith("-seg") else "detect")


def _graph_maps(m):
    producer = {o: n for n in m.graph.node for o in n.output}
    consumers = {}
    for n in m.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    return producer, consumers


@needs_fixtures
def test_idetect_implicit_layers_in_the_graph(exported_original):
    """Float: ImplicitA and ImplicitM folded into the head convs, no op of theirs left. Q/DQ: ImplicitM in
    the head conv's output scale (Mul), ImplicitA an Add in front of its activation quantizer."""
    head = "model.77"
    fp = onnx.load(str(exported_original["yolov7-tiny", "fp"][1]))
    assert not [t.name for t in fp.graph.initializer if "implicit" in t.name]
    producer, consumers = _graph_maps(fp)
    for i in range(3):
        conv = next(n for n in fp.graph.node if n.op_type == "Conv" and n.input[1] == f"{head}.m.{i}.weight")
        assert producer[conv.input[0]].op_type == "LeakyRelu"  # the neck's last activation, no Add
        assert {n.op_type for n in consumers[conv.output[0]]} == {"Reshape", "Shape"}  # no Mul (Shape: dynamic axes)

    q = onnx.load(str(exported_original["yolov7-tiny", "w4a4"][1]))
    assert sorted(t.name for t in q.graph.initializer if "implicit" in t.name) == \
        [f"{head}.ia.{i}.implicit" for i in range(3)]
    producer, consumers = _graph_maps(q)
    for i in range(3):
        w = next(n.output[0] for n in q.graph.node if n.op_type == "DequantizeLinear"
                 and n.input[0] == f"{head}.m.{i}.weight_int")
        conv = next(n for n in q.graph.node if n.op_type == "Conv" and n.input[1] == w)
        node = producer[conv.input[0]]
        while node.op_type != "QuantizeLinear":
            node = producer[node.input[0]]
        node = producer[node.input[0]]
        while node.op_type in ("Sub", "Clip"):  # LSQ+ offset, sub-8-bit clip
            node = producer[node.input[0]]
        assert node.op_type == "Add" and f"{head}.ia.{i}.implicit" in node.input
        after = consumers[conv.output[0]]
        assert [n.op_type for n in after] == ["Mul"] and f"{head}.m.{i}.out_scale" in after[0].input
        after = consumers[after[0].output[0]]
        assert [n.op_type for n in after] == ["Add"] and f"{head}.m.{i}.bias" in after[0].input
        assert [n.op_type for n in consumers[after[0].output[0]]] == ["Reshape"]


@needs_fixtures
def test_cli_exports_an_original_checkpoint_as_it_is(tmp_path, capsys):
    """An original yolov5 checkpoint (fp16, their dict layout) exports in float through export.py."""
    import export

    out = tmp_path / "v5seg.onnx"
    weights = FIX / FIXTURES["yolov5n-seg"]
    assert export.main(["--weights", str(weights), "--imgsz", str(IMGSZ), "--output", str(out)]) == 0
    assert "(float model)" in capsys.readouterr().out
    m = onnx.load(str(out))
    assert [[d.dim_value for d in o.type.tensor_type.shape.dim] for o in m.graph.output] == \
        [[1, N_ANCHORS, 40], [1, 32, IMGSZ // 4, IMGSZ // 4]]
