"""The SE sites of the networks this library is measured on."""

from dataclasses import dataclass

#: (channels, spatial side) of the four bottleneck stages of ResNet-50 at 224 x 224.
RESNET50_STAGES = ((256, 56), (512, 28), (1024, 14), (2048, 7))


@dataclass(frozen=True)
class Site:
    network: str
    channels: int
    size: int
    reduction: int
    cardinality: int

    @property
    def rd_channels(self) -> int:
        return self.channels // self.reduction

    @property
    def stacked_width(self) -> int:
        """K: the width of the stacked branch FC."""
        return self.cardinality * self.rd_channels

    @property
    def name(self) -> str:
        return f"{self.network} C={self.channels} {self.size}x{self.size}"


def resnet50_sites() -> list[Site]:
    """SE-ResNet-50 (reduction 16, one branch) and SENetV2-ResNet-50 (reduction 32, 4 branches)."""
    return [Site("SE-ResNet-50", c, s, 16, 1) for c, s in RESNET50_STAGES] + [
        Site("SENetV2-ResNet-50", c, s, 32, 4) for c, s in RESNET50_STAGES
    ]
