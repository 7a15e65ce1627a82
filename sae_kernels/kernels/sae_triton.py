"""Triton kernels of the fused SE / SaE operator, forward and backward.

Notation (shapes in ``options.check_operands``): x (N, C, H, W) is read as
(N, C, HW) through its strides, so NCHW and channels_last need no copy; K is the
stacked branch width. ``z`` (N, C), ``p`` (N, K) and ``u`` (N, C) are the pooled
means, the pre-activations of the branches and the pre-gate logits, kept in the
accumulation dtype (fp32, fp64 for fp64 inputs) for the backward.

The optional prologue, x' = act(x * a + b) with a per-channel scale a and shift b,
takes the place of x everywhere: it is applied to every tile of x as it is loaded, in
the pool and in the rescale, and never stored. The backward recomputes it the same way.

Plans (which one runs is ``gpu_plan``'s choice):

``single``, one launch, one program per sample:
    pool every channel block (store z) -> p = W1 z + b1 -> u = W2 act(p) + b2
    -> rescale every channel block with the epilogue.
``split``, sample-major grids (sample, channel block, HW chunk) between batched FCs:
    forward   (1) each program sums its tile into a slot of (N, chunks, C);
              (2) FC1 over sample tiles: z = the slots summed in chunk order / HW, p;
              (3) FC2 over sample tiles and K splits: u = act(p) W2^T + b2;
              (4) the rescale with its epilogue (flat rows for contiguous NCHW), adding
                  up u's split parts for its channels;
    backward  (1) the same grid sums g'*x into slots (g' = g where the mask kept y,
                  under ``act_out="relu"``);
              (2) du = ds * gate'(u), dp = (du W2) * act'(p) over sample tiles;
              (3) dz = dp W1 over sample tiles and K splits;
              (4) dx = g' * scale + dz / HW (dz's split parts added up), and
                  d_identity = g' for the ReLU tail.
    With ``gemv_in_stream``, (3) has no launch: each program of (4) computes its own
    channels' u (dz) from p (dp) and a slice of W2 (W1) in L2.
    With a prologue, backward (4) takes that dx as dL/dx' on to dx = dL/dx' * act'(v) * a
    (v = x * a + b), and, when asked, writes per-(sample, chunk) partial sums of
    dL/dv * x and dL/dv: the gradients of a and b once summed. Those sums and the weight
    gradients (two small matmuls) are finished over the batch by the caller.

Behind the ReLU tail (``act_out="relu"``) a forward asked to (``save_relu_mask``) also
writes which elements it kept, a bit each (``layout.relu_mask``), and the backward reads
that where it would read y: a sixteenth of y's bytes in 16-bit dtypes.

Programs hand work on only at launch boundaries: no counters, no atomics, nothing kept
between calls, and the same inputs give the same bits. Everything between the loads and
the stores runs in the accumulation dtype: values are upcast right after loading (the
interpreter computes wrongly on 16-bit bits).
"""

import torch
import triton
import triton.language as tl

from .. import gpu_plan
from ..gpu_plan import FLAT_BLOCK, LaunchPlan, Problem, triton_cdiv
from ..layout import (
    MASK_BITS,
    is_channels_last,
    output_like,
    readable,
    relu_mask,
    relu_mask_strides,
)
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


#: Elements per byte of the ReLU mask (``layout.relu_mask``), as the kernels see it.
_BITS = tl.constexpr(MASK_BITS)


