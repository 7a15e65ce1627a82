"""convert(): every SE variant it knows, what it must leave alone, and real models."""

import copy
from functools import partial

import pytest
import torch
from torch import nn

from helpers import assert_close_to_truth
from sae_kernels import SE, FusedEffectiveSE, FusedSaE, FusedSE, SaE
from sae_kernels.blocks import FusedResidualBlock
from sae_kernels.convert import convert
from sae_kernels.kernels import cpu as cpu_kernels
from sae_kernels.prologue import AbsorbedAct, AbsorbedNorm

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")
from timm.layers import (  # noqa: E402
    BlurPool2d,
    DropBlock2d,
    EcaModule,
    EffectiveSEModule,
    GatherExcite,
    GlobalContext,
    SEModule,
)
from timm.layers.cbam import CbamModule  # noqa: E402
from timm.layers.mixed_conv2d import MixedConv2d  # noqa: E402
from timm.models import resnet, senet  # noqa: E402
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
    float64 original, at most twice the original's own fp32 error plus a few ulps of the
    output's scale."""
    assert_as_accurate_as_original(randomize(build(source, name)).eval(), torch.randn(8, 3, 64, 64))


def assert_as_accurate_as_original(model: nn.Module, x: torch.Tensor) -> None:
    """The converted fp32 ``model`` against the float64 original: the median over the
    samples of its error at most twice the original's own, plus a few ulps of the output's
    scale. Per sample, not one maximum: with random BatchNorm statistics a network can
    amplify a rounding difference anywhere in it tenfold, so one sample's error is a draw
    from a wide distribution (for regnety_016 the ratio of two fp32 computations' maxima
    ranged 0.5-4.8 over four inputs); the medians over independent samples compare the
    distributions. In eval mode the samples do not interact."""
    with torch.no_grad():
        truth = copy.deepcopy(model).double()(x.double())
        original = model(x)
        converted = convert(model)[0](x)

    def error(y: torch.Tensor) -> torch.Tensor:
        return (y.double() - truth).abs().flatten(1).amax(dim=1).median()

    scale = truth.abs().max()
    assert error(converted) <= 2 * error(original) + 2.0**-20 * scale


# Residual tails: relu(se(y) + shortcut) in the fused SE's pass

TAIL = ("shortcut add", "relu")


def absorbs_tail(entry) -> bool:
    """The block's tail is absorbed (after the normalisation before the SE, if that was)."""
    return entry.absorbed[-len(TAIL):] == TAIL


def downsample(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                         nn.BatchNorm2d(out_channels))


def with_se(block: nn.Module, se: nn.Module) -> nn.Module:
    block.se = se
    return block


#: One block of every class in BLOCK_REWRITES, with the optional parts their forward has.
RESIDUAL_BLOCKS = {
    "resnet_basic_aa_downsample": lambda: resnet.BasicBlock(
        16, 32, stride=2, downsample=downsample(16, 32, 2), attn_layer="se", aa_layer=BlurPool2d),
    "resnet_bottleneck_drop_block": lambda: resnet.Bottleneck(
        32, 8, attn_layer="se", drop_block=partial(DropBlock2d, 0.2, 3)),
    "resnet_basic_own_se": lambda: with_se(resnet.BasicBlock(16, 16), SE(16, reduction=4)),
    "resnet_bottleneck_own_sae": lambda: with_se(
        resnet.Bottleneck(32, 8), SaE(32, reduction=8, cardinality=2, residual=True)),
    "senet_block": lambda: senet.SEResNetBlock(16, 16, groups=1, reduction=4),
    "senet_bottleneck_downsample": lambda: senet.SEBottleneck(
        32, 8, groups=4, reduction=4, stride=2, downsample=downsample(32, 32, 2)),
    "senet_resnet_bottleneck": lambda: senet.SEResNetBottleneck(32, 8, groups=1, reduction=4),
    "senet_resnext_bottleneck": lambda: senet.SEResNeXtBottleneck(
        32, 8, groups=4, reduction=4, base_width=8),
}


