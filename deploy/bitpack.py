"""Pack signed integer codes of any width 2..8 into a dense little-endian bitstream.

Why a bitstream and not nibbles: 3-bit (and 5..7-bit) codes have no byte-aligned container;
a stream stores every width at exactly ``bits`` bits per value (+ < 1 byte of padding).
"""
from __future__ import annotations

import numpy as np
import torch


def pack_codes(codes: torch.Tensor, bits: int, qmin: int) -> torch.Tensor:
    """Integer codes in [qmin, qmin + 2^bits - 1] -> uint8 tensor of ceil(n * bits / 8) bytes."""
    if not 1 <= bits <= 8:
        raise ValueError(f"pack_codes: bits={bits}; allowed 1..8")
    u = codes.detach().cpu().reshape(-1).to(torch.int64) - qmin  # unsigned, so every bit pattern is valid
    if u.numel() and (u.min() < 0 or u.max() > 2**bits - 1):
        raise ValueError(f"pack_codes: codes outside [{qmin}, {qmin + 2**bits - 1}] cannot be stored at {bits} bits")
    u = u.numpy().astype(np.uint8)
    planes = (u[:, None] >> np.arange(bits, dtype=np.uint8)) & 1  # (n, bits), least significant bit first
    return torch.from_numpy(np.packbits(planes.reshape(-1), bitorder="little"))


def unpack_codes(data: torch.Tensor, bits: int, qmin: int, numel: int) -> torch.Tensor:
    """Inverse of ``pack_codes``: int8 tensor of ``numel`` codes (reshape to taste)."""
    flat = np.unpackbits(data.cpu().numpy().astype(np.uint8), count=numel * bits, bitorder="little")
    u = flat.reshape(numel, bits).astype(np.int16) @ (1 << np.arange(bits, dtype=np.int16))
    return torch.from_numpy((u + qmin).astype(np.int8))
