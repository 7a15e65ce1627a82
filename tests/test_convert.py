"""convert(): every SE variant it knows, what it must leave alone, and real models."""

import copy

import pytest
import torch
from torch import nn

from helpers import assert_close_to_truth
from sae_kernels import SE, FusedEffectiveSE, FusedSaE, FusedSE, SaE
from sae_kernels.convert import convert

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")
from timm.layers import (  # noqa: E402
    EcaModule,
    EffectiveSEModule,
    GatherExcite,
    GlobalContext,
    SEModule,
)
from timm.layers.cbam import CbamModule  # noqa: E402
from timm.models._efficientnet_blocks import SqueezeExcite  # noqa: E402
from timm.models.hgnet import EseModule  # noqa: E402
from timm.models.senet import SEModule as LegacySEModule  # noqa: E402
from torchvision.ops import SqueezeExcitation  # noqa: E402

#: The SE classes of the acceptance models, counted independently of the converter.
SE_CLASSES = (SEModule, SqueezeExcite, LegacySEModule, SqueezeExcitation, EffectiveSEModule,
              EseModule)


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights and BatchNorm statistics everywhere: timm zero-initialises the last
    norm (or NFNet's conv gain) of each residual block, which would hide the SE blocks
    from the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            for name, p in m.named_parameters(recurse=False):
                if p.numel() == (p.shape[0] if p.dim() else 1):  # per-channel or scalar:
                    # norm scales and conv gains around 1, shifts and biases around 0
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (name in ("weight", "gain")))
    return model


