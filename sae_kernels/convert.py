"""Swap the SE blocks of a live model for fused ones (``FusedSE``, ``FusedSaE``,
``FusedEffectiveSE``).

Blocks are found by their class (timm, torchvision and this package's own), never by
the attribute name they sit under, and each is checked for the structure the fused
operator computes: ``x * gate(fc2(act(fc1(mean_hw(x)))))``, or ``x * gate(fc(mean_hw(x)))``
with one C -> C FC (effective SE). The reduced width is read from the weight shapes. A
BatchNorm between fc1 and the activation (RexNet) is kept and folded into fc1 per call in
eval mode (:class:`~sae_kernels.blocks.FusedSEWithNorm`); a block converted in train mode,
where it updates its statistics, is left as it is. Everything left is reported with the
reason.

Residual blocks ending ``relu(se(y) + shortcut)`` (``BLOCK_REWRITES``) are replaced as a
whole by a :class:`~sae_kernels.blocks.FusedResidualBlock`, whose SE adds the shortcut and
applies the ReLU in its own pass; a tail that cannot be absorbed stays outside, and the
report says why.

A BatchNorm (``NORM_CLASSES``), and an activation after it, whose output feeds only a
fused SE become the SE's prologue: the SE applies them in its own passes over x (see
``prologue``). "Only" is proven on the graph of the SE's parent module traced with
torch.fx: every node from the BatchNorm to the SE has that one user. A BatchNorm or an
activation with another consumer stays where it is, and the report says so.

A fused SE whose x is the fresh output of a convolution or a normalisation
(``FRESH_OUTPUT_CLASSES``), handed on by activations, absorbed norms or identities and read
by nothing else, proven on the same graph, may write its output over x in inference, as
``ReLU(inplace=True)`` does (:class:`~sae_kernels.layers.FusedSaE`'s
``overwrite_input_of``; never while a hook could hold x): ``convert(model,
overwrite_inputs=False)`` leaves every output in new memory.

Checkpoints: a converted model's ``state_dict`` is the original's, key for key, with the
same shapes and dtypes, and the original's checkpoints load into it strictly. Where a fused
block names or shapes its parameters differently from the block it replaced (timm's and
torchvision's SE blocks hold 1x1 convolutions, the fused ones Linear layers), state_dict
hooks translate: entries leave under the original's names and shapes, and entries in
that format are taken back on load, by the tables ``TIMM_SE_LAYOUTS`` and
``TORCHVISION_SE_LAYOUTS``. The fused modules keep their own parameters, the operands
the operator reads in place (renaming them would put 4-D views or attribute lookups on the
per-call path), and their own format when built directly. The other replacements keep
the original's names already: absorbed norms hold the BatchNorm's tensors, residual blocks
the original's submodules, a BatchNorm inside an SE stays itself.

Every replacement remembers the module it replaced as a skeleton on the meta device (its
classes and settings, no tensor memory): :func:`revert` rebuilds the original modules
around the converted model's current tensors.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from collections import Counter
from collections.abc import Iterable

import torch
import torch.fx
from torch import nn

from .blocks import FusedResidualBlock, FusedSEWithNorm, ResidualLayout
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


@dataclasses.dataclass(frozen=True)
class SELayout:
    """An SE block class: the variant name reports use, and where its parts sit (attribute
    names): the FCs, 1x1 convolutions ``fc1`` (K, C) and ``fc2`` (C, K), the activation
    between them and the gate; ``fc2`` and ``act`` None for the single-FC form (one C -> C
    FC); ``norm``, a normalisation between fc1 and the activation (an ``nn.Identity``
    there is none).

    A fused block's state_dict takes these names back: its ``branches.0``, ``excite`` and
    ``fc`` (Linear, (K, C)) become ``fc1``, ``fc2`` and the single FC (1x1 convolution,
    (K, C, 1, 1)), its ``bn`` (:class:`~sae_kernels.blocks.FusedSEWithNorm`) ``norm``.
    """

    variant: str
    fc1: str
    fc2: str | None
    act: str | None
    gate: str
    norm: str | None = None


#: timm's SE blocks, by qualified name (timm need not be installed).
TIMM_SE_LAYOUTS = {
    "timm.layers.squeeze_excite.SEModule":
        SELayout("timm.SEModule", "fc1", "fc2", "act", "gate", norm="bn"),
    "timm.models._efficientnet_blocks.SqueezeExcite":
        SELayout("timm.SqueezeExcite", "conv_reduce", "conv_expand", "act1", "gate"),
    "timm.models.senet.SEModule":
        SELayout("timm.senet.SEModule", "fc1", "fc2", "relu", "sigmoid"),
    "timm.layers.squeeze_excite.EffectiveSEModule":
        SELayout("timm.EffectiveSEModule", "fc", None, None, "gate"),
    "timm.models.hgnet.EseModule":
        SELayout("timm.hgnet.EseModule", "conv", None, None, "sigmoid"),
}
#: torchvision's SE block, by qualified name.
TORCHVISION_SE_LAYOUTS = {
    "torchvision.ops.misc.SqueezeExcitation":
        SELayout("torchvision.SqueezeExcitation", "fc1", "fc2", "activation", "scale_activation"),
}

_SE_LAYOUTS = TIMM_SE_LAYOUTS | TORCHVISION_SE_LAYOUTS

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
#: Modules whose output is a new tensor: where a fused SE is its only reader (through
#: activations, absorbed norms and identities, which return a new tensor or their input),
#: the SE may write its output over it.
FRESH_OUTPUT_CLASSES = ("torch.nn.modules.conv.Conv2d", "timm.layers.conv2d_same.Conv2dSame",
                        "timm.layers.mixed_conv2d.MixedConv2d",
                        "timm.layers.cond_conv2d.CondConv2d", *NORM_CLASSES)

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
    #: the module whose output the block writes its own over in inference, if any
    overwrites: str | None = None


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
    notes += [f"writes y over {c.overwrites}'s output"] if c.overwrites else []
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
            overwrite_inputs: bool = True) -> tuple[nn.Module, ConversionReport]:
    """Replace every SE block of ``model`` with a fused block carrying the same weights,
    and every residual block of ``BLOCK_REWRITES`` around one with a block whose fused SE
    also adds the shortcut and applies the final ReLU.

    Args:
        model: any module; the model itself may be an SE block.
        inplace: modify ``model`` rather than a deep copy of it.
        backend: the fused blocks' backend (see ``FusedSaE``).
        overwrite_inputs: let fused blocks whose x is a convolution's or a norm's output
            that nothing else reads write their output over it in inference (see the
            module's doc).

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
    if overwrite_inputs:
        _reuse_inputs(model, conversion.report)
    return model, conversion.report


def revert(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Give back the modules :func:`convert` replaced in ``model``: its SE blocks, residual
    blocks, BatchNorms and activations, of their original classes, holding the converted
    modules' current tensors (trained weights and statistics, requires_grad, modes).

    Args:
        model: a model :func:`convert` returned, trained or not, or a copy of one (deepcopy,
            pickle); modules convert did not make (``se_resnet``'s, say) stay as they are.
        inplace: modify ``model``, whose tensors the originals then take over without a
            copy, rather than a deep copy of it.

    Returns:
        The model with the original modules, or the original module where ``model``
        itself was converted.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"revert expects an nn.Module, got {type(model).__name__}")
    model = model if inplace else copy.deepcopy(model)
    originals: dict[int, nn.Module] = {}
    # children before their parents: a residual block's SE and norms are rebuilt first
    for path, module in reversed(list(model.named_modules(remove_duplicate=False))):
        replaced = module.__dict__.get(_ORIGINAL)
        if replaced is None:
            continue
        if id(module) not in originals:
            originals[id(module)] = replaced.rebuild(module, path)
        if not path:
            return originals[id(module)]
        parent_path, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent_path), name, originals[id(module)])
    return model


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
        return _keep_original(fused, module)

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
        fused = _keep_original(_with_output_relu(fused), se)
        return _keep_original(FusedResidualBlock(block, layout, fused), block,
                              without=block.children())

    def _tail_problem(self, block: nn.Module, layout: ResidualLayout,
                      fused: nn.Module) -> str | None:
        """Why the block's tail cannot run in ``fused`` (its SE block, fused), or None."""
        missing = [name for name in layout.names() if not hasattr(block, name)]
        if missing:
            return (f"no attribute {', '.join(missing)} (a version of "
                    f"{type(block).__name__} this layout does not describe)")
        if not isinstance(fused, FusedSaE):
            return "the single-FC fused block takes no shortcut"
        if isinstance(fused, FusedSEWithNorm):
            return "the SE block has a BatchNorm between fc1 and the activation"
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


