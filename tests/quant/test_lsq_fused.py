"""The fused CPU kernel (quant/csrc/lsq_cpu.cpp) against the plain-PyTorch reference (_LSQFunction),
itself tested against PyTorch's learnable fake-quant kernels in test_lsq.py.

Forward values and input gradients must agree bit for bit (same float operations, same rounding
decisions, ties included); the scale and offset gradients are sums, accumulated in another order.
"""
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from yolo_qat.quant import fused as fused_lsq
from yolo_qat.quant import lsq_fake_quant
from yolo_qat.quant.lsq import qrange

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(fused_lsq.extension() is None, reason="fused kernel could not be built here")


def _run(x, s, b, qmin, qmax, g, grad_out, fused):
    x, s = x.detach().clone().requires_grad_(), s.detach().clone().requires_grad_()
    b = None if b is None else b.detach().clone().requires_grad_()
    y = lsq_fake_quant(x, s, qmin, qmax, g, offset=b, fused=fused)
    y.backward(grad_out)
    return y.detach(), x.grad, s.grad, None if b is None else b.grad


def _inputs(shape, step, qmin, qmax, offset, seed):
    torch.manual_seed(seed)
    x = torch.randn(shape) * step * (qmax - qmin) * 0.4 + step * (qmin + qmax) / 2 + offset
    flat = x.view(-1)
    # exact half-steps (rounding ties), both grid ends, and values just past them
    levels = torch.arange(qmin - 2, qmax + 3, dtype=torch.float32)[: flat.numel() // 2]
    flat[: levels.numel()] = levels * step + offset
    flat[levels.numel(): 2 * levels.numel()] = (levels + 0.5) * step + offset
    return x


@pytest.mark.parametrize("bits,signed", [(2, False), (3, True), (4, False), (4, True), (8, False)])
@pytest.mark.parametrize("offset", [None, -0.25], ids=["no-offset", "offset"])
# 7 x 11 x 13 x 17 = 17017 elements: more than one 16384-element chunk, and a tail that is not a
# multiple of the 8 vector lanes.
@pytest.mark.parametrize("shape", [(7, 11, 13, 17), (3, 5)], ids=["multi-chunk", "tiny"])
def test_fused_matches_reference(bits, signed, offset, shape):
    qmin, qmax = qrange(bits, signed)
    step = 0.125  # a power of two: x * (1 / s) is exact, so the ties above are real ties
    x = _inputs(shape, step, qmin, qmax, offset or 0.0, seed=bits)
    s = torch.tensor([step])
    b = None if offset is None else torch.tensor([offset])
    g = 1 / (x.numel() * qmax) ** 0.5
    grad_out = torch.randn_like(x)
    y, dx, ds, db = _run(x, s, b, qmin, qmax, g, grad_out, fused=True)
    y_r, dx_r, ds_r, db_r = _run(x, s, b, qmin, qmax, g, grad_out, fused=False)
    assert torch.equal(y, y_r)
    assert torch.equal(dx, dx_r)
    torch.testing.assert_close(ds, ds_r, rtol=1e-5, atol=1e-6)
    if b is not None:
        torch.testing.assert_close(db, db_r, rtol=1e-5, atol=1e-6)
    assert 0 < (dx == 0).float().mean() < 1  # some clipped, some passed through


def test_fused_is_used_and_keeps_only_the_input():
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    s = torch.tensor([0.1], requires_grad=True)
    y = lsq_fake_quant(x, s, 0, 15, 1.0, offset=torch.tensor([-0.2], requires_grad=True))
    assert type(y.grad_fn).__name__ != "_LSQFunctionBackward"  # the C++ node, not the reference's
    y_ref = lsq_fake_quant(x, s, 0, 15, 1.0, offset=torch.tensor([-0.2], requires_grad=True), fused=False)
    assert type(y_ref.grad_fn).__name__ == "_LSQFunctionBackward"
    with fused_lsq.reference_only():
        assert type(lsq_fake_quant(x, s, 0, 15, 1.0).grad_fn).__name__ == "_LSQFunctionBackward"
    assert type(lsq_fake_quant(x, s, 0, 15, 1.0).grad_fn).__name__ != "_LSQFunctionBackward"


def test_fused_scale_clamped_like_reference():
    """A step size an optimizer pushed to zero or below quantizes with the minimum step."""
    x = torch.randn(64) * 1e-7
    for bad in (0.0, -0.5):
        s = torch.tensor([bad])
        out = [_run(x, s, None, -8, 7, 0.1, torch.ones_like(x), fused=f) for f in (True, False)]
        assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])
        torch.testing.assert_close(out[0][2], out[1][2], rtol=1e-5, atol=1e-6)


