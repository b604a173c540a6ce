"""A quantizer without calibration: an activation quantizer that runs in training before its step size
was set is an error naming the layer, never an initialisation from the batch at hand (under DDP each rank would take
its own batch and the replicas would diverge). Weight quantizers still initialise from the weight (deterministic);
outside a training step and outside DDP an activation quantizer still initialises from its first input."""
import pickle

import pytest
import torch
from ultralytics.nn.tasks import DetectionModel

from yolo_qat import models  # noqa: F401  (registers the YOLO policy)
from yolo_qat.quant import LSQQuantizer, QuantConv2d, calibrate, quantize_model
from yolo_qat.quant.act import output_quantizers
from yolo_qat.quant.lsq import UncalibratedQuantizerError

from builders import build, images, raw_outputs


def activation_quantizer(**kw):
    q = LSQQuantizer(4, signed=False, learn_offset=True, **kw)
    q.is_activation = True
    return q


def test_activation_quantizer_in_training_refuses_without_calibration():
    q = activation_quantizer()
    x = torch.rand(2, 3, 8, 8)
    with pytest.raises(UncalibratedQuantizerError, match="never calibrated") as e:
        q(x)
    msg = str(e.value)
    assert "quant.calibrate" in msg and "DDP" in msg and "layer name is not known" in msg
    assert not q.is_initialized and not bool(q.initialized)
    with torch.no_grad():  # a no-grad pass of one process in train mode (BN statistics) still initialises
        q(x)
    assert q.is_initialized


def test_distributed_forward_refuses_even_without_grad(monkeypatch):
    import yolo_qat.quant.lsq as lsq
    monkeypatch.setattr(lsq, "_distributed", lambda: True)
    with torch.no_grad(), pytest.raises(UncalibratedQuantizerError):
        activation_quantizer()(torch.rand(2, 3, 8, 8))


def test_outside_training_and_for_weights_it_initialises_itself():
    x = torch.rand(2, 3, 8, 8)
    q = activation_quantizer().eval()
    q(x)
    assert q.is_initialized
    w = torch.randn(8, 3, 3, 3)
    wq1, wq2 = LSQQuantizer(4, per_channel=True, channels=8), LSQQuantizer(4, per_channel=True, channels=8)
    assert wq1.training
    wq1(w), wq2(w)  # from the weight alone: the same on every rank
    assert wq1.is_initialized and torch.equal(wq1.scale, wq2.scale)


def test_calibrated_or_set_quantizers_train():
    q = activation_quantizer()
    q.set_scale(0.1, offset=0.0)
    q(torch.rand(2, 3, 8, 8)).sum().backward()
    assert q._scale.grad is not None


@pytest.mark.parametrize("target", ["sim", "ort"])
def test_quantized_model_names_the_uncalibrated_layer(target):
    m = build("yolov5nu.yaml", DetectionModel)
    quantize_model(m, {"w_bits": 4, "a_bits": 4, "target": target})
    m.train()
    with pytest.raises(UncalibratedQuantizerError, match=r"'model\.0\.conv\.input_quantizer'"):
        m(images(2, 64))
    names = {q.name for q in m.modules() if isinstance(q, LSQQuantizer)}
    assert "model.0.conv.weight_quantizer" in names
    if target == "ort":  # the conv-output quantizers are named and calibrated as well
        outs = output_quantizers(m)
        assert outs and all(q.name == n for n, q in outs.items())
    calibrate(m, [images(2, 64, s) for s in range(2)])
    m.train()
    assert torch.isfinite(raw_outputs(m(images(2, 64)))).all()


def test_a_pickled_model_keeps_names_and_an_unnamed_one_is_named_by_calibrate():
    conv = QuantConv2d(3, 4, 3, padding=1)
    with pytest.raises(UncalibratedQuantizerError, match="layer name is not known"):
        conv(torch.rand(1, 3, 8, 8))
    net = torch.nn.Sequential(conv)
    calibrate(net, [torch.rand(1, 3, 8, 8)])
    assert conv.input_quantizer.name == "0.input_quantizer" and conv.input_quantizer.is_initialized
    fresh = pickle.loads(pickle.dumps(torch.nn.Sequential(QuantConv2d(3, 4, 3))))
    assert fresh[0].input_quantizer.name is None  # nothing named it: the message says how it gets one
