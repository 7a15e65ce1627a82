"""Two-process DDP (gloo, CPU) over FusedSaE matches one process on the same global batch."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from sae_kernels import FusedSaE

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")
STEPS, GLOBAL_BATCH = 3, 8


def make_model() -> nn.Module:
    """No BatchNorm, so the per-rank halves of a batch see exactly the global model."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), FusedSaE(32, reduction=4, residual=True),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(32, 5)).double()


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(GLOBAL_BATCH, 3, 9, 9, generator=g, dtype=torch.float64),
             torch.randint(0, 5, (GLOBAL_BATCH,), generator=g)) for _ in range(STEPS)]


def train(model: nn.Module, data, rank: int = 0, world: int = 1) -> list[list[torch.Tensor]]:
    """SGD steps on this rank's slice of each batch; the gradients of every step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    grads = []
    for x, y in data:
        part = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[part]), y[part]).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        optimizer.step()
    return grads


def worker(rank: int, world: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        model = nn.parallel.DistributedDataParallel(make_model())
        grads = train(model, batches(), rank, world)
        if rank == 0:
            torch.save({"grads": grads, "weights": list(model.module.parameters())}, out)
    finally:
        dist.destroy_process_group()


def test_two_process_ddp_matches_one_process(tmp_path):
    out = tmp_path / "rank0.pt"
    mp.spawn(worker, args=(2, str(tmp_path / "store"), str(out)), nprocs=2, join=True)
    distributed = torch.load(out)
    single = make_model()
    grads = train(single, batches())
    for step, (got, want) in enumerate(zip(distributed["grads"], grads, strict=True)):
        for a, b in zip(got, want, strict=True):
            # the all-reduce averages two half-batch means: float64 rounding only
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=f"step {step}")
    for a, b in zip(distributed["weights"], single.parameters(), strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-10, atol=1e-12)
