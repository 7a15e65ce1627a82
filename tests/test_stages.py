"""sae-kernels stages: the fused CPU op's fixed cost and time per stage, per SE site."""

import time

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


class StagedBlock(torch.nn.Module):
    """The single-FC form's attributes, and in place of the op its three stages' profiler
    ranges around busy waits of 0.2 ms; the rescale of the third profiled call takes
    100 ms."""

    def __init__(self):
        super().__init__()
        self.channels, self.fc = 8, torch.nn.Linear(8, 8)
        self.profiled_calls = 0

    def forward(self, x):
        profiled = torch.autograd.profiler._is_profiler_enabled
        slow = profiled and self.profiled_calls == 2
        for stage in stages.STAGES:
            seconds = 0.1 if stage == "rescale" and slow else 2e-4
            with torch.profiler.record_function(f"sae_kernels::{stage}"):
                end = time.perf_counter() + seconds
                while time.perf_counter() < end:
                    pass
        self.profiled_calls += profiled
        return x


def test_a_call_slowed_by_the_machine_does_not_move_a_stage():
    """Stages are medians over the profiled calls: one call whose rescale took 100 ms (a
    mean over twenty would say 5 ms) leaves the rescale at its usual time."""
    block = StagedBlock()
    (row,) = stages.breakdown([("staged", block, (8, 2, 2))], rounds=1)
    assert block.profiled_calls == stages.PROFILED_CALLS
    for stage in stages.STAGES:
        assert 150 < row.stages[stage] < 2000, (stage, row.stages)


def test_command_line(capsys):
    assert main(["stages", "se_resnet18", "--image-size", "32", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "SE-ResNet-50 C=2048 7x7" in out and "SENetV2-ResNet-50 C=256 56x56" in out
    assert "stages.3.1.excite" in out and "median over sites: fixed " in out


def test_unknown_model_exits_2(capsys):
    assert main(["stages", "no_such_net", "--rounds", "1"]) == 2
    assert "unknown model" in capsys.readouterr().err
