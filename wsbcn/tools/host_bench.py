"""Host time of wsbcn's eager calls, on any machine (``wsbcn bench --host``).

At micro-batch sizes an eager BCN layer is host-bound: in the H100 session
(README, Results) a BCN forward+backward kept the GPU
busy for 17 us and the host for ~1.6 ms (Python, torch dispatch and autograd,
allocations, triton's binder and launcher). This
module measures that host time per eager call, for the calls ``wsbcn bench`` times
for the ``wsbcn`` provider (BCN in batch and estimate mode, GroupNorm, WS), and
writes rows in the bench CSV schema with variant "host".

Two drivers:

``stub`` (any machine, no GPU needed): triton runs over the repository's stub driver
    (perf/wsbcn_dev/stub_driver.py, reached as ``wsbcn.tools.stub_driver``)
    and ``wsbcn.backends.emulate_gpu`` sends CPU tensors down wsbcn's GPU path with
    the launch plans and tuned configs of the GPU the stub answers as (an H100).
    Everything on the host runs for real, the first call's compile for sm_90
    included; no kernel runs (outputs are garbage). Host time = the CPU time of the
    calling thread during the call (``--clock cpu``, the default here): it does all
    of the work (autograd runs CPU backward on the caller; nothing blocks), so this
    is the wall time the call takes on an idle core, and other processes competing
    for the cores do not move it. Wall time does (``--clock wall``): on a 2-core
    machine at load 5, wall time was 2.5-3x the CPU time, the difference all spent
    waiting in the run queue (/proc/self/schedstat). Rows go to
    ``<out>/cpu/bench.csv``; their device column names the stub and the emulated GPU.
``cuda`` (a GPU machine): CUDA tensors through the real driver. Host time = wall
    time of the eager call alone, with no synchronisation inside it, started on an
    idle device (``torch.cuda.synchronize()`` before each call, outside the timed
    span): the call returns once everything is queued, and an idle device never
    makes a launch wait for queue space, so the span is the host's work alone.
    (While the device is slower than the host, a queue that filled up would turn
    host time into device time; this way it never fills.) Launches come from the
    CUDA profiler there and include torch's own kernels (e.g. a cast of a gradient).

Each case: a few warm-up calls (the first compiles each kernel for sm_90, seconds
per kernel; triton caches the cubins on disk), one call to count launches, then
``rounds`` rounds of ``calls`` calls; ms_p50/p20/p80 are the median, 20th and 80th
percentiles over rounds of the mean time per call. Run it in a fresh process with
TRITON_INTERPRET unset (triton picks interpreter or compiler when kernels are
defined, at import):

    python -m wsbcn.tools.host_bench [--suite resnet50] [--batch-sizes 2 32] [--shapes 256x14x14]
        [--weights 256x256x3x3] [--ops bcn gn] [--modes fwd fwdbwd] [--quick] [--out perf/results]
"""
import argparse
import gc
import math
import os
import statistics
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from .. import backends
from . import info, suites
from .bench import MODES, NUM_GROUPS, OPS, NormInputs, norm_fn, timed_callable, ws_fn
from .results import COLUMNS, upsert

DEFAULT_MODES = ("fwd", "fwdbwd")
DRIVERS = ("auto", "stub", "cuda")
# "wall": elapsed time; "cpu": CPU time of the calling thread (see the module docstring)
CLOCKS = {"wall": time.perf_counter_ns, "cpu": time.thread_time_ns}


def parse_shape(text: str, dims: int) -> tuple:
    """'256x14x14' -> (256, 14, 14), with exactly ``dims`` positive sizes."""
    try:
        sizes = tuple(int(part) for part in text.lower().split("x"))
    except ValueError:
        sizes = ()
    if len(sizes) != dims or min(sizes) < 1:
        example = "256x14x14 (C x H x W)" if dims == 3 else "256x256x3x3 (out x in x kH x kW)"
        raise ValueError(f"bad shape {text!r}: expected {dims} positive sizes like {example}")
    return sizes


def _resolve_driver(driver: str) -> str:
    if driver not in DRIVERS:
        raise ValueError(f"driver must be one of {DRIVERS}, got {driver!r}")
    if driver == "auto":
        # (torch.cuda.is_available() loads no driver on a CPU build of torch)
        return "cuda" if torch.cuda.is_available() else "stub"
    if driver == "cuda" and not torch.cuda.is_available():
        raise ValueError("driver='cuda' needs a CUDA device; use driver='stub' on a machine without one")
    return driver


def _check_process() -> None:
    """Refuse what would make the numbers meaningless, before anything runs."""
    if backends.interpreter_enabled():
        raise RuntimeError(
            "the host benchmark times compiled launches, but TRITON_INTERPRET is set, so triton runs its "
            "interpreter; run `python -m wsbcn.tools.host_bench` in a fresh process without TRITON_INTERPRET")
    if backends.requested_backend() != "auto":
        raise RuntimeError(f"WSBCN_BACKEND={backends.requested_backend()} is set: the host benchmark picks the "
                           "Triton path itself; unset WSBCN_BACKEND")


