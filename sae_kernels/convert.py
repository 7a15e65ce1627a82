"""Swap the SE blocks of a live model for fused ones (``FusedSE``, ``FusedSaE``,
``FusedEffectiveSE``).

Blocks are found by their class (timm, torchvision and this package's own), never by
the attribute name they sit under, and each is checked for the structure the fused
operator computes: ``x * gate(fc2(act(fc1(mean_hw(x)))))``, or ``x * gate(fc(mean_hw(x)))``
with one C -> C FC (effective SE). The reduced width is read from the weight shapes. A
BatchNorm between fc1 and the activation (RexNet) is folded into fc1 in eval mode; in
train mode it keeps updating its statistics, so such a block is left as it is.
Everything left is reported with the reason.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

from .layers import FusedEffectiveSE, FusedSaE, FusedSE
from .reference import EffectiveSE, SaE

#: Activation modules by the name the operator knows them by (torch's and timm's classes,
#: matched by qualified name so that timm need not be installed).
ACTIVATION_CLASSES = {
    "torch.nn.modules.activation.ReLU": "relu",
    "torch.nn.modules.activation.SiLU": "silu",
    "timm.layers.activations.Swish": "silu",
    "torch.nn.modules.activation.Hardswish": "hardswish",
    "timm.layers.activations.HardSwish": "hardswish",
    "torch.nn.modules.activation.GELU": "gelu",
    "timm.layers.activations.GELU": "gelu",
}
GATE_CLASSES = {
    "torch.nn.modules.activation.Sigmoid": "sigmoid",
    "timm.layers.activations.Sigmoid": "sigmoid",
    "torch.nn.modules.activation.Hardsigmoid": "hardsigmoid",
    "timm.layers.activations.HardSigmoid": "hardsigmoid",
}
#: Channel-attention blocks that are not SE blocks: reported, never converted.
NOT_SE_CLASSES = {
    "timm.layers.eca.EcaModule": "ECA: a 1-D convolution across channels, no FC pair",
    "timm.layers.eca.CecaModule": "ECA: a 1-D convolution across channels, no FC pair",
    "timm.layers.gather_excite.GatherExcite": "gather-excite: a spatial gather, not a mean",
    "timm.layers.global_context.GlobalContext": "global context: attention pooling, not a mean",
    "timm.layers.cbam.CbamModule": "CBAM: channel and spatial attention",
    "timm.layers.cbam.LightCbamModule": "CBAM: channel and spatial attention",
}


@dataclasses.dataclass(frozen=True)
class Converted:
    """A block replaced by a fused one."""

    path: str
    variant: str
    channels: int
    rd_channels: int
    act: str
    gate: str


@dataclasses.dataclass(frozen=True)
class Skipped:
    """A block left as it is, and why."""

    path: str
    variant: str
    reason: str


@dataclasses.dataclass
class ConversionReport:
    """What :func:`convert` did, block by block."""

    converted: list[Converted] = dataclasses.field(default_factory=list)
    skipped: list[Skipped] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"converted {len(self.converted)}, skipped {len(self.skipped)}"]
        lines += [f"  {c.path or '<model>'}: {c.variant} C={c.channels} rd={c.rd_channels} "
                  f"act={c.act} gate={c.gate}" for c in self.converted]
        lines += [f"  skipped {s.path or '<model>'}: {s.variant}: {s.reason}"
                  for s in self.skipped]
        return "\n".join(lines)


@dataclasses.dataclass
class _Block:
    """An SE block read out: its fc1 (K, C) and fc2 (C, K) convolutions, act and gate
    modules, and a norm between fc1 and act; fc2 and act None for the single-FC form."""

    fc1: nn.Conv2d
    fc2: nn.Conv2d | None
    act: nn.Module | None
    gate: nn.Module
    norm: nn.Module | None = None


def convert(model: nn.Module, inplace: bool = False, backend: str = "auto",
            ) -> tuple[nn.Module, ConversionReport]:
    """Replace every SE block of ``model`` with a fused block carrying the same weights.

    Args:
        model: any module; the model itself may be an SE block.
        inplace: modify ``model`` rather than a deep copy of it.
        backend: the fused blocks' backend (see ``FusedSaE``).

    Returns:
        The converted model and a :class:`ConversionReport`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert expects an nn.Module, got {type(model).__name__}")
    model = model if inplace else copy.deepcopy(model)
    report = ConversionReport()
    fused_by_block: dict[int, nn.Module | None] = {}  # a block shared by two paths: once
    replacements = []
    for path, module in model.named_modules(remove_duplicate=False):
        if any(not done or path.startswith(done + ".") for done, _ in replacements):
            continue  # inside a block already replaced
        if id(module) not in fused_by_block:
            fused_by_block[id(module)] = _convert_block(path, module, backend, report)
        if fused_by_block[id(module)] is not None:
            replacements.append((path, fused_by_block[id(module)]))
    for path, fused in replacements:
        if not path:
            return fused, report
        parent_path, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent_path), name, fused)
    return model, report


