"""QuantConv2d's recompute_input: the input's fake quantization is recomputed in the backward instead of
keeping the quantized input. Same outputs and gradients bit for bit, one activation-sized tensor less per
quantized conv (the memory of the FP network)."""
import contextlib
import copy

import pytest
import torch
from torch import nn
from ultralytics.nn.tasks import SegmentationModel

from yolo_qat import models  # noqa: F401  (registers the YOLO policy)
from yolo_qat.quant import QuantConv2d, calibrate, quantize_model, set_recompute_input
from yolo_qat.quant import fused as fused_lsq

from builders import build, images, raw_outputs


def grads_after_backward(model: nn.Module, x: torch.Tensor):
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    y = raw_outputs(model(x))
    (y.square().mean() + y.mean()).backward()
    return y.detach(), x.grad, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "reference"])
def test_yolo_outputs_and_gradients_are_bit_identical(fused):
    model = build("yolov8n-seg.yaml", SegmentationModel)
    quantize_model(model, {"w_bits": 4, "a_bits": 4, "first_last_bits": 8, "per_channel": False})
    calibrate(model, [images(2, 64, s) for s in range(2)])
    model.train()
    for m in model.modules():  # BN in eval: the two passes must see the same statistics
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    x = images(2, 64, 7)
    with fused_lsq.reference_only() if not fused else contextlib.nullcontext():
        set_recompute_input(model, False)
        y0, gx0, g0 = grads_after_backward(model, x)
        set_recompute_input(model, True)
        y1, gx1, g1 = grads_after_backward(model, x)
    assert torch.equal(y0, y1) and torch.equal(gx0, gx1)
    assert g0.keys() == g1.keys() and any("input_quantizer" in k for k in g0)
    for k in g0:
        assert torch.equal(g0[k], g1[k]), k


@pytest.mark.parametrize("groups,bias,folded", [(1, True, False), (4, True, True), (8, False, True)])
def test_grouped_strided_biased_and_folded_convs(groups, bias, folded):
    torch.manual_seed(1)
    conv = QuantConv2d(8, 16, 3, stride=2, padding=2, dilation=2, groups=groups, bias=bias, w_bits=4, a_bits=3)
    conv.input_quantizer.set_scale(torch.tensor(0.3))
    if folded:  # BN / QC folded into the per-channel output scale
        conv.fold_affine(torch.rand(16) + 0.5, torch.randn(16))
    x = torch.randn(2, 8, 12, 12)
    set_recompute_input(conv, False)
    y0, gx0, g0 = grads_after_backward(conv, x)
    set_recompute_input(conv, True)
    y1, gx1, g1 = grads_after_backward(conv, x)
    assert torch.equal(y0, y1) and torch.equal(gx0, gx1)
    assert g0.keys() == g1.keys() and "input_quantizer._scale" in g0
    for k in g0:
        assert torch.equal(g0[k], g1[k]), k
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast: recomputed too (tests/quant/test_amp_cpu.py)
        assert conv._recomputes(x)
        conv(x.requires_grad_(True)).float().sum().backward()


def saved_bytes(net: nn.Module, x: torch.Tensor) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net(x)
    return total


def test_keeps_one_tensor_less_per_conv_like_the_fp_network():
    torch.manual_seed(0)
    c, n_layers = 16, 3
    fp = nn.Sequential(*[m for _ in range(n_layers) for m in (nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c),
                                                              nn.SiLU())])
    q = copy.deepcopy(fp)
    for i in range(0, 3 * n_layers, 3):
        q[i] = QuantConv2d.from_conv(q[i], 4, 4)
        q[i].input_quantizer.set_scale(torch.tensor(0.05))
    x = torch.randn(2, c, 32, 32, requires_grad=True)
    act = x.numel() * 4
    set_recompute_input(q, False)
    kept_both = saved_bytes(q, x)
    set_recompute_input(q, True)
    recomputed = saved_bytes(q, x)
    # the quantizer's copy of each conv input is gone (plus a few scalars)
    assert n_layers * act <= kept_both - recomputed < n_layers * act + 256
    # what remains over the FP network is the quantized weights' bookkeeping, not activations
    assert 0 <= recomputed - saved_bytes(fp, x) < act / 4


def test_an_uninitialised_quantizer_initialises_once_and_no_grad_skips_it():
    torch.manual_seed(0)
    conv = QuantConv2d(4, 4, 3, padding=1, w_bits=4, a_bits=4, recompute_input=True).eval()
    x = torch.rand(2, 4, 8, 8) * 3
    assert not conv._recomputes(x)  # not initialised yet: the first (eval) forward initialises from data
    conv(x).sum().backward()
    s = conv.input_quantizer.scale.clone()
    assert conv._recomputes(x)
    conv.train()  # (in training an uncalibrated activation quantizer is an error: tests/quant/test_uncalibrated.py)
    with torch.no_grad():
        assert not conv._recomputes(x)
    conv(x).sum().backward()
    assert torch.equal(conv.input_quantizer.scale, s)  # the recomputation did not re-initialise it
