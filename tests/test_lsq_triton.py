"""The CUDA fake-quant kernels (quant/lsq_triton.py) against the reference (quant/lsq.py::_LSQFunction),
run on the CPU in Triton's interpreter: the kernels run as numpy code on CPU tensors.

The interpreter must be on before triton itself is imported (triton.language's own helpers such as
``tl.sum`` are decorated at import), and it must not leak into a process that also runs real kernels: so
``test_in_interpreter_subprocess`` runs this file again in a child with ``TRITON_INTERPRET=1``, where
the kernel tests run; in the parent they are skipped with that reason.

y and dx bit for bit (fp32 / fp16 / bf16, NCHW / channels_last, ties, NaN / +-inf inputs), ds / db to 1e-6
relative; saved-for-backward bytes at most the input's own (plus the two scalars). Also the AMP fix: an
input that overflowed to inf gets finite (clip) scale gradients in the reference, the CPU kernel and here.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quant.grid import MIN_SCALE, qrange
from quant.lsq import lsq_fake_quant

pytest.importorskip("triton", reason="triton is not installed (the CUDA kernels are Triton)")

ROOT = Path(__file__).resolve().parents[1]
INTERPRETED = os.environ.get("TRITON_INTERPRET", "") == "1"
in_child = pytest.mark.skipif(not INTERPRETED, reason="runs in the TRITON_INTERPRET=1 child of "
                                                      "test_in_interpreter_subprocess")


@pytest.mark.skipif(INTERPRETED, reason="this is the child")
def test_in_interpreter_subprocess():
    env = dict(os.environ, TRITON_INTERPRET="1", QAT_FUSED_LSQ=os.environ.get("QAT_FUSED_LSQ", "1"))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__],
                       cwd=ROOT, env=env, capture_output=True, text=True)
    print(r.stdout[-3000:])
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and " failed" not in r.stdout


@pytest.fixture(scope="module")
def kt():
    import quant.lsq_triton as mod

    assert mod._INTERPRET
    return mod


def _inputs(shape, step, qmin, qmax, offset, dtype, special, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * step * (qmax - qmin) * 0.4 + step * (qmin + qmax) / 2 + offset
    flat = x.view(-1)
    # exact grid levels and half-steps (ties; step and offset are powers of two), grid ends and beyond
    levels = torch.arange(qmin - 2, qmax + 3, dtype=torch.float32)[: flat.numel() // 3]
    flat[: levels.numel()] = levels * step + offset
    flat[levels.numel(): 2 * levels.numel()] = (levels + 0.5) * step + offset
    if special:
        flat[-4:] = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30])
    x = x.to(dtype)
    dy = torch.randn(shape, generator=g).to(dtype)
    return x, dy


def _bits(t):
    return t.view({torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[t.dtype])


def _same_bits(a, b):
    """Equal bit patterns, any NaN equal to any NaN."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    a, b = a.contiguous(), b.contiguous()
    na, nb = torch.isnan(a), torch.isnan(b)
    return torch.equal(na, nb) and torch.equal(_bits(a)[~na], _bits(b)[~nb])


def _run(fn, x, dy, s, b):
    x = x.detach().clone().requires_grad_()
    s = s.detach().clone().requires_grad_()
    b = None if b is None else b.detach().clone().requires_grad_()
    y = fn(x, s, b)
    y.backward(dy)
    return y.detach(), x.grad, s.grad, None if b is None else b.grad


def _close(a, r):
    if torch.isnan(r).any():
        return bool(torch.isnan(a).all())
    return torch.allclose(a, r, rtol=1e-6, atol=1e-6 * float(r.abs().max().clamp_min(1e-3)))