def _convert_block(path: str, module: nn.Module, backend: str,
                   report: ConversionReport) -> nn.Module | None:
    """The fused replacement of ``module``, or None (recorded in ``report`` if it is an
    attention block left as it is)."""
    if isinstance(module, (FusedSaE, FusedEffectiveSE)):
        return None
    if isinstance(module, SaE):
        fused = (FusedSE if module.cardinality == 1 else FusedSaE).from_module(module, backend)
        report.converted.append(Converted(path, f"sae_kernels.{type(module).__name__}",
                                          module.channels, module.rd_channels, module.act,
                                          module.gate))
        return fused
    if isinstance(module, EffectiveSE):
        fused = FusedEffectiveSE.from_module(module, backend)
        report.converted.append(Converted(path, "sae_kernels.EffectiveSE", module.channels,
                                          module.channels, "none", module.gate))
        return fused
    for qualname, reason in NOT_SE_CLASSES.items():
        if _is(module, qualname):
            report.skipped.append(Skipped(path, _short(qualname), f"not an SE block ({reason})"))
            return None
    found = _read_block(module)
    if found is None:
        return None
    variant, block = found
    if isinstance(block, str):
        report.skipped.append(Skipped(path, variant, block))
        return None
    problem = _check(block, module.training)
    if problem:
        report.skipped.append(Skipped(path, variant, problem))
        return None
    fused = _fused_from(block, backend).train(module.training)
    single_fc = block.fc2 is None
    report.converted.append(Converted(
        path, variant, fused.channels, fused.channels if single_fc else fused.rd_channels,
        "none" if single_fc else fused.act, fused.gate))
    return fused


def _read_block(module: nn.Module) -> tuple[str, _Block | str] | None:
    """The variant name and the block's parts (or why it cannot be fused), for the SE
    classes this converter knows; None for any other module."""
    if _is(module, "torchvision.ops.misc.SqueezeExcitation"):
        pool = module.avgpool
        if not (isinstance(pool, nn.AdaptiveAvgPool2d) and _is_one(pool.output_size)):
            return "torchvision.SqueezeExcitation", "the pool is not a global average pool"
        return "torchvision.SqueezeExcitation", _Block(module.fc1, module.fc2, module.activation,
                                                       module.scale_activation)
    if _is(module, "timm.layers.squeeze_excite.SEModule"):
        if module.add_maxpool:
            return "timm.SEModule", "add_maxpool=True mixes in a max pool"
        norm = None if isinstance(module.bn, nn.Identity) else module.bn
        return "timm.SEModule", _Block(module.fc1, module.fc2, module.act, module.gate, norm)
    if _is(module, "timm.models._efficientnet_blocks.SqueezeExcite"):
        return "timm.SqueezeExcite", _Block(module.conv_reduce, module.conv_expand, module.act1,
                                            module.gate)
    if _is(module, "timm.models.senet.SEModule"):
        return "timm.senet.SEModule", _Block(module.fc1, module.fc2, module.relu, module.sigmoid)
    if _is(module, "timm.layers.squeeze_excite.EffectiveSEModule"):
        if module.add_maxpool:
            return "timm.EffectiveSEModule", "add_maxpool=True mixes in a max pool"
        return "timm.EffectiveSEModule", _Block(module.fc, None, None, module.gate)
    if _is(module, "timm.models.hgnet.EseModule"):
        return "timm.hgnet.EseModule", _Block(module.conv, None, None, module.sigmoid)
    return None


