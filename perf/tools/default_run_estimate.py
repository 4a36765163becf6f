"""Estimate the wall time of the default GPU run, `wsbcn bench --e2e && wsbcn plot`,
on an H100, case by case, without a GPU. An estimate, not a measurement:

1. What the run does comes from the code: the default suite, its providers, modes
   and timings, the end-to-end runs, the timer budgets, cuda_graphed's warm-up.
2. Every call's time comes from the H100 rows
   (perf/results/nvidia-h100-80gb-hbm3/bench.csv), with a stated fallback where
   they lack the case. triton's do_bench turns it into a timer's wall time: a first
   call, 5 sizing calls, the warm-up and timed calls its budgets buy, a 256 MiB
   cache clear before each sizing and timed call (at the rows' copy bandwidth).
3. Cold triton compiles are counted from the code: every launch of the run's wsbcn
   calls is recorded on the CPU with an emulated H100 (as `wsbcn report-kernels`
   does) and specialised as triton would; each new specialisation is priced at the
   slowest compile of its kernel in the static reports (perf/results/sm90-static/,
   this project's 2-core machine), or compiled here with --compile-specs.
4. What neither gives (torch.compile of a baseline, a profiler session, process
   start, an end-to-end run's set-up) is bounded by runs of the first H100 session
   whose wall time the rows' timestamps bound (a run's rows carry the time it began,
   after its process had started, and it ended before the next run's began): the
   part of such a run that item 2 does not explain, spread over its cases, bounds
   the same kind of case today (BACKTESTS), process starts and compiles included.
   Today's triton compiles (item 3) come on top, except for the end-to-end run,
   whose set-up is what is left after today's compiles: that assumes the session's
   run compiled as much, i.e. started with a cold cache (the rows cannot show it;
   the output says how much more a warm one would allow).

    python perf/tools/default_run_estimate.py [--args "--e2e"] [--compile-specs] [...]

Run it with TRITON_INTERPRET unset (recording launches needs triton's real JIT).
"""
import argparse
import inspect
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[2]
H100_CSV = ROOT / "perf/results/nvidia-h100-80gb-hbm3/bench.csv"
STATIC_CSVS = (ROOT / "perf/results/sm90-static/kernels.csv", ROOT / "perf/results/sm90-static/kernels_triton3.6.csv")
CLEAR_BYTES = 256 * 1024 * 1024  # triton's do_bench: the buffer it zeroes before each sizing and timed call
SIZING_CALLS = 5                 # ... after one first call; the warm-up and repetitions follow from their mean

# Small per-event costs the model adds and nothing measures; stated, not derived.
ASSUMED = {
    "graph_capture_s": (0.05, "a CUDA-graph capture and instantiation beyond the calls it runs"),
    "timer_overhead_s": (0.02, "a do_bench call's own host work (events, synchronisations, quantiles)"),
}

# Runs of the first H100 session (commit 38d40219ab78, triton 3.6, budgets 25 + 100 ms)
# that the rows' timestamps bound. kind: the default run's case kind they bound.
BACKTESTS = {
    "e2e": ("`wsbcn bench --e2e-only`: 16 classification runs", "2026-11-24T16:38:35Z", "2026-11-24T16:40:45Z"),
    "ws": ("`wsbcn bench --ops ws`: 28 WS cases, eager timing", "2026-11-24T16:40:45Z", "2026-11-24T16:42:19Z"),
    "bcn": ("`wsbcn bench --graph --ops bcn` (N = 32 bf16): 7 cases", "2026-11-24T16:42:19Z",
            "2026-11-24T16:44:04Z"),
}
OLD_BUDGET_MS = (25, 100)


# ------------------------------------------------------------------ the rows

