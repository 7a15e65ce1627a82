"""Checkpoints of converted models: the original's state_dict format in both directions, and
revert() back to the original classes."""

import copy
import io
import pickle

import pytest
import torch
from test_convert import build, randomize
from torch import nn

from sae_kernels import SE, EffectiveSE, FusedEffectiveSE, FusedSaE, FusedSE, SaE, convert, revert
from sae_kernels.blocks import FusedResidualBlock, FusedSEWithNorm
from sae_kernels.prologue import AbsorbedAct, AbsorbedNorm

timm = pytest.importorskip("timm")
from timm.layers import SEModule  # noqa: E402
from timm.models import resnet  # noqa: E402
from timm.models._efficientnet_blocks import SqueezeExcite  # noqa: E402

MODELS = [("timm", "seresnet18"), ("timm", "efficientnet_b0"), ("timm", "mobilenetv3_large_100"),
          ("timm", "rexnet_100"), ("timm", "regnety_002"), ("timm", "legacy_seresnet18"),
          ("timm", "seresnext26d_32x4d"), ("torchvision", "mobilenet_v3_small"),
          ("torchvision", "efficientnet_b0"), ("sae_kernels", "own_blocks")]
#: The per-model runs in float64 take ~30 s on two cores (depthwise convolutions in float64).
slow = pytest.mark.slow
#: What convert puts into a model.
CONVERTED_CLASSES = (FusedSaE, FusedEffectiveSE, FusedResidualBlock, AbsorbedNorm, AbsorbedAct)


