"""The ``npu`` and ``tensorrt`` deploy targets (quant/targets.py): each export follows its runtime's rules, checked
on the ONNX graph (onnx.checker, zero points, initializer types, positive weight scales, one Q per tensor), and
onnxruntime runs it with the activation codes of the fake-quant model up to rounding ties (as for ``ort``,
tests/deploy/test_export_ort.py). TensorRT and NPUs themselves cannot run here: their rules come from their docs.
"""
import collections
import copy

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper

from yolo_qat import deploy
from yolo_qat.quant import LSQQuantizer, quant_convs
from yolo_qat.quant.act import QuantAct, QuantOut, output_quantizers
from yolo_qat.quant.recipe import QuantRecipe
from test_export_ort import BITS, CFGS, IMGSZ, _FP, assert_matches_up_to_ties, optimized_ops
from builders import build, calibrated_copy, images

TARGETS = ("npu", "tensorrt")


def quantized(kind, bits, target):
    """A model of ``kind`` for ``target`` whose BatchNorms have some negative gammas (a folded weight scale < 0)."""
    if kind not in _FP:
        _FP[kind] = build(*CFGS[kind])
    fp = copy.deepcopy(_FP[kind])
    with torch.no_grad():
        for m in fp.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight[::5] *= -1
    w, a = BITS[bits]
    return calibrated_copy(fp, {"w_bits": w, "a_bits": a, "per_channel": True, "target": target}, IMGSZ)


