"""The fake-quant rounding decisions do not depend on the processor's instruction set.

``(x - b) / s`` is computed as ``x * (1 / s) + (-b / s)`` with two roundings. torch.addcmul (used
before) is one fused multiply-add on AVX-512 builds of PyTorch and two operations on AVX2 ones, so
half-step ties rounded one way on one machine and the other way on another, and the fused CPU kernel
(two roundings) disagreed with the reference on AVX-512 machines only. NumPy's separate multiply
and add are the instruction-set-independent statement of the arithmetic.
"""
import numpy as np
import pytest
import torch

from yolo_qat.quant import LSQQuantizer
from yolo_qat.quant.lsq import lsq_fake_quant


def numpy_fake_quant(x, s, b, qmin, qmax):
    """IEEE float32, one rounding per operation, whatever the CPU."""
    x, s, b = (np.asarray(v, dtype=np.float32) for v in (x, s, b))
    inv = np.float32(1.0) / s
    z = x * inv + (-b * inv)
    c = np.clip(np.rint(z), qmin, qmax)
    return c * s + b, c


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    # Many values near half-steps: where one rounding more or less decides the code.
    x = torch.randn(2_000_000, generator=g) * 3
    return x, torch.tensor([0.0287196636]), torch.tensor([-0.2785])


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_lsq_plus_matches_two_rounding_arithmetic(data, fused):
    x, s, b = data
    y = lsq_fake_quant(x, s, 0, 255, 1.0, None, b, fused=fused)
    y_np, _ = numpy_fake_quant(x.numpy(), s.numpy(), b.numpy(), 0, 255)
    assert int((y.numpy() != y_np).sum()) == 0


def test_codes_match_the_forward(data):
    x, s, b = data
    q = LSQQuantizer(8, signed=False, learn_offset=True)
    q.set_scale(s, offset=b)
    with torch.no_grad():
        y = q(x)
    _, c_np = numpy_fake_quant(x.numpy(), s.numpy(), b.numpy(), 0, 255)
    assert torch.equal(q.codes(x), torch.from_numpy(c_np).float())
    assert torch.equal(q.codes(x) * q.scale + q.offset.detach(), y)
