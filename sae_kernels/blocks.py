"""Whole-block replacements that move the ops around an SE block into its fused pass.

A residual block ending ``act(drop_path(se(body(x))) + shortcut(x))`` with a ReLU ``act``
(timm's ResNet ``BasicBlock`` / ``Bottleneck``, the legacy ``senet`` blocks) spends two
extra passes over the block's output on the add and the ReLU. :class:`FusedResidualBlock`
runs that block with an SE built with ``act_out="relu"`` and called as ``se(y, shortcut)``,
so the add and the ReLU happen in the SE's own rescale pass, as in this package's SE-ResNet
(``models.py``).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .functional import sae
from .layers import FusedSaE


@dataclasses.dataclass(frozen=True)
class ResidualLayout:
    """Where the parts of a residual block sit: attribute names on the block.

    The block computes ``act(drop_path(se(body(x))) + shortcut(x))``; the body's modules
    are applied in the order given (a name may repeat: the legacy senet blocks apply one
    ``relu`` module several times). A shortcut or drop path attribute holding None is the
    identity; ``drop_path`` is None for blocks without stochastic depth.
    """

    body: tuple[str, ...]
    se: str
    shortcut: str
    act: str
    drop_path: str | None = None

    def names(self) -> tuple[str, ...]:
        """Every attribute the layout names."""
        return (*self.body, self.se, self.shortcut, self.act,
                *((self.drop_path,) if self.drop_path else ()))


class FusedResidualBlock(nn.Module):
    """A residual block whose shortcut add and final ReLU run in the fused SE's pass.

    It holds the original block's submodules under their original names (its state_dict
    is the original's, the SE aside) and ``se``, a fused SE built with ``act_out="relu"``,
    under the SE's name. Forward: ``se(y, shortcut(x))`` with ``y = body(x)``, i.e.
    ``relu(y * s [+ y] + shortcut(x))``. In train mode an active ``DropPath`` scales the
    SE output per sample before the add, which the fused pass cannot do: the block then
    runs the rescale alone and the add and the ReLU after it, as the original does.
    """

    #: the block's ops that run in the fused SE's pass (as the conversion report lists them)
    absorbed = ("shortcut add", "relu")

    def __init__(self, block: nn.Module, layout: ResidualLayout, se: FusedSaE) -> None:
        if se.act_out != "relu":
            raise ValueError(f"the SE must apply the block's ReLU (act_out='relu'), "
                             f"got act_out={se.act_out!r}")
        super().__init__()
        for name, child in block.named_children():
            setattr(self, name, se if name == layout.se else child)
        for name in layout.names():
            if name not in self._modules:
                setattr(self, name, getattr(block, name))  # an attribute holding None
        self.layout = layout
        self.training = block.training  # not .train(): the children keep their own modes

    def extra_repr(self) -> str:
        return (f"{self.layout.se}(y, {self.layout.shortcut}(x)) adds the shortcut and applies "
                f"{self.layout.act}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layout = self.layout
        y = x
        for name in layout.body:
            y = getattr(self, name)(y)
        downsample = getattr(self, layout.shortcut)
        shortcut = x if downsample is None else downsample(x)
        se = getattr(self, layout.se)
        drop_path = getattr(self, layout.drop_path) if layout.drop_path else None
        if drop_path is not None and drop_path.training and not isinstance(drop_path, nn.Identity):
            return getattr(self, layout.act)(drop_path(_rescale(se, y)) + shortcut)
        return se(y, shortcut)


def _rescale(se: FusedSaE, x: torch.Tensor) -> torch.Tensor:
    """``x' * s [+ x']``: the fused SE's output (its prologue included) without the shortcut
    and the ReLU."""
    fc1_weight, fc1_bias = se.stacked_fc1()
    scale, shift, prologue_act = se.prologue_operands()
    return sae(x, fc1_weight, fc1_bias, se.excite.weight, se.excite.bias, act=se.act,
               gate=se.gate, residual=se.residual, backend=se.backend, strategy=se.strategy,
               prologue_scale=scale, prologue_shift=shift, prologue_act=prologue_act)
