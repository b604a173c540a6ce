"""The CUDA fake-quant kernels (quant/lsq_triton.py) against the reference (quant/lsq.py::_LSQFunction),
run on the CPU in Triton's interpreter: the kernels run as numpy code on CPU tensors.

The interpreter must be on before triton itself is imported (triton.language's own helpers such as
``tl.sum`` are decorated at import), and it must not leak into a process that also runs real kernels: so
``test_in_interpreter_subprocess`` runs this file again in a child with ``TRITON_INTERPRET=1``, where
the kernel tests run; in the parent they are skipped with that reason.

y and dx bit for bit (fp32 / fp16 / bf16, NCHW / channels_last, ties, NaN / +-inf inputs), ds / db to 1e-5 (sums in another order)
relative; saved-for-backward bytes at most the input's own (plus the two scalars). Also the AMP fix: an
input that overflowed to inf gets finite (clip) scale gradients in the reference, the CPU kernel and here.
The same for the per-channel kernels (conv weights on axis 0, NCHW and channels_last, one or several blocks
a channel; an activation on axis 1), with steps at and below the floor (straight-through gradient), exact
half-step ties in every channel, deterministic ds / db, and the dispatch through quant.fused.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from yolo_qat.quant.grid import MIN_SCALE, qrange
from yolo_qat.quant.lsq import lsq_fake_quant

pytest.importorskip("triton", reason="triton is not installed (the CUDA kernels are Triton)")

ROOT = Path(__file__).resolve().parents[2]
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
    import yolo_qat.quant.lsq_triton as mod

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


# ds / db are sums of ~1,700 fp32 terms, taken in another order by the kernel than by the reference (whose
# torch.dot order depends on the processor's vector width): 2.3e-6 relative apart on an AVX-512 EPYC.
_SUM_RTOL = 1e-5


def _close(a, r):
    if torch.isnan(r).any():
        return bool(torch.isnan(a).all())
    return torch.allclose(a, r, rtol=_SUM_RTOL, atol=_SUM_RTOL * float(r.abs().max().clamp_min(1e-3)))


# unsigned without an offset: x in (-s/2, 0) rounds to -0.0, which the clamp to [0, qmax] keeps (y = -0.0)
CASES = [(4, False, -0.25), (8, False, 0.5), (4, True, None), (2, True, None), (3, True, 0.125), (4, False, None)]


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
    from yolo_qat.quant import fused as fused_lsq

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


@pytest.mark.parametrize("step", [MIN_SCALE, 0.0, -0.5], ids=["at-floor", "zero", "negative"])
@in_child
def test_scale_at_or_below_the_floor(kt, step):
    """A step at MIN_SCALE or below it (an optimizer pushed it there): floored in the forward, the gradient
    straight through to the raw step, as the reference (so the step can recover)."""
    x, dy = _inputs((2, 3, 5, 7), 0.0625, 0, 15, -0.25, torch.float32, False, seed=2)
    s, b = torch.tensor([step]), torch.tensor([-0.25])
    ref = _run(lambda x_, s_, b_: lsq_fake_quant(x_, s_, 0, 15, 0.1, None, b_, fused=False), x, dy, s, b)
    tri = _run(lambda x_, s_, b_: kt.fake_quant(x_, s_, b_, 0, 15, 0.1, MIN_SCALE), x, dy, s, b)
    assert _same_bits(tri[0], ref[0]) and _same_bits(tri[1], ref[1])
    assert _close(tri[2], ref[2]) and _close(tri[3], ref[3]) and tri[2].abs().item() > 0, (tri[2], ref[2])


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


# -- per channel (weight quantizers: one step per output channel, axis 0) ---------------------------------------
def _inputs_pc(shape, axis, steps, offsets, qmin, qmax, dtype, special, seed):
    """x with each channel on its own grid (steps and offsets powers of two: exact levels and half-step ties in
    every channel); with ``special``, NaN in channel 0 and +-inf / 1e30 in channel 1."""
    g = torch.Generator().manual_seed(seed)
    C = shape[axis]
    st = steps.reshape([C if d == axis else 1 for d in range(len(shape))])
    of = (offsets if offsets is not None else torch.zeros(C)).reshape(st.shape)
    x = torch.randn(shape, generator=g) * st.clamp_min(0.01) * (qmax - qmin) * 0.4 + st * (qmin + qmax) / 2 + of
    per = x.movedim(axis, 0)  # a view: writes land in x
    k = torch.arange(qmin - 2, qmax + 3, dtype=torch.float32)
    for c in range(C):
        row = per[c].reshape(-1)  # a copy where the view is not flat: written back below
        m = min(k.numel(), row.numel() // 3)
        row[:m] = k[:m] * steps[c] + of.flatten()[c]
        row[m: 2 * m] = (k[:m] + 0.5) * steps[c] + of.flatten()[c]
        if special and c == 0:
            row[-1] = float("nan")
        if special and c == 1:
            row[-3:] = torch.tensor([float("inf"), -float("inf"), 1e30])
        per[c].copy_(row.reshape(per[c].shape))
    return x.to(dtype), torch.randn(shape, generator=g).to(dtype)


def _close_pc(a, r):
    """Per channel: NaN in the same channels, the rest to _SUM_RTOL relative."""
    na, nr = torch.isnan(a), torch.isnan(r)
    if not torch.equal(na, nr):
        return False
    a, r = a[~nr], r[~nr]
    return a.numel() == 0 or torch.allclose(a, r, rtol=_SUM_RTOL, atol=_SUM_RTOL * float(r.abs().max().clamp_min(1e-3)))


# (shape, axis): conv weights (a channel of 45 weights: one block; 1287: two blocks, the second partial) and a
# per-channel activation on axis 1 (the general strided path)
PC_SHAPES = [((8, 5, 3, 3), 0), ((3, 11, 9, 13), 0), ((2, 6, 5, 7), 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("nhwc", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("special", [False, True], ids=["finite", "nan-inf"])
@in_child
def test_per_channel_kernel_matches_reference(kt, dtype, nhwc, special):
    for i, (bits, signed, offset) in enumerate(CASES):
        qmin, qmax = qrange(bits, signed)
        for shape, axis in PC_SHAPES:
            C = shape[axis]
            steps = torch.tensor([2.0 ** -(2 + c % 4) for c in range(C)])
            steps[-1] = MIN_SCALE  # a step at the floor ...
            if C > 3:
                steps[-2] = 0.0  # ... and one below it (floored; its gradient straight through, as the reference)
            offs = None if offset is None else torch.tensor([offset * (c % 3) for c in range(C)])
            x, dy = _inputs_pc(shape, axis, steps, offs, qmin, qmax, dtype, special, seed=i)
            if nhwc:
                x = x.contiguous(memory_format=torch.channels_last)  # dy left NCHW on purpose
            gf = 1 / (x.numel() // C * qmax) ** 0.5

            def ref(x_, s_, b_):
                return lsq_fake_quant(x_, s_, qmin, qmax, gf, axis, b_, fused=False)

            def tri(x_, s_, b_):
                return kt.fake_quant(x_, s_, b_, qmin, qmax, gf, MIN_SCALE, axis=axis)

            y, dx, ds, db = _run(tri, x, dy, steps, offs)
            y_r, dx_r, ds_r, db_r = _run(ref, x, dy, steps, offs)
            tag = f"{bits}-bit signed={signed} offset={offset} shape={shape} axis={axis}"
            assert y.dtype == dtype and dx.dtype == dtype, tag
            assert _same_bits(y, y_r), tag
            if nhwc:
                assert y.is_contiguous(memory_format=torch.channels_last), tag
            assert _same_bits(dx, dx_r), tag
            assert ds.shape == steps.shape and _close_pc(ds, ds_r), (tag, ds, ds_r)
            if offs is not None:
                assert db.shape == offs.shape and _close_pc(db, db_r), (tag, db, db_r)
            if special:  # a NaN input gives its channel a NaN step gradient; +-inf inputs the (finite) clip gradient
                assert torch.isnan(ds[0]) and torch.isfinite(ds[1:]).all(), (tag, ds)


@in_child
def test_per_channel_ties_at_half_steps(kt):
    """x / s = k + 0.5 exactly, in every channel: round half to even as the reference (both neighbours occur)."""
    qmin, qmax = qrange(4, True)
    steps = torch.tensor([0.25, 0.125, 0.5, 1.0])
    k = torch.arange(qmin, qmax, dtype=torch.float32) + 0.5  # -7.5 .. 6.5
    x = (k[None, :] * steps[:, None]).reshape(4, 15, 1, 1)
    y = kt.fake_quant(x, steps, None, qmin, qmax, 1.0, MIN_SCALE, axis=0)
    assert torch.equal(y, lsq_fake_quant(x, steps, qmin, qmax, 1.0, 0, None, fused=False))
    assert torch.equal(y / steps.reshape(4, 1, 1, 1), torch.round(k).expand(4, 15).reshape(4, 15, 1, 1))


@in_child
def test_per_channel_deterministic_and_saves_the_input_alone(kt):
    """Two backward passes give the same bits for ds / db (fixed-order partial sums); the backward keeps the
    input (plus the (C,) steps and offsets), not the reference's fp32 mask and error."""
    x, dy = _inputs_pc((16, 8, 3, 3), 0, torch.full((16,), 0.0625), torch.full((16,), -0.25), 0, 15,
                       torch.float32, False, seed=5)
    s, b = torch.full((16,), 0.0625), torch.full((16,), -0.25)
    runs = [_run(lambda x_, s_, b_: kt.fake_quant(x_, s_, b_, 0, 15, 0.1, MIN_SCALE, axis=0), x, dy, s, b)
            for _ in range(2)]
    assert all(torch.equal(_bits(a), _bits(c)) for a, c in zip(runs[0], runs[1]))

    tot = []

    def pack(t):
        tot.append(t.numel() * t.element_size())
        return t

    xg = x.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        kt.fake_quant(xg, s.clone().requires_grad_(), b.clone().requires_grad_(), 0, 15, 0.1, MIN_SCALE, axis=0)
    assert max(tot) == x.numel() * 4 and sum(tot) <= x.numel() * 4 + 2 * 16 * 4, tot


