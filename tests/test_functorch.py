"""torch.func transforms over the fused blocks and ``sae``: they run the ATen composite
(``dispatch.runs_composite``) and match the reference, outputs and every gradient."""

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jacfwd, jacrev, vmap

from sae_kernels import EffectiveSE, FusedEffectiveSE, FusedSaE, SaE, sae, sae_reference
from sae_kernels.dispatch import runs_composite
from sae_kernels.prologue import AbsorbedNorm

#: (channels, cardinality, rd_channels, residual, act_out, with identity, H, W): the odd
#: shapes C = 3 and H * W = 1 included.
CONFIGS = {
    "sae": (16, 2, 4, True, "none", False, 5, 3),
    "se_tail": (8, 1, 2, False, "relu", True, 4, 4),
    "tiny": (3, 3, 1, False, "none", True, 1, 1),
}
#: fp64: the composite and the reference then differ by rounding far below the default
#: tolerances, which any wrong gradient exceeds.
DTYPE = torch.float64


def _blocks(name: str) -> tuple[nn.Module, nn.Module, bool]:
    """A reference block with random weights, its fused copy, and whether it takes an
    identity."""
    c, cardinality, rd, residual, act_out, identity, _, _ = CONFIGS[name]
    torch.manual_seed(0)
    reference = SaE(c, cardinality=cardinality, rd_channels=rd, act="silu", residual=residual,
                    act_out=act_out).to(DTYPE)
    return reference, FusedSaE.from_module(reference), identity


def _inputs(name: str, *batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    c, *_, h, w = CONFIGS[name]
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(*batch, c, h, w, generator=generator, dtype=DTYPE),
            torch.randn(*batch, c, h, w, generator=generator, dtype=DTYPE))


def test_transforms_run_the_composite():
    """The rule: the fused op eagerly, the composite under any torch.func transform."""
    seen = []

    def record(x):
        seen.append(runs_composite("cpu"))
        return x * 2

    record(torch.ones(2))
    vmap(record)(torch.ones(2, 2))
    grad(lambda x: record(x).sum())(torch.ones(2))
    assert seen == [False, True, True]


@pytest.mark.parametrize("no_grad", [False, True], ids=["grad_mode", "no_grad"])
@pytest.mark.parametrize("name", CONFIGS)
def test_vmap_matches_the_reference(name, no_grad):
    reference, fused, with_identity = _blocks(name)
    x, identity = _inputs(name, 3, 2)  # vmapped over 3 batches of 2 samples
    args = (x, identity) if with_identity else (x,)
    with torch.set_grad_enabled(not no_grad):
        actual = vmap(fused)(*args)
        expected = torch.stack([reference(*(a[i] for a in args)) for i in range(3)])
    torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize("name", CONFIGS)
def test_vmap_over_stacked_parameters_without_grad(name):
    """Model ensembling: one fused block called with the stacked parameters of three, in
    inference (the block's cache of stacked branch weights is not used under a transform)."""
    reference, fused, with_identity = _blocks(name)
    references = [reference]
    for _ in range(2):
        references.append(type(reference)(**reference.config()).to(DTYPE))
    parameters, _ = torch.func.stack_module_state(references)
    x, identity = _inputs(name, 2)
    args = (x, identity) if with_identity else (x,)
    with torch.no_grad():
        actual = vmap(lambda p: functional_call(fused, p, args))(parameters)
        for i, r in enumerate(references):
            torch.testing.assert_close(actual[i], r(*args))


@pytest.mark.parametrize("name", CONFIGS)
def test_grad_matches_the_reference(name):
    """torch.func.grad of a loss, with respect to every parameter, x and the identity,
    against autograd through the reference block."""
    reference, fused, with_identity = _blocks(name)
    x, identity = _inputs(name, 2)
    inputs = (x, identity) if with_identity else (x,)
    params = dict(fused.named_parameters())

    def loss(params, *inputs):
        return functional_call(fused, params, inputs).square().sum()

    argnums = tuple(range(len(inputs) + 1))
    actual = grad(loss, argnums=argnums)(params, *inputs)
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    reference(*leaves).square().sum().backward()
    expected_params = dict(reference.named_parameters())
    assert actual[0].keys() == expected_params.keys()
    for key, value in actual[0].items():
        torch.testing.assert_close(value, expected_params[key].grad, msg=key)
    for got, leaf in zip(actual[1:], leaves, strict=True):
        torch.testing.assert_close(got, leaf.grad)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")  # jacfwd's
