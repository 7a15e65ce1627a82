"""FlopCounterMode sees the fused blocks' matrix products, as it does the reference's."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from helpers import DEVICE
from sae_kernels import EffectiveSE, FusedEffectiveSE, FusedSaE, SaE
from sae_kernels.cost import fc_flops
from sae_kernels.kernels import cpu as cpu_kernels


def counted(module, x, train: bool) -> int:
    with FlopCounterMode(display=False) as counter:
        y = module(x)
        if train:
            y.sum().backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("train", [False, True], ids=["forward", "forward_backward"])
@pytest.mark.parametrize("single_fc", [False, True], ids=["sae", "effective_se"])
@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_same_count_as_the_reference(backend, single_fc, train):
    if backend == "cpu" and (DEVICE.type != "cpu" or not cpu_kernels.available()):
        pytest.skip("needs the C++ CPU kernels")
    torch.manual_seed(0)
    ref = EffectiveSE(24) if single_fc else SaE(24, reduction=4, cardinality=3)
    fused_type = FusedEffectiveSE if single_fc else FusedSaE
    fused = fused_type.from_module(ref, backend=backend).to(DEVICE)
    ref = ref.to(DEVICE)
    x = torch.randn(5, 24, 6, 7, device=DEVICE, requires_grad=train)
    expected = fc_flops(5, 24, 24 if single_fc else 18, single_fc) * (3 if train else 1)
    assert counted(ref, x, train) == expected
    assert counted(fused, x, train) == expected
