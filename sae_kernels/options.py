"""The operator's options and input rules, stated once.

Every entry point (the reference modules, the fused layer, the functional form and
the custom op) validates through :func:`check_operands`, so the shapes, dtypes and
names accepted here are the whole contract.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

#: Activations inside the branches; the index is the code the kernels receive.
ACTIVATIONS: tuple[str, ...] = ("relu", "silu", "hardswish", "gelu")
#: Gates at the excitation; the index is the code the kernels receive.
GATES: tuple[str, ...] = ("sigmoid", "hardsigmoid")
#: Activation applied to the whole output (the SE-ResNet block tail).
OUTPUT_ACTIVATIONS: tuple[str, ...] = ("none", "relu")
#: Activation of the prologue ``x' = act(x * prologue_scale + prologue_shift)`` (a
#: normalisation and activation absorbed before the SE); the index is the kernels' code.
PROLOGUE_ACTIVATIONS: tuple[str, ...] = ("none", "relu", "silu", "hardswish")

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_name(kind: str, name: str, allowed: tuple[str, ...]) -> str:
    """Return ``name`` if it is one of ``allowed``, else raise ValueError."""
    if not isinstance(name, str) or name not in allowed:
        raise ValueError(f"unknown {kind} {name!r}; expected one of {', '.join(allowed)}")
    return name


def reduced_width(channels: int, reduction: int, rd_channels: int | None) -> int:
    """Width of one branch: ``rd_channels`` if given, else ``channels // reduction``."""
    if channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels}")
    if rd_channels is None:
        if reduction < 1:
            raise ValueError(f"reduction must be >= 1, got {reduction}")
        rd_channels = channels // reduction
        if rd_channels < 1:
            raise ValueError(
                f"reduced width channels // reduction = {channels} // {reduction} is 0; "
                "lower the reduction or pass rd_channels"
            )
    elif rd_channels < 1:
        raise ValueError(f"rd_channels must be >= 1, got {rd_channels}")
    return rd_channels


def check_cardinality(cardinality: int) -> int:
    if cardinality < 1:
        raise ValueError(f"cardinality must be >= 1, got {cardinality}")
    return cardinality


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Pool, GEMVs and gate run in fp32, or in fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}"
        )


#: fc1's weight or bias: one tensor (the branch matrices stacked row-wise), or one per
#: branch in order, read where they are (no stacked copy).
Fc1 = torch.Tensor | Sequence[torch.Tensor]


def _by_branch(fc1: Fc1 | None) -> bool:
    """Whether fc1's weight or bias is given as one part per branch."""
    return isinstance(fc1, Sequence) and not isinstance(fc1, torch.Tensor)


def fc1_parts(fc1: Fc1 | None) -> list[torch.Tensor] | None:
    """fc1's weight or bias as its list of branch parts (one where it is a tensor)."""
    if fc1 is None:
        return None
    return list(fc1) if _by_branch(fc1) else [fc1]