def _check(block: _Block, training: bool) -> str | None:
    """Why ``block`` cannot be fused, or None."""
    for fc, name in ((block.fc1, "fc1"), (block.fc2, "fc2")):
        if fc is None:
            continue
        if type(fc) is not nn.Conv2d or not fc.weight.is_floating_point():
            return f"{name} is a {type(fc).__module__}.{type(fc).__name__}, not a float nn.Conv2d"
        if (fc.kernel_size != (1, 1) or fc.stride != (1, 1) or fc.groups != 1
                or fc.dilation != (1, 1) or fc.padding not in ((0, 0), "valid")):
            return f"{name} is not a plain 1x1 convolution"
    k, c = block.fc1.weight.shape[:2]
    if block.fc2 is None:
        if k != c:
            return f"the single FC has shape {tuple(block.fc1.weight.shape)}; expected C -> C"
    elif block.fc2.weight.shape[:2] != (c, k):
        return f"fc2 has shape {tuple(block.fc2.weight.shape)}; expected ({c}, {k}, 1, 1)"
    if block.act is not None and _activation_name(block.act, ACTIVATION_CLASSES) is None:
        return f"activation {block.act!r} is not one of relu, silu, hardswish, gelu"
    if _activation_name(block.gate, GATE_CLASSES) is None:
        return f"gate {block.gate!r} is not sigmoid or hardsigmoid"
    if block.norm is not None:
        if type(block.norm) is not nn.BatchNorm2d or not block.norm.track_running_stats:
            return f"{type(block.norm).__name__} between fc1 and the activation cannot be folded"
        if training:
            return ("BatchNorm between fc1 and the activation is folded only in eval mode "
                    "(in train mode it updates its statistics)")
    return None


def _fused_from(block: _Block, backend: str) -> FusedSE | FusedEffectiveSE:
    """A fused block with the block's weights (BatchNorm folded into fc1)."""
    gate = _activation_name(block.gate, GATE_CLASSES)
    if block.fc2 is None:
        fc = block.fc1
        fused = FusedEffectiveSE(fc.weight.shape[0], gate, bias=True, backend=backend)
        fused = fused.to(fc.weight.device, fc.weight.dtype)
        with torch.no_grad():
            fused.fc.weight.copy_(fc.weight[:, :, 0, 0])
            fused.fc.bias.copy_(_bias(fc, fc.weight.shape[0]))  # a missing bias is zero
        fused.fc.requires_grad_(fc.weight.requires_grad)
        return fused
    w1 = block.fc1.weight.detach()[:, :, 0, 0]
    w2 = block.fc2.weight.detach()[:, :, 0, 0]
    k, c = w1.shape
    b1 = _bias(block.fc1, k)
    b2 = _bias(block.fc2, c)
    if block.norm is not None:
        bn = block.norm
        scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps) if bn.affine else \
            torch.rsqrt(bn.running_var + bn.eps)
        shift = bn.bias.detach() if bn.affine else torch.zeros_like(scale)
        w1 = w1 * scale[:, None]
        b1 = (b1 - bn.running_mean) * scale + shift
    needs_bias = block.fc1.bias is not None or block.fc2.bias is not None or block.norm is not None
    fused = FusedSE(c, rd_channels=k, act=_activation_name(block.act, ACTIVATION_CLASSES),
                    gate=gate, bias=needs_bias, backend=backend).to(w1.device, w1.dtype)
    fc1, fc2 = fused.branches[0], fused.excite
    with torch.no_grad():
        fc1.weight.copy_(w1)
        fc2.weight.copy_(w2)
        if needs_bias:  # a missing bias is a zero bias
            fc1.bias.copy_(b1)
            fc2.bias.copy_(b2)
    for new, old in ((fc1, block.fc1), (fc2, block.fc2)):  # frozen stays frozen
        for p in new.parameters():
            p.requires_grad_(old.weight.requires_grad)
    return fused


def _bias(conv: nn.Conv2d, size: int) -> torch.Tensor:
    if conv.bias is None:
        return torch.zeros(size, device=conv.weight.device, dtype=conv.weight.dtype)
    return conv.bias.detach()


def _activation_name(module: nn.Module, classes: dict[str, str]) -> str | None:
    for qualname, name in classes.items():
        if _is(module, qualname):
            if name == "gelu" and getattr(module, "approximate", "none") != "none":
                return None  # tanh-approximated GELU is another function
            return name
    return None


def _is_one(size) -> bool:
    return size == 1 or tuple(size) == (1, 1)


def _is(module: nn.Module, qualname: str) -> bool:
    """Whether ``module``'s class, or a base class, is the class named ``qualname``."""
    return any(f"{cls.__module__}.{cls.__qualname__}" == qualname for cls in type(module).__mro__)


def _short(qualname: str) -> str:
    top, _, rest = qualname.partition(".")
    return f"{top}.{rest.rpartition('.')[2]}"