def run_block(block: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> dict[str, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    y = block(x)
    y.backward(grad)
    return {"y": y.detach(), "dx": x.grad}


def check_block(block: nn.Module, variant: str, *, train: bool = False, shape=(3, 24, 5, 7),
                channels_last: bool = False) -> None:
    """Converted block against the original in float64 (the truth): output and dx, and
    the fused parameters' gradients against the original's."""
    block = block.train(train)
    x = torch.randn(shape)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    grad = torch.randn_like(x)
    fused, report = convert(block)
    assert [c.variant for c in report.converted] == [variant], str(report)
    assert isinstance(fused, (FusedSE, FusedEffectiveSE)) and fused.training == train
    truth_block = copy.deepcopy(block).double()
    truth = run_block(truth_block, x.double(), grad.double())
    got = run_block(fused, x, grad)
    for key in truth:
        assert_close_to_truth(f"{variant} {key}", got[key], truth[key], torch.float32)
    fc1 = next(m for m in truth_block.modules() if isinstance(m, nn.Conv2d))
    first = fused.fc if isinstance(fused, FusedEffectiveSE) else fused.branches[0]
    assert first.weight.grad.shape == fc1.weight.grad.shape[:2]


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("act,gate", [(nn.ReLU, "sigmoid"), (nn.SiLU, "hard_sigmoid"),
                                      (nn.GELU, "sigmoid"), (nn.Hardswish, "hard_sigmoid")])
def test_timm_se_module(act, gate, train):
    check_block(SEModule(24, rd_ratio=0.25, act_layer=act, gate_layer=gate), "timm.SEModule",
                train=train)


def test_timm_se_module_without_bias_channels_last():
    check_block(SEModule(24, rd_channels=5, bias=False), "timm.SEModule", channels_last=True)


def test_timm_se_module_batchnorm_folded_in_eval():
    block = randomize(SEModule(24, rd_channels=8, norm_layer=nn.BatchNorm2d))
    check_block(block, "timm.SEModule")


def test_timm_se_module_batchnorm_left_in_train():
    block = SEModule(24, rd_channels=8, norm_layer=nn.BatchNorm2d).train()
    model, report = convert(block)
    assert model is not block and type(model) is SEModule and not report.converted
    assert "only in eval mode" in report.skipped[0].reason


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("act,gate", [(nn.ReLU, nn.Sigmoid), (nn.SiLU, "hard_sigmoid"),
                                      (nn.Hardswish, "hard_sigmoid")])
def test_timm_squeeze_excite(act, gate, train):
    check_block(SqueezeExcite(24, act_layer=act, gate_layer=gate), "timm.SqueezeExcite",
                train=train)


def test_timm_legacy_se_module():
    check_block(LegacySEModule(24, reduction=4), "timm.senet.SEModule", train=True)


@pytest.mark.parametrize("act,gate", [(nn.ReLU, nn.Sigmoid), (nn.ReLU, nn.Hardsigmoid),
                                      (nn.SiLU, nn.Sigmoid)])
def test_torchvision_squeeze_excitation(act, gate):
    check_block(SqueezeExcitation(24, 6, activation=act, scale_activation=gate),
                "torchvision.SqueezeExcitation", train=True)


@pytest.mark.parametrize("gate", ["hard_sigmoid", "sigmoid"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_timm_effective_se(train, gate):
    check_block(EffectiveSEModule(24, gate_layer=gate), "timm.EffectiveSEModule", train=train,
                channels_last=train)


def test_hgnet_ese():
    check_block(EseModule(24), "timm.hgnet.EseModule", train=True)


def test_own_reference_blocks():
    for block, fused_type in ((SE(24, reduction=4), FusedSE), (SaE(24, 4, 3), FusedSaE)):
        model = nn.Sequential(nn.Conv2d(3, 24, 1), block)
        converted, report = convert(model)
        assert type(converted[1]) is fused_type
        assert report.converted[0].path == "1" and report.converted[0].rd_channels == 6
        x = torch.randn(2, 3, 4, 4)
        torch.testing.assert_close(converted(x), model(x), rtol=2.0**-16, atol=2.0**-18)


@pytest.mark.parametrize("make,reason", [
    (lambda: SEModule(24, add_maxpool=True), "add_maxpool"),
    (lambda: SEModule(24, act_layer="gelu_tanh"), "activation"),
    (lambda: SEModule(24, gate_layer="tanh"), "gate"),
    (lambda: EcaModule(24), "not an SE block"),
    (lambda: GatherExcite(24, use_mlp=False), "not an SE block"),
    (lambda: GlobalContext(24), "not an SE block"),
    (lambda: CbamModule(24), "not an SE block"),
    (lambda: EffectiveSEModule(24, add_maxpool=True), "add_maxpool"),
], ids=["add_maxpool", "gelu_tanh", "tanh_gate", "eca", "gather_excite", "global_context",
        "cbam", "effective_se_add_maxpool"])
def test_left_alone_with_a_reason(make, reason):
    block = make()
    model = nn.Sequential(nn.Identity(), block)
    converted, report = convert(model)
    assert not report.converted and reason in report.skipped[0].reason, str(report)
    assert report.skipped[0].path == "1" and type(converted[1]) is type(block)


def test_quantized_convolutions_are_left_alone():
    from torch.ao.nn.quantized import Conv2d as QuantizedConv2d

    block = SqueezeExcitation(8, 2)
    block.fc1 = QuantizedConv2d(8, 2, 1)
    _, report = convert(block)
    assert not report.converted and "not a float nn.Conv2d" in report.skipped[0].reason


def test_inplace_and_copy():
    model = nn.Sequential(SqueezeExcite(16), nn.ReLU())
    converted, _ = convert(model)
    assert type(model[0]) is SqueezeExcite and type(converted[0]) is FusedSE
    same, _ = convert(model, inplace=True)
    assert same is model and type(model[0]) is FusedSE


def test_shared_block_and_frozen_weights():
    block = SqueezeExcite(16)
    block.requires_grad_(False)
    model = nn.Sequential(block, nn.ReLU(), block)
    converted, report = convert(model)
    assert converted[0] is converted[2] and type(converted[0]) is FusedSE
    assert len(report.converted) == 1
    assert not any(p.requires_grad for p in converted[0].parameters())


def test_not_a_module():
    with pytest.raises(TypeError, match="expects an nn.Module"):
        convert(torch.randn(3))


MODELS = {
    # nf_regnet_b0: NFNet's attn_gain multiplies the SE output outside the block
    "timm": ["seresnet50", "seresnext26d_32x4d", "efficientnet_b0", "mobilenetv3_large_100",
             "regnety_016", "rexnet_100", "ese_vovnet19b_dw", "ghostnet_100",
             "legacy_seresnet18", "nf_regnet_b0"],
    "torchvision": ["mobilenet_v3_large", "efficientnet_b0", "regnet_y_400mf"],
}


def build(source: str, name: str) -> nn.Module:
    torch.manual_seed(0)
    if source == "timm":
        return timm.create_model(name, pretrained=False)
    return getattr(torchvision.models, name)()


@pytest.mark.parametrize("source,name", [(s, n) for s, names in MODELS.items() for n in names],
                         ids=lambda v: v)
def test_real_models(source, name):
    """Every SE block converted or reported; in float64 the converted model computes the
    same function (eval, and train where nothing was folded) up to summation order."""
    model = randomize(build(source, name)).double()
    blocks = sum(isinstance(m, SE_CLASSES) for m in model.modules())
    assert blocks > 0
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    for train in (False, True):
        model.train(train)
        converted, report = convert(model)
        assert len(report.converted) + len(report.skipped) == blocks, str(report)
        with_norm = sum(isinstance(m, SEModule) and not isinstance(m.bn, nn.Identity)
                        for m in model.modules())
        assert len(report.skipped) == (with_norm if train else 0), str(report)
        outputs = []
        for m in (model, converted):
            torch.manual_seed(1)  # the same dropout masks
            with torch.no_grad():
                outputs.append(m(x))
        # fp64 rounding (~1e-16) grown through the network's depth: 1e-9 is far above it
        # and far below any difference a wrong block would make
        torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("source,name", [(s, n) for s, names in MODELS.items() for n in names],
                         ids=lambda v: v)
def test_real_models_in_fp32(source, name):
    """In fp32 (eval) the converted model is as accurate as the original: against the
    float64 original, at most twice the original's own fp32 error (measured: 0.95-1.26x)
    plus a few ulps of the output's scale."""
    model = randomize(build(source, name)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        truth = copy.deepcopy(model).double()(x.double())
        original = model(x)
        converted = convert(model)[0](x)
    scale = truth.abs().max()
    own_error = (original.double() - truth).abs().max()
    assert (converted.double() - truth).abs().max() <= 2 * own_error + 2.0**-20 * scale
