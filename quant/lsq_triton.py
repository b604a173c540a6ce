"""LSQ / LSQ+ fake quantization on CUDA, per tensor and per channel: Triton kernels.

The same maths and gradient convention as ``lsq._LSQFunction`` (PyTorch's: the straight-through mask
on the rounded value), operation for operation, so that outputs and input gradients agree bit for bit:

    inv = 1 / s (IEEE division);  z = x * inv,  or z = (-b * inv) + x * inv with the LSQ+ offset b
    r = round_half_even(z);  c = clamp(r, qmin, qmax);  m = (c == r)
    y = c * s (+ b)                          in the input's dtype (fp32, fp16 or bf16)
    dx = dy * m;  ds = sum(dy * (c - zc * m));  db = sum(dy * (1 - m))

``s`` is the step floored at ``MIN_SCALE`` inside the kernels, its gradient passed straight through to the
raw step (as the reference: a step an optimizer pushed to zero or below still learns and can recover).
``zc`` is z clamped to [qmin - 1, qmax + 1] (the reference does the same): it equals z wherever m = 1
and keeps an input that overflowed to +-inf (fp16 under AMP) from giving inf * 0 = NaN; such an input
gets the clip gradient like any clipped one.

- Forward: one pass (read x in its own dtype, compute in fp32, write y in x's dtype). No fp32 copy of
  the activation, no cast pass back.
- Backward: one pass (read x and dy, recompute the rounding decision, write dx, one partial sum of
  d y / d s and d y / d b per block), then a small ``torch.sum`` over the blocks: deterministic (no
  atomics, a fixed block size), no host sync.
- Saved for the backward: the input alone (plus the two scalars), i.e. 2 bytes per element under fp16
  AMP instead of the reference's fp32 mask and error (8 bytes per element).
- Layout: the kernels walk the storage linearly, so dense NCHW and channels_last inputs are used as
  they are (the output has the input's strides); anything else is made contiguous first.

Rounding uses the 1.5 * 2^23 trick on the pre-clamped z (exact round-half-even), so results are the
same on the GPU and in Triton's interpreter (``TRITON_INTERPRET=1`` at import time: the kernels run on
CPU tensors; tests/quant/test_lsq_triton.py). ``/`` in Triton lowers to an approximate division on NVIDIA
GPUs, hence ``tl.math.div_rn``; ``enable_fp_fusion=False`` keeps a multiply and an add from being
contracted into an FMA (which would round differently from the reference). The fp32 -> bf16 store is
written out (round to nearest even on the bits, NaN kept), since the interpreter's numpy cast cannot
express bf16.

Per channel (``axis`` given: weight quantizers, one step per output channel on axis 0) the same maths
runs in two more kernels with a step (and LSQ+ offset) per channel. The tensor, dense NCHW or
channels_last, is seen in storage order as (outer, C, inner), ``inner = stride(axis)``: a conv weight on
axis 0 is C runs of ``inner`` elements, NCHW or channels_last alike. The forward walks the storage
linearly and looks up each element's channel; the backward runs a grid of (channel, block) programs,
each writing its own partial sums, and ``ds``/``db`` are a fixed-order ``sum`` over a channel's blocks:
deterministic, no atomics, nothing but the input saved.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_BLOCK = 1024
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _levels(x, inv, nb, qmin, qmax, HAS_B: tl.constexpr):
    """(zc, r, c): z pre-clamped to one level beyond the grid (NaN kept), its rounding and the level."""
    if HAS_B:
        z = nb + x * inv
    else:
        z = x * inv
    z = tl.minimum(tl.maximum(z, qmin - 1.0, propagate_nan=tl.PropagateNan.ALL), qmax + 1.0,
                   propagate_nan=tl.PropagateNan.ALL)
    r = (z + 12582912.0) - 12582912.0  # round half to even, exact for |z| < 2^22
    r = tl.where(r == 0.0, z * 0.0, r)  # torch.round keeps the sign of a zero: round(-0.3) = -0.0
    # torch.clamp's own comparisons ((r < lo) ? lo : r, then (hi < c) ? hi : c): a -0.0 stays -0.0 at qmin = 0
    # (tl.maximum would give +0.0: an unsigned grid without offset wrote y = +0.0 where the reference has -0.0);
    # a NaN fails both comparisons and stays NaN
    c = tl.where(r < qmin, qmin, r)
    c = tl.where(qmax < c, qmax, c)
    return z, r, c


@triton.jit
def _floor(s, min_scale):
    """The step floored at ``min_scale`` as ``clamp_min`` does it (a NaN step stays NaN)."""
    return tl.where(s < min_scale, min_scale, s)


@triton.jit
def _store(ptr, offs, v, m, OUT_BF16: tl.constexpr):
    if OUT_BF16:
        # torch's fp32 -> bf16: round to nearest even on the bits, any NaN -> 0x7FC0 (ptr is an int16 view)
        bits = v.to(tl.uint32, bitcast=True)
        bits = bits + (((bits >> 16) & 1) + 0x7FFF)
        h = tl.where(v != v, 0x7FC0, bits >> 16)
        tl.store(ptr + offs, h.to(tl.uint16).to(tl.int16, bitcast=True), mask=m)
    else:
        tl.store(ptr + offs, v.to(ptr.dtype.element_ty), mask=m)


@triton.jit
def _fake_quant_values(x, s, b, qmin, qmax, HAS_B: tl.constexpr):
    """The forward's values from loaded x, step s and offset b (per tensor or per channel alike):
    ``s * clamp(round(x * (1/s) + (-b/s))) + b``, the reference's two roundings."""
    inv = tl.math.div_rn(1.0, s)
    nb = 0.0
    if HAS_B:
        nb = -b * inv
    z, r, c = _levels(x, inv, nb, qmin, qmax, HAS_B)
    y = c * s
    if HAS_B:
        y = y + b
    return y