#: The attribute holding the :class:`_Original` a converted module replaced (in its
#: ``__dict__``; a name no wrapped block uses).
_ORIGINAL = "_sae_kernels_original"


@dataclasses.dataclass
class _Original:
    """The module a converted one replaced: ``skeleton``, its structure with every tensor
    on the meta device (its classes and settings, no tensor memory), and ``renames``, the
    converted module's submodules that the original names otherwise, as (converted,
    original) pairs; empty where the two share one format."""

    skeleton: nn.Module
    renames: tuple[tuple[str, str], ...]

    def original_entry(self, key: str, value: torch.Tensor) -> tuple[str, torch.Tensor]:
        """A state_dict entry of the converted module (key relative to it) in the original's
        format: renamed, and an FC weight (K, C) as a 1x1 convolution's (K, C, 1, 1) (the
        only 2-D entries: the rest are biases and a BatchNorm's per-channel tensors). A live
        parameter (``state_dict(keep_vars=True)``, which tracers read to find a model's
        parameters) keeps its shape: a view of it would not be the parameter."""
        for converted, original in self.renames:
            if key.startswith(converted + "."):
                if value.dim() == 2 and not isinstance(value, nn.Parameter):
                    value = value[:, :, None, None]
                return original + key[len(converted):], value
        return key, value

    def converted_entry(self, key: str, value: torch.Tensor,
                        ) -> tuple[str, torch.Tensor] | str:
        """The converted module's entry for an entry in the original's format (entries in
        the converted module's own format pass unchanged), or what is wrong with it."""
        for converted, original in self.renames:
            if key.startswith(original + "."):
                if value.dim() == 4:
                    if value.shape[2:] != (1, 1):
                        return (f"{key} has shape {tuple(value.shape)}: expected the weight of "
                                "a 1x1 convolution, (out, in, 1, 1)")
                    value = value[:, :, 0, 0]
                return converted + key[len(original):], value
        return key, value

    def rebuild(self, converted: nn.Module, path: str) -> nn.Module:
        """The original module around ``converted``'s current tensors (or, for a residual
        block, its current submodules): the skeleton, filled."""
        original = self.skeleton
        if isinstance(converted, FusedResidualBlock):
            for name, child in converted.named_children():
                setattr(original, name, child)
            original.training = converted.training  # the children keep their own modes
        else:
            # in the original's format: the tensors (views of the converted module's), and
            # the live parameters for their requires_grad
            live = converted.state_dict(keep_vars=True)
            original.load_state_dict(converted.state_dict(), assign=True)
            for name, parameter in original.named_parameters():
                parameter.requires_grad_(live[name].requires_grad)
            original.train(converted.training)
            for converted_name, name in self.renames:
                original.get_submodule(name).train(converted.get_submodule(converted_name).training)
        empty = [name for name, t in itertools.chain(original.named_parameters(),
                                                     original.named_buffers()) if t.is_meta]
        if empty:
            raise RuntimeError(f"{path or '<model>'}: the converted {type(converted).__name__} "
                               f"holds no value for {', '.join(empty)} of the original "
                               f"{type(original).__name__}")
        return original


