"""The ``ort`` deploy target: QAT simulates what onnxruntime's integer CPU kernels quantize, and the export
runs on them (quant/targets.py, quant/act.py, deploy/ort_modules.py).

Checked against onnxruntime itself: after its graph optimisation every quantized conv is a QLinearConv,
every SiLU's sigmoid a QLinearSigmoid; the activation codes it computes at every QuantizeLinear equal the
fake-quant model's up to rounding ties (the first differing code lies within 1e-3 of a half-step: float
summation order and x/s vs x*(1/s) decide those), and on images where no code differs the outputs agree to
1e-5 relative. This holds on any x86-64 CPU: sessions run with ``session.x64quantprecision`` (exact U8U8
kernels where the U8S8 ones could saturate, i.e. without VNNI; deploy/verify.py).
"""
import collections
import copy
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from ultralytics.nn.tasks import DetectionModel, SegmentationModel

from yolo_qat import deploy
from yolo_qat.deploy.verify import compare_onnxruntime, ort_session
from yolo_qat.quant import LSQQuantizer, QuantConv2d, calibrate, quant_convs, quantize_model
from yolo_qat.quant.act import FixedQuantizer, QuantAct, QuantOut, output_quantizers
from yolo_qat.quant.targets import TARGET_NAMES
from builders import build, calibrated_copy, images

CFGS = {"det": ("yolov5nu.yaml", DetectionModel), "seg": ("yolov8n-seg.yaml", SegmentationModel)}
BITS = {"w8a8": (8, 8), "w4a8": (4, 8), "w4a4": (4, 4)}
IMGSZ = 64
ROOT = Path(__file__).resolve().parents[2]
_FP = {}


def quantized(kind, bits, target="ort"):
    if kind not in _FP:
        _FP[kind] = build(*CFGS[kind])
    w, a = BITS[bits]
    return calibrated_copy(_FP[kind], {"w_bits": w, "a_bits": a, "per_channel": w == 4, "target": target}, IMGSZ)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = {}
    for kind in CFGS:
        for bits in BITS:
            q = quantized(kind, bits)
            out[kind, bits] = q, deploy.export_onnx(q, tmp_path_factory.mktemp("ort") / f"{kind}-{bits}.onnx", IMGSZ)
    return out


def optimized_ops(path, tmp_path) -> collections.Counter:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED  # no CPU-specific layouts
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)


def assert_matches_up_to_ties(q, path, seeds):
    """Per image: the first activation code onnxruntime computes differently is a rounding tie (within 1e-3 of
    a half-step); an image with no differing code gives the same outputs to 1e-5 relative."""
    for seed in seeds:
        r = compare_onnxruntime(q, path, images(1, IMGSZ, seed))
        if r["code_flips"]:
            assert r["first_flip_tie_distance"] < 1e-3, (r["first_flip_layer"], r["first_flip_tie_distance"])
        else:
            assert r["max_abs"] <= 1e-5 * r["max_ref"], (r["max_abs"], r["max_ref"])


@pytest.mark.parametrize("kind", list(CFGS))
@pytest.mark.parametrize("bits", list(BITS))
def test_every_quantized_conv_is_an_integer_conv(exported, kind, bits, tmp_path):
    q, path = exported[kind, bits]
    ops = optimized_ops(path, tmp_path)
    n_convs = len(quant_convs(q))
    n_silu = sum(isinstance(m, QuantAct) and m.sig is not None for m in q.modules())
    assert ops["QLinearConv"] == n_convs
    assert ops["QLinearSigmoid"] >= n_silu  # the box/class decode's sigmoid stays float (not quantized)
    assert ops["QLinearMul"] >= n_silu  # every SiLU's product is encoded (its output quantizer)
    n_adds = sum(isinstance(getattr(m, "add_quantizer", None), LSQQuantizer) for m in q.modules())
    # every residual sum, the first Bottleneck's of a C2f too (the export repeats cv1's encoding on both halves of
    # the split, so its slices come out of DequantizeLinear: ort_modules.encoded_split_source)
    assert ops["QLinearAdd"] == n_adds
    assert ops["QLinearConcat"] > 0
    assert ops["Conv"] <= 1  # the DFL's fixed conv, kept float by the policy
    assert ops["ConvTranspose"] == (1 if kind == "seg" else 0)  # Proto's upsampling (float in the model too)