def test_fused_falls_back_for_what_it_does_not_handle():
    """Non-contiguous, per-channel and half inputs go to the reference with the same results."""
    torch.manual_seed(0)
    x = torch.randn(4, 6, 5, 5).transpose(1, 3)  # not contiguous
    s = torch.tensor([0.2])
    assert fused_lsq.fake_quant(x, s, None, 0, 15, 1.0, 1e-8) is None
    y = lsq_fake_quant(x, s, 0, 15, 1.0)
    assert torch.equal(y, lsq_fake_quant(x.contiguous(), s, 0, 15, 1.0))
    h = torch.randn(2, 3, 4, 4).half()
    assert lsq_fake_quant(h, s, 0, 15, 1.0).dtype == torch.float16


def test_fused_gradients_do_not_depend_on_thread_count():
    x = torch.randn(4, 16, 40, 40)  # 100k elements: several chunks, run in parallel
    s, b = torch.tensor([0.05]), torch.tensor([-0.1])
    grad_out = torch.randn_like(x)
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            runs.append(_run(x, s, b, 0, 15, 0.01, grad_out, fused=True))
    finally:
        torch.set_num_threads(threads)
    for a, c in zip(runs[0], runs[1]):
        assert torch.equal(a, c)


def test_only_input_gradients_or_only_scale_gradients():
    x = torch.randn(3, 4, 5, 5)
    s = torch.tensor([0.1], requires_grad=True)
    lsq_fake_quant(x, s, 0, 15, 1.0).sum().backward()  # x needs no gradient
    assert s.grad is not None and torch.isfinite(s.grad).all()
    x.requires_grad_(True)
    lsq_fake_quant(x, s.detach(), 0, 15, 1.0).sum().backward()  # the scale needs none
    assert x.grad is not None


def test_in_place_change_of_the_saved_input_is_caught():
    """The kernel recomputes the rounding from the saved input: autograd must refuse a modified one."""
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    a = x * 1.0
    y = lsq_fake_quant(a, torch.tensor([0.1], requires_grad=True), 0, 15, 1.0)
    a.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_build_failure_falls_back_with_a_warning(monkeypatch):
    monkeypatch.setattr(fused_lsq, "_state", {"ext": None, "tried": False, "off": 0})

    def broken_load(*args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    import torch.utils.cpp_extension as cpp_ext

    monkeypatch.setattr(cpp_ext, "load", broken_load)
    x = torch.randn(2, 3, 4, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = lsq_fake_quant(x, torch.tensor([0.1]), 0, 15, 1.0)
    assert any("fused LSQ kernel unavailable" in str(w.message) and "ninja" in str(w.message) for w in caught)
    assert torch.equal(y, lsq_fake_quant(x, torch.tensor([0.1]), 0, 15, 1.0, fused=False))


def test_env_switch_turns_it_off():
    code = ("import torch; from yolo_qat.quant import fused, lsq_fake_quant; "
            "y = lsq_fake_quant(torch.randn(2, 3, 4, 4, requires_grad=True), torch.tensor([0.1]), 0, 15, 1.0); "
            "print(fused.extension() is None, type(y.grad_fn).__name__)")
    env = dict(os.environ, QAT_FUSED_LSQ="0")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["True", "_LSQFunctionBackward"]
