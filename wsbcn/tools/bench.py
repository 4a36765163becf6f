"""``wsbcn bench``: wsbcn against the vendor norms (cuDNN BN and ATen GN on CUDA,
torch's own BN and GN kernels on CPU), the eager reference and torch.compile of it,
on the same inputs in one process (DESIGN.md section 7).

Every measurement becomes one row of ``perf/results/<device>/bench.csv``
(upserted on the case columns, see ``results``), with the device, versions and
commit on it. On a GPU each case is timed as eager calls (host and device time)
and as CUDA-graph replays (device time alone).
"""
import functools
import math
import time
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

from . import info, suites
from ..functional import batch_channel_norm, group_norm, weight_standardize
from .models import reference_bcn, reference_ws
from .results import COLUMNS, MICRO_OPS, upsert

OPS = MICRO_OPS
MODES = ("fwd", "bwd", "fwdbwd")
TIMINGS = ("eager", "graph")
# Tensor-sized transfers the closed form needs (DESIGN.md section 4): BCN/GN forward
# reads x twice and writes y; backward reads (dy, x) twice and writes dx. WS reads W
# and writes W_hat forward; reads (g, W) and writes dW backward.
TRANSFERS = {"norm": {"fwd": 3, "bwd": 5, "fwdbwd": 8}, "ws": {"fwd": 2, "bwd": 3, "fwdbwd": 5}}
NUM_GROUPS = 32
DEFAULT_GPU_SUITE = "resnet50_sample"  # what `wsbcn bench` runs on a GPU without --suite/--full
# The vendor baselines, named for what runs: F.batch_norm is cuDNN on CUDA and
# torch's native kernel on CPU; F.group_norm is ATen's kernel on either.
BASELINES = {"cuda": {"bn": "cudnn_bn", "gn": "aten_gn"}, "cpu": {"bn": "torch_bn", "gn": "torch_gn"}}
BN_PROVIDERS = tuple(b["bn"] for b in BASELINES.values())
GN_PROVIDERS = tuple(b["gn"] for b in BASELINES.values())


def providers(op: str, with_compiled: bool, device_type: str = None) -> list:
    """The providers timed for ``op``, wsbcn first; the vendor baselines carry the
    name of what runs on ``device_type`` (default: cuda when there is a device)."""
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    bn, gn = BASELINES[device_type]["bn"], BASELINES[device_type]["gn"]
    base = {
        "ws": ["wsbcn", "reference_ws", "compiled_ws"],
        "bcn": ["wsbcn", bn, gn, "reference_bcn", "compiled_bcn"],
        "bcn_estimate": ["wsbcn", bn, "reference_bcn", "compiled_bcn"],
        "gn": ["wsbcn", gn],
    }[op]
    return [p for p in base if with_compiled or not p.startswith("compiled")]


def variant_name(provider: str, timing: str) -> str:
    """The CSV's variant: how the provider ran (eager or compiled) and was timed
    (eager calls or CUDA-graph replays)."""
    compiled = provider.startswith("compiled")
    return {"eager": "compiled" if compiled else "eager",
            "graph": "compiled_cudagraph" if compiled else "cudagraph"}[timing]


def device_label() -> str:
    """The device column: the device name, and on CPU the threads torch computes with."""
    if torch.cuda.is_available():
        return info.device_name()
    threads = torch.get_num_threads()
    return f"{info.device_name()}, {threads} thread{'s' if threads > 1 else ''}"


@functools.lru_cache(maxsize=None)
def _compiled(fn):
    import torch._dynamo

    cfg = torch._dynamo.config
    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 4096))
    return torch.compile(fn, dynamic=False)


