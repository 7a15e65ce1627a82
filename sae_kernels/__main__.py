"""Command line: ``sae-kernels build | plan | verify | compile-report``
(or ``python -m sae_kernels ...``)."""

import argparse
import os
import sys


def _ensure_triton_can_run() -> None:
    """Without a GPU the Triton kernels run through the interpreter, which must be switched
    on before triton is imported: re-run this command with TRITON_INTERPRET=1."""
    import torch

    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        return
    print("no GPU: running the Triton kernels through Triton's interpreter (slow)", flush=True)
    os.execve(sys.executable, [sys.executable, "-m", "sae_kernels", *sys.argv[1:]],
              {**os.environ, "TRITON_INTERPRET": "1"})


def _plan(args) -> int:
    from .tools.plan import format_table, plan_rows

    where, rows = plan_rows()
    print(f"Launch plan per SE site, fp16 ({where})\n")
    print(format_table(rows))
    return 0


def _verify(args) -> int:
    _ensure_triton_can_run()
    import torch

    from .tools.verify import verify_sites

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"Fused vs float64 reference, N={args.n}, fp32, output and every gradient on {device}")
    print("(error / tolerance of sae_kernels.accuracy: <= 1 passes)\n")
    failed = 0
    for site, strategy, worst in verify_sites(device, n=args.n):
        ok = worst <= 1
        failed += not ok
        print(f"{site.name:<34} {strategy:<7} {worst:8.3f}  {'ok' if ok else 'FAIL'}", flush=True)
    print(f"\n{'all sites pass' if not failed else f'{failed} failures'}")
    return 1 if failed else 0


def _build(args) -> int:
    from .kernels import cpu

    cpu.build(verbose=args.verbose)
    print(f"CPU kernels ready ({cpu.isa()})")
    return 0


def _compile_report(args) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        os.execve(sys.executable, [sys.executable, "-m", "sae_kernels", *sys.argv[1:]],
                  {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    from .tools.aot import TARGETS, compile_all

    reports = compile_all(args.target or TARGETS)
    bad = 0
    for r in reports:
        status = "ok" if r.ok else (r.error or f"spills: {r.stack} bytes of stack")
        bad += not r.ok
        print(f"{r.target:<6} REG {r.registers:>4} STACK {r.stack:>4} SHARED {r.shared:>6}  "
              f"{r.variant.describe()}  {status}", flush=True)
    print(f"\n{len(reports)} kernel builds, {bad} failed or spilled")
    return 1 if bad else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="sae-kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build the C++ CPU kernels now (else on first use)")
    build.add_argument("-v", "--verbose", action="store_true", help="show the compiler's output")
    build.set_defaults(run=_build)
    sub.add_parser("plan", help="strategy, tiles and launches per SE site").set_defaults(run=_plan)
    verify = sub.add_parser("verify", help="fused vs float64 reference on the SE sites")
    verify.add_argument("-n", type=int, default=2, help="batch size (default 2)")
    verify.set_defaults(run=_verify)
    report = sub.add_parser("compile-report",
                            help="compile every kernel for sm_80/sm_90; registers and spills")
    report.add_argument("--target", action="append", choices=["sm_80", "sm_90"])
    report.set_defaults(run=_compile_report)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
