"""argparse wiring of ``wsbcn bench | autotune | plot | train | report-kernels``."""
from .arguments import positive_float, positive_int


def add_subcommands(sub) -> None:
    """Add the bench, autotune, plot, train and report-kernels subparsers to ``sub``."""
    from . import kernel_report

    for add in (_bench, _autotune, _plot, _train, kernel_report.add_subcommand):
        add(sub)


def _bench_description() -> str:
    from . import e2e, suites, timing

    warmup, rep = timing.SAMPLE_BUDGET_MS
    n_cases = len(suites.cases("resnet50_sample", ("bcn", "bcn_estimate", "gn", "ws")))
    return (
        f"The default run on a GPU, `wsbcn bench --e2e`: the resnet50_sample suite, {n_cases} cases of the "
        "ResNet-50 grid, modes " + " and ".join(suites.SAMPLE_MODES) + ", every provider (torch.compile baselines "
        "for " + " and ".join(op.upper() for op in suites.SAMPLE_COMPILED_OPS) + f"), as eager calls and as "
        f"CUDA-graph replays, {warmup:g} + {rep:g} ms of timer warm-up and repetitions per measurement; then the "
        "end-to-end training steps of every variant: classification at 224^2, N = " + " and ".join(
            map(str, e2e.default_cases(True, ("classification",))[0].batch_sizes)) + ", eager and CUDA-graphed; the "
        "detection trunk at 800x1216, N = " + " and ".join(map(str, e2e.DETECTION_BATCH_SIZES_GPU)) + ", eager; "
        "no torch.compile of the networks. --full runs the whole grid in every mode with every compiled "
        "baseline, and detection at N = " + " and ".join(map(str, e2e.FULL_DETECTION_BATCH_SIZES_GPU))
        + ", CUDA-graphed, and torch.compile of both networks. On a CPU-only machine the default is the cpu "
        "suite and a reduced end-to-end run.")


def _bench(sub):
    from .bench import MODES, OPS, TIMINGS
    from .suites import SUITES

    p = sub.add_parser("bench", help="benchmark wsbcn against cuDNN BN, ATen GN, eager and compiled references",
                       description=_bench_description())
    which = p.add_mutually_exclusive_group()
    which.add_argument("--suite", choices=SUITES, default=None,
                       help="shape suite (default: resnet50_sample on GPU, see above; cpu on a CPU-only "
                            "machine; with --batch-sizes/--dtypes/--layouts on GPU: resnet50 narrowed)")
    which.add_argument("--full", action="store_true",
                       help="the whole ResNet-50 grid (--suite resnet50): every norm and conv shape, N in "
                            "1 2 8 32 128, fp32 and bf16, both layouts, every mode and compiled baseline; with "
                            "--e2e, detection at N = 1 and 2, CUDA-graphed and compiled too; over an hour on "
                            "an H100")
    p.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    p.add_argument("--modes", nargs="+", choices=MODES, default=None,
                   help="default: fwd fwdbwd for the GPU sample (resnet50_sample), all three otherwise")
    timing = p.add_mutually_exclusive_group()
    timing.add_argument("--timings", nargs="+", choices=TIMINGS, default=None,
                        help="eager calls (host + device time) and/or CUDA-graph replays (device time; GPU "
                             "only); default: both on GPU, eager on CPU")
    timing.add_argument("--graph", action="store_true", help="only CUDA-graph replays: the same as --timings graph")
    p.add_argument("--e2e", action="store_true",
                   help="also time the end-to-end training steps (GPU: ResNet-50 classification at 224^2, N = 2 "
                        "and 32, eager and CUDA-graphed; the detection trunk at 800x1216, N = 2, eager; every "
                        "variant; more with --full; torch.compile of plain_bn and wsbcn_ws_bcn with --full or --e2e-compile)")
    p.add_argument("--e2e-only", action="store_true", help="only the end-to-end training steps")
    p.add_argument("--e2e-compile", action="store_true",
                   help="time the end-to-end steps (implies --e2e) with torch.compile too (plain_bn and "
                        "wsbcn_ws_bcn, classification and detection: a cold compile per variant and batch "
                        "size; --full on a GPU does this with --e2e)")
    p.add_argument("--host", action="store_true",
                   help="only the host time of every eager call and of its floor (wsbcn.tools.host_bench: the "
                        "repository's stub CUDA driver on a machine without a GPU, the real one on a GPU; "
                        "ResNet-50 shapes, N = 2 and 32, bf16 unless narrowed); rows with variant 'host'")
    p.add_argument("--distributed", action="store_true",
                   help="host time of BCN across processes (wsbcn.tools.dist_bench): --world-size ranks on this "
                        "machine, gloo over the stub CUDA driver without a GPU, NCCL with one GPU per rank; each "
                        "rank times BatchChannelNorm2d with a process group, its floor and the single-process call "
                        "(ResNet-50 shapes, N = 2 per rank, bf16 unless narrowed); rows with variant "
                        "'host_dist<W>'; implies --host")
    p.add_argument("--world-size", type=positive_int, default=None, help="with --distributed: ranks (default 2)")
    p.add_argument("--quick", action="store_true", help="with --host or --distributed: 3 rounds of 5 calls per case")
    p.add_argument("--no-compiled", action="store_true", help="leave out the torch.compile providers")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="CPU threads torch computes with (default on CPU: 1, which keeps timings stable on a "
                        "shared machine; GPU runs leave torch's setting alone)")
    p.add_argument("--out", default="perf/results", help="results folder (a subfolder per device)")
    _narrowing(p)
    p.set_defaults(func=_run_bench)


