"""LSQ against PyTorch's own learnable fake-quant kernels (an independent implementation)."""
import math

import pytest
import torch

from yolo_qat.quant import LSQQuantizer, lsq_fake_quant
from yolo_qat.quant.lsq import qrange


def _reference_per_tensor(x, s, qmin, qmax, g):
    return torch._fake_quantize_learnable_per_tensor_affine(x, s, torch.zeros(1), qmin, qmax, g)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "reference"])
def test_per_tensor_matches_pytorch(bits, signed, fused):
    torch.manual_seed(bits + 10 * signed)
    qmin, qmax = qrange(bits, signed)
    x = (torch.randn(4, 8, 6, 6) * 0.17 * max(qmax, -qmin) * 0.6).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    s = torch.tensor([0.17], requires_grad=True)
    s_ref = s.detach().clone().requires_grad_()
    g = 1 / math.sqrt(x.numel() * qmax)
    grad_out = torch.randn_like(x)

    y = lsq_fake_quant(x, s, qmin, qmax, g, fused=fused)
    y.backward(grad_out)
    y_ref = _reference_per_tensor(x_ref, s_ref, qmin, qmax, g)
    y_ref.backward(grad_out)

    torch.testing.assert_close(y, y_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-6, rtol=0)
    torch.testing.assert_close(s.grad, s_ref.grad, atol=1e-6, rtol=1e-5)
    # the test is only meaningful if some inputs were clipped and some were not
    assert 0 < (x.grad == 0).float().mean() < 1


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("axis", [0, 1])
def test_per_channel_matches_pytorch(bits, axis):
    torch.manual_seed(bits)
    qmin, qmax = qrange(bits, True)
    x = (torch.randn(6, 5, 3, 3) * 1.5).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    n = x.shape[axis]
    s = (torch.rand(n) * 0.3 + 0.05).requires_grad_()
    s_ref = s.detach().clone().requires_grad_()
    g = 1 / math.sqrt(x.numel() / n * qmax)
    grad_out = torch.randn_like(x)

    lsq_fake_quant(x, s, qmin, qmax, g, axis=axis).backward(grad_out)
    y = lsq_fake_quant(x.detach(), s.detach(), qmin, qmax, g, axis=axis)
    y_ref = torch._fake_quantize_learnable_per_channel_affine(x_ref, s_ref, torch.zeros(n), axis, qmin, qmax, g)
    y_ref.backward(grad_out)

    torch.testing.assert_close(y, y_ref.detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-6, rtol=0)
    torch.testing.assert_close(s.grad, s_ref.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "reference"])
def test_offset_gradient_matches_autograd_reference(fused):
    """LSQ+ offset: compare with plain autograd through a straight-through round."""
    torch.manual_seed(0)
    x = (torch.randn(2, 3, 5, 5) * 0.6).requires_grad_()
    s = torch.tensor([0.05], requires_grad=True)
    b = torch.tensor([-0.2], requires_grad=True)
    g = 0.37
    lsq_fake_quant(x, s, 0, 15, g, offset=b, fused=fused).sum().backward()

    x2, s2, b2 = (t.detach().clone().requires_grad_() for t in (x, s, b))

    def scale_grad(t, k):  # identity forward, gradient times k
        return t * k + (t - t * k).detach()

    s_g, b_g = scale_grad(s2, g), scale_grad(b2, g)
    z = (x2 - b_g) / s_g
    r = z + (z.round() - z).detach()
    inside = ((z.round() >= 0) & (z.round() <= 15)).float()
    # inside: straight-through; outside: the clipped level, no gradient to x
    zc = inside * r + (1 - inside) * z.round().clamp(0, 15)
    y_ref = zc * s_g + b_g
    y_ref.sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-6, rtol=0)
    torch.testing.assert_close(s.grad, s2.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.grad, b2.grad, atol=1e-5, rtol=1e-5)


def test_scale_never_nonpositive_and_recovers():
    q = LSQQuantizer(4)
    q.set_scale(torch.tensor([0.1]))
    with torch.no_grad():
        q._scale.fill_(-1.0)  # as an aggressive optimizer step could do
    x = torch.randn(100, requires_grad=True)
    y = q(x)
    assert torch.isfinite(y).all() and (q.scale > 0).all()
    y.pow(2).sum().backward()
    assert q._scale.grad is not None and torch.isfinite(q._scale.grad).all()
    with pytest.raises(ValueError, match="> 0"):
        q.set_scale(torch.tensor([0.0]))


@pytest.mark.parametrize("bad", [0, 1, 9, "four", 4.0, True])
def test_bad_bits(bad):
    with pytest.raises(ValueError, match="bits"):
        LSQQuantizer(bad)


def test_fp32_under_autocast_and_half():
    q = LSQQuantizer(4)
    value = torch.tensor([0.1234567])
    q.set_scale(value)
    q.half()
    assert q._scale.dtype == torch.float32 and torch.equal(q._scale.data, value)
    x = torch.randn(8, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = q(x)
    assert y.dtype == torch.bfloat16


def test_disable_and_freeze():
    q = LSQQuantizer(2)
    q.set_scale(torch.tensor([1.0]))
    x = torch.randn(10)
    assert not torch.equal(q(x), x)
    q.enabled = False
    assert torch.equal(q(x), x)
    q.freeze()
    assert not q._scale.requires_grad


def test_state_dict_round_trip_marks_initialized():
    q = LSQQuantizer(4, per_channel=True, channels=3)
    q.set_scale(torch.tensor([0.1, 0.2, 0.3]))
    q2 = LSQQuantizer(4, per_channel=True, channels=3)
    q2.load_state_dict(q.state_dict())
    assert q2._is_init and torch.equal(q2.scale, q.scale)


def test_weight_init_mse_beats_lsq_formula():
    from yolo_qat.quant.range_init import lsq_formula_scale, mse_scale

    w = torch.randn(64, 32, 3, 3) * 0.05
    qmin, qmax = qrange(4, True)

    def err(s):
        return ((w / s).round().clamp(qmin, qmax) * s - w).pow(2).mean()

    assert err(mse_scale(w, qmin, qmax)) <= err(lsq_formula_scale(w, qmax)) + 1e-12
    assert mse_scale(w, qmin, qmax, axis=0).shape == (64,)
