"""Triton device functions for the branch activations, the excitation gates and the
prologue's activation.

Codes are indices into ``options.ACTIVATIONS`` / ``options.GATES`` /
``options.PROLOGUE_ACTIVATIONS``. Clamps and ReLU
are written with ``tl.where`` on ``<``/``<=`` so that NaN propagates exactly as in
PyTorch (``tl.maximum`` would turn NaN into 0), and each derivative follows the
boundary conventions of PyTorch's own backward formulas.
"""

import triton
import triton.language as tl

RELU = tl.constexpr(0)
SILU = tl.constexpr(1)
HARDSWISH = tl.constexpr(2)
GELU = tl.constexpr(3)

SIGMOID = tl.constexpr(0)
HARDSIGMOID = tl.constexpr(1)

PROLOGUE_NONE = tl.constexpr(0)
PROLOGUE_RELU = tl.constexpr(1)
PROLOGUE_SILU = tl.constexpr(2)
PROLOGUE_HARDSWISH = tl.constexpr(3)

_INV_SQRT2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _clamp(v, lo, hi):
    return tl.where(v < lo, lo, tl.where(v > hi, hi, v))


@triton.jit
def _sigmoid(v):
    return 1.0 / (1.0 + tl.exp(-v))


@triton.jit
def activation(p, ACT: tl.constexpr):
    if ACT == RELU:
        out = tl.where(p < 0, 0.0, p)
    elif ACT == SILU:
        out = p * _sigmoid(p)
    elif ACT == HARDSWISH:
        out = p * _clamp(p + 3.0, 0.0, 6.0) / 6.0
    else:
        out = 0.5 * p * (1.0 + tl.math.erf(p * _INV_SQRT2))
    return out


@triton.jit
def activation_grad(p, ACT: tl.constexpr):
    """d act(p) / dp."""
    if ACT == RELU:
        out = tl.where(p <= 0, 0.0, 1.0)
    elif ACT == SILU:
        sig = _sigmoid(p)
        out = sig * (1.0 + p * (1.0 - sig))
    elif ACT == HARDSWISH:
        out = tl.where(p < -3.0, 0.0, tl.where(p <= 3.0, p / 3.0 + 0.5, 1.0))
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(p * _INV_SQRT2))
        out = cdf + p * tl.exp(-0.5 * p * p) * _INV_SQRT_2PI
    return out.to(p.dtype)


@triton.jit
def gate(u, GATE: tl.constexpr):
    if GATE == SIGMOID:
        out = _sigmoid(u)
    else:
        out = _clamp(u + 3.0, 0.0, 6.0) / 6.0
    return out


@triton.jit
def gate_grad(u, GATE: tl.constexpr):
    """d gate(u) / du."""
    if GATE == SIGMOID:
        s = _sigmoid(u)
        out = s * (1.0 - s)
    else:
        out = tl.where((u > -3.0) & (u < 3.0), 1.0 / 6.0, 0.0)
    return out.to(u.dtype)


@triton.jit
def prologue_activation(v, PROLOGUE_ACT: tl.constexpr):
    """The prologue's act(v): the identity, or the branch activation of the same name."""
    if PROLOGUE_ACT == PROLOGUE_RELU:
        out = activation(v, RELU)
    elif PROLOGUE_ACT == PROLOGUE_SILU:
        out = activation(v, SILU)
    elif PROLOGUE_ACT == PROLOGUE_HARDSWISH:
        out = activation(v, HARDSWISH)
    else:
        out = v
    return out


@triton.jit
def prologue_activation_grad(v, PROLOGUE_ACT: tl.constexpr):
    """d act(v) / dv of the prologue's activation."""
    if PROLOGUE_ACT == PROLOGUE_RELU:
        out = activation_grad(v, RELU)
    elif PROLOGUE_ACT == PROLOGUE_SILU:
        out = activation_grad(v, SILU)
    elif PROLOGUE_ACT == PROLOGUE_HARDSWISH:
        out = activation_grad(v, HARDSWISH)
    else:
        out = tl.full(v.shape, 1.0, v.dtype)
    return out