class Rows:
    """ms_p50 look-ups in the H100 rows; each fallback used is counted."""

    def __init__(self, csv):
        self.frame = frame = pd.read_csv(csv)
        micro = frame[frame["op"].isin(("bcn", "bcn_estimate", "gn", "ws"))]
        self.copy_gbps = float((100 * micro["gbps"] / micro["pct_copy_bw"]).median())
        self.micro = {(r.op, r.provider, r.variant, r.mode, int(r.N), int(r.C), str(r.spatial), r.dtype, r.layout):
                      float(r.ms_p50) for r in micro.itertuples()}
        e2e = frame[frame["suite"].isin(("e2e", "e2e_detection"))]
        self.e2e = {(r.suite, r.provider, r.variant, int(r.N), str(r.spatial)): float(r.ms_p50)
                    for r in e2e.itertuples()}
        self.fallbacks = Counter()

    @property
    def clear_ms(self):
        return CLEAR_BYTES / (self.copy_gbps * 1e9) * 1e3

    def micro_ms(self, case, provider, timing, mode):
        from wsbcn.tools import bench

        if case.op == "ws":
            shape = case.shape.shape
            cols = (0, shape[0], "x".join(map(str, shape[1:])), "float32", case.layout)
        else:
            s = case.shape
            cols = (case.n, s.c, f"{s.h}x{s.w}", case.dtype, case.layout)
        variant, eager = bench.variant_name(provider, timing), bench.variant_name(provider, "eager")
        tries = [(case.op, variant, "the case's row")]
        if variant != eager:
            tries.append((case.op, eager, "no graph row: the eager call's time (an upper bound)"))
        if case.op in ("bcn_estimate", "gn"):
            tries += [("bcn", v, f"no {case.op} row: the BCN row of the same provider and case (assumed alike)")
                      for v in dict.fromkeys((variant, eager))]
        for op, v, why in tries:
            key = (op, provider, v, mode, *cols)
            if key in self.micro:
                self.fallbacks[why] += 1
                return self.micro[key]
        family = "ws" if case.op == "ws" else "bcn"
        same = [ms for k, ms in self.micro.items() if k[0] == family and k[1] == provider and k[3] == mode
                and k[2] in (variant, eager)]
        self.fallbacks["no row of the case: the slowest row of its op, provider and mode"] += 1
        return max(same or [ms for k, ms in self.micro.items() if k[3] == mode])

    def e2e_ms(self, case, variant, mode, n):
        own = self.e2e.get((case.suite, variant, mode, n, case.spatial))
        if own is not None:
            self.fallbacks["the e2e row"] += 1
            return own
        small = self.e2e[("e2e", variant, mode, 2, "224x224")]
        big = self.e2e[("e2e", variant, mode, 32, "224x224")]
        self.fallbacks[f"no {case.name} row: max(the 224^2 N = 2 row, the N = 32 row x pixels x N)"] += 1
        return max(small, big * case.height * case.width * n / (224 * 224 * 32))


def do_bench_s(ms, budget_ms, clear_ms, overhead_s):
    """Wall time of one triton do_bench call on a call of ``ms`` milliseconds."""
    warmup_ms, rep_ms = budget_ms
    estimate = ms + clear_ms
    n_warmup, n_repeat = max(1, int(warmup_ms / estimate)), max(1, int(rep_ms / estimate))
    return ((1 + n_warmup) * ms + (SIZING_CALLS + n_repeat) * (ms + clear_ms)) / 1e3 + overhead_s


# ------------------------------------------------------------------ what the run does

def plan(argv, overrides):
    """(micro plan or None, [(case, variant, mode, n)] or None) of `wsbcn bench <argv>`
    on a GPU, from the CLI code."""
    from wsbcn.tools import bench, cli, commands, suites, timing

    args = cli.build_parser().parse_args(["bench", *argv])
    micro = None
    if not args.e2e_only:
        suite = commands.bench_suite(args, on_gpu=True) or bench.DEFAULT_GPU_SUITE
        compiled = () if args.no_compiled else suites.compiled_ops(suite, args.ops)
        if overrides.compiled_ops is not None:
            compiled = tuple(overrides.compiled_ops)
        micro = dict(suite=suite, cases=suites.cases(suite, args.ops, args.batch_sizes, args.dtypes, args.layouts),
                     modes=tuple(args.modes or suites.default_modes(suite, bench.MODES)), timings=("graph",) if args.graph else tuple(args.timings or bench.TIMINGS),
                     compiled_ops=compiled,
                     budget=tuple(overrides.sample_budget_ms or timing.bench_budget_ms(suite)))
    runs = None
    if args.e2e or args.e2e_only or args.e2e_compile:
        options = commands.e2e_options(args, on_gpu=True)
        if overrides.detection_batch_sizes:
            options["detection_batch_sizes"] = tuple(overrides.detection_batch_sizes)
        if overrides.e2e_graph_modes:
            options["graph_modes"] = tuple(overrides.e2e_graph_modes)
        runs = e2e_runs(**options)
    return micro, runs


