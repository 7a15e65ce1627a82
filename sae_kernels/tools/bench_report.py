"""What ``sae-kernels bench`` shows and writes: a progress bar, the terminal table, the
summary, JSON, CSV and the plot."""

from __future__ import annotations

import csv
import json
import platform
import sys
from pathlib import Path
from typing import TextIO

from .bench import VARIANTS, Result

#: The CSV columns of each variant, after the case's own.
_VARIANT_COLUMNS = ("median_us", "p20_us", "p80_us", "gbps", "launches")


class Progress:
    """A one-line bar on a terminal (nothing when ``stream`` is not one)."""

    def __init__(self, total: int, stream: TextIO = sys.stderr) -> None:
        self.total, self.stream = total, stream
        self.enabled = stream.isatty()

    def show(self, done: int, label: str) -> None:
        if self.enabled:
            filled = round(20 * done / max(self.total, 1))
            self.stream.write(f"\r\033[K[{'#' * filled}{'.' * (20 - filled)}] "
                              f"{done}/{self.total} {label}")
            self.stream.flush()

    def clear(self) -> None:
        if self.enabled:
            self.stream.write("\r\033[K")
            self.stream.flush()


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


HEADER = (f"{'site':<31} {'N':>3} {'layout':<13}"
          f"{'eager':>9}{'compile':>9}{'floor':>9}{'fused':>9} {'fused p20-p80':>15}"
          f"{'x eager':>8}{'x comp':>7}{'/floor':>7}{'/fair':>7}{'GB/s':>7}  {'launches':>8}"
          f"{'MFLOP':>9}{'MB':>8}")
SUBHEADER = f"{'':<47}{'median us per call':^36}{'':>16}{'(fused)':>36}  {'e/c/f':>8}"


def format_row(result: Result) -> str:
    case, times = result.case, result.times
    us = {v: f"{times[v].median:.1f}" if v in times else "-" for v in VARIANTS}
    fused = times.get("fused")
    band = f"{fused.p20:.1f}-{fused.p80:.1f}" if fused else "-"
    launches = "/".join(str(result.launches.get(v, "-")) for v in ("eager", "compile", "fused"))
    flops = f"{result.cost.flops / 1e6:.2f}" + ("" if result.flops_match else "!")
    line = (f"{case.site.name:<31} {case.n:>3} {case.layout:<13}"
            f"{us['eager']:>9}{us['compile']:>9}{us['floor']:>9}{us['fused']:>9} {band:>15}"
            f"{_fmt(result.speedup('eager')):>8}{_fmt(result.speedup('compile')):>7}"
            f"{_fmt(result.floor_ratio):>7}{_fmt(result.fair_floor_ratio):>7}"
            f"{_fmt(result.gbps('fused'), '.1f'):>7}  "
            f"{launches:>8}{flops:>9}{result.cost.compulsory_bytes / 1e6:>8.2f}")
    notes = [f"{name} did not run: {err}" for name, err in result.errors.items()]
    if result.fused_backend == "reference":
        notes.append(f"fused ran the PyTorch reference: no fused kernel for "
                     f"{str(result.dtype).removeprefix('torch.')} on this device")
    return line + "".join(f"\n    {note}" for note in notes)


def format_summary(summary: dict[str, dict]) -> str:
    lines = ["summary (ratios of medians; speedups above 1 favour the fused layer)"]
    for mode, stats in summary.items():
        lines.append(f"  {mode} ({stats['cases']} cases)")
        lines += [f"    {key:<28} {value if isinstance(value, int) else _fmt(value)}"
                  for key, value in stats.items() if key != "cases"]
    return "\n".join(lines)


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def write_json(path: str | Path, environment: dict, results: list[Result],
               summary: dict) -> None:
    with open(path, "w") as f:
        json.dump({"environment": environment, "results": [r.to_json() for r in results],
                   "summary": summary}, f, indent=2)