def _keep_original(converted: nn.Module, original: nn.Module,
                   without: Iterable[nn.Module] = ()) -> nn.Module:
    """Record on ``converted`` the module it replaces (``without``: submodules that move
    into ``converted`` as they are, left out of the record) and, where the two formats
    differ, make its state_dict speak the original's."""
    renames = _renames(original, converted)
    converted.__dict__[_ORIGINAL] = _Original(_skeleton(original, without), renames)
    if renames:
        converted.register_state_dict_post_hook(_save_in_original_format)
        converted.register_load_state_dict_pre_hook(_load_from_original_format)
    return converted


def _renames(original: nn.Module, converted: nn.Module) -> tuple[tuple[str, str], ...]:
    """The converted module's submodules that ``original`` names otherwise (see SELayout)."""
    layout = _se_layout(original)
    if layout is None:  # this package's blocks, norms, activations, residual blocks
        return ()
    if layout.fc2 is None:
        return (("fc", layout.fc1),)
    norm = (("bn", layout.norm),) if isinstance(converted, FusedSEWithNorm) else ()
    return (("branches.0", layout.fc1), *norm, ("excite", layout.fc2))


def _skeleton(module: nn.Module, without: Iterable[nn.Module] = ()) -> nn.Module:
    """A copy of ``module`` with every tensor on the meta device, and None for the
    submodules in ``without``: no tensor is copied."""
    memo: dict[int, object] = {id(m): None for m in without}
    for t in itertools.chain(module.parameters(), module.buffers()):
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(module, memo)


