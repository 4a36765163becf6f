"""Host time of wsbcn's eager calls, on any machine (``wsbcn bench --host``;
docs/benchmarks.md, "Host time").

For the calls ``wsbcn bench`` times for the ``wsbcn`` provider (BCN in batch and
estimate mode, GroupNorm, WS), rows in the bench CSV schema with variant "host":

- driver ``stub`` (no GPU): triton runs over the repository's stub CUDA driver
  (perf/wsbcn_dev/stub_driver.py) and ``wsbcn.backends.emulate_gpu`` sends CPU tensors
  down the GPU path with an H100's plans; everything on the host runs for real, the
  sm_90 compile included, no kernel runs. Host time is the calling thread's CPU time
  (``--clock cpu``: autograd runs backward on the caller, nothing blocks), which other
  processes on the machine do not move.
- driver ``cuda``: CUDA tensors and the real driver; host time is the wall time of the
  call, started on an idle device (synchronised before, outside the timed span).

Each case is timed together with its floor (``floor_ms_p50``, ``ratio_to_floor``),
rounds of the two interleaved: a minimal ``torch.autograd.Function`` that allocates its
outputs, saves its inputs and makes the call's launches of an empty kernel through
triton's cached launcher, as the library's direct path does (kernels/launch.py). What
the call costs above it is wsbcn's own host work. Run in a fresh process with
TRITON_INTERPRET unset (triton picks interpreter or compiler when kernels are defined).
"""
import argparse
import gc
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import triton

from .. import backends
from . import info, suites
from .arguments import positive_int
from .bench import MODES, NUM_GROUPS, OPS, NormInputs, norm_fn, timed_callable, ws_fn

DEFAULT_MODES = ("fwd", "fwdbwd")
DRIVERS = ("auto", "stub", "cuda")
# "wall": elapsed time; "cpu": CPU time of the calling thread (see the module docstring)
CLOCKS = {"wall": time.perf_counter_ns, "cpu": time.thread_time_ns}
# (forward, backward) launches of one eager call (DESIGN.md section 4); the stub run
# checks them against the launches it counts for the call itself.
FLOOR_LAUNCHES = {"bcn": (3, 3), "bcn_estimate": (3, 3), "gn": (3, 3), "ws": (1, 1)}


@triton.jit
def _empty_kernel(out_ptr):
    pass


def floor_launcher(device: str):
    """``launch(count, out)``: ``count`` launches of an empty kernel through the
    compiled kernel's C launcher, on the current device and stream (compiled here,
    through ``kernel[grid]`` on a ``device`` tensor, on the active driver: the stub
    takes CPU tensors)."""
    from triton.runtime import driver

    from .._compat import direct_launcher

    active = driver.active
    run = direct_launcher(_empty_kernel[(1,)](torch.empty(1, device=device)))
    if run is None:
        raise RuntimeError(f"triton {triton.__version__}: no direct launcher (wsbcn/_compat.py), so no floor")

    def launch(count, out):
        stream = active.get_current_stream(active.get_current_device())
        address = out.data_ptr()
        for _ in range(count):
            run((1, 1, 1), stream, (address,))

    return launch


class Floor(torch.autograd.Function):
    """The least an eager autograd op with these launches does on the host: forward
    saves its inputs, allocates its output and launches; backward allocates one
    gradient per input and launches."""

    @staticmethod
    def forward(ctx, launch, counts, *inputs):
        ctx.launch, ctx.backward_launches = launch, counts[1]
        ctx.save_for_backward(*inputs)
        out = torch.empty_like(inputs[0])
        launch(counts[0], out)
        return out

    @staticmethod
    def backward(ctx, grad):
        grads = [torch.empty_like(t) for t in ctx.saved_tensors]
        ctx.launch(ctx.backward_launches, grads[0])
        return (None, None, *grads)


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


def time_host(fns, sync, rounds: int, calls: int, clock=time.perf_counter_ns) -> list:
    """[(p50, p20, p80) ms per fn of ``fns``] over ``rounds`` of the mean time per call
    of ``calls`` calls on ``clock`` (ns), the fns' rounds interleaved, each call timed
    from an idle device (``sync`` runs before it, outside the span)."""
    gc.collect()
    per_round = [[] for _ in fns]
    for _ in range(rounds):
        for fn, times in zip(fns, per_round):
            total = 0
            for _ in range(calls):
                sync()
                start = clock()
                fn()
                total += clock() - start
            times.append(total / calls)
    return [_quantiles_ms(times) for times in per_round]


