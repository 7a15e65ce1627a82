"""How a 4-D activation is read as (N, C, HW): the one place that knows strides.

NCHW and channels_last (and any layout where H and W flatten into one strided axis)
are read in place; other layouts are copied to NCHW first.
"""

from __future__ import annotations

import torch

#: Elements of the ReLU tail's mask per byte, along x's contiguous axis (``relu_mask``).
MASK_BITS = 8


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


def relu_mask(x: torch.Tensor, saved: bool = True) -> torch.Tensor:
    """An uninitialised mask of the ReLU tail for ``x`` (empty unless ``saved``): which
    elements the forward kept (the backward's ``y > 0``), a bit each, eight to a byte along
    x's contiguous axis as read (``readable``), bit i the i-th: (N, C, ceil(HW / 8)) bytes,
    or (N, HW, ceil(C / 8)) for channels_last. Tiles that write it are whole bytes long on
    that axis (``gpu_plan``)."""
    n, c, h, w = x.shape
    if not saved:
        return x.new_empty((0,), dtype=torch.uint8)
    if _packs_channels(x):
        return x.new_empty((n, h * w, -(-c // MASK_BITS)), dtype=torch.uint8)
    return x.new_empty((n, c, -(-(h * w) // MASK_BITS)), dtype=torch.uint8)


def relu_mask_strides(mask: torch.Tensor, x: torch.Tensor) -> tuple[tuple[int, int, int], bool]:
    """The (N, C, HW) strides of ``relu_mask(x)``, its packed axis counted in bytes, and
    whether it packs channels."""
    if _packs_channels(x):
        return (mask.stride(0), 1, mask.stride(1)), True
    return (mask.stride(0), mask.stride(1), 1), False


def _packs_channels(x: torch.Tensor) -> bool:
    strides = nc_hw_strides(x)
    return strides is not None and is_channels_last(strides, x.shape[1])