class NormInputs:
    """x, parameters and running buffers of one BCN/GN case. The buffers are
    snapshotted so that timing repeats never advance them."""

    def __init__(self, n, c, h, w, dtype, layout, device, num_groups):
        gen = dict(device=device, dtype=torch.float32)
        self.num_groups = num_groups
        self.x = torch.randn(n, c, h, w, device=device, dtype=dtype)
        if layout == "channels_last":
            self.x = self.x.to(memory_format=torch.channels_last)
        self.x.requires_grad_(True)
        self.weight = torch.ones(c, **gen).requires_grad_(True)
        self.bias = torch.zeros(c, **gen).requires_grad_(True)
        self.group_weight = torch.ones(1, num_groups, 1, **gen).requires_grad_(True)
        self.group_bias = torch.zeros(1, num_groups, 1, **gen).requires_grad_(True)
        # GroupNorm's affine in the input's dtype, as in a model cast to it (ATen's
        # CUDA group_norm rejects fp32 parameters with a bf16 input)
        self.gn_weight = torch.ones(c, device=device, dtype=dtype).requires_grad_(True)
        self.gn_bias = torch.zeros(c, device=device, dtype=dtype).requires_grad_(True)
        self.running_mean = torch.zeros(c, **gen)
        self.running_var = torch.ones(c, **gen)
        self.num_batches_tracked = torch.zeros((), dtype=torch.long, device=device)
        self._snapshot = [b.clone() for b in self.buffers()]

    def buffers(self):
        return [self.running_mean, self.running_var, self.num_batches_tracked]

    def restore(self):
        # Through .data: a graph recorded for the "bwd" mode saved these buffers,
        # and a version bump would invalidate it.
        for b, s in zip(self.buffers(), self._snapshot):
            b.data.copy_(s)


def norm_fn(op: str, provider: str, inp: NormInputs):
    """(callable -> output, leaves to differentiate) for one provider."""
    estimate = op == "bcn_estimate"
    g = inp.num_groups
    if provider == "wsbcn" and op == "gn":
        return lambda: group_norm(inp.x, g, inp.gn_weight, inp.gn_bias), [inp.x, inp.gn_weight, inp.gn_bias]
    if provider == "wsbcn":
        return (lambda: batch_channel_norm(
            inp.x, g, inp.running_mean, inp.running_var, inp.weight, inp.bias, inp.group_weight, inp.group_bias,
            training=True, estimate=estimate, num_batches_tracked=inp.num_batches_tracked),
            [inp.x, inp.weight, inp.bias, inp.group_weight, inp.group_bias])
    if provider in BN_PROVIDERS:
        return (lambda: F.batch_norm(inp.x, inp.running_mean, inp.running_var, inp.weight, inp.bias, True),
                [inp.x, inp.weight, inp.bias])
    if provider in GN_PROVIDERS:
        return lambda: F.group_norm(inp.x, g, inp.gn_weight, inp.gn_bias), [inp.x, inp.gn_weight, inp.gn_bias]
    ref = reference_bcn if provider == "reference_bcn" else _compiled(reference_bcn)
    return (lambda: ref(inp.x, g, inp.weight, inp.bias, inp.group_weight, inp.group_bias, inp.running_mean,
                        inp.running_var, True, estimate),
            [inp.x, inp.weight, inp.bias, inp.group_weight, inp.group_bias])


def ws_fn(provider: str, w: torch.Tensor):
    if provider == "wsbcn":
        return lambda: weight_standardize(w, 1e-5, 1, "std"), [w]  # the released convention
    ref = reference_ws if provider == "reference_ws" else _compiled(reference_ws)
    return lambda: ref(w), [w]


def timed_callable(forward, leaves, mode):
    """The callable a mode measures: forward (graph recorded), backward alone, or both."""
    if mode == "fwd":
        return forward
    out = forward()
    grad = torch.randn_like(out)
    if mode == "bwd":
        return lambda: torch.autograd.grad(out, leaves, grad, retain_graph=True)
    return lambda: torch.autograd.grad(forward(), leaves, grad)


def copy_bandwidth_gbps(device, timer, nbytes=None) -> float:
    """Measured device-to-device copy bandwidth (read + write), GB/s, over buffers
    far larger than the caches (default 256 MiB on GPU, 64 MiB on CPU)."""
    nbytes = nbytes or (1 << 28 if torch.device(device).type == "cuda" else 1 << 26)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    p50, _, _ = timer(lambda: dst.copy_(src))
    return 2 * nbytes / (p50 * 1e-3) / 1e9