def own_blocks() -> nn.Module:
    """This package's reference blocks, whose fused versions share their format: an SE after
    a BatchNorm + ReLU (absorbed), an SaE (cached stacked weights), a timm BasicBlock around
    an SE (tail absorbed), an EffectiveSE."""
    block = resnet.BasicBlock(16, 16)
    block.se = SE(16, reduction=4)
    return nn.Sequential(nn.Conv2d(3, 16, 3, stride=4, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         SE(16, reduction=4), SaE(16, reduction=4, cardinality=2), block,
                         EffectiveSE(16), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def make(source: str, name: str, seed: int = 0, dtype: torch.dtype = torch.float64,
         ) -> nn.Module:
    """The model with random weights and statistics (the same architecture for every seed),
    in eval mode."""
    if source == "sae_kernels":
        torch.manual_seed(0)
        model = own_blocks()
    else:
        model = build(source, name)
    return randomize(model, seed).to(dtype).eval()


def inputs(seed: int = 0, n: int = 1, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def assert_same_entries(got: dict, expected: dict) -> None:
    """Same keys in the same order, shapes, dtypes and values, bit for bit."""
    assert list(got) == list(expected)
    for key, value in expected.items():
        assert got[key].shape == value.shape and got[key].dtype == value.dtype, key
        assert torch.equal(got[key], value), key


def assert_close(got: torch.Tensor, expected: torch.Tensor) -> None:
    """float64, up to summation order: 1e-9 of the tensor's scale is far above the rounding
    grown through a network and far below what a wrong weight would change."""
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9 * scale)


def classes(model: nn.Module) -> list[tuple[str, type]]:
    return [(path, type(m)) for path, m in model.named_modules()]


ids = [name if source != "torchvision" else f"tv_{name}" for source, name in MODELS]


@pytest.mark.parametrize("source,name", MODELS, ids=ids)
def test_state_dict_is_the_originals(source, name):
    """Keys in the original's order, shapes, dtypes and values: the converted model's
    state_dict is the original's."""
    model = make(source, name)
    converted, report = convert(model)
    assert report.converted and not report.skipped, str(report)
    assert any(isinstance(m, (FusedSaE, FusedEffectiveSE)) for m in converted.modules())
    assert_same_entries(converted.state_dict(), model.state_dict())


@slow
@pytest.mark.parametrize("source,name", MODELS, ids=ids)
def test_checkpoints_load_strictly_both_ways(source, name):
    """An original's checkpoint loads strictly into a converted model that ran already
    (cached weights, folded norms) and it computes what that original computes; its
    state_dict loads strictly into a fresh original, entry for entry the checkpoint."""
    converted = convert(make(source, name))[0]
    x = inputs()
    with torch.no_grad():
        converted(x)
        checkpoint = make(source, name, seed=1)
        converted.load_state_dict(checkpoint.state_dict(), strict=True)
        assert_close(converted(x), checkpoint(x))
    fresh = build(source, name) if source != "sae_kernels" else own_blocks()
    fresh = fresh.double()
    fresh.load_state_dict(converted.state_dict(), strict=True)
    assert_same_entries(fresh.state_dict(), checkpoint.state_dict())


def train(model: nn.Module, steps: int = 2) -> nn.Module:
    """A few fp32 SGD steps in train mode with the norms' statistics frozen (eval), as in a
    fine-tuning: the absorbed norms and folded BatchNorms train through the fused blocks,
    and no BatchNorm normalises two 1x1 samples (which makes a step chaotic)."""
    model.train()
    for m in model.modules():
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, AbsorbedNorm)):
            m.eval()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(steps):
        loss = model(inputs(seed=step + 1, n=2, dtype=torch.float32)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


#: One model per kind of module revert rebuilds: timm's ResNet BasicBlock and SEModule with
#: an absorbed bn2, the legacy senet block and SE, RexNet's SE with a BatchNorm and absorbed
#: BatchNormAct2d, timm's SqueezeExcite with a Hardswish prologue, torchvision's block with
#: Conv2dNormActivation's, this package's blocks. (Bottlenecks and the remaining models
#: hold the same kinds; their fp64 backward through depthwise convolutions is slow.)
TRAINED_MODELS = [m for m in MODELS if m[1] in ("seresnet18", "legacy_seresnet18", "rexnet_100",
                                                 "mobilenetv3_large_100", "mobilenet_v3_small",
                                                 "own_blocks")]


@slow
@pytest.mark.parametrize("source,name", TRAINED_MODELS, ids=lambda v: v)
def test_revert_after_training(source, name):
    """Train the converted model, revert: the original classes at every path, holding the
    trained tensors bit for bit and computing (in float64) what the converted model computes."""
    model = make(source, name, dtype=torch.float32)
    converted = train(convert(model)[0])
    reverted = revert(converted)
    assert classes(reverted) == classes(model)
    assert_same_entries(reverted.state_dict(), converted.state_dict())
    assert not all(torch.equal(a, b) for a, b in zip(reverted.parameters(), model.parameters(),
                                                      strict=True))  # trained
    x = inputs(seed=5)
    with torch.no_grad():
        assert_close(reverted.double()(x), converted.double()(x))


def test_revert_keeps_modes_frozen_parameters_and_dtype():
    """requires_grad, train/eval modes and the dtype are the converted model's now."""
    converted = convert(make("timm", "rexnet_100", dtype=torch.float32))[0].double()
    converted.features[3].se.requires_grad_(False)
    converted.features[5].se.bn.train()
    reverted = revert(converted)
    assert not any(p.requires_grad for p in reverted.features[3].se.parameters())
    assert all(p.requires_grad for p in reverted.features[4].se.parameters())
    modes = {path: m.training for path, m in converted.named_modules()}
    assert {path: m.training for path, m in reverted.named_modules() if path in modes} == {
        path: modes[path] for path, _ in reverted.named_modules() if path in modes}
    assert reverted.features[5].se.bn.training and not reverted.features[4].se.bn.training
    assert {t.dtype for t in reverted.state_dict().values() if t.is_floating_point()} == {
        torch.float64}


def test_revert_inplace_shares_the_tensors():
    converted = convert(make("timm", "seresnet18"))[0]
    pointers = {k: t.data_ptr() for k, t in converted.state_dict().items()}
    reverted = revert(converted, inplace=True)
    assert reverted is converted
    assert not any(isinstance(m, CONVERTED_CLASSES) for m in reverted.modules())
    assert {k: t.data_ptr() for k, t in reverted.state_dict().items()} == pointers


def test_revert_a_converted_block_and_an_unconverted_model():
    block = randomize(SEModule(16, rd_channels=4, norm_layer=nn.BatchNorm2d)).eval()
    converted = convert(block)[0]
    assert type(converted) is FusedSEWithNorm
    reverted = revert(converted)
    assert type(reverted) is SEModule and type(reverted.bn) is nn.BatchNorm2d
    assert_same_entries(reverted.state_dict(), block.state_dict())
    shared = SqueezeExcite(16)
    reverted = revert(convert(nn.Sequential(shared, nn.ReLU(), shared))[0])
    assert reverted[0] is reverted[2] and type(reverted[0]) is SqueezeExcite
    plain = nn.Sequential(nn.Conv2d(3, 4, 1), FusedSE(4, reduction=2))  # no convert: kept
    kept = revert(plain)
    assert kept is not plain and classes(kept) == classes(plain)
    with pytest.raises(TypeError, match="revert expects an nn.Module"):
        revert(torch.randn(3))


@pytest.mark.parametrize("copy_model", [
    copy.deepcopy,
    lambda m: pickle.loads(pickle.dumps(m)),
    lambda m: torch.load(save(m), weights_only=False),
], ids=["deepcopy", "pickle", "torch_save"])
def test_copies_keep_the_format_and_revert(copy_model):
    model = make("timm", "rexnet_100")
    converted = convert(model)[0]
    copied = copy_model(converted)
    assert_same_entries(copied.state_dict(), model.state_dict())
    x = inputs()
    with torch.no_grad():
        assert_close(copied(x), model(x))
        assert_close(revert(copied)(x), model(x))


def save(model: nn.Module) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return buffer


def test_no_second_copy_of_the_weights():
    """What convert remembers of the original modules holds no tensor memory: the saved
    converted model is the saved original's size, plus the modules' pickled structure."""
    model = make("timm", "seresnet18", dtype=torch.float32)
    converted = convert(model)[0]
    original_bytes = save(model).getbuffer().nbytes
    assert save(converted).getbuffer().nbytes < 1.03 * original_bytes


def test_fused_blocks_built_directly_keep_their_format():
    fused = FusedSE(16, reduction=4)
    assert list(fused.state_dict()) == ["branches.0.weight", "branches.0.bias", "excite.weight",
                                        "excite.bias"]
    converted = convert(SEModule(16, rd_channels=4))[0]
    assert list(converted.state_dict()) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    converted.load_state_dict(fused.state_dict())  # the fused format loads as well
    assert torch.equal(converted.branches[0].weight, fused.branches[0].weight)


def test_bad_checkpoints_are_named():
    converted = convert(SEModule(16, rd_channels=4))[0]
    checkpoint = SEModule(16, rd_channels=4).state_dict()
    checkpoint["fc1.weight"] = torch.randn(4, 16, 3, 3)
    with pytest.raises(RuntimeError, match=r"fc1\.weight has shape \(4, 16, 3, 3\): expected "
                                           r"the weight of a 1x1 convolution"):
        converted.load_state_dict(checkpoint)
    del checkpoint["fc1.weight"]
    with pytest.raises(RuntimeError, match="Missing key"):
        converted.load_state_dict(checkpoint)


def test_one_bias_is_left_with_a_reason():
    block = SEModule(16, rd_channels=4)
    block.fc2.bias = None
    converted, report = convert(block)
    assert type(converted) is SEModule and "one FC has a bias" in report.skipped[0].reason


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("train_mode", [False, True], ids=["eval", "train"])
def test_norm_se_computes_and_trains_as_the_original(train_mode, bias):
    """Converted in eval; in eval mode the BatchNorm is folded per call and its gradients
    reach the block's own parameters; in train mode the block normalises with the batch's
    statistics of the pooled vector and updates the running ones, as the original."""
    block = SEModule(16, rd_channels=4, bias=bias, norm_layer=nn.BatchNorm2d)
    block = randomize(block).double().eval()
    converted = convert(block)[0].train(train_mode)
    block.train(train_mode)
    got, expected = (run(m, torch.randn(3, 16, 5, 4, dtype=torch.float64,
                                        generator=torch.Generator().manual_seed(0)))
                     for m in (converted, block))
    for g, e in zip(got, expected, strict=True):
        assert_close(g.reshape(e.shape), e)
    parameters = {name for name, _ in block.named_parameters()}
    for (name, e), g in zip(block.state_dict().items(), converted.state_dict().values(),
                            strict=True):
        if name in parameters or not e.is_floating_point():
            assert torch.equal(g.reshape(e.shape), e)
        else:  # running statistics updated alike, from fc1's output: a Linear here, a 1x1
            # convolution there (whose sums may round differently)
            assert_close(g.reshape(e.shape), e)


def run(block: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Output, dx and every parameter's gradient (in the original's order)."""
    x.requires_grad_(True)
    y = block(x)
    y.backward(torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(1)))
    return [y.detach(), x.grad, *(p.grad for p in block.parameters())]


def test_norm_se_needs_a_batchnorm_over_the_reduced_channels():
    with pytest.raises(ValueError, match="BatchNorm2d over the 4 reduced channels"):
        FusedSEWithNorm(16, 4, nn.BatchNorm2d(8))
