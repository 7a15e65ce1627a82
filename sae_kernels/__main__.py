"""Command line: ``sae-kernels bench | profile | stages | build | plan | gpu-check | verify |
compile-report`` (or ``python -m sae_kernels ...``)."""

import argparse
import os
import sys

from .tools import profile as profile_tool


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
    import json

    from .tools.plan import format_table, markdown_table, plan_rows, resolve_spec

    spec, where = resolve_spec(args.device)
    rows = plan_rows(spec, layouts=("nchw", "channels_last") if args.layouts else ("nchw",))
    if args.json:
        print(json.dumps(dict(device=where, dtype="bfloat16", rows=rows), indent=1))
        return 0
    if args.markdown:
        print(markdown_table(rows))
        return 0
    print(f"Plan per SE site and batch, bf16, {where}: the converted bottleneck (bn3 as the "
          f"prologue, shortcut add + ReLU as the epilogue)")
    print("us: modelled microseconds (sae_kernels.gpu_plan); floor: HBM bytes only, no launch; "
          "compile: torch.compile's kernels for the block, same model\n")
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


def _bench(args) -> int:
    import torch

    from .sites import resnet50_sites
    from .tools import bench, bench_report

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("sae-kernels bench: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"CPU, {torch.get_num_threads()} threads ({bench_report.cpu_name()})")
    if args.models:
        return _bench_models(args, device, where)
    if device.type == "cpu" and args.fused_backend == "triton":
        print("sae-kernels bench: the Triton kernels run on CPU only through Triton's "
              "interpreter, which is for correctness, not timing", file=sys.stderr)
        return 2
    try:
        modes = _options("--modes", args.modes, bench.MODES, ["forward"])
        variants = _options("--variants", args.variants, bench.VARIANTS, bench.VARIANTS)
        if args.full:
            args.layouts, modes, args.rounds = list(bench.LAYOUTS), list(bench.MODES), 15
        sites = ([bench.custom_site(s, args.reduction, args.cardinality) for s in args.shapes]
                 if args.shapes else resnet50_sites())
    except ValueError as e:
        print(f"sae-kernels bench: {e}", file=sys.stderr)
        return 2
    dtype_name = args.dtype or ("float16" if device.type == "cuda" else "float32")
    torch.manual_seed(0)
    todo = bench.cases(sites, args.batch_sizes or [1, 32], args.layouts, modes)
    environment = {"device": where, "torch": torch.__version__, "dtype": dtype_name,
                   "fused_backend": args.fused_backend, "rounds": args.rounds}
    print(f"{where}, torch {torch.__version__}, {dtype_name}, {args.rounds} interleaved "
          f"rounds; latency: median over rounds")
    progress = bench_report.Progress(len(todo))
    results, mode = [], None
    progress.show(0, "warming up")
    for done, result in enumerate(bench.run_cases(todo, bench.DTYPES[dtype_name], device,
                                                  variants, args.fused_backend,
                                                  args.rounds), start=1):
        progress.clear()
        if result.case.mode != mode:
            mode = result.case.mode
            print(f"\n{mode}\n{bench_report.HEADER}\n{bench_report.SUBHEADER}")
        print(bench_report.format_row(result), flush=True)
        results.append(result)
        if done < len(todo):
            progress.show(done, todo[done].label)
    progress.clear()
    summary = bench.summarize(results)
    print("\n" + bench_report.format_summary(summary))
    if args.json:
        bench_report.write_json(args.json, environment, results, summary)
    if args.csv:
        bench_report.write_csv(args.csv, results)
    if args.plot:
        bench_report.plot(args.plot, results, where, dtype_name)
    for path in filter(None, (args.json, args.csv, args.plot)):
        print(f"wrote {path}")
    return 0


def _bench_models(args, device, where: str) -> int:
    """``bench --models``: whole networks end to end (``tools.model_bench``)."""
    import torch

    from .tools import model_bench

    try:
        modes = _options("--modes", args.modes, model_bench.MODES, ["inference"])
        variants = _options("--variants", args.variants, model_bench.VARIANTS,
                            model_bench.VARIANTS)
        models = [model_bench.build(name, args.image_size) for name in dict.fromkeys(args.models)]
    except ValueError as e:  # profile.ProfileError included: an unknown model name
        print(f"sae-kernels bench: {e}", file=sys.stderr)
        return 2
    notes = []
    if "onnxruntime" in variants and (why := model_bench.onnxruntime_unavailable(device)):
        variants.remove("onnxruntime")
        notes.append(why)
        print(why)
    todo = [(model, n, mode) for mode in modes for model in models
            for n in args.batch_sizes or model_bench.BATCH_SIZES]
    environment = {"device": where, "torch": torch.__version__, "threads": torch.get_num_threads(),
                   "dtype": "float32", "image_size": args.image_size, "rounds": args.rounds,
                   "variants": variants}
    print(f"{where}, torch {torch.__version__}, float32, {args.rounds} interleaved rounds; "
          f"median ms per step; speedups: the baseline's time over the variant's (above 1: "
          f"faster)\n")
    width = max(len("model"), *(len(model.name) for model in models))
    print(model_bench.table_header(width), flush=True)
    results = []
    for done, (model, n, mode) in enumerate(todo, start=1):
        print(f"[{done}/{len(todo)}] {model.name} N={n} {mode}: building, compiling, timing",
              file=sys.stderr, flush=True)
        try:
            results.append(model_bench.run_case(model, n, mode, variants, args.rounds, device))
        except ValueError as e:  # e.g. BatchNorm in training on one value per channel
            print(f"sae-kernels bench: {model.name} N={n} {mode}: {e}", file=sys.stderr)
            return 2
        print(model_bench.format_row(results[-1], width), flush=True)
    notes += [note for result in results for note in model_bench.format_notes(result)]
    summary = model_bench.summarize(results)
    if notes:
        print("\n" + "\n".join(notes))
    print("\n" + model_bench.format_summary(summary))
    if args.json:
        model_bench.write_json(args.json, environment, results, summary, notes)
    if args.plot:
        model_bench.plot(args.plot, results, where)
    for path in filter(None, (args.json, args.plot)):
        print(f"wrote {path}")
    return 0


def _options(option: str, given: list[str] | None, allowed, default) -> list[str]:
    """``given`` (``default`` if None), each checked against the mode's ``allowed`` values:
    ``--modes`` and ``--variants`` take different values with and without ``--models``."""
    if given is None:
        return list(default)
    if wrong := [value for value in given if value not in allowed]:
        raise ValueError(f"{option} {' '.join(wrong)}: not a choice here "
                         f"(choose from {', '.join(allowed)})")
    return list(given)


def _add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    from .tools import model_bench
    from .tools.bench import DTYPES, LAYOUTS, MODES, VARIANTS
    from .tools.profile import DEFAULT_IMAGE_SIZE

    parser.add_argument("-n", "--batch-sizes", type=int, nargs="+", metavar="N",
                        help="default: 1 32; with --models 1 8")
    parser.add_argument("--modes", nargs="+", metavar="MODE",
                        choices=[*MODES, *model_bench.MODES],
                        help=f"{', '.join(MODES)} (default forward); with --models "
                             f"{', '.join(model_bench.MODES)} (default inference)")
    parser.add_argument("--variants", "--backends", nargs="+", metavar="VARIANT",
                        choices=list(dict.fromkeys([*VARIANTS, *model_bench.VARIANTS])),
                        help=f"what to time (default: all): {', '.join(VARIANTS)}; with "
                             f"--models {', '.join(model_bench.VARIANTS)}")
    parser.add_argument("--rounds", type=int, default=5,
                        help="interleaved rounds per case (default 5)")
    parser.add_argument("--device", help="default: cuda if present, else cpu")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON")
    parser.add_argument("--plot", metavar="FILE.png",
                        help="plot the speedups (SE sites: and the floor ratios)")
    sites = parser.add_argument_group("SE sites (without --models)")
    sites.add_argument("--shapes", nargs="+", metavar="CxHxW",
                       help="measure these shapes (default: the SE sites of SE-ResNet-50 and "
                            "SENetV2-ResNet-50)")
    sites.add_argument("--reduction", type=int, default=16, help="of --shapes (default 16)")
    sites.add_argument("--cardinality", type=int, default=1,
                       help="branches of --shapes (default 1: SE)")
    sites.add_argument("--dtype", choices=list(DTYPES),
                       help="default: float32 on CPU, float16 on CUDA")
    sites.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=["nchw"])
    sites.add_argument("--fused-backend", default="auto", choices=["auto", "cpu", "triton",
                                                                  "reference"])
    sites.add_argument("--full", action="store_true",
                       help="both layouts, both modes, 15 rounds (the README's table)")
    sites.add_argument("--csv", metavar="FILE", help="write the results as CSV")
    networks = parser.add_argument_group(
        "whole networks", "eager, convert, torch.compile of each and onnxruntime, end to end, "
                          "in fp32; the options above for SE sites do not apply")
    networks.add_argument("--models", nargs="+", metavar="NAME",
                          help="sae_kernels' se_resnet<depth> / senetv2_resnet<depth>, "
                               "torchvision or timm names")
    networks.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE,
                          help=f"input height and width (default {DEFAULT_IMAGE_SIZE})")