@pytest.mark.parametrize("kind", list(CFGS))
@pytest.mark.parametrize("bits", list(BITS))
def test_graph_follows_the_ort_rules(exported, kind, bits):
    q, path = exported[kind, bits]
    m = onnx.load(str(path))
    onnx.checker.check_model(m)
    inits = {t.name: t for t in m.graph.initializer}
    inits.update({n.output[0]: n.attribute[0].t for n in m.graph.node if n.op_type == "Constant"})
    # torch's exporter shares equal constants through Identity nodes
    inits.update({n.output[0]: inits[n.input[0]] for n in m.graph.node if n.op_type == "Identity" and n.input[0] in inits})
    meta = {p.key: p.value for p in m.metadata_props}
    assert meta["quant_target"] == "ort"
    for n in m.graph.node:
        if n.op_type == "QuantizeLinear":
            zp = inits[n.input[2]]
            assert zp.data_type in (onnx.TensorProto.UINT8, onnx.TensorProto.INT8)  # integer zero points
        if n.op_type == "DequantizeLinear" and n.input[0] in inits:  # weights and biases
            assert inits[n.input[0]].data_type in (onnx.TensorProto.INT8, onnx.TensorProto.INT32)
        if n.op_type == "Clip" and n.input[0].endswith("QuantizeLinear_output_0"):  # sub-8-bit grid, integer
            assert inits[n.input[1]].data_type == onnx.TensorProto.UINT8
    w, a = BITS[bits]
    n_clip = sum(n.op_type == "Clip" for n in m.graph.node)
    assert (n_clip > 0) == (a < 8)
    for name, c in quant_convs(q).items():
        wi = onnx.numpy_helper.to_array(inits[f"{name}.weight_int"])
        assert np.array_equal(wi, c.integer_weight().numpy().astype(np.int8))  # the codes, unchanged
        assert wi.min() >= c.weight_quantizer.qmin and wi.max() <= c.weight_quantizer.qmax


@pytest.mark.parametrize("kind", list(CFGS))
@pytest.mark.parametrize("bits", list(BITS))
def test_onnxruntime_integer_kernels_match_the_fake_quant_model(exported, kind, bits):
    q, path = exported[kind, bits]
    # ~650k codes an image: most images hold a code within ~1e-5 of a half-step somewhere, which an untrained
    # net then propagates widely. So per image: the first differing codes are rounding ties; an image
    # without any differing code gives the same outputs (the mAP of trained models: tests/engine/test_val_onnx.py).
    assert_matches_up_to_ties(q, path, seeds=range(50, 54))


def test_integer_zero_point_matches_torch_learnable_fake_quant():
    """LSQ+ on the integer zero-point grid equals torch's learnable per-tensor fake quant with that zero
    point (codes; values to float rounding), and its gradients follow torch's: the scale gets c - zp where
    clipped, the offset straight through."""
    torch.manual_seed(0)
    x = torch.randn(4096) * 2 - 0.3
    q = LSQQuantizer(8, signed=False, learn_offset=True, grad_scale=False)
    q.integer_zero_point = True
    q.set_scale(torch.tensor([0.0173]), offset=torch.tensor([-0.4861]))
    zp = int(q.zero_point_code())
    assert zp == round(0.4861 / 0.0173)
    x1 = x.clone().requires_grad_(True)
    y = q(x1)
    s = torch.tensor([0.0173], requires_grad=True)
    x2 = x.clone().requires_grad_(True)
    y_ref = torch._fake_quantize_learnable_per_tensor_affine(x2, s, torch.tensor([float(zp)]), 0, 255, 1.0)
    assert torch.equal(q.codes(x), torch.round(y_ref.detach() / 0.0173 + zp))
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-6)
    g = torch.randn(4096)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(q._scale.grad, s.grad, rtol=1e-4, atol=1e-4)
    clipped = (x2.grad == 0)
    assert float(q.offset.grad) == pytest.approx(float(g[clipped].sum()), rel=1e-5)


def test_ort_models_have_the_targets_quantizers():
    q = quantized("det", "w4a8")
    convs = quant_convs(q)
    outs = output_quantizers(q)
    pre = [n for n in outs if n.endswith(".pre") or n.endswith(".quantizer")]
    assert len(pre) == len(convs)  # one output quantizer per quantized conv (after BN, or the head conv's own)
    adds = [n for n in outs if n.endswith(".add_quantizer")]
    assert len(adds) == 7  # yolov5nu's residual Bottlenecks (C3 of the backbone)
    assert all(o.bits == 8 and o.integer_zero_point and o.is_initialized for o in outs.values())
    assert all(c.input_quantizer.integer_zero_point and c.int32_bias for c in convs.values())
    # W4A8: convs whose input is a block output or residual sum take its 8-bit encoding as it is
    shared = {n for n, c in convs.items() if c.input_source is not None}
    assert len(shared) == 57 and "model.0.conv" not in shared and "model.2.m.0.cv2.conv" in shared
    assert sum(isinstance(m, QuantOut) for m in q.modules()) == 6  # the head's final box / class convs
    assert all(isinstance(m.sig, FixedQuantizer) for m in q.modules() if isinstance(m, QuantAct))
    sim = quantized("det", "w4a8", target="sim")
    assert not output_quantizers(sim) and not any(c.int32_bias for c in quant_convs(sim).values())


def test_a_model_exports_only_for_its_own_target(tmp_path):
    sim = quantized("det", "w4a8", target="sim")
    with pytest.raises(ValueError, match="trained for target 'sim'.*--target ort"):
        deploy.export_onnx(sim, tmp_path / "x.onnx", IMGSZ, target="ort")
    q = quantized("det", "w4a8")
    with pytest.raises(ValueError, match="trained for target 'ort'"):
        deploy.export_onnx(q, tmp_path / "y.onnx", IMGSZ, target="sim")