@pytest.mark.parametrize("jacobian", [jacrev, jacfwd])
def test_jacobians_match_the_reference(jacobian):
    reference, fused, _ = _blocks("tiny")
    x, identity = _inputs("tiny", 2)
    actual = jacobian(fused, argnums=(0, 1))(x, identity)
    expected = jacobian(reference, argnums=(0, 1))(x, identity)
    for got, want in zip(actual, expected, strict=True):
        torch.testing.assert_close(got, want)


def test_effective_se_vmap_and_grad():
    torch.manual_seed(0)
    reference = EffectiveSE(5, gate="hardsigmoid").to(DTYPE)
    fused = FusedEffectiveSE.from_module(reference)
    x = torch.randn(3, 2, 5, 2, 3, dtype=DTYPE)
    torch.testing.assert_close(vmap(fused)(x), vmap(reference)(x))
    torch.testing.assert_close(grad(lambda x: fused(x).sum())(x[0]),
                               grad(lambda x: reference(x).sum())(x[0]))


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_functional_grad_in_every_operand_and_per_sample_weights(backend):
    """``sae`` with a prologue, an identity and the ReLU tail: grad in all eight tensors,
    and vmap over per-sample weights, whichever backend the call names."""
    generator = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=DTYPE)

    c, k = 3, 4
    operands = (randn(2, c, 1, 1), randn(k, c), randn(k), randn(c, k), randn(c),
                randn(2, c, 1, 1), randn(c), randn(c))
    options = dict(act="gelu", gate="sigmoid", residual=True, act_out="relu")

    def call(fn, x, w1, b1, w2, b2, identity, scale, shift):
        backend_option = {"backend": backend} if fn is sae else {}
        return fn(x, w1, b1, w2, b2, identity, **options, **backend_option,
                  prologue_scale=scale, prologue_shift=shift, prologue_act="silu")

    argnums = tuple(range(len(operands)))
    actual = grad(lambda *t: call(sae, *t).square().sum(), argnums=argnums)(*operands)
    leaves = [t.clone().requires_grad_(True) for t in operands]
    expected = torch.autograd.grad(call(sae_reference, *leaves).square().sum(), leaves)
    for got, want in zip(actual, expected, strict=True):
        torch.testing.assert_close(got, want)

    per_sample = [torch.stack([t, 2 * t]) for t in operands]  # two weight sets, vmapped
    batched = vmap(lambda *t: call(sae, *t))(*per_sample)
    for i in range(2):
        torch.testing.assert_close(batched[i], call(sae_reference, *(t[i] for t in per_sample)))


def test_grad_through_an_absorbed_prologue():
    """A fused block applying an eval-mode BatchNorm + SiLU as its prologue: torch.func.grad
    reaches the norm's weight and bias as autograd does through BatchNorm, SiLU and SaE."""
    torch.manual_seed(0)
    norm = nn.BatchNorm2d(8).to(DTYPE).eval()
    with torch.no_grad():
        norm.running_mean.normal_(0, 0.1)
        norm.running_var.uniform_(0.5, 1.5)
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_(0, 0.1)
    reference_se = SaE(8, reduction=4, cardinality=2).to(DTYPE)
    reference = nn.Sequential(norm, nn.SiLU(), reference_se)
    fused = nn.Sequential(AbsorbedNorm(norm, "silu", nn.SiLU()).eval(),
                          FusedSaE.from_module(reference_se))
    fused[1].absorb_prologue(fused[0])
    x = torch.randn(2, 8, 3, 3, dtype=DTYPE)
    params = dict(fused.named_parameters())
    actual = grad(lambda p: functional_call(fused, p, (x,)).square().sum())(params)
    reference(x).square().sum().backward()
    expected = dict(reference.named_parameters())
    assert len(actual) == len(expected) == 8
    for name, value in actual.items():  # the SE is the second module here, the third there
        reference_name = name.replace("1.", "2.", 1) if name.startswith("1.") else name
        torch.testing.assert_close(value, expected[reference_name].grad, msg=name)
