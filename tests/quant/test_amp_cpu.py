"""Quantized convs under autocast, checked with CPU autocast.

bf16 (``torch.autocast(dtype=torch.bfloat16)``, CPU autocast's default) has 8 significant bits: an 8-bit code
times the step size rounds off the grid, and a fake-quant output cast to bf16 is another code for 7-8% of an
evenly used 8-bit grid. So under bf16 the quantized conv runs in fp32 on the exact grid values; under fp16 it
runs in fp16 as autocast runs any conv (within 0.12 of a step of the grid, no code moves). ``recompute_input``
works under both, bit-identical to the plain path under the same autocast.

What the conv sees is read below autocast, at ``aten.convolution`` (a TorchDispatchMode), after autocast's casts.
"""
import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from yolo_qat.quant import QuantConv2d, set_recompute_input


class ConvOperands(TorchDispatchMode):
    """The operands of every convolution run inside, as the kernel gets them (after autocast's casts)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution.default:
            self.seen.append((args[0].detach().clone(), args[1].detach().clone()))
        return func(*args, **(kwargs or {}))


def grid_conv(bits=8, offset=True, seed=0, **kw):
    """A quantized conv whose input grid is used evenly (the case where bf16 moves the most codes)."""
    torch.manual_seed(seed)
    conv = QuantConv2d(16, 16, 3, padding=1, w_bits=bits, a_bits=bits, act_offset=offset, per_channel=True, **kw)
    x = torch.rand(2, 16, 24, 24) * 6 - 0.3
    conv.input_quantizer.init_from_samples(x.flatten())
    return conv, x


def input_codes(q, v):
    """Codes of values ``v`` on ``q``'s grid, as the conv would read them back: round((v - b) / s)."""
    b = q.effective_offset(grad=False)
    b = torch.zeros(1) if b is None else b
    return torch.round((v.double() - b.double()) / q.scale.double())


def seen(conv, x, dtype):
    mode = ConvOperands()
    with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None), mode, torch.no_grad():
        y = conv(x)
    (xs, ws), = mode.seen
    return y, xs, ws


@pytest.mark.parametrize("offset", [True, False], ids=["lsq+", "lsq"])
def test_bf16_would_move_8bit_codes(offset):
    """Why bf16 is not left to autocast: the fake-quant output cast to bf16 changes codes."""
    conv, x = grid_conv(offset=offset)
    q = conv.input_quantizer
    with torch.no_grad():
        xq = q(x)
    moved = (input_codes(q, xq.bfloat16().float()) != q.codes(x)).double().mean().item()
    assert moved > 0.03  # 7-8% measured
    assert torch.equal(input_codes(q, xq.half().float()), q.codes(x))  # fp16: none


