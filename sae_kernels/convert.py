"""Swap the SE blocks of a live model for fused ones (``FusedSE``, ``FusedSaE``,
``FusedEffectiveSE``).

Blocks are found by their class (timm, torchvision and this package's own), never by
the attribute name they sit under, and each is checked for the structure the fused
operator computes: ``x * gate(fc2(act(fc1(mean_hw(x)))))``, or ``x * gate(fc(mean_hw(x)))``
with one C -> C FC (effective SE). The reduced width is read from the weight shapes. A
BatchNorm between fc1 and the activation (RexNet) is folded into fc1 in eval mode; in
train mode it keeps updating its statistics, so such a block is left as it is.
Everything left is reported with the reason.

Residual blocks ending ``relu(se(y) + shortcut)`` (``BLOCK_REWRITES``) are replaced as a
whole by a :class:`~sae_kernels.blocks.FusedResidualBlock`, whose SE adds the shortcut and
applies the ReLU in its own pass; a tail that cannot be absorbed stays outside, and the
report says why.

A BatchNorm (``NORM_CLASSES``), and an activation after it, whose output feeds only a
fused SE become the SE's prologue: the SE applies them in its own passes over x (see
``prologue``). "Only" is proven on the graph of the SE's parent module traced with
torch.fx: every node from the BatchNorm to the SE has that one user. A BatchNorm or an
activation with another consumer stays where it is, and the report says so.
"""

from __future__ import annotations

import copy
import dataclasses
from collections import Counter

import torch
import torch.fx
from torch import nn

from .blocks import FusedResidualBlock, ResidualLayout
from .layers import FusedEffectiveSE, FusedSaE, FusedSE
from .options import PROLOGUE_ACTIVATIONS
from .prologue import AbsorbedAct, AbsorbedNorm
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

#: Normalisations an SE's prologue can take over: whether the class carries its own
#: activation (``act``, after a ``drop`` that must be the identity).
NORM_CLASSES = {
    "torch.nn.modules.batchnorm.BatchNorm2d": False,
    "timm.layers.norm_act.BatchNormAct2d": True,
}
#: Modules that pass x through unchanged (timm's ``aa`` without anti-aliasing, ...).
IDENTITY_CLASSES = ("torch.nn.modules.linear.Identity",)

_SENET_BOTTLENECK = ResidualLayout(
    body=("conv1", "bn1", "relu", "conv2", "bn2", "relu", "conv3", "bn3"),
    se="se_module", shortcut="downsample", act="relu")
#: Blocks around an SE block whose neighbouring ops the fused operator absorbs, with where
#: their parts sit. Matched by exact class (a subclass may change the forward), timm's by
#: qualified name so that timm need not be installed.
BLOCK_REWRITES: dict[str, ResidualLayout] = {
    "timm.models.resnet.BasicBlock": ResidualLayout(
        body=("conv1", "bn1", "drop_block", "act1", "aa", "conv2", "bn2"),
        se="se", shortcut="downsample", act="act2", drop_path="drop_path"),
    "timm.models.resnet.Bottleneck": ResidualLayout(
        body=("conv1", "bn1", "act1", "conv2", "bn2", "drop_block", "act2", "aa", "conv3", "bn3"),
        se="se", shortcut="downsample", act="act3", drop_path="drop_path"),
    "timm.models.senet.SEResNetBlock": ResidualLayout(
        body=("conv1", "bn1", "relu", "conv2", "bn2", "relu"),
        se="se_module", shortcut="downsample", act="relu"),
    "timm.models.senet.SEBottleneck": _SENET_BOTTLENECK,
    "timm.models.senet.SEResNetBottleneck": _SENET_BOTTLENECK,
    "timm.models.senet.SEResNeXtBottleneck": _SENET_BOTTLENECK,
}


@dataclasses.dataclass(frozen=True)
class Converted:
    """A block replaced by a fused one. ``absorbed``: the enclosing block's ops that now run
    in the fused pass; ``not_absorbed``: why such ops stay outside it."""

    path: str
    variant: str
    channels: int
    rd_channels: int
    act: str
    gate: str
    absorbed: tuple[str, ...] = ()
    not_absorbed: tuple[str, ...] = ()


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
                  f"act={c.act} gate={c.gate}{_absorption(c)}" for c in self.converted]
        lines += [f"  skipped {s.path or '<model>'}: {s.variant}: {s.reason}"
                  for s in self.skipped]
        return "\n".join(lines)


