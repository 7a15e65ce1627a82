"""Swap-in modules: the reference blocks' parameters, the fused operator's forward."""

import warnings
from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

from .dispatch import check_backend, check_strategy, cpu_op_for, may_reuse_computed_tensors
from .functional import sae
from .options import ACTIVATIONS, GATES, PROLOGUE_ACTIVATIONS
from .prologue import AbsorbedNorm
from .reference import EffectiveSE, SaE


class _Prologue:
    """What a fused block needs to apply an absorbed normalisation as its prologue."""

    #: the AbsorbedNorm whose output this block consumes; None: no prologue
    prologue_norm: AbsorbedNorm | None = None

    def absorb_prologue(self, norm: AbsorbedNorm) -> None:
        """Apply ``norm`` (and its activation) to x in this block's own passes whenever
        ``norm`` passes x through. ``norm`` stays where it is in the model (and in the
        state_dict); this block only reads it."""
        if not isinstance(norm, AbsorbedNorm):
            raise TypeError(f"expected an AbsorbedNorm, got {type(norm).__name__}")
        self.__dict__["prologue_norm"] = norm  # not a submodule: no second state_dict entry

    def prologue_operands(self) -> tuple[torch.Tensor | None, torch.Tensor | None, str]:
        """The operator's prologue arguments now: (scale, shift, act) while the norm is
        absorbed, else none."""
        norm = self.prologue_norm
        if norm is None or not norm.absorbed:
            return None, None, "none"
        return (*norm.scale_shift(), norm.act)


class _InputReuse:
    """Where a block may write its output over its input x, as ``ReLU(inplace=True)``
    does: ``convert`` lets it where x is the new tensor of a convolution or a norm that
    nothing but this block reads, handed on by the modules between them (activations,
    absorbed norms, identities). Then an inference call on the C++ CPU op (no gradient
    recorded, x dense) allocates no output: in eager networks the allocator's page faults
    for a new output, and the cache lines of a second buffer, cost more than the op's
    arithmetic. Never while a forward hook or pre-hook, on this block, on one of those
    modules or global, could hold x."""

    #: the module whose new tensor is this block's x, then the modules that hand it on;
    #: empty: x is never overwritten
    input_producers: tuple[nn.Module, ...] = ()
    #: whether the forward writes over x where it may (a subclass that computes through
    #: other means says no, and convert leaves its x alone)
    can_overwrite_input = True

    def overwrite_input_of(self, producers: Iterable[nn.Module]) -> None:
        """Let inference calls write y over x, the output of ``producers`` (see above);
        an empty ``producers`` turns it off."""
        self.__dict__["input_producers"] = tuple(producers)  # not submodules

    def _may_overwrite_input(self) -> bool:
        """Whether this call may write y over x (the op then decides by grad mode and
        layout): producers are set and no hook could hold x. Not asked under torch.compile,
        which traces the composite (and would guard on every hook dict read here)."""
        producers = self.input_producers
        if not producers or torch.compiler.is_compiling():
            return False
        if _global_forward_hooks or _global_forward_pre_hooks:
            return False
        if self._forward_hooks or self._forward_pre_hooks:
            return False
        for module in producers:
            if module._forward_hooks or module._forward_pre_hooks:
                return False
        return True


class _ModelTransforms:
    """How torch's model-wide transforms treat a fused block.

    Eager-mode quantization (``torch.ao.quantization``: ``quantize_dynamic``, ``prepare``)
    hands every module a ``qconfig``. A fused block's stays None and it sets its submodules'
    to None, with a warning: the fused operator computes with float weights, so the block
    stays in float (its FCs are not swapped for quantized modules it could not call) while
    the rest of the model is quantized as configured. TorchScript cannot compile the
    forward, which picks the backend in Python: ``torch.jit.script`` raises an error saying
    so and naming what captures the block instead.
    """

    @property
    def qconfig(self) -> None:
        """Always None: eager-mode quantization leaves the block in float."""
        return None

    @qconfig.setter
    def qconfig(self, qconfig) -> None:
        for module in self.modules():
            if module is not self:
                module.qconfig = None
        warnings.warn(f"{type(self).__name__} stays in float under torch.ao.quantization: the "
                      "fused operator computes with float weights", stacklevel=2)

    @qconfig.deleter
    def qconfig(self) -> None:
        """Nothing to clear (quantization clears every module's qconfig when it is done)."""

    def __prepare_scriptable__(self):
        raise NotImplementedError(
            f"{type(self).__name__} cannot be compiled by torch.jit.script: its forward picks "
            "the backend in Python and calls the C++ operator with arguments TorchScript cannot "
            "type. Capture the model with torch.jit.trace(model, example_inputs) or "
            "torch.export.export(model, example_args), which record the fused operator, or "
            "script the original blocks: sae_kernels.revert(model).")