def _save_in_original_format(module: nn.Module, state_dict: dict, prefix: str,
                             local_metadata: dict) -> None:
    """state_dict post-hook: the module's entries (the last ones written, so the model's
    order stays the original's) under the original's names and shapes."""
    replaced = module.__dict__[_ORIGINAL]
    for key in [key for key in state_dict if key.startswith(prefix)]:
        name, value = replaced.original_entry(key[len(prefix):], state_dict.pop(key))
        state_dict[prefix + name] = value


def _load_from_original_format(module: nn.Module, state_dict: dict, prefix: str,
                               local_metadata: dict, strict: bool, missing_keys: list,
                               unexpected_keys: list, error_msgs: list) -> None:
    """load_state_dict pre-hook: entries in the original's format as the module's own."""
    replaced = module.__dict__[_ORIGINAL]
    for key in [key for key in state_dict if key.startswith(prefix)]:
        entry = replaced.converted_entry(key[len(prefix):], state_dict.pop(key))
        if isinstance(entry, str):
            error_msgs.append(f"{prefix}{entry}")
        else:
            state_dict[prefix + entry[0]] = entry[1]


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
        return (isinstance(m, (FusedSaE, FusedEffectiveSE, nn.Conv2d, AbsorbedNorm, AbsorbedAct))
                or _norm_class(m) is not None
                or _activation_name(m, ACTIVATION_CLASSES) is not None
                or any(_is(m, q) for q in (*IDENTITY_CLASSES, *FRESH_OUTPUT_CLASSES))
                or next(m.children(), None) is None)


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
    absorbed = _keep_original(AbsorbedNorm(norm, act, act_module), norm)
    parent.set_submodule(norm_node.target, absorbed)
    if act_node is not None:
        act_target = parent.get_submodule(act_node.target)
        parent.set_submodule(act_node.target,
                             _keep_original(AbsorbedAct(absorbed, act_target), act_target))
    se.absorb_prologue(absorbed)
    return True, f"{norm_node.target} (BatchNorm{' + ' + act if act != 'none' else ''})"


def _reuse_inputs(model: nn.Module, report: ConversionReport) -> None:
    """Let each fused SE of ``model`` whose x is a fresh tensor that only it reads write
    its output over x; note each in ``report``."""
    entries = {c.path: i for i, c in enumerate(report.converted)}
    for parent_path, parent in list(model.named_modules()):
        graph = None
        for name, child in parent.named_children():
            path = f"{parent_path}.{name}" if parent_path else name
            if path not in entries or not child.can_overwrite_input:
                continue
            if graph is None:
                try:
                    graph = _LeafTracer().trace(parent)
                except Exception:  # control flow fx cannot follow: nothing is proven
                    break
            producers = _input_producers(parent, name, graph)
            if producers:
                child.overwrite_input_of(parent.get_submodule(t) for t in producers)
                i = entries[path]
                report.converted[i] = dataclasses.replace(report.converted[i],
                                                          overwrites=producers[0])


