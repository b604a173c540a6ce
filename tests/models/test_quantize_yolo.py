"""quantize_model on Ultralytics YOLO models built from yaml (no weights)."""
import copy
import subprocess
import sys
from collections import Counter

import pytest
import torch
from torch import nn
from ultralytics.nn.tasks import DetectionModel, SegmentationModel

from yolo_qat import models  # noqa: F401  (registers the YOLO policy)
from yolo_qat.models.checkpoint import save_checkpoint
from yolo_qat.quant import QuantConv2d, calibrate, layer_bits, quantize_model
from builders import build, first_output, images, raw_outputs

# (cfg, class, #Conv2d in the model, #8-bit layers: stem + head prediction convs (+ proto))
CASES = [("yolov5nu.yaml", DetectionModel, 76, 7), ("yolov8n-seg.yaml", SegmentationModel, 76, 11),
         ("yolo11n.yaml", DetectionModel, 88, 7)]


@pytest.mark.parametrize("cfg,cls,n_convs,n_8bit", CASES)
def test_layer_counts(cfg, cls, n_convs, n_8bit):
    m = build(cfg, cls)
    assert sum(type(x) is nn.Conv2d for x in m.modules()) == n_convs
    quantize_model(m, {"w_bits": 4, "a_bits": 4, "first_last_bits": 8, "per_channel": False})
    bits = layer_bits(m)
    head = len(m.model) - 1
    assert len(bits) == n_convs - 1  # everything but the DFL conv
    assert Counter(bits.values()) == {(8, 8): n_8bit, (4, 4): n_convs - 1 - n_8bit}
    assert bits["model.0.conv"] == (8, 8)
    for branch in ("cv2", "cv3") + (("cv4",) if cls is SegmentationModel else ()):
        for i in range(3):
            assert bits[f"model.{head}.{branch}.{i}.2"] == (8, 8)
    if cls is SegmentationModel:
        assert bits[f"model.{head}.proto.cv3.conv"] == (8, 8)
    dfl = m.model[-1].dfl.conv
    assert type(dfl) is nn.Conv2d and not dfl.weight.requires_grad


def test_overrides_and_exclusions():
    m = build("yolov5nu.yaml", DetectionModel)
    quantize_model(m, {"w_bits": 3, "a_bits": 4, "overrides": {"model.1.conv": {"w_bits": 6}},
                       "exclude": ["model.2.cv1.conv"]})
    bits = layer_bits(m)
    assert bits["model.1.conv"] == (6, 4) and bits["model.3.conv"] == (3, 4)
    assert "model.2.cv1.conv" not in bits


@pytest.mark.parametrize("recipe,field", [
    ({"w_bits": 0}, "w_bits"), ({"w_bits": 1}, "w_bits"), ({"a_bits": 9}, "a_bits"),
    ({"w_bits": "four"}, "w_bits"), ({"first_last_bits": 1}, "first_last_bits"),
    ({"overrides": {"model.99.conv": {"w_bits": 4}}}, "overrides"),
    ({"exclude": ["nope"]}, "exclude"), ({"act_mode": "weird"}, "act_mode"), ({"wbits": 4}, "wbits"),
])
def test_bad_recipes(recipe, field):
    m = build("yolov5nu.yaml", DetectionModel)
    with pytest.raises(ValueError, match=field) as e:
        quantize_model(m, recipe)
    assert "allowed" in str(e.value)


def _calibrated(cfg, cls, bits, seed=0):
    fp = build(cfg, cls, seed)
    q = quantize_model(copy.deepcopy(fp), {"w_bits": bits, "a_bits": bits, "first_last_bits": bits,
                                               "per_channel": True}).eval()
    calibrate(q, [images(8, 64, s) for s in range(6)], num_batches=6)
    return fp, q


def layer_errors(fp, q, x):
    """Relative error of every quantized conv against its float original on the same input:
    a random-weight network amplifies any perturbation layer after layer (0.2% of input noise
    becomes ~4% at the head), so local errors are what tells how well each layer quantizes."""
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: inputs.__setitem__(n, a[0]))
             for n, m in fp.named_modules() if type(m) is nn.Conv2d]
    with torch.no_grad():
        fp(x)
    for h in hooks:
        h.remove()
    errs = {}
    fp_mods = dict(fp.named_modules())
    with torch.no_grad():
        for n, m in q.named_modules():
            if isinstance(m, QuantConv2d):
                ref = fp_mods[n](inputs[n])
                errs[n] = ((m(inputs[n]) - ref).norm() / ref.norm()).item()
    return errs


