"""SE-ResNet and SENetV2 (SaE-ResNet) built on the fused blocks.

The excitation sits inside the residual branch, after the branch's last BatchNorm and
before the shortcut is added, as in both papers; the addition and the block's final
ReLU run in the same pass: ``relu(b * s + identity)`` for SE (Hu et al.) and
``relu(b + b * s + identity)`` for SaE (SENetV2 adds the branch back inside the module).
``cifar=True`` swaps the ImageNet stem (7x7 stride-2 convolution and max pool) for a 3x3
stride-1 convolution, for 32x32 inputs. ``fused=False`` builds the same network, with
the same parameter names, on the reference modules.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .layers import FusedSaE, FusedSE
from .reference import SE, SaE

#: depth -> (residual block, blocks per stage)
DEPTHS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}

#: channels -> the excitation block of one residual block (returns relu(...) of the sum)
ExciteFactory = Callable[[int], nn.Module]


class BasicBlock(nn.Module):
    """Two 3x3 convolutions; the excitation adds the shortcut and applies the ReLU."""

    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int, excite: ExciteFactory) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = shortcut(in_channels, planes, stride)
        self.excite = excite(planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.excite(self.bn2(self.conv2(out)), identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride), 1x1 expand by 4; then the excitation."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int, excite: ExciteFactory) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = shortcut(in_channels, out_channels, stride)
        self.excite = excite(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.excite(self.bn3(self.conv3(out)), identity)


def shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Module | None:
    """The projection shortcut where the shape changes (1x1 convolution and BatchNorm)."""
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                         nn.BatchNorm2d(out_channels))


class ExcitationResNet(nn.Module):
    """A ResNet whose every residual block ends in an excitation block."""

    def __init__(self, depth: int, excite: ExciteFactory, num_classes: int = 1000,
                 cifar: bool = False, in_channels: int = 3, base_width: int = 64) -> None:
        super().__init__()
        if depth not in DEPTHS:
            raise ValueError(f"depth must be one of {sorted(DEPTHS)}, got {depth}")
        kind, counts = DEPTHS[depth]
        block = Bottleneck if kind == "bottleneck" else BasicBlock
        width = base_width
        if cifar:
            self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False),
                                      nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        else:
            self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 7, 2, 3, bias=False),
                                      nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                                      nn.MaxPool2d(3, 2, 1))
        stages, in_channels = [], width
        for i, count in enumerate(counts):
            planes = width * 2**i
            blocks = []
            for j in range(count):
                blocks.append(block(in_channels, planes, 2 if j == 0 and i > 0 else 1, excite))
                in_channels = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def se_resnet(depth: int = 50, num_classes: int = 1000, cifar: bool = False,
              fused: bool = True, reduction: int = 16, in_channels: int = 3,
              base_width: int = 64) -> ExcitationResNet:
    """SE-ResNet (Hu et al.): an SE block (ReLU, sigmoid) in every residual block.
    ``base_width`` is the first stage's width (64 in the paper), doubled per stage."""
    block = FusedSE if fused else SE

    def excite(channels: int) -> nn.Module:
        return block(channels, reduction=reduction, act_out="relu")

    return ExcitationResNet(depth, excite, num_classes, cifar, in_channels, base_width)


def senetv2_resnet(depth: int = 50, num_classes: int = 1000, cifar: bool = False,
                   fused: bool = True, reduction: int = 32, cardinality: int = 4,
                   in_channels: int = 3, base_width: int = 64) -> ExcitationResNet:
    """SENetV2's SaE-ResNet: an SaE block (``cardinality`` ReLU branches, sigmoid, the
    branch added back inside the module) in every residual block. Other arguments as
    :func:`se_resnet`."""
    block = FusedSaE if fused else SaE

    def excite(channels: int) -> nn.Module:
        return block(channels, reduction=reduction, cardinality=cardinality, residual=True,
                     act_out="relu")

    return ExcitationResNet(depth, excite, num_classes, cifar, in_channels, base_width)