@in_child
def test_per_channel_dispatch_and_supports(kt):
    """fused.fake_quant_cuda (what lsq_fake_quant calls on CUDA) takes the per-channel kernels for an axis (in
    the interpreter they run on CPU tensors), the reference inside ``reference_only()``; ``supports`` wants one
    step (and offset) per slice; a strided view and a negative axis work."""
    from yolo_qat.quant import fused as fused_lsq

    w = torch.randn(6, 4, 3, 3)[:, :, :, ::2]  # strided: made contiguous
    s = torch.rand(6) * 0.1 + 0.01
    r = lsq_fake_quant(w, s, -8, 7, 1.0, 0, None, fused=False)
    y = fused_lsq.fake_quant_cuda(w, s, None, -8, 7, 1.0, MIN_SCALE, axis=0)
    assert y is not None and torch.equal(y, r)
    assert torch.equal(kt.fake_quant(w.movedim(0, -1), s, None, -8, 7, 1.0, MIN_SCALE, axis=-1), r.movedim(0, -1))
    with fused_lsq.reference_only():
        assert fused_lsq.fake_quant_cuda(w, s, None, -8, 7, 1.0, MIN_SCALE, axis=0) is None
    assert kt.supports(w, s, None, 0) and kt.supports(w, s, torch.zeros(6), 0)
    assert not kt.supports(w, torch.ones(1), None, 0) and not kt.supports(w, s, torch.zeros(1), 0)
    assert not kt.supports(w, s, None, 1) and not kt.supports(w, s, None, 4) and not kt.supports(w.double(), s, None, 0)
    assert not kt.supports(w, s, None)  # per tensor wants one step