def _quantiles_ms(per_call_ns: list) -> tuple:
    """(p50, p20, p80) in ms of the per-round mean times per call."""
    ms = [t / 1e6 for t in per_call_ns]
    if len(ms) == 1:
        return ms[0], ms[0], ms[0]
    deciles = statistics.quantiles(ms, n=10, method="inclusive")
    return statistics.median(ms), deciles[1], deciles[7]


def time_host(fn, sync, rounds: int, calls: int, clock=time.perf_counter_ns) -> tuple:
    """(p50, p20, p80) ms over ``rounds`` of the mean time per call of ``calls``
    calls on ``clock`` (ns), each timed from an idle device (``sync`` runs before
    it, outside the span)."""
    gc.collect()
    per_round = []
    for _ in range(rounds):
        total = 0
        for _ in range(calls):
            sync()
            start = clock()
            fn()
            total += clock() - start
        per_round.append(total / calls)
    return _quantiles_ms(per_round)


def _jobs(suite_name, ops, batch_sizes, dtypes, layouts, shapes, weights):
    """(op, shape, N, dtype, layout, suite label) of every case."""
    norms, convs, batches, kinds, orders = suites.suite(suite_name, batch_sizes, dtypes, layouts)
    suite_norms = {(s.c, s.h, s.w) for s in norms}
    suite_convs = {s.shape for s in convs}
    norm_shapes = [parse_shape(s, 3) for s in shapes] if shapes else [(s.c, s.h, s.w) for s in norms]
    conv_shapes = [parse_shape(s, 4) for s in weights] if weights else [s.shape for s in convs]
    jobs = []
    for op in ops:
        if op == "ws":  # weights stay fp32 (master weights under autocast), as in wsbcn bench
            jobs += [(op, w, None, "float32", layout, suite_name if w in suite_convs else "custom")
                     for w in conv_shapes for layout in orders]
        else:
            jobs += [(op, s, n, dtype, layout, suite_name if s in suite_norms else "custom")
                     for s in norm_shapes for n in batches for dtype in kinds for layout in orders]
    return jobs


