"""argparse wiring of ``wsbcn autotune | bench | plot | train``."""


def add_subcommands(sub) -> None:
    """Add the bench, autotune, plot and train subparsers to ``sub``."""
    for add in (_bench, _autotune, _plot, _train):
        add(sub)


def _bench(sub):
    from .bench import MODES, OPS

    p = sub.add_parser("bench", help="benchmark wsbcn against cuDNN BN, ATen GN, eager and compiled references")
    p.add_argument("--suite", choices=("resnet50", "cpu", "tiny"), default=None,
                   help="shape suite (default: resnet50 on GPU, cpu on a CPU-only machine)")
    p.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--e2e", action="store_true", help="also time a ResNet-50 training step per variant")
    p.add_argument("--e2e-only", action="store_true", help="only the ResNet-50 training step")
    p.add_argument("--no-compiled", action="store_true", help="leave out the torch.compile providers")
    p.add_argument("--graph", action="store_true",
                   help="time CUDA-graph replays (device time without host overhead; GPU only)")
    p.add_argument("--out", default="perf/results", help="results folder (a subfolder per device)")
    _narrowing(p)
    p.set_defaults(func=_run_bench)


def _narrowing(p):
    p.add_argument("--batch-sizes", nargs="+", type=int, default=None, help="only these N")
    p.add_argument("--dtypes", nargs="+", choices=("float32", "bfloat16", "float16"), default=None)
    p.add_argument("--layouts", nargs="+", choices=("contiguous", "channels_last"), default=None)
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop after the case running at this time, keeping what was measured")


def _run_bench(args) -> int:
    from pathlib import Path

    from . import info
    from .bench import run_bench, upsert

    if not args.e2e_only:
        frame = run_bench(args.suite, args.ops, args.modes, out_dir=args.out,
                          with_compiled=False if args.no_compiled else None, batch_sizes=args.batch_sizes,
                          dtypes=args.dtypes, layouts=args.layouts, max_minutes=args.max_minutes,
                          graph=args.graph)
        print(f"{len(frame)} measurements -> {Path(args.out) / info.device_slug() / 'bench.csv'}")
    if args.e2e or args.e2e_only:
        from .e2e import run_e2e

        frame = run_e2e()
        upsert(frame, Path(args.out) / info.device_slug() / "bench.csv")
    return 0


def _autotune(sub):
    from ..tuning import KERNELS

    p = sub.add_parser("autotune", help="sweep kernel configs and cache the fastest")
    p.add_argument("--suite", choices=("resnet50", "cpu", "tiny"), default="resnet50")
    p.add_argument("--kernels", nargs="+", choices=KERNELS, default=list(KERNELS))
    p.add_argument("--max-configs", type=int, default=None, help="try at most this many configs per case")
    p.add_argument("--out", default="perf/results", help="folder for autotune.csv (a subfolder per device)")
    p.add_argument("--cache", default=None, help="JSON cache to write (default: the user cache for this device)")
    _narrowing(p)
    p.set_defaults(func=_run_autotune)


def _run_autotune(args) -> int:
    import torch

    from .autotune import run_autotune
    from ..backend import interpreter_enabled

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
    from .plot import run_plot

    run_plot(args.results, args.plots)
    return 0



def _train(sub):
    from .train import add_arguments

    p = sub.add_parser("train", help="train BN, GN, WS+GN and WS+BCN at micro-batch size on generated data")
    add_arguments(p)
    p.set_defaults(func=_run_train)


def _run_train(args) -> int:
    from .train import run

    run(args.norms, args.steps, args.batch_size, args.lr, args.seed)
    return 0