def _absorption(c: Converted) -> str:
    notes = [f"absorbed {', '.join(c.absorbed)}"] if c.absorbed else []
    notes += [f"not absorbed: {reason}" for reason in c.not_absorbed]
    return "".join(f"; {note}" for note in notes)


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
    """Replace every SE block of ``model`` with a fused block carrying the same weights,
    and every residual block of ``BLOCK_REWRITES`` around one with a block whose fused SE
    also adds the shortcut and applies the final ReLU.

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
    conversion = _Conversion(model, backend)
    replacements = []
    for path, module in model.named_modules(remove_duplicate=False):
        if any(not done or path.startswith(done + ".") for done, _ in replacements):
            continue  # inside a block already replaced
        replacement = conversion.replacement(path, module)
        if replacement is not None:
            replacements.append((path, replacement))
    for path, replacement in replacements:
        if not path:
            return replacement, conversion.report
        parent_path, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent_path), name, replacement)
    _absorb_prologues(model, conversion.report)
    return model, conversion.report


class _Conversion:
    """One call's state: the report, each module's replacement (a module reached by two
    paths is converted once), and, by SE block, why its enclosing block's ops stay outside."""

    def __init__(self, model: nn.Module, backend: str) -> None:
        self.backend = backend
        self.report = ConversionReport()
        self.uses = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
        self.replacements: dict[int, nn.Module | None] = {}
        self.not_absorbed: dict[int, tuple[str, ...]] = {}

    def replacement(self, path: str, module: nn.Module) -> nn.Module | None:
        """The replacement of the module at ``path``, or None to leave it (and look inside)."""
        if id(module) not in self.replacements:
            layout = BLOCK_REWRITES.get(_qualname(type(module)))
            self.replacements[id(module)] = (
                self._convert_block(path, module) if layout is None
                else self._absorb_tail(path, module, layout))
        return self.replacements[id(module)]

    def _convert_block(self, path: str, module: nn.Module) -> nn.Module | None:
        """The fused replacement of an SE block, or None (reported if it is an attention
        block left as it is)."""
        found = _fuse(module, self.backend)
        if found is None:
            return None
        variant, fused = found
        if isinstance(fused, str):
            self.report.skipped.append(Skipped(path, variant, fused))
            return None
        self.report.converted.append(
            _converted(path, variant, fused, not_absorbed=self.not_absorbed.get(id(module), ())))
        return fused

    def _absorb_tail(self, path: str, block: nn.Module, layout: ResidualLayout,
                     ) -> FusedResidualBlock | None:
        """The residual block with its tail in the fused SE, or None: its SE block is then
        converted (or reported) on its own, with why the tail stays outside."""
        se = getattr(block, layout.se, None)
        found = _fuse(se, self.backend) if isinstance(se, nn.Module) else None
        if found is None or isinstance(found[1], str):
            return None
        variant, fused = found
        problem = self._tail_problem(block, layout, fused)
        if problem:
            self.not_absorbed[id(se)] = (f"block tail: {problem}",)
            return None
        se_path = f"{path}.{layout.se}" if path else layout.se
        self.report.converted.append(
            _converted(se_path, variant, fused, absorbed=FusedResidualBlock.absorbed))
        return FusedResidualBlock(block, layout, _with_output_relu(fused))

    def _tail_problem(self, block: nn.Module, layout: ResidualLayout,
                      fused: nn.Module) -> str | None:
        """Why the block's tail cannot run in ``fused`` (its SE block, fused), or None."""
        missing = [name for name in layout.names() if not hasattr(block, name)]
        if missing:
            return (f"no attribute {', '.join(missing)} (a version of "
                    f"{type(block).__name__} this layout does not describe)")
        if not isinstance(fused, FusedSaE):
            return "the single-FC fused block takes no shortcut"
        if fused.act_out != "none":
            return "the SE block applies its own output ReLU"
        act = getattr(block, layout.act)
        if _activation_name(act, ACTIVATION_CLASSES) != "relu":
            return f"{layout.act} is {type(act).__name__}, not ReLU"
        drop_path = getattr(block, layout.drop_path) if layout.drop_path else None
        if drop_path is not None and not isinstance(drop_path, nn.Identity):
            if not _is(drop_path, "timm.layers.drop.DropPath"):
                return f"{layout.drop_path} is a {type(drop_path).__name__}, not timm's DropPath"
            if drop_path.training:
                return (f"{layout.drop_path} is active in train mode (it scales the SE output "
                        "per sample before the add)")
        if self.uses[id(getattr(block, layout.se))] > self.uses[id(block)]:
            return "the SE block is also used outside this block"
        return None


