"""BN re-estimation: exact cumulative statistics of the quantized forward, state restored."""
import copy
import random

import pytest
import torch
from torch import nn

from yolo_qat.quant import QuantConv2d, calibrate
from yolo_qat.quant.bn_reestimate import reestimate_bn


def model(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(QuantConv2d.from_conv(nn.Conv2d(3, 8, 3, padding=1), 4, 4), nn.BatchNorm2d(8), nn.SiLU(),
                      QuantConv2d.from_conv(nn.Conv2d(8, 4, 3, padding=1), 4, 4), nn.BatchNorm2d(4))
    calibrate(m, [torch.randn(4, 3, 12, 12)], 1)
    return m


def batches(n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, 12, 12, generator=g) * 2 + 1 for _ in range(n)]


def expected_stats(m, data):
    """Cumulative average of per-batch mean and unbiased var of each BN's input, as PyTorch's
    momentum=None defines it, from a hand-run quantized forward where each BN normalises with
    its batch statistics (train-mode BN)."""
    seen = {i: [] for i, layer in enumerate(m) if isinstance(layer, nn.BatchNorm2d)}
    with torch.no_grad():
        for x in data:
            y = x
            for i, layer in enumerate(m):
                if isinstance(layer, nn.BatchNorm2d):
                    seen[i].append(y)
                    y = nn.functional.batch_norm(y, None, None, layer.weight, layer.bias, True)
                else:
                    y = layer(y)
    out = {}
    for i, xs in seen.items():
        means = torch.stack([x.mean((0, 2, 3)) for x in xs])
        vars_ = torch.stack([x.var((0, 2, 3), unbiased=True) for x in xs])
        out[m[i]] = (means.mean(0), vars_.mean(0))
    return out


def test_statistics_are_the_cumulative_average_of_the_quantized_forward():
    m = model()
    data = batches()
    want = expected_stats(m, data)
    assert reestimate_bn(m, data, num_batches=50) == 5
    for bn, (mean, var) in want.items():
        torch.testing.assert_close(bn.running_mean, mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(bn.running_var, var, rtol=1e-5, atol=1e-5)
        assert int(bn.num_batches_tracked) == 5


def test_order_does_not_matter_and_num_batches_is_respected():
    data = batches(6)
    a, b, c = model(), model(), model()
    reestimate_bn(a, data)
    shuffled = data[:]
    random.Random(0).shuffle(shuffled)
    reestimate_bn(b, shuffled)
    assert reestimate_bn(c, data, num_batches=2) == 2
    for x, y, z in zip(a, b, c):
        if isinstance(x, nn.BatchNorm2d):
            torch.testing.assert_close(x.running_mean, y.running_mean, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(x.running_var, y.running_var, rtol=1e-5, atol=1e-6)
            assert not torch.allclose(x.running_mean, z.running_mean)


def test_state_is_restored_and_nothing_else_changes():
    m = model()
    bns = [x for x in m if isinstance(x, nn.BatchNorm2d)]
    bns[0].momentum, bns[1].momentum = 0.03, 0.1
    m.train()
    bns[1].eval()
    params = {n: p.clone() for n, p in m.named_parameters()}
    reestimate_bn(m, batches(3))
    assert m.training and bns[0].training and not bns[1].training
    assert (bns[0].momentum, bns[1].momentum) == (0.03, 0.1)
    for n, p in m.named_parameters():
        assert torch.equal(p, params[n]) and p.grad is None, n


def test_quantized_statistics_differ_from_float_ones():
    q, f = model(), model()
    for x in f:
        if isinstance(x, QuantConv2d):
            x.weight_quantizer.enabled = x.input_quantizer.enabled = False
    data = batches()
    reestimate_bn(q, data)
    reestimate_bn(f, data)
    assert not torch.allclose(q[4].running_var, f[4].running_var, rtol=1e-3)


def test_no_batches_keeps_old_statistics():
    m = model()
    reestimate_bn(m, batches(2))
    before = copy.deepcopy(m.state_dict())
    with pytest.raises(ValueError, match="no batches"):
        reestimate_bn(m, [])
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(ValueError, match="no BatchNorm"):
        reestimate_bn(nn.Conv2d(3, 3, 1), batches(1))
