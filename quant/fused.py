"""The fused CPU kernel of per-tensor LSQ / LSQ+ (quant/csrc/lsq_cpu.cpp), built on first use.

Per-tensor activation quantizers dominate the cost of fake quantization in training: the plain
PyTorch version (``_LSQFunction`` in lsq.py, the tested reference) makes about six elementwise
passes forward and keeps two activation-sized tensors for the backward. The kernel does one pass
each way and keeps only the input. It is compiled with ``torch.utils.cpp_extension.load`` (g++ and
ninja; cached under ``TORCH_EXTENSIONS_DIR``) the first time a CPU float32 tensor goes through a
per-tensor quantizer in a process. If it cannot be built, a warning says why and the reference
is used: results are the same, only slower.

On CUDA the same role is played by Triton kernels (quant/lsq_triton.py; ``fake_quant_cuda``), per tensor
and per channel (weights):
one pass each way in the input's own dtype (fp32/fp16/bf16, NCHW or channels_last), the input alone
saved for the backward. If Triton is missing or a kernel fails to compile, a warning says so once and
the reference runs.

``QAT_FUSED_LSQ=0`` in the environment (or ``reference_only()``) turns both off.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import time
import warnings
from pathlib import Path

import torch

_SOURCE = Path(__file__).with_name("csrc") / "lsq_cpu.cpp"
_state: dict = {"ext": None, "tried": False, "off": 0, "triton": None, "triton_tried": False}


def enabled() -> bool:
    return os.environ.get("QAT_FUSED_LSQ", "1").strip().lower() not in ("0", "false", "no", "off")


def extension():
    """The compiled module, or None (disabled, or the build failed: warned once).

    The environment is read once per process, on the first call.
    """
    if not _state["tried"]:
        _state["tried"] = True
        if enabled():
            _state["ext"] = _build()
    return _state["ext"]


def _extension_name() -> str:
    # torch caches builds by name in ~/.cache/torch_extensions and rebuilds whenever the build command
    # changes; two checkouts (another path) or torch versions sharing one name rebuilt each other's
    # copy on every alternation (40-165 s each). One name per source path and torch version.
    key = f"{_SOURCE.resolve()}|{torch.__version__}".encode()
    return f"qat_lsq_cpu_{hashlib.sha1(key).hexdigest()[:10]}"


def _build():
    t0 = time.perf_counter()
    try:
        from torch.utils.cpp_extension import load  # pulls in the build toolchain: only when the kernel is built

        ext = load(name=_extension_name(), sources=[str(_SOURCE)],
                   extra_cflags=["-O3", "-fno-trapping-math", "-fopenmp"], extra_ldflags=["-fopenmp"],
                   verbose=False)
        if time.perf_counter() - t0 > 5:  # a compile, not a cache hit: say where the minute went
            print(f"quant: compiled the fused LSQ kernel in {time.perf_counter() - t0:.0f} s "
                  "(once; cached for later runs)", file=sys.stderr)
        return ext
    except Exception as e:  # no compiler, no ninja, no headers: fall back, loudly once
        warnings.warn(f"fused LSQ kernel unavailable ({type(e).__name__}: {str(e).strip()[:300]}); "
                      "using the plain PyTorch fake-quant (same results, slower). Install g++ and "
                      "ninja (pip install ninja) to enable it, or set QAT_FUSED_LSQ=0 to silence this.",
                      stacklevel=4)
        return None


@contextlib.contextmanager
def reference_only():
    """Within the block, every LSQ quantizer runs the plain-PyTorch reference (to compare or debug)."""
    _state["off"] += 1
    try:
        yield
    finally:
        _state["off"] -= 1


def fake_quant(x: torch.Tensor, scale: torch.Tensor, offset, qmin: int, qmax: int, grad_factor: float,
               min_scale: float):
    """The fused op, or None when it does not apply: per-tensor, float32, contiguous, CPU.

    Same maths and gradient convention as ``lsq._LSQFunction`` (PyTorch's: mask on the rounded
    value); the autograd node is C++ (a Python autograd.Function costs ~250 us a call).
    """
    if (_state["off"] or x.device.type != "cpu" or x.dtype != torch.float32 or not x.is_contiguous()
            or scale.numel() != 1 or scale.device.type != "cpu" or (offset is not None and offset.numel() != 1)):
        return None
    ext = extension()
    if ext is None:
        return None
    return ext.lsq_fake_quant(x, scale, offset, qmin, qmax, grad_factor, min_scale)


def triton_module():
    """quant.lsq_triton, or None (disabled, Triton missing or broken: warned once)."""
    if not _state["triton_tried"]:
        _state["triton_tried"] = True
        if enabled():
            try:
                from . import lsq_triton  # triton is optional (CUDA only): imported when its kernels are enabled

                _state["triton"] = lsq_triton
            except Exception as e:  # no triton (CPU-only wheels, Windows): fall back, loudly once
                warnings.warn(f"Triton LSQ kernels unavailable ({type(e).__name__}: {str(e).strip()[:200]}); "
                              "CUDA quantizers use the plain PyTorch fake-quant (same results, slower).",
                              stacklevel=4)
    return _state["triton"]


def fake_quant_cuda(x: torch.Tensor, scale: torch.Tensor, offset, qmin: int, qmax: int, grad_factor: float,
                    min_scale: float, axis: int | None = None):
    """The Triton op on a CUDA tensor in its own dtype (per tensor, or per slice along ``axis``), or None
    when it does not apply."""
    if _state["off"]:
        return None
    mod = triton_module()
    if mod is None or not mod.supports(x, scale, offset, axis):
        return None
    try:
        return mod.fake_quant(x, scale, offset, qmin, qmax, grad_factor, min_scale, axis=axis)
    except Exception as e:  # a compile failure (driver, ptxas): say it once, then use the reference
        _state["triton"] = None
        warnings.warn(f"Triton LSQ kernel failed ({type(e).__name__}: {str(e).strip()[:300]}); "
                      "using the plain PyTorch fake-quant from now on.", stacklevel=3)
        return None