def _stages(args) -> int:
    import torch

    from .tools import stages
    from .tools.profile import ProfileError, build_model

    if args.threads:
        torch.set_num_threads(args.threads)
    blocks = stages.resnet50_blocks()
    try:
        for name in args.models:
            model, input_shape = build_model(name, args.image_size)
            blocks += stages.model_blocks(model, input_shape)
    except ProfileError as e:
        print(f"sae-kernels stages: {e}", file=sys.stderr)
        return 2
    rows = stages.breakdown(blocks, args.n, args.rounds,
                            progress=lambda site: print(f"  {site}", file=sys.stderr, flush=True))
    print(f"CPU, {torch.get_num_threads()} threads, float32, N={args.n}, inference; "
          "microseconds per call")
    print(stages.format_rows(rows))
    return 0


def _build(args) -> int:
    from .kernels import cpu

    library = cpu.build(verbose=args.verbose)
    print(f"CPU kernels ready ({cpu.isa()}): {library}")
    return 0


def _compile_report(args) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        os.execve(sys.executable, [sys.executable, "-m", "sae_kernels", *sys.argv[1:]],
                  {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    from .gpu_plan import GPUS
    from .tools.aot import DTYPES, TARGETS, compile_all, operator_kernels

    builds = bad = 0
    launched = set()
    for r in compile_all(args.target or TARGETS, [GPUS[gpu] for gpu in args.gpu or GPUS],
                         args.dtype or DTYPES):
        status = "ok" if r.ok else (r.error or f"spills: {r.stack} bytes of stack")
        builds += 1
        bad += not r.ok
        launched.add(r.build.kernel)
        pipelined = {None: "-", True: "yes", False: "no"}[r.pipelined]
        print(f"{r.build.target:<6} REG {r.registers:>4} STACK {r.stack:>4} SHARED {r.shared:>6} "
              f"PIPELINED {pipelined:<3}  {r.build.describe()}  {status}", flush=True)
    missed = sorted(operator_kernels() - launched)
    print(f"\nkernels no launch reached: {', '.join(missed) or 'none'}")
    print(f"{builds} kernel builds, {bad} failed or spilled")
    return 1 if bad else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="sae-kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="fused vs eager, torch.compile and the memory floor "
                                         "per SE site")
    _add_bench_arguments(bench)
    bench.set_defaults(run=_bench)
    profile = sub.add_parser("profile", help="share of a model's time in its SE blocks, before "
                                             "and after conversion")
    profile_tool.add_arguments(profile)
    profile.set_defaults(run=profile_tool.run)
    stages = sub.add_parser("stages", help="the fused CPU op's time per stage and its fixed "
                                           "cost, per SE site")
    stages.add_argument("models", nargs="*", metavar="MODEL",
                        help="timm / torchvision models whose SE sites to add to SE-ResNet-50's "
                             "and SENetV2-ResNet-50's")
    stages.add_argument("-n", type=int, default=1, help="batch size (default 1)")
    stages.add_argument("--image-size", type=int, help="input size of the models")
    stages.add_argument("--rounds", type=int, default=15, help="timed rounds (default 15)")
    stages.add_argument("--threads", type=int, help="torch.set_num_threads")
    stages.set_defaults(run=_stages)
    build = sub.add_parser("build", help="build the C++ CPU kernels now (else on first use)")
    build.add_argument("-v", "--verbose", action="store_true", help="show the compiler's output")
    build.set_defaults(run=_build)
    plan = sub.add_parser("plan", help="GPU plan and modelled times per SE site")
    plan.add_argument("--device", choices=["h100", "a100"],
                      help="GPU to model (default: this machine's, else an H100)")
    plan.add_argument("--json", action="store_true", help="rows as JSON")
    plan.add_argument("--markdown", action="store_true", help="rows as the README's table")
    plan.add_argument("--layouts", action="store_true", help="channels_last rows too")
    plan.set_defaults(run=_plan)
    from .tools import gpu_check

    check = sub.add_parser("gpu-check", help="the GPU acceptance run: GPU tests, layer bench, "
                           "model against measurement (exit 2 without a GPU)")
    gpu_check.add_arguments(check)
    check.set_defaults(run=gpu_check.run)
    verify = sub.add_parser("verify", help="fused vs float64 reference on the SE sites")
    verify.add_argument("-n", type=int, default=2, help="batch size (default 2)")
    verify.set_defaults(run=_verify)
    report = sub.add_parser("compile-report",
                            help="compile every kernel launch for sm_80/sm_90; registers and "
                                 "spills")
    report.add_argument("--target", action="append", choices=["sm_80", "sm_90"],
                        help="default: both")
    report.add_argument("--gpu", action="append", choices=["h100", "a100"],
                        help="the GPUs the launches are planned for (default: both)")
    report.add_argument("--dtype", action="append", choices=["fp32", "fp16", "bf16", "fp64"],
                        help="the dtypes of x (default: all)")
    report.set_defaults(run=_compile_report)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