@pytest.mark.parametrize("offset", [True, False], ids=["lsq+", "lsq"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_bf16_autocast_conv_is_exact(offset, train):
    conv, x = grid_conv(offset=offset)
    conv.train(train)
    y32, x32, w32 = seen(conv, x, None)
    y16, xs, ws = seen(conv, x, torch.bfloat16)
    assert xs.dtype == ws.dtype == torch.float32
    assert torch.equal(input_codes(conv.input_quantizer, xs), conv.input_quantizer.codes(x))
    assert torch.equal(torch.round(ws / conv.weight_quantizer.scale_for(ws)), conv.integer_weight())
    assert torch.equal(xs, x32) and torch.equal(ws, w32)
    assert y16.dtype == x.dtype and torch.equal(y16, y32)  # the fp32 conv, bit for bit
    y = seen(conv, x.bfloat16(), torch.bfloat16)[0]  # a bf16 input: bf16 out, as before
    assert y.dtype == torch.bfloat16


def test_bf16_autocast_backward_equals_fp32():
    conv, x = grid_conv()
    grads = []
    for amp in (False, True):
        conv.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            y = conv(xi)
        (y.float().square().mean()).backward()
        grads.append([xi.grad] + [p.grad for p in conv.parameters()])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_fp16_autocast_keeps_the_fp16_conv_on_the_grid():
    conv, x = grid_conv()
    q = conv.input_quantizer
    _, xs, ws = seen(conv, x, torch.float16)
    assert xs.dtype == ws.dtype == torch.float16
    assert torch.equal(input_codes(q, xs.float()), q.codes(x))
    b = q.effective_offset(grad=False)
    off = ((xs.double() - b.double()) / q.scale.double() - q.codes(x).double()).abs().max().item()
    assert off <= 0.125
    assert torch.equal(torch.round(ws.float() / conv.weight_quantizer.scale_for(ws)), conv.integer_weight())


def grads_after_backward(net, x):
    net.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    y = net(x)
    (y.float().square().mean() + y.float().mean()).backward()
    return y.detach(), x.grad, {n: p.grad for n, p in net.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("amp", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("groups,bias,folded,x_dtype", [(1, True, False, torch.float32), (4, True, True, torch.float32),
                                                       (8, False, True, torch.float16), (1, True, False, "cl")])
def test_recompute_input_under_autocast_is_bit_identical(amp, groups, bias, folded, x_dtype):
    torch.manual_seed(1)
    conv = QuantConv2d(8, 16, 3, stride=2, padding=2, dilation=2, groups=groups, bias=bias, w_bits=4, a_bits=3)
    conv.input_quantizer.set_scale(torch.tensor(0.3))
    if folded:
        conv.fold_affine(torch.rand(16) + 0.5, torch.randn(16))
    x = torch.randn(2, 8, 12, 12)
    if x_dtype == "cl":
        x = x.contiguous(memory_format=torch.channels_last)
    else:
        x = x.to(x_dtype)
    with torch.autocast("cpu", dtype=amp):
        set_recompute_input(conv, False)
        assert not conv._recomputes(x)
        y0, gx0, g0 = grads_after_backward(conv, x)
        set_recompute_input(conv, True)
        assert conv._recomputes(x)
        y1, gx1, g1 = grads_after_backward(conv, x)
    assert y0.dtype == y1.dtype and torch.equal(y0, y1) and torch.equal(gx0, gx1)
    assert g0.keys() == g1.keys() and "input_quantizer._scale" in g0
    for k in g0:
        assert torch.equal(g0[k], g1[k]), k


def saved_bytes(net, x, amp):
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autocast("cpu", dtype=amp), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net(x)
    return total


@pytest.mark.parametrize("amp", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_recompute_input_under_autocast_keeps_less(amp):
    torch.manual_seed(0)
    c, n_layers = 16, 3
    q = nn.Sequential(*[m for _ in range(n_layers) for m in (nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c),
                                                             nn.SiLU())])
    for i in range(0, 3 * n_layers, 3):
        q[i] = QuantConv2d.from_conv(q[i], 4, 4)
        q[i].input_quantizer.set_scale(torch.tensor(0.05))
    x = torch.randn(2, c, 32, 32, requires_grad=True)
    set_recompute_input(q, False)
    kept_both = saved_bytes(q, x, amp)
    set_recompute_input(q, True)
    recomputed = saved_bytes(q, x, amp)
    # at least the conv's own copy of each quantized input (fp16 under fp16 autocast, fp32 under bf16) is gone
    per_layer = x.numel() * (2 if amp == torch.float16 else 4)
    assert kept_both - recomputed >= n_layers * per_layer


def test_autocast_model_forward_backward_is_finite():
    """A small network of quantized convs trains a step under either autocast, with or without recompute."""
    net = nn.Sequential(*[copy.deepcopy(grid_conv(seed=s)[0]) for s in range(2)])
    x = torch.rand(2, 16, 24, 24) * 6 - 0.3
    net[1].input_quantizer.init_from_samples(net[0](x).detach().flatten())
    for amp in (torch.float16, torch.bfloat16):
        for rc in (False, True):
            set_recompute_input(net, rc)
            _, gx, g = grads_after_backward_autocast(net, x, amp)
            assert torch.isfinite(gx).all() and all(torch.isfinite(v).all() for v in g.values())


def grads_after_backward_autocast(net, x, amp):
    with torch.autocast("cpu", dtype=amp):
        return grads_after_backward(net, x)


def test_quantizer_input_dtype_follows_the_conv():
    """fp16 autocast: the input quantizer reads x as it comes (on CUDA the Triton kernel then keeps the 2-byte
    input, no fp32 copy); bf16 autocast and no autocast: fp32 (exact grid values for the fp32 conv)."""
    conv, x = grid_conv()
    got = []
    conv.input_quantizer.register_forward_pre_hook(lambda m, a: got.append(a[0].dtype))
    xh = x.half()
    for amp, rc in [(torch.float16, False), (torch.float16, True), (torch.bfloat16, False), (None, False)]:
        set_recompute_input(conv, rc)
        got.clear()
        with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
            conv(xh.clone().requires_grad_(True)).float().sum().backward()
        assert set(got) == {torch.float16 if amp == torch.float16 else torch.float32}, (amp, rc, got)
    # and the fp16 path is what autocast gave the fp32 quantizer output before: the same codes, the same values
    conv.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.float16), torch.no_grad():
        y = conv(xh)
    with torch.autocast("cpu", dtype=torch.float16), torch.no_grad():
        y_ref = conv.convolve(conv.input_quantizer(xh.float()), conv.quantized_weight(), conv.bias.float())
    assert torch.equal(y, y_ref.to(y.dtype))
