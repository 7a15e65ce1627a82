"""Check the fused operator against the float64 reference on the ResNet-50 SE sites."""

import copy

import torch

from ..accuracy import error_ratio
from ..layers import FusedSaE
from ..reference import SaE
from ..sites import resnet50_sites


def verify_sites(device: torch.device, n: int = 2, dtype: torch.dtype = torch.float32,
                 strategies=("single", "split")):
    """Yield (site, strategy, worst error/bound over y and every gradient) per site."""
    for site in resnet50_sites():
        torch.manual_seed(0)
        ref = SaE(site.channels, site.reduction, site.cardinality, act_out="relu")
        x = torch.randn(n, site.channels, site.size, site.size) + 1
        identity = torch.randn_like(x)
        grad = torch.randn_like(x)
        truth = copy.deepcopy(ref).double()
        leaves64 = [t.double().requires_grad_(True) for t in (x, identity)]
        y64 = truth(*leaves64)
        y64.backward(grad.double())
        expected = [y64, *(t.grad for t in leaves64), *(p.grad for p in truth.parameters())]
        for strategy in strategies:
            fused = FusedSaE.from_module(ref, backend="triton", strategy=strategy).to(device)
            leaves = [t.to(device, dtype, copy=True).requires_grad_(True) for t in (x, identity)]
            y = fused(*leaves)
            y.backward(grad.to(device, dtype))
            got = [y, *(t.grad for t in leaves), *(p.grad for p in fused.parameters())]
            pairs = zip(got, expected, strict=True)
            worst = max(error_ratio(a, t, dtype).max().item() for a, t in pairs)
            yield site, strategy, worst