def run_host_bench(suite_name: str = "resnet50", ops=OPS, modes=DEFAULT_MODES, batch_sizes=(2, 32),
                   dtypes=("bfloat16",), layouts=("contiguous",), shapes=None, weights=None, rounds: int = 15,
                   calls: int = 20, warmup: int = 3, driver: str = "auto", clock: str = "auto",
                   out_dir="perf/results", log=print) -> pd.DataFrame:
    """Time the host side of every eager call in the suite; returns the rows (bench
    CSV schema, variant "host", provider "wsbcn"), also upserted to
    ``<out_dir>/<device>/bench.csv`` unless ``out_dir`` is None.

    ``shapes`` ("CxHxW") and ``weights`` ("OxIxKHxKW") replace the suite's norm
    and conv shapes; rows of shapes outside the suite say suite "custom".
    ``driver``: "stub" (no GPU needed), "cuda", or "auto" (cuda when there is a
    device). ``clock``: "cpu" (the calling thread's CPU time; stub only), "wall",
    or "auto" (cpu on the stub, wall on CUDA). See the module docstring for what is
    timed and how.
    """
    unknown = [op for op in ops if op not in OPS] + [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"unknown op or mode {unknown}: ops are {OPS}, modes {MODES}")
    for name, value in (("rounds", rounds), ("calls", calls)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not isinstance(warmup, int) or warmup < 1:
        raise ValueError(f"warmup must be a positive int (the first call compiles), got {warmup!r}")
    if clock not in ("auto", *CLOCKS):
        raise ValueError(f"clock must be one of {('auto', *CLOCKS)}, got {clock!r}")
    jobs = _jobs(suite_name, ops, batch_sizes, dtypes, layouts, shapes or (), weights or ())
    _check_process()
    driver = _resolve_driver(driver)
    if clock == "auto":
        clock = "cpu" if driver == "stub" else "wall"
    if clock == "cpu" and driver == "cuda":
        raise ValueError("clock='cpu' would miss the host work of autograd's CUDA thread: use 'wall' on CUDA")

    if driver == "stub":
        from . import stub_driver

        stub_driver.install()
        device, sync, folder = "cpu", (lambda: None), "cpu"
        device_label = f"cpu (stub driver, emulating {stub_driver.GPU_NAME})"

        def launches_of(fn):
            before = stub_driver.launch_count()
            fn()
            return float(stub_driver.launch_count() - before)
    else:
        from .bench import count_launches

        device, sync, folder = "cuda", torch.cuda.synchronize, info.device_slug()
        device_label = info.device_name()
        launches_of = count_launches
    meta = dict(info.run_metadata(), device=device_label)

    log(f"host time per call, {driver} driver, {clock} clock, {len(jobs) * len(modes)} cases")
    rows = []
    previous = backends.emulated_gpu()
    if driver == "stub":
        backends.emulate_gpu(stub_driver.GPU_NAME, stub_driver.SM_COUNT)
    try:
        for op, shape, n, dtype_name, layout, suite_label in jobs:
            if op == "ws":
                w = torch.randn(shape, device=device, dtype=torch.float32)
                if layout == "channels_last":
                    w = w.to(memory_format=torch.channels_last)
                w.requires_grad_(True)
                case = dict(N=0, C=shape[0], spatial="x".join(map(str, shape[1:])), dtype="float32")
                make, restore = (lambda: ws_fn("wsbcn", w)), (lambda: None)
            else:
                c, h, wd = shape
                inp = NormInputs(n, c, h, wd, getattr(torch, dtype_name), layout, device, min(NUM_GROUPS, c))
                case = dict(N=n, C=c, spatial=f"{h}x{wd}", dtype=dtype_name)
                make, restore = (lambda: norm_fn(op, "wsbcn", inp)), inp.restore
            for mode in modes:
                fn = timed_callable(*make(), mode)
                started = time.perf_counter()
                for _ in range(warmup):
                    fn()
                warm_s = time.perf_counter() - started
                launches = launches_of(fn)
                p50, p20, p80 = time_host(fn, sync, rounds, calls, CLOCKS[clock])
                restore()  # timing repeats must not advance running statistics
                rows.append(dict(suite=suite_label, op=op, provider="wsbcn", variant="host", mode=mode, layout=layout,
                                 ms_p50=p50, ms_p20=p20, ms_p80=p80, gbps=math.nan, pct_copy_bw=math.nan,
                                 peak_mem_mb=math.nan, launches=launches, images_per_s=math.nan, **case, **meta))
                label = "x".join(map(str, shape if n is None else (n, *shape)))
                log(f"{op:>12} {mode:<6} {label:<16} {dtype_name:<8} {layout:<13} host {p50 * 1e3:8.1f} us/call "
                    f"(p20 {p20 * 1e3:.1f}, p80 {p80 * 1e3:.1f})  launches {launches:.0f}  warm-up {warm_s:.1f} s")
    finally:
        backends.emulate_gpu(*(previous or (None,)))
    frame = pd.DataFrame(rows, columns=COLUMNS)
    if out_dir is not None:
        upsert(frame, Path(out_dir) / folder / "bench.csv")
    return frame


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m wsbcn.tools.host_bench",
        description="Host time per eager wsbcn call (BCN, BCN estimate, GroupNorm, WS), through a stub CUDA driver "
                    "on a machine without a GPU or the real driver on one. Needs TRITON_INTERPRET unset.")
    p.add_argument("--suite", choices=suites.SUITES, default="resnet50", help="shape suite (default: resnet50)")
    p.add_argument("--shapes", nargs="+", default=None, metavar="CxHxW",
                   help="norm-layer shapes instead of the suite's, e.g. 256x14x14")
    p.add_argument("--weights", nargs="+", default=None, metavar="OxIxKxK",
                   help="WS weight shapes instead of the suite's, e.g. 256x256x3x3")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[2, 32])
    p.add_argument("--dtypes", nargs="+", choices=("float32", "bfloat16", "float16"), default=["bfloat16"])
    p.add_argument("--layouts", nargs="+", choices=("contiguous", "channels_last"), default=["contiguous"])
    p.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(DEFAULT_MODES))
    p.add_argument("--rounds", type=int, default=15, help="rounds per case; p50/p20/p80 are over rounds")
    p.add_argument("--calls", type=int, default=20, help="calls per round")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls first (the first one compiles)")
    p.add_argument("--quick", action="store_true",
                   help="3 rounds of 5 calls after 2 warm-up calls: a quick look at one narrowed case")
    p.add_argument("--driver", choices=DRIVERS, default="auto",
                   help="stub: no GPU needed; cuda: the real driver; auto: cuda when a device exists")
    p.add_argument("--clock", choices=("auto", *CLOCKS), default="auto",
                   help="cpu: the calling thread's CPU time (stub only); wall: elapsed time; auto: cpu on the stub, "
                        "wall on CUDA")
    p.add_argument("--out", default="perf/results", help="results folder (a subfolder per device)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.rounds, args.calls, args.warmup = 3, 5, 2
    # Explicitly what triton 3.9 defaults to (and what GPU sessions compile with);
    # setting it silences triton's warning about the default changing in 3.10.
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    try:
        _check_process()
    except RuntimeError as exc:
        print(f"host_bench: {exc}", file=sys.stderr)
        return 2
    from . import DevToolsMissing

    try:
        frame = run_host_bench(args.suite, args.ops, args.modes, args.batch_sizes, args.dtypes, args.layouts,
                               args.shapes, args.weights, args.rounds, args.calls, args.warmup, args.driver, args.clock,
                               args.out)
    except DevToolsMissing as exc:
        print(f"host_bench: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # a bad shape or option: argparse's usage error
        build_parser().error(str(exc))
    print(f"{len(frame)} host-time rows written under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
