"""Triton kernels of the fused SE / SaE operator, forward and backward.

Notation (shapes in ``options.check_operands``): x (N, C, H, W) is read as
(N, C, HW) through its strides, so NCHW and channels_last need no copy; K is the
stacked branch width. ``z`` (N, C), ``p`` (N, K) and ``u`` (N, C) are the pooled
means, the pre-activations of the branches and the pre-gate logits, kept in the
accumulation dtype (fp32, fp64 for fp64 inputs) for the backward.

The optional prologue, x' = act(x * a + b) with a per-channel scale a and shift b,
takes the place of x everywhere: it is applied to every tile of x as it is loaded, in
the pool and in the rescale, and never stored. The backward recomputes it the same way.

Forward, ``single`` strategy — one launch, one program per sample:
    pool every channel block (store z) -> p = W1 z + b1 -> u = W2 act(p) + b2
    -> rescale every channel block with the epilogue.
Forward, ``split`` strategy — two launches, for large per-sample maps and small N:
    (a) grid (N, channel blocks, HW splits): each program pools its tile into a
        partial-sum slot; the last program of a sample to arrive (an acq_rel
        counter) sums the slots in a fixed order and runs the excitation;
    (b) grid (N * channel blocks, HW chunks): rescale with the epilogue.
Backward — two launches whatever the strategy:
    (a) the same grid as forward (a) reduces ds = sum_hw g'*x, and the last program
        of each sample runs the excitation backward: du, dp and dz (N-by-C sized);
    (b) dx = g' * scale + dz / HW, and d_identity = g' for the ReLU tail,
    with g' = g * (y > 0) under ``act_out="relu"``. With a prologue, (b) takes that dx
    as dL/dx' on to dx = dL/dx' * act'(v) * a (v = x * a + b), and, when asked, writes
    per-(sample, chunk) partial sums of dL/dv * x and dL/dv: the gradients of a and b
    once summed. Those sums and the weight gradients (two small matmuls) are finished
    over the batch by the caller: no float atomics anywhere, so the same inputs give
    the same bits.

Everything between the loads and the stores runs in the accumulation dtype: values
are upcast right after loading (the interpreter computes wrongly on bf16 bits).
"""

import torch
import triton
import triton.language as tl

from ..dispatch import LaunchPlan, plan_launch, triton_cdiv
from ..layout import is_channels_last, output_like, readable
from ..options import ACTIVATIONS, GATES, PROLOGUE_ACTIVATIONS, accumulation_dtype
from .activations import (
    activation,
    activation_grad,
    gate,
    gate_grad,
    prologue_activation,
    prologue_activation_grad,
)


@triton.jit
def _prologue_columns(prologue_ptr, offs_c, mask_c, C, HAS_PROLOGUE: tl.constexpr):
    """The prologue's scale and shift of the channel block as [BLOCK_C, 1] columns (read
    from the (2, C) operand); placeholders, never used, without a prologue."""
    if HAS_PROLOGUE:
        scale = tl.load(prologue_ptr + offs_c, mask=mask_c, other=1.0)[:, None]
        shift = tl.load(prologue_ptr + C + offs_c, mask=mask_c, other=0.0)[:, None]
    else:
        scale = 1.0
        shift = 0.0
    return scale, shift


@triton.jit
def _load_input(x_ptr, x_sc, x_shw, offs_c, offs_hw, mask, pro_scale, pro_shift,
                HAS_PROLOGUE: tl.constexpr, PROLOGUE_ACT: tl.constexpr, acc_ty: tl.constexpr):
    """A tile of the operator's input: x, or x' = act(x * scale + shift) with a prologue,
    0 where masked off (where act(shift) would not be)."""
    x = tl.load(x_ptr + offs_c[:, None] * x_sc + offs_hw[None, :] * x_shw, mask=mask,
                other=0.0).to(acc_ty)
    if HAS_PROLOGUE:
        x = tl.where(mask, prologue_activation(x * pro_scale + pro_shift, PROLOGUE_ACT), 0.0)
    return x


@triton.jit
def _load_grad(g_ptr, g_sc, g_shw, y_ptr, y_sc, y_shw, offs_c, offs_hw, mask,
               RELU_OUT: tl.constexpr, acc_ty: tl.constexpr):
    """g' = dL/dy, zeroed where the ReLU tail clamped (PyTorch's ``y <= 0`` rule)."""
    g = tl.load(g_ptr + offs_c[:, None] * g_sc + offs_hw[None, :] * g_shw, mask=mask, other=0.0)
    g = g.to(acc_ty)
    if RELU_OUT:
        y = tl.load(y_ptr + offs_c[:, None] * y_sc + offs_hw[None, :] * y_shw, mask=mask, other=0.0)
        g = tl.where(y.to(acc_ty) <= 0, 0.0, g)
    return g