def e2e_runs(with_compiled=False, cases=None, detection_batch_sizes=None, graph_modes=None):
    """[(case, variant, mode, n)] in run_e2e's order with its GPU defaults."""
    from wsbcn.tools import e2e
    from wsbcn.tools.models import VARIANTS

    out = []
    for case in e2e.default_cases(True, cases or e2e.CASES, detection_batch_sizes=detection_batch_sizes):
        modes = e2e.case_graph_modes(case, True, graph_modes)
        for variant, mode in e2e._runs(case, VARIANTS, modes, with_compiled):
            out += [(case, variant, mode, n) for n in case.batch_sizes]
    return out


# ------------------------------------------------------------------ cold triton compiles

def _norm_input_shapes(case, n):
    import torch
    from torch import nn

    from wsbcn.tools.models import resnet50

    with torch.device("meta"):
        model = resnet50("plain_bn", num_classes=case.num_classes)
    shapes = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            m.register_forward_pre_hook(lambda mod, inp, name=name: shapes.__setitem__(name, tuple(inp[0].shape)))
    with torch.no_grad():
        model(torch.empty(n, 3, case.height, case.width, device="meta"))
    return shapes


def e2e_wsbcn_calls(case, variant, n):
    """(forward, leaves) of each wsbcn call in a training step of ``variant``: every
    norm layer on its bf16 channels_last input (autocast's conv output), every WS
    conv's standardisation of its fp32 channels_last weight."""
    import torch

    import wsbcn
    from wsbcn.tools.models import resnet50

    model = resnet50(variant, num_classes=case.num_classes).to(memory_format=torch.channels_last)
    shapes = _norm_input_shapes(case, n)
    for name, m in model.named_modules():
        if isinstance(m, (wsbcn.BatchChannelNorm2d, wsbcn.GroupNorm)):
            x = torch.empty(shapes[name], dtype=torch.bfloat16).to(memory_format=torch.channels_last)
            yield (lambda m=m, x=x.requires_grad_(True): m(x)), [x, *m.parameters()]
        elif isinstance(m, wsbcn.WSConv2d):
            yield m.standardized_weight, [m.weight]


def micro_wsbcn_calls(cases):
    from wsbcn.tools import bench

    for case in cases:
        make = bench.case_inputs(case, "cpu", bench.NUM_GROUPS)[0]
        yield make("wsbcn")


class SpecCounter:
    """Counts the triton specialisations of recorded launches that a process has
    not compiled yet; with ``compile_specs`` each is compiled for sm_90 and timed."""

    def __init__(self, compile_specs):
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend

        self.target = GPUTarget("cuda", 90, 32)
        self.backend = make_backend(self.target)
        self.compile_specs = compile_specs
        self.seen = set()
        frames = [pd.read_csv(p) for p in STATIC_CSVS if p.exists()]
        static = pd.concat(frames, ignore_index=True)
        self.bound = static.groupby("kernel")["compile_s"].max().to_dict()
        self.slowest = float(static["compile_s"].max())
        self.sources = ", ".join(f"{p.name} (triton {f['triton'].iloc[0]}, commit {f['commit'].iloc[0]})"
                                 for p, f in zip(STATIC_CSVS, frames))

    def new(self, calls):
        """(count, seconds) of the specialisations ``calls`` compile first."""
        import torch

        from wsbcn.tools.launch_recorder import recording_launches
        from wsbcn.tools.static_compile import compile_static, specialise

        with recording_launches(self.target) as launches:
            for forward, leaves in calls:
                out = forward()
                torch.autograd.grad(out, leaves, torch.empty_like(out))
        count, seconds = 0, 0.0
        with tempfile.TemporaryDirectory(prefix="wsbcn-estimate-cache-") as cache:
            saved = os.environ.get("TRITON_CACHE_DIR")
            os.environ["TRITON_CACHE_DIR"] = cache
            try:
                for launch in launches:
                    spec = specialise(launch, self.backend)
                    if spec.key() in self.seen:
                        continue
                    self.seen.add(spec.key())
                    count += 1
                    seconds += (compile_static(spec, launch.kernel, self.target)["compile_s"] if self.compile_specs
                                else self.bound.get(launch.name, self.slowest))
            finally:
                if saved is None:
                    os.environ.pop("TRITON_CACHE_DIR", None)
                else:
                    os.environ["TRITON_CACHE_DIR"] = saved
        return count, seconds


