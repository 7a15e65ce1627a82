"""Reference SE / SaE modules in plain PyTorch: the ground truth for every backend.

SaE (SENetV2): ``cardinality`` branches ``act(Linear_i(z))`` of width ``rd_channels``
are concatenated and excited by one Linear back to C channels; ``s = gate(...)``.
SE is the cardinality-1 case. The output is ``act_out(x * s [+ x] [+ identity])``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .options import (
    ACTIVATIONS,
    GATES,
    OUTPUT_ACTIVATIONS,
    Fc1,
    check_cardinality,
    check_name,
    check_operands,
    fc1_parts,
    fc1_stacked,
    reduced_width,
)

TORCH_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "silu": F.silu,
    "hardswish": F.hardswish,
    "gelu": F.gelu,
}
TORCH_GATES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "sigmoid": torch.sigmoid,
    "hardsigmoid": F.hardsigmoid,
}


def sae_reference(
    x: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor | None,
    fc2_weight: torch.Tensor | None,
    fc2_bias: torch.Tensor | None,
    identity: torch.Tensor | None = None,
    *,
    act: str = "relu",
    gate: str = "sigmoid",
    residual: bool = False,
    act_out: str = "none",
    prologue_scale: torch.Tensor | None = None,
    prologue_shift: torch.Tensor | None = None,
    prologue_act: str = "none",
) -> torch.Tensor:
    """The operator as a composite of PyTorch ops, on stacked branch weights.

    ``concat_i(act(W1_i z + b1_i)) == act(W1_stack z + b1_stack)``, so the branches
    are one Linear over the row-stacked matrices (see ``check_operands`` for shapes).
    With a prologue, ``x' = prologue_act(x * prologue_scale + prologue_shift)`` (per
    channel) takes the place of x everywhere.
    """
    check_operands(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, identity, act, gate, act_out,
                   prologue_scale, prologue_shift, prologue_act)
    return composite(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, identity, act, gate,
                     residual, act_out, prologue_scale, prologue_shift, prologue_act)


def prologue(x: torch.Tensor, scale: torch.Tensor | None, shift: torch.Tensor | None,
             act: str) -> torch.Tensor:
    """``act(x * scale + shift)`` with per-channel scale and shift, in x's dtype."""
    if scale is not None:
        x = x * scale.to(x.dtype)[:, None, None]
    if shift is not None:
        x = x + shift.to(x.dtype)[:, None, None]
    return x if act == "none" else TORCH_ACTIVATIONS[act](x)