@pytest.mark.skipif(INTERPRETED, reason="parent only")
def test_quantizers_are_created_on_the_layer_device():
    """QuantConv2d's quantizers (step sizes, offsets, flags) follow the conv's device ('meta' here: nothing is
    computed, so no range initialisation is needed to see where they were made)."""
    from yolo_qat.quant.qconv import QuantConv2d

    q = QuantConv2d(4, 8, 3, device="meta")
    where = {n: t.device.type for n, t in list(q.named_parameters()) + list(q.named_buffers())}
    assert set(where.values()) == {"meta"}, where
    assert "weight_quantizer._scale" in where and "input_quantizer.offset" in where


@pytest.mark.skipif(INTERPRETED, reason="parent only")
def test_kernels_compile_for_hopper_without_fma_or_approximate_division():
    """The kernels (per tensor and per channel) compiled ahead of time for sm_90 (no GPU needed): they build,
    divide with IEEE rounding (div.rn, not div.full/approx) and contain no fused multiply-add (which would round
    differently from the reference): what the interpreter cannot show."""
    import triton

    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as e:  # pragma: no cover - another triton layout
        pytest.skip(f"triton's ahead-of-time compiler API is not available: {e}")
    import yolo_qat.quant.lsq_triton as m

    ints = {"n", "C", "inner", "per_ch", "nblk"}
    consts_ = {"HAS_B", "OUTER1", "OUT_BF16", "BLOCK"}

    def sig(kern, io):  # every argument in the kernel's own order: pointers fp32 unless io names them
        return {a: ("i32" if a in ints else "constexpr" if a in consts_ else io if a in ("x_ptr", "y_ptr", "dy_ptr",
                "dx_ptr") else "*fp32" if a.endswith("_ptr") else "fp32") for a in kern.arg_names}

    kernels = [(m._lsq_fwd, sig(m._lsq_fwd, "*fp16"), {"HAS_B": True, "OUT_BF16": False, "BLOCK": 1024}),
               (m._lsq_bwd, sig(m._lsq_bwd, "*fp16"), {"HAS_B": True, "BLOCK": 1024}),
               (m._lsq_fwd_pc, sig(m._lsq_fwd_pc, "*fp32"), {"HAS_B": True, "OUTER1": False, "OUT_BF16": False,
                                                            "BLOCK": 1024}),
               (m._lsq_bwd_pc, sig(m._lsq_bwd_pc, "*fp32"), {"HAS_B": True, "OUTER1": True, "BLOCK": 256})]
    for kern, sig, consts in kernels:
        src = ASTSource(fn=kern, signature=sig,
                        constexprs={(kern.arg_names.index(k),): v for k, v in consts.items()})
        try:
            ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"enable_fp_fusion": False}).asm["ptx"]
        except Exception as e:  # no ptxas / LLVM backend in this triton build
            pytest.skip(f"cannot compile for sm_90 here: {type(e).__name__}: {str(e)[:200]}")
        assert "div.rn.f32" in ptx, kern.__name__
        assert "fma." not in ptx and "div.full" not in ptx and "div.approx" not in ptx, kern.__name__
