"""What the dispatcher launches for each SE site: strategy, tiles, grid, launch count and
the DRAM bytes moved (modelled / compulsory, ``sae_kernels.cost``)."""

import torch

from ..cost import gpu_dram_bytes, sae_cost
from ..dispatch import H100, device_profile, plan_launch, triton_cdiv
from ..sites import resnet50_sites

#: Triton launches per call. The backward adds the weight-gradient matmuls and bias sums
#: over the batch (4 small PyTorch ops, plus act(p) for dW2).
FORWARD_LAUNCHES = {"single": 1, "split": 2}
BACKWARD_LAUNCHES = 2


def plan_rows(batch_sizes=(1, 32), element_size: int = 2) -> tuple[str, list[dict]]:
    """(device description, one row per site, N and layout)."""
    if torch.cuda.is_available():
        device = torch.device("cuda")
        profile, where = device_profile(device), torch.cuda.get_device_name(device)
    else:
        device, profile = torch.device("cpu"), H100
        where = "no GPU here; planned for an H100 (132 SMs)"
    rows = []
    for site in resnet50_sites():
        hw = site.size**2
        for n in batch_sizes:
            for layout in ("nchw", "channels_last"):
                plan = plan_launch(n, site.channels, hw, site.stacked_width, element_size,
                                   layout == "channels_last", device, profile=profile)
                blocks = triton_cdiv(site.channels, plan.block_c)
                programs = n if plan.strategy == "single" else n * blocks * plan.hw_chunks(hw)
                shape = (n, site.channels, hw, site.stacked_width, element_size)
                dram = {backward: gpu_dram_bytes(plan.strategy, *shape, profile.sms,
                                                 profile.l2_bytes, backward)
                        for backward in (False, True)}
                floor = {backward: sae_cost(*shape, backward).compulsory_bytes
                         for backward in (False, True)}
                rows.append(dict(site=site.name, n=n, layout=layout, strategy=plan.strategy,
                                 tile=f"{plan.block_c}x{plan.block_hw}", warps=plan.num_warps,
                                 programs=programs,
                                 forward_launches=FORWARD_LAUNCHES[plan.strategy],
                                 backward_launches=BACKWARD_LAUNCHES,
                                 forward_MB=_mb(dram[False], floor[False]),
                                 training_MB=_mb(dram[True], floor[True])))
    return where, rows


def _mb(modelled: int, compulsory: int) -> str:
    """DRAM megabytes by the model of ``cost.gpu_dram_bytes``, and the compulsory ones."""
    return f"{modelled / 1e6:.1f}/{compulsory / 1e6:.1f}"


def format_table(rows: list[dict]) -> str:
    columns = list(rows[0])
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in columns]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    for row in rows:
        lines.append("  ".join(str(row[c]).ljust(w) for c, w in zip(columns, widths, strict=True)))
    return "\n".join(lines)
