"""sae-kernels stages: the fused CPU op's fixed cost and time per stage, per SE site."""

import pytest
import torch

from sae_kernels import SE
from sae_kernels.__main__ import main
from sae_kernels.kernels import cpu as cpu_kernels
from sae_kernels.tools import stages

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="needs the C++ CPU kernels")


def test_breakdown_of_a_model_with_prologues():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.BatchNorm2d(16),
                                torch.nn.SiLU(), SE(16, reduction=4))
    blocks = stages.model_blocks(model, (3, 9, 9))
    assert [(name, shape) for name, _, shape in blocks] == [("3", (16, 7, 7))]
    (row,) = stages.breakdown(blocks, n=2, rounds=1)
    assert row.shape == (2, 16, 7, 7) and row.stacked_width == 4
    assert row.prologue == "affine + silu"
    assert all(row.stages[s] > 0 for s in stages.STAGES)  # each range was recorded
    assert row.fixed == pytest.approx(row.total - sum(row.stages.values()))
    assert row.total > 0 and row.clone > 0 and row.addmm > 0


def test_command_line(capsys):
    assert main(["stages", "se_resnet18", "--image-size", "32", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "SE-ResNet-50 C=2048 7x7" in out and "SENetV2-ResNet-50 C=256 56x56" in out
    assert "stages.3.1.excite" in out and "fixed - clone" in out


def test_unknown_model_exits_2(capsys):
    assert main(["stages", "no_such_net", "--rounds", "1"]) == 2
    assert "unknown model" in capsys.readouterr().err
