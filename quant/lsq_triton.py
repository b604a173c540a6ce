"""Per-tensor LSQ / LSQ+ fake quantization on CUDA: two Triton kernels (issue 19).

The same maths and gradient convention as ``lsq._LSQFunction`` (PyTorch's: the straight-through mask
on the rounded value), operation for operation, so that outputs and input gradients agree bit for bit:

    inv = 1 / s (IEEE division);  z = x * inv,  or z = (-b * inv) + x * inv with the LSQ+ offset b
    r = round_half_even(z);  c = clamp(r, qmin, qmax);  m = (c == r)
    y = c * s (+ b)                          in the input's dtype (fp32, fp16 or bf16)
    dx = dy * m;  ds = sum(dy * (c - zc * m));  db = sum(dy * (1 - m))

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
CPU tensors; tests/test_lsq_triton.py). ``/`` in Triton lowers to an approximate division on NVIDIA
GPUs, hence ``tl.math.div_rn``; ``enable_fp_fusion=False`` keeps a multiply and an add from being
contracted into an FMA (which would round differently from the reference). The fp32 -> bf16 store is
written out (round to nearest even on the bits, NaN kept), since the interpreter's numpy cast cannot
express bf16.

Per-channel quantizers (weights, small tensors) keep using the reference.
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
    c = tl.minimum(tl.maximum(r, qmin, propagate_nan=tl.PropagateNan.ALL), qmax, propagate_nan=tl.PropagateNan.ALL)
    return z, r, c


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
def _lsq_fwd(x_ptr, y_ptr, s_ptr, b_ptr, n, qmin, qmax, HAS_B: tl.constexpr, OUT_BF16: tl.constexpr,
             BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    s = tl.load(s_ptr).to(tl.float32)
    inv = tl.math.div_rn(1.0, s)
    b = 0.0
    nb = 0.0
    if HAS_B:
        b = tl.load(b_ptr).to(tl.float32)
        nb = -b * inv
    z, r, c = _levels(x, inv, nb, qmin, qmax, HAS_B)
    y = c * s
    if HAS_B:
        y = y + b
    _store(y_ptr, offs, y, m, OUT_BF16)


@triton.jit
def _lsq_bwd(x_ptr, dy_ptr, dx_ptr, ps_ptr, pb_ptr, s_ptr, b_ptr, n, qmin, qmax, HAS_B: tl.constexpr,
             BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    g = tl.load(dy_ptr + offs, mask=m, other=0.0).to(tl.float32)
    s = tl.load(s_ptr).to(tl.float32)
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

    ``scale`` is the step already floored (``scale.clamp_min(MIN_SCALE)`` outside, so autograd applies
    the floor's gradient as the reference does); ``offset`` None or one value.
    """

    @staticmethod
    def forward(ctx, x, scale, offset, qmin, qmax, grad_factor):
        x = _dense(x)
        y = torch.empty_like(x)
        n = x.numel()
        b = offset if offset is not None else scale  # a valid pointer when there is no offset
        bf16 = x.dtype == torch.bfloat16
        if n:
            _lsq_fwd[(triton.cdiv(n, _BLOCK),)](
                x, y.view(torch.int16) if bf16 else y, scale, b, n, float(qmin), float(qmax),
                HAS_B=offset is not None, OUT_BF16=bf16, BLOCK=_BLOCK, **_opts())
        ctx.save_for_backward(x, scale, b)
        ctx.consts = (float(qmin), float(qmax), float(grad_factor), offset is not None)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, scale, b = ctx.saved_tensors
        qmin, qmax, gf, has_b = ctx.consts
        dy = _dense(dy.to(x.dtype), x)
        n = x.numel()
        nblk = max(triton.cdiv(n, _BLOCK), 1)
        dx = torch.empty_like(x)
        ps = torch.zeros(nblk, device=x.device, dtype=torch.float32)
        pb = torch.zeros(nblk if has_b else 1, device=x.device, dtype=torch.float32)
        if n:
            _lsq_bwd[(nblk,)](x, dy, dx, ps, pb, scale, b, n, qmin, qmax, HAS_B=has_b, BLOCK=_BLOCK, **_opts())
        ds = (ps.sum() * gf).reshape(scale.shape) if ctx.needs_input_grad[1] else None
        db = (pb.sum() * gf).reshape(b.shape) if has_b and ctx.needs_input_grad[2] else None
        return (dx if ctx.needs_input_grad[0] else None), ds, db, None, None, None


def supports(x: torch.Tensor, scale: torch.Tensor, offset) -> bool:
    """Whether the kernels apply: a float tensor (fp32/fp16/bf16) on the kernels' device, one step."""
    dev_ok = x.device.type == ("cpu" if _INTERPRET else "cuda")
    return (dev_ok and x.dtype in DTYPES and scale.numel() == 1 and scale.device == x.device
            and (offset is None or (offset.numel() == 1 and offset.device == x.device)))


def fake_quant(x, scale, offset, qmin, qmax, grad_factor, min_scale):
    """LSQ / LSQ+ fake quantization of ``x`` (per tensor) in its own dtype; the step floored at
    ``min_scale`` with the reference's gradient (``clamp_min``). Autocast has no say (one raw kernel)."""
    return LSQTritonFunction.apply(x, scale.float().clamp_min(min_scale),
                                   None if offset is None else offset.float(), qmin, qmax, grad_factor)
