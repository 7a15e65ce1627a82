"""Fused blocks that take in more of the original model than the SE operator's own parameters.

A residual block ending ``act(drop_path(se(body(x))) + shortcut(x))`` with a ReLU ``act``
(timm's ResNet ``BasicBlock`` / ``Bottleneck``, the legacy ``senet`` blocks) spends two
extra passes over the block's output on the add and the ReLU. :class:`FusedResidualBlock`
runs that block with an SE built with ``act_out="relu"`` and called as ``se(y, shortcut)``,
so the add and the ReLU happen in the SE's own rescale pass, as in this package's SE-ResNet
(``models.py``).

An SE block with a BatchNorm between fc1 and the activation (RexNet) becomes a
:class:`FusedSEWithNorm`, which keeps the BatchNorm as it is and folds it into fc1 per call.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .functional import sae
from .layers import FusedSaE, FusedSE
from .prologue import AbsorbedNorm
from .reference import TORCH_ACTIVATIONS, TORCH_GATES, prologue


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
    fc1_weight, fc1_bias = se.branch_fc1()
    scale, shift, prologue_act = se.prologue_operands()
    return sae(x, fc1_weight, fc1_bias, se.excite.weight, se.excite.bias, act=se.act,
               gate=se.gate, residual=se.residual, backend=se.backend, strategy=se.strategy,
               prologue_scale=scale, prologue_shift=shift, prologue_act=prologue_act)


class FusedSEWithNorm(FusedSE):
    """An SE block normalising its reduced vector, ``x * gate(fc2(act(bn(fc1(mean_hw(x))))))``
    (timm's ``SEModule`` with a ``norm_layer``, as in RexNet).

    ``bn`` is the block's BatchNorm as an :class:`~sae_kernels.prologue.AbsorbedNorm`: its
    parameters and statistics stay what they are, so a checkpoint round-trips unchanged and
    training updates them, not a folded copy. While it uses its running statistics (eval
    mode) it is the affine ``h * scale + shift``, folded into fc1 on every call (``scale W1``,
    ``scale b1 + shift``; a K x C product) for the fused operator. In train mode it
    normalises with the batch's statistics, as the original does, in plain PyTorch.
    """

    can_overwrite_input = False  # the folded fc1 goes through the functional form

    def __init__(self, channels: int, rd_channels: int, norm: nn.BatchNorm2d, act: str = "relu",
                 gate: str = "sigmoid", bias: bool = True, backend: str = "auto",
                 strategy: str = "auto") -> None:
        if type(norm) is not nn.BatchNorm2d or norm.num_features != rd_channels:
            raise ValueError(f"norm must be a BatchNorm2d over the {rd_channels} reduced channels, "
                             f"got {norm!r}")
        super().__init__(channels, act=act, gate=gate, bias=bias, rd_channels=rd_channels,
                         backend=backend, strategy=strategy)
        excite = self._modules.pop("excite")
        self.bn = AbsorbedNorm(norm, "none", None)
        self.excite = excite  # after bn: the parameters in the original's order

    def folded_fc1(self) -> tuple[torch.Tensor, torch.Tensor]:
        """fc1 with the eval-mode BatchNorm folded in: weight (K, C) and bias (K,)."""
        scale, shift = self.bn.scale_shift()
        fc1 = self.branches[0]
        bias = shift if fc1.bias is None else fc1.bias * scale + shift
        return fc1.weight * scale[:, None], bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.bn.absorbed:
            return self._forward_with_batch_statistics(x)
        fc1_weight, fc1_bias = self.folded_fc1()
        scale, shift, prologue_act = self.prologue_operands()
        return sae(x, fc1_weight, fc1_bias, self.excite.weight, self.excite.bias, act=self.act,
                   gate=self.gate, backend=self.backend, strategy=self.strategy,
                   prologue_scale=scale, prologue_shift=shift, prologue_act=prologue_act)

    def _forward_with_batch_statistics(self, x: torch.Tensor) -> torch.Tensor:
        x = prologue(x, *self.prologue_operands())
        h = self.bn(self.branches[0](x.mean(dim=(2, 3)))[:, :, None, None]).flatten(1)
        s = TORCH_GATES[self.gate](self.excite(TORCH_ACTIVATIONS[self.act](h)))
        return x * s[:, :, None, None]