def test_eval_bias_is_rounded_to_the_accumulator_grid():
    q = copy.deepcopy(quantized("det", "w4a8")).fuse(verbose=False)
    c = next(m for m in q.modules() if isinstance(m, QuantConv2d) and m.bias is not None)
    _, b_scale = c.accumulator_scale()
    steps = c.accumulator_bias().double() / b_scale.double()
    assert torch.allclose(steps, steps.round(), atol=1e-3)
    assert not torch.equal(c.accumulator_bias(), c.bias.detach())


def test_target_names_of_the_cli_match_the_code():
    from yolo_qat.engine.cli_export import build_parser

    target = next(a for a in build_parser()._actions if a.dest == "target")
    assert tuple(target.choices) == TARGET_NAMES


def test_sessions_use_the_exact_arithmetic_mode(exported, monkeypatch):
    """The checks above must not depend on the CPU: without VNNI, onnxruntime's U8S8 kernels saturate 8-bit-weight
    convs, so the project's sessions of ort files set session.x64quantprecision (exact U8U8). It once failed to
    load these graphs (explicit int8 weight zero points); without them they load and run."""
    import onnxruntime as ort

    seen = []
    real = ort.SessionOptions.add_session_config_entry
    monkeypatch.setattr(ort.SessionOptions, "add_session_config_entry",
                        lambda self, k, v: (seen.append((k, v)), real(self, k, v))[1])
    for kind, bits in (("det", "w8a8"), ("seg", "w4a4")):
        _, path = exported[kind, bits]
        assert ort_session(path).run(None, {"images": images(1, IMGSZ, 0).numpy()})
    assert seen == [("session.x64quantprecision", "1")] * 2


def test_qc_corrections_fold_into_an_integer_export(tmp_path):
    """QC wraps each conv (a head conv's inside its QuantOut, so the correction comes before the output
    quantizer, as BN does); folded, the export still runs every conv as QLinearConv and matches."""
    from yolo_qat.quant.qc import fold_qc, insert_qc, qc_parameters

    q = copy.deepcopy(quantized("seg", "w4a8"))
    assert insert_qc(q) == len(quant_convs(q))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in qc_parameters(q):
            p.add_(torch.randn_like(p) * 0.05)
    fold_qc(q)
    path = deploy.export_onnx(q, tmp_path / "qc.onnx", IMGSZ)
    assert optimized_ops(path, tmp_path)["QLinearConv"] == len(quant_convs(q))
    assert_matches_up_to_ties(q, path, seeds=range(60, 63))


def test_packed_checkpoint_of_an_ort_model_reloads_identically(tmp_path):
    q = quantized("det", "w4a4")
    deploy.save_packed(q, tmp_path / "q.qpk")
    r = deploy.load_packed(tmp_path / "q.qpk")
    assert r.quant_recipe["target"] == "ort" and output_quantizers(r)
    x = images(2, IMGSZ, 3)
    with torch.no_grad():
        assert torch.equal(r.eval()(x)[0], q.eval()(x)[0])


def test_head_output_quantizers_cover_the_calibrated_range():
    """A head's logits keep their extremes: the QuantOut quantizers start at min..max of the calibration
    outputs (an MSE clip saturated the best detections: -4.2 box mAP after W4A8 QAT on the embedded data)."""
    q = quantized("det", "w4a8")
    seen = {}
    heads = [m for m in q.modules() if isinstance(m, QuantOut)]
    hooks = [m.quantizer.register_forward_pre_hook(lambda mod, a: seen.setdefault(id(mod), a[0])) for m in heads]
    with torch.no_grad():
        q.eval()(images(8, IMGSZ, 0))
    for h in hooks:
        h.remove()
    for m in heads:
        x, qz = seen[id(m.quantizer)], m.quantizer
        lo = -float(qz.zero_point_code()) * float(qz.scale)
        hi = lo + (qz.qmax - qz.qmin) * float(qz.scale)
        # calibration saw the float network, this forward the quantized one: a few per cent apart at the ends
        assert lo <= 0.9 * min(float(x.min()), 0) and hi >= 0.9 * max(float(x.max()), 0), (lo, hi, x.min(), x.max())


@pytest.mark.skipif(not (ROOT.parent / "shared" / "fixtures" / "original-yolo").is_dir(), reason="fixtures not found")
@pytest.mark.parametrize("name", ["yolov5n", "yolov7-tiny"])
def test_original_models_export_to_integer_kernels(name, tmp_path):
    """The paper's anchor-based models (checkpoints made with the original code) for the ort target: every
    quantized conv a QLinearConv (yolov7-tiny's LeakyReLU stays a float op between Q/DQ), codes up to ties."""
    from test_original_quant import original

    q = quantize_model(original(name), {"w_bits": 4, "a_bits": 8, "per_channel": True, "weight_init": "lsq",
                                        "target": "ort"}).eval()
    calibrate(q, [images(4, IMGSZ, s) for s in range(2)], num_batches=2)
    path = deploy.export_onnx(q, tmp_path / f"{name}.onnx", IMGSZ)
    assert optimized_ops(path, tmp_path)["QLinearConv"] == len(quant_convs(q))
    assert_matches_up_to_ties(q, path, seeds=range(50, 52))