def _input_producers(parent: nn.Module, se_name: str, graph: torch.fx.Graph) -> list[str]:
    """The targets (in ``parent``) of the module whose new tensor is the x of
    ``parent.<se_name>`` and of the modules handing it on, where nothing else reads any of
    their outputs; else none."""
    se_calls = [n for n in graph.nodes if n.op == "call_module" and n.target == se_name]
    if len(se_calls) != 1 or not se_calls[0].args:
        return []
    se_call = se_calls[0]

    def module_of(node) -> nn.Module | None:
        is_call = isinstance(node, torch.fx.Node) and node.op == "call_module"
        return parent.get_submodule(node.target) if is_call else None

    chain, node = [], se_call.args[0]
    while isinstance(m := module_of(node), (AbsorbedNorm, AbsorbedAct)) or (
            m is not None and (any(_is(m, q) for q in IDENTITY_CLASSES)
                               or _activation_name(m, ACTIVATION_CLASSES) is not None)):
        chain.append(node)
        node = node.args[0]
    if (m := module_of(node)) is None or not any(_is(m, q) for q in FRESH_OUTPUT_CLASSES):
        return []
    chain.append(node)
    others = [*se_call.args[1:], *se_call.kwargs.values()]
    if any(len(n.users) != 1 or n in others for n in chain):
        return []
    return [n.target for n in reversed(chain)]


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
    classes of ``*_SE_LAYOUTS``; None for any other module."""
    layout = _se_layout(module)
    if layout is None:
        return None
    if getattr(module, "add_maxpool", False):  # timm's SEModule and EffectiveSEModule
        return layout.variant, "add_maxpool=True mixes in a max pool"
    pool = getattr(module, "avgpool", None)  # torchvision's
    if pool is not None and not (isinstance(pool, nn.AdaptiveAvgPool2d)
                                 and _is_one(pool.output_size)):
        return layout.variant, "the pool is not a global average pool"

    def part(name: str | None) -> nn.Module | None:
        return getattr(module, name) if name else None

    norm = part(layout.norm)
    if isinstance(norm, nn.Identity):
        norm = None
    return layout.variant, _Block(part(layout.fc1), part(layout.fc2), part(layout.act),
                                  part(layout.gate), norm)


def _se_layout(module: nn.Module) -> SELayout | None:
    """The layout of ``module``'s SE class, or None for a module of no class there."""
    for qualname, layout in _SE_LAYOUTS.items():
        if _is(module, qualname):
            return layout
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
    elif (block.fc1.bias is None) != (block.fc2.bias is None):
        return "one FC has a bias and the other none (a fused block has both or neither)"
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
    """A fused block with the block's weights, device, dtype and frozen parameters (a
    BatchNorm between fc1 and the activation taken over as it is)."""
    gate = _activation_name(block.gate, GATE_CLASSES)
    k, c = block.fc1.weight.shape[:2]
    bias = block.fc1.bias is not None
    if block.fc2 is None:
        fused = FusedEffectiveSE(c, gate, bias=bias, backend=backend)
        pairs = ((fused.fc, block.fc1),)
    else:
        act = _activation_name(block.act, ACTIVATION_CLASSES)
        if block.norm is None:
            fused = FusedSE(c, rd_channels=k, act=act, gate=gate, bias=bias, backend=backend)
        else:
            fused = FusedSEWithNorm(c, k, block.norm, act=act, gate=gate, bias=bias,
                                    backend=backend)
        pairs = ((fused.branches[0], block.fc1), (fused.excite, block.fc2))
    fused = fused.to(block.fc1.weight.device, block.fc1.weight.dtype)
    with torch.no_grad():
        for new, old in pairs:
            new.weight.copy_(old.weight[:, :, 0, 0])
            if bias:
                new.bias.copy_(old.bias)
            new.requires_grad_(old.weight.requires_grad)  # frozen stays frozen
    return fused


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
