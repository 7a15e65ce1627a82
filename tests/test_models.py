"""SE-ResNet and SENetV2 builders: structure, and fused == reference."""

import pytest
import torch

from sae_kernels import FusedSaE, FusedSE, SaE, convert
from sae_kernels.models import DEPTHS, se_resnet, senetv2_resnet

BUILDERS = {"se_resnet": (se_resnet, FusedSE), "senetv2_resnet": (senetv2_resnet, FusedSaE)}


@pytest.mark.parametrize("depth,cifar", [(50, False), (101, False), (18, True), (50, True)])
@pytest.mark.parametrize("builder", BUILDERS)
def test_structure(builder, depth, cifar):
    build, fused_type = BUILDERS[builder]
    model = build(depth, num_classes=10, cifar=cifar).eval()
    blocks = [m for m in model.modules() if isinstance(m, SaE)]
    assert len(blocks) == sum(DEPTHS[depth][1])
    assert all(type(b) is fused_type and b.act_out == "relu" for b in blocks)
    assert all(b.residual == (builder == "senetv2_resnet") for b in blocks)
    size = 32 if cifar else 64
    with torch.no_grad():
        assert model(torch.randn(2, 3, size, size)).shape == (2, 10)


@pytest.mark.parametrize("builder", BUILDERS)
def test_fused_and_reference_compute_the_same(builder):
    """Same parameter names; in float64 the same outputs and gradients, in eval and train."""
    build, _ = BUILDERS[builder]
    torch.manual_seed(0)
    reference = build(18, num_classes=10, cifar=True, fused=False).double()
    fused = build(18, num_classes=10, cifar=True).double()
    fused.load_state_dict(reference.state_dict())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    for train in (False, True):
        results = []
        for model in (reference, fused):
            model.train(train).zero_grad()
            out = model(x)
            out.square().sum().backward()
            results.append([out.detach(), *(p.grad for p in model.parameters())])
        for ref, got in zip(*results, strict=True):
            # float64 rounding grown through 18 layers stays far below 1e-9
            torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)


def test_converting_the_reference_network():
    reference = se_resnet(50, num_classes=10, fused=False).eval()
    converted, report = convert(reference)
    assert len(report.converted) == 16 and not report.skipped
    assert sum(isinstance(m, FusedSE) for m in converted.modules()) == 16


def test_unknown_depth():
    with pytest.raises(ValueError, match="depth must be one of"):
        se_resnet(42)