# ------------------------------------------------------------------ the model

class Model:
    """Seconds per case or run, by item. ``unknowns``: per-kind bounds from the
    backtests (None while they are being derived)."""

    def __init__(self, rows, graph_warmup, e2e_budget, assumed):
        self.rows, self.graph_warmup, self.e2e_budget, self.a = rows, graph_warmup, e2e_budget, assumed
        self.unknowns = None

    def timer(self, ms, budget):
        return do_bench_s(ms, budget, self.rows.clear_ms, self.a["timer_overhead_s"])

    def micro_case(self, case, providers, modes, timings, budget):
        """(items, profiler sessions, compiled baseline?) of one case, as measure_case runs it."""
        from wsbcn.tools import bench

        items, sessions = Counter(), 0
        for provider in providers:
            fwd_ms = self.rows.micro_ms(case, provider, "eager", "fwd")
            for mode in modes:
                eager_ms = self.rows.micro_ms(case, provider, "eager", mode)
                if mode != "fwd":
                    items["calls"] += fwd_ms / 1e3  # timed_callable's forward, kept for the backward
                counted = False
                for timing in timings:
                    if timing == "graph" and mode == "bwd":
                        continue
                    if timing == "graph":  # cuda_graphed runs the call eagerly, then captures it
                        items["calls"] += (self.graph_warmup + 1) * eager_ms / 1e3
                        items["graph capture"] += self.a["graph_capture_s"]
                    items["timer"] += self.timer(self.rows.micro_ms(case, provider, timing, mode), budget)
                    if not counted:  # peak memory (1 call) and launch count (2 calls, the 2nd profiled)
                        items["calls"] += 3 * eager_ms / 1e3
                        sessions += 1
                        counted = True
        compiled = any(p.startswith("compiled") for p in providers)
        return items, sessions, compiled

    def micro_unknown(self, kind, sessions, compiled):
        """torch.compile and profiler seconds of a case: a compiled case of ``kind``
        costs what one of its backtest cases left unexplained (its compile and
        ``sessions_in`` profiler sessions, and everything else that run spent), plus
        the profiler bound for each session beyond those."""
        u = self.unknowns
        if compiled and kind in u["case_s"]:
            return u["case_s"][kind] + max(0, sessions - u["case_sessions"][kind]) * u["profiler_s"]
        return sessions * u["profiler_s"]

    def e2e_run(self, case, variant, mode, n, trunk_compile_s=None):
        items = Counter()
        eager_ms = self.rows.e2e_ms(case, variant, "eager", n)
        ms = eager_ms
        if mode == "cudagraph":
            ms = self.rows.e2e_ms(case, variant, "cudagraph", n)
            items["calls"] += (self.graph_warmup + 1) * eager_ms / 1e3
            items["graph capture"] += self.a["graph_capture_s"]
        elif mode == "compiled":  # no rows: its first (compiling) step and the eager step's time stand in
            items["calls"] += eager_ms / 1e3
            items["trunk torch.compile"] += math.nan if trunk_compile_s is None else trunk_compile_s
        items["timer"] += self.timer(ms, self.e2e_budget)
        if self.unknowns is not None:
            items["run set-up"] += self.unknowns["e2e_setup_s"]
        return items


