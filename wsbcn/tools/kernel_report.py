"""Static kernel report: what every launch of a shape suite compiles to for sm_90.

Runs without a GPU. For each case of the suite (BCN in its three BN modes and with
the fused ReLU, GN, WS per layer and model-wide; forward and backward), the launch
wrappers run on CPU tensors with an emulated H100's plans (launch_recorder), each
launch is compiled for sm_90 with triton's own specialisation (static_compile), and
one row per launch goes to a CSV: grid,
programs, registers, spills, shared memory, resident CTAs per SM and waves on an
H100's 132 SMs, the width of global loads and stores and of the asynchronous
copies of pipelined loops, the loads in flight per SM (modelled), and the compile
time of its specialisation (each compiled once, in this process, from an empty
triton cache; other work on the machine inflates it).

    python -m wsbcn.tools.kernel_report                       # resnet50 suite, N = 2 and 32
    python -m wsbcn.tools.kernel_report --suite ci --check    # CI: fails on spills, slow compiles, short waves

Run it with TRITON_INTERPRET unset (the interpreter replaces the compiler).
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from .arguments import positive_float, positive_int

DEVICE = "sm_90 static (H100 limits, 132 SMs)"
SUITES = ("resnet50", "ci")
# BCN in its three BN modes (kernels/norm.py MODE_*): training with batch statistics,
# training with micro-batch estimates (estimate=True), eval with the running ones.
# Their passes over x are nearly the same code (eval takes its pivot from the running
# mean and leaves num_batches_tracked alone); their combine kernels differ.
# bcn_relu: batch mode with the ReLU convert fuses into a BatchNorm followed by one (most
# norms of a converted ResNet-50): the apply pass applies it, the backward masks by it.
# ws_model: every conv weight of the suite in one model-wide WS call (ops/ws_model.py).
OPS = ("bcn", "bcn_estimate", "bcn_eval", "bcn_relu", "gn", "ws", "ws_model")
BCN_MODES = {"bcn": dict(training=True, estimate=False), "bcn_estimate": dict(training=True, estimate=True),
             "bcn_eval": dict(training=False, estimate=False),
             "bcn_relu": dict(training=True, estimate=False, activation="relu")}
# CI: S a multiple of 16 and split (56^2), scalar loads (14^2, 7^2); a WS row in one
# block (fan-in 147) and looped (4608). Every kernel, both layouts, N = 2 and 32.
CI_NORM_SHAPES = ((256, 56, 56), (1024, 14, 14), (2048, 7, 7))
CI_CONV_SHAPES = ((64, 3, 7, 7), (512, 512, 3, 3))
# CI's estimate and eval cases: their combine kernels (which never see x's dtype) at
# 56^2, where triton 3.9 spilled the estimate/eval backward combine (49 chunks per
# sample at N = 2, NCHW), and 28^2, where triton 3.6 spilled the estimate forward
# combine (13 chunks, channels_last); their passes over x in the first dtype only
# (what differs from the batch mode there is one pivot load and the num_batches_tracked
# increment). The other shapes' modes are left to the full suite, to keep CI's
# compiles near a minute on 2 cores.
CI_MODE_SHAPES = ((256, 56, 56), (256, 28, 28))


def suite_cases(suite: str, batch_sizes, dtypes, layouts, ops):
    """(op, pass-less case dict) of a suite: norm cases per (shape, N, dtype,
    layout, op), WS cases per (conv weight, dtype, layout), one model-wide WS case of
    all the conv weights per (dtype, layout). The ci suite takes the BCN estimate and
    eval modes and the fused ReLU in the first of ``dtypes`` only, on CI_MODE_SHAPES."""
    from .suites import resnet50_shapes

    if suite == "resnet50":
        norms, convs = resnet50_shapes(224)
        norms = [(s.c, s.h, s.w) for s in norms]
        convs = [s.shape for s in convs]
    elif suite == "ci":
        norms, convs = CI_NORM_SHAPES, CI_CONV_SHAPES
    else:
        raise ValueError(f"unknown suite {suite!r}: choose one of {SUITES}")
    for dtype in dtypes:
        for layout in layouts:
            for op in ops:
                if op == "ws":
                    for shape in convs:
                        yield dict(op=op, shape=tuple(shape), n=None, dtype=dtype, layout=layout)
                elif op == "ws_model":
                    yield dict(op=op, shape=tuple(tuple(shape) for shape in convs), n=None, dtype=dtype,
                               layout=layout)
                else:
                    shapes = norms
                    if suite == "ci" and op in ("bcn_estimate", "bcn_eval", "bcn_relu"):
                        if dtype != dtypes[0]:
                            continue
                        shapes = CI_MODE_SHAPES
                    for n in batch_sizes:
                        for shape in shapes:
                            yield dict(op=op, shape=tuple(shape), n=n, dtype=dtype, layout=layout)


def case_call(case):
    """(forward, leaves) of one case through the public functional API, as a
    ResNet-50 layer and ``wsbcn bench`` call it: BCN with per-group affine in
    training with batch statistics (op "bcn"; "bcn_relu" with the fused ReLU), in
    training with micro-batch estimates ("bcn_estimate") or in eval ("bcn_eval"), GN
    with affine in the input's dtype, WS in the released convention (eps 1e-5,
    unbiased std), per weight ("ws") or of all the weights at once ("ws_model").
    Tensors are uninitialised: nothing runs while launches are recorded."""
    import torch

    from ..functional import batch_channel_norm, group_norm, weight_standardize

    dtype = getattr(torch, case["dtype"])
    memory_format = torch.channels_last if case["layout"] == "channels_last" else torch.contiguous_format
    if case["op"] == "ws":
        w = torch.empty(case["shape"], dtype=dtype).to(memory_format=memory_format).requires_grad_(True)
        return (lambda: weight_standardize(w, 1e-5, 1, "std")), [w]
    if case["op"] == "ws_model":
        from ..ops.ws_model import weight_standardize_all

        ws = [torch.empty(s, dtype=dtype).to(memory_format=memory_format).requires_grad_(True) for s in case["shape"]]
        return (lambda: weight_standardize_all(ws, 1e-5, 1, "std")), ws
    c, h, w_ = case["shape"]
    x = torch.empty(case["n"], c, h, w_, dtype=dtype).to(memory_format=memory_format).requires_grad_(True)
    groups = 32
    if case["op"] == "gn":
        weight, bias = (torch.ones(c, dtype=dtype).requires_grad_(True) for _ in range(2))
        return (lambda: group_norm(x, groups, weight, bias)), [x, weight, bias]
    gamma, beta = torch.ones(c, requires_grad=True), torch.zeros(c, requires_grad=True)
    omega, eta = torch.ones(1, groups, 1, requires_grad=True), torch.zeros(1, groups, 1, requires_grad=True)
    running_mean, running_var = torch.zeros(c), torch.ones(c)
    tracked = torch.zeros((), dtype=torch.long)
    return (lambda: batch_channel_norm(x, groups, running_mean, running_var, gamma, beta, omega, eta,
                                       num_batches_tracked=tracked, **BCN_MODES[case["op"]])), [x, gamma, beta, omega, eta]


def record_case(case, launches):
    """Run one case's forward and backward through the wrappers (inside
    ``recording_launches``); returns [(pass, RecordedLaunch)]."""
    import torch

    forward, leaves = case_call(case)
    start = len(launches)
    out = forward()
    middle = len(launches)
    outs = out if isinstance(out, tuple) else (out,)  # model-wide WS: one W_hat per weight
    torch.autograd.grad(outs, leaves, [torch.empty_like(o) for o in outs])
    return [("fwd", launch) for launch in launches[start:middle]] + [("bwd", launch) for launch in launches[middle:]]


def _widths_text(widths: dict) -> str:
    return " ".join(f"{b}Bx{k}" for b, k in sorted(widths.items(), reverse=True))


def _bulk_width(widths: dict) -> int:
    """The width most of the accesses have (the narrower one on a tie); 0 if none.
    Given the accesses in loops, that is the width of the streaming loads/stores."""
    return min(widths, key=lambda b: (-widths[b], b)) if widths else 0


def launch_row(case, pass_, launch, spec, facts, spec_id) -> dict:
    from . import static_compile

    num_warps = spec.options.num_warps
    ctas, limiter = static_compile.ctas_per_sm(facts["registers"], facts["shared_bytes"], num_warps)
    loop = facts["loop_widths"]
    streamed = dict(loop["ld"])  # what a loop step loads: plain loads and pipelined copies
    for b, k in loop.get("cp", {}).items():
        streamed[b] = streamed.get(b, 0) + k
    load_bytes = _bulk_width(streamed)
    step_kb = sum(b * k for b, k in streamed.items()) * 32 * num_warps * ctas / 1024
    # a loop pipelined by triton (cp.async) over NUM_STAGES stages keeps NUM_STAGES - 1
    # steps of copies outstanding at its wait (wait_group NUM_STAGES - 2); a plain loop
    # issues one step's loads before their first use
    ahead = max(1, spec.options.num_stages - 1) if loop.get("cp") else 1
    constexprs = {k: v for k, v in spec.constexpr_values(launch.kernel).items() if k.isupper()}
    shape, op = case["shape"], case["op"]
    norm = not op.startswith("ws")
    return {
        "op": op, "pass": pass_, "kernel": launch.name, "dtype": case["dtype"], "layout": case["layout"],
        "n": case["n"], "shape": f"{len(shape)} weights" if op == "ws_model" else "x".join(map(str, shape)),
        "c": shape[0] if norm else None,
        "s": shape[1] * shape[2] if norm else None,
        "fan_in": shape[1] * shape[2] * shape[3] if op == "ws" else None,
        "grid": "x".join(map(str, launch.grid)), "programs": launch.programs,
        "num_warps": num_warps, "num_stages": spec.options.num_stages,
        "constexprs": " ".join(f"{k}={v}" for k, v in sorted(constexprs.items())),
        "registers": facts["registers"], "spill_store_bytes": facts["spill_store_bytes"],
        "spill_load_bytes": facts["spill_load_bytes"], "stack_bytes": facts["stack_bytes"],
        "shared_bytes": facts["shared_bytes"], "ctas_per_sm": ctas, "occupancy_limit": limiter,
        "waves": launch.programs / (ctas * static_compile.SMS) if ctas else float("inf"),
        "load_bytes": load_bytes, "store_bytes": _bulk_width(loop["st"]),
        "loop_loads": _widths_text(loop["ld"]), "loop_async": _widths_text(loop.get("cp", {})),
        "loop_stores": _widths_text(loop["st"]),
        "loads": _widths_text(facts["widths"]["ld"]), "stores": _widths_text(facts["widths"]["st"]),
        # what one loop step of every resident CTA asks of memory (global loads and
        # cp.async copies of the innermost loops), and what is outstanding at once at
        # the loop's wait (modelled: one step for a plain loop whose step's loads are
        # all issued before their first use, NUM_STAGES - 1 for a pipelined one): an
        # H100 needs ~15-20 KB per SM in flight to reach its bandwidth (~3.3 TB/s x
        # ~0.6 us / 132 SMs)
        "step_load_kb_per_sm": round(step_kb, 1), "loads_in_flight_kb_per_sm": round(step_kb * ahead, 1),
        **_tile_facts(case, launch, constexprs, num_warps, load_bytes),
        "async_copies": facts["async_copies"], "compile_s": round(facts["compile_s"], 3), "spec_id": spec_id,
    }


def _tile_facts(case, launch, constexprs, num_warps, load_bytes) -> dict:
    """For the passes over x (the launches with a [BLOCK_C, BLOCK_S] tile): tiles per
    program (1: the split gives every tile its own program) and values per thread and
    in one streaming load (its width over the element size). None for the others."""
    import torch

    if "BLOCK_S" not in constexprs or "BLOCK_C" not in constexprs or case["op"].startswith("ws"):
        return {"tiles_per_program": None, "values_per_thread": None, "values_per_load": None}
    c, h, w = case["shape"]
    block_c, block_s = constexprs["BLOCK_C"], constexprs["BLOCK_S"]
    tiles = case["n"] * -(-c // block_c) * -(-(h * w) // block_s)
    element = getattr(torch, case["dtype"]).itemsize
    return {"tiles_per_program": round(tiles / launch.programs, 3),
            "values_per_thread": block_c * block_s / (32 * num_warps),
            "values_per_load": max(1, load_bytes // element)}


def build_report(suite, batch_sizes, dtypes, layouts, ops, arch=90, progress=print):
    """The report as a pandas DataFrame, one row per recorded launch."""
    import pandas as pd
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    from . import launch_recorder, static_compile
    from .info import git_commit

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    rows, facts_of = [], {}
    with tempfile.TemporaryDirectory(prefix="wsbcn-report-cache-") as cache:
        saved_cache = os.environ.get("TRITON_CACHE_DIR")
        os.environ["TRITON_CACHE_DIR"] = cache  # compile times from scratch, never from an old cache
        try:
            for case in suite_cases(suite, batch_sizes, dtypes, layouts, ops):
                with launch_recorder.recording_launches(target) as launches:
                    passes = record_case(case, launches)
                for pass_, launch in passes:
                    spec = static_compile.specialise(launch, backend)
                    key = spec.key()
                    if key not in facts_of:
                        facts_of[key] = (len(facts_of), static_compile.compile_static(spec, launch.kernel, target))
                        progress(f"compiled #{facts_of[key][0]} {spec.name} in {facts_of[key][1]['compile_s']:.1f} s")
                    spec_id, facts = facts_of[key]
                    rows.append(launch_row(case, pass_, launch, spec, facts, spec_id))
        finally:
            if saved_cache is None:
                os.environ.pop("TRITON_CACHE_DIR", None)
            else:
                os.environ["TRITON_CACHE_DIR"] = saved_cache
    frame = pd.DataFrame(rows)
    frame.insert(0, "device", DEVICE if arch == 90 else f"sm_{arch} static")
    frame.insert(1, "triton", triton.__version__)
    frame.insert(2, "commit", git_commit(paths=("kernels", "wsbcn/tuning.py")))
    return frame


def _case_text(r) -> str:
    n = "" if r["n"] != r["n"] else f" n={int(r['n'])}"  # NaN for WS
    return f"{r['op']} {r['dtype']} {r['layout']}{n} {r['shape']}: {r['constexprs']} num_warps={r['num_warps']}"


WAVES_MIN_N = 32  # the batch sizes held to the split's WAVES (N = 2 is latency-bound)


def short_of_waves(frame):
    """The passes over x at N >= WAVES_MIN_N below the WAVES waves the split asks for
    (wsbcn/tuning.py), at their real occupancy, that could have more: a program
    with several tiles (a larger split would add programs), or a thread with more
    than one load's values per tile (a smaller tile would; scalar rows may keep
    MIN_VALUES_PER_THREAD). Below that, more waves need loads narrower than the rows
    allow."""
    from ..tuning import MIN_VALUES_PER_THREAD, WAVES

    if "tiles_per_program" not in frame:
        return frame.iloc[0:0]
    passes = frame[frame.tiles_per_program.notna() & (frame.n >= WAVES_MIN_N) & (frame.waves < WAVES)]
    one_load = passes.values_per_thread <= passes.values_per_load.clip(lower=MIN_VALUES_PER_THREAD)
    return passes[(passes.tiles_per_program > 1) | ~one_load]


def check(frame, max_compile_s: float) -> list:
    """The problems CI fails on: any spill, any specialisation compiling longer than
    ``max_compile_s``, a pass over x short of the split's waves where smaller tiles or
    a larger split would give them (``short_of_waves``)."""
    problems = []
    for _, r in short_of_waves(frame).iterrows():
        problems.append(f"{r['kernel']} runs {r['waves']:.2f} waves at {r['tiles_per_program']:g} tiles per program "
                        f"and {r['values_per_thread']:g} values per thread ({r['values_per_load']:g} per load; "
                        f"{_case_text(r)})")
    spills = frame[(frame.spill_store_bytes > 0) | (frame.spill_load_bytes > 0)]
    for _, r in spills.drop_duplicates("spec_id").iterrows():
        problems.append(f"{r['kernel']} spills {r['spill_store_bytes']} B ({_case_text(r)})")
    slow = frame[frame.compile_s > max_compile_s]
    for _, r in slow.drop_duplicates("spec_id").iterrows():
        problems.append(f"{r['kernel']} takes {r['compile_s']:.1f} s to compile (> {max_compile_s} s; {_case_text(r)})")
    return problems


def summary(frame):
    """Per kernel and layout: ranges of registers, spills, CTAs per SM, waves (N = 2
    and 32 apart), the bulk load width, and the slowest compile."""
    def span(values):
        lo, hi = values.min(), values.max()
        return f"{lo:.3g}" if lo == hi else f"{lo:.3g}-{hi:.3g}"

    groups = frame.groupby(["kernel", "layout"], sort=True)
    out = groups.agg(
        registers=("registers", span), spill_bytes=("spill_store_bytes", "max"), smem_kb=("shared_bytes", lambda v: span(v / 1024)),
        ctas_per_sm=("ctas_per_sm", span), load_bytes=("load_bytes", span), store_bytes=("store_bytes", span),
        async_copies=("async_copies", "max"), in_flight_kb=("loads_in_flight_kb_per_sm", span),
        max_compile_s=("compile_s", "max"))
    for n in sorted(frame.n.dropna().unique()):
        out[f"waves_n{int(n)}"] = frame[frame.n == n].groupby(["kernel", "layout"]).waves.agg(span)
    return out.reset_index()


def add_arguments(p) -> None:
    p.add_argument("--suite", choices=SUITES, default="resnet50",
                   help="resnet50: every norm and conv shape of ResNet-50 at 224^2; ci: a few of them")
    p.add_argument("--batch-sizes", nargs="+", type=positive_int, default=[2, 32])
    p.add_argument("--dtypes", nargs="+", choices=("float32", "bfloat16", "float16"), default=["bfloat16", "float32"])
    p.add_argument("--layouts", nargs="+", choices=("contiguous", "channels_last"),
                   default=["contiguous", "channels_last"])
    p.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS),
                   help="bcn, bcn_estimate, bcn_eval: BCN in training with batch statistics, in training with "
                        "micro-batch estimates, in eval (running statistics); bcn_relu: batch statistics with the "
                        "fused ReLU; gn; ws: per weight; ws_model: all the weights in one model-wide call")
    p.add_argument("--arch", type=positive_int, default=90,
                   help="compute capability to compile for (occupancy assumes 90)")
    p.add_argument("--out", default=None,
                   help="CSV to write (default: perf/results/sm90-static/kernels.csv for the resnet50 suite, "
                        "none for ci)")
    p.add_argument("--plot", default=None, help="PNG to draw (default: perf/plots/sm90-static/kernels.png with "
                                                "the default --out)")
    p.add_argument("--baseline", default=None, help="a report CSV of another commit, drawn in grey on the plot")
    p.add_argument("--check", action="store_true",
                   help="exit 1 on any spill, slow compile, or pass over x short of waves that smaller tiles would give")
    p.add_argument("--max-compile-s", type=positive_float, default=30.0,
                   help="slowest compile --check accepts (seconds)")
    p.add_argument("--quiet", action="store_true", help="no line per compiled specialisation")


def run(args) -> int:
    from .. import backends
    from . import dev_tools_dir

    if dev_tools_dir() is None:
        print("wsbcn report-kernels needs the developer tools of a wsbcn repository checkout (perf/wsbcn_dev/), "
              "which are not installed: run it from a clone of the repository", file=sys.stderr)
        return 2
    if backends.interpreter_enabled():
        print("wsbcn report-kernels compiles for a GPU target and cannot run under TRITON_INTERPRET=1: "
              "unset it (and WSBCN_BACKEND=triton) for this command", file=sys.stderr)
        return 2
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton's default, stated (3.9 warns otherwise)
    start = time.perf_counter()
    frame = build_report(args.suite, args.batch_sizes, args.dtypes, args.layouts, args.ops, args.arch,
                         progress=(lambda line: None) if args.quiet else print)
    out, plot = args.out, args.plot
    if out is None and args.suite == "resnet50":
        out = "perf/results/sm90-static/kernels.csv"
        plot = plot or "perf/plots/sm90-static/kernels.png"
    import pandas as pd

    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.max_rows", 200):
        print(summary(frame).to_string(index=False))
    specs = frame.drop_duplicates("spec_id")
    print(f"{len(frame)} launches, {len(specs)} specialisations compiled in {specs.compile_s.sum():.0f} s "
          f"(slowest {specs.compile_s.max():.1f} s); report took {time.perf_counter() - start:.0f} s")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        frame.to_csv(out, index=False)
        print(f"-> {out}")
    if plot:
        from .kernel_report_plot import plot_report

        plot_report(frame, plot, pd.read_csv(args.baseline) if args.baseline else None)
        print(f"-> {plot}")
    if args.check:
        problems = check(frame, args.max_compile_s)
        for line in problems:
            print("FAIL", line)
        if problems:
            return 1
    return 0


def add_subcommand(sub) -> None:
    """``wsbcn report-kernels`` (one line in tools/commands.py)."""
    p = sub.add_parser("report-kernels", help="compile every launch of a shape suite for sm_90 and report "
                                              "registers, spills, occupancy, waves, vector widths (no GPU needed)")
    add_arguments(p)
    p.set_defaults(func=run)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m wsbcn.tools.kernel_report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
