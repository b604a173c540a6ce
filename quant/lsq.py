"""LSQ / LSQ+ fake quantization (Esser et al. 2020; Bhalgat et al. 2020).

Gradient convention: the straight-through mask is taken on the *rounded* value, as in PyTorch's
``torch._fake_quantize_learnable_per_tensor_affine``: an input gets gradient 1 when
``round(x / s)`` lies in ``[qmin, qmax]``. LSQ as published masks on the unrounded ``x / s``; the two
differ only for inputs within half a step outside the clipping range. Matching PyTorch's kernel
lets the tests compare against it bit for bit (tests/quant/test_lsq.py).

The step size is clamped to ``MIN_SCALE`` (quant/grid.py) inside the op with a straight-through
gradient, so a scale an optimizer pushed to zero or below still quantizes sanely and can recover.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from . import fused as fused_lsq
from .fp32 import KeepFP32
from .grid import MIN_SCALE, broadcast_scale, qrange
from .range_init import activation_range, flat_sample, weight_scale


def _reduce_to(t: torch.Tensor, axis: int | None) -> torch.Tensor:
    if axis is None:
        return t.sum().reshape(1)
    dims = [d for d in range(t.dim()) if d != axis]
    return t.sum(dim=dims)


class _LSQFunction(torch.autograd.Function):
    """y = s * clamp(round((x - b) / s), qmin, qmax) + b, with b optional (LSQ+ offset).

    Written as a handful of plain float kernels (bool masks and torch.where are several times
    slower on CPU): the forward keeps a float mask m and e = c - z * m (c the clipped integer,
    z = (x - b) / s), so the backward is one multiply and reductions:
    dx = g*m, ds = g_f * <g, e>, db = g_f * <g, 1 - m>.
    """

    @staticmethod
    def forward(ctx, x, scale, offset, qmin, qmax, grad_factor, axis):
        s = broadcast_scale(scale.clamp_min(MIN_SCALE), x, axis)
        # x * (1 / s), not x / s: the same float arithmetic as PyTorch's kernel, so the rounding
        # decisions agree bit for bit at exact half-steps.
        inv_s = 1.0 / s
        if offset is None:
            z = torch.mul(x, inv_s)
        else:  # (x - b) / s as x / s - b / s: one pass over x instead of two
            # Two roundings (x * inv, then + nb), never one fused multiply-add: torch.addcmul is an
            # FMA on AVX-512 builds and two operations on AVX2 ones, which decided half-step ties
            # differently per processor (and against the fused kernel).
            z = torch.mul(x, inv_s).add_(-broadcast_scale(offset, x, axis) * inv_s)
        # Three buffers in all (z, r, c), reused in place: each fresh activation-sized allocation
        # costs page faults that weigh as much as the arithmetic on CPU.
        if ctx.needs_input_grad[1]:
            # z clamped to one level beyond the grid: unchanged wherever the mask is 1 (and the rounding
            # is the same), but an input that overflowed to +-inf (fp16 under AMP) gives c - z * 0 = c,
            # the clip gradient, instead of inf * 0 = NaN. The kernels do the same (quant/csrc,
            # quant/lsq_triton.py).
            z.clamp_(qmin - 1, qmax + 1)
        r = torch.round(z)
        c = torch.clamp(r, qmin, qmax)
        mask = torch.eq(c, r, out=r)  # float mask: 1 where not clipped
        # d y / d s = round(z) - z inside the range, the clipped level outside: c - z * mask.
        err = torch.addcmul(c, z, mask, value=-1, out=z) if ctx.needs_input_grad[1] else None
        y = c.mul_(s) if offset is None else c.mul_(s).add_(broadcast_scale(offset, x, axis))
        ctx.save_for_backward(mask, err)
        ctx.consts = (grad_factor, axis, offset is not None)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        mask, err = ctx.saved_tensors
        grad_factor, axis, has_offset = ctx.consts
        grad_x = grad_y * mask if ctx.needs_input_grad[0] else None
        grad_s = grad_b = None
        if ctx.needs_input_grad[1]:
            grad_s = _dot(grad_y, err, axis) * grad_factor
        if has_offset and ctx.needs_input_grad[2]:
            # d y / d b = 0 where the input passes through, 1 where it is clipped.
            grad_b = (_dot(grad_y, None, axis) - _dot(grad_y, mask, axis)) * grad_factor
        return grad_x, grad_s, grad_b, None, None, None, None


def _dot(a: torch.Tensor, b: torch.Tensor | None, axis: int | None) -> torch.Tensor:
    """<a, b> (or sum of a) over everything (per tensor) or over all dims but ``axis``."""
    if axis is None:
        if b is None:
            return a.sum().reshape(1)
        fa, fb = _storage_order_flat(a), _storage_order_flat(b)
        if fa is None or fb is None or a.stride() != b.stride():
            return (a * b).sum().reshape(1)  # mixed or odd layouts: one product, no flattening copies
        return torch.dot(fa, fb).reshape(1)
    return _reduce_to(a if b is None else a * b, axis)


def _storage_order_flat(t: torch.Tensor) -> torch.Tensor | None:
    """A 1-d view of a dense NCHW or channels_last tensor in storage order (no copy), else None."""
    if t.is_contiguous():
        return t.view(-1)
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1).reshape(-1)  # contiguous after the permute: a view
    return None


def lsq_fake_quant(x, scale, qmin, qmax, grad_factor=1.0, axis=None, offset=None, fused=True):
    """Functional LSQ fake quantization in fp32 (autocast disabled), returned in ``x``'s dtype.

    Per-tensor it runs the fused kernels (quant/fused.py): C++ on CPU when it can be built, Triton on
    CUDA (quant/lsq_triton.py, in x's own dtype); per channel, Triton on CUDA and the reference on CPU;
    ``fused=False`` forces the plain-PyTorch reference.
    """
    dtype = x.dtype
    if fused and x.device.type == "cuda":
        # CUDA: the Triton kernels (quant/lsq_triton.py; per tensor or per channel) read and write x's own
        # dtype (no fp32 copy)
        y = fused_lsq.fake_quant_cuda(x, scale, offset, qmin, qmax, grad_factor, MIN_SCALE, axis=axis)
        if y is not None:
            return y
    xf = x.float()
    # The fused op is a single raw loop: autocast cannot touch it, so no autocast guard is needed.
    y = fused_lsq.fake_quant(xf, scale, offset, qmin, qmax, grad_factor, MIN_SCALE) \
        if fused and axis is None else None
    if y is None:
        with torch.autocast(device_type=x.device.type, enabled=False):
            y = _LSQFunction.apply(xf, scale, offset, qmin, qmax, grad_factor, axis)
    return y if dtype == torch.float32 else y.to(dtype)


def _distributed() -> bool:
    """Whether this process is one rank of several (a python-side query, no device sync)."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class UncalibratedQuantizerError(RuntimeError):
    """An activation quantizer ran in training before its step size was set (see ``LSQQuantizer.forward``)."""


class LSQQuantizer(KeepFP32, nn.Module):
    """Learned-step-size fake quantizer.

    ``bits`` 2..8; ``signed`` chooses the grid; ``per_channel`` with ``axis`` gives one step per
    slice (``channels`` must then be known, or the first call sizes it); ``learn_offset`` adds the
    LSQ+ offset (for activations that go negative, e.g. after SiLU). The step size and offset are
    kept in fp32 whatever ``.half()`` does to the model around them (Ultralytics halves
    checkpoints on save; half scales would move the integer grid).
    """

    # LSQ+ offset on the integer zero-point grid (b = -zp * s, zp an integer code), as integer runtimes
    # take it; a class default too, so quantizers pickled before the option existed keep the float offset.
    integer_zero_point: bool = False
    # Range initialisation over the whole calibrated range instead of an MSE-optimal clip: for tensors whose
    # rare large values matter most (a head's class and box logits: clipping them ties the best detections).
    full_range: bool = False
    # The module's dotted name in its model (quant/convert.py sets it: quantize_model, calibrate), for messages.
    name: str | None = None

    def __init__(self, bits: int, signed: bool = True, per_channel: bool = False, axis: int = 0,
                 channels: int = 1, learn_offset: bool = False, grad_scale: bool = True):
        super().__init__()
        if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 8:
            raise ValueError(f"bits={bits!r}: LSQQuantizer supports integer bit widths 2..8")
        self.bits, self.signed = bits, signed
        self.per_channel, self.axis = per_channel, axis
        self.qmin, self.qmax = qrange(bits, signed)
        self.grad_scale = grad_scale
        n = channels if per_channel else 1
        self._scale = nn.Parameter(torch.ones(n))
        self.offset = nn.Parameter(torch.zeros(n)) if learn_offset else None
        # A buffer (not a python flag alone) so that the state survives state_dict round trips;
        # the python mirror avoids a host sync on every forward.
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self._is_init = False
        self.enabled = True
        # Activations: LSQ's N is the number of features per sample, not per batch.
        self.is_activation = False

    # -- public state ---------------------------------------------------------------------------
    @property
    def scale(self) -> torch.Tensor:
        """The step size in use (one value, or one per channel), floored at ``MIN_SCALE``, detached."""
        return self._scale.detach().clamp_min(MIN_SCALE)

    @property
    def step_size(self) -> nn.Parameter:
        """The learnable step-size parameter itself (raw: may go below ``MIN_SCALE`` between optimizer steps; the
        forward floors it). For optimizers and in-place clamps; ``scale`` is the value in use."""
        return self._scale

    @property
    def is_initialized(self) -> bool:
        """Whether the step size was set (by ``set_scale``, a range estimate, a state dict or the
        first forward). An uninitialised weight quantizer initialises itself from its first input, an
        activation quantizer only outside a training step and outside DDP (there:
        ``UncalibratedQuantizerError``)."""
        return self._is_init

    def scale_for(self, x: torch.Tensor, grad: bool = False) -> torch.Tensor:
        """The step size (as ``scale``) shaped to broadcast against ``x``: per channel along
        ``axis``, or a single step. ``grad=True`` keeps it attached to the learnable step size,
        for a loss that trains it (oscillation dampening)."""
        s = self._scale.clamp_min(MIN_SCALE) if grad else self.scale
        return broadcast_scale(s, x, self.axis if self.per_channel else None)

    def effective_offset(self, grad: bool = True) -> torch.Tensor | None:
        """The offset the forward uses: the learned one, or with ``integer_zero_point`` the nearest
        grid origin ``-zp * s`` with ``zp = clamp(round(-b / s), 0, qmax)`` an integer code (what
        QuantizeLinear's zero point holds). Gradients: straight through to ``b``; to ``s`` through
        ``-zp * s``, so a clipped value gets ``c - zp`` as in torch's learnable fake-quant. No host sync."""
        if self.offset is None:
            return None
        b = self.offset if grad else self.offset.detach()
        if not self.integer_zero_point:
            return b
        s = self._scale.clamp_min(MIN_SCALE) if grad else self.scale
        zp = self.zero_point_code()
        return (b - b.detach()) - zp * s

    @torch.no_grad()
    def zero_point_code(self) -> torch.Tensor:
        """``clamp(round(-b / s), 0, qmax)`` (float tensor of integers; zeros without an offset)."""
        if self.offset is None:
            return torch.zeros_like(self.scale)
        return torch.round(-self.offset.detach() / self.scale).clamp_(0, self.qmax - self.qmin)

    @torch.no_grad()
    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """The integer codes of ``x`` on this grid (a float tensor of integers):
        ``clamp(round((x - b) / s), qmin, qmax)``, ``b`` the LSQ+ offset (0 without one).

        Computed with the forward's float arithmetic (``x * (1 / s)``, the offset as
        ``x / s - b / s``), so a value on a half-step tie rounds as it does in the fake-quant
        forward: ``forward(x) == codes(x) * s + b`` bit for bit. It uses the current step size and,
        unlike the forward, never initialises the quantizer nor looks at ``enabled``.
        """
        xf = x.detach().float()
        inv_s = 1.0 / self.scale_for(xf)
        if self.offset is None:
            z = xf * inv_s
        else:
            b = broadcast_scale(self.effective_offset(grad=False), xf, self.axis if self.per_channel else None)
            z = torch.mul(xf, inv_s).add_(-b * inv_s)  # as the forward: no FMA (see _LSQFunction)
        return z.round_().clamp_(self.qmin, self.qmax)

    @torch.no_grad()
    def set_scale(self, value, offset=None) -> None:
        value = torch.as_tensor(value, dtype=torch.float32, device=self._scale.device).flatten()
        if value.numel() not in (1, self._scale.numel()) and not self.per_channel:
            raise ValueError(f"set_scale: expected 1 value, got {value.numel()}")
        if self.per_channel and value.numel() != self._scale.numel():
            self._resize(value.numel())
        if (value <= 0).any() or not torch.isfinite(value).all():
            raise ValueError("set_scale: step sizes must be finite and > 0")
        self._scale.copy_(value.expand_as(self._scale))
        if offset is not None:
            if self.offset is None:
                raise ValueError("set_scale: this quantizer has no learnable offset")
            self.offset.copy_(torch.as_tensor(offset, dtype=torch.float32).flatten().expand_as(self.offset))
        self.initialized.fill_(True)
        self._is_init = True

    def init_from_weight(self, w: torch.Tensor, method: str = "mse") -> None:
        """Step size(s) from the weight itself: ``mse`` (search over clipping ranges) or ``lsq``
        (Esser et al.'s formula)."""
        self.set_scale(weight_scale(w, self.qmin, self.qmax, self.axis if self.per_channel else None, method))

    def init_from_samples(self, samples: torch.Tensor) -> None:
        """Step size (and LSQ+ offset) from a flat sample of calibration activations."""
        if self.full_range:
            s = samples.float()
            lo = s.min().clamp_max(0).reshape(1) if self.offset is not None else None
            hi = s.max().clamp_min(0) if self.offset is not None else s.abs().max()  # the grid holds 0 (a zero point)
            span = (hi - lo) / (self.qmax - self.qmin) if lo is not None else hi / max(self.qmax, 1)
            self.set_scale(span.clamp_min(MIN_SCALE).reshape(1), offset=lo)
            return
        scale, offset = activation_range(samples, self.qmin, self.qmax, self.offset is not None)
        self.set_scale(scale, offset=offset)

    def _resize(self, n: int) -> None:
        self._scale = nn.Parameter(torch.ones(n, device=self._scale.device))
        if self.offset is not None:
            self.offset = nn.Parameter(torch.zeros(n, device=self.offset.device))

    def freeze(self) -> None:
        for p in self.parameters():
            p.requires_grad_(False)

    # -- forward --------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if not self._is_init:
            # A weight quantizer takes its MSE range from the weight: deterministic, the same on every DDP rank.
            # An activation quantizer's range would come from this one batch. In a training step (training mode
            # with autograd on) or in any forward of a distributed run, that is an error: under DDP each rank
            # would initialise from its own batch and the replicas would silently diverge (and without DDP the
            # step would rest on one batch instead of the calibration). Elsewhere (eval / inference, which DDP
            # never wraps, and the no-grad train-mode passes of one process that gather BN statistics) it still
            # initialises from its first input: inspecting, exporting or preparing a quantized model without
            # calibration data keeps working.
            if not self.is_activation:
                self.init_from_weight(x)
            elif self.training and (torch.is_grad_enabled() or _distributed()):
                raise UncalibratedQuantizerError(self._uncalibrated_message())
            else:
                self.init_from_samples(flat_sample(x))
        return lsq_fake_quant(x, self._scale, self.qmin, self.qmax, self._grad_factor(x),
                              self.axis if self.per_channel else None, self.effective_offset())

    def _uncalibrated_message(self) -> str:
        who = f"activation quantizer '{self.name}'" if self.name else \
            f"an activation quantizer ({self.extra_repr()}; its layer name is not known: quant.calibrate names them)"
        return (f"{who[0].upper()}{who[1:]} was never calibrated: its step size is unset, and in a training step it "
                f"does not initialise itself from its first batch (under DDP every rank would take its own "
                f"batch's range and the replicas would silently diverge). Calibrate the model before training: "
                f"quant.calibrate(model, batches) after quant.quantize_model (the QAT trainer does this before its "
                f"first step), or load a checkpoint whose quantizers were calibrated, or set the step with "
                f"set_scale() / init_from_samples() (a layer only the training forward reaches, which calibration's "
                f"eval-mode forward never sees, needs one of those).")

    def _grad_factor(self, x: torch.Tensor) -> float:
        if not self.grad_scale:
            return 1.0
        n = x.numel()
        if self.per_channel:
            n //= x.shape[self.axis]
        elif self.is_activation:
            n //= x.shape[0]  # features per sample
        return 1.0 / math.sqrt(max(n, 1) * max(self.qmax, 1))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "_scale"
        if key in state_dict and state_dict[key].shape != self._scale.shape and self.per_channel:
            self._resize(state_dict[key].numel())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._is_init = bool(self.initialized)

    def extra_repr(self) -> str:
        kind = "signed" if self.signed else "unsigned"
        gran = f"per_channel(axis={self.axis})" if self.per_channel else "per_tensor"
        off = ", offset" if self.offset is not None else ""
        return f"{self.bits}-bit {kind} {gran}{off}"