def _narrowing(p):
    p.add_argument("--batch-sizes", nargs="+", type=positive_int, default=None, help="only these N")
    p.add_argument("--dtypes", nargs="+", choices=("float32", "bfloat16", "float16"), default=None)
    p.add_argument("--layouts", nargs="+", choices=("contiguous", "channels_last"), default=None)
    p.add_argument("--max-minutes", type=positive_float, default=None,
                   help="stop after the case running at this time, keeping what was measured")


def bench_suite(args, on_gpu: bool):
    """The suite ``wsbcn bench`` runs: --full is resnet50; narrowing options without
    --suite narrow the full grid on GPU (as before the sample existed); otherwise
    the default (None: resnet50_sample on GPU, cpu on CPU)."""
    if args.full:
        return "resnet50"
    if args.suite:
        return args.suite
    narrowed = args.batch_sizes or args.dtypes or args.layouts
    return "resnet50" if on_gpu and narrowed else None


def e2e_options(args, on_gpu: bool) -> dict:
    """run_e2e's options for these arguments. The default run on a GPU: every variant;
    classification at N = 2 and 32, eager and CUDA-graphed; detection at N = 2,
    eager; no torch.compile. --full on a GPU runs what the default run did before it
    was trimmed: detection at N = 1 and 2, CUDA-graphed too, and compiled
    (plain_bn, wsbcn_ws_bcn; classification too); --e2e-compile adds the compiled steps alone;
    --no-compiled leaves it out whatever else is given."""
    from .e2e import FULL_DETECTION_BATCH_SIZES_GPU, GRAPH_MODES

    full = bool(args.full and on_gpu)
    options = dict(with_compiled=bool(not args.no_compiled and (args.e2e_compile or full)))
    if full:
        options.update(detection_batch_sizes=FULL_DETECTION_BATCH_SIZES_GPU, graph_modes=GRAPH_MODES)
    return options


def _run_bench(args) -> int:
    """Each part (micro-benchmarks, end-to-end steps) returns its rows, upserted into
    the device's CSV; at the end, the summary of every row this run measured. On
    CPU torch computes with --threads threads (default 1) while the command runs."""
    import torch

    threads = torch.get_num_threads()
    if not torch.cuda.is_available() or args.threads is not None:
        torch.set_num_threads(args.threads or 1)
    try:
        return _bench_parts(args)
    finally:
        torch.set_num_threads(threads)


def _bench_parts(args) -> int:
    import sys
    from pathlib import Path

    import pandas as pd
    import torch

    from . import info
    from .bench import device_label, run_bench
    from .results import upsert
    from .plot import summary_markdown

    if args.distributed:
        return _run_distributed(args)
    if args.world_size is not None:
        print("wsbcn bench: --world-size goes with --distributed", file=sys.stderr)
        return 2
    if args.host:
        return _run_host(args)
    on_gpu = torch.cuda.is_available()
    if not on_gpu and not args.e2e_only and (args.graph or "graph" in (args.timings or ())):
        print("wsbcn bench: graph timing (--graph, --timings graph) times CUDA-graph replays and needs a CUDA "
              "device", file=sys.stderr)
        return 2
    csv = Path(args.out) / info.device_slug() / "bench.csv"
    parts = []
    if not args.e2e_only:
        timings = ("graph",) if args.graph else args.timings
        parts.append(lambda: run_bench(bench_suite(args, on_gpu), args.ops, args.modes, out_dir=args.out,
                                       with_compiled=False if args.no_compiled else None,
                                       batch_sizes=args.batch_sizes, dtypes=args.dtypes, layouts=args.layouts,
                                       max_minutes=args.max_minutes, timings=timings))
    if args.e2e or args.e2e_only or args.e2e_compile:
        def e2e():
            from . import e2e as end_to_end

            frame = end_to_end.run_e2e(**e2e_options(args, on_gpu))
            frame["device"] = device_label()
            upsert(frame, csv)
            return frame

        parts.append(e2e)
    frames = [f for f in (part() for part in parts) if len(f)]
    if not frames:
        print(f"nothing measured; results in {csv}")
        return 0
    measured = pd.concat(frames, ignore_index=True)
    print()
    print(summary_markdown(measured))
    print(f"{len(measured)} measurements -> {csv}")
    plot = "wsbcn plot" + ("" if args.out == "perf/results" else f" --results {args.out}")
    print(f"plots: `{plot}` draws them into perf/plots/{info.device_slug()}/")
    return 0


