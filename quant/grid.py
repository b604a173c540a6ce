"""The integer grid every part of the project shares: its code range, the smallest step size, and a
step size shaped to broadcast against the tensor it quantizes.

Kept apart from the quantizer so that range estimation (range_init.py) and deployment (deploy/) use
the same definitions without importing the quantizer module.
"""
from __future__ import annotations

import torch

# Floor of every step size: the fake-quant op clamps to it (with a straight-through gradient), so a
# scale an optimizer pushed to zero or below still quantizes sanely; range estimates never go below it.
MIN_SCALE = 1e-8


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    """The integer codes of a ``bits``-wide grid: [-2^(b-1), 2^(b-1) - 1] signed, [0, 2^b - 1] unsigned."""
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def broadcast_scale(scale: torch.Tensor, like: torch.Tensor, axis: int | None = None) -> torch.Tensor:
    """``scale`` reshaped to broadcast against ``like``: one step per slice along ``axis``
    (per-channel; e.g. 0 for conv and linear weights, whose output channels come first) or a
    single step (``axis=None``). The result has ``like``'s number of dims, so a product keeps
    ``like``'s shape even for a 0-d tensor."""
    shape = [1] * like.dim()
    if axis is not None:
        if scale.numel() != like.shape[axis]:
            raise ValueError(f"broadcast_scale: {scale.numel()} step sizes for {like.shape[axis]} slices along "
                             f"axis {axis} of a tensor of shape {tuple(like.shape)}; pass one step per slice, "
                             f"or axis=None for a single step")
        shape[axis] = like.shape[axis]
    elif scale.numel() != 1:
        raise ValueError(f"broadcast_scale: {scale.numel()} step sizes but axis=None (one step for the whole "
                         f"tensor); pass the channel axis for per-channel steps")
    return scale.reshape(shape)
