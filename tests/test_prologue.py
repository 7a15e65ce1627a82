"""The operator's prologue ``x' = act(x * scale + shift)`` against the float64 reference
composition (normalise, activate, then the SE): output and every gradient, including
those of the prologue's scale and shift; then the AbsorbedNorm stand-in."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import DEVICE, DTYPES, EPILOGUES, LAYOUTS, assert_close_to_truth
from sae_kernels import FusedSE
from sae_kernels.functional import sae
from sae_kernels.options import PROLOGUE_ACTIVATIONS
from sae_kernels.prologue import AbsorbedAct, AbsorbedNorm
from sae_kernels.reference import SE, TORCH_ACTIVATIONS, sae_reference

#: (backend, strategy): the C++ kernels, and the Triton kernels under each launch strategy
BACKENDS = {"cpu": ("cpu", "auto"), "triton-single": ("triton", "single"),
            "triton-split": ("triton", "split")}
#: the epilogues checked with every prologue (the rest differ from these only in the tail)
PROLOGUE_EPILOGUES = ["scale", "residual", "identity_relu", "residual_identity_relu"]
#: where each activation's derivative jumps: inputs are kept this far from them, or a
#: low-precision run may legitimately take the other side (relative to |kink| + 1)
KINKS = {"none": [], "relu": [0.0], "silu": [], "hardswish": [-3.0, 3.0]}
KINK_MARGIN = 2e-2


def _away_from_kinks(x, scale, shift, act, dtype):
    """x (rounded to dtype) moved so that x * scale + shift keeps off the kinks of act."""
    x = x.to(dtype).double()
    for kink in KINKS[act]:
        v = x * scale[:, None, None] + shift[:, None, None]
        near = (v - kink).abs() < KINK_MARGIN * (abs(kink) + 1)
        x = torch.where(near, x + 4 * KINK_MARGIN * (abs(kink) + 1) / scale[:, None, None], x)
        x = x.to(dtype).double()
    return x


def check_prologue(n, c, h, w, act="silu", with_scale=True, with_shift=True,
                   epilogue="scale", channels_last=False, dtype=torch.float32, backend="cpu",
                   strategy="auto", single_fc=False, seed=0, frozen_prologue=False):
    """Fused (``backend``) vs the float64 reference on the same rounded values;
    ``frozen_prologue``: the prologue's scale and shift take no gradient."""
    gen = torch.Generator().manual_seed(seed)
    device = DEVICE if backend == "triton" else torch.device("cpu")
    residual, with_identity, act_out = EPILOGUES[epilogue]
    k = c if single_fc else max(1, c // 4)
    scale = (torch.rand(c, generator=gen, dtype=torch.float64) + 0.5).to(dtype).double()
    shift = (torch.randn(c, generator=gen, dtype=torch.float64) * 0.5).to(dtype).double()
    x = torch.randn(n, c, h, w, generator=gen, dtype=torch.float64) * 2
    x = _away_from_kinks(x, scale if with_scale else torch.ones(c, dtype=torch.float64),
                         shift if with_shift else torch.zeros(c, dtype=torch.float64), act, dtype)
    tensors = {
        "x": x,
        "fc1_weight": torch.randn(k, c, generator=gen, dtype=torch.float64) / c ** 0.5,
        "fc1_bias": torch.randn(k, generator=gen, dtype=torch.float64),
        "fc2_weight": None if single_fc else torch.randn(c, k, generator=gen,
                                                         dtype=torch.float64) / k ** 0.5,
        "fc2_bias": None if single_fc else torch.randn(c, generator=gen, dtype=torch.float64),
        "identity": torch.randn(n, c, h, w, generator=gen, dtype=torch.float64)
        if with_identity else None,
        "prologue_scale": scale if with_scale else None,
        "prologue_shift": shift if with_shift else None,
    }
    grad = torch.randn(n, c, h, w, generator=gen, dtype=torch.float64).to(dtype)
    options = dict(act="relu", gate="sigmoid", residual=residual, act_out=act_out,
                   prologue_act=act)

    def leaves(to):
        out = {}
        for name, t in tensors.items():
            if t is not None:
                t = to(t)
                if t.dim() == 4 and channels_last:
                    t = t.to(memory_format=torch.channels_last)
                t = t.detach().requires_grad_(
                    not (frozen_prologue and name.startswith("prologue")))
            out[name] = t
        return out

    fused_in = leaves(lambda t: t.to(device, dtype))
    truth_in = leaves(lambda t: t.to(dtype).double())
    y = sae(**fused_in, **options, backend=backend, strategy=strategy)
    y.backward((grad.to(memory_format=torch.channels_last) if channels_last else grad).to(device))
    y64 = sae_reference(**truth_in, **options)
    y64.backward(grad.double())
    assert y.dtype == dtype and y.shape == x.shape
    assert_close_to_truth("y", y, y64, dtype)
    for name, t in fused_in.items():
        if t is not None and t.requires_grad:
            assert t.grad is not None and t.grad.dtype == dtype, name
            assert_close_to_truth(f"d {name}", t.grad, truth_in[name].grad, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(3, 19, 13, 17), (2, 64, 7, 7), (1, 1, 1, 1), (2, 3, 1, 1),
                                   (0, 3, 2, 2), (2, 40, 33, 33)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("act", PROLOGUE_ACTIVATIONS)
def test_shapes(act, shape, layout, backend):
    backend, strategy = BACKENDS[backend]
    check_prologue(*shape, act=act, channels_last=LAYOUTS[layout], backend=backend,
                   strategy=strategy)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("epilogue", PROLOGUE_EPILOGUES)
@pytest.mark.parametrize("act", PROLOGUE_ACTIVATIONS)
def test_dtypes_and_epilogues(act, epilogue, dtype, layout, backend):
    backend, strategy = BACKENDS[backend]
    if backend == "cpu" and dtype == "fp16":
        pytest.skip("the C++ kernels take no float16")
    check_prologue(3, 19, 9, 7, act=act, epilogue=epilogue, dtype=DTYPES[dtype],
                   channels_last=LAYOUTS[layout], backend=backend, strategy=strategy)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("single_fc", [False, True])
@pytest.mark.parametrize("with_scale,with_shift", [(True, False), (False, True), (False, False)])
@pytest.mark.parametrize("act", ["none", "hardswish"])
def test_partial_prologue(act, with_scale, with_shift, single_fc, backend):
    """scale or shift absent (1 and 0), or only the activation; also the single-FC form."""
    backend, strategy = BACKENDS[backend]
    check_prologue(2, 19, 6, 5, act=act, with_scale=with_scale, with_shift=with_shift,
                   single_fc=single_fc, backend=backend, strategy=strategy)


def test_prologue_is_applied():
    """Each part of the prologue changes the output (so the checks above can fail)."""
    torch.manual_seed(0)
    x, w1, w2 = torch.randn(2, 8, 4, 4), torch.randn(2, 8), torch.randn(8, 2)
    scale, shift = torch.rand(8) + 0.5, torch.randn(8)
    plain = sae(x, w1, None, w2, None)
    for kwargs in (dict(prologue_scale=scale), dict(prologue_shift=shift),
                   dict(prologue_act="silu")):
        assert not torch.allclose(sae(x, w1, None, w2, None, **kwargs), plain)


@pytest.mark.parametrize("name,bad,error", [
    ("prologue_scale", torch.ones(5), ValueError),
    ("prologue_shift", torch.ones(8, 1), ValueError),
    ("prologue_scale", torch.ones(8, dtype=torch.int32), TypeError),
])
def test_bad_prologue(name, bad, error):
    x, w1, w2 = torch.randn(2, 8, 4, 4), torch.randn(2, 8), torch.randn(8, 2)
    with pytest.raises(error, match=name):
        sae(x, w1, None, w2, None, **{name: bad})
    with pytest.raises(ValueError, match="prologue_act"):
        sae(x, w1, None, w2, None, prologue_act="gelu")


# ---------------------------------------------------------------- AbsorbedNorm


def _norm(c, gen):
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=gen) * 0.3)
        bn.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
        bn.weight.copy_(torch.rand(c, generator=gen) + 0.5)
        bn.bias.copy_(torch.randn(c, generator=gen) * 0.3)
    return bn