def count_launches(fn) -> float:
    """Kernel launches of one call, from the CUDA profiler (NaN on CPU)."""
    if not torch.cuda.is_available():
        return math.nan
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return float(sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA))


def peak_memory_mb(fn) -> float:
    """Peak memory a call allocates above what was allocated before it (NaN on CPU)."""
    if not torch.cuda.is_available():
        return math.nan
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20



def measure(fn, timer, restore=None, timed=None, counts=None):
    """(p50, p20, p80, peak MB, launches) of ``fn``; ``restore`` runs after each
    stage so that state such as running buffers ends where it started. ``timed``
    (e.g. a CUDA-graph replay of ``fn``) is what the timer runs, when given.
    ``counts``: (peak MB, launches) already measured for ``fn`` (a graph replays
    the kernels of the eager call), so they are not measured again."""
    restore = restore or (lambda: None)
    p50, p20, p80 = timer(timed or fn)
    restore()
    if counts is None:
        peak = peak_memory_mb(fn)
        restore()
        launches = count_launches(fn)
        restore()
    else:
        peak, launches = counts
    return p50, p20, p80, peak, launches


def case_inputs(case, device, num_groups):
    """(make(provider) -> (forward, leaves), restore or None, bytes of the input,
    transfers per mode, the case's CSV columns) of one suites.Case."""
    if case.op == "ws":
        w = torch.randn(case.shape.shape, device=device, dtype=torch.float32)
        if case.layout == "channels_last":
            w = w.to(memory_format=torch.channels_last)
        w.requires_grad_(True)
        columns = dict(N=0, C=case.shape.shape[0], spatial="x".join(map(str, case.shape.shape[1:])), dtype="float32")
        return (lambda p: ws_fn(p, w)), None, w.numel() * w.element_size(), TRANSFERS["ws"], columns
    shape = case.shape
    inp = NormInputs(case.n, shape.c, shape.h, shape.w, getattr(torch, case.dtype), case.layout, device,
                     min(num_groups, shape.c))
    columns = dict(N=case.n, C=shape.c, spatial=f"{shape.h}x{shape.w}", dtype=case.dtype)
    return ((lambda p: norm_fn(case.op, p, inp)), inp.restore, inp.x.numel() * inp.x.element_size(),
            TRANSFERS["norm"], columns)


def measure_case(case, provider_names, modes, timings, timer, device, num_groups=NUM_GROUPS):
    """Rows (dicts without the run's metadata and copy bandwidth) of one case: every
    provider and mode, in every timing. The graph timing leaves out "bwd" (its
    forward would run outside the capture) and takes peak memory and launches from
    the eager row of the same call when there is one."""
    from .timing import cuda_graphed

    make, restore, nbytes, transfers, columns = case_inputs(case, device, num_groups)
    rows = []
    for provider in provider_names:
        for mode in modes:
            forward, leaves = make(provider)
            fn = timed_callable(forward, leaves, mode)
            if restore:
                restore()
            counts = None
            for timing in timings:
                if timing == "graph" and mode == "bwd":
                    continue
                timed = cuda_graphed(fn) if timing == "graph" else None
                p50, p20, p80, peak, launches = measure(fn, timer, restore, timed, counts)
                counts = (peak, launches)
                rows.append(dict(op=case.op, provider=provider, variant=variant_name(provider, timing), mode=mode,
                                 layout=case.layout, ms_p50=p50, ms_p20=p20, ms_p80=p80,
                                 gbps=transfers[mode] * nbytes / (p50 * 1e-3) / 1e9, peak_mem_mb=peak,
                                 launches=launches, images_per_s=math.nan, **columns))
    return rows