def outputs_and_gradients(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Output, dx and every parameter's gradient (the same dropout and drop-path masks)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    x = x.clone().requires_grad_(True)
    y = model(x)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(2), dtype=y.dtype))
    return [y.detach(), x.grad, *(p.grad for p in model.parameters())]


def assert_same_function(original: nn.Module, converted: nn.Module, x: torch.Tensor) -> None:
    """float64: output, dx and gradients equal up to summation order (the fused SE's
    parameters are its block's, in the same order, as (K, C) matrices)."""
    expected = outputs_and_gradients(original, x)
    got = outputs_and_gradients(converted, x)
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        # absolute error relative to the tensor's largest element: deep backward passes
        # carry gradients of any scale
        scale = max(1.0, e.abs().max().item())
        torch.testing.assert_close(g.reshape(e.shape), e, rtol=1e-9, atol=1e-9 * scale)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("make", RESIDUAL_BLOCKS.values(), ids=RESIDUAL_BLOCKS.keys())
def test_residual_block_tail_absorbed(make, train):
    block = randomize(make()).double().train(train)
    fused, report = convert(block)
    assert type(fused) is FusedResidualBlock and fused.training == train
    assert [c.path for c in report.converted] == [fused.layout.se]
    assert absorbs_tail(report.converted[0])
    assert fused.get_submodule(fused.layout.se).act_out == "relu"
    assert_same_function(block, fused, torch.randn(2, block.conv1.in_channels, 8, 8,
                                                   dtype=torch.float64))


def state_dict_shapes_outside(model: nn.Module, se_paths: list[str]) -> list:
    inside = tuple(f"{path}." for path in se_paths)
    return [(key, value.shape) for key, value in model.state_dict().items()
            if not key.startswith(inside)]


@pytest.mark.parametrize("name", ["seresnet18", "seresnet50", "legacy_seresnet18"])
def test_real_models_absorb_the_tails(name):
    """Every block's tail in its SE; the same function (fp64), as accurate (fp32), the same
    state_dict outside the SE blocks."""
    model = randomize(build("timm", name)).double()
    converted, report = convert(model)
    assert len(report.converted) == sum(isinstance(m, SE_CLASSES) for m in model.modules())
    assert all(absorbs_tail(c) and all(r.startswith("prologue: ") for r in c.not_absorbed)
               for c in report.converted), str(report)
    # the legacy blocks apply one ReLU module twice: it is not the SE's alone to absorb
    assert (("not absorbed: prologue: relu is called more than once" if name.startswith("legacy")
             else "(BatchNorm), shortcut add, relu") in str(report))
    blocks = [m for m in converted.modules() if isinstance(m, FusedResidualBlock)]
    assert len(blocks) == len(report.converted)
    # the legacy blocks' SE reads bn2's output through the block's ReLU
    last = {"seresnet50": "conv3", "seresnet18": "conv2"}.get(name, "bn2")
    assert all(c.overwrites == last for c in report.converted), str(report)
    se_paths = [c.path for c in report.converted]
    assert (state_dict_shapes_outside(converted, se_paths)
            == state_dict_shapes_outside(model, se_paths))
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    for m in (model, converted):
        m.eval()
    with torch.no_grad():
        for layout in (torch.contiguous_format, torch.channels_last):
            x_in = x.contiguous(memory_format=layout)
            torch.testing.assert_close(converted(x_in), model(x_in), rtol=1e-9, atol=1e-9)
    for m in (model, converted):
        m.train()
    assert_same_function(model, converted, x)
    assert_as_accurate_as_original(randomize(build("timm", name)).eval(),
                                   torch.randn(8, 3, 64, 64))