def _run_host(args) -> int:
    """``wsbcn bench --host``: the host-time benchmark in a fresh process, because
    triton must see the stub driver (and no interpreter) before it is imported."""
    return _host_time_command(args, "--host", "wsbcn.tools.host_bench", args.ops)


def _run_distributed(args) -> int:
    """``wsbcn bench --distributed``: BCN's host time across processes, in a fresh
    process (as --host) that spawns the ranks. The ops default to BCN's two modes
    (GroupNorm and WS take no process group)."""
    from .bench import OPS
    from .dist_bench import DIST_OPS

    ops = DIST_OPS if sorted(args.ops) == sorted(OPS) else args.ops  # --ops not given: BCN's
    extra = ["--world-size", str(args.world_size)] if args.world_size is not None else []
    return _host_time_command(args, "--distributed", "wsbcn.tools.dist_bench", ops, extra)


def _host_time_command(args, flag, module, ops, extra=()) -> int:
    """Run ``python -m <module>`` with the narrowing options of ``args``, without
    TRITON_INTERPRET and WSBCN_BACKEND; its exit status."""
    import os
    import subprocess
    import sys

    import torch

    from . import dev_tools_dir

    if args.e2e or args.e2e_only or args.e2e_compile or args.graph or args.full or args.timings:
        print(f"wsbcn bench: {flag} times eager calls only; it takes --ops, --modes, --batch-sizes, --dtypes, "
              "--layouts, --suite, --quick and --out", file=sys.stderr)
        return 2
    if not torch.cuda.is_available() and dev_tools_dir() is None:
        print(f"wsbcn bench {flag} without a GPU needs the stub CUDA driver of a wsbcn repository checkout "
              "(perf/wsbcn_dev/), which is not installed: run it from a clone of the repository", file=sys.stderr)
        return 2
    command = [sys.executable, "-m", module, "--out", args.out, "--ops", *ops, *extra]
    if args.modes:  # none asked for: the tool's own default (fwd, fwdbwd)
        command += ["--modes", *args.modes]
    for option, value in (("--suite", args.suite), ("--batch-sizes", args.batch_sizes), ("--dtypes", args.dtypes),
                          ("--layouts", args.layouts)):
        if value:
            command += [option, *map(str, value if isinstance(value, list) else [value])]
    if args.quick:
        command.append("--quick")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "WSBCN_BACKEND")}
    return subprocess.run(command, env=env).returncode


def _autotune(sub):
    from ..tuning import KERNELS
    from .suites import SUITES

    p = sub.add_parser("autotune", help="sweep kernel configs and cache the fastest")
    p.add_argument("--suite", choices=SUITES, default="resnet50")
    p.add_argument("--kernels", nargs="+", choices=KERNELS, default=list(KERNELS))
    p.add_argument("--max-configs", type=positive_int, default=None, help="try at most this many configs per case")
    p.add_argument("--out", default="perf/results", help="folder for autotune.csv (a subfolder per device)")
    p.add_argument("--cache", default=None, help="JSON cache to write (default: the user cache for this device)")
    _narrowing(p)
    p.set_defaults(func=_run_autotune)


def _run_autotune(args) -> int:
    import torch

    from .autotune import run_autotune
    from ..backends import interpreter_enabled

    if not torch.cuda.is_available() and not interpreter_enabled():
        print("wsbcn autotune times Triton kernels and needs a CUDA device "
              "(set TRITON_INTERPRET=1 to exercise the flow on CPU; its timings mean nothing)")
        return 2
    frame, winners = run_autotune(args.suite, out_dir=args.out, cache_path=args.cache,
                                  max_configs=args.max_configs, kernels=args.kernels, batch_sizes=args.batch_sizes,
                                  dtypes=args.dtypes, layouts=args.layouts, max_minutes=args.max_minutes)
    print(f"{len(frame)} measurements, {len(winners)} tuned keys")
    return 0


def _plot(sub):
    p = sub.add_parser("plot", help="turn perf/results CSVs into PNGs under perf/plots")
    p.add_argument("--results", default="perf/results")
    p.add_argument("--plots", default="perf/plots")
    p.set_defaults(func=_run_plot)


def _run_plot(args) -> int:
    import sys

    from .plot import run_plot

    try:
        run_plot(args.results, args.plots)
    except (FileNotFoundError, NotADirectoryError) as exc:  # no results yet: say so, as argparse would
        print(f"wsbcn plot: {exc}", file=sys.stderr)
        return 2
    return 0


def _train(sub):
    from .train import add_arguments

    p = sub.add_parser("train", help="the paper's claim on real digits: seven normalization methods, each at its best learning rate, over seeds")
    add_arguments(p)
    p.set_defaults(func=_run_train)


def _run_train(args) -> int:
    from .train import run_from_args

    return run_from_args(args)