def fc1_stacked(fc1: Fc1 | None) -> torch.Tensor | None:
    """fc1's weight or bias as one tensor, its branch parts stacked row-wise (a copy only
    where there are several)."""
    parts = fc1_parts(fc1)
    if parts is None:
        return None
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def check_operands(
    x: torch.Tensor,
    fc1_weight: Fc1,
    fc1_bias: Fc1 | None,
    fc2_weight: torch.Tensor | None,
    fc2_bias: torch.Tensor | None,
    identity: torch.Tensor | None,
    act: str,
    gate: str,
    act_out: str,
    prologue_scale: torch.Tensor | None = None,
    prologue_shift: torch.Tensor | None = None,
    prologue_act: str = "none",
) -> None:
    """Raise TypeError/ValueError naming the first problem with the operands.

    Shapes: ``x`` (N, C, H, W) with H*W >= 1; ``fc1_weight`` (K, C) — the branch
    matrices stacked row-wise — or a sequence of the branch matrices (K_i, C), K the
    sum of their rows; ``fc1_bias`` (K,), or one (K_i,) per branch matrix where those
    are a sequence; ``fc2_weight`` (C, K);
    ``fc2_bias`` (C,); ``identity`` like ``x``; ``prologue_scale`` and
    ``prologue_shift`` (C,). ``fc2_weight=None`` is the single-FC form
    ``s = gate(fc1(z))`` (effective SE): fc1 is then (C, C), there is no fc2 bias, and
    ``act`` is not used.
    """
    check_name("act", act, ACTIVATIONS)
    check_name("gate", gate, GATES)
    check_name("act_out", act_out, OUTPUT_ACTIVATIONS)
    check_name("prologue_act", prologue_act, PROLOGUE_ACTIVATIONS)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    _check_float("x", x)
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D (N, C, H, W), got {x.dim()}-D shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    if h * w < 1:
        raise ValueError(f"x must have a spatial size H*W >= 1, got H={h}, W={w}")
    branches = _by_branch(fc1_weight)
    weights = list(fc1_weight) if branches else [fc1_weight]
    biases = fc1_parts(fc1_bias) if branches else None
    if not weights:
        raise ValueError("fc1_weight must hold at least one branch matrix")
    if biases is not None and len(biases) != len(weights):
        raise ValueError(f"fc1_bias must be None or one per branch matrix: {len(biases)} "
                         f"biases for {len(weights)} matrices")

    def part(name: str, i: int) -> str:
        return f"{name}[{i}]" if branches else name

    named = {part("fc1_weight", i): w for i, w in enumerate(weights)}
    if fc2_weight is not None:
        named["fc2_weight"] = fc2_weight
    elif fc2_bias is not None:
        raise ValueError("fc2_bias must be None when fc2_weight is None (the single-FC form)")
    if fc1_bias is not None:
        named.update({part("fc1_bias", i): b for i, b in enumerate(biases or [fc1_bias])})
    if fc2_bias is not None:
        named["fc2_bias"] = fc2_bias
    if identity is not None:
        named["identity"] = identity
    if prologue_scale is not None:
        named["prologue_scale"] = prologue_scale
    if prologue_shift is not None:
        named["prologue_shift"] = prologue_shift
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        _check_float(name, t)
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    for name in ("prologue_scale", "prologue_shift"):
        if name in named and tuple(named[name].shape) != (c,):
            raise ValueError(f"{name} must have shape (C={c},), got {tuple(named[name].shape)}")
    for i, w in enumerate(weights):
        name = part("fc1_weight", i)
        if w.dim() != 2 or w.shape[1] != c:
            raise ValueError(f"x has {c} channels but {name} has shape {tuple(w.shape)}; "
                             f"{name} must have shape ({'K_i' if branches else 'K'}, C={c})")
        if w.shape[0] < 1:
            raise ValueError(f"{name} must have at least one row (reduced width >= 1)")
        if biases is not None and tuple(biases[i].shape) != (w.shape[0],):
            raise ValueError(f"{part('fc1_bias', i)} must have shape ({w.shape[0]},), "
                             f"got {tuple(biases[i].shape)}")
    k = sum(w.shape[0] for w in weights)
    if fc2_weight is None and k != c:
        raise ValueError(f"without fc2_weight (the single-FC form) fc1_weight must have shape "
                         f"(C={c}, C={c}), got {(k, c)}")
    if fc2_weight is not None and tuple(fc2_weight.shape) != (c, k):
        raise ValueError(
            f"fc2_weight must have shape (C={c}, K={k}), got {tuple(fc2_weight.shape)}"
        )
    if fc1_bias is not None and not branches and tuple(fc1_bias.shape) != (k,):
        raise ValueError(f"fc1_bias must have shape ({k},), got {tuple(fc1_bias.shape)}")
    if fc2_bias is not None and tuple(fc2_bias.shape) != (c,):
        raise ValueError(f"fc2_bias must have shape ({c},), got {tuple(fc2_bias.shape)}")
    if identity is not None:
        if identity.shape != x.shape:
            raise ValueError(
                f"identity must have x's shape {tuple(x.shape)}, got {tuple(identity.shape)}"
            )
        if identity.dtype != x.dtype:
            raise TypeError(f"identity must have x's dtype {x.dtype}, got {identity.dtype}")