@triton.jit
def _lsq_fwd(x_ptr, y_ptr, s_ptr, b_ptr, n, qmin, qmax, min_scale, HAS_B: tl.constexpr, OUT_BF16: tl.constexpr,
             BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    s = _floor(tl.load(s_ptr).to(tl.float32), min_scale)
    b = 0.0
    if HAS_B:
        b = tl.load(b_ptr).to(tl.float32)
    _store(y_ptr, offs, _fake_quant_values(x, s, b, qmin, qmax, HAS_B), m, OUT_BF16)


@triton.jit
def _lsq_bwd(x_ptr, dy_ptr, dx_ptr, ps_ptr, pb_ptr, s_ptr, b_ptr, n, qmin, qmax, min_scale, HAS_B: tl.constexpr,
             BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    g = tl.load(dy_ptr + offs, mask=m, other=0.0).to(tl.float32)
    s = _floor(tl.load(s_ptr).to(tl.float32), min_scale)
    inv = tl.math.div_rn(1.0, s)
    nb = 0.0
    if HAS_B:
        nb = -tl.load(b_ptr).to(tl.float32) * inv
    z, r, c = _levels(x, inv, nb, qmin, qmax, HAS_B)
    keep = tl.where(c == r, 1.0, 0.0)
    gm = g * keep
    # dx = dy * m is exact in dy's dtype (m is 0 or 1): no rounding in the store
    tl.store(dx_ptr + offs, gm.to(dx_ptr.dtype.element_ty), mask=m)
    tl.store(ps_ptr + pid, tl.sum(tl.where(m, g * (c - z * keep), 0.0), axis=0))
    if HAS_B:
        tl.store(pb_ptr + pid, tl.sum(tl.where(m, g - gm, 0.0), axis=0))


@triton.jit
def _lsq_fwd_pc(x_ptr, y_ptr, s_ptr, b_ptr, n, C, inner, qmin, qmax, min_scale, HAS_B: tl.constexpr,
                OUTER1: tl.constexpr, OUT_BF16: tl.constexpr, BLOCK: tl.constexpr):
    """Per channel, flat over the storage: element ``o`` belongs to channel ``(o // inner) % C``."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    if OUTER1:
        ch = offs // inner
    else:
        ch = (offs // inner) % C
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    s = _floor(tl.load(s_ptr + ch, mask=m, other=1.0).to(tl.float32), min_scale)
    b = 0.0
    if HAS_B:
        b = tl.load(b_ptr + ch, mask=m, other=0.0).to(tl.float32)
    _store(y_ptr, offs, _fake_quant_values(x, s, b, qmin, qmax, HAS_B), m, OUT_BF16)


@triton.jit
def _lsq_bwd_pc(x_ptr, dy_ptr, dx_ptr, ps_ptr, pb_ptr, s_ptr, b_ptr, C, inner, per_ch, nblk, qmin, qmax, min_scale,
                HAS_B: tl.constexpr, OUTER1: tl.constexpr, BLOCK: tl.constexpr):
    """Program ``pid`` = (channel ``pid // nblk``, block ``pid % nblk`` of that channel's ``per_ch`` elements):
    dx for those elements and one partial sum of d y / d s (and d y / d b) at ``ps[pid]``."""
    pid = tl.program_id(0)
    ch = pid // nblk
    j = (pid % nblk).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = j < per_ch
    if OUTER1:  # the channel is one run of per_ch == inner elements (axis 0)
        offs = ch.to(tl.int64) * inner + j
    else:
        offs = (j // inner) * C * inner + ch.to(tl.int64) * inner + j % inner
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    g = tl.load(dy_ptr + offs, mask=m, other=0.0).to(tl.float32)
    s = _floor(tl.load(s_ptr + ch).to(tl.float32), min_scale)
    inv = tl.math.div_rn(1.0, s)
    nb = 0.0
    if HAS_B:
        nb = -tl.load(b_ptr + ch).to(tl.float32) * inv
    z, r, c = _levels(x, inv, nb, qmin, qmax, HAS_B)
    keep = tl.where(c == r, 1.0, 0.0)
    gm = g * keep
    tl.store(dx_ptr + offs, gm.to(dx_ptr.dtype.element_ty), mask=m)
    tl.store(ps_ptr + pid, tl.sum(tl.where(m, g * (c - z * keep), 0.0), axis=0))
    if HAS_B:
        tl.store(pb_ptr + pid, tl.sum(tl.where(m, g - gm, 0.0), axis=0))


def _is_nhwc(t: torch.Tensor) -> bool:
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def _dense(t: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
    """``t`` laid out densely (NCHW or NHWC: the kernels walk the storage linearly); with ``like``, in
    ``like``'s layout (the gradient must walk the storage in the input's order)."""
    if like is not None:
        if t.stride() == like.stride() or (t.is_contiguous() and like.is_contiguous()):
            return t
        return t.contiguous(memory_format=torch.channels_last if _is_nhwc(like) else torch.contiguous_format)
    return t if t.is_contiguous() or _is_nhwc(t) else t.contiguous()


def _opts() -> dict:
    return {} if _INTERPRET else {"enable_fp_fusion": False}


class LSQTritonFunction(torch.autograd.Function):
    """y = s * clamp(round((x - b) / s), qmin, qmax) + b, per tensor, y in x's dtype.

    ``scale`` is the raw step (fp32), floored at ``min_scale`` inside the kernels with a straight-through
    gradient, as the reference does (a step pushed to zero or below still gets its gradient and can
    recover); ``offset`` None or one value.
    """

    @staticmethod
    def forward(ctx, x, scale, offset, qmin, qmax, grad_factor, min_scale):
        x = _dense(x)
        y = torch.empty_like(x)
        n = x.numel()
        b = offset if offset is not None else scale  # a valid pointer when there is no offset
        bf16 = x.dtype == torch.bfloat16
        if n:
            _lsq_fwd[(triton.cdiv(n, _BLOCK),)](
                x, y.view(torch.int16) if bf16 else y, scale, b, n, float(qmin), float(qmax), float(min_scale),
                HAS_B=offset is not None, OUT_BF16=bf16, BLOCK=_BLOCK, **_opts())
        ctx.save_for_backward(x, scale, b)
        ctx.consts = (float(qmin), float(qmax), float(grad_factor), offset is not None, float(min_scale))
        return y

    @staticmethod
    def backward(ctx, dy):
        x, scale, b = ctx.saved_tensors
        qmin, qmax, gf, has_b, ms = ctx.consts
        dy = _dense(dy.to(x.dtype), x)
        n = x.numel()
        nblk = max(triton.cdiv(n, _BLOCK), 1)
        dx = torch.empty_like(x)
        ps = torch.zeros(nblk, device=x.device, dtype=torch.float32)
        pb = torch.zeros(nblk if has_b else 1, device=x.device, dtype=torch.float32)
        if n:
            _lsq_bwd[(nblk,)](x, dy, dx, ps, pb, scale, b, n, qmin, qmax, ms, HAS_B=has_b, BLOCK=_BLOCK,
                              **_opts())
        ds = (ps.sum() * gf).reshape(scale.shape) if ctx.needs_input_grad[1] else None
        db = (pb.sum() * gf).reshape(b.shape) if has_b and ctx.needs_input_grad[2] else None
        return (dx if ctx.needs_input_grad[0] else None), ds, db, None, None, None, None


def _channel_block(per_ch: int) -> int:
    """Backward block size for ``per_ch`` elements per channel: a power of two in [128, 1024] (a 3x3 conv's
    channel of 144 weights is one block of 256, not a mostly idle block of 1024)."""
    return min(1024, max(128, triton.next_power_of_2(max(per_ch, 1))))


class LSQTritonChannelFunction(torch.autograd.Function):
    """y = s_c * clamp(round((x - b_c) / s_c), qmin, qmax) + b_c with one step (and offset) per slice along
    ``axis``, y in x's dtype. ``scale`` (C,) raw (floored in the kernels, straight-through, as per tensor),
    ``offset`` None or (C,)."""

    @staticmethod
    def forward(ctx, x, scale, offset, qmin, qmax, grad_factor, min_scale, axis):
        x = _dense(x)
        y = torch.empty_like(x)
        n, C = x.numel(), x.shape[axis]
        inner = x.stride(axis) if C > 1 else max(n // max(C, 1), 1)
        outer1 = n == C * inner
        b = offset if offset is not None else scale
        bf16 = x.dtype == torch.bfloat16
        if n:
            _lsq_fwd_pc[(triton.cdiv(n, _BLOCK),)](
                x, y.view(torch.int16) if bf16 else y, scale, b, n, C, inner, float(qmin), float(qmax),
                float(min_scale), HAS_B=offset is not None, OUTER1=outer1, OUT_BF16=bf16, BLOCK=_BLOCK, **_opts())
        ctx.save_for_backward(x, scale, b)
        ctx.consts = (float(qmin), float(qmax), float(grad_factor), offset is not None, float(min_scale), axis, inner,
                      outer1)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, scale, b = ctx.saved_tensors
        qmin, qmax, gf, has_b, ms, axis, inner, outer1 = ctx.consts
        dy = _dense(dy.to(x.dtype), x)
        n, C = x.numel(), x.shape[axis]
        per_ch = n // C if C else 0
        block = _channel_block(per_ch)
        nblk = max(triton.cdiv(per_ch, block), 1)
        dx = torch.empty_like(x)
        ps = torch.zeros(C, nblk, device=x.device, dtype=torch.float32)
        pb = torch.zeros(C if has_b else 1, nblk, device=x.device, dtype=torch.float32)
        if n:
            _lsq_bwd_pc[(C * nblk,)](x, dy, dx, ps, pb, scale, b, C, inner, per_ch, nblk, qmin, qmax, ms,
                                     HAS_B=has_b, OUTER1=outer1, BLOCK=block, **_opts())
        # each channel's partial sums in a fixed order (one row each): the same ds on every run
        ds = (ps.sum(dim=1) * gf).reshape(scale.shape) if ctx.needs_input_grad[1] else None
        db = (pb.sum(dim=1) * gf).reshape(b.shape) if has_b and ctx.needs_input_grad[2] else None
        return (dx if ctx.needs_input_grad[0] else None), ds, db, None, None, None, None, None


def supports(x: torch.Tensor, scale: torch.Tensor, offset, axis: int | None = None) -> bool:
    """Whether the kernels apply: a float tensor (fp32/fp16/bf16) on the kernels' device, with one step
    (``axis`` None) or one step (and offset) per slice along ``axis``."""
    dev_ok = x.device.type == ("cpu" if _INTERPRET else "cuda")
    if not (dev_ok and x.dtype in DTYPES and scale.device == x.device
            and (offset is None or offset.device == x.device)):
        return False
    if axis is None:
        return scale.numel() == 1 and (offset is None or offset.numel() == 1)
    if x.dim() == 0 or not -x.dim() <= axis < x.dim():
        return False
    C = x.shape[axis]
    return C >= 1 and scale.numel() == C and (offset is None or offset.numel() == C)


def fake_quant(x, scale, offset, qmin, qmax, grad_factor, min_scale, axis: int | None = None):
    """LSQ / LSQ+ fake quantization of ``x`` in its own dtype, per tensor (``axis`` None) or per slice along
    ``axis``; the step floored at ``min_scale`` inside the kernels with the reference's straight-through
    gradient. Autocast has no say (raw kernels)."""
    s = scale.float()
    b = None if offset is None else offset.float()
    if axis is None:
        return LSQTritonFunction.apply(x, s, b, qmin, qmax, grad_factor, min_scale)
    return LSQTritonChannelFunction.apply(x, s.reshape(-1), None if b is None else b.reshape(-1), qmin, qmax,
                                          grad_factor, min_scale, axis % x.dim())