class FusedSaE(_ModelTransforms, _Prologue, _InputReuse, SaE):
    """Drop-in for :class:`~sae_kernels.reference.SaE`: same arguments, parameters and
    state_dict, forward through the fused operator.

    Extra args:
        backend: ``"auto"``, ``"triton"`` or ``"reference"`` (see ``dispatch``).
        strategy: Triton launch strategy, ``"auto"``, ``"single"`` or ``"split"``.
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
        backend: str = "auto",
        strategy: str = "auto",
    ) -> None:
        super().__init__(channels, reduction, cardinality, act, gate, bias, residual, rd_channels,
                         act_out)
        self.backend = check_backend(backend)
        self.strategy = check_strategy(strategy)
        self._fc1_cache: tuple | None = None
        # arguments of the C++ op after the tensors, for the direct CPU path
        self._cpu_options = (ACTIVATIONS.index(self.act), GATES.index(self.gate), self.residual,
                             self.act_out == "relu")

    @classmethod
    def from_module(cls, module: SaE, backend: str = "auto", strategy: str = "auto"):
        """A fused copy of a reference block: same config, weights, device, dtype and mode."""
        if not isinstance(module, SaE):
            raise TypeError(f"from_module expects an SaE or SE module, got {type(module).__name__}")
        config = module.config()
        if issubclass(cls, FusedSE):
            if config.pop("cardinality") != 1:
                raise ValueError(f"{cls.__name__} needs a single-branch module, "
                                 f"got cardinality {module.cardinality}")
        weight = module.excite.weight
        fused = cls(**config, backend=backend, strategy=strategy).to(weight.device, weight.dtype)
        fused.load_state_dict(module.state_dict())
        return fused.train(module.training)

    def extra_repr(self) -> str:
        overwrite = ", overwrites_input=True" if self.input_producers else ""
        return (f"{super().extra_repr()}, backend={self.backend}, strategy={self.strategy}"
                f"{overwrite}")

    def _inference_fc1(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Stacked branch weights, concatenated again only when a branch parameter changed
        (its storage or version counter): inference then costs no copy per call."""
        key = tuple((p.data_ptr(), p._version) for p in self.branches.parameters())
        if self._fc1_cache is None or self._fc1_cache[0] != key:
            self._fc1_cache = (key, *self.stacked_fc1())
        return self._fc1_cache[1], self._fc1_cache[2]

    def forward(self, x: torch.Tensor, identity: torch.Tensor | None = None) -> torch.Tensor:
        scale, shift, prologue_act = self.prologue_operands()
        op = cpu_op_for(self.backend, x, self._may_overwrite_input())
        if op is not None:
            # the branch matrices are read in place, through the parameter dicts (a plain
            # loop: half the time of comprehensions on a 1x64x1x1 call)
            weights, biases = [], []
            for branch in self._modules["branches"]._modules.values():
                weights.append(branch._parameters["weight"])
                biases.append(branch._parameters["bias"])
            excite = self._modules["excite"]._parameters
            return op(x, weights, biases if excite["bias"] is not None else [],
                      excite["weight"], excite["bias"], identity, *self._cpu_options, scale,
                      shift, PROLOGUE_ACTIVATIONS.index(prologue_act))
        cached = (self.cardinality > 1 and not torch.is_grad_enabled()
                  and may_reuse_computed_tensors())
        fc1_weight, fc1_bias = self._inference_fc1() if cached else self.branch_fc1()
        return sae(x, fc1_weight, fc1_bias, self.excite.weight, self.excite.bias, identity,
                   act=self.act, gate=self.gate, residual=self.residual, act_out=self.act_out,
                   backend=self.backend, strategy=self.strategy, prologue_scale=scale,
                   prologue_shift=shift, prologue_act=prologue_act)


class FusedSE(FusedSaE):
    """Drop-in for :class:`~sae_kernels.reference.SE` (a single branch)."""

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
        backend: str = "auto",
        strategy: str = "auto",
    ) -> None:
        super().__init__(channels, reduction, 1, act, gate, bias, residual, rd_channels, act_out,
                         backend, strategy)


class FusedEffectiveSE(_ModelTransforms, _Prologue, _InputReuse, EffectiveSE):
    """Drop-in for :class:`~sae_kernels.reference.EffectiveSE` (one C -> C FC and a gate):
    the operator's single-FC form. ``backend`` and ``strategy`` as in :class:`FusedSaE`."""

    def __init__(self, channels: int, gate: str = "hardsigmoid", bias: bool = True,
                 backend: str = "auto", strategy: str = "auto") -> None:
        super().__init__(channels, gate, bias)
        self.backend = check_backend(backend)
        self.strategy = check_strategy(strategy)
        self._gate_code = GATES.index(self.gate)

    @classmethod
    def from_module(cls, module: EffectiveSE, backend: str = "auto", strategy: str = "auto"):
        """A fused copy of a reference block: same config, weights, device, dtype and mode."""
        if not isinstance(module, EffectiveSE):
            raise TypeError(f"from_module expects an EffectiveSE module, got "
                            f"{type(module).__name__}")
        weight = module.fc.weight
        fused = cls(**module.config(), backend=backend, strategy=strategy)
        fused = fused.to(weight.device, weight.dtype)
        fused.load_state_dict(module.state_dict())
        return fused.train(module.training)

    def extra_repr(self) -> str:
        overwrite = ", overwrites_input=True" if self.input_producers else ""
        return (f"{super().extra_repr()}, backend={self.backend}, strategy={self.strategy}"
                f"{overwrite}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fc = self._modules["fc"]._parameters
        scale, shift, prologue_act = self.prologue_operands()
        op = cpu_op_for(self.backend, x, self._may_overwrite_input())
        if op is not None:
            biases = [] if fc["bias"] is None else [fc["bias"]]
            return op(x, [fc["weight"]], biases, None, None, None, 0, self._gate_code, False,
                      False, scale, shift, PROLOGUE_ACTIVATIONS.index(prologue_act))
        return sae(x, fc["weight"], fc["bias"], None, None, gate=self.gate,
                   backend=self.backend, strategy=self.strategy, prologue_scale=scale,
                   prologue_shift=shift, prologue_act=prologue_act)
