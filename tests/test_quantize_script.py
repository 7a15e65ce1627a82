"""Whole-model transforms of converted models: eager dynamic quantization leaves the fused
blocks in float, torch.jit.script names its limitation and what to use instead."""

import warnings

import pytest
import torch
from test_convert import build, randomize
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

from sae_kernels import FusedEffectiveSE, FusedSaE, SaE, convert
from sae_kernels.blocks import FusedResidualBlock

timm = pytest.importorskip("timm")
from timm.layers import EffectiveSEModule, SEModule  # noqa: E402
from timm.models import resnet  # noqa: E402
from timm.models._efficientnet_blocks import SqueezeExcite  # noqa: E402

FUSED = (FusedSaE, FusedEffectiveSE)


def fused_blocks(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, FUSED)]


@pytest.mark.parametrize("qconfig_spec", [{nn.Linear}, None], ids=["linear", "default"])
@pytest.mark.parametrize("source,name", [("timm", "seresnet18"), ("timm", "rexnet_100"),
                                         ("torchvision", "mobilenet_v3_small")],
                         ids=lambda v: v)
def test_quantize_dynamic_leaves_the_fused_blocks_in_float(source, name, qconfig_spec):
    """The fused blocks (residual, with a BatchNorm, torchvision's) keep their float FCs,
    with a warning; the classifier is quantized; the output stays close to the float one."""
    converted = convert(randomize(build(source, name)).eval())[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quantized = torch.ao.quantization.quantize_dynamic(converted, qconfig_spec)
    messages = {str(w.message) for w in caught}
    assert {f"{type(m).__name__} stays in float under torch.ao.quantization: the fused operator "
            "computes with float weights" for m in fused_blocks(converted)} <= messages
    assert len(fused_blocks(quantized)) == len(fused_blocks(converted))
    for got, float_block in zip(fused_blocks(quantized), fused_blocks(converted), strict=True):
        assert [type(m) for m in got.modules()] == [type(m) for m in float_block.modules()]
        for p, q in zip(got.parameters(), float_block.parameters(), strict=True):
            assert torch.equal(p, q)
    assert any(isinstance(m, DynamicQuantizedLinear) for m in quantized.modules())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = converted(x)
        got = quantized(x)
    # int8 classifier inputs and weights (per tensor, 127 steps each): measured 0.3-1.5% of
    # the output's largest element; a fused block computing garbage moves it by order 1
    assert (got - expected).abs().max() <= 0.05 * expected.abs().max()


def test_quantize_dynamic_twice_in_place():
    """Quantization clears every qconfig when done; the fused blocks stay float each time."""
    converted = convert(nn.Sequential(SqueezeExcite(16), nn.Flatten(), nn.Linear(16 * 9, 4)))[0]
    with pytest.warns(UserWarning, match="FusedSE stays in float"):
        for _ in range(2):
            torch.ao.quantization.quantize_dynamic(converted, {nn.Linear}, inplace=True)
    assert type(converted[0].excite) is nn.Linear and isinstance(converted[2],
                                                                 DynamicQuantizedLinear)
    assert converted(torch.randn(2, 16, 3, 3)).shape == (2, 4)


def basic_block() -> nn.Module:
    return resnet.BasicBlock(16, 16, attn_layer="se").eval()


#: One block per fused class, as convert makes them.
SCRIPT_CASES = {
    "FusedSE": lambda: SqueezeExcite(16),
    "FusedSaE": lambda: SaE(16, reduction=4, cardinality=2),
    "FusedEffectiveSE": lambda: EffectiveSEModule(16),
    "FusedSEWithNorm": lambda: SEModule(16, rd_channels=4, norm_layer=nn.BatchNorm2d).eval(),
    "FusedResidualBlock": basic_block,
}


@pytest.mark.parametrize("make", SCRIPT_CASES.values(), ids=SCRIPT_CASES.keys())
def test_script_names_the_limitation_and_trace_captures(make):
    converted = convert(nn.Sequential(nn.Conv2d(3, 16, 1), make()))[0]
    fused = converted[1]
    se = fused.se if isinstance(fused, FusedResidualBlock) else fused
    with pytest.raises(NotImplementedError,
                       match=rf"{type(se).__name__} cannot be compiled by torch\.jit\.script: .*"
                             r"torch\.jit\.trace.*torch\.export\.export.*sae_kernels\.revert"):
        torch.jit.script(converted)
    x = torch.randn(2, 3, 6, 5)
    with torch.no_grad():
        traced = torch.jit.trace(converted, x)
        torch.testing.assert_close(traced(x), converted(x), rtol=0, atol=0)