def case_label(case) -> str:
    """A short name of a case for the progress lines."""
    if case.op == "ws":
        return f"ws {'x'.join(map(str, case.shape.shape))} {case.layout}"
    s = case.shape
    return f"{case.op} N={case.n} C={s.c} {s.h}x{s.w} {case.dtype} {case.layout}"


def run_bench(suite_name=None, ops=OPS, modes=None, timer=None, out_dir="perf/results", with_compiled=None,
              num_groups=NUM_GROUPS, progress=True, log=print, batch_sizes=None, dtypes=None, layouts=None,
              max_minutes=None, graph=False, timings=None):
    """Run the micro-benchmarks; returns the DataFrame of new rows (also upserted to
    ``<out_dir>/<device>/bench.csv`` unless ``out_dir`` is None).

    The suite defaults to resnet50_sample on GPU (DEFAULT_GPU_SUITE: its cases, in
    ``suites.default_modes`` unless ``modes`` are given, with the compiled baselines
    of ``suites.compiled_ops``, timed with the shorter budgets of
    ``timing.bench_timer``) and cpu on CPU (every mode by default).
    ``batch_sizes``/``dtypes``/``layouts`` narrow the suite; ``max_minutes`` stops
    after the case running at that time, keeping every row measured so far.
    ``timings``: "eager" (eager calls: host and device time) and/or "graph"
    (CUDA-graph replays: device time alone, variants "cudagraph" and
    "compiled_cudagraph"); default both on GPU, eager on CPU. ``graph=True`` is
    ``timings=("graph",)``."""
    from .timing import bench_timer

    on_gpu = torch.cuda.is_available()
    if graph:
        timings = ("graph",)
    timings = tuple(timings or (TIMINGS if on_gpu else ("eager",)))
    unknown = [t for t in timings if t not in TIMINGS]
    if unknown or not timings:
        raise ValueError(f"timings must be among {TIMINGS}, got {timings}")
    if "graph" in timings and not on_gpu:
        raise ValueError("graph timing (bench --graph) times CUDA-graph replays and needs a CUDA device")
    device = "cuda" if on_gpu else "cpu"
    suite_name = suite_name or (DEFAULT_GPU_SUITE if on_gpu else "cpu")
    modes = tuple(modes or suites.default_modes(suite_name, MODES))
    if timings == ("graph",):
        modes = tuple(m for m in modes if m != "bwd")
    with_compiled = on_gpu if with_compiled is None else with_compiled
    timer = timer or bench_timer(suite_name)
    jobs = suites.cases(suite_name, ops, batch_sizes, dtypes, layouts)
    compiled_ops = suites.compiled_ops(suite_name, ops) if with_compiled else ()
    if not on_gpu:
        log(f"no CUDA device: running the '{suite_name}' suite on CPU (torch backend against torch's own "
            "kernels and the eager reference" + (", with torch.compile" if with_compiled else "")
            + f", {torch.get_num_threads()} thread(s)); GPU figures need a GPU")
    meta = info.run_metadata(device=device_label())
    copy_bw = copy_bandwidth_gbps(device, timer)
    log(f"copy bandwidth on {meta['device']}: {copy_bw:.1f} GB/s; {len(jobs)} cases ({', '.join(timings)} timing)")
    rows = []
    deadline = time.monotonic() + 60 * max_minutes if max_minutes is not None else math.inf
    for i, case in enumerate(jobs, 1):
        if time.monotonic() > deadline:
            log(f"stopped after {max_minutes} min: {len(rows)} measurements kept")
            break
        if progress:
            log(f"case {i}/{len(jobs)}: {case_label(case)}")
        names = providers(case.op, case.op in compiled_ops, device)
        for row in measure_case(case, names, modes, timings, timer, device, num_groups):
            rows.append(dict(row, suite=suite_name, pct_copy_bw=100 * row["gbps"] / copy_bw, **meta))
    frame = pd.DataFrame(rows, columns=COLUMNS)
    if out_dir is not None:
        upsert(frame, Path(out_dir) / info.device_slug() / "bench.csv")
    return frame