@pytest.mark.parametrize("block_args,reason", [
    (dict(block_args=dict(attn_layer="se"), act_layer="silu"), "act2 is SiLU, not ReLU"),
    (dict(block_args=dict(attn_layer="ese")), "the single-FC fused block takes no shortcut"),
], ids=["silu", "effective_se"])
def test_tail_left_outside_with_a_reason(block_args, reason):
    model = randomize(timm.create_model("resnet18", **block_args)).double().eval()
    converted, report = convert(model)
    assert len(report.converted) == 8 and not report.skipped
    assert all(c.absorbed == ("bn2 (BatchNorm)",) and c.not_absorbed == (f"block tail: {reason}",)
               for c in report.converted), str(report)
    assert f"not absorbed: block tail: {reason}" in str(report)
    assert not any(isinstance(m, FusedResidualBlock) for m in converted.modules())
    assert_same_function(model, converted, torch.randn(2, 3, 32, 32, dtype=torch.float64))


def test_drop_path_absorbed_when_converted_in_eval():
    """Active in train mode, DropPath keeps the tail outside; converted in eval, the block
    still applies it when trained later (then unfused)."""
    model = randomize(timm.create_model("seresnet18", drop_path_rate=0.2)).double().train()
    _, report = convert(model)
    assert absorbs_tail(report.converted[0])  # the first block has no DropPath
    assert all(c.not_absorbed == ("block tail: drop_path is active in train mode (it scales "
                                  "the SE output per sample before the add)",)
               for c in report.converted[1:]), str(report)
    converted, report = convert(model.eval())
    assert all(absorbs_tail(c) for c in report.converted)
    # 64x64: at 32x32 the last stage's train-mode BatchNorm sees two values per channel
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    assert_same_function(model, converted, x)
    assert_same_function(model.train(), converted.train(), x)
    for m in (model, converted):  # fine-tuning with frozen norms: the prologue stays on
        for norm in m.modules():
            if isinstance(norm, (nn.BatchNorm2d, AbsorbedNorm)):
                norm.eval()
    assert_same_function(model, converted, x)


def test_residual_block_shared_frozen_modes_and_copy():
    block = resnet.BasicBlock(16, 16, attn_layer="se")
    model = nn.Sequential(block, block).train()
    block.requires_grad_(False)
    block.bn1.eval()  # a child in another mode than its block
    converted, report = convert(model)
    assert type(model[0]) is resnet.BasicBlock and type(model[0].se) is SEModule
    assert converted[0] is converted[1] and type(converted[0]) is FusedResidualBlock
    assert len(report.converted) == 1
    fused = converted[0]
    assert fused.training and fused.se.training and not fused.bn1.training
    assert not any(p.requires_grad for p in converted.parameters())
    same, _ = convert(model, inplace=True)
    assert same is model and type(model[0]) is FusedResidualBlock


def test_se_block_used_outside_its_block_keeps_the_tail():
    block = resnet.BasicBlock(16, 16, attn_layer="se")
    model = nn.Sequential(block, block.se)
    converted, report = convert(model)
    assert type(converted[0]) is resnet.BasicBlock and converted[0].se is converted[1]
    assert [c.not_absorbed for c in report.converted] == [
        ("block tail: the SE block is also used outside this block",)]


def test_block_unlike_its_layout_keeps_the_tail():
    block = resnet.BasicBlock(16, 16, attn_layer="se")
    del block.aa  # as if from a timm version without anti-aliasing
    converted, report = convert(block)
    assert type(converted) is resnet.BasicBlock and type(converted.se) is FusedSE
    assert report.converted[0].not_absorbed == (
        "block tail: no attribute aa (a version of BasicBlock this layout does not describe)",
        "prologue: BasicBlock could not be traced with torch.fx (AttributeError)")


# Prologues: the BatchNorm (+ activation) feeding an SE, applied in the SE's passes

