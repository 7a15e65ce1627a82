"""A BatchNorm (and the activation after it) absorbed into the fused SE it feeds.

In eval mode a BatchNorm is the per-channel affine ``x * scale + shift``; followed by an
activation it is exactly the operator's prologue. :class:`AbsorbedNorm` takes the
BatchNorm's place in the model: it keeps the BatchNorm's parameters and buffers under
the same names (checkpoints load either way) and, while the normalisation uses its
running statistics, passes x through untouched: the SE then applies the affine and the
activation in its own passes over x, and the normalised tensor is never written. In
train mode it normalises with batch statistics itself (updating the running ones), and
the SE runs without a prologue. :class:`AbsorbedAct` stands in for a separate
activation module between the two in the same way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .dispatch import may_reuse_computed_tensors


class AbsorbedNorm(nn.Module):
    """Stand-in for ``norm`` (a BatchNorm2d, or timm's BatchNormAct2d with its activation)
    whose output feeds only a fused SE; ``act`` names the activation the SE applies after
    it (``options.PROLOGUE_ACTIVATIONS``), ``act_module`` computes it in train mode."""

    def __init__(self, norm: nn.BatchNorm2d, act: str, act_module: nn.Module | None) -> None:
        super().__init__()
        if not norm.track_running_stats or norm.running_mean is None:
            raise ValueError("a BatchNorm without running statistics normalises with batch "
                             "statistics in every mode: it cannot be absorbed")
        self.num_features = norm.num_features
        self.eps = norm.eps
        self.momentum = norm.momentum
        self.act = act
        self.weight = norm.weight
        self.bias = norm.bias
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            self.register_buffer(name, getattr(norm, name))
        self.act_module = act_module if act_module is not None else nn.Identity()
        self.train(norm.training)
        self._cache: tuple | None = None

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, act={self.act}, absorbed={self.absorbed}"

    @property
    def absorbed(self) -> bool:
        """Whether the SE applies this normalisation (running statistics: eval mode)."""
        return not self.training

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.absorbed:
            return x
        # BatchNorm2d's train-mode step: batch statistics, running ones updated
        self.num_batches_tracked.add_(1)
        momentum = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                    else self.momentum)
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, True,
                         momentum, self.eps)
        return self.act_module(x)

    def scale_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The eval-mode affine ``(weight / sqrt(var + eps), bias - mean * scale)``; cached
        while nothing needs its gradient and no tensor behind it changed (read through the
        parameter and buffer dicts: at N = 1 this runs on every call)."""
        params, buffers = self._parameters, self._buffers
        tensors = (params["weight"], params["bias"], buffers["running_mean"],
                   buffers["running_var"])
        if not may_reuse_computed_tensors() or (torch.is_grad_enabled() and any(
                t is not None and t.requires_grad for t in tensors)):
            return self._scale_shift()
        # the cache holds the tensors themselves, so that their ids cannot be reused
        key = tuple((id(t), t._version) if t is not None else None for t in tensors)
        cache = self._cache
        if cache is None or cache[0] != key:
            with torch.no_grad():
                cache = self._cache = (key, *self._scale_shift(), tensors)
        return cache[1], cache[2]

    def _scale_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        scale = torch.rsqrt(self.running_var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight
        shift = -self.running_mean * scale
        if self.bias is not None:
            shift = shift + self.bias
        return scale, shift


class AbsorbedAct(nn.Module):
    """Stand-in for the activation module between an :class:`AbsorbedNorm` and its SE:
    the identity while the SE applies it, the activation itself otherwise."""

    def __init__(self, norm: AbsorbedNorm, act_module: nn.Module) -> None:
        super().__init__()
        self.act_module = act_module
        self.__dict__["norm"] = norm  # not a submodule: its state belongs to its own place

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.norm.absorbed else self.act_module(x)
