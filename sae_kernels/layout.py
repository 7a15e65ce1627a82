"""How a 4-D activation is read as (N, C, HW): the one place that knows strides.

NCHW and channels_last (and any layout where H and W flatten into one strided axis)
are read in place; other layouts are copied to NCHW first.
"""

from __future__ import annotations

import torch


def nc_hw_strides(t: torch.Tensor) -> tuple[int, int, int] | None:
    """(stride_n, stride_c, stride_hw) of ``t`` read as (N, C, H*W); None if H, W don't flatten."""
    _, _, h, w = t.shape
    stride_n, stride_c, stride_h, stride_w = t.stride()
    if w == 1:
        return stride_n, stride_c, stride_h
    if h == 1 or stride_h == w * stride_w:
        return stride_n, stride_c, stride_w
    return None


def readable(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """``t`` (copied to NCHW only if its H, W don't flatten) and its (N, C, HW) strides."""
    strides = nc_hw_strides(t)
    if strides is None:
        t = t.contiguous()
        strides = nc_hw_strides(t)
    return t, strides


def output_like(x: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor shaped like ``x``, in x's memory format when that reads in place."""
    out = torch.empty_like(x)
    return out if nc_hw_strides(out) is not None else torch.empty_like(
        x, memory_format=torch.contiguous_format
    )


def is_channels_last(strides: tuple[int, int, int], channels: int) -> bool:
    """Whether channels are the contiguous axis, which decides the tile shape."""
    return channels > 1 and strides[1] == 1