PROLOGUE_MODELS = [("timm", "efficientnet_b0"), ("timm", "mobilenetv3_large_100"),
                   ("timm", "regnety_016"), ("torchvision", "mobilenet_v3_large"),
                   ("torchvision", "efficientnet_b0")]


@pytest.mark.parametrize("source,name", PROLOGUE_MODELS, ids=lambda v: v)
def test_real_models_absorb_the_normalisation(source, name):
    """Every SE takes over the norm (+ act) before it; the state_dict keeps the original's
    keys and shapes (checkpoints load strictly both ways); float64 eval, and training with
    the norms frozen in eval (gradients through the prologue), give the same function."""
    model = randomize(build(source, name)).double().eval()
    converted, report = convert(model)
    assert all(c.absorbed and "BatchNorm" in c.absorbed[0] for c in report.converted), str(report)
    assert {k: v.shape for k, v in converted.state_dict().items()
            if not k.startswith(tuple(f"{c.path}." for c in report.converted))} == {
        k: v.shape for k, v in model.state_dict().items()
        if not k.startswith(tuple(f"{c.path}." for c in report.converted))}
    norms = [m for m in converted.modules() if isinstance(m, AbsorbedNorm)]
    assert len(norms) == len(report.converted)
    assert all(c.overwrites for c in report.converted), str(report)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), model(x), rtol=1e-9, atol=1e-9)
    for m in (model, converted):  # fine-tuning with frozen statistics
        m.train()
        for norm in m.modules():
            if isinstance(norm, (nn.BatchNorm2d, AbsorbedNorm)):
                norm.eval()
    assert all(norm.absorbed for norm in norms)
    assert_same_function(model, converted, x)


def test_absorbed_normalisation_in_fp32_and_train_mode():
    """fp32 as accurate as the original; in train mode the norms use batch statistics
    themselves (not absorbed) and update the same running statistics."""
    model = randomize(build("timm", "efficientnet_b0")).eval()
    assert_as_accurate_as_original(model, torch.randn(8, 3, 64, 64))
    model = model.double().train()
    converted = convert(model)[0]
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    assert_same_function(model, converted, x)
    for (key, value), expected in zip(converted.state_dict().items(),
                                      model.state_dict().values(), strict=True):
        if "running" in key:
            torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-12)


class NormActSE(nn.Module):
    """conv -> BatchNorm -> ReLU -> SE, where ``reuse`` names a tensor used once more."""

    def __init__(self, reuse: str | None) -> None:
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()
        self.se = SEModule(16, rd_channels=4)
        self.reuse = reuse

    def forward(self, x):
        normed = self.bn(self.conv(x))
        acted = self.act(normed)
        y = self.se(acted)
        if self.reuse == "bn":
            return y + normed
        if self.reuse == "act":
            return y + acted
        return y


@pytest.mark.parametrize("reuse", [None, "bn", "act"])
def test_normalisation_with_another_consumer_stays(reuse):
    """A norm or activation whose output is used besides the SE is left in place, with the
    reason in the report; either way the function is unchanged."""
    model = randomize(NormActSE(reuse)).double().eval()
    converted, report = convert(model)
    (entry,) = report.converted
    if reuse is None:
        assert entry.absorbed == ("bn (BatchNorm + relu)",) and not entry.not_absorbed
        assert isinstance(converted.bn, AbsorbedNorm) and isinstance(converted.act, AbsorbedAct)
    else:
        assert not entry.absorbed
        assert entry.not_absorbed == (f"prologue: {reuse} has 2 consumers, not only the SE",)
        assert type(converted.bn) is nn.BatchNorm2d and type(converted.act) is nn.ReLU
    assert_same_function(model, converted, torch.randn(2, 8, 6, 5, dtype=torch.float64))