@triton.jit
def _mask_bytes(offs_c, offs_hw, m_sc, m_shw, along_c):
    """The ReLU mask's byte offsets and bit positions of a tile's elements (see
    ``layout.relu_mask``), both [BLOCK_C, BLOCK_HW]; ``along_c``: it packs channels."""
    if along_c:
        offsets = (offs_c // _BITS)[:, None] * m_sc + offs_hw[None, :] * m_shw
        bits = (offs_c % _BITS)[:, None] + 0 * offs_hw[None, :]
    else:
        offsets = offs_c[:, None] * m_sc + (offs_hw // _BITS)[None, :] * m_shw
        bits = 0 * offs_c[:, None] + (offs_hw % _BITS)[None, :]
    return offsets, bits


@triton.jit
def _store_mask(m_ptr, m_sc, m_shw, stored, offs_c, offs_hw, mask_c, C, hw_stop, along_c,
                BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """Store a tile's ReLU mask: 1 where the stored output is kept by the backward (not
    ``<= 0``, PyTorch's rule: NaN is kept), each bit shifted to its place and summed in
    groups of eight. The tile starts on a byte of the mask and is whole bytes long along
    the packed axis; its elements past the tensor put 0 bits in the last byte, which no
    element reads."""
    _, places = _mask_bytes(offs_c, offs_hw, 0, 0, along_c)
    kept = tl.where(stored <= 0, 0, 1) << places
    # ``along_c`` is a runtime value, so both sides are compiled, each where the tile is
    # long enough on its axis for it (the plans that write the mask make it so): the
    # other side never runs. They keep names of their own (a branch's types must agree).
    if along_c:
        if BLOCK_C >= _BITS:
            c_bytes = tl.max(tl.reshape(offs_c // _BITS, [BLOCK_C // _BITS, _BITS]), axis=1)
            c_packed = tl.sum(tl.reshape(kept, [BLOCK_C // _BITS, _BITS, BLOCK_HW]), axis=1)
            tl.store(m_ptr + c_bytes[:, None] * m_sc + offs_hw[None, :] * m_shw,
                     c_packed.to(tl.uint8),
                     mask=(c_bytes * _BITS < C)[:, None] & (offs_hw < hw_stop)[None, :])
    else:
        if BLOCK_HW >= _BITS:
            hw_bytes = tl.max(tl.reshape(offs_hw // _BITS, [BLOCK_HW // _BITS, _BITS]), axis=1)
            hw_packed = tl.sum(tl.reshape(kept, [BLOCK_C, BLOCK_HW // _BITS, _BITS]), axis=2)
            tl.store(m_ptr + offs_c[:, None] * m_sc + hw_bytes[None, :] * m_shw,
                     hw_packed.to(tl.uint8),
                     mask=mask_c[:, None] & (hw_bytes * _BITS < hw_stop)[None, :])


@triton.jit
def _load_grad(g_ptr, g_sc, g_shw, m_ptr, m_sc, m_shw, offs_c, offs_hw, mask,
               RELU_OUT: tl.constexpr, MASK_ALONG_C: tl.constexpr, acc_ty: tl.constexpr):
    """g' = dL/dy, zeroed where the ReLU tail clamped (its mask, PyTorch's ``y <= 0`` rule)."""
    g = tl.load(g_ptr + offs_c[:, None] * g_sc + offs_hw[None, :] * g_shw, mask=mask, other=0.0)
    g = g.to(acc_ty)
    if RELU_OUT:
        offsets, bits = _mask_bytes(offs_c, offs_hw, m_sc, m_shw, MASK_ALONG_C)
        kept = (tl.load(m_ptr + offsets, mask=mask, other=0).to(tl.int32) >> bits) & 1
        g = tl.where(kept == 0, 0.0, g)
    return g


@triton.jit
def _channel_sums(x_ptr, x_sc, x_shw, prologue_ptr, g_ptr, g_sc, g_shw, m_ptr, m_sc, m_shw,
                  offs_c, C, hw_start, hw_stop,
                  WITH_GRAD: tl.constexpr, RELU_OUT: tl.constexpr, MASK_ALONG_C: tl.constexpr,
                  HAS_PROLOGUE: tl.constexpr, PROLOGUE_ACT: tl.constexpr,
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
            v = v * _load_grad(g_ptr, g_sc, g_shw, m_ptr, m_sc, m_shw, offs_c, offs_hw, mask,
                               RELU_OUT, MASK_ALONG_C, acc_ty)
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
def _rescale(x_ptr, x_sc, x_shw, prologue_ptr, id_ptr, id_sc, id_shw, y_ptr, y_sc, y_shw,
             m_ptr, m_sc, m_shw, u, offs_c, C, hw_start, hw_stop,
             GATE: tl.constexpr, RESIDUAL: tl.constexpr, HAS_IDENTITY: tl.constexpr,
             RELU_OUT: tl.constexpr, write_mask, mask_along_c, HAS_PROLOGUE: tl.constexpr,
             PROLOGUE_ACT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """y = act_out(x * s [+ x] [+ identity]), s = gate(u), for one channel block over
    [hw_start, hw_stop) (x' for x with a prologue), and where ``write_mask`` the ReLU
    tail's mask (``mask_along_c``: packing channels)."""
    mask_c = offs_c < C
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
        stored = out.to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + offs_c[:, None] * y_sc + offs_hw[None, :] * y_shw, stored, mask=mask)
        if write_mask:
            _store_mask(m_ptr, m_sc, m_shw, stored.to(acc_ty), offs_c, offs_hw, mask_c, C,
                        hw_stop, mask_along_c, BLOCK_C, BLOCK_HW)


#: The forward's ReLU-mask arguments are plain values, never compiled in: training and
#: inference run one binary (where their plans agree), the mask's store behind a branch.
MASK_ARGUMENTS = ["m_sn", "m_sc", "m_shw", "write_mask", "mask_along_c"]


@triton.jit(do_not_specialize=MASK_ARGUMENTS)
def sae_forward_single_kernel(
    x_ptr, x_sn, x_sc, x_shw, prologue_ptr, id_ptr, id_sn, id_sc, id_shw, y_ptr, y_sn, y_sc, y_shw,
    m_ptr, m_sn, m_sc, m_shw, w1_ptr, w1_sk, w1_sc, b1_ptr, w2_ptr, w2_sc, w2_sk, b2_ptr, z_ptr,
    p_ptr, u_ptr, C, HW, K, write_mask, mask_along_c,
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
                             C, 0, HW, False, False, False, HAS_PROLOGUE, PROLOGUE_ACT, BLOCK_C,
                             BLOCK_HW, acc_ty)
        tl.store(z_row + offs_c, sums / HW, mask=offs_c < C)
    tl.debug_barrier()
    _excite(z_row, p_ptr + n * K, u_row, w1_ptr, w1_sk, w1_sc, b1_ptr, w2_ptr, w2_sc, w2_sk,
            b2_ptr, C, K, ACT, HAS_B1, HAS_B2, HAS_FC2, BLOCK_K, BLOCK_FC)
    tl.debug_barrier()
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        u = tl.load(u_row + offs_c, mask=offs_c < C, other=0.0)
        _rescale(x_row, x_sc, x_shw, prologue_ptr, id_ptr + n * id_sn, id_sc, id_shw,
                 y_ptr + n * y_sn, y_sc, y_shw, m_ptr + n * m_sn, m_sc, m_shw, u, offs_c, C, 0,
                 HW, GATE, RESIDUAL, HAS_IDENTITY, RELU_OUT, write_mask, mask_along_c,
                 HAS_PROLOGUE, PROLOGUE_ACT, BLOCK_C, BLOCK_HW)


@triton.jit
def _sample_major(pid, blocks_c, chunks, N, LAST_FIRST: tl.constexpr):
    """(sample, channel block, chunk) of program ``pid`` in a flat grid whose programs run
    sample by sample, so no sample's work is left for the last wave. A second pass over
    the samples runs them ``LAST_FIRST``: it starts on the samples the first pass read
    last, whose lines are still in L2, so x (and g) come from HBM once for them."""
    per_sample = blocks_c * chunks
    n = (pid // per_sample).to(tl.int64)
    if LAST_FIRST:
        n = N - 1 - n
    rest = pid % per_sample
    return n, rest // chunks, rest % chunks


@triton.jit
def sae_channel_sums_kernel(
    x_ptr, x_sn, x_sc, x_shw, prologue_ptr, g_ptr, g_sn, g_sc, g_shw, m_ptr, m_sn, m_sc, m_shw,
    slots_ptr, C, HW, HW_PER_CHUNK,
    WITH_GRAD: tl.constexpr, RELU_OUT: tl.constexpr, MASK_ALONG_C: tl.constexpr,
    HAS_PROLOGUE: tl.constexpr,
    PROLOGUE_ACT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """Split pass 1, forward (sum of x) and backward (sum of g'*x): each program sums its
    (sample, channel block, HW chunk) tile into slot (n, chunk) of the (N, chunks, C) slots."""
    blocks_c = tl.cdiv(C, BLOCK_C)
    chunks = tl.cdiv(HW, HW_PER_CHUNK)
    n, block, chunk = _sample_major(tl.program_id(0), blocks_c, chunks, 0, False)
    offs_c = block * BLOCK_C + tl.arange(0, BLOCK_C)
    hw_start = chunk * HW_PER_CHUNK
    hw_stop = tl.minimum(hw_start + HW_PER_CHUNK, HW)
    sums = _channel_sums(x_ptr + n * x_sn, x_sc, x_shw, prologue_ptr, g_ptr + n * g_sn, g_sc,
                         g_shw, m_ptr + n * m_sn, m_sc, m_shw, offs_c, C, hw_start, hw_stop,
                         WITH_GRAD, RELU_OUT, MASK_ALONG_C, HAS_PROLOGUE, PROLOGUE_ACT, BLOCK_C,
                         BLOCK_HW, slots_ptr.dtype.element_ty)
    tl.store(slots_ptr + (n * chunks + chunk) * C + offs_c, sums, mask=offs_c < C)


@triton.jit
def _slot_sums(slots_ptr, offs_n, offs_c, mask, chunks, C):
    """[samples, channels] sums of every chunk's slot, added in chunk order (the same bits
    whatever the launch order)."""
    rows = slots_ptr + offs_n.to(tl.int64)[:, None] * chunks * C + offs_c[None, :]
    acc = tl.load(rows, mask=mask, other=0.0)
    for chunk in range(1, chunks):
        acc += tl.load(rows + chunk * C, mask=mask, other=0.0)
    return acc


@triton.jit
def _slot_steps(start, stop, parts, BLOCK_R: tl.constexpr):
    """Steps of a batched FC's reduction over [start, stop) whose input comes in ``parts``
    to add up first (FC1 and FC2-backward: the HW-chunk slots; FC2 and FC1-backward: the
    split parts of p or dp): one step per (BLOCK_R reduction elements, part), parts
    fastest. One loop where a loop over the parts nested in the reduction's would stop
    Triton's pipeliner from keeping the next steps' loads in flight."""
    return tl.cdiv(stop - start, BLOCK_R) * parts


@triton.jit
def _slot_step(ptr, rows_n, row_stride, part_stride, mask_n, step, sums, start, stop, parts,
               BLOCK_R: tl.constexpr):
    """Step ``step`` of :func:`_slot_steps` over the input at ``ptr`` (sample rows
    ``row_stride`` apart, parts ``part_stride`` apart): (its reduction elements, their
    mask, the [samples, elements] mask, the parts summed so far in part order (the same
    bits whatever the launch order), whether that sum is complete). A step that
    completes the sum multiplies it; the others multiply zeros, their weight loads
    masked off, which leaves the product's bits as they were."""
    part = step % parts
    offs_r = start + (step // parts) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < stop
    mask = mask_n[:, None] & mask_r[None, :]
    value = tl.load(ptr + rows_n * row_stride + part * part_stride + offs_r[None, :], mask=mask,
                    other=0.0)
    return offs_r, mask_r, mask, tl.where(part == 0, value, sums + value), part == parts - 1


@triton.jit
def _dot(acc, a, w):
    """acc + a @ w on tensor cores, a in the accumulation dtype, w as loaded.

    fp32: 3xTF32 (each fp32 operand split into a TF32 high and low part, three products),
    which keeps fp32's accuracy: the operator rounds once, at its stores, whatever the I/O
    dtype. 16-bit weights are exact in TF32. fp64: fp64 products.
    """
    if acc.dtype == tl.float64:
        out = tl.dot(a, w.to(tl.float64), acc, input_precision="ieee")
    else:
        out = tl.dot(a, w.to(tl.float32), acc, input_precision="tf32x3")
    return out


@triton.jit
def _weight_tile(w_ptr, w_s_rows, w_s_cols, offs_r, offs_m, mask_r, mask_m):
    """A [reduction, output] tile of a weight, W[offs_r, offs_m] through its strides."""
    return tl.load(w_ptr + offs_r[:, None] * w_s_rows + offs_m[None, :] * w_s_cols,
                   mask=mask_r[:, None] & mask_m[None, :], other=0.0)


@triton.jit
def _split_sums(ptrs, mask, split_stride, splits):
    """The ``splits`` partial results of an FC whose reduction was split (``ptrs`` into the
    first, the others ``split_stride`` apart), added in split order: what the streaming
    passes read for their own channels (the batched FCs take the parts as steps of their
    loop, :func:`_slot_steps`)."""
    acc = tl.load(ptrs, mask=mask, other=0.0)
    for split in range(1, splits):
        acc += tl.load(ptrs + split * split_stride, mask=mask, other=0.0)
    return acc


@triton.jit
def _fc_tile(N, M, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """A batched FC program's tile (grid axes 0 and 1): its samples and outputs, their
    masks, and the samples as int64 rows."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    return offs_n, offs_m, offs_n < N, offs_m < M, offs_n.to(tl.int64)[:, None]


@triton.jit
def _reduction_range(R, R_PER_SPLIT):
    """[start, stop) of this program's share of an FC's reduction (grid axis 2)."""
    start = tl.program_id(2) * R_PER_SPLIT
    return start, tl.minimum(start + R_PER_SPLIT, R)


@triton.jit
def sae_fc1_kernel(
    slots_ptr, w1_ptr, w1_sk, w1_sc, b1_ptr, z_ptr, p_parts_ptr, u_ptr, N, C, K, HW, chunks,
    C_PER_SPLIT,
    HAS_B1: tl.constexpr, HAS_FC2: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Split forward 2, grid (sample tiles, K tiles, C splits): z = slots summed / HW over
    this split's channels (the first K tile stores them), then the split's share of
    p = z W1^T + b1 for BLOCK_N samples at once, into row ``split`` of (splits, N, K):
    p itself with one split. Without fc2 (K = C, one split) u = p."""
    offs_n, offs_m, mask_n, mask_m, rows_n = _fc_tile(N, K, BLOCK_N, BLOCK_M)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=slots_ptr.dtype.element_ty)
    sums = tl.zeros([BLOCK_N, BLOCK_R], dtype=slots_ptr.dtype.element_ty)
    start, stop = _reduction_range(C, C_PER_SPLIT)
    for step in range(0, _slot_steps(start, stop, chunks, BLOCK_R)):
        offs_r, mask_r, mask, sums, complete = _slot_step(
            slots_ptr, rows_n, chunks * C, C, mask_n, step, sums, start, stop, chunks, BLOCK_R)
        z = sums / HW
        if tl.program_id(1) == 0:
            tl.store(z_ptr + rows_n * C + offs_r[None, :], z, mask=mask & complete)
        acc = _dot(acc, tl.where(complete, z, 0.0),
                   _weight_tile(w1_ptr, w1_sc, w1_sk, offs_r, offs_m, mask_r & complete, mask_m))
    if HAS_B1:
        if tl.program_id(2) == 0:
            acc += tl.load(b1_ptr + offs_m, mask=mask_m, other=0.0).to(acc.dtype)[None, :]
    mask = mask_n[:, None] & mask_m[None, :]
    tl.store(p_parts_ptr + tl.program_id(2) * N * K + rows_n * K + offs_m[None, :], acc,
             mask=mask)
    if not HAS_FC2:
        tl.store(u_ptr + rows_n * K + offs_m[None, :], acc, mask=mask)


@triton.jit(do_not_specialize=["p_splits"])
def sae_fc2_kernel(
    p_parts_ptr, p_ptr, w2_ptr, w2_sc, w2_sk, b2_ptr, u_parts_ptr, N, C, K, K_PER_SPLIT,
    p_splits,
    ACT: tl.constexpr, HAS_B2: tl.constexpr, P_IN_PARTS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Split forward 3 (when the plan gives FC2 a launch), grid (sample tiles, C tiles,
    K splits): p = its ``p_splits`` parts summed over this split's share of K (stored by
    the first C tile when there are several), then the split's share of
    u = act(p) W2^T + b2 into row ``split`` of (splits, N, C): u itself with one split."""
    offs_n, offs_m, mask_n, mask_m, rows_n = _fc_tile(N, C, BLOCK_N, BLOCK_M)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=p_ptr.dtype.element_ty)
    p = tl.zeros([BLOCK_N, BLOCK_R], dtype=p_ptr.dtype.element_ty)
    start, stop = _reduction_range(K, K_PER_SPLIT)
    for step in range(0, _slot_steps(start, stop, p_splits, BLOCK_R)):
        offs_r, mask_r, mask, p, complete = _slot_step(
            p_parts_ptr, rows_n, K, N * K, mask_n, step, p, start, stop, p_splits, BLOCK_R)
        if P_IN_PARTS:
            if tl.program_id(1) == 0:
                tl.store(p_ptr + rows_n * K + offs_r[None, :], p, mask=mask & complete)
        acc = _dot(acc, tl.where(complete, activation(p, ACT), 0.0),
                   _weight_tile(w2_ptr, w2_sk, w2_sc, offs_r, offs_m, mask_r & complete, mask_m))
    if HAS_B2:
        if tl.program_id(2) == 0:
            acc += tl.load(b2_ptr + offs_m, mask=mask_m, other=0.0).to(acc.dtype)[None, :]
    tl.store(u_parts_ptr + tl.program_id(2) * N * C + rows_n * C + offs_m[None, :], acc,
             mask=mask_n[:, None] & mask_m[None, :])


@triton.jit
def _fc2_rows(p_parts_row, p_row, N, w2_ptr, w2_sc, w2_sk, b2_ptr, offs_c, mask_c, K,
              STORE_P, ACT: tl.constexpr, HAS_B2: tl.constexpr, p_splits,
              P_IN_PARTS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    """u of one sample for the channels ``offs_c``: act(p) W2[offs_c]^T + b2 (a GEMV on the
    program's own channels, for plans that give FC2 no launch of its own); p is summed from
    its split parts, and stored under ``STORE_P`` when there are several."""
    acc_ty = p_row.dtype.element_ty
    acc = tl.zeros([BLOCK_C, BLOCK_R], dtype=acc_ty)
    for r0 in range(0, K, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < K
        p = _split_sums(p_parts_row + offs_r, mask_r, N * K, p_splits)
        if P_IN_PARTS:
            if STORE_P:
                tl.store(p_row + offs_r, p, mask=mask_r)
        w = tl.load(w2_ptr + offs_c[:, None] * w2_sc + offs_r[None, :] * w2_sk,
                    mask=mask_c[:, None] & mask_r[None, :], other=0.0).to(acc_ty)
        acc += w * activation(p, ACT)[None, :]
    u = tl.sum(acc, axis=1)
    if HAS_B2:
        u += tl.load(b2_ptr + offs_c, mask=mask_c, other=0.0).to(acc_ty)
    return u


@triton.jit
def _block_u(p_parts_row, p_row, u_parts_row, N, w2_ptr, w2_sc, w2_sk, b2_ptr, offs_c, mask_c,
             C, K, STORE_P, ACT: tl.constexpr, HAS_B2: tl.constexpr, FC2_HERE: tl.constexpr,
             splits, IN_PARTS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    """u of one sample for the channels ``offs_c`` in the rescale: under ``FC2_HERE``
    computed here from p's ``splits`` parts (:func:`_fc2_rows`), otherwise u's ``splits``
    parts from FC2's launch summed in split order."""
    if FC2_HERE:
        u = _fc2_rows(p_parts_row, p_row, N, w2_ptr, w2_sc, w2_sk, b2_ptr, offs_c, mask_c, K,
                      STORE_P, ACT, HAS_B2, splits, IN_PARTS, BLOCK_C, BLOCK_R)
    else:
        u = _split_sums(u_parts_row + offs_c, mask_c, N * C, splits)
    return u


@triton.jit(do_not_specialize=["splits", *MASK_ARGUMENTS])
def sae_rescale_kernel(
    x_ptr, x_sn, x_sc, x_shw, prologue_ptr, id_ptr, id_sn, id_sc, id_shw, y_ptr, y_sn, y_sc,
    y_shw, m_ptr, m_sn, m_sc, m_shw, p_parts_ptr, p_ptr, w2_ptr, w2_sc, w2_sk, b2_ptr,
    u_parts_ptr, u_ptr, N, C, HW, K, HW_PER_CHUNK, splits, write_mask, mask_along_c,
    ACT: tl.constexpr, HAS_B2: tl.constexpr, FC2_HERE: tl.constexpr, IN_PARTS: tl.constexpr,
    GATE: tl.constexpr, RESIDUAL: tl.constexpr, HAS_IDENTITY: tl.constexpr,
    RELU_OUT: tl.constexpr, HAS_PROLOGUE: tl.constexpr, PROLOGUE_ACT: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Split forward, last pass, sample-major grid over (sample, channel block, HW chunk):
    the rescale with its epilogue, from u of its own channels (:func:`_block_u`: FC2 here
    under ``FC2_HERE``, else u or its split parts), which the sample's first chunk stores
    where it was not stored whole (and the sample's first program stores p where p came
    in parts)."""
    blocks_c = tl.cdiv(C, BLOCK_C)
    chunks = tl.cdiv(HW, HW_PER_CHUNK)
    n, block, chunk = _sample_major(tl.program_id(0), blocks_c, chunks, N, True)
    offs_c = block * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    u = _block_u(p_parts_ptr + n * K, p_ptr + n * K, u_parts_ptr + n * C, N, w2_ptr, w2_sc,
                 w2_sk, b2_ptr, offs_c, mask_c, C, K, (block == 0) & (chunk == 0), ACT, HAS_B2,
                 FC2_HERE, splits, IN_PARTS, BLOCK_C, BLOCK_R)
    if FC2_HERE or IN_PARTS:
        if chunk == 0:
            tl.store(u_ptr + n * C + offs_c, u, mask=mask_c)
    hw_start = chunk * HW_PER_CHUNK
    _rescale(x_ptr + n * x_sn, x_sc, x_shw, prologue_ptr, id_ptr + n * id_sn, id_sc, id_shw,
             y_ptr + n * y_sn, y_sc, y_shw, m_ptr + n * m_sn, m_sc, m_shw, u, offs_c, C,
             hw_start, tl.minimum(hw_start + HW_PER_CHUNK, HW), GATE, RESIDUAL, HAS_IDENTITY,
             RELU_OUT, write_mask, mask_along_c, HAS_PROLOGUE, PROLOGUE_ACT, BLOCK_C, BLOCK_HW)


@triton.jit
def _flat_chunk(x_sn, PER_CHUNK, N):
    """(sample, chunk, start, stop) of a flat pass's program: PER_CHUNK elements of one
    sample's x_sn, samples major (``_sample_major``)."""
    n, _, chunk = _sample_major(tl.program_id(0), 1, tl.cdiv(x_sn, PER_CHUNK), N, True)
    start = chunk * PER_CHUNK
    return n, chunk, start, tl.minimum(start + PER_CHUNK, x_sn)


@triton.jit
def _channel_of(offs, hw_magic, hw_shift):
    """offs // HW for offsets within a sample (< 2**31) without a division, which costs a
    sequence of some twenty instructions per element: (umulhi(offs, magic) + offs) >> shift
    with the reciprocal of :func:`hw_divisor` (exact for every offset below 2**32)."""
    high = tl.umulhi(offs.to(tl.uint32), hw_magic.to(tl.uint32, bitcast=True))
    return ((high + offs.to(tl.uint32)) >> hw_shift).to(tl.int32)


@triton.jit
def _flat_step(e0, stop, hw_magic, hw_shift, u_row, GATE: tl.constexpr, BLOCK: tl.constexpr):
    """A flat pass's vector from element e0: its offsets, their mask and channels, and
    each element's gate of its channel's u."""
    offs = e0 + tl.arange(0, BLOCK)
    mask = offs < stop
    channel = _channel_of(offs, hw_magic, hw_shift)
    return offs, mask, channel, gate(tl.load(u_row + channel, mask=mask, other=0.0), GATE)


@triton.jit
def _prologue_gathers(prologue_ptr, channel, mask, C):
    """The prologue's scale and shift of each element's ``channel`` (flat passes)."""
    scale = tl.load(prologue_ptr + channel, mask=mask, other=1.0)
    return scale, tl.load(prologue_ptr + C + channel, mask=mask, other=0.0)


#: The reciprocal of HW that the flat passes divide by (:func:`hw_divisor`): plain values,
#: never compiled in.
DIVISOR_ARGUMENTS = ["hw_magic", "hw_shift"]


@triton.jit(do_not_specialize=["splits", "write_mask", *DIVISOR_ARGUMENTS])
def sae_rescale_flat_kernel(
    x_ptr, x_sn, prologue_ptr, id_ptr, y_ptr, m_ptr, p_parts_ptr, p_ptr, w2_ptr, w2_sc, w2_sk,
    b2_ptr, u_parts_ptr, u_ptr, N, C, HW, hw_magic, hw_shift, K, PER_CHUNK, splits, write_mask,
    ACT: tl.constexpr, HAS_B2: tl.constexpr, FC2_HERE: tl.constexpr, IN_PARTS: tl.constexpr,
    GATE: tl.constexpr, RESIDUAL: tl.constexpr, HAS_IDENTITY: tl.constexpr,
    RELU_OUT: tl.constexpr, HAS_PROLOGUE: tl.constexpr, PROLOGUE_ACT: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """The rescale of contiguous NCHW x, identity and y read as flat (N, C*HW) rows: each
    program streams PER_CHUNK elements of one sample in BLOCK-element vectors whatever HW
    is (rows of 49 or 196 would break 2-D tiles into scalar accesses); each element's
    channel picks its gate and prologue values (L1-resident gathers). x_sn = C*HW. The
    ReLU tail's mask, where ``write_mask``, is written as flat rows too: HW is then a
    whole number of its bytes (``gpu_plan``), and every chunk starts on one.

    Under ``FC2_HERE``, or with u in ``splits`` parts, a program's chunk is one block of
    BLOCK_C whole channels (PER_CHUNK = BLOCK_C * HW): it finishes their u first
    (:func:`_block_u`, as the 2-D rescale does) and stores it for its own gathers (behind
    a barrier) and for the backward."""
    n, chunk, start, stop = _flat_chunk(x_sn, PER_CHUNK, N)
    base = n * x_sn
    u_row = u_ptr + n * C
    acc_ty = u_ptr.dtype.element_ty
    if FC2_HERE or IN_PARTS:
        offs_c = chunk * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        u = _block_u(p_parts_ptr + n * K, p_ptr + n * K, u_parts_ptr + n * C, N, w2_ptr, w2_sc,
                     w2_sk, b2_ptr, offs_c, mask_c, C, K, chunk == 0, ACT, HAS_B2, FC2_HERE,
                     splits, IN_PARTS, BLOCK_C, BLOCK_R)
        tl.store(u_row + offs_c, u, mask=mask_c)
        tl.debug_barrier()
    for e0 in range(start, stop, BLOCK):
        offs, mask, channel, scale = _flat_step(e0, stop, hw_magic, hw_shift, u_row, GATE,
                                                BLOCK)
        x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(acc_ty)
        if HAS_PROLOGUE:
            pro_scale, pro_shift = _prologue_gathers(prologue_ptr, channel, mask, C)
            x = tl.where(mask, prologue_activation(x * pro_scale + pro_shift, PROLOGUE_ACT), 0.0)
        out = x * scale
        if RESIDUAL:  # x * s + x, not x * (1 + s): inf * 0 must give NaN as in the reference
            out += x
        if HAS_IDENTITY:
            out += tl.load(id_ptr + base + offs, mask=mask, other=0.0).to(acc_ty)
        if RELU_OUT:
            out = tl.where(out < 0, 0.0, out)
        stored = out.to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + base + offs, stored, mask=mask)
        if write_mask:
            offs_b = e0 // _BITS + tl.arange(0, BLOCK // _BITS)
            kept = tl.where(stored.to(acc_ty) <= 0, 0, 1) << (offs % _BITS)
            tl.store(m_ptr + base // _BITS + offs_b,
                     tl.sum(tl.reshape(kept, [BLOCK // _BITS, _BITS]), axis=1).to(tl.uint8),
                     mask=offs_b * _BITS < stop)


@triton.jit
def sae_fc2_backward_kernel(
    slots_ptr, u_ptr, p_ptr, w2_ptr, w2_sc, w2_sk, du_ptr, dp_parts_ptr, N, C, K, chunks,
    C_PER_SPLIT,
    ACT: tl.constexpr, GATE: tl.constexpr, HAS_FC2: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Split backward 2, grid (sample tiles, K tiles, C splits): du = ds * gate'(u) over the
    split's channels, ds the slots summed (the first K tile stores du), then the split's
    share of dp = (du W2) * act'(p) into row ``split`` of (splits, N, K): act' distributes
    over the sum of the parts, so that their sum is dp (dp itself with one split). Without
    fc2 (K = C, one split) each program takes its own channels: dp = du."""
    offs_n, offs_m, mask_n, mask_m, rows_n = _fc_tile(N, K, BLOCK_N, BLOCK_M)
    if HAS_FC2:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=slots_ptr.dtype.element_ty)
        sums = tl.zeros([BLOCK_N, BLOCK_R], dtype=slots_ptr.dtype.element_ty)
        start, stop = _reduction_range(C, C_PER_SPLIT)
        for step in range(0, _slot_steps(start, stop, chunks, BLOCK_R)):
            offs_r, mask_r, mask, sums, complete = _slot_step(
                slots_ptr, rows_n, chunks * C, C, mask_n, step, sums, start, stop, chunks,
                BLOCK_R)
            u = tl.load(u_ptr + rows_n * C + offs_r[None, :], mask=mask & complete, other=0.0)
            du = sums * gate_grad(u, GATE)
            if tl.program_id(1) == 0:
                tl.store(du_ptr + rows_n * C + offs_r[None, :], du, mask=mask & complete)
            acc = _dot(acc, tl.where(complete, du, 0.0), _weight_tile(
                w2_ptr, w2_sc, w2_sk, offs_r, offs_m, mask_r & complete, mask_m))
        mask = mask_n[:, None] & mask_m[None, :]
        acc *= activation_grad(tl.load(p_ptr + rows_n * K + offs_m[None, :], mask=mask,
                                       other=0.0), ACT)
        tl.store(dp_parts_ptr + tl.program_id(2) * N * K + rows_n * K + offs_m[None, :], acc,
                 mask=mask)
    else:
        mask = mask_n[:, None] & mask_m[None, :]
        u = tl.load(u_ptr + rows_n * C + offs_m[None, :], mask=mask, other=0.0)
        du = _slot_sums(slots_ptr, offs_n, offs_m, mask, chunks, C) * gate_grad(u, GATE)
        tl.store(du_ptr + rows_n * C + offs_m[None, :], du, mask=mask)
        tl.store(dp_parts_ptr + rows_n * K + offs_m[None, :], du, mask=mask)


@triton.jit(do_not_specialize=["dp_splits"])
def sae_fc1_backward_kernel(
    dp_parts_ptr, dp_ptr, w1_ptr, w1_sk, w1_sc, dz_parts_ptr, N, C, K, K_PER_SPLIT, dp_splits,
    DP_IN_PARTS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Split backward 3 (when the plan gives it a launch), grid (sample tiles, C tiles,
    K splits): dp = its ``dp_splits`` parts summed over this split's share of K (stored
    by the first C tile when there are several), then the split's share of dz = dp W1
    into row ``split`` of (splits, N, C): dz itself with one split."""
    offs_n, offs_m, mask_n, mask_m, rows_n = _fc_tile(N, C, BLOCK_N, BLOCK_M)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=dp_ptr.dtype.element_ty)
    dp = tl.zeros([BLOCK_N, BLOCK_R], dtype=dp_ptr.dtype.element_ty)
    start, stop = _reduction_range(K, K_PER_SPLIT)
    for step in range(0, _slot_steps(start, stop, dp_splits, BLOCK_R)):
        offs_r, mask_r, mask, dp, complete = _slot_step(
            dp_parts_ptr, rows_n, K, N * K, mask_n, step, dp, start, stop, dp_splits, BLOCK_R)
        if DP_IN_PARTS:
            if tl.program_id(1) == 0:
                tl.store(dp_ptr + rows_n * K + offs_r[None, :], dp, mask=mask & complete)
        acc = _dot(acc, tl.where(complete, dp, 0.0),
                   _weight_tile(w1_ptr, w1_sk, w1_sc, offs_r, offs_m, mask_r & complete, mask_m))
    tl.store(dz_parts_ptr + tl.program_id(2) * N * C + rows_n * C + offs_m[None, :], acc,
             mask=mask_n[:, None] & mask_m[None, :])


@triton.jit
def _fc1_backward_rows(dp_parts_row, dp_row, N, w1_ptr, w1_sk, w1_sc, offs_c, mask_c, K,
                       STORE_DP, dp_splits, DP_IN_PARTS: tl.constexpr, BLOCK_C: tl.constexpr,
                       BLOCK_R: tl.constexpr):
    """dz of one sample for the channels ``offs_c``: dp W1[:, offs_c] (a GEMV on the
    program's own channels, for plans that give it no launch of its own); dp is summed
    from its split parts, and stored under ``STORE_DP`` when there are several."""
    acc_ty = dp_row.dtype.element_ty
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=acc_ty)
    for r0 in range(0, K, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < K
        dp = _split_sums(dp_parts_row + offs_r, mask_r, N * K, dp_splits)
        if DP_IN_PARTS:
            if STORE_DP:
                tl.store(dp_row + offs_r, dp, mask=mask_r)
        w = tl.load(w1_ptr + offs_r[:, None] * w1_sk + offs_c[None, :] * w1_sc,
                    mask=mask_r[:, None] & mask_c[None, :], other=0.0).to(acc_ty)
        acc += w * dp[:, None]
    return tl.sum(acc, axis=0)


@triton.jit
def _block_dz(dp_parts_row, dp_row, dz_parts_row, N, w1_ptr, w1_sk, w1_sc, offs_c, mask_c, C,
              K, STORE_DP, FC1_HERE: tl.constexpr, splits, IN_PARTS: tl.constexpr,
              BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    """dz of one sample for the channels ``offs_c`` in the dx pass: under ``FC1_HERE``
    computed here from dp's ``splits`` parts (:func:`_fc1_backward_rows`), otherwise dz's
    ``splits`` parts from FC1-backward's launch summed in split order."""
    if FC1_HERE:
        dz = _fc1_backward_rows(dp_parts_row, dp_row, N, w1_ptr, w1_sk, w1_sc, offs_c, mask_c, K,
                                STORE_DP, splits, IN_PARTS, BLOCK_C, BLOCK_R)
    else:
        dz = _split_sums(dz_parts_row + offs_c, mask_c, N * C, splits)
    return dz


@triton.jit(do_not_specialize=["splits"])
def sae_backward_dx_kernel(
    x_ptr, x_sn, x_sc, x_shw, prologue_ptr, g_ptr, g_sn, g_sc, g_shw, m_ptr, m_sn, m_sc, m_shw,
    dx_ptr, dx_sn, dx_sc, dx_shw, did_ptr, did_sn, did_sc, did_shw, u_ptr, dp_parts_ptr, dp_ptr,
    w1_ptr, w1_sk, w1_sc, dz_parts_ptr, d_prologue_ptr, N, C, HW, K, HW_PER_CHUNK, splits,
    GATE: tl.constexpr, RESIDUAL: tl.constexpr, RELU_OUT: tl.constexpr,
    MASK_ALONG_C: tl.constexpr, FC1_HERE: tl.constexpr, IN_PARTS: tl.constexpr,
    WRITE_D_IDENTITY: tl.constexpr, HAS_PROLOGUE: tl.constexpr, PROLOGUE_ACT: tl.constexpr,
    PROLOGUE_GRADS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """Split backward, last pass, sample-major grid over (sample, channel block, HW chunk):
    dx = g'*scale + dz/HW, dz of its own channels from :func:`_block_dz` (FC1-backward here
    under ``FC1_HERE``, the sample's first program storing dp where it came in parts;
    else dz or its split parts).

    With a prologue that dx is dL/dx', carried on through x' = act(v), v = x * a + b, to
    dx = dL/dx' * act'(v) * a; under ``PROLOGUE_GRADS`` the program also writes its sums of
    dL/dv * x and dL/dv, row (n, chunk) of the (N, chunks, 2, C) ``d_prologue``.
    """
    blocks_c = tl.cdiv(C, BLOCK_C)
    chunks = tl.cdiv(HW, HW_PER_CHUNK)
    n, block, chunk = _sample_major(tl.program_id(0), blocks_c, chunks, N, True)
    offs_c = block * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    hw_start = chunk * HW_PER_CHUNK
    hw_stop = tl.minimum(hw_start + HW_PER_CHUNK, HW)
    u = tl.load(u_ptr + n * C + offs_c, mask=mask_c, other=0.0)
    acc_ty = u.dtype
    scale = gate(u, GATE)
    if RESIDUAL:
        scale += 1.0
    dz = _block_dz(dp_parts_ptr + n * K, dp_ptr + n * K, dz_parts_ptr + n * C, N, w1_ptr, w1_sk,
                   w1_sc, offs_c, mask_c, C, K, (block == 0) & (chunk == 0), FC1_HERE, splits,
                   IN_PARTS, BLOCK_C, BLOCK_R)
    dz_mean = dz / HW
    x_row = x_ptr + n * x_sn
    g_row = g_ptr + n * g_sn
    m_row = m_ptr + n * m_sn
    pro_scale, pro_shift = _prologue_columns(prologue_ptr, offs_c, mask_c, C, HAS_PROLOGUE)
    if PROLOGUE_GRADS:
        d_scale_sums = tl.zeros([BLOCK_C, BLOCK_HW], dtype=acc_ty)
        d_shift_sums = tl.zeros([BLOCK_C, BLOCK_HW], dtype=acc_ty)
    for hw0 in range(hw_start, hw_stop, BLOCK_HW):
        offs_hw = hw0 + tl.arange(0, BLOCK_HW)
        mask = mask_c[:, None] & (offs_hw < hw_stop)[None, :]
        g = _load_grad(g_row, g_sc, g_shw, m_row, m_sc, m_shw, offs_c, offs_hw, mask, RELU_OUT,
                       MASK_ALONG_C, acc_ty)
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
        d_prologue_row = d_prologue_ptr + (n * chunks + chunk) * 2 * C
        tl.store(d_prologue_row + offs_c, tl.sum(d_scale_sums, axis=1), mask=mask_c)
        tl.store(d_prologue_row + C + offs_c, tl.sum(d_shift_sums, axis=1), mask=mask_c)


@triton.jit(do_not_specialize=["splits", *DIVISOR_ARGUMENTS])
def sae_backward_dx_flat_kernel(
    x_ptr, x_sn, prologue_ptr, g_ptr, m_ptr, m_sn, m_sc, m_shw, dx_ptr, did_ptr, u_ptr,
    dp_parts_ptr, dp_ptr, w1_ptr, w1_sk, w1_sc, dz_parts_ptr, dz_ptr, N, C, HW, hw_magic,
    hw_shift, K, PER_CHUNK, splits,
    GATE: tl.constexpr, RESIDUAL: tl.constexpr, RELU_OUT: tl.constexpr,
    MASK_ALONG_C: tl.constexpr, FC1_HERE: tl.constexpr, IN_PARTS: tl.constexpr,
    WRITE_D_IDENTITY: tl.constexpr, HAS_PROLOGUE: tl.constexpr, PROLOGUE_ACT: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """The dx pass of ``sae_backward_dx_kernel`` over contiguous NCHW x, g, dx (and
    d_identity) read as flat (N, C*HW) rows, as ``sae_rescale_flat_kernel`` reads the
    forward's: vectors whatever HW is. Each element's channel picks its scale, dz and
    prologue values, and its bit of the ReLU mask (``_mask_bytes``' layouts: a tensor with
    HW = 1 is contiguous NCHW and channels_last at once, and its mask may pack channels):
    L1-resident gathers. Not under PROLOGUE_GRADS, whose sums per channel the 2-D tiles
    make, nor in fp64.

    Under ``FC1_HERE``, or with dz in ``splits`` parts, a program's chunk is one block of
    BLOCK_C whole channels (PER_CHUNK = BLOCK_C * HW): it finishes their dz first
    (:func:`_block_dz`) and stores it in ``dz_ptr`` for its own gathers (behind a
    barrier)."""
    n, chunk, start, stop = _flat_chunk(x_sn, PER_CHUNK, N)
    base = n * x_sn
    u_row = u_ptr + n * C
    dz_row = dz_ptr + n * C
    acc_ty = u_ptr.dtype.element_ty
    if FC1_HERE or IN_PARTS:
        offs_c = chunk * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        dz = _block_dz(dp_parts_ptr + n * K, dp_ptr + n * K, dz_parts_ptr + n * C, N, w1_ptr,
                       w1_sk, w1_sc, offs_c, mask_c, C, K, chunk == 0, FC1_HERE, splits,
                       IN_PARTS, BLOCK_C, BLOCK_R)
        tl.store(dz_row + offs_c, dz, mask=mask_c)
        tl.debug_barrier()
    for e0 in range(start, stop, BLOCK):
        offs, mask, channel, scale = _flat_step(e0, stop, hw_magic, hw_shift, u_row, GATE,
                                                BLOCK)
        if RESIDUAL:
            scale += 1.0
        g = tl.load(g_ptr + base + offs, mask=mask, other=0.0).to(acc_ty)
        if RELU_OUT:
            place = offs - channel * HW
            if MASK_ALONG_C:
                at, bit = (channel // _BITS) * m_sc + place * m_shw, channel % _BITS
            else:
                at, bit = channel * m_sc + (place // _BITS) * m_shw, place % _BITS
            byte = tl.load(m_ptr + n * m_sn + at, mask=mask, other=0)
            g = tl.where(((byte.to(tl.int32) >> bit) & 1) == 0, 0.0, g)
        dx = g * scale + tl.load(dz_row + channel, mask=mask, other=0.0) / HW
        if HAS_PROLOGUE:
            pro_scale, pro_shift = _prologue_gathers(prologue_ptr, channel, mask, C)
            x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(acc_ty)
            dx = dx * prologue_activation_grad(x * pro_scale + pro_shift, PROLOGUE_ACT) * pro_scale
        tl.store(dx_ptr + base + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if WRITE_D_IDENTITY:
            tl.store(did_ptr + base + offs, g.to(did_ptr.dtype.element_ty), mask=mask)


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


#: Offsets inside one sample are int32; sample offsets are int64.
MAX_SAMPLE_ELEMENTS = 2**31 - 1


def _problem(x: torch.Tensor, x_strides: tuple[int, int, int], fc1_weight: torch.Tensor,
             identity: torch.Tensor | None, relu_out: bool, prologue: dict,
             single_fc: bool, writes_mask: bool = False, flat_allowed: bool = True) -> Problem:
    """The plan's view of a call; ``flat_allowed``: the backward's further conditions for
    its flat dx pass (g contiguous, no prologue gradients, not fp64)."""
    n, c, h, w = x.shape
    if c * h * w > MAX_SAMPLE_ELEMENTS:
        raise ValueError(f"one sample of x has {c * h * w} elements; the Triton kernels take "
                         f"at most 2**31 - 1 per sample (any number of samples)")
    return Problem(n, c, h * w, fc1_weight.shape[0], x.element_size(),
                   is_channels_last(x_strides, c), fc1_weight.element_size(),
                   has_identity=identity is not None, relu_out=relu_out,
                   writes_mask=writes_mask, prologue=prologue["HAS_PROLOGUE"],
                   single_fc=single_fc,
                   flat=(flat_allowed and x.is_contiguous()
                         and (identity is None or identity.is_contiguous())))


def _plan(x: torch.Tensor, problem: Problem, strategy: str, backward: bool = False
          ) -> LaunchPlan:
    return gpu_plan.plan_launch(problem, gpu_plan.device_spec(x.device), strategy, backward)


def _fc_launch(kernel: str, tiles: gpu_plan.FcTiles, x: torch.Tensor,
               weight: torch.Tensor) -> dict:
    """Tiles and compile options of batched FC ``kernel`` (the model's name for it) over
    ``weight`` for x's samples: its warps, its pipeline depth, and all the registers a
    thread can have (without the limit ptxas trades a few spilled bytes for occupancy)."""
    return dict(BLOCK_N=tiles.block_n, BLOCK_M=tiles.block_m, BLOCK_R=tiles.block_r,
                num_warps=gpu_plan.FC_WARPS,
                num_stages=tiles.stages(kernel, x.element_size(), weight.element_size()),
                maxnreg=gpu_plan.MAX_REGISTERS)


def _splits(tiles: gpu_plan.FcTiles | None) -> dict:
    """How many split parts of its output the FC launch ``tiles`` left for the last pass
    (p or dp where the pass runs the next FC itself; u or dz where that FC had its launch;
    None: no FC, one part). The count is a plain argument, compiled in only as whether
    there are several, so that a new split count (a new batch size or width) builds
    nothing new."""
    splits = tiles.splits if tiles is not None else 1
    return dict(splits=splits, IN_PARTS=splits > 1)


def _parts(tiles: gpu_plan.FcTiles | None, whole: torch.Tensor) -> torch.Tensor:
    """Where an FC launch over ``tiles`` writes: ``whole`` itself, or (splits, *whole's
    shape) for its split parts."""
    if tiles is None or tiles.splits == 1:
        return whole
    return whole.new_empty((tiles.splits, *whole.shape))


def hw_divisor(hw: int) -> tuple[int, int]:
    """(magic, shift) such that n // hw == (umulhi(n, magic) + n) >> shift for every
    0 <= n < 2**32 whose sum stays below 2**32 (n < 2**31: offsets within one sample),
    with magic = ceil(2**(32 + shift) / hw) - 2**32 and shift = ceil(log2(hw)): the
    round-up method of Granlund and Montgomery with its 33-bit multiplier's top bit
    added as n. ``magic`` is returned as the signed 32-bit value of its bits."""
    shift = (hw - 1).bit_length()
    magic = -(-(1 << (32 + shift)) // hw) - (1 << 32)
    return (magic - (1 << 32) if magic >= 1 << 31 else magic), shift


def _groups(n: int, plan: LaunchPlan) -> list[slice]:
    """The batch in ``plan.sample_group``-sized slices, launched one after another."""
    return [slice(start, min(n, start + plan.sample_group))
            for start in range(0, n, plan.sample_group)]


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
    save_relu_mask: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """y and the saved (z, p, u, ReLU mask) of the fused forward; operands already
    validated (``fc2_weight=None``: the single-FC form). The mask (``layout.relu_mask``),
    which the backward needs under ``act_out="relu"``, is written when asked for there;
    empty otherwise."""
    n, c, h, w = x.shape
    hw, k = h * w, fc1_weight.shape[0]
    acc = accumulation_dtype(x.dtype)
    relu_out = act_out == "relu"
    write_mask = relu_out and save_relu_mask
    y = output_like(x)
    z = x.new_empty((n, c), dtype=acc)
    p = x.new_empty((n, k), dtype=acc)
    u = x.new_empty((n, c), dtype=acc)
    mask = relu_mask(x, write_mask)
    if n == 0:
        return y, z, p, u, mask
    ms, along_c = relu_mask_strides(mask, x) if write_mask else ((0, 0, 0), False)
    masking = dict(write_mask=write_mask, mask_along_c=along_c)
    x, xs = readable(x)
    ys = readable(y)[1]
    ids = (0, 0, 0)
    if identity is not None:
        identity, ids = readable(identity)
    b1 = fc1_bias.contiguous() if fc1_bias is not None else x
    b2 = fc2_bias.contiguous() if fc2_bias is not None else x
    id_arg = identity if identity is not None else x
    pro_arg, prologue = prologue_args(x, prologue_scale, prologue_shift, prologue_act)
    has_fc2 = fc2_weight is not None
    plan = _plan(x, _problem(x, xs, fc1_weight, identity, relu_out, prologue, not has_fc2,
                             write_mask), strategy)
    act_code = ACTIVATIONS.index(act)
    epilogue = dict(GATE=GATES.index(gate), RESIDUAL=residual, HAS_IDENTITY=identity is not None,
                    RELU_OUT=relu_out)
    streaming = dict(**prologue, BLOCK_C=plan.block_c, BLOCK_HW=plan.block_hw)
    w2 = fc2_weight if has_fc2 else fc1_weight  # not read without fc2
    if plan.strategy == "single":
        sae_forward_single_kernel[(n,)](
            x, *xs, pro_arg, id_arg, *ids, y, *ys, mask, *ms, fc1_weight, *fc1_weight.stride(),
            b1, w2, *w2.stride(), b2, z, p, u, c, hw, k, **masking, ACT=act_code,
            HAS_B1=fc1_bias is not None, HAS_B2=fc2_bias is not None, HAS_FC2=has_fc2,
            **epilogue, BLOCK_K=plan.block_k, BLOCK_FC=plan.block_fc, **streaming,
            **plan.launch_options(),
        )
        return y, z, p, u, mask
    blocks_c, chunks = plan.blocks(c), plan.hw_chunks(hw)
    fc2_here = plan.gemv_in_stream and has_fc2
    for group in _groups(n, plan):
        xg, yg, idg, zg, pg, ug = (t[group] for t in (x, y, id_arg, z, p, u))
        mg = mask[group] if write_mask else mask
        samples = xg.shape[0]
        slots = x.new_empty((samples, chunks, c), dtype=acc)
        sae_channel_sums_kernel[(samples * blocks_c * chunks,)](
            xg, *xs, pro_arg, xg, 0, 0, 0, xg, 0, 0, 0, slots, c, hw, plan.hw_chunk,
            WITH_GRAD=False, RELU_OUT=False, MASK_ALONG_C=False,
            **streaming, **plan.launch_options("pool"),
        )
        fc1 = plan.fc_to_k
        p_parts = pg if fc1.splits == 1 else x.new_empty((fc1.splits, samples, k), dtype=acc)
        sae_fc1_kernel[fc1.grid(samples, k)](
            slots, fc1_weight, *fc1_weight.stride(), b1, zg, p_parts, ug, samples, c, k, hw,
            chunks, fc1.per_split(c), HAS_B1=fc1_bias is not None, HAS_FC2=has_fc2,
            **_fc_launch("fc1", fc1, x, fc1_weight),
        )
        fc2 = plan.fc_to_c if has_fc2 and not fc2_here else None
        u_parts = _parts(fc2, ug)
        if fc2 is not None:
            sae_fc2_kernel[fc2.grid(samples, c)](
                p_parts, pg, w2, *w2.stride(), b2, u_parts, samples, c, k, fc2.per_split(k),
                fc1.splits, ACT=act_code, HAS_B2=fc2_bias is not None,
                P_IN_PARTS=fc1.splits > 1, **_fc_launch("fc2", fc2, x, w2),
            )
        parts = _splits(fc1 if fc2_here else fc2)
        last = dict(ACT=act_code, HAS_B2=fc2_bias is not None, FC2_HERE=fc2_here, **parts,
                    **epilogue, BLOCK_R=plan.block_r)
        if plan.flat_rescale:
            whole_channels = fc2_here or parts["IN_PARTS"]
            per_chunk = plan.block_c * hw if whole_channels else plan.flat_chunk(c, hw)
            sae_rescale_flat_kernel[(samples * triton_cdiv(c * hw, per_chunk),)](
                xg, c * hw, pro_arg, idg, yg, mg, p_parts, pg, w2, *w2.stride(), b2, u_parts, ug,
                samples, c, hw, *hw_divisor(hw), k, per_chunk, write_mask=write_mask, **last,
                **prologue,
                BLOCK=FLAT_BLOCK, BLOCK_C=plan.block_c, **plan.launch_options("flat"),
            )
        else:
            sae_rescale_kernel[(samples * blocks_c * chunks,)](
                xg, *xs, pro_arg, idg, *ids, yg, *ys, mg, *ms, p_parts, pg, w2, *w2.stride(), b2,
                u_parts, ug, samples, c, hw, k, plan.hw_chunk, **masking, **last, **streaming,
                **plan.launch_options(),
            )
    return y, z, p, u, mask


def backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    mask: torch.Tensor | None,
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

    ``mask`` is the forward's ReLU mask, needed (and only read) under ``act_out="relu"``.
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
    if relu_out and (mask is None or mask.numel() == 0):
        raise RuntimeError("the backward of act_out='relu' reads the forward's ReLU mask: run "
                           "the forward with save_relu_mask=True (sae() does wherever a "
                           "gradient is needed)")
    ms, along_c = relu_mask_strides(mask, x) if relu_out else ((0, 0, 0), False)
    m_arg = mask if relu_out else x
    dxs = readable(dx)[1]
    dids = readable(d_identity)[1] if write_d_identity else (0, 0, 0)
    did_arg = d_identity if write_d_identity else dx
    pro_arg, prologue = prologue_args(x, prologue_scale, prologue_shift, prologue_act)
    has_fc2 = fc2_weight is not None
    identity = x if has_identity else None  # only its presence and layout matter to the plan
    # fp64 keeps the 2-D tiles: 16 of its elements a thread (4 warps) spill in the flat pass
    problem = _problem(x, xs, fc1_weight, identity, relu_out, prologue, not has_fc2,
                       flat_allowed=(grad.is_contiguous() and not prologue_grads
                                     and x.element_size() < 8))
    plan = _plan(x, problem, "split", backward=True)
    blocks_c, chunks = plan.blocks(c), plan.hw_chunks(hw)
    w2 = fc2_weight if has_fc2 else fc1_weight  # not read without fc2
    fc1_here = plan.gemv_in_stream and has_fc2
    acc, act_code = du.dtype, ACTIVATIONS.index(act)
    streaming = dict(**prologue, BLOCK_C=plan.block_c, BLOCK_HW=plan.block_hw,
                     **plan.launch_options())
    # the prologue's gradients as per-(sample, chunk) partial sums, added up below
    d_prologue_parts = u.new_empty((n, chunks, 2, c)) if prologue_grads else dx
    for group in _groups(n, plan):
        xg, gg, mg, dxg, didg, ug, pg, dug, dpg, dzg = (
            t[group] for t in (x, grad, m_arg, dx, did_arg, u, p, du, dp, dz))
        partsg = d_prologue_parts[group]
        samples = xg.shape[0]
        slots = x.new_empty((samples, chunks, c), dtype=acc)
        sums = plan.first_pass()
        sae_channel_sums_kernel[(samples * sums.blocks(c) * chunks,)](
            xg, *xs, pro_arg, gg, *gs, mg, *ms, slots, c, hw, plan.hw_chunk,
            WITH_GRAD=True, RELU_OUT=relu_out, MASK_ALONG_C=along_c,
            **dict(streaming, BLOCK_C=sums.block_c),
        )
        fc2 = plan.fc_to_k
        dp_parts = dpg if fc2.splits == 1 else x.new_empty((fc2.splits, samples, k), dtype=acc)
        sae_fc2_backward_kernel[fc2.grid(samples, k)](
            slots, ug, pg, w2, *w2.stride(), dug, dp_parts, samples, c, k, chunks,
            fc2.per_split(c), ACT=act_code, GATE=GATES.index(gate), HAS_FC2=has_fc2,
            **_fc_launch("fc2_backward", fc2, x, w2),
        )
        fc1 = plan.fc_to_c if not fc1_here else None
        dz_parts = _parts(fc1, dzg)
        if fc1 is not None:
            sae_fc1_backward_kernel[fc1.grid(samples, c)](
                dp_parts, dpg, fc1_weight, *fc1_weight.stride(), dz_parts, samples, c, k,
                fc1.per_split(k), fc2.splits, DP_IN_PARTS=fc2.splits > 1,
                **_fc_launch("fc1_backward", fc1, x, fc1_weight),
            )
        parts = _splits(fc2 if fc1_here else fc1)
        last = dict(GATE=GATES.index(gate), RESIDUAL=residual, RELU_OUT=relu_out,
                    MASK_ALONG_C=along_c, FC1_HERE=fc1_here, **parts,
                    WRITE_D_IDENTITY=write_d_identity, BLOCK_R=plan.block_r)
        if plan.flat_rescale:
            whole_channels = fc1_here or parts["IN_PARTS"]
            per_chunk = plan.block_c * hw if whole_channels else plan.flat_chunk(c, hw)
            sae_backward_dx_flat_kernel[(samples * triton_cdiv(c * hw, per_chunk),)](
                xg, c * hw, pro_arg, gg, mg, *ms, dxg, didg, ug, dp_parts, dpg, fc1_weight,
                *fc1_weight.stride(), dz_parts, dzg, samples, c, hw, *hw_divisor(hw), k,
                per_chunk, **last,
                **prologue, BLOCK=FLAT_BLOCK, BLOCK_C=plan.block_c,
                **plan.launch_options("flat"),
            )
        else:
            sae_backward_dx_kernel[(samples * blocks_c * chunks,)](
                xg, *xs, pro_arg, gg, *gs, mg, *ms, dxg, *dxs, didg, *dids, ug, dp_parts, dpg,
                fc1_weight, *fc1_weight.stride(), dz_parts, partsg, samples, c, hw, k,
                plan.hw_chunk, **last, PROLOGUE_GRADS=prologue_grads, **streaming,
            )
    d_prologue = d_prologue_parts.sum((0, 1)) if prologue_grads else u.new_empty((0,))
    return dx, d_identity, du, dp, d_prologue
