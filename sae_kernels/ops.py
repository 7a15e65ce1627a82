"""The fused operator registered with torch.library: custom ops, fake kernels, autograd.

``sae_kernels::sae_forward`` returns y plus what the backward needs (z, p, u and, under
``save_relu_mask``, the ReLU tail's mask of ``layout.relu_mask``; non-differentiable).
``sae_kernels::sae_backward`` returns dx, d_identity (ReLU tail only), du, dp and the
gradients of the prologue's scale and shift (when asked for); the weight gradients are
two (K x N)(N x C)-sized matmuls over the batch done here, deterministic by construction.
``fc2_weight=None`` is the single-FC form (see ``options.check_operands``); the prologue
tensors are optional, ``prologue_act`` is a name of ``options.PROLOGUE_ACTIVATIONS``.
"""


import torch
from torch import Tensor

from . import flops
from .kernels import sae_triton
from .layout import output_like, relu_mask
from .options import accumulation_dtype
from .reference import TORCH_ACTIVATIONS

#: The kernels read every tensor through its strides and return y in x's layout: under
#: torch.compile, inputs stay in the layout inductor chose (channels_last around its
#: convolutions) instead of being copied to the layout eager would have had.
_TAGS = (torch.Tag.flexible_layout,)


@torch.library.custom_op("sae_kernels::sae_forward", mutates_args=(), tags=_TAGS)
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
    prologue_scale: Tensor | None = None,
    prologue_shift: Tensor | None = None,
    prologue_act: str = "none",
    save_relu_mask: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    sae_triton.check_device(x.device)
    return sae_triton.forward(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, identity,
                              act, gate, residual, act_out, strategy, prologue_scale,
                              prologue_shift, prologue_act, save_relu_mask)


@sae_forward.register_fake
def _sae_forward_fake(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, identity, act, gate,
                      residual, act_out, strategy, prologue_scale=None, prologue_shift=None,
                      prologue_act="none", save_relu_mask=False):
    n, c = x.shape[:2]
    acc = accumulation_dtype(x.dtype)
    mask = relu_mask(x, act_out == "relu" and save_relu_mask)
    return (output_like(x), x.new_empty((n, c), dtype=acc),
            x.new_empty((n, fc1_weight.shape[0]), dtype=acc), x.new_empty((n, c), dtype=acc),
            mask)


@torch.library.custom_op("sae_kernels::sae_backward", mutates_args=(), tags=_TAGS)
def sae_backward(
    grad: Tensor,
    x: Tensor,
    relu_mask: Tensor | None,
    fc1_weight: Tensor,
    fc2_weight: Tensor | None,
    p: Tensor,
    u: Tensor,
    act: str,
    gate: str,
    residual: bool,
    act_out: str,
    has_identity: bool,
    prologue_scale: Tensor | None = None,
    prologue_shift: Tensor | None = None,
    prologue_act: str = "none",
    prologue_grads: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    sae_triton.check_device(x.device)
    return sae_triton.backward(grad, x, relu_mask, fc1_weight, fc2_weight, p, u, act, gate,
                               residual, act_out, has_identity, prologue_scale, prologue_shift,
                               prologue_act, prologue_grads)


@sae_backward.register_fake
def _sae_backward_fake(grad, x, relu_mask, fc1_weight, fc2_weight, p, u, act, gate, residual,
                       act_out, has_identity, prologue_scale=None, prologue_shift=None,
                       prologue_act="none", prologue_grads=False):
    d_identity = output_like(x) if has_identity and act_out == "relu" else x.new_empty((0,))
    d_prologue = u.new_empty((2, x.shape[1]) if prologue_grads else (0,))
    return output_like(x), d_identity, torch.empty_like(u), torch.empty_like(p), d_prologue


def _setup_context(ctx, inputs, output) -> None:
    x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, identity = inputs[:6]
    (act, gate, residual, act_out, _strategy, prologue_scale, prologue_shift, prologue_act,
     _save_relu_mask) = inputs[6:]
    _y, z, p, u, mask = output
    ctx.mark_non_differentiable(z, p, u, mask)
    ctx.save_for_backward(x, fc1_weight, fc2_weight, z, p, u, mask if act_out == "relu" else None,
                          prologue_scale, prologue_shift)
    ctx.options = (act, gate, residual, act_out, prologue_act)
    ctx.bias_dtypes = tuple(b.dtype if b is not None else None for b in (fc1_bias, fc2_bias))
    ctx.has_identity = identity is not None
    ctx.num_inputs = len(inputs)


def _backward(ctx, grad_y, _grad_z, _grad_p, _grad_u, _grad_mask):
    x, fc1_weight, fc2_weight, z, p, u, mask, prologue_scale, prologue_shift = ctx.saved_tensors
    act, gate, residual, act_out, prologue_act = ctx.options
    # the dispatcher drops trailing arguments left at their defaults (the prologue's Nones)
    # from the inputs autograd sees: they need no gradient
    need = ctx.needs_input_grad + (False,) * (ctx.num_inputs - len(ctx.needs_input_grad))
    dx, d_identity, du, dp, d_prologue = sae_backward(
        grad_y, x, mask, fc1_weight, fc2_weight, p, u, act, gate, residual, act_out,
        ctx.has_identity, prologue_scale, prologue_shift, prologue_act, need[11] or need[12])
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
    d_scale = d_prologue[0].to(prologue_scale.dtype) if need[11] else None
    d_shift = d_prologue[1].to(prologue_shift.dtype) if need[12] else None
    return ((dx if need[0] else None), dw1, db1, dw2, db2, d_identity, None, None, None, None,
            None, d_scale, d_shift, None, None)


sae_forward.register_autograd(_backward, setup_context=_setup_context)
flops.register("triton")
