"""The fused operator as a function of explicit tensors."""

import contextlib

import torch

from . import ops
from .dispatch import (
    check_strategy,
    cpu_excitation_for,
    cpu_op_for,
    resolve_backend,
    runs_composite,
)
from .options import (
    ACTIVATIONS,
    GATES,
    OUTPUT_ACTIVATIONS,
    PROLOGUE_ACTIVATIONS,
    Fc1,
    check_operands,
    fc1_parts,
    fc1_stacked,
)
from .reference import composite, excitation

#: act_out's index for the ReLU tail (the op takes a flag)
_RELU_OUT = OUTPUT_ACTIVATIONS.index("relu")


def sae(
    x: torch.Tensor,
    fc1_weight: Fc1,
    fc1_bias: Fc1 | None,
    fc2_weight: torch.Tensor | None,
    fc2_bias: torch.Tensor | None,
    identity: torch.Tensor | None = None,
    *,
    act: str = "relu",
    gate: str = "sigmoid",
    residual: bool = False,
    act_out: str = "none",
    backend: str = "auto",
    strategy: str = "auto",
    prologue_scale: torch.Tensor | None = None,
    prologue_shift: torch.Tensor | None = None,
    prologue_act: str = "none",
) -> torch.Tensor:
    """``act_out(x * s [+ x] [+ identity])`` with ``s = gate(W2 act(W1 mean_hw(x) + b1) + b2)``.

    ``fc1_weight`` stacks the branch matrices row-wise (K, C), or is the sequence of the
    branch matrices (``fc1_bias`` then one per matrix), which the C++ kernels and the
    composite read in place (the Triton kernels take them stacked); ``fc2_weight`` is (C, K),
    or None for the single-FC form ``s = gate(W1 mean_hw(x) + b1)`` with W1 (C, C); the
    rules on shapes and dtypes are those of ``options.check_operands``. The prologue,
    ``x = prologue_act(x * prologue_scale + prologue_shift)`` per channel, is applied on
    the fly (a normalisation and activation absorbed into the operator). ``backend``
    and ``strategy`` are described in ``dispatch``. Differentiable in every tensor.

    Autocast casts nothing here, as for batch_norm: the operator runs in x's dtype with
    fp32 accumulation, the weights as they are (fp32 weights with bf16 x are fine), and
    returns x's dtype; the weights' gradients come back in the weights' dtypes.
    """
    operands = (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, identity, act, gate, act_out,
                prologue_scale, prologue_shift, prologue_act)
    check_strategy(strategy)
    op = cpu_op_for(backend, x) if isinstance(x, torch.Tensor) else None
    if op is not None:
        try:
            return op(x, fc1_parts(fc1_weight), fc1_parts(fc1_bias) or [], fc2_weight, fc2_bias,
                      identity, ACTIVATIONS.index(act), GATES.index(gate), residual,
                      OUTPUT_ACTIVATIONS.index(act_out) == _RELU_OUT, prologue_scale,
                      prologue_shift, PROLOGUE_ACTIVATIONS.index(prologue_act))
        except Exception as error:
            failure = error
        # what the op (or an option's index) rejected, in the words of the checks every
        # other backend makes first (outside the handler: no chained traceback); the op's
        # own error where they pass
        check_operands(*operands)
        raise failure
    check_operands(*operands)
    backend = resolve_backend(backend, x.device, x.dtype)
    if backend == "reference" or runs_composite(backend):
        return _composite_in_x_dtype(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, identity,
                                     act, gate, residual, act_out, prologue_scale,
                                     prologue_shift, prologue_act)
    fc1_weight, fc1_bias = fc1_stacked(fc1_weight), fc1_stacked(fc1_bias)
    # the ReLU tail's backward reads a mask the forward writes only where a gradient is due
    tensors = (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, identity, prologue_scale,
               prologue_shift)
    save_relu_mask = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in tensors)
    return ops.sae_forward(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, identity, act, gate,
                           residual, act_out, strategy, prologue_scale, prologue_shift,
                           prologue_act, save_relu_mask)[0]


def _composite_in_x_dtype(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, identity, act, gate,
                          residual, act_out, prologue_scale, prologue_shift, prologue_act
                          ) -> torch.Tensor:
    """The composite under the fused ops' dtype rule (see :func:`sae`): the weights in x's
    dtype, since the composite's FCs take a single dtype, and autocast off, so that it
    casts none of the composite's ops either. It is switched off only where it is on:
    torch.export records the switch as a higher-order op around the call. Its FCs are the
    C++ excitation where ``dispatch.cpu_excitation_for`` says so."""
    def cast(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(x.dtype)

    fc1_weight = [cast(w) for w in fc1_parts(fc1_weight)]
    fc1_bias = None if fc1_bias is None else [cast(b) for b in fc1_parts(fc1_bias)]
    fc2_weight, fc2_bias = cast(fc2_weight), cast(fc2_bias)
    tensors = (x, *fc1_weight, *(fc1_bias or ()), fc2_weight, fc2_bias, identity,
               prologue_scale, prologue_shift)
    excite = cpu_excitation_for(x, tensors) or excitation
    autocast = torch.is_autocast_enabled(x.device.type)
    with torch.autocast(x.device.type, enabled=False) if autocast else contextlib.nullcontext():
        return composite(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, identity, act, gate,
                         residual, act_out, prologue_scale, prologue_shift, prologue_act,
                         excite=excite)
