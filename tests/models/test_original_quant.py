"""Quantizing the original anchor-based YOLOv5 / YOLOv7 models (models.yolo): which layers stay at 8 bits,
a quantization-aware fuse() (BN, ImplicitM, RepConv) that keeps outputs and integer weights, and pickling.

Fuse tolerance: fuse() changes no integer weight and, with the same activation codes, a quantized conv's
output only by the float rounding of the folded affine (out_scale / bias rounded once from float64, then
y * k + b instead of BN's (y - mean) / sqrt(var + eps) * w + b, or ImplicitM's g * (y + b)): a few fp32
ulps (1.2e-7 relative each) at the head outputs, which have no quantizer after them; measured 0 (yolov5n:
every BN output is re-quantized, which absorbs the difference) and 1e-6 relative (yolov7-tiny: ImplicitM
in the head's output scale). Asserted at 1e-5 relative. Inside the network such a difference can move an
activation to the other code only at a rounding tie: such images are checked to diverge first at a tie
(as tests/deploy/test_export.py does) and their outputs are not compared.
"""
import copy
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch import nn

from yolo_qat.deploy.verify import fake_quant_codes
from yolo_qat.models.checkpoint import save_checkpoint
from yolo_qat.models.common import ImplicitA, ImplicitM, RepConv
from yolo_qat.models.original import load_original
from yolo_qat.models.policy import QuantOriginalDetectionModel, QuantOriginalSegmentationModel, QuantRepConv
from yolo_qat.models.yolo import DetectionModel, SegmentationModel
from yolo_qat.quant import QuantConv2d, calibrate, layer_bits, quant_convs, quantize_model
from builders import EXPECTED_8BIT, FIX, FIXTURES, RECIPE, images, needs_fixtures

ROOT = Path(__file__).resolve().parents[2]

N_CONVS = {"yolov5n": 60, "yolov5n-seg": 63, "yolov7-tiny": 58}

_CACHE = {}


def original(name, source="fixture"):
    """An FP original model: the fixture checkpoint (random weights, perturbed BN and implicit layers,
    made with the upstream code) or a fresh build from the shipped yaml, nc=3."""
    if (name, source) not in _CACHE:
        if source == "fixture":
            _CACHE[name, source] = load_original(FIX / FIXTURES[name])[0]
        else:
            torch.manual_seed(0)
            cls = SegmentationModel if name.endswith("-seg") else DetectionModel
            _CACHE[name, source] = cls(name, nc=3, verbose=False).eval()
    return copy.deepcopy(_CACHE[name, source])


def quantized(model, recipe=RECIPE):
    q = quantize_model(model, recipe).eval()
    calibrate(q, [images(4, 64, s) for s in range(2)], num_batches=2)
    return q


@pytest.mark.parametrize("source", ["fixture", "yaml"])
@pytest.mark.parametrize("name", sorted(EXPECTED_8BIT))
def test_first_last_layers_at_8_bits(name, source):
    if source == "fixture" and not FIX.is_dir():
        pytest.skip(f"fixtures not found at {FIX}")
    m = original(name, source)
    assert sum(type(x) is nn.Conv2d for x in m.modules()) == N_CONVS[name]
    quantize_model(m, {"w_bits": 4, "a_bits": 4, "first_last_bits": 8, "weight_init": "lsq"})
    bits = layer_bits(m)
    assert len(bits) == N_CONVS[name]  # nothing is "never": no DFL in anchor-based heads
    assert {n for n, b in bits.items() if b == (8, 8)} == EXPECTED_8BIT[name]
    n8 = len(EXPECTED_8BIT[name])
    assert Counter(bits.values()) == {(8, 8): n8, (4, 4): N_CONVS[name] - n8}
    seg = name.endswith("-seg")
    assert type(m) is (QuantOriginalSegmentationModel if seg else QuantOriginalDetectionModel)
    assert isinstance(m, SegmentationModel if seg else DetectionModel)


