"""The fused operator registered with torch.library: custom ops, fake kernels, autograd.

``sae_kernels::sae_forward`` returns y plus the small tensors the backward needs
(z, p, u; non-differentiable). ``sae_kernels::sae_backward`` returns dx, d_identity
(ReLU tail only), du and dp; the weight gradients are two (K x N)(N x C)-sized
matmuls over the batch done here, deterministic by construction. ``fc2_weight=None`` is
the single-FC form (see ``options.check_operands``).
"""


import torch
from torch import Tensor

from . import flops
from .kernels import sae_triton
from .layout import output_like
from .options import accumulation_dtype
from .reference import TORCH_ACTIVATIONS


@torch.library.custom_op("sae_kernels::sae_forward", mutates_args=())
def sae_forward(
    x: Tensor,
    fc1_weight: Tensor,
    fc1_bias: Tensor | None,
    fc2_weight: Tensor | None,
    fc2_bias: Tensor | None,
    identity: Tensor | None,
    act: str,
    gate: str,
    residual: bool,
    act_out: str,
    strategy: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    sae_triton.check_device(x.device)
    return sae_triton.forward(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, identity,
                              act, gate, residual, act_out, strategy)


@sae_forward.register_fake
def _sae_forward_fake(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, identity, act, gate,
                      residual, act_out, strategy):
    n, c = x.shape[:2]
    acc = accumulation_dtype(x.dtype)
    return (output_like(x), x.new_empty((n, c), dtype=acc),
            x.new_empty((n, fc1_weight.shape[0]), dtype=acc), x.new_empty((n, c), dtype=acc))


@torch.library.custom_op("sae_kernels::sae_backward", mutates_args=())
def sae_backward(
    grad: Tensor,
    x: Tensor,
    y: Tensor | None,
    fc1_weight: Tensor,
    fc2_weight: Tensor | None,
    p: Tensor,
    u: Tensor,
    act: str,
    gate: str,
    residual: bool,
    act_out: str,
    has_identity: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    sae_triton.check_device(x.device)
    return sae_triton.backward(grad, x, y, fc1_weight, fc2_weight, p, u, act, gate, residual,
                               act_out, has_identity)


@sae_backward.register_fake
def _sae_backward_fake(grad, x, y, fc1_weight, fc2_weight, p, u, act, gate, residual, act_out,
                       has_identity):
    d_identity = output_like(x) if has_identity and act_out == "relu" else x.new_empty((0,))
    return output_like(x), d_identity, torch.empty_like(u), torch.empty_like(p)


def _setup_context(ctx, inputs, output) -> None:
    x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, identity = inputs[:6]
    act, gate, residual, act_out = inputs[6:10]
    y, z, p, u = output
    ctx.mark_non_differentiable(z, p, u)
    ctx.save_for_backward(x, fc1_weight, fc2_weight, z, p, u, y if act_out == "relu" else None)
    ctx.options = (act, gate, residual, act_out)
    ctx.bias_dtypes = tuple(b.dtype if b is not None else None for b in (fc1_bias, fc2_bias))
    ctx.has_identity = identity is not None


def _backward(ctx, grad_y, _grad_z, _grad_p, _grad_u):
    x, fc1_weight, fc2_weight, z, p, u, y = ctx.saved_tensors
    act, gate, residual, act_out = ctx.options
    dx, d_identity, du, dp = sae_backward(grad_y, x, y, fc1_weight, fc2_weight, p, u, act, gate,
                                          residual, act_out, ctx.has_identity)
    need = ctx.needs_input_grad
    dw1 = (dp.T @ z).to(fc1_weight.dtype) if need[1] else None
    db1 = dp.sum(0).to(ctx.bias_dtypes[0]) if need[2] else None
    single_fc = fc2_weight is None
    dw2 = None if single_fc or not need[3] else (du.T @ TORCH_ACTIVATIONS[act](p)).to(
        fc2_weight.dtype)
    db2 = du.sum(0).to(ctx.bias_dtypes[1]) if need[4] else None
    if not need[5]:
        d_identity = None
    elif act_out != "relu":
        d_identity = grad_y
    return (dx if need[0] else None), dw1, db1, dw2, db2, d_identity, None, None, None, None, None


sae_forward.register_autograd(_backward, setup_context=_setup_context)
flops.register("triton")