def _absorb_prologues(model: nn.Module, report: ConversionReport) -> None:
    """Make the BatchNorm (+ activation) feeding each fused SE of ``model`` its prologue,
    where the SE is that output's only consumer; note each outcome in ``report``."""
    entries = {c.path: i for i, c in enumerate(report.converted)}
    for parent_path, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            path = f"{parent_path}.{name}" if parent_path else name
            if path not in entries or child.prologue_norm is not None:
                continue
            outcome = _absorb_prologue(parent, name, child)
            if outcome is None:
                continue
            absorbed, note = outcome
            i = entries[path]
            entry = report.converted[i]
            report.converted[i] = dataclasses.replace(
                entry, absorbed=(*([note] if absorbed else []), *entry.absorbed),
                not_absorbed=(*entry.not_absorbed, *([] if absorbed else [note])))


class _LeafTracer(torch.fx.Tracer):
    """Traces through containers and composite modules down to the modules a prologue is
    made of (and the fused SEs), which stay calls."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (isinstance(m, (FusedSaE, FusedEffectiveSE, nn.Conv2d)) or _norm_class(m) is not None
                or _activation_name(m, ACTIVATION_CLASSES) is not None
                or any(_is(m, q) for q in IDENTITY_CLASSES) or next(m.children(), None) is None)


def _absorb_prologue(parent: nn.Module, se_name: str, se: nn.Module,
                     ) -> tuple[bool, str] | None:
    """Absorb the normalisation feeding ``parent.<se_name>`` into ``se``: (True, what) when
    done, (False, why not) when one is there but cannot be absorbed, None when the SE's
    input comes from no normalisation."""
    try:
        graph = _LeafTracer().trace(parent)
    except Exception as e:  # control flow fx cannot follow: nothing is proven
        return False, (f"prologue: {type(parent).__name__} could not be traced with torch.fx "
                       f"({type(e).__name__})")
    calls = [n for n in graph.nodes if n.op == "call_module"]
    se_calls = [n for n in calls if n.target == se_name]
    if len(se_calls) != 1 or not se_calls[0].args:
        return None
    def module_of(node) -> nn.Module | None:
        """The module a graph node calls, or None for anything else."""
        is_call = isinstance(node, torch.fx.Node) and node.op == "call_module"
        return parent.get_submodule(node.target) if is_call else None

    def skip_identities(node, chain: list):
        while (m := module_of(node)) is not None and any(_is(m, q) for q in IDENTITY_CLASSES):
            chain.append(node)
            node = node.args[0]
        return node

    chain: list = []
    node = skip_identities(se_calls[0].args[0], chain)
    act_node = None
    if (m := module_of(node)) is not None and _activation_name(m, ACTIVATION_CLASSES):
        act_node = node
        chain.append(node)
        node = skip_identities(node.args[0], chain)
    if (m := module_of(node)) is None or _norm_class(m) is None:
        return None
    norm_node = node
    norm = parent.get_submodule(norm_node.target)
    for n in [norm_node, *chain]:
        if len(n.users) != 1:
            return False, f"prologue: {n.target} has {len(n.users)} consumers, not only the SE"
        if sum(c.target == n.target for c in calls) != 1:
            return False, f"prologue: {n.target} is called more than once"
    act, act_module = "none", None
    if _norm_class(norm):  # a normalisation with its own activation
        if not any(_is(norm.drop, q) for q in IDENTITY_CLASSES):
            return False, f"prologue: {norm_node.target} applies dropout before its activation"
        if not any(_is(norm.act, q) for q in IDENTITY_CLASSES):
            act, act_module = _activation_name(norm.act, ACTIVATION_CLASSES), norm.act
    if act_node is not None:
        if act != "none":
            return False, f"prologue: two activations after {norm_node.target}"
        act = _activation_name(parent.get_submodule(act_node.target), ACTIVATION_CLASSES)
    if act not in PROLOGUE_ACTIVATIONS:
        return False, (f"prologue: {norm_node.target} is followed by {act or 'an activation'}, "
                       f"not one of {', '.join(PROLOGUE_ACTIVATIONS[1:])}")
    if not norm.track_running_stats or norm.running_mean is None:
        return False, f"prologue: {norm_node.target} has no running statistics"
    absorbed = AbsorbedNorm(norm, act, act_module)
    parent.set_submodule(norm_node.target, absorbed)
    if act_node is not None:
        act_target = parent.get_submodule(act_node.target)
        parent.set_submodule(act_node.target, AbsorbedAct(absorbed, act_target))
    se.absorb_prologue(absorbed)
    return True, f"{norm_node.target} (BatchNorm{' + ' + act if act != 'none' else ''})"


def _norm_class(module: nn.Module) -> bool | None:
    """Whether ``module`` is a NORM_CLASSES normalisation with its own activation; None when
    it is none of them (exact classes: a subclass may compute something else)."""
    return NORM_CLASSES.get(_qualname(type(module)))


def _fuse(module: nn.Module, backend: str) -> tuple[str, nn.Module | str] | None:
    """The variant name of ``module`` and its fused replacement, or why it is left as it
    is; None for a module that is no attention block this module knows, or fused already."""
    if isinstance(module, (FusedSaE, FusedEffectiveSE)):
        return None
    if isinstance(module, SaE):
        fused_type = FusedSE if module.cardinality == 1 else FusedSaE
        return f"sae_kernels.{type(module).__name__}", fused_type.from_module(module, backend)
    if isinstance(module, EffectiveSE):
        return "sae_kernels.EffectiveSE", FusedEffectiveSE.from_module(module, backend)
    for qualname, reason in NOT_SE_CLASSES.items():
        if _is(module, qualname):
            return _short(qualname), f"not an SE block ({reason})"
    found = _read_block(module)
    if found is None or isinstance(found[1], str):
        return found
    variant, block = found
    problem = _check(block, module.training)
    if problem:
        return variant, problem
    return variant, _fused_from(block, backend).train(module.training)


def _converted(path: str, variant: str, fused: nn.Module, **absorption) -> Converted:
    """The report entry of a fused block (the single-FC form: rd = C, no act)."""
    if isinstance(fused, FusedEffectiveSE):
        return Converted(path, variant, fused.channels, fused.channels, "none", fused.gate,
                         **absorption)
    return Converted(path, variant, fused.channels, fused.rd_channels, fused.act, fused.gate,
                     **absorption)


def _with_output_relu(se: FusedSaE) -> FusedSaE:
    """A copy of ``se`` computing ``relu(x * s [+ x] + identity)``: same weights, device,
    dtype, mode and frozen parameters."""
    config = se.config() | {"act_out": "relu"}
    if isinstance(se, FusedSE):
        del config["cardinality"]
    weight = se.excite.weight
    with_relu = type(se)(**config, backend=se.backend, strategy=se.strategy)
    with_relu = with_relu.to(weight.device, weight.dtype)
    with_relu.load_state_dict(se.state_dict())
    for new, old in zip(with_relu.parameters(), se.parameters(), strict=True):
        new.requires_grad_(old.requires_grad)
    return with_relu.train(se.training)


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
    return any(_qualname(cls) == qualname for cls in type(module).__mro__)


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _short(qualname: str) -> str:
    top, _, rest = qualname.partition(".")
    return f"{top}.{rest.rpartition('.')[2]}"