def test_focus_stem_is_the_first_layer():
    """yolov5 before v6.0 starts with Focus: its conv (model.0.conv.conv) sees the image."""
    from yolo_qat.models.yolo import load_original_yaml

    d = load_original_yaml("yolov5n")
    d["backbone"][0] = [-1, 1, "Focus", [64, 3]]
    m = DetectionModel(d, nc=3, verbose=False)
    quantize_model(m, {"w_bits": 4, "a_bits": 4, "first_last_bits": 8, "weight_init": "lsq"})
    assert {n for n, b in layer_bits(m).items() if b == (8, 8)} == {"model.0.conv.conv", "model.24.m.0",
                                                                    "model.24.m.1", "model.24.m.2"}


def _integer_weights(model):
    return {n: (c.integer_weight(), c.weight_quantizer.scale.detach().clone()) for n, c in quant_convs(model).items()}


def _outputs(y):
    """pred (B, N, no) split into boxes and the rest (scores, mask coefficients), proto, raw maps."""
    pred, *rest = y
    maps = rest[-1]
    return [pred[..., :4], pred[..., 4:], *rest[:-1], *maps]


def check_fuse_keeps_outputs(q, n_images=3):
    """Fuse q in place; check integer weights and (on images without a code flip) outputs as the module
    docstring argues. Returns how many images were flip-free."""
    xs = [images(1, 64, 70 + s) for s in range(n_images)]
    with torch.no_grad():
        before = [(fake_quant_codes(q, x), _outputs(q(x))) for x in xs]
    ints = _integer_weights(q)
    with torch.no_grad():
        q.fuse(verbose=False)
    after_ints = _integer_weights(q)
    assert ints.keys() == after_ints.keys()
    for n, (w, s) in ints.items():
        assert torch.equal(after_ints[n][0], w) and torch.equal(after_ints[n][1], s), n
    flip_free = 0
    for x, ((codes, z), outs) in zip(xs, before):
        codes_after, _ = fake_quant_codes(q, x)
        flips = [int((a != b).sum()) for a, b in zip(codes, codes_after, strict=True)]
        first = next((i for i, n in enumerate(flips) if n), None)
        if first is not None:
            tie = ((z[first][codes[first] != codes_after[first]] % 1) - 0.5).abs().max()
            assert tie < 1e-3, (first, tie)
            continue
        flip_free += 1
        with torch.no_grad():
            new = _outputs(q(x))
        for a, b in zip(new, outs, strict=True):
            assert (a - b).abs().max() <= 1e-5 * b.abs().max(), ((a - b).abs().max(), b.abs().max())
    assert flip_free >= 1
    return flip_free


@needs_fixtures
@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_fuse_keeps_quantized_outputs_and_integer_weights(name):
    q = quantized(original(name))
    check_fuse_keeps_outputs(q)
    assert q.is_fused()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in q.modules())
    assert all(isinstance(c, QuantConv2d) for c in q.model[-1].m)
    if name == "yolov7-tiny":  # ImplicitM in the head conv's output scale; ImplicitA before its input quantizer
        head = q.model[-1]
        assert not any(isinstance(m, ImplicitM) for m in q.modules())
        assert all(isinstance(a, ImplicitA) for a in head.ia) and all(c.out_scale is not None for c in head.m)


def repconv_model():
    """A small yolov7-style model with RepConv blocks (full yolov7 has them, yolov7-tiny has none) and an
    IDetect head, BN statistics and implicit layers perturbed as the fixtures' are."""
    d = {"nc": 3, "depth_multiple": 1.0, "width_multiple": 1.0,
         "anchors": [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119]],
         "backbone": [[-1, 1, "Conv", [16, 3, 2]], [-1, 1, "Conv", [32, 3, 2]], [-1, 1, "Conv", [32, 3, 2]],
                      [-1, 1, "RepConv", [32, 3, 1]], [-1, 1, "Conv", [64, 3, 2]]],
         "head": [[-1, 1, "RepConv", [64, 3, 1]], [[3, 5], 1, "IDetect", ["nc", "anchors"]]]}
    torch.manual_seed(0)
    m = DetectionModel(d, verbose=False)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                c = bn.num_features
                bn.weight.copy_(0.5 + torch.rand(c, generator=g))
                bn.bias.copy_(0.1 * torch.randn(c, generator=g))
                bn.running_mean.copy_(0.1 * torch.randn(c, generator=g))
                bn.running_var.copy_(0.5 + torch.rand(c, generator=g))
    return m.eval()