def write_csv(path: str | Path, results: list[Result]) -> None:
    """One line per case; per variant its latency, bandwidth and launches. FLOPs are the
    analytic ones (see ``sae_kernels.cost``)."""
    case_columns = ["site", "channels", "size", "reduction", "cardinality", "n", "layout",
                    "mode", "dtype", "fused_backend", "speedup_over_eager",
                    "speedup_over_compile", "floor_ratio", "fair_floor_ratio", "matmul_flops",
                    "elementwise_flops", "bytes"]
    columns = case_columns + [f"{v}_{c}" for v in VARIANTS for c in _VARIANT_COLUMNS]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        for result in results:
            row = result.to_json()
            line = {k: row[k] for k in case_columns if k in row}
            line |= {"matmul_flops": row["flops"]["matmul"],
                     "elementwise_flops": row["flops"]["elementwise"]}
            for v, stats in row["latency_us"].items():
                line |= {f"{v}_median_us": stats["median"], f"{v}_p20_us": stats["p20"],
                         f"{v}_p80_us": stats["p80"], f"{v}_gbps": row["gbps"][v],
                         f"{v}_launches": row["launches"].get(v)}
            writer.writerow(line)


def plot(path: str | Path, results: list[Result], device: str, dtype: str) -> None:
    """Per mode, the fused layer's speedup per case (over eager and torch.compile) and its
    ratios to the floor and the fair floor, on log-2 axes (a ratio and its inverse are as far
    from 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    modes = list(dict.fromkeys(r.case.mode for r in results))
    cases_per_mode = len(results) // len(modes)
    fig, axes = plt.subplots(2 * len(modes), 1, squeeze=False, layout="constrained",
                             figsize=(max(8.0, 3 + 0.32 * cases_per_mode), 6.5 * len(modes)),
                             height_ratios=[1, 1.6] * len(modes))
    for row, mode in enumerate(modes):
        speed_ax, floor_ax = axes[2 * row, 0], axes[2 * row + 1, 0]
        rows = [r for r in results if r.case.mode == mode]
        positions = range(len(rows))
        for offset, over, label in ((-0.2, "eager", "over eager"),
                                    (0.2, "compile", "over torch.compile")):
            speed_ax.bar([p + offset for p in positions], [r.speedup(over) or 0 for r in rows],
                         width=0.4, label=label)
        speed_ax.set_ylabel("fused speedup (x)")
        speed_ax.set_title(f"{device}, {dtype}, {mode}: speedup of the fused layer")
        for offset, ratios, color, label in (
                (-0.2, [r.floor_ratio for r in rows], "tab:green", "fused / floor"),
                (0.2, [r.fair_floor_ratio for r in rows], "tab:olive", "fused / fair floor")):
            floor_ax.bar([p + offset for p in positions], [v or 0 for v in ratios], width=0.4,
                         color=color, label=label)
        floor_ax.set_ylabel("fused / floor latency")
        floor_ax.set_title(f"{device}, {dtype}, {mode}: fused latency over the memory floors'")
        for ax in (speed_ax, floor_ax):
            ax.axhline(1, color="black", linewidth=0.8)
            ax.set_yscale("log", base=2)
            ax.yaxis.set_major_locator(LogLocator(base=2))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())
            ax.legend(fontsize=8)
            ax.set_xlim(-0.6, len(rows) - 0.4)
        speed_ax.set_xticks(list(positions), [])
        floor_ax.set_xticks(list(positions), [_short_label(r) for r in rows], rotation=60,
                            ha="right", fontsize=7)
        floor_ax.set_xlabel("SE site, batch size, layout")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _short_label(result: Result) -> str:
    case = result.case
    network = {"SE-ResNet-50": "SE", "SENetV2-ResNet-50": "SaE"}.get(case.site.network,
                                                                     case.site.network)
    layout = "CL" if case.layout == "channels_last" else "NCHW"
    return f"{network} {case.site.channels}x{case.site.size}² N={case.n} {layout}"
