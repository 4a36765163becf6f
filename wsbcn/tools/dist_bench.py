"""Host time of BCN across processes (``wsbcn bench --distributed``; docs/benchmarks.md,
"Distributed host time").

W processes on this machine (torch.multiprocessing, one torch thread each) form a
process group and each times, rounds interleaved as in ``host_bench.time_host``:

- ``BatchChannelNorm2d(C, process_group=group)`` in training (batch statistics, or
  ``estimate=True``), forward or forward+backward: provider "wsbcn";
- its floor: host_bench's ``Floor`` with the launches of the distributed call
  (``DistNormPlan``: forward 5, backward 4 with batch statistics, 3 with estimates)
  and the same collectives, of the same sizes, straight through torch.distributed
  (an all_gather of a float64 row of 4 C + 4 values forward; an all_reduce of a
  float64 [2, C] backward with batch statistics);
- the same layer without a process group (the single-process call): provider
  "wsbcn_single", with host_bench's floor (3 + 3 launches, no collective).

Rows go to the bench CSV with variant ``host_dist<W>`` (the world size), ``N`` the
batch per rank; the rank-0 process times what it writes. Each row carries its floor
(``floor_ms_p50``, ``ratio_to_floor``); the ratio of a "wsbcn" row to the
"wsbcn_single" row of the same case is the cost of the process group (the summary's
speedup of wsbcn over "wsbcn_single", inverted). Every timed call starts after a
barrier of all ranks (on a gloo group of its own, outside the timed span).

- driver ``stub`` (no GPU): gloo on CPU tensors over the repository's stub CUDA
  driver with an emulated H100 (``host_bench``): the Triton path of
  ``DistNormPlan`` runs, the collectives move real bytes, no kernel runs. The clock is
  the calling thread's CPU time (``--clock cpu``): the layer's Python, autograd,
  triton's launches and the calling thread's part of each collective (building and
  enqueueing the work, waking up when it is done); not the time blocked waiting for
  the other ranks or the transfers gloo's own threads do. The wall time of the same
  calls is logged beside it (it includes both, and on a machine with fewer cores than
  ranks times the scheduler too).
- driver ``cuda``: NCCL, one GPU per rank (needs W devices); host time is the wall
  time of the call, started on an idle device.

Run in a fresh process with TRITON_INTERPRET unset (``python -m
wsbcn.tools.dist_bench``); the ranks are spawned fresh.
"""
import argparse
import datetime
import math
import os
import pickle
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from .. import backends
from . import host_bench, suites
from .arguments import positive_int
from .bench import MODES, NUM_GROUPS, timed_callable

DIST_OPS = ("bcn", "bcn_estimate")
DEFAULT_BATCH_SIZES = (2,)  # per rank: the micro-batch case
# (forward, backward) launches of one call across processes (kernels/norm_plan.py
# DistNormPlan): estimates need no backward collective, hence NormPlan's 3 launches
DIST_FLOOR_LAUNCHES = {"bcn": (5, 4), "bcn_estimate": (5, 3)}
TIMEOUT = datetime.timedelta(seconds=300)  # a collective that never completes ends the run


def variant_name(world_size: int) -> str:
    """The CSV variant of a run on ``world_size`` ranks."""
    return f"host_dist{world_size}"


# torch 2.13 deprecates all_gather_into_tensor for all_gather_single (as collectives.py)
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class FloorCollectives:
    """The collectives of one distributed BCN call, of the same sizes, straight through
    torch.distributed: forward, an all_gather of a float64 row [4 C + 4]; backward
    with batch statistics, an all_reduce of a float64 [2, C]."""

    def __init__(self, group, world_size, channels, device, backward: bool):
        self.group, self.world_size, self.channels, self.device = group, world_size, channels, device
        self.backward_collective = backward

    def forward(self):
        row = torch.empty((4 * self.channels + 4,), device=self.device, dtype=torch.float64)
        rows = torch.empty((self.world_size * row.numel(),), device=self.device, dtype=torch.float64)
        _all_gather(rows, row, group=self.group)

    def backward(self):
        if self.backward_collective:
            sums = torch.empty((2, self.channels), device=self.device, dtype=torch.float64)
            dist.all_reduce(sums, group=self.group)


class DistFloor(torch.autograd.Function):
    """host_bench's Floor plus the call's collectives (``FloorCollectives``)."""

    @staticmethod
    def forward(ctx, launch, counts, collectives, *inputs):
        ctx.launch, ctx.backward_launches, ctx.collectives = launch, counts[1], collectives
        ctx.save_for_backward(*inputs)
        out = torch.empty_like(inputs[0])
        launch(counts[0], out)
        collectives.forward()
        return out

    @staticmethod
    def backward(ctx, grad):
        grads = [torch.empty_like(t) for t in ctx.saved_tensors]
        ctx.launch(ctx.backward_launches, grads[0])
        ctx.collectives.backward()
        return (None, None, None, *grads)