def fc1(z: torch.Tensor, weight: Fc1, bias: Fc1 | None,
        act: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """``act(W1 z + b1)`` (no ``act``: ``W1 z + b1``), with W1 stacked or as its branch
    matrices: then each branch's Linear and activation, and the outputs concatenated (N x K
    values), never the weights (a copy of W1 per call, 4 MB at SENetV2-ResNet-50's last
    stage, in every graph torch.compile makes of it). Branch by branch as :class:`SaE`
    computes it, so that a compiled converted block generates the original's kernels."""
    weights = fc1_parts(weight)
    biases = fc1_parts(bias) or [None] * len(weights)
    parts = [F.linear(z, w, b) for w, b in zip(weights, biases, strict=True)]
    if act is not None:
        parts = [act(part) for part in parts]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def excitation(z: torch.Tensor, fc1_weight: Fc1, fc1_bias: Fc1 | None,
               fc2_weight: torch.Tensor | None, fc2_bias: torch.Tensor | None, act: str,
               gate: str) -> torch.Tensor:
    """The gate ``s = gate(W2 act(W1 z + b1) + b2)`` (N, C) of the pooled means z (N, C)."""
    if fc2_weight is None:
        u = fc1(z, fc1_weight, fc1_bias)
    else:
        u = F.linear(fc1(z, fc1_weight, fc1_bias, TORCH_ACTIVATIONS[act]), fc2_weight, fc2_bias)
    return TORCH_GATES[gate](u)


def composite(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, identity, act, gate, residual,
              act_out, prologue_scale=None, prologue_shift=None, prologue_act="none",
              excite: Callable[..., torch.Tensor] = excitation) -> torch.Tensor:
    """:func:`sae_reference` on operands already validated (fc1 stacked or by branches);
    ``excite`` computes the gate from the pooled means, as :func:`excitation` does."""
    x = prologue(x, prologue_scale, prologue_shift, prologue_act)
    z = x.mean(dim=(2, 3))
    s = excite(z, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, gate)[:, :, None, None]
    y = x + x * s if residual else x * s
    if identity is not None:
        y = y + identity
    return F.relu(y) if act_out == "relu" else y


class SaE(nn.Module):
    """Squeeze-Aggregated-Excitation block (SENetV2), pure PyTorch.

    Args:
        channels: C, the input's channel count.
        reduction: each branch is ``channels // reduction`` wide unless ``rd_channels`` is given.
        cardinality: number of parallel branch FCs (4 in the paper).
        act: activation inside the branches, one of ``ACTIVATIONS``.
        gate: excitation gate, one of ``GATES``.
        bias: whether the Linear layers carry a bias.
        residual: return ``x + x * s`` (the official SENetV2 form) instead of ``x * s``.
        rd_channels: explicit branch width, overriding ``reduction``.
        act_out: activation on the final output, ``"relu"`` for the SE-ResNet tail
            ``relu(x * s + identity)``.
    """

    def __init__(
        self,
        channels: int,
        reduction: int = 32,
        cardinality: int = 4,
        act: str = "relu",
        gate: str = "sigmoid",
        bias: bool = True,
        residual: bool = False,
        rd_channels: int | None = None,
        act_out: str = "none",
    ) -> None:
        super().__init__()
        self.channels = channels
        self.reduction = reduction
        self.cardinality = check_cardinality(cardinality)
        self.rd_channels = reduced_width(channels, reduction, rd_channels)
        self.act = check_name("act", act, ACTIVATIONS)
        self.gate = check_name("gate", gate, GATES)
        self.act_out = check_name("act_out", act_out, OUTPUT_ACTIVATIONS)
        self.residual = residual
        self.branches = nn.ModuleList(
            nn.Linear(channels, self.rd_channels, bias=bias) for _ in range(cardinality)
        )
        self.excite = nn.Linear(cardinality * self.rd_channels, channels, bias=bias)

    @property
    def bias(self) -> bool:
        return self.excite.bias is not None

    def branch_fc1(self) -> tuple[Fc1, Fc1 | None]:
        """fc1's weights and biases as they are: the branch matrices in order (one matrix
        where there is one branch), or None for no biases."""
        if self.cardinality == 1:
            return self.branches[0].weight, self.branches[0].bias
        weights = [b.weight for b in self.branches]
        return weights, [b.bias for b in self.branches] if self.bias else None

    def stacked_fc1(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The branch weights stacked row-wise, (cardinality * rd_channels, C), and biases."""
        weight, bias = self.branch_fc1()
        return fc1_stacked(weight), fc1_stacked(bias)

    def config(self) -> dict:
        """The constructor arguments that rebuild this block."""
        return dict(channels=self.channels, reduction=self.reduction, cardinality=self.cardinality,
                    act=self.act, gate=self.gate, bias=self.bias, residual=self.residual,
                    rd_channels=self.rd_channels, act_out=self.act_out)

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, rd_channels={self.rd_channels}, "
            f"cardinality={self.cardinality}, act={self.act}, gate={self.gate}, "
            f"residual={self.residual}, act_out={self.act_out}"
        )

    def forward(self, x: torch.Tensor, identity: torch.Tensor | None = None) -> torch.Tensor:
        """``act_out(x * s [+ x] [+ identity])``, computed branch by branch as in the paper."""
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(
                f"{type(self).__name__} has {self.channels} channels: expected x of shape "
                f"(N, {self.channels}, H, W), got {tuple(x.shape)}"
            )
        act = TORCH_ACTIVATIONS[self.act]
        z = x.mean(dim=(2, 3))
        h = torch.cat([act(branch(z)) for branch in self.branches], dim=1)
        s = TORCH_GATES[self.gate](self.excite(h))[:, :, None, None]
        y = x + x * s if self.residual else x * s
        if identity is not None:
            if identity.shape != x.shape:
                raise ValueError(
                    f"identity must have x's shape {tuple(x.shape)}, got {tuple(identity.shape)}"
                )
            y = y + identity
        return F.relu(y) if self.act_out == "relu" else y


class SE(SaE):
    """Squeeze-and-Excitation block (Hu et al.): SaE with a single branch."""

    def __init__(
        self,
        channels: int,
        reduction: int = 16,
        act: str = "relu",
        gate: str = "sigmoid",
        bias: bool = True,
        residual: bool = False,
        rd_channels: int | None = None,
        act_out: str = "none",
    ) -> None:
        super().__init__(
            channels,
            reduction=reduction,
            cardinality=1,
            act=act,
            gate=gate,
            bias=bias,
            residual=residual,
            rd_channels=rd_channels,
            act_out=act_out,
        )


class EffectiveSE(nn.Module):
    """Effective SE (CenterMask; timm's ``EffectiveSEModule``, HGNet's ``EseModule``): one
    C -> C FC and a gate, ``x * gate(W z + b)``; the single-FC form of the operator."""

    def __init__(self, channels: int, gate: str = "hardsigmoid", bias: bool = True) -> None:
        super().__init__()
        self.channels = channels
        self.gate = check_name("gate", gate, GATES)
        self.fc = nn.Linear(channels, channels, bias=bias)

    def config(self) -> dict:
        """The constructor arguments that rebuild this block."""
        return dict(channels=self.channels, gate=self.gate, bias=self.fc.bias is not None)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, gate={self.gate}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(
                f"{type(self).__name__} has {self.channels} channels: expected x of shape "
                f"(N, {self.channels}, H, W), got {tuple(x.shape)}"
            )
        return x * TORCH_GATES[self.gate](self.fc(x.mean(dim=(2, 3))))[:, :, None, None]
