"""What the C++ ops compute, in PyTorch: their fake kernels and their stand-ins.

The fake kernels give the outputs' shapes, dtypes and layouts, symbolic in every size
(torch.export, torch.compile and saved graphs trace with them, no library needed). The
stand-ins compute the ops where the C++ library is not loaded (``cpu.py`` says when):
the forward in the accumulation dtype, the backward by the same formulas as
csrc/backward.cpp, written with ATen's own derivative ops. Arguments as in
csrc/schemas.h.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..layout import output_like
from ..options import (
    ACTIVATIONS,
    GATES,
    OUTPUT_ACTIVATIONS,
    PROLOGUE_ACTIVATIONS,
    accumulation_dtype,
    check_operands,
)
from ..reference import TORCH_ACTIVATIONS, TORCH_GATES, prologue

aten = torch.ops.aten


def forward_fake(x: Tensor, fc1_weights: list[Tensor], fc1_biases: list[Tensor],
                 fc2_weight: Tensor | None, fc2_bias: Tensor | None, identity: Tensor | None,
                 act: int, gate: int, residual: bool, relu_out: bool,
                 prologue_scale: Tensor | None = None, prologue_shift: Tensor | None = None,
                 prologue_act: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _check_operands(x, fc1_weights, fc1_biases, fc2_weight, fc2_bias, identity, act, gate,
                    relu_out, prologue_scale, prologue_shift, prologue_act)
    n, c = x.shape[:2]
    k = sum(w.shape[0] for w in fc1_weights)
    acc = accumulation_dtype(x.dtype)
    return (output_like(x), x.new_empty((n, c), dtype=acc), x.new_empty((n, k), dtype=acc),
            x.new_empty((n, c), dtype=acc))


def _check_operands(x, fc1_weights, fc1_biases, fc2_weight, fc2_bias, identity, act, gate,
                    relu_out, prologue_scale, prologue_shift, prologue_act) -> None:
    """``options.check_operands`` on the ops' arguments, the branches read as their stack."""
    if not fc1_weights:
        raise ValueError("fc1_weights must hold at least one matrix")
    codes = {"act": (act, ACTIVATIONS), "gate": (gate, GATES),
             "prologue_act": (prologue_act, PROLOGUE_ACTIVATIONS)}
    for name, (code, names) in codes.items():
        if not 0 <= code < len(names):
            raise ValueError(f"{name} code {code} is not one of 0..{len(names) - 1}")
    fc1_weight, fc1_bias = fc1_weights[0], fc1_biases[0] if fc1_biases else None
    if len(fc1_weights) > 1:
        def kind(w):
            return w.dim(), w.shape[-1], w.device, w.dtype
        if any(kind(w) != kind(fc1_weight) for w in fc1_weights):
            raise ValueError("the fc1_weights must share their column count, device and dtype")
        fc1_weight = fc1_weight.new_empty((sum(w.shape[0] for w in fc1_weights),
                                           fc1_weight.shape[-1]))
        fc1_bias = fc1_weight.new_empty((fc1_weight.shape[0],)) if fc1_biases else None
    check_operands(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, identity, ACTIVATIONS[act],
                   GATES[gate], OUTPUT_ACTIVATIONS[relu_out], prologue_scale, prologue_shift,
                   PROLOGUE_ACTIVATIONS[prologue_act])


def sae_fake(*args) -> Tensor:
    return forward_fake(*args)[0]


def backward_fake(grad: Tensor, x: Tensor, y: Tensor | None, fc1_weights: list[Tensor],
                  fc2_weight: Tensor | None, z: Tensor, p: Tensor, u: Tensor, act: int,
                  gate: int, residual: bool, relu_out: bool, has_identity: bool,
                  prologue_scale: Tensor | None = None, prologue_shift: Tensor | None = None,
                  prologue_act: int = 0, prologue_grads: bool = False):
    d_identity = output_like(x) if has_identity and relu_out else x.new_empty((0,))
    with_prologue_grads = prologue_grads and (prologue_scale is not None
                                              or prologue_shift is not None)
    d_prologue = u.new_empty((x.shape[1] if with_prologue_grads else 0,))
    if fc2_weight is None:
        dw2, db2 = u.new_empty((0,)), u.new_empty((0,))
    else:
        dw2, db2 = torch.empty_like(fc2_weight), u.new_empty((fc2_weight.shape[0],))
    return (output_like(x), d_identity, [torch.empty_like(w) for w in fc1_weights],
            [p.new_empty((w.shape[0],)) for w in fc1_weights], dw2, db2, d_prologue,
            torch.empty_like(d_prologue))