def _pair(act, seed=0):
    """A BatchNorm + activation + SE in plain PyTorch, and its absorbed copy (float64)."""
    gen = torch.Generator().manual_seed(seed)
    c = 19
    reference = nn.Sequential(_norm(c, gen), nn.SiLU() if act == "silu" else nn.ReLU(),
                              SE(c, rd_channels=5)).double()
    absorbed = copy.deepcopy(reference)
    norm = AbsorbedNorm(absorbed[0], act, None)
    fused = FusedSE.from_module(absorbed[2])
    fused.absorb_prologue(norm)
    absorbed[0], absorbed[1], absorbed[2] = norm, AbsorbedAct(norm, absorbed[1]), fused
    return reference, absorbed


@pytest.mark.parametrize("act", ["silu", "relu"])
@pytest.mark.parametrize("mode", ["eval", "train", "frozen_norm"])
def test_absorbed_norm_matches(mode, act):
    """eval: the SE applies the norm; train: the norm runs itself (batch statistics);
    frozen_norm: norm in eval, the rest training, gradients reach the norm's affine."""
    reference, absorbed = _pair(act)
    for model in (reference, absorbed):
        model.train(mode != "eval")
        if mode == "frozen_norm":
            model[0].eval()
    x = torch.randn(3, 19, 6, 5, dtype=torch.float64) + 0.5
    y_ref, y = reference(x), absorbed(x)
    assert torch.allclose(y, y_ref, rtol=1e-9, atol=1e-9)
    y_ref.square().sum().backward()
    y.square().sum().backward()
    for (name, p_ref), p in zip(reference.named_parameters(), absorbed.parameters(), strict=True):
        assert torch.allclose(p.grad, p_ref.grad, rtol=1e-9, atol=1e-9), name
    for name, b_ref in reference.named_buffers():  # train mode updated the same statistics
        assert torch.equal(absorbed.get_buffer(name), b_ref), name
    assert absorbed[0].absorbed == (mode != "train")