def backtest(model, rows, specs_for, log):
    """Derive the per-kind bounds from the session's runs (see BACKTESTS)."""
    from wsbcn.tools.suites import Case, ConvShape, NormShape

    frame = rows.frame

    def gap(kind):
        _, start, end = BACKTESTS[kind]
        return (pd.Timestamp(end) - pd.Timestamp(start)).total_seconds()

    u = dict(case_s={}, case_sessions={}, explained={})
    # WS: an eager measure per provider and mode, with compiled_ws
    ws = frame[(frame["op"] == "ws") & (frame["timestamp"] == BACKTESTS["ws"][1])]
    cases = [Case("ws", ConvShape((int(r.C), *map(int, r.spatial.split("x")))), None, "float32", r.layout)
             for r in ws.drop_duplicates(["C", "spatial", "layout"]).itertuples()]
    explained, sessions = 0.0, 0
    for case in cases:
        items, s, _ = model.micro_case(case, ["wsbcn", "reference_ws", "compiled_ws"], ("fwd", "bwd", "fwdbwd"),
                                       ("eager",), OLD_BUDGET_MS)
        explained += sum(items.values())
        sessions += s
    u["case_s"]["ws"] = (gap("ws") - explained) / len(cases)
    u["case_sessions"]["ws"] = sessions // len(cases)
    u["explained"]["ws"] = (explained, len(cases))
    # BCN graph: then an eager measure and a graph timer per provider and mode (fwd, fwdbwd)
    bcn = frame[(frame["op"] == "bcn") & (frame["timestamp"] == BACKTESTS["bcn"][1])]
    cases = [Case("bcn", NormShape(int(r.C), *map(int, r.spatial.split("x"))), int(r.N), r.dtype, r.layout)
             for r in bcn.drop_duplicates(["C", "spatial", "layout", "N"]).itertuples()]
    explained, sessions = 0.0, 0
    for case in cases:
        items, s, _ = model.micro_case(case, ["wsbcn", "cudnn_bn", "aten_gn", "reference_bcn", "compiled_bcn"],
                                       ("fwd", "fwdbwd"), ("eager", "graph"), OLD_BUDGET_MS)
        explained += sum(items.values())
        sessions += s
    u["case_s"]["bcn"] = u["case_s"]["bcn_estimate"] = (gap("bcn") - explained) / len(cases)
    u["case_sessions"]["bcn"] = u["case_sessions"]["bcn_estimate"] = sessions // len(cases)
    u["explained"]["bcn"] = (explained, len(cases))
    # a profiler session costs at most its share of a compiled case's unexplained time
    u["profiler_s"] = min(u["case_s"][k] / u["case_sessions"][k] for k in ("ws", "bcn"))
    # e2e classification: the same 16 runs as today's; their triton compiles counted with today's kernels
    runs = e2e_runs(cases=("classification",))
    explained = sum(sum(model.e2e_run(*run).values()) for run in runs)
    jit_count, jit_s = specs_for(runs)
    u["e2e_setup_s"] = (gap("e2e") - explained - jit_s) / len(runs)
    u["explained"]["e2e"] = (explained, len(runs), jit_count, jit_s)
    for kind in ("e2e", "ws", "bcn"):
        label, start, end = BACKTESTS[kind]
        log(f"  {label}: {start[11:19]} -> {end[11:19]} = at most {gap(kind):.0f} s")
    e = u["explained"]
    log(f"  WS: timers and calls explain {e['ws'][0]:.1f} s; the rest, {u['case_s']['ws']:.2f} s per case, bounds "
        f"a compiled WS case's compile + {u['case_sessions']['ws']} profiler sessions")
    log(f"  BCN: timers and calls explain {e['bcn'][0]:.1f} s; the rest, {u['case_s']['bcn']:.2f} s per case, bounds "
        f"a compiled BCN case's compile + {u['case_sessions']['bcn']} profiler sessions")
    log(f"  profiler session: at most {u['profiler_s']:.3f} s (the smaller of those per-case rests per session)")
    log(f"  e2e: timers and calls explain {e['e2e'][0]:.1f} s, today's kernels' {e['e2e'][2]} cold compiles "
        f"{e['e2e'][3]:.1f} s; the rest, {u['e2e_setup_s']:.2f} s per run, is an e2e run's set-up (ASSUMES the "
        "session's run compiled at least as much as today's code: its kernels were older)")
    return u


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--csv", default=str(H100_CSV), help="the H100 rows")
    parser.add_argument("--args", default="--e2e", help="`wsbcn bench` arguments of the run (default: --e2e)")
    parser.add_argument("--sample-budget-ms", nargs=2, type=float, metavar=("WARMUP", "REP"),
                        help="micro timer budgets instead of the code's (before this change: 25 100)")
    parser.add_argument("--compiled-ops", nargs="*", help="ops with a compiled baseline instead of the code's")
    parser.add_argument("--detection-batch-sizes", nargs="+", type=int, help="instead of the code's")
    parser.add_argument("--e2e-graph-modes", nargs="+", choices=("eager", "cudagraph"),
                        help="every e2e case's graph modes instead of the code's")
    parser.add_argument("--trunk-compile-s", type=float,
                        help="bound for one compiled detection run's torch.compile (nothing in the rows gives it)")
    parser.add_argument("--process-start-s", type=float, default=0.0,
                        help="extra seconds for starting the bench process (default 0: each backtest's rest "
                             "holds the start of a process, so the derived bounds already carry it)")
    parser.add_argument("--compile-specs", action="store_true",
                        help="compile every counted triton specialisation here and use those times")
    parser.add_argument("--plot-s", type=float, help="seconds of `wsbcn plot` (default: run it here)")
    for name, (value, why) in ASSUMED.items():
        parser.add_argument("--" + name.replace("_", "-"), type=float, default=value, help=why)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: recording launches needs triton's real JIT", file=sys.stderr)
        return 2
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

    import torch

    from wsbcn.tools import info, timing
    from wsbcn.tools.bench import providers

    torch.set_num_threads(1)
    rows = Rows(args.csv)
    micro, runs = plan(shlex.split(args.args), args)
    e2e_budget = tuple(inspect.signature(timing.gpu_timer).parameters[p].default for p in ("warmup_ms", "rep_ms"))
    graph_warmup = inspect.signature(timing.cuda_graphed).parameters["warmup"].default
    model = Model(rows, graph_warmup, e2e_budget, {k: getattr(args, k) for k in ASSUMED})
    counter = SpecCounter(args.compile_specs)
    print(f"Estimate of `wsbcn bench {args.args} && wsbcn plot` on an H100: code at commit {info.git_commit()}, "
          f"rows {os.path.relpath(args.csv, ROOT)}.\n")

    print("What the run does (from the code):")
    if micro:
        ops = Counter(c.op for c in micro["cases"])
        print(f"  micro-benchmarks: suite {micro['suite']}, {len(micro['cases'])} cases {dict(ops)}; modes "
              f"{'/'.join(micro['modes'])}; timings {'/'.join(micro['timings'])} (graph: no bwd); compiled "
              f"baselines for {', '.join(micro['compiled_ops']) or 'none'}; do_bench budgets "
              f"{micro['budget'][0]:g} + {micro['budget'][1]:g} ms")
    if runs:
        kinds = Counter(f"{c.name} N={n} {m}" for c, _, m, n in runs)
        print(f"  end-to-end: {len(runs)} runs ({', '.join(f'{k} x{v}' for k, v in kinds.items())}); do_bench "
              f"budgets {e2e_budget[0]:g} + {e2e_budget[1]:g} ms; cuda_graphed: {graph_warmup} warm-up calls "
              "and the captured one")
    print(f"  the rows' copy bandwidth {rows.copy_gbps:.0f} GB/s: a 256 MiB cache clear takes {rows.clear_ms:.3f} ms")

    print("\nBounds from the first H100 session's runs (their caches' state the rows cannot show; if they were "
          "warm, these bounds hold for a warm run only):")

    def e2e_specs(run_list):
        done, count, secs = set(), 0, 0.0
        scratch = SpecCounter(args.compile_specs)  # the backtest's own process: nothing compiled before it
        for case, variant, mode, n in run_list:
            if variant.startswith("wsbcn") and (case.name, variant, n) not in done:
                done.add((case.name, variant, n))
                c, s = scratch.new(e2e_wsbcn_calls(case, variant, n))
                count, secs = count + c, secs + s
        return count, secs

    model.unknowns = backtest(model, rows, e2e_specs, print)
    rows.fallbacks.clear()  # from here on, those of the estimated run

    lines = []  # (label, items)
    if micro:
        for op in dict.fromkeys(c.op for c in micro["cases"]):
            cases = [c for c in micro["cases"] if c.op == op]
            items = Counter()
            for case in cases:
                names = providers(op, op in micro["compiled_ops"], "cuda")
                case_items, sessions, compiled = model.micro_case(case, names, micro["modes"], micro["timings"],
                                                                  micro["budget"])
                items.update(case_items)  # update, not +=: Counter's + drops NaN and zero
                key = "torch.compile + profiler" if compiled else "profiler"
                items[key] += model.micro_unknown(op, sessions, compiled)
            count, secs = counter.new(micro_wsbcn_calls(cases))
            items[f"triton compiles ({count})"] += secs
            lines.append((f"micro {op}: {len(cases)} cases", items))
        copy_ms = 2 * CLEAR_BYTES / (rows.copy_gbps * 1e9) * 1e3
        lines.append(("micro: copy-bandwidth timer", Counter(timer=model.timer(copy_ms, micro["budget"]))))
    if runs:
        groups = defaultdict(Counter)
        for case, variant, mode, n in runs:
            groups[(case.name, n, mode)].update(model.e2e_run(case, variant, mode, n, args.trunk_compile_s))
            groups[(case.name, n, mode)]["runs"] += 1
        for (name, n, mode), items in groups.items():
            count = items.pop("runs")
            lines.append((f"e2e {name} N={n} {mode}: {count} runs", items))
        done = set()
        for case, variant, mode, n in runs:
            if variant.startswith("wsbcn") and (case.name, variant, n) not in done:
                done.add((case.name, variant, n))
                count, secs = counter.new(e2e_wsbcn_calls(case, variant, n))
                lines.append((f"e2e {case.name} N={n} {variant}: first use", Counter(
                    {f"triton compiles ({count})": secs})))
    if args.plot_s is None:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "wsbcn.tools.cli", "plot", "--results", str(ROOT / "perf/results"),
                            "--plots", tmp], check=True, capture_output=True, cwd=ROOT)
            plot_s, plot_why = time.perf_counter() - start, "run here on this checkout's perf/results"
    else:
        plot_s, plot_why = args.plot_s, "given"
    lines.append(("wsbcn plot (a process of its own)", Counter(plot=plot_s)))
    if args.process_start_s:
        lines.append(("bench process start", Counter(start=args.process_start_s)))

    print(f"\n{'part':<58} {'seconds':>8}   items (s)")
    total, unbounded, by_item = 0.0, 0, Counter()
    for label, items in lines:
        secs = sum(v for v in items.values() if v == v)
        unbounded += sum(1 for v in items.values() if v != v)
        total += secs
        for k, v in items.items():
            by_item[k.split(" (")[0] if k.startswith("triton") else k] += v
        print(f"{label:<58} {secs:8.1f}   " + ", ".join(f"{k} {v:.1f}" for k, v in items.items()
                                                        if v != v or v >= 0.05))
    if unbounded:
        print(f"{'TOTAL':<58} {total:8.1f}   = {total / 60:.2f} min PLUS the compiled trunk runs' torch.compile, "
              "which nothing here bounds (give --trunk-compile-s)")
    else:
        print(f"{'TOTAL':<58} {total:8.1f}   = {total / 60:.2f} min")
    by_item = Counter({k: v for k, v in by_item.items() if v == v})
    print("by item: " + ", ".join(f"{k} {v:.0f} s" for k, v in by_item.most_common()))
    if runs:
        gap_e2e, (explained, n_runs, _, _) = BACKTESTS["e2e"], model.unknowns["explained"]["e2e"]
        warm = ((pd.Timestamp(gap_e2e[2]) - pd.Timestamp(gap_e2e[1])).total_seconds() - explained) / n_runs
        extra = len(runs) * (warm - model.unknowns["e2e_setup_s"])
        print(f"sensitivity: had the session's e2e run found every kernel compiled (a warm cache), an e2e run's "
              f"set-up could be up to {warm:.2f} s, and this total {extra:.0f} s higher ({(total + extra) / 60:.2f} "
              "min)")

    print("\nAssumptions:")
    print("- call times: the H100 rows (ms_p50), fallbacks: "
          + "; ".join(f"{why} ({k})" for why, k in rows.fallbacks.most_common()))
    print("- a timer call costs do_bench's budgets plus ~6 calls for any call under ~1/20 of the timed budget; "
          "the graph timing leaves out bwd and reuses the eager call's peak memory and launch count")
    print(f"- triton compiles: {len(counter.seen)} specialisations first compiled by this run, counted from the code; "
          + ("compiled here for sm_90 and timed" if args.compile_specs else
             f"each priced at the slowest compile of its kernel in {counter.sources} (the slowest of all "
             f"{counter.slowest:.2f} s)"))
    print("- torch.compile and profiler: the per-kind bounds above; BCN with estimates takes BCN's")
    print(f"- an e2e run's set-up (build, move, first-call work): {model.unknowns['e2e_setup_s']:.2f} s, the "
          "detection trunk's the same as the classification network's")
    print(f"- `wsbcn plot`: {plot_s:.1f} s, {plot_why} (CPU only)")
    for name, (_, why) in ASSUMED.items():
        print(f"- {name} = {getattr(args, name):g}: {why}; assumed")
    print("- not included: installing wsbcn, starting the machine")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