def _output_format(x: Tensor) -> torch.memory_format:
    """The memory format of ``layout.output_like(x)`` for NCHW and channels_last x (read
    from the strides: an empty x is contiguous in every format)."""
    return torch.channels_last if x.shape[1] > 1 and x.stride(1) == 1 else torch.contiguous_format


def forward(x: Tensor, fc1_weights: list[Tensor], fc1_biases: list[Tensor],
            fc2_weight: Tensor | None, fc2_bias: Tensor | None, identity: Tensor | None,
            act: int, gate: int, residual: bool, relu_out: bool,
            prologue_scale: Tensor | None = None, prologue_shift: Tensor | None = None,
            prologue_act: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """y, z, p, u as cpu_forward returns them; differentiable (the stand-in of cpu_sae
    runs it under autograd)."""
    acc = accumulation_dtype(x.dtype)
    xp = prologue(x.to(acc), prologue_scale, prologue_shift, PROLOGUE_ACTIVATIONS[prologue_act])
    z = xp.mean(dim=(2, 3))
    p, u = _fcs(z, fc1_weights, fc1_biases, fc2_weight, fc2_bias, act)
    s = TORCH_GATES[GATES[gate]](u)[:, :, None, None]
    out = xp + xp * s if residual else xp * s
    if identity is not None:
        out = out + identity.to(acc)
    if relu_out:
        out = F.relu(out)
    # out-of-place and differentiable: it also serves as a decomposition
    return out.to(x.dtype).contiguous(memory_format=_output_format(x)), z, p, u


def sae(*args) -> Tensor:
    return forward(*args)[0]


def sae_in_place(x: Tensor, *args) -> None:
    """cpu_sae_: y written over x, where no gradient is due (as the C++ op refuses)."""
    tensors = [t for a in (x, *args) for t in (a if isinstance(a, list) else [a])
               if isinstance(t, Tensor)]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        raise RuntimeError("sae_kernels::cpu_sae_ writes y over x and records no gradient, but "
                           "an operand requires grad: call sae_kernels::cpu_sae where a "
                           "gradient is due")
    with torch.no_grad():
        x.copy_(sae(x, *args))


def sae_in_place_fake(x: Tensor, *args) -> None:
    sae_fake(x, *args)


def _fcs(z: Tensor, fc1_weights: list[Tensor], fc1_biases: list[Tensor],
         fc2_weight: Tensor | None, fc2_bias: Tensor | None, act: int) -> tuple[Tensor, Tensor]:
    """p = W1 z + b1 and the gate's input u (W2 act(p) + b2, or p itself without fc2), in
    z's dtype (the accumulation dtype)."""
    fc1_bias = torch.cat(list(fc1_biases)).to(z.dtype) if fc1_biases else None
    p = F.linear(z, torch.cat(list(fc1_weights)).to(z.dtype), fc1_bias)
    if fc2_weight is None:
        return p, p
    fc2_bias = None if fc2_bias is None else fc2_bias.to(z.dtype)
    return p, F.linear(TORCH_ACTIVATIONS[ACTIVATIONS[act]](p), fc2_weight.to(z.dtype), fc2_bias)


def excite_fake(z: Tensor, fc1_weights: list[Tensor], fc1_biases: list[Tensor],
                fc2_weight: Tensor | None, fc2_bias: Tensor | None, act: int,
                gate: int) -> Tensor:
    if z.dim() != 2:
        raise ValueError(f"z must be 2-D (N, C), got {z.dim()}-D shape {tuple(z.shape)}")
    _check_operands(z[:, :, None, None], fc1_weights, fc1_biases, fc2_weight, fc2_bias, None,
                    act, gate, False, None, None, 0)
    return z.new_empty(z.shape)


def excite(z: Tensor, fc1_weights: list[Tensor], fc1_biases: list[Tensor],
           fc2_weight: Tensor | None, fc2_bias: Tensor | None, act: int, gate: int) -> Tensor:
    """s as cpu_excite returns it, computed in the accumulation dtype."""
    _, u = _fcs(z.to(accumulation_dtype(z.dtype)), fc1_weights, fc1_biases, fc2_weight,
                fc2_bias, act)
    return TORCH_GATES[GATES[gate]](u).to(z.dtype)


def _activation_backward(grad: Tensor, pre: Tensor, name: str) -> Tensor:
    """grad * act'(pre), by the op autograd itself uses for ``act``."""
    if name == "relu":
        return aten.threshold_backward(grad, pre, 0)
    if name == "silu":
        return aten.silu_backward(grad, pre)
    if name == "hardswish":
        return aten.hardswish_backward(grad, pre)
    return aten.gelu_backward(grad, pre)


def backward(grad: Tensor, x: Tensor, y: Tensor | None, fc1_weights: list[Tensor],
             fc2_weight: Tensor | None, z: Tensor, p: Tensor, u: Tensor, act: int, gate: int,
             residual: bool, relu_out: bool, has_identity: bool,
             prologue_scale: Tensor | None = None, prologue_shift: Tensor | None = None,
             prologue_act: int = 0, prologue_grads: bool = False):
    """The gradients cpu_backward returns, from what the forward saved."""
    acc = accumulation_dtype(x.dtype)
    hw = x.shape[2] * x.shape[3]
    pre = prologue(x.to(acc), prologue_scale, prologue_shift, "none")
    prologue_name = PROLOGUE_ACTIVATIONS[prologue_act]
    xp = prologue(pre, None, None, prologue_name)
    d_out = grad.to(acc)
    if relu_out:
        d_out = aten.threshold_backward(d_out, y.to(acc), 0)
    s = TORCH_GATES[GATES[gate]](u)
    ds = (d_out * xp).sum(dim=(2, 3))
    du = (aten.sigmoid_backward(ds, s) if GATES[gate] == "sigmoid"
          else aten.hardsigmoid_backward(ds, u))
    w1 = torch.cat(list(fc1_weights)).to(acc)
    if fc2_weight is None:
        dp = du
    else:
        dp = _activation_backward(du @ fc2_weight.to(acc), p, ACTIVATIONS[act])
    dz = dp @ w1
    d_xp = d_out * (s + 1 if residual else s)[:, :, None, None] + (dz / hw)[:, :, None, None]
    d_pre = _activation_backward(d_xp, pre, prologue_name) if prologue_act else d_xp
    dx = output_like(x)
    dx.copy_(d_pre * prologue_scale.to(acc)[:, None, None] if prologue_scale is not None
             else d_pre)
    if has_identity and relu_out:
        d_identity = output_like(x)
        d_identity.copy_(d_out)
    else:
        d_identity = x.new_empty((0,))
    with_prologue_grads = prologue_grads and (prologue_scale is not None
                                              or prologue_shift is not None)
    channels = x.shape[1] if with_prologue_grads else 0
    d_scale, d_shift = u.new_zeros((channels,)), u.new_zeros((channels,))
    if with_prologue_grads:
        d_scale = (d_pre * x.to(acc)).sum(dim=(0, 2, 3))
        d_shift = d_pre.sum(dim=(0, 2, 3))
    rows = [w.shape[0] for w in fc1_weights]
    dw1 = [g.to(w.dtype) for g, w in zip((dp.T @ z).split(rows), fc1_weights, strict=True)]
    db1 = list(dp.sum(0).split(rows))
    if fc2_weight is None:
        dw2, db2 = u.new_empty((0,)), u.new_empty((0,))
    else:
        h = TORCH_ACTIVATIONS[ACTIVATIONS[act]](p)
        dw2, db2 = (du.T @ h).to(fc2_weight.dtype), du.sum(0)
    return dx, d_identity, dw1, db1, dw2, db2, d_scale, d_shift
