"""FLOPs of the fused operator, registered with ``torch.utils.flop_counter``.

``FlopCounterMode`` counts matrix products (2 * M * N * K each) and nothing elementwise.
The formulas here count the same products inside the custom ops, so a model holding
fused blocks reports what its reference counterpart reports rather than 0.
"""

import torch
from torch.utils.flop_counter import flop_registry, register_flop_formula

from .cost import fc_flops


def _sae_forward(x, fc1_weight, fc1_bias, fc2_weight, *args, out_shape=None, **kwargs) -> int:
    return fc_flops(x[0], x[1], fc1_weight[0], fc2_weight is None)


def _sae_backward(grad, x, relu_mask, fc1_weight, fc2_weight, *args, out_shape=None,
                  **kwargs) -> int:
    # dh and dz run in the kernels; ops.py computes the weight gradients as aten.mm,
    # which the counter sees by itself
    return fc_flops(x[0], x[1], fc1_weight[0], fc2_weight is None)


def _cpu_forward(x, fc1_weights, fc1_biases, fc2_weight, *args, out_shape=None, **kwargs) -> int:
    return fc_flops(x[0], x[1], sum(w[0] for w in fc1_weights), fc2_weight is None)


def _cpu_excite(z, fc1_weights, fc1_biases, fc2_weight, *args, out_shape=None, **kwargs) -> int:
    return fc_flops(z[0], z[1], sum(w[0] for w in fc1_weights), fc2_weight is None)


def _cpu_backward(grad, x, y, fc1_weights, fc2_weight, *args, out_shape=None, **kwargs) -> int:
    # dh, dz and the weight gradients, all in C++
    return 2 * fc_flops(x[0], x[1], sum(w[0] for w in fc1_weights), fc2_weight is None)


def register(namespace: str) -> None:
    """Registers the formulas of the ops of ``namespace`` ("triton" or "cpu"), once."""
    ops = torch.ops.sae_kernels
    formulas = ({ops.sae_forward: _sae_forward, ops.sae_backward: _sae_backward}
                if namespace == "triton" else
                {ops.cpu_sae: _cpu_forward, ops.cpu_sae_: _cpu_forward,
                 ops.cpu_forward: _cpu_forward,
                 ops.cpu_backward: _cpu_backward, ops.cpu_excite: _cpu_excite})
    for op, formula in formulas.items():
        if op not in flop_registry:
            register_flop_formula(op)(formula)