@triton.jit
def _channel_sums(x_ptr, x_sc, x_shw, prologue_ptr, g_ptr, g_sc, g_shw, y_ptr, y_sc, y_shw,
                  offs_c, C, hw_start, hw_stop,
                  WITH_GRAD: tl.constexpr, RELU_OUT: tl.constexpr, HAS_PROLOGUE: tl.constexpr,
                  PROLOGUE_ACT: tl.constexpr,
                  BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, acc_ty: tl.constexpr):
    """Per channel of the block: sum over hw in [hw_start, hw_stop) of x, or of g'*x
    (x' for x with a prologue)."""
    acc = tl.zeros([BLOCK_C, BLOCK_HW], dtype=acc_ty)
    mask_c = offs_c < C
    pro_scale, pro_shift = _prologue_columns(prologue_ptr, offs_c, mask_c, C, HAS_PROLOGUE)
    for hw0 in range(hw_start, hw_stop, BLOCK_HW):
        offs_hw = hw0 + tl.arange(0, BLOCK_HW)
        mask = mask_c[:, None] & (offs_hw < hw_stop)[None, :]
        v = _load_input(x_ptr, x_sc, x_shw, offs_c, offs_hw, mask, pro_scale, pro_shift,
                        HAS_PROLOGUE, PROLOGUE_ACT, acc_ty)
        if WITH_GRAD:
            v = v * _load_grad(g_ptr, g_sc, g_shw, y_ptr, y_sc, y_shw, offs_c, offs_hw, mask,
                               RELU_OUT, acc_ty)
        acc += v
    return tl.sum(acc, axis=1)


@triton.jit
def _excite(z_row, p_row, u_row, w1_ptr, w1_sk, w1_sc, b1_ptr, w2_ptr, w2_sc, w2_sk, b2_ptr,
            C, K, ACT: tl.constexpr, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr,
            HAS_FC2: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_FC: tl.constexpr):
    """One sample's excitation: p = W1 z + b1, then u = W2 act(p) + b2 (u = p without
    fc2, the single-FC form, where K = C).

    z is read back from global memory, so the caller puts a barrier between its
    stores of z and this call; the stores of p are read back here behind one.
    """
    acc_ty = p_row.dtype.element_ty
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        acc = tl.zeros([BLOCK_K, BLOCK_FC], dtype=acc_ty)
        for c0 in range(0, C, BLOCK_FC):
            offs_c = c0 + tl.arange(0, BLOCK_FC)
            mask_c = offs_c < C
            z = tl.load(z_row + offs_c, mask=mask_c, other=0.0)
            w = tl.load(w1_ptr + offs_k[:, None] * w1_sk + offs_c[None, :] * w1_sc,
                        mask=mask_k[:, None] & mask_c[None, :], other=0.0).to(acc_ty)
            acc += w * z[None, :]
        p = tl.sum(acc, axis=1)
        if HAS_B1:
            p += tl.load(b1_ptr + offs_k, mask=mask_k, other=0.0).to(acc_ty)
        tl.store(p_row + offs_k, p, mask=mask_k)
        if not HAS_FC2:
            tl.store(u_row + offs_k, p, mask=mask_k)
    if HAS_FC2:
        tl.debug_barrier()
        for c0 in range(0, C, BLOCK_FC):
            offs_c = c0 + tl.arange(0, BLOCK_FC)
            mask_c = offs_c < C
            acc = tl.zeros([BLOCK_FC, BLOCK_K], dtype=acc_ty)
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                mask_k = offs_k < K
                h = activation(tl.load(p_row + offs_k, mask=mask_k, other=0.0), ACT)
                w = tl.load(w2_ptr + offs_c[:, None] * w2_sc + offs_k[None, :] * w2_sk,
                            mask=mask_c[:, None] & mask_k[None, :], other=0.0).to(acc_ty)
                acc += w * h[None, :]
            u = tl.sum(acc, axis=1)
            if HAS_B2:
                u += tl.load(b2_ptr + offs_c, mask=mask_c, other=0.0).to(acc_ty)
            tl.store(u_row + offs_c, u, mask=mask_c)


