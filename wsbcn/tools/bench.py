"""``wsbcn bench``: wsbcn against cuDNN BN, ATen GN, the eager reference and
torch.compile of it, on the same inputs in one process (DESIGN.md section 7).

Every measurement becomes one row of ``perf/results/<device>/bench.csv``
(upserted on the case columns), with the device, versions and commit on it.
"""
import functools
import math
import time
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import info, suites
from ..functional import batch_channel_norm, group_norm, weight_standardize
from .reference import reference_bcn, reference_ws

COLUMNS = ["suite", "op", "provider", "variant", "mode", "dtype", "layout", "N", "C", "spatial",
           "ms_p50", "ms_p20", "ms_p80", "gbps", "pct_copy_bw", "peak_mem_mb", "launches", "images_per_s",
           "device", "torch", "triton", "commit", "timestamp"]
CASE_COLUMNS = ["suite", "op", "provider", "variant", "mode", "dtype", "layout", "N", "C", "spatial"]
OPS = ("ws", "bcn", "bcn_estimate", "gn")
MODES = ("fwd", "bwd", "fwdbwd")
# Tensor-sized transfers the closed form needs (DESIGN.md section 4): BCN/GN forward
# reads x twice and writes y; backward reads (dy, x) twice and writes dx. WS reads W
# and writes W_hat forward; reads (g, W) and writes dW backward.
TRANSFERS = {"norm": {"fwd": 3, "bwd": 5, "fwdbwd": 8}, "ws": {"fwd": 2, "bwd": 3, "fwdbwd": 5}}
NUM_GROUPS = 32


def providers(op: str, with_compiled: bool) -> list:
    base = {
        "ws": ["wsbcn", "reference_ws", "compiled_ws"],
        "bcn": ["wsbcn", "cudnn_bn", "aten_gn", "reference_bcn", "compiled_bcn"],
        "bcn_estimate": ["wsbcn", "cudnn_bn", "reference_bcn", "compiled_bcn"],
        "gn": ["wsbcn", "aten_gn"],
    }[op]
    return [p for p in base if with_compiled or not p.startswith("compiled")]


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
    if provider == "cudnn_bn":
        return (lambda: F.batch_norm(inp.x, inp.running_mean, inp.running_var, inp.weight, inp.bias, True),
                [inp.x, inp.weight, inp.bias])
    if provider == "aten_gn":
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


def copy_bandwidth_gbps(device, timer, nbytes=1 << 28) -> float:
    """Measured device-to-device copy bandwidth (read + write), GB/s."""
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


def measure(fn, timer, restore=None, timed=None):
    """(p50, p20, p80, peak MB, launches) of ``fn``; ``restore`` runs after each
    stage so that state such as running buffers ends where it started. ``timed``
    (e.g. a CUDA-graph replay of ``fn``) is what the timer runs, when given."""
    restore = restore or (lambda: None)
    p50, p20, p80 = timer(timed or fn)
    restore()
    peak = peak_memory_mb(fn)
    restore()
    launches = count_launches(fn)
    restore()
    return p50, p20, p80, peak, launches