class ConvIntoSE(nn.Module):
    """conv -> BatchNorm -> ReLU -> SE, or what ``case`` says instead: the convolution's or
    the activation's output read again, the SE on the model's input, or on a function's
    output."""

    def __init__(self, case: str) -> None:
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.se = SEModule(8, rd_channels=4)
        self.case = case

    def forward(self, x):
        if self.case == "model input":
            return self.se(x) + self.act(self.bn(self.conv(x)))
        c = self.conv(x)
        if self.case == "function output":
            return self.se(torch.tanh(self.act(self.bn(c))))
        a = self.act(self.bn(c))
        y = self.se(a)
        if self.case == "conv read again":
            return y + c
        return y + a if self.case == "activation read again" else y


@pytest.mark.parametrize("case,overwrites", [
    ("only the SE", "conv"), ("conv read again", None), ("activation read again", None),
    ("model input", None), ("function output", None)])
def test_se_writes_over_a_convolution_output_only_it_reads(case, overwrites):
    """Where the graph proves that nothing but the SE reads the convolution's output (the
    norm and activation between absorbed), the SE writes its own over it in inference,
    and says so in the report; anywhere else it allocates. Either way the function is the
    original's, with and without gradients, and the model's input is never written."""
    model = randomize(ConvIntoSE(case)).double().eval()
    converted, report = convert(model)
    (entry,) = report.converted
    assert entry.overwrites == overwrites
    assert ("writes y over conv's output" in str(report)) == (overwrites is not None)
    x = torch.randn(2, 8, 6, 5, dtype=torch.float64)
    original_x = x.clone()
    with torch.no_grad(), torch.profiler.profile() as prof:
        torch.testing.assert_close(converted(x), model(x), rtol=1e-9, atol=1e-9)
    names = {e.name for e in prof.events()}
    if cpu_kernels.op_entry() is not torch.ops.sae_kernels.cpu_sae:
        assert ("sae_kernels::cpu_sae_" in names) == (overwrites is not None)
    assert torch.equal(x, original_x)
    assert_same_function(model, converted, x)
    assert convert(model, overwrite_inputs=False)[1].converted[0].overwrites is None


def test_se_writes_over_a_mixed_convolution_output():
    """timm's MixedConv2d (MixNet) concatenates its groups' outputs into a new tensor: an SE
    reading only that writes over it, and computes the original's function."""
    model = randomize(nn.Sequential(MixedConv2d(8, 8, [3, 5]), nn.BatchNorm2d(8), nn.SiLU(),
                                    SqueezeExcite(8, rd_ratio=0.5))).double().eval()
    converted, report = convert(model)
    assert report.converted[0].overwrites == "0", str(report)
    x = torch.randn(2, 8, 6, 5, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), model(x), rtol=1e-9, atol=1e-9)


def test_se_with_a_norm_inside_keeps_its_input():
    """RexNet's SE (a BatchNorm on the reduced vector) computes through the functional
    form, which never writes over x: convert does not say it does."""
    model = nn.Sequential(nn.Conv2d(8, 16, 3), SEModule(16, rd_channels=4,
                                                       norm_layer=nn.BatchNorm2d)).eval()
    converted, report = convert(model)
    assert type(converted[1]).__name__ == "FusedSEWithNorm"
    assert report.converted[0].overwrites is None and not converted[1].input_producers


def test_converted_model_under_inductor():
    """A converted block with an absorbed norm and a fused tail compiles with inductor (the
    composite rule) and computes what the original computes."""
    model = randomize(nn.Sequential(NormActSE(None), resnet.BasicBlock(16, 16, attn_layer="se")))
    model = model.eval()
    converted, report = convert(model)
    assert [bool(c.absorbed) for c in report.converted] == [True, True]
    x = torch.randn(2, 8, 6, 5)
    torch._dynamo.reset()
    compiled = torch.compile(converted, backend="inductor", fullgraph=True)
    with torch.no_grad():
        # fp32, inductor's own summation orders (mean, FCs, convolution): a few ulps of
        # each sum, far below what a wrong prologue or tail would change (order 1)
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)