CASES = [(4, False, -0.25), (8, False, 0.5), (4, True, None), (2, True, None), (3, True, 0.125)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("nhwc", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("special", [False, True], ids=["finite", "nan-inf"])
@in_child
def test_kernel_matches_reference(kt, dtype, nhwc, special):
    shape = (2, 6, 11, 13)  # 1716 elements: two blocks, the second partial
    for i, (bits, signed, offset) in enumerate(CASES):
        qmin, qmax = qrange(bits, signed)
        step = 0.0625
        x, dy = _inputs(shape, step, qmin, qmax, offset or 0.0, dtype, special, seed=i)
        if nhwc:
            x = x.contiguous(memory_format=torch.channels_last)  # dy left NCHW on purpose
        s = torch.tensor([step])
        b = None if offset is None else torch.tensor([offset])
        gf = 1 / (x[0].numel() * qmax) ** 0.5

        def ref(x_, s_, b_):
            return lsq_fake_quant(x_, s_, qmin, qmax, gf, None, b_, fused=False)

        def tri(x_, s_, b_):
            return kt.fake_quant(x_, s_, b_, qmin, qmax, gf, MIN_SCALE)

        y, dx, ds, db = _run(tri, x, dy, s, b)
        y_r, dx_r, ds_r, db_r = _run(ref, x, dy, s, b)
        tag = f"{bits}-bit signed={signed} offset={offset}"
        assert y.dtype == dtype and dx.dtype == dtype, tag
        assert _same_bits(y, y_r), tag
        if nhwc:
            assert y.is_contiguous(memory_format=torch.channels_last), tag
        assert _same_bits(dx, dx_r), tag
        assert _close(ds, ds_r), (tag, ds, ds_r)
        if b is not None:
            assert _close(db, db_r), (tag, db, db_r)
        if special:  # inf inputs get the clip gradient: finite; a NaN input gives NaN (GradScaler skips)
            assert torch.isnan(ds).all() and torch.isnan(ds_r).all(), tag


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@in_child
def test_inf_input_gives_finite_scale_gradient(kt, dtype):
    """An activation that overflowed to +-inf under fp16 AMP: finite ds / db (the clip gradient), the same
    in the reference, the CPU kernel (if built) and the Triton kernels."""
    from quant import fused as fused_lsq

    qmin, qmax = qrange(4, False)
    x, dy = _inputs((2, 3, 5, 7), 0.0625, qmin, qmax, -0.25, dtype, False, seed=3)
    x.view(-1)[:3] = torch.tensor([float("inf"), -float("inf"), 7e4]).to(dtype)
    s, b = torch.tensor([0.0625]), torch.tensor([-0.25])
    finite = x.clone()
    finite.view(-1)[:2] = torch.tensor([1e4, -1e4]).to(dtype)  # far outside the grid: same clip gradient
    runs = {
        "reference": lambda x_, s_, b_: lsq_fake_quant(x_, s_, qmin, qmax, 0.1, None, b_, fused=False),
        "triton": lambda x_, s_, b_: kt.fake_quant(x_, s_, b_, qmin, qmax, 0.1, MIN_SCALE),
    }
    if fused_lsq.extension() is not None:
        runs["cpu-kernel"] = lambda x_, s_, b_: lsq_fake_quant(x_, s_, qmin, qmax, 0.1, None, b_, fused=True)
    for name, fn in runs.items():
        y, dx, ds, db = _run(fn, x, dy, s, b)
        assert torch.isfinite(ds).all() and torch.isfinite(db).all(), name
        assert torch.isfinite(y).all() and torch.isfinite(dx).all(), name
        _, _, ds_f, db_f = _run(fn, finite, dy, s, b)
        assert torch.allclose(ds, ds_f, rtol=1e-6, atol=1e-7) and torch.allclose(db, db_f, rtol=1e-6, atol=1e-7), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@in_child
def test_saved_for_backward_is_the_input_alone(kt, dtype):
    """Bytes kept for the backward (saved-tensor hooks): the input's own plus the two scalars; the
    reference keeps an fp32 mask and error (8 bytes per element)."""
    x = torch.randn(2, 4, 8, 8).to(dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
    s = torch.tensor([0.05], requires_grad=True)
    b = torch.tensor([-0.1], requires_grad=True)

    def saved(fn):
        tot = []

        def pack(t):
            tot.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return sum(tot), max(tot)

    own = x.numel() * x.element_size()
    total, biggest = saved(lambda: kt.fake_quant(x, s, b, 0, 15, 0.1, MIN_SCALE))
    assert biggest == own and total <= own + 16, (total, own)
    ref_total, _ = saved(lambda: lsq_fake_quant(x, s, 0, 15, 0.1, None, b, fused=False))
    assert ref_total >= 8 * x.numel() > total


@in_child
def test_dense_layouts(kt):
    """Non-dense inputs are made contiguous; a gradient in another layout is brought to the input's."""
    x = torch.randn(2, 3, 8, 10)[:, :, :, ::2]  # strided view
    y = kt.fake_quant(x, torch.tensor([0.1]), None, -8, 7, 1.0, MIN_SCALE)
    r = lsq_fake_quant(x, torch.tensor([0.1]), -8, 7, 1.0, None, None, fused=False)
    assert torch.equal(y, r)
    assert kt.supports(x, torch.tensor([0.1]), None)
    assert not kt.supports(x.double(), torch.tensor([0.1]), None)
    assert not kt.supports(x, torch.ones(3), None)


@pytest.mark.skipif(INTERPRETED, reason="parent only")
def test_quantizers_are_created_on_the_layer_device():
    """QuantConv2d's quantizers (step sizes, offsets, flags) follow the conv's device ('meta' here: nothing is
    computed, so no range initialisation is needed to see where they were made)."""
    from quant.qconv import QuantConv2d

    q = QuantConv2d(4, 8, 3, device="meta")
    where = {n: t.device.type for n, t in list(q.named_parameters()) + list(q.named_buffers())}
    assert set(where.values()) == {"meta"}, where
    assert "weight_quantizer._scale" in where and "input_quantizer.offset" in where


@pytest.mark.skipif(INTERPRETED, reason="parent only")
def test_kernels_compile_for_hopper_without_fma_or_approximate_division():
    """The kernels compiled ahead of time for sm_90 (no GPU needed): they build, divide with IEEE rounding
    (div.rn, not div.full/approx) and contain no fused multiply-add (which would round differently from the
    reference): what the interpreter cannot show."""
    import triton

    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as e:  # pragma: no cover - another triton layout
        pytest.skip(f"triton's ahead-of-time compiler API is not available: {e}")
    import quant.lsq_triton as m

    common = {"s_ptr": "*fp32", "b_ptr": "*fp32", "n": "i32", "qmin": "fp32", "qmax": "fp32", "HAS_B": "constexpr",
              "BLOCK": "constexpr"}
    kernels = [(m._lsq_fwd, {"x_ptr": "*fp16", "y_ptr": "*fp16", **common, "OUT_BF16": "constexpr"},
                {"HAS_B": True, "OUT_BF16": False, "BLOCK": 1024}),
               (m._lsq_bwd, {"x_ptr": "*fp16", "dy_ptr": "*fp16", "dx_ptr": "*fp16", "ps_ptr": "*fp32",
                             "pb_ptr": "*fp32", **common}, {"HAS_B": True, "BLOCK": 1024})]
    for kern, sig, consts in kernels:
        src = ASTSource(fn=kern, signature=sig,
                        constexprs={(kern.arg_names.index(k),): v for k, v in consts.items()})
        try:
            ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"enable_fp_fusion": False}).asm["ptx"]
        except Exception as e:  # no ptxas / LLVM backend in this triton build
            pytest.skip(f"cannot compile for sm_90 here: {type(e).__name__}: {str(e)[:200]}")
        assert "div.rn.f32" in ptx, kern.__name__
        assert "fma." not in ptx and "div.full" not in ptx and "div.approx" not in ptx, kern.__name__