def run_bench(suite_name=None, ops=OPS, modes=MODES, timer=None, out_dir="perf/results", with_compiled=None,
              num_groups=NUM_GROUPS, progress=True, log=print, batch_sizes=None, dtypes=None, layouts=None,
              max_minutes=None, graph=False):
    """Run the micro-benchmarks; returns the DataFrame of new rows (also upserted to CSV).

    ``batch_sizes``/``dtypes``/``layouts`` narrow the suite; ``max_minutes`` stops
    after the case running at that time, keeping every row measured so far.
    ``graph`` times CUDA-graph replays instead of eager calls (variant "cudagraph"
    or "compiled_cudagraph"): the device time alone, without host overhead; the
    "bwd" mode is left out there (its forward would run outside the capture)."""
    from .timing import cuda_graphed, default_timer

    on_gpu = torch.cuda.is_available()
    if graph and not on_gpu:
        raise ValueError("graph=True (bench --graph) times CUDA-graph replays and needs a CUDA device")
    if graph:
        modes = tuple(m for m in modes if m != "bwd")
    device = "cuda" if on_gpu else "cpu"
    suite_name = suite_name or ("resnet50" if on_gpu else "cpu")
    with_compiled = on_gpu if with_compiled is None else with_compiled
    timer = timer or default_timer()
    if not on_gpu:
        log(f"no CUDA device: running the '{suite_name}' suite on CPU (torch backend against the eager "
            "baselines" + (", with torch.compile" if with_compiled else "") + "); GPU figures need a GPU")
    norms, convs, batches, dtypes, layouts = suites.suite(suite_name, batch_sizes, dtypes, layouts)
    meta = info.run_metadata()
    copy_bw = copy_bandwidth_gbps(device, timer)
    log(f"copy bandwidth on {meta['device']}: {copy_bw:.1f} GB/s")
    rows = []
    jobs = []
    for op in ops:
        if op == "ws":
            # Weights stay fp32 (master weights under autocast): one dtype.
            jobs += [(op, conv, None, "float32", layout) for conv in convs for layout in layouts]
        else:
            jobs += [(op, shape, n, dtype, layout) for shape in norms for n in batches for dtype in dtypes
                     for layout in layouts]
    deadline = time.monotonic() + 60 * max_minutes if max_minutes is not None else math.inf
    for op, shape, n, dtype_name, layout in tqdm(jobs, desc="bench", disable=not progress, unit="case"):
        if time.monotonic() > deadline:
            log(f"stopped after {max_minutes} min: {len(rows)} measurements kept")
            break
        dtype = getattr(torch, dtype_name)
        if op == "ws":
            w = torch.randn(shape.shape, device=device, dtype=torch.float32)
            if layout == "channels_last":
                w = w.to(memory_format=torch.channels_last)
            w.requires_grad_(True)
            nbytes = w.numel() * w.element_size()
            case = dict(N=0, C=shape.shape[0], spatial="x".join(map(str, shape.shape[1:])), dtype="float32")
            make, restore, transfers = (lambda p: ws_fn(p, w)), None, TRANSFERS["ws"]
        else:
            groups = min(num_groups, shape.c)
            inp = NormInputs(n, shape.c, shape.h, shape.w, dtype, layout, device, groups)
            nbytes = inp.x.numel() * inp.x.element_size()
            case = dict(N=n, C=shape.c, spatial=f"{shape.h}x{shape.w}", dtype=dtype_name)
            make, restore, transfers = (lambda p: norm_fn(op, p, inp)), inp.restore, TRANSFERS["norm"]
        for provider in providers(op, with_compiled):
            for mode in modes:
                forward, leaves = make(provider)
                fn = timed_callable(forward, leaves, mode)
                if restore:
                    restore()
                p50, p20, p80, peak, launches = measure(fn, timer, restore, cuda_graphed(fn) if graph else None)
                variant = "compiled" if provider.startswith("compiled") else "eager"
                if graph:
                    variant = "compiled_cudagraph" if variant == "compiled" else "cudagraph"
                gbps = transfers[mode] * nbytes / (p50 * 1e-3) / 1e9
                rows.append(dict(suite=suite_name, op=op, provider=provider, variant=variant, mode=mode,
                                 layout=layout, ms_p50=p50, ms_p20=p20, ms_p80=p80, gbps=gbps,
                                 pct_copy_bw=100 * gbps / copy_bw, peak_mem_mb=peak, launches=launches,
                                 images_per_s=math.nan, **case, **meta))
    frame = pd.DataFrame(rows, columns=COLUMNS)
    if out_dir is not None:
        upsert(frame, Path(out_dir) / info.device_slug() / "bench.csv")
    return frame


def upsert(frame: pd.DataFrame, path: Path) -> pd.DataFrame:
    """Replace rows with the same case columns, keep the rest, write atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        old = pd.read_csv(path, dtype={"spatial": str})
        old = old.reindex(columns=COLUMNS)
        keys = set(map(tuple, frame[CASE_COLUMNS].astype(str).values))
        keep = ~old[CASE_COLUMNS].astype(str).apply(tuple, axis=1).isin(keys)
        frame = pd.concat([old[keep], frame], ignore_index=True) if keep.any() else frame
    frame = frame.sort_values(CASE_COLUMNS, kind="stable").reset_index(drop=True)
    frame[["N", "C"]] = frame[["N", "C"]].astype("Int64")  # integers, blank where not applicable
    tmp = path.with_suffix(".csv.tmp")
    frame.to_csv(tmp, index=False)
    tmp.replace(path)
    return frame