@triton.jit
def _excite_backward(du_row, dp_row, dz_row, p_row, w1_ptr, w1_sk, w1_sc, w2_ptr, w2_sc, w2_sk,
                     C, K, ACT: tl.constexpr, HAS_FC2: tl.constexpr, BLOCK_K: tl.constexpr,
                     BLOCK_FC: tl.constexpr):
    """One sample: dp = (du W2) * act'(p) (dp = du without fc2), then dz = dp W1; du is
    read back (barrier first)."""
    acc_ty = dp_row.dtype.element_ty
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        if HAS_FC2:
            acc = tl.zeros([BLOCK_FC, BLOCK_K], dtype=acc_ty)
            for c0 in range(0, C, BLOCK_FC):
                offs_c = c0 + tl.arange(0, BLOCK_FC)
                mask_c = offs_c < C
                du = tl.load(du_row + offs_c, mask=mask_c, other=0.0)
                w = tl.load(w2_ptr + offs_c[:, None] * w2_sc + offs_k[None, :] * w2_sk,
                            mask=mask_c[:, None] & mask_k[None, :], other=0.0).to(acc_ty)
                acc += w * du[:, None]
            p = tl.load(p_row + offs_k, mask=mask_k, other=0.0)
            dp = tl.sum(acc, axis=0) * activation_grad(p, ACT)
        else:
            dp = tl.load(du_row + offs_k, mask=mask_k, other=0.0)
        tl.store(dp_row + offs_k, dp, mask=mask_k)
    tl.debug_barrier()
    for c0 in range(0, C, BLOCK_FC):
        offs_c = c0 + tl.arange(0, BLOCK_FC)
        mask_c = offs_c < C
        acc = tl.zeros([BLOCK_K, BLOCK_FC], dtype=acc_ty)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            dp = tl.load(dp_row + offs_k, mask=mask_k, other=0.0)
            w = tl.load(w1_ptr + offs_k[:, None] * w1_sk + offs_c[None, :] * w1_sc,
                        mask=mask_k[:, None] & mask_c[None, :], other=0.0).to(acc_ty)
            acc += w * dp[:, None]
        tl.store(dz_row + offs_c, tl.sum(acc, axis=0), mask=mask_c)


