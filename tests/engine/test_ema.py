"""EMA of latent weights, quantizer scales and BN buffers (engine.ema.QATModelEMA over Ultralytics' ModelEMA)."""
import math

import pytest
import torch
from torch import nn

from yolo_qat.engine.ema import QATModelEMA
from yolo_qat.quant import QuantConv2d


def small_model(seed=0):
    torch.manual_seed(seed)
    q = QuantConv2d.from_conv(nn.Conv2d(3, 4, 3), 4, 4)
    q.input_quantizer.set_scale(0.05, offset=-0.2)
    return nn.Sequential(q, nn.BatchNorm2d(4))


def perturb(model, k):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * (k + 1))
        model[1].running_mean.add_(0.1 * k)


@pytest.mark.parametrize("decay,tau", [(0.9, 3.0), (0.9999, 2.0)])
def test_ema_scale_follows_formula(decay, tau):
    model = small_model()
    ema = QATModelEMA(model, decay=decay, tau=tau)
    ref_scale = model[0].weight_quantizer._scale.detach().clone()
    ref_off = model[0].input_quantizer.offset.detach().clone()
    ref_rm = model[1].running_mean.clone()
    for t in range(1, 8):
        perturb(model, t)
        ema.update(model)
        a = decay * (1 - math.exp(-t / tau))
        assert ema.decay_at(t) == pytest.approx(a)
        ref_scale = a * ref_scale + (1 - a) * model[0].weight_quantizer._scale.detach()
        ref_off = a * ref_off + (1 - a) * model[0].input_quantizer.offset.detach()
        ref_rm = a * ref_rm + (1 - a) * model[1].running_mean
    e = ema.ema
    torch.testing.assert_close(e[0].weight_quantizer._scale, ref_scale, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(e[0].input_quantizer.offset, ref_off, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(e[1].running_mean, ref_rm, rtol=1e-6, atol=1e-6)
    # the EMA really lags the raw model (a > 0): it is not a copy
    assert not torch.equal(e[0].weight_quantizer._scale, model[0].weight_quantizer._scale)


def test_ema_decay_zero_is_the_raw_model():
    model = small_model(1)
    ema = QATModelEMA(model, decay=0.0, tau=5.0)
    for t in range(1, 5):
        perturb(model, t)
        ema.update(model)
    for (k, a), (_, b) in zip(model.state_dict().items(), ema.ema.state_dict().items()):
        assert torch.equal(a, b), k


def test_ema_rejects_bad_settings():
    with pytest.raises(ValueError, match="decay"):
        QATModelEMA(small_model(), decay=1.0)
    with pytest.raises(ValueError, match="tau"):
        QATModelEMA(small_model(), decay=0.9, tau=0)