def time_host_two_clocks(fns, sync, rounds: int, calls: int, inner, outer) -> list:
    """``time_host`` with every call read on two clocks, ``inner`` read inside
    ``outer``'s span: [((p50, p20, p80) on inner, (p50, p20, p80) on outer) per fn]."""
    gc.collect()
    per_round = [([], []) for _ in fns]
    for _ in range(rounds):
        for fn, (inner_times, outer_times) in zip(fns, per_round):
            inner_total = outer_total = 0
            for _ in range(calls):
                sync()
                outer_start = outer()
                inner_start = inner()
                fn()
                inner_total += inner() - inner_start
                outer_total += outer() - outer_start
            inner_times.append(inner_total / calls)
            outer_times.append(outer_total / calls)
    return [(_quantiles_ms(a), _quantiles_ms(b)) for a, b in per_round]


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
                   out_dir="perf/results", log=print):
    """Time the host side of every eager call in the suite, and its floor; returns the
    rows (bench CSV schema, variant "host", provider "wsbcn"), also upserted to
    ``<out_dir>/<device>/bench.csv`` unless ``out_dir`` is None.

    ``shapes`` ("CxHxW") and ``weights`` ("OxIxKHxKW") replace the suite's norm
    and conv shapes; rows of shapes outside the suite say suite "custom".
    ``driver``: "stub" (no GPU needed), "cuda", or "auto" (cuda when there is a
    device). ``clock``: "cpu" (the calling thread's CPU time; stub only), "wall",
    or "auto" (cpu on the stub, wall on CUDA).
    """
    import pandas as pd

    from .results import COLUMNS, upsert

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
    meta = info.run_metadata(device=device_label)

    log(f"host time per call and its floor, {driver} driver, {clock} clock, {len(jobs) * len(modes)} cases")
    rows = []
    previous = backends.emulated_gpu()
    if driver == "stub":
        backends.emulate_gpu(stub_driver.GPU_NAME, stub_driver.SM_COUNT)
    try:
        launch = floor_launcher(device)
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
                forward, leaves = make()
                fn = timed_callable(forward, leaves, mode)
                floor = timed_callable(lambda: Floor.apply(launch, FLOOR_LAUNCHES[op], *leaves), leaves, mode)
                started = time.perf_counter()
                for _ in range(warmup):
                    fn()
                    floor()
                warm_s = time.perf_counter() - started
                launches, floor_launches = launches_of(fn), launches_of(floor)
                if driver == "stub" and launches != floor_launches:
                    raise RuntimeError(f"{op} {mode}: the call made {launches:.0f} launches and its floor "
                                       f"{floor_launches:.0f}: FLOOR_LAUNCHES is out of date")
                (p50, p20, p80), (floor_p50, _, _) = time_host([fn, floor], sync, rounds, calls, CLOCKS[clock])
                restore()  # timing repeats must not advance running statistics
                rows.append(dict(suite=suite_label, op=op, provider="wsbcn", variant="host", mode=mode, layout=layout,
                                 ms_p50=p50, ms_p20=p20, ms_p80=p80, gbps=math.nan, pct_copy_bw=math.nan,
                                 peak_mem_mb=math.nan, launches=launches, images_per_s=math.nan,
                                 floor_ms_p50=floor_p50, ratio_to_floor=p50 / floor_p50, **case, **meta))
                label = "x".join(map(str, shape if n is None else (n, *shape)))
                log(f"{op:>12} {mode:<6} {label:<16} {dtype_name:<8} {layout:<13} host {p50 * 1e3:8.1f} us/call "
                    f"(p20 {p20 * 1e3:.1f}, p80 {p80 * 1e3:.1f}), floor {floor_p50 * 1e3:.1f} us: "
                    f"{p50 / floor_p50:.2f}x  launches {launches:.0f}  warm-up {warm_s:.1f} s")
    finally:
        backends.emulate_gpu(*(previous or (None,)))
    frame = pd.DataFrame(rows, columns=COLUMNS)
    if out_dir is not None:
        upsert(frame, Path(out_dir) / folder / "bench.csv")
    return frame


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m wsbcn.tools.host_bench",
        description="Host time per eager wsbcn call (BCN, BCN estimate, GroupNorm, WS) and its floor, through a stub "
                    "CUDA driver on a machine without a GPU or the real driver on one. Needs TRITON_INTERPRET unset.")
    p.add_argument("--suite", choices=suites.SUITES, default="resnet50", help="shape suite (default: resnet50)")
    p.add_argument("--shapes", nargs="+", default=None, metavar="CxHxW",
                   help="norm-layer shapes instead of the suite's, e.g. 256x14x14")
    p.add_argument("--weights", nargs="+", default=None, metavar="OxIxKxK",
                   help="WS weight shapes instead of the suite's, e.g. 256x256x3x3")
    p.add_argument("--batch-sizes", nargs="+", type=positive_int, default=[2, 32])
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
    from . import DevToolsMissing

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