@triton.jit
def _rescale(x_ptr, x_sc, x_shw, prologue_ptr, id_ptr, id_sc, id_shw, y_ptr, y_sc, y_shw, u_row,
             offs_c, C, hw_start, hw_stop,
             GATE: tl.constexpr, RESIDUAL: tl.constexpr, HAS_IDENTITY: tl.constexpr,
             RELU_OUT: tl.constexpr, HAS_PROLOGUE: tl.constexpr, PROLOGUE_ACT: tl.constexpr,
             BLOCK_HW: tl.constexpr):
    """y = act_out(x * s [+ x] [+ identity]) for one channel block over [hw_start, hw_stop)
    (x' for x with a prologue)."""
    mask_c = offs_c < C
    u = tl.load(u_row + offs_c, mask=mask_c, other=0.0)
    acc_ty = u.dtype
    scale = gate(u, GATE)
    pro_scale, pro_shift = _prologue_columns(prologue_ptr, offs_c, mask_c, C, HAS_PROLOGUE)
    for hw0 in range(hw_start, hw_stop, BLOCK_HW):
        offs_hw = hw0 + tl.arange(0, BLOCK_HW)
        mask = mask_c[:, None] & (offs_hw < hw_stop)[None, :]
        x = _load_input(x_ptr, x_sc, x_shw, offs_c, offs_hw, mask, pro_scale, pro_shift,
                        HAS_PROLOGUE, PROLOGUE_ACT, acc_ty)
        out = x * scale[:, None]
        if RESIDUAL:  # x * s + x, not x * (1 + s): inf * 0 must give NaN as in the reference
            out += x
        if HAS_IDENTITY:
            out += tl.load(id_ptr + offs_c[:, None] * id_sc + offs_hw[None, :] * id_shw, mask=mask,
                           other=0.0).to(acc_ty)
        if RELU_OUT:
            out = tl.where(out < 0, 0.0, out)
        tl.store(y_ptr + offs_c[:, None] * y_sc + offs_hw[None, :] * y_shw,
                 out.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _last_to_arrive(counter_ptr, arrivals):
    """True in exactly one program: the last of ``arrivals`` to call this.

    The barrier orders this program's earlier global stores before the release of
    the acq_rel add; the last arriver's acquire makes every other program's stores
    visible to it. The last arriver resets the counter, so the buffer is reusable.
    """
    tl.debug_barrier()
    arrived = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    is_last = arrived == arrivals - 1
    if is_last:
        tl.atomic_xchg(counter_ptr, 0, sem="relaxed", scope="gpu")
    return is_last


@triton.jit
def _sum_slots(slots_row, offs_c, mask_c, n_slots, C):
    """Per channel of the block: the partial sums of every slot, added in slot order.

    The loads bypass L1 (``.cg``): other programs wrote these slots during this launch.
    """
    acc = tl.load(slots_row + offs_c, mask=mask_c, other=0.0, cache_modifier=".cg")
    for s in range(1, n_slots):
        acc += tl.load(slots_row + s * C + offs_c, mask=mask_c, other=0.0, cache_modifier=".cg")
    return acc


@triton.jit
def sae_forward_single_kernel(
    x_ptr, x_sn, x_sc, x_shw, prologue_ptr, id_ptr, id_sn, id_sc, id_shw, y_ptr, y_sn, y_sc, y_shw,
    w1_ptr, w1_sk, w1_sc, b1_ptr, w2_ptr, w2_sc, w2_sk, b2_ptr, z_ptr, p_ptr, u_ptr,
    C, HW, K,
    ACT: tl.constexpr, GATE: tl.constexpr, RESIDUAL: tl.constexpr, HAS_IDENTITY: tl.constexpr,
    RELU_OUT: tl.constexpr, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, HAS_FC2: tl.constexpr,
    HAS_PROLOGUE: tl.constexpr, PROLOGUE_ACT: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_FC: tl.constexpr,
):
    """The whole operator for one sample per program (grid: N)."""
    n = tl.program_id(0).to(tl.int64)
    acc_ty = z_ptr.dtype.element_ty
    x_row = x_ptr + n * x_sn
    z_row = z_ptr + n * C
    u_row = u_ptr + n * C
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        sums = _channel_sums(x_row, x_sc, x_shw, prologue_ptr, x_row, 0, 0, x_row, 0, 0, offs_c,
                             C, 0, HW, False, False, HAS_PROLOGUE, PROLOGUE_ACT, BLOCK_C,
                             BLOCK_HW, acc_ty)
        tl.store(z_row + offs_c, sums / HW, mask=offs_c < C)
    tl.debug_barrier()
    _excite(z_row, p_ptr + n * K, u_row, w1_ptr, w1_sk, w1_sc, b1_ptr, w2_ptr, w2_sc, w2_sk,
            b2_ptr, C, K, ACT, HAS_B1, HAS_B2, HAS_FC2, BLOCK_K, BLOCK_FC)
    tl.debug_barrier()
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        _rescale(x_row, x_sc, x_shw, prologue_ptr, id_ptr + n * id_sn, id_sc, id_shw,
                 y_ptr + n * y_sn, y_sc, y_shw, u_row, offs_c, C, 0, HW, GATE, RESIDUAL,
                 HAS_IDENTITY, RELU_OUT, HAS_PROLOGUE, PROLOGUE_ACT, BLOCK_HW)


@triton.jit
def sae_forward_pool_kernel(
    x_ptr, x_sn, x_sc, x_shw, prologue_ptr, w1_ptr, w1_sk, w1_sc, b1_ptr, w2_ptr, w2_sc, w2_sk,
    b2_ptr, z_ptr, p_ptr, u_ptr, slots_ptr, counter_ptr,
    C, HW, K, HW_PER_SPLIT,
    ACT: tl.constexpr, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, HAS_FC2: tl.constexpr,
    HAS_PROLOGUE: tl.constexpr, PROLOGUE_ACT: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_FC: tl.constexpr,
):
    """Split forward (a), grid (N, channel blocks, HW splits): pool, then excite per sample."""
    n = tl.program_id(0).to(tl.int64)
    n_splits = tl.num_programs(2)
    split = tl.program_id(2)
    acc_ty = z_ptr.dtype.element_ty
    x_row = x_ptr + n * x_sn
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    hw_start = split * HW_PER_SPLIT
    hw_stop = tl.minimum(hw_start + HW_PER_SPLIT, HW)
    sums = _channel_sums(x_row, x_sc, x_shw, prologue_ptr, x_row, 0, 0, x_row, 0, 0, offs_c, C,
                         hw_start, hw_stop, False, False, HAS_PROLOGUE, PROLOGUE_ACT, BLOCK_C,
                         BLOCK_HW, acc_ty)
    slots_row = slots_ptr + n * n_splits * C
    tl.store(slots_row + split * C + offs_c, sums, mask=offs_c < C)
    if _last_to_arrive(counter_ptr + n, tl.num_programs(1) * n_splits):
        z_row = z_ptr + n * C
        for c0 in range(0, C, BLOCK_FC):
            offs = c0 + tl.arange(0, BLOCK_FC)
            mask = offs < C
            tl.store(z_row + offs, _sum_slots(slots_row, offs, mask, n_splits, C) / HW, mask=mask)
        tl.debug_barrier()
        _excite(z_row, p_ptr + n * K, u_ptr + n * C, w1_ptr, w1_sk, w1_sc, b1_ptr, w2_ptr, w2_sc,
                w2_sk, b2_ptr, C, K, ACT, HAS_B1, HAS_B2, HAS_FC2, BLOCK_K, BLOCK_FC)


@triton.jit
def sae_forward_rescale_kernel(
    x_ptr, x_sn, x_sc, x_shw, prologue_ptr, id_ptr, id_sn, id_sc, id_shw, y_ptr, y_sn, y_sc,
    y_shw, u_ptr, C, HW, HW_PER_PROGRAM,
    GATE: tl.constexpr, RESIDUAL: tl.constexpr, HAS_IDENTITY: tl.constexpr,
    RELU_OUT: tl.constexpr, HAS_PROLOGUE: tl.constexpr, PROLOGUE_ACT: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """Split forward (b), grid (N * channel blocks, HW chunks): the rescale epilogue."""
    blocks_c = tl.cdiv(C, BLOCK_C)
    n = (tl.program_id(0) // blocks_c).to(tl.int64)
    offs_c = (tl.program_id(0) % blocks_c) * BLOCK_C + tl.arange(0, BLOCK_C)
    hw_start = tl.program_id(1) * HW_PER_PROGRAM
    hw_stop = tl.minimum(hw_start + HW_PER_PROGRAM, HW)
    _rescale(x_ptr + n * x_sn, x_sc, x_shw, prologue_ptr, id_ptr + n * id_sn, id_sc, id_shw,
             y_ptr + n * y_sn, y_sc, y_shw, u_ptr + n * C, offs_c, C, hw_start, hw_stop,
             GATE, RESIDUAL, HAS_IDENTITY, RELU_OUT, HAS_PROLOGUE, PROLOGUE_ACT, BLOCK_HW)


@triton.jit
def sae_backward_reduce_kernel(
    x_ptr, x_sn, x_sc, x_shw, prologue_ptr, g_ptr, g_sn, g_sc, g_shw, y_ptr, y_sn, y_sc, y_shw,
    w1_ptr, w1_sk, w1_sc, w2_ptr, w2_sc, w2_sk, p_ptr, u_ptr, du_ptr, dp_ptr, dz_ptr,
    slots_ptr, counter_ptr,
    C, HW, K, HW_PER_SPLIT,
    ACT: tl.constexpr, GATE: tl.constexpr, RELU_OUT: tl.constexpr, HAS_FC2: tl.constexpr,
    HAS_PROLOGUE: tl.constexpr, PROLOGUE_ACT: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_FC: tl.constexpr,
):
    """Backward (a), grid (N, channel blocks, HW splits): ds = sum g'*x (x' with a
    prologue), then du, dp, dz."""
    n = tl.program_id(0).to(tl.int64)
    n_splits = tl.num_programs(2)
    split = tl.program_id(2)
    acc_ty = du_ptr.dtype.element_ty
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    hw_start = split * HW_PER_SPLIT
    hw_stop = tl.minimum(hw_start + HW_PER_SPLIT, HW)
    sums = _channel_sums(x_ptr + n * x_sn, x_sc, x_shw, prologue_ptr, g_ptr + n * g_sn, g_sc,
                         g_shw, y_ptr + n * y_sn, y_sc, y_shw, offs_c, C, hw_start, hw_stop,
                         True, RELU_OUT, HAS_PROLOGUE, PROLOGUE_ACT, BLOCK_C, BLOCK_HW, acc_ty)
    slots_row = slots_ptr + n * n_splits * C
    tl.store(slots_row + split * C + offs_c, sums, mask=offs_c < C)
    if _last_to_arrive(counter_ptr + n, tl.num_programs(1) * n_splits):
        du_row = du_ptr + n * C
        u_row = u_ptr + n * C
        for c0 in range(0, C, BLOCK_FC):
            offs = c0 + tl.arange(0, BLOCK_FC)
            mask = offs < C
            ds = _sum_slots(slots_row, offs, mask, n_splits, C)
            du = ds * gate_grad(tl.load(u_row + offs, mask=mask), GATE)
            tl.store(du_row + offs, du, mask=mask)
        tl.debug_barrier()
        _excite_backward(du_row, dp_ptr + n * K, dz_ptr + n * C, p_ptr + n * K, w1_ptr, w1_sk,
                         w1_sc, w2_ptr, w2_sc, w2_sk, C, K, ACT, HAS_FC2, BLOCK_K, BLOCK_FC)


@triton.jit
def sae_backward_dx_kernel(
    x_ptr, x_sn, x_sc, x_shw, prologue_ptr, g_ptr, g_sn, g_sc, g_shw, y_ptr, y_sn, y_sc, y_shw,
    dx_ptr, dx_sn, dx_sc, dx_shw, did_ptr, did_sn, did_sc, did_shw, u_ptr, dz_ptr,
    d_prologue_ptr, C, HW, HW_PER_PROGRAM,
    GATE: tl.constexpr, RESIDUAL: tl.constexpr, RELU_OUT: tl.constexpr,
    WRITE_D_IDENTITY: tl.constexpr, HAS_PROLOGUE: tl.constexpr, PROLOGUE_ACT: tl.constexpr,
    PROLOGUE_GRADS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """Backward (b), grid (N * channel blocks, HW chunks): dx = g'*scale + dz/HW.

    With a prologue that dx is dL/dx', carried on through x' = act(v), v = x * a + b, to
    dx = dL/dx' * act'(v) * a; under ``PROLOGUE_GRADS`` the program also writes its sums of
    dL/dv * x and dL/dv, row (n, chunk) of the (N, HW chunks, 2, C) ``d_prologue``.
    """
    blocks_c = tl.cdiv(C, BLOCK_C)
    n = (tl.program_id(0) // blocks_c).to(tl.int64)
    offs_c = (tl.program_id(0) % blocks_c) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    hw_start = tl.program_id(1) * HW_PER_PROGRAM
    hw_stop = tl.minimum(hw_start + HW_PER_PROGRAM, HW)
    u = tl.load(u_ptr + n * C + offs_c, mask=mask_c, other=0.0)
    acc_ty = u.dtype
    scale = gate(u, GATE)
    if RESIDUAL:
        scale += 1.0
    dz_mean = tl.load(dz_ptr + n * C + offs_c, mask=mask_c, other=0.0) / HW
    x_row = x_ptr + n * x_sn
    g_row = g_ptr + n * g_sn
    y_row = y_ptr + n * y_sn
    pro_scale, pro_shift = _prologue_columns(prologue_ptr, offs_c, mask_c, C, HAS_PROLOGUE)
    if PROLOGUE_GRADS:
        d_scale_sums = tl.zeros([BLOCK_C, BLOCK_HW], dtype=acc_ty)
        d_shift_sums = tl.zeros([BLOCK_C, BLOCK_HW], dtype=acc_ty)
    for hw0 in range(hw_start, hw_stop, BLOCK_HW):
        offs_hw = hw0 + tl.arange(0, BLOCK_HW)
        mask = mask_c[:, None] & (offs_hw < hw_stop)[None, :]
        g = _load_grad(g_row, g_sc, g_shw, y_row, y_sc, y_shw, offs_c, offs_hw, mask, RELU_OUT,
                       acc_ty)
        dx = g * scale[:, None] + dz_mean[:, None]
        if HAS_PROLOGUE:
            x = tl.load(x_row + offs_c[:, None] * x_sc + offs_hw[None, :] * x_shw, mask=mask,
                        other=0.0).to(acc_ty)
            dv = dx * prologue_activation_grad(x * pro_scale + pro_shift, PROLOGUE_ACT)
            if PROLOGUE_GRADS:  # masked-off elements carry dz/HW: keep them out of the sums
                dv = tl.where(mask, dv, 0.0)
                d_scale_sums += dv * x
                d_shift_sums += dv
            dx = dv * pro_scale
        tl.store(dx_ptr + n * dx_sn + offs_c[:, None] * dx_sc + offs_hw[None, :] * dx_shw,
                 dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if WRITE_D_IDENTITY:
            tl.store(did_ptr + n * did_sn + offs_c[:, None] * did_sc + offs_hw[None, :] * did_shw,
                     g.to(did_ptr.dtype.element_ty), mask=mask)
    if PROLOGUE_GRADS:
        d_prologue_row = d_prologue_ptr + (n * tl.num_programs(1) + tl.program_id(1)) * 2 * C
        tl.store(d_prologue_row + offs_c, tl.sum(d_scale_sums, axis=1), mask=mask_c)
        tl.store(d_prologue_row + C + offs_c, tl.sum(d_shift_sums, axis=1), mask=mask_c)


# ----------------------------------------------------------------------------------------
# Host side: allocate, plan and launch.
# ----------------------------------------------------------------------------------------

#: Whether the kernels were decorated under ``TRITON_INTERPRET=1`` (they then run on CPU tensors).
INTERPRETED = type(sae_forward_single_kernel).__name__ == "InterpretedFunction"


def check_device(device: torch.device) -> None:
    """Raise RuntimeError unless these kernels can run on tensors of ``device``."""
    if device.type == "cuda" or (device.type == "cpu" and INTERPRETED):
        return
    if device.type == "cpu":
        raise RuntimeError(
            "backend='triton' on CPU tensors runs Triton's interpreter, which needs "
            "TRITON_INTERPRET=1 in the environment before triton is first imported; "
            "use backend='auto' or 'reference' for CPU tensors"
        )
    raise RuntimeError(f"backend='triton' needs CUDA tensors, got tensors on {device}")


_ARRIVAL_COUNTERS: dict[tuple[torch.device, int], torch.Tensor] = {}


def _arrival_counters(device: torch.device, n: int) -> torch.Tensor:
    """Per-sample int32 counters, zero between launches (the last arriver resets its own).

    Cached per device and stream, so concurrent streams never share one.
    """
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    counters = _ARRIVAL_COUNTERS.get(key)
    if counters is None or counters.numel() < n:
        counters = torch.zeros(max(n, 256), dtype=torch.int32, device=device)
        _ARRIVAL_COUNTERS[key] = counters
    return counters


#: Offsets inside one sample are int32; sample offsets are int64.
MAX_SAMPLE_ELEMENTS = 2**31 - 1


def _plan(x: torch.Tensor, x_strides: tuple[int, int, int], k: int, strategy: str,
          prologue: dict) -> LaunchPlan:
    n, c, h, w = x.shape
    if c * h * w > MAX_SAMPLE_ELEMENTS:
        raise ValueError(f"one sample of x has {c * h * w} elements; the Triton kernels take "
                         f"at most 2**31 - 1 per sample (any number of samples)")
    return plan_launch(n, c, h * w, k, x.element_size(), is_channels_last(x_strides, c),
                       x.device, strategy, prologue=prologue["HAS_PROLOGUE"])


def prologue_args(x: torch.Tensor, scale: torch.Tensor | None, shift: torch.Tensor | None,
                   act: str) -> tuple[torch.Tensor, dict]:
    """The kernels' prologue operand and flags. The operand is the scale and shift stacked
    (2, C) in the accumulation dtype, ones or zeros standing in for one not given; without
    a prologue it is x, never read."""
    has_prologue = scale is not None or shift is not None or act != "none"
    flags = dict(HAS_PROLOGUE=has_prologue, PROLOGUE_ACT=PROLOGUE_ACTIVATIONS.index(act))
    if not has_prologue:
        return x, flags
    operand = x.new_empty((2, x.shape[1]), dtype=accumulation_dtype(x.dtype))
    operand[0] = 1.0 if scale is None else scale
    operand[1] = 0.0 if shift is None else shift
    return operand, flags


def forward(
    x: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor | None,
    fc2_weight: torch.Tensor | None,
    fc2_bias: torch.Tensor | None,
    identity: torch.Tensor | None,
    act: str,
    gate: str,
    residual: bool,
    act_out: str,
    strategy: str,
    prologue_scale: torch.Tensor | None = None,
    prologue_shift: torch.Tensor | None = None,
    prologue_act: str = "none",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """y and the saved (z, p, u) of the fused forward; operands already validated
    (``fc2_weight=None``: the single-FC form)."""
    n, c, h, w = x.shape
    hw, k = h * w, fc1_weight.shape[0]
    acc = accumulation_dtype(x.dtype)
    y = output_like(x)
    z = x.new_empty((n, c), dtype=acc)
    p = x.new_empty((n, k), dtype=acc)
    u = x.new_empty((n, c), dtype=acc)
    if n == 0:
        return y, z, p, u
    x, xs = readable(x)
    ys = readable(y)[1]
    ids = (0, 0, 0)
    if identity is not None:
        identity, ids = readable(identity)
    b1 = fc1_bias.contiguous() if fc1_bias is not None else x
    b2 = fc2_bias.contiguous() if fc2_bias is not None else x
    id_arg = identity if identity is not None else x
    pro_arg, prologue = prologue_args(x, prologue_scale, prologue_shift, prologue_act)
    plan = _plan(x, xs, k, strategy, prologue)
    flags = dict(ACT=ACTIVATIONS.index(act), HAS_B1=fc1_bias is not None,
                 HAS_B2=fc2_bias is not None, HAS_FC2=fc2_weight is not None)
    epilogue = dict(GATE=GATES.index(gate), RESIDUAL=residual, HAS_IDENTITY=identity is not None,
                    RELU_OUT=act_out == "relu")
    fc_blocks = dict(BLOCK_K=plan.block_k, BLOCK_FC=plan.block_fc)
    w2 = fc2_weight if fc2_weight is not None else fc1_weight  # not read without fc2
    weights = (fc1_weight, *fc1_weight.stride(), b1, w2, *w2.stride(), b2)
    if plan.strategy == "single":
        sae_forward_single_kernel[(n,)](
            x, *xs, pro_arg, id_arg, *ids, y, *ys, *weights, z, p, u, c, hw, k,
            **flags, **epilogue, **prologue, BLOCK_C=plan.block_c, BLOCK_HW=plan.block_hw,
            **fc_blocks, **plan.launch_options(),
        )
        return y, z, p, u
    blocks_c, chunks = triton_cdiv(c, plan.block_c), plan.hw_chunks(hw)
    slots = x.new_empty((n, chunks, c), dtype=acc)
    sae_forward_pool_kernel[(n, blocks_c, chunks)](
        x, *xs, pro_arg, *weights, z, p, u, slots, _arrival_counters(x.device, n), c, hw, k,
        plan.hw_chunk, **flags, **prologue, BLOCK_C=plan.block_c, BLOCK_HW=plan.block_hw,
        **fc_blocks, **plan.launch_options(),
    )
    sae_forward_rescale_kernel[(n * blocks_c, chunks)](
        x, *xs, pro_arg, id_arg, *ids, y, *ys, u, c, hw, plan.hw_chunk,
        **epilogue, **prologue, BLOCK_C=plan.block_c, BLOCK_HW=plan.block_hw,
        **plan.launch_options(),
    )
    return y, z, p, u


def backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor | None,
    fc1_weight: torch.Tensor,
    fc2_weight: torch.Tensor | None,
    p: torch.Tensor,
    u: torch.Tensor,
    act: str,
    gate: str,
    residual: bool,
    act_out: str,
    has_identity: bool,
    prologue_scale: torch.Tensor | None = None,
    prologue_shift: torch.Tensor | None = None,
    prologue_act: str = "none",
    prologue_grads: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dx, d_identity, du, dp and d_prologue of the fused backward.

    ``y`` is the forward output, needed (and only read) under ``act_out="relu"``.
    ``d_identity`` is written only for the ReLU tail; otherwise it is empty and the
    caller passes ``grad`` itself on to identity. ``d_prologue`` is (2, C), the gradients
    of the prologue's scale and shift in the accumulation dtype, under ``prologue_grads``
    (empty otherwise).
    """
    n, c, h, w = x.shape
    hw, k = h * w, fc1_weight.shape[0]
    relu_out = act_out == "relu"
    write_d_identity = has_identity and relu_out
    dx = output_like(x)
    d_identity = output_like(x) if write_d_identity else x.new_empty((0,))
    du = torch.empty_like(u)
    dp = torch.empty_like(p)
    if n == 0:
        return dx, d_identity, du, dp, u.new_zeros((2, c) if prologue_grads else (0,))
    dz = torch.empty_like(u)
    x, xs = readable(x)
    grad, gs = readable(grad)
    ys = (0, 0, 0)
    if relu_out:
        y, ys = readable(y)
    y_arg = y if relu_out else x
    dxs = readable(dx)[1]
    dids = readable(d_identity)[1] if write_d_identity else (0, 0, 0)
    did_arg = d_identity if write_d_identity else dx
    pro_arg, prologue = prologue_args(x, prologue_scale, prologue_shift, prologue_act)
    plan = _plan(x, xs, k, "split", prologue)
    blocks_c, chunks = triton_cdiv(c, plan.block_c), plan.hw_chunks(hw)
    slots = x.new_empty((n, chunks, c), dtype=du.dtype)
    w2 = fc2_weight if fc2_weight is not None else fc1_weight  # not read without fc2
    sae_backward_reduce_kernel[(n, blocks_c, chunks)](
        x, *xs, pro_arg, grad, *gs, y_arg, *ys, fc1_weight, *fc1_weight.stride(), w2,
        *w2.stride(), p, u, du, dp, dz, slots, _arrival_counters(x.device, n),
        c, hw, k, plan.hw_chunk,
        ACT=ACTIVATIONS.index(act), GATE=GATES.index(gate), RELU_OUT=relu_out,
        HAS_FC2=fc2_weight is not None, **prologue,
        BLOCK_C=plan.block_c, BLOCK_HW=plan.block_hw, BLOCK_K=plan.block_k, BLOCK_FC=plan.block_fc,
        **plan.launch_options(),
    )
    # the prologue's gradients as per-(sample, chunk) partial sums, added up below
    d_prologue_parts = u.new_empty((n, chunks, 2, c)) if prologue_grads else dx
    sae_backward_dx_kernel[(n * blocks_c, chunks)](
        x, *xs, pro_arg, grad, *gs, y_arg, *ys, dx, *dxs, did_arg, *dids, u, dz,
        d_prologue_parts, c, hw, plan.hw_chunk,
        GATE=GATES.index(gate), RESIDUAL=residual, RELU_OUT=relu_out,
        WRITE_D_IDENTITY=write_d_identity, **prologue, PROLOGUE_GRADS=prologue_grads,
        BLOCK_C=plan.block_c, BLOCK_HW=plan.block_hw, **plan.launch_options(),
    )
    d_prologue = d_prologue_parts.sum((0, 1)) if prologue_grads else u.new_empty((0,))
    return dx, d_identity, du, dp, d_prologue