class FloorLayer(nn.Module):
    """A floor called as a module, as the layer it stands for is (nn.Module.__call__
    costs the same for both): ``collectives`` None is host_bench's Floor."""

    def __init__(self, launch, counts, params, collectives=None):
        super().__init__()
        self.launch, self.counts, self.params, self.collectives = launch, counts, tuple(params), collectives

    def forward(self, x):
        if self.collectives is None:
            return host_bench.Floor.apply(self.launch, self.counts, x, *self.params)
        return DistFloor.apply(self.launch, self.counts, self.collectives, x, *self.params)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _resolve_driver(driver: str, world_size: int) -> str:
    driver = host_bench._resolve_driver(driver)
    if driver == "cuda" and torch.cuda.device_count() < world_size:
        raise ValueError(f"driver='cuda' with world_size={world_size} needs {world_size} CUDA devices (one per rank, "
                         f"NCCL), found {torch.cuda.device_count()}; use driver='stub' (gloo on CPU) or a smaller "
                         "world_size")
    return driver


def run_dist_bench(world_size: int = 2, suite_name: str = "resnet50", ops=DIST_OPS,
                   modes=host_bench.DEFAULT_MODES, batch_sizes=DEFAULT_BATCH_SIZES, dtypes=("bfloat16",),
                   layouts=("contiguous",), shapes=None, rounds: int = 15, calls: int = 20, warmup: int = 3,
                   driver: str = "auto", clock: str = "auto", out_dir="perf/results", log=print):
    """Time BCN across ``world_size`` processes, its floor and the single-process call
    (module docstring); returns the rows (bench CSV schema, variant ``host_dist<W>``),
    also upserted to ``<out_dir>/<device>/bench.csv`` unless ``out_dir`` is None.

    ``batch_sizes``: N per rank; ``shapes`` ("CxHxW") replace the suite's norm shapes.
    ``driver``: "stub" (gloo, no GPU needed), "cuda" (NCCL, one GPU per rank: fewer
    than ``world_size`` devices is an error) or "auto" (cuda when a CUDA device
    exists). ``clock``: "cpu" (stub only), "wall" or "auto" (cpu on the stub, wall on
    CUDA)."""
    import pandas as pd

    from .results import COLUMNS, upsert

    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 2:
        raise ValueError(f"world_size must be an int >= 2 (ranks to spawn on this machine), got {world_size!r}")
    unknown = [op for op in ops if op not in DIST_OPS]
    if unknown:
        raise ValueError(f"the distributed case times BCN only (ops {DIST_OPS}: GroupNorm and WS take no "
                         f"process group), got {unknown}")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"unknown mode {unknown}: modes are {MODES}")
    for name, value in (("rounds", rounds), ("calls", calls), ("warmup", warmup)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if any(not isinstance(n, int) or n < 1 for n in batch_sizes or ()):
        raise ValueError(f"batch sizes (per rank) must be positive ints, got {list(batch_sizes)}")
    if clock not in ("auto", *host_bench.CLOCKS):
        raise ValueError(f"clock must be one of {('auto', *host_bench.CLOCKS)}, got {clock!r}")
    jobs = host_bench._jobs(suite_name, ops, batch_sizes, dtypes, layouts, shapes or (), ())
    for _, (c, _, _), *_ in jobs:
        if c % min(NUM_GROUPS, c):
            raise ValueError(f"{c} channels: BCN's channel stage needs channels divisible by {NUM_GROUPS} groups "
                             f"(or at most {NUM_GROUPS} channels)")
    driver = _resolve_driver(driver, world_size)
    host_bench._check_process()
    if clock == "auto":
        clock = "cpu" if driver == "stub" else "wall"
    if clock == "cpu" and driver == "cuda":
        raise ValueError("clock='cpu' would miss the host work of autograd's CUDA thread: use 'wall' on CUDA")
    if driver == "stub":
        from . import stub_driver

        stub_driver.build()  # once, here, before the ranks load it
    log(f"BCN across {world_size} processes ({'gloo, stub driver' if driver == 'stub' else 'NCCL'}), host time per "
        f"call and its floor, {clock} clock, {len(jobs) * len(modes)} cases")
    options = dict(world_size=world_size, port=_free_port(), driver=driver, clock=clock, jobs=jobs,
                   modes=tuple(modes), rounds=rounds, calls=calls, warmup=warmup)
    with tempfile.TemporaryDirectory(prefix="wsbcn_dist_bench_") as tmp:
        options["rows_path"] = str(Path(tmp) / "rows.pkl")
        mp.spawn(_rank, args=(options,), nprocs=world_size, join=True)
        with open(options["rows_path"], "rb") as f:
            measured = pickle.load(f)
    frame = pd.DataFrame(measured["rows"], columns=COLUMNS)
    if out_dir is not None:
        upsert(frame, Path(out_dir) / measured["folder"] / "bench.csv")
    return frame


def _rank(rank: int, options: dict) -> None:
    """One rank of the run (spawned): join the group, time every case, and on rank 0
    write the rows for the parent."""
    world_size, driver = options["world_size"], options["driver"]
    torch.set_num_threads(1)  # W ranks on one machine
    if driver == "stub":
        from . import stub_driver

        stub_driver.install()
        backends.emulate_gpu(stub_driver.GPU_NAME, stub_driver.SM_COUNT)
        device, pg_backend = "cpu", "gloo"
    else:
        torch.cuda.set_device(rank)
        device, pg_backend = f"cuda:{rank}", "nccl"
    dist.init_process_group(pg_backend, init_method=f"tcp://127.0.0.1:{options['port']}", rank=rank,
                            world_size=world_size, timeout=TIMEOUT)
    try:
        group = dist.new_group()
        barrier_group = dist.new_group(backend="gloo")  # the barrier before each call: CPU only
        rows, folder = _time_cases(rank, group, barrier_group, device, options)
        if rank == 0:
            with open(options["rows_path"], "wb") as f:
                pickle.dump(dict(rows=rows, folder=folder), f)
        dist.barrier(group=barrier_group)  # every rank through its collectives before any leaves
    finally:
        dist.destroy_process_group()


def _time_cases(rank, group, barrier_group, device, options):
    from wsbcn import BatchChannelNorm2d

    from . import info
    from .bench import count_launches

    world_size, driver = options["world_size"], options["driver"]
    log = print if rank == 0 else (lambda *_: None)
    if driver == "stub":
        from . import stub_driver

        folder, device_label = "cpu", f"cpu (stub driver, emulating {stub_driver.GPU_NAME})"

        def launches_of(fn):
            before = stub_driver.launch_count()
            fn()
            return float(stub_driver.launch_count() - before)

        def sync():
            dist.barrier(group=barrier_group)
    else:
        folder, device_label = info.device_slug(), info.device_name()
        launches_of = count_launches

        def sync():
            torch.cuda.synchronize()
            dist.barrier(group=barrier_group)
    meta = info.run_metadata(device=device_label)
    clock = host_bench.CLOCKS[options["clock"]]
    wall = host_bench.CLOCKS["wall"]
    launch = host_bench.floor_launcher(device)
    variant = variant_name(world_size)
    rows = []
    for op, (c, h, w), n, dtype_name, layout, suite_label in options["jobs"]:
        x = torch.randn(n, c, h, w, device=device, dtype=getattr(torch, dtype_name))
        if layout == "channels_last":
            x = x.to(memory_format=torch.channels_last)
        x.requires_grad_(True)
        estimate = op == "bcn_estimate"
        groups = min(NUM_GROUPS, c)
        across = BatchChannelNorm2d(c, groups, estimate=estimate, process_group=group).to(device)
        single = BatchChannelNorm2d(c, groups, estimate=estimate).to(device)
        collectives = FloorCollectives(group, world_size, c, device, backward=not estimate)
        layers = [across, FloorLayer(launch, DIST_FLOOR_LAUNCHES[op], list(across.parameters()), collectives),
                  single, FloorLayer(launch, host_bench.FLOOR_LAUNCHES[op], list(single.parameters()))]
        case = dict(suite=suite_label, op=op, variant=variant, layout=layout, N=n, C=c, spatial=f"{h}x{w}",
                    dtype=dtype_name, gbps=math.nan, pct_copy_bw=math.nan, peak_mem_mb=math.nan,
                    images_per_s=math.nan, **meta)
        for mode in options["modes"]:
            fns = [timed_callable(lambda layer=layer: layer(x), [x, *layer_params(layer)], mode) for layer in layers]
            started = time.perf_counter()
            for _ in range(options["warmup"]):
                for fn in fns:
                    sync()
                    fn()
            warm_s = time.perf_counter() - started
            launches = [launches_of(fn) for fn in fns]
            if driver == "stub":
                for name, (call, floor) in (("across processes", launches[:2]), ("in one process", launches[2:])):
                    if call != floor:
                        raise RuntimeError(f"{op} {mode} {name}: the call made {call:.0f} launches and its floor "
                                           f"{floor:.0f}: the floor's launch counts are out of date")
            if options["clock"] == "wall":
                timed = [(t, t) for t in host_bench.time_host(fns, sync, options["rounds"], options["calls"], wall)]
            else:
                timed = host_bench.time_host_two_clocks(fns, sync, options["rounds"], options["calls"], clock, wall)
            (dist_t, dist_wall), (dist_floor, _), (one_t, one_wall), (one_floor, _) = timed
            for provider, (p50, p20, p80), floor_p50, count in (("wsbcn", dist_t, dist_floor[0], launches[0]),
                                                                ("wsbcn_single", one_t, one_floor[0], launches[2])):
                rows.append(dict(provider=provider, mode=mode, ms_p50=p50, ms_p20=p20, ms_p80=p80, launches=count,
                                 floor_ms_p50=floor_p50, ratio_to_floor=p50 / floor_p50, **case))
            label = f"{n}x{c}x{h}x{w}"
            log(f"{op:>12} {mode:<6} {label:<16} {dtype_name:<8} {layout:<13} across {world_size}: "
                f"{dist_t[0] * 1e3:7.1f} us ({dist_t[0] / dist_floor[0]:.2f}x floor {dist_floor[0] * 1e3:.1f}), "
                f"one process {one_t[0] * 1e3:6.1f} us ({one_t[0] / one_floor[0]:.2f}x floor), "
                f"across / one {dist_t[0] / one_t[0]:.2f}; wall {dist_wall[0] * 1e3:.1f} / {one_wall[0] * 1e3:.1f} us; "
                f"launches {launches[0]:.0f} / {launches[2]:.0f}; warm-up {warm_s:.1f} s")
    return rows, folder


def layer_params(layer):
    """The tensors a layer's gradient is taken for: its parameters (a floor: the
    parameters of the layer it stands for)."""
    return list(layer.params) if isinstance(layer, FloorLayer) else list(layer.parameters())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m wsbcn.tools.dist_bench",
        description="Host time of BatchChannelNorm2d across W processes on this machine (gloo over the stub CUDA "
                    "driver without a GPU, NCCL with one GPU per rank), with its floor and the single-process "
                    "call. Needs TRITON_INTERPRET unset.")
    p.add_argument("--world-size", type=positive_int, default=2, help="ranks to spawn (default 2)")
    p.add_argument("--suite", choices=suites.SUITES, default="resnet50", help="shape suite (default: resnet50)")
    p.add_argument("--shapes", nargs="+", default=None, metavar="CxHxW",
                   help="norm-layer shapes instead of the suite's, e.g. 256x14x14")
    p.add_argument("--batch-sizes", nargs="+", type=positive_int, default=list(DEFAULT_BATCH_SIZES), help="N per rank")
    p.add_argument("--dtypes", nargs="+", choices=("float32", "bfloat16", "float16"), default=["bfloat16"])
    p.add_argument("--layouts", nargs="+", choices=("contiguous", "channels_last"), default=["contiguous"])
    p.add_argument("--ops", nargs="+", choices=DIST_OPS, default=list(DIST_OPS))
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(host_bench.DEFAULT_MODES))
    p.add_argument("--rounds", type=int, default=15, help="rounds per case; p50/p20/p80 are over rounds")
    p.add_argument("--calls", type=int, default=20, help="calls per round")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls first (the first one compiles)")
    p.add_argument("--quick", action="store_true", help="3 rounds of 5 calls after 2 warm-up calls")
    p.add_argument("--driver", choices=host_bench.DRIVERS, default="auto",
                   help="stub: gloo on CPU, no GPU needed; cuda: NCCL, one GPU per rank; auto: cuda when a device "
                        "exists")
    p.add_argument("--clock", choices=("auto", *host_bench.CLOCKS), default="auto",
                   help="cpu: the calling thread's CPU time (stub only); wall: elapsed time; auto: cpu on the stub, "
                        "wall on CUDA")
    p.add_argument("--out", default="perf/results", help="results folder (a subfolder per device)")
    return p


def main(argv=None) -> int:
    from . import DevToolsMissing

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.calls, args.warmup = 3, 5, 2
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # as host_bench: triton 3.9's default, said explicitly
    try:
        host_bench._check_process()
    except RuntimeError as exc:
        print(f"dist_bench: {exc}", file=sys.stderr)
        return 2
    try:
        frame = run_dist_bench(args.world_size, args.suite, args.ops, args.modes, args.batch_sizes, args.dtypes,
                               args.layouts, args.shapes, args.rounds, args.calls, args.warmup, args.driver,
                               args.clock, args.out)
    except DevToolsMissing as exc:
        print(f"dist_bench: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # a bad shape or option: argparse's usage error
        parser.error(str(exc))
    print(f"{len(frame)} distributed host-time rows written under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