def test_absorbed_norm_keeps_state_dict():
    reference, absorbed = _pair("silu")
    expected = {k: v.shape for k, v in reference.state_dict().items()}
    assert {k: v.shape for k, v in absorbed.state_dict().items()} == expected
    absorbed.load_state_dict(reference.state_dict(), strict=True)
    reference.load_state_dict(absorbed.state_dict(), strict=True)


def test_absorbed_norm_cache_follows_updates():
    """The cached eval-mode affine is recomputed when a statistic changes in place."""
    reference, absorbed = _pair("silu")
    reference.eval(), absorbed.eval()
    x = torch.randn(2, 19, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        absorbed(x)
        for model in (reference, absorbed):
            model[0].running_var.mul_(2)
        assert torch.allclose(absorbed(x), reference(x), rtol=1e-9, atol=1e-9)


def test_absorbed_norm_cache_follows_new_parameters():
    """A parameter replaced by another (same version count) is seen too."""
    reference, absorbed = _pair("silu")
    reference.eval(), absorbed.eval()
    x = torch.randn(2, 19, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        absorbed(x)
        weight = nn.Parameter(torch.rand(19, dtype=torch.float64) + 0.5)
        reference[0].weight, absorbed[0].weight = weight, weight
        assert torch.allclose(absorbed(x), reference(x), rtol=1e-9, atol=1e-9)


def test_absorbed_norm_refuses_batch_statistics_only():
    with pytest.raises(ValueError, match="running statistics"):
        AbsorbedNorm(nn.BatchNorm2d(4, track_running_stats=False), "relu", None)


def test_torch_activations_cover_prologue():
    assert set(PROLOGUE_ACTIVATIONS) - {"none"} <= set(TORCH_ACTIVATIONS)
    assert F.silu is TORCH_ACTIVATIONS["silu"]