@pytest.mark.parametrize("cfg,cls", [("yolov5nu.yaml", DetectionModel), ("yolov8n-seg.yaml", SegmentationModel)])
def test_w8a8_close_w2a2_far(cfg, cls):
    x = images(2, 64, seed=7)
    local, end = {}, {}
    for bits in (8, 2):
        fp, q = _calibrated(cfg, cls, bits)
        local[bits] = torch.tensor(list(layer_errors(fp, q, x).values()))
        with torch.no_grad():
            a, b = raw_outputs(fp(x)[1:]), raw_outputs(q(x)[1:])
        end[bits] = ((a - b).norm() / a.norm()).item()
    # 8 bits: rounding noise of heavy-tailed SiLU activations, ~1-2% per layer; 2 bits: tens of %.
    assert local[8].median() < 0.03 and local[8].max() < 0.08, local[8]
    assert local[2].median() > 0.3, local[2].median()
    assert end[2] > 2 * end[8] and end[2] > 0.4, end


def test_fuse_keeps_quantized_outputs():
    _, q = _calibrated("yolov8n-seg.yaml", SegmentationModel, 4)
    x = images(2, 64, seed=3)
    with torch.no_grad():
        before = first_output(q(x))
        q.fuse(verbose=False)
        after = first_output(q(x))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in q.modules() if not isinstance(m, nn.ConvTranspose2d))
    assert isinstance(q.model[0].conv, QuantConv2d)
    torch.testing.assert_close(after, before, atol=1e-4 * before.abs().max().item(), rtol=0)


@pytest.mark.parametrize("groups", [1, 2, 8])
def test_quant_conv_is_a_drop_in(groups):
    conv = nn.Conv2d(8, 16, 3, padding=1, groups=groups, bias=True)
    q = QuantConv2d.from_conv(conv, 8, 8)
    assert set(q.state_dict()) >= set(conv.state_dict())
    x = torch.rand(2, 8, 10, 10)
    q.input_quantizer.init_from_samples(x.flatten())  # calibrated (a training step refuses an uncalibrated one)
    torch.testing.assert_close(q(x), conv(x), atol=0.05 * conv(x).abs().max().item(), rtol=0)


LOAD_SCRIPT = """
import sys, torch
torch.set_num_threads({threads})  # same as the parent: conv kernels differ in float order by thread count
sys.path.insert(0, {root!r})
from yolo_qat.models.checkpoint import load_checkpoint
m, ckpt = load_checkpoint({path!r})
x = torch.load({xpath!r})
with torch.no_grad():
    y = m(x)
while isinstance(y, (tuple, list)):
    y = y[0]
torch.save({{"y": y, "scales": {{n: q._scale.data for n, q in m.named_modules() if hasattr(q, "_scale")}},
            "recipe": ckpt["quant_recipe"]}}, {out!r})
"""


def test_save_load_fresh_process(tmp_path):
    from pathlib import Path

    _, q = _calibrated("yolov8n-seg.yaml", SegmentationModel, 4)
    x = images(2, 64, seed=5)
    with torch.no_grad():
        y = first_output(q(x))
    path = save_checkpoint(tmp_path / "q.pt", q)
    torch.save(x, tmp_path / "x.pt")
    root = str(Path(__file__).resolve().parents[2])
    script = LOAD_SCRIPT.format(threads=torch.get_num_threads(), root=root, path=str(path), xpath=str(tmp_path / "x.pt"), out=str(tmp_path / "o.pt"))
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    out = torch.load(tmp_path / "o.pt")
    assert torch.equal(out["y"], y)
    scales = {n: m._scale.data for n, m in q.named_modules() if hasattr(m, "_scale")}
    assert scales.keys() == out["scales"].keys()
    for n, s in scales.items():
        assert out["scales"][n].dtype == torch.float32 and torch.equal(out["scales"][n], s), n
    assert out["recipe"]["w_bits"] == 4


def test_ultralytics_half_save_keeps_scales_fp32():
    _, q = _calibrated("yolov5nu.yaml", DetectionModel, 4)
    h = copy.deepcopy(q).half()
    for (n, a), (_, b) in zip(q.named_modules(), h.named_modules()):
        if isinstance(a, QuantConv2d):
            assert torch.equal(a.weight_quantizer._scale, b.weight_quantizer._scale)
            assert torch.equal(a.input_quantizer.offset, b.input_quantizer.offset)
            assert b.weight.dtype == torch.float32 and torch.equal(a.weight, b.weight)