def test_quantized_repconv_keeps_its_branches():
    """A quantized RepConv cannot be re-parameterised into one integer conv: fuse folds each branch's BN
    into that branch's output scale instead (the float model still re-parameterises)."""
    q = quantized(repconv_model())
    reps = [m for m in q.modules() if isinstance(m, RepConv)]
    assert len(reps) == 2 and all(type(m) is QuantRepConv for m in reps)
    assert reps[0].rbr_identity is not None  # c1 == c2, stride 1: the identity branch is there
    check_fuse_keeps_outputs(q)
    for m in reps:
        assert not hasattr(m, "rbr_reparam")
        assert isinstance(m.rbr_dense[0], QuantConv2d) and isinstance(m.rbr_1x1[0], QuantConv2d)
        assert isinstance(m.rbr_dense[1], nn.Identity) and m.rbr_dense[0].out_scale is not None
    fp = repconv_model().fuse(verbose=False)
    assert all(hasattr(m, "rbr_reparam") for m in fp.modules() if isinstance(m, RepConv))


LOAD = """
import json, sys, torch
torch.set_num_threads({threads})  # as the parent: conv kernels sum in another order at another thread count
sys.path.insert(0, {root!r})
from yolo_qat.models.checkpoint import load_checkpoint
x = torch.load({x!r})
res = {{}}
for key, path in {paths!r}.items():
    m, ckpt = load_checkpoint(path)
    with torch.no_grad():
        y = m(x)
    torch.save(y, path + ".out")
    res[key] = {{"class": type(m).__module__ + "." + type(m).__name__, "recipe": ckpt["quant_recipe"],
                 "reps": sorted({{type(r).__module__ + "." + type(r).__name__ for r in m.modules()
                                  if "RepConv" in type(r).__name__}})}}
print("RESULT" + json.dumps(res))
"""


def _flat(y):
    return [y] if isinstance(y, torch.Tensor) else [t for v in y for t in _flat(v)]


@needs_fixtures
def test_quantized_original_models_pickle_by_name(tmp_path):
    """Checkpoints of quantized original models (plain, fused with ImplicitA kept, with QuantRepConv)
    load in a fresh process that imports nothing but the loader, with bit-identical outputs."""
    models = {"seg": quantized(original("yolov5n-seg")), "v7": quantized(original("yolov7-tiny")),
              "rep": quantized(repconv_model())}
    models["v7"].fuse(verbose=False)
    models["rep"].fuse(verbose=False)
    x = images(2, 64, seed=5)
    torch.save(x, tmp_path / "x.pt")
    paths = {k: str(save_checkpoint(tmp_path / f"{k}.pt", m)) for k, m in models.items()}
    script = LOAD.format(threads=torch.get_num_threads(), root=str(ROOT), x=str(tmp_path / "x.pt"), paths=paths)
    r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.split("RESULT", 1)[1])
    assert res["seg"]["class"] == "yolo_qat.models.policy.QuantOriginalSegmentationModel"
    assert res["v7"]["class"] == res["rep"]["class"] == "yolo_qat.models.policy.QuantOriginalDetectionModel"
    assert res["rep"]["reps"] == ["yolo_qat.models.policy.QuantRepConv"]
    for k, m in models.items():
        assert res[k]["recipe"]["w_bits"] == 4
        with torch.no_grad():
            ref = _flat(m(x))
        got = _flat(torch.load(paths[k] + ".out"))
        assert len(got) == len(ref) and all(torch.equal(a, b) for a, b in zip(got, ref)), k