# W4A8 (the deployable 4-bit model) for det and seg; W8A8 for det (8-bit weights: int8 initializers everywhere)
CASES = [("det", "w4a8"), ("seg", "w4a8"), ("det", "w8a8")]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{(target, kind, bits): (model, onnx path)}, built on first use."""
    class Lazy(dict):
        def __missing__(self, key):
            target, kind, bits = key
            q = quantized(kind, bits, target)
            self[key] = q, deploy.export_onnx(q, tmp_path_factory.mktemp(target) / f"{kind}-{bits}.onnx", IMGSZ)
            return self[key]

    return Lazy()


def _constants(m: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    inits = {t.name: t for t in m.graph.initializer}
    inits.update({n.output[0]: n.attribute[0].t for n in m.graph.node if n.op_type == "Constant"})
    inits.update({n.output[0]: inits[n.input[0]] for n in m.graph.node if n.op_type == "Identity" and n.input[0] in inits})
    return inits


def _weights(q, m):
    """{conv name: (initializer, its DequantizeLinear scale)} of every quantized conv."""
    inits = _constants(m)
    dq = {n.input[0]: n for n in m.graph.node if n.op_type == "DequantizeLinear"}
    return {name: (inits[f"{name}.weight_int"], numpy_helper.to_array(inits[dq[f"{name}.weight_int"].input[1]]))
            for name in quant_convs(q)}


def _check_weights(q, m, int4: bool):
    from yolo_qat.models import fold_bn_into_quant_convs

    folded = copy.deepcopy(q)
    fold_bn_into_quant_convs(folded)  # BN into out_scale, as the export does (the codes do not change)
    negative = 0
    for name, (init, scale) in _weights(q, m).items():
        c = quant_convs(folded)[name]
        narrow = 2 ** (c.w_bits - 1) - 1
        assert c.weight_quantizer.qmin == -narrow  # trained on the narrow grid
        want_type = TensorProto.INT4 if (int4 and c.w_bits <= 4) else TensorProto.INT8
        assert init.data_type == want_type, (name, init.data_type)
        codes = numpy_helper.to_array(init).astype(np.int64)
        assert np.abs(codes).max() <= narrow
        assert (scale > 0).all()  # negative folded scales became negated codes
        # the trained codes, negated where BN's gamma (so the folded scale) is negative; scales |s_w * out_scale|
        w_scale = c.accumulator_scale()[0].numpy()
        sign = np.sign(w_scale).reshape(-1, *[1] * (codes.ndim - 1))
        assert np.array_equal(codes, (c.integer_weight().numpy() * sign).astype(np.int64)), name
        np.testing.assert_array_equal(scale, np.abs(w_scale))
        negative += int((w_scale < 0).sum())
    assert negative > 0  # the negative gammas made some: the negation was exercised


@pytest.mark.parametrize("kind,bits", CASES)
def test_npu_graph_has_int4_weights_u8_activations_and_int32_bias(exported, kind, bits):
    q, path = exported["npu", kind, bits]
    m = onnx.load(str(path))
    onnx.checker.check_model(m)
    assert m.opset_import[0].version >= 21  # INT4 tensors
    assert {p.key: p.value for p in m.metadata_props}["quant_target"] == "npu"
    inits = _constants(m)
    for n in m.graph.node:
        if n.op_type == "QuantizeLinear":  # every activation: u8 with an integer zero point
            assert inits[n.input[2]].data_type == TensorProto.UINT8
    biases = [n for n in m.graph.node if n.op_type == "DequantizeLinear" and inits.get(n.input[0]) is not None
              and inits[n.input[0]].data_type == TensorProto.INT32]
    assert len(biases) == len(quant_convs(q))
    _check_weights(q, m, int4=True)
    assert sum(t.data_type == TensorProto.INT4 for t in m.graph.initializer) == \
        sum(c.w_bits <= 4 for c in quant_convs(q).values())
    # what onnxruntime's QLinear fusions see is the ort target's pattern: the 8-bit-weight convs become integer
    # convs (onnxruntime's CPU conv keeps INT4 weights float; an NPU takes them)
    n8 = sum(c.w_bits == 8 for c in quant_convs(q).values())
    assert optimized_ops(path, path.parent)["QLinearConv"] == n8


@pytest.mark.parametrize("kind,bits", CASES)
def test_tensorrt_graph_is_symmetric_int8_with_one_q_per_tensor(exported, kind, bits):
    q, path = exported["tensorrt", kind, bits]
    m = onnx.load(str(path))
    onnx.checker.check_model(m)
    assert {p.key: p.value for p in m.metadata_props}["quant_target"] == "tensorrt"
    inits = _constants(m)
    producer = {o: n for n in m.graph.node for o in n.output}
    q_inputs = collections.Counter()
    for n in m.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) == 3:
            zp = inits[n.input[2]]  # activations: signed int8, zero point 0
            assert zp.data_type == TensorProto.INT8 and not numpy_helper.to_array(zp).any()
        if n.op_type == "QuantizeLinear":
            q_inputs[n.input[0]] += 1
            src = producer.get(n.input[0])
            assert src is None or src.op_type != "Conv"  # the activation is fused into the conv: no Q in between
        if n.op_type == "Conv" and n.input[1] in producer and producer[n.input[1]].op_type == "DequantizeLinear":  # (DFL: a fixed float conv)
            # float bias straight into the conv (TensorRT folds it), no int32 DequantizeLinear
            assert len(n.input) == 3 and n.input[2] in inits and inits[n.input[2]].data_type == TensorProto.FLOAT
    assert max(q_inputs.values()) == 1  # one encoding per tensor: convs reading it share its Q/DQ
    assert not any(n.op_type == "Clip" for n in m.graph.node)
    assert not any(isinstance(mod, QuantOut) for mod in q.modules())  # no conv-output quantizers
    acts = [mod for mod in q.modules() if isinstance(mod, QuantAct)]
    assert acts and all(a.pre is None and a.sig is None and a.out.signed for a in acts)
    shared = sum(c.input_source is not None for c in quant_convs(q).values())
    assert shared > 0
    _check_weights(q, m, int4=False)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("kind", list(CFGS))
def test_onnxruntime_runs_the_target_files_with_the_models_codes(exported, target, kind):
    q, path = exported[target, kind, "w4a8"]
    assert_matches_up_to_ties(q, path, seeds=range(50, 53))


def test_targets_refuse_what_their_runtimes_do_not_run():
    for target in TARGETS:
        with pytest.raises(ValueError, match="8-bit activations only"):
            QuantRecipe(w_bits=4, a_bits=4, target=target)
        with pytest.raises(ValueError, match="8-bit activations only"):
            QuantRecipe(w_bits=4, a_bits=8, overrides={"model.3.conv": {"a_bits": 4}}, target=target)
    assert QuantRecipe(w_bits=4, a_bits=8, target="tensorrt").act_mode == "signed"  # lsq+ is the default grid
    with pytest.raises(ValueError, match="symmetric signed"):
        QuantRecipe(w_bits=4, a_bits=8, act_mode="unsigned", target="tensorrt")
    assert QuantRecipe(w_bits=4, a_bits=8, target="npu").act_mode == "lsq+"


def test_npu_needs_the_int4_opset(tmp_path):
    q = quantized("det", "w4a8", "npu")
    with pytest.raises(ValueError, match="opset"):
        deploy.export_onnx(q, tmp_path / "m.onnx", IMGSZ, opset=17)


def test_tensorrt_quantizers_are_symmetric_and_shared():
    q = quantized("det", "w4a8", "tensorrt")
    for c in quant_convs(q).values():
        grid = c.input_grid
        assert grid.signed and grid.offset is None  # zero point 0
    assert all(o.signed for o in output_quantizers(q).values())
    # every residual sum is encoded once (signed) and read as it is by the convs after it
    adds = [m.add_quantizer for m in q.modules() if isinstance(getattr(m, "add_quantizer", None), LSQQuantizer)]
    assert adds and all(a.signed for a in adds)
    x = images(2, IMGSZ, 3)
    with torch.no_grad():
        y = q(x)[0]
    assert torch.isfinite(y).all()


def test_continuing_a_quantized_checkpoint_for_another_target_is_an_error():
    from yolo_qat.quant.targets import check_continued_target

    q = quantized("det", "w8a8", "npu")
    check_continued_target(q, "npu")
    check_continued_target(q, "sim")  # the recipe default: no --target given, the checkpoint's own applies
    with pytest.raises(ValueError, match="--target tensorrt cannot apply"):
        check_continued_target(q, "tensorrt", "best.pt")


@pytest.mark.parametrize("target", TARGETS)
def test_checkpoints_of_the_targets_reload_identically(target, tmp_path):
    """Safe loading (the allowlist includes the swapped Concat / Bottleneck classes) and the packed checkpoint
    (narrow weight grids, the targets' quantizers) give the same model."""
    from yolo_qat.models.checkpoint import load_checkpoint, save_checkpoint

    q = quantized("det", "w4a8", target)
    x = images(2, IMGSZ, 3)
    with torch.no_grad():
        want = q.eval()(x)[0]
    loaded, _ = load_checkpoint(save_checkpoint(tmp_path / "q.pt", q))
    deploy.save_packed(q, tmp_path / "q.qpk")
    packed = deploy.load_packed(tmp_path / "q.qpk")
    for r in (loaded, packed):
        assert r.quant_recipe["target"] == target
        assert all(c.weight_quantizer.qmin == -c.weight_quantizer.qmax for c in quant_convs(r).values())
        with torch.no_grad():
            assert torch.equal(r.eval()(x)[0], want)


@pytest.mark.parametrize("target", ("ort", "npu", "tensorrt"))
def test_convs_a_recipe_keeps_in_float_export_as_float_convs_between_encodings(target, tmp_path):
    """A recipe's ``exclude`` (mixed precision keeps sensitive convs in float) leaves float Convs fed by a
    DequantizeLinear; the file still computes the model's activation codes up to rounding ties."""
    if "det" not in _FP:
        _FP["det"] = build(*CFGS["det"])
    convs = [n for n, m in _FP["det"].named_modules() if type(m) is torch.nn.Conv2d]
    # the stem, a middle conv and a head's final conv (wrapped with its output quantizer on these targets)
    kept = [convs[0], convs[len(convs) // 2], next(n for n in convs if n.endswith("cv3.0.2"))]
    q = calibrated_copy(_FP["det"], {"w_bits": 4, "a_bits": 8, "per_channel": True, "target": target,
                                     "exclude": kept}, IMGSZ)
    assert not set(kept) & set(quant_convs(q))
    path = deploy.export_onnx(q, tmp_path / f"{target}.onnx", IMGSZ)
    if target == "ort":
        assert optimized_ops(path, tmp_path)["Conv"] == len(kept) + 1  # and the DFL's fixed conv
    assert_matches_up_to_ties(q, path, seeds=(0, 1))
