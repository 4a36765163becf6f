"""The autotuning sweep behind ``wsbcn autotune`` (DESIGN.md section 5).

For every kernel, suite shape, batch size, dtype and layout it times each config
of the kernel's space, appends every measurement to ``autotune.csv`` and stores
the winner of each (kernel, dtype, layout, shape bucket) key in the JSON cache.
The timer is injectable, so the whole flow runs on CPU (Triton interpreter) in tests.
"""
import itertools
import json
import time
from pathlib import Path

import pandas as pd
import torch

from .. import tuning
from . import info, suites
from ..kernels.layout import channels_fastest
from ..kernels.norm import MODE_BATCH


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def config_space(kernel: str, t: torch.Tensor, shape: tuple, channels_last: bool) -> list:
    """Candidate configs for a call on ``t`` (the input or weight: its device and
    dtype pick the plan), the heuristic's first. All share the plan the call itself
    gets (BLOCK_S, split; BLOCK for WS), which fixes the reduction order, so every
    candidate computes bit-identical results and the sweep only trades speed.
    BLOCK_C is a power of two with a tile from half the heuristic's to 8192 values,
    never far above C; num_stages 1-3 pipelines the loop over S of the passes over x
    (1: a plain loop; kernels/norm.py NUM_STAGES), whose speed only a GPU can tell."""
    base = tuning.heuristic_config(kernel, t, shape, channels_last)
    out = [base]
    if kernel.startswith("ws"):
        out += [dict(base, num_warps=warps) for warps in (1, 2, 4, 8)]
    else:
        c, lanes = shape[1], base["BLOCK_S"]
        # down to half the heuristic's tile (half a load vector per thread): where a layer
        # has fewer tiles than 4 waves need, only a GPU can tell whether twice the
        # programs beat loads half as wide (perf/NOTES.md, session 6)
        smallest = min(1024, base["BLOCK_C"] * lanes) // 2
        block_cs = [bc for bc in (1, 2, 4, 8, 16, 32, 64, 128, 256)
                    if bc <= tuning.next_pow2(c) and smallest <= bc * lanes <= 8192]
        for bc, warps, stages in itertools.product(block_cs or [base["BLOCK_C"]], (4, 8), (1, 2, 3)):
            out.append(dict(base, BLOCK_C=bc, num_warps=warps, num_stages=stages))
    unique = []
    for cfg in out:
        if cfg not in unique:
            unique.append(cfg)
    return unique


def _ws_case(conv_shape, dtype, layout, device):
    from ..ops.ws import row_dense

    w = torch.randn(conv_shape, device=device, dtype=dtype)
    if layout == "channels_last" and w.dim() == 4:
        w = w.to(memory_format=torch.channels_last)
    w = row_dense(w)
    fan_in = w.numel() // w.shape[0]
    return w, (w.shape[0], fan_in)


def _norm_case(norm_shape, n, dtype, layout, device):
    x = torch.randn(n, norm_shape.c, norm_shape.h, norm_shape.w, device=device, dtype=dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    return x, (n, norm_shape.c, norm_shape.h * norm_shape.w)


def _norm_runner(x, num_groups, kernel, config):
    """A closure running the BCN forward (or backward) with ``config``; the
    running buffers are restored after every call, so repeats never advance them."""
    from ..kernels import norm_plan as knorm
    c = x.shape[1]
    f32 = dict(device=x.device, dtype=torch.float32)
    gamma, beta = torch.ones(c, **f32), torch.zeros(c, **f32)
    omega, eta = torch.ones(num_groups, **f32), torch.zeros(num_groups, **f32)
    rm, rv = torch.zeros(c, **f32), torch.ones(c, **f32)
    nbt = torch.zeros((), dtype=torch.long, device=x.device)
    snapshot = (rm.clone(), rv.clone(), nbt.clone())
    y = torch.empty_like(x)

    def restore():
        rm.copy_(snapshot[0])
        rv.copy_(snapshot[1])
        nbt.copy_(snapshot[2])

    def forward(cfg):
        out = knorm.norm_forward(x, y, gamma, beta, omega, eta, rm, rv, nbt, num_groups, 1e-5, 0.1,
                                 False, MODE_BATCH, True, "relu", True, cfg)
        restore()
        return out

    if kernel == "norm_fwd":
        return lambda: forward(config)
    stats, rstd_c, rho = forward(tuning.heuristic_config("norm_fwd", x, (x.shape[0], c, x[0, 0].numel()),
                                                         channels_fastest(x)))
    dy = torch.randn_like(x)
    dx = torch.empty_like(x)
    return lambda: knorm.norm_backward(dy, x, dx, stats, rstd_c, rho, gamma, omega, eta, num_groups,
                                       MODE_BATCH, "relu", True, config)


def _ws_runner(w, kernel, config):
    from ..kernels import ws_plan as kws
    w_hat, stats = kws.ws_forward(w, 1e-5, 0, False, tuning.heuristic_config("ws_fwd", w, (w.shape[0], w[0].numel())))
    if kernel == "ws_fwd":
        return lambda: kws.ws_forward(w, 1e-5, 0, False, config)
    grad = torch.randn_like(w_hat)
    return lambda: kws.ws_backward(grad, w, stats, config)


def cases(suite_name: str, kernels=tuning.KERNELS, **narrow):
    """(kernel, description) pairs of the sweep, in order (``narrow``: see suites.suite)."""
    norms, convs, batches, dtypes, layouts = suites.suite(suite_name, **narrow)
    for kernel in kernels:
        if kernel.startswith("ws"):
            for conv, dtype, layout in itertools.product(convs, dtypes, layouts):
                yield kernel, dict(conv=conv, dtype=dtype, layout=layout)
        else:
            for shape, n, dtype, layout in itertools.product(norms, batches, dtypes, layouts):
                yield kernel, dict(norm=shape, n=n, dtype=dtype, layout=layout)


def run_autotune(suite_name: str = "resnet50", timer=None, out_dir="perf/results", cache_path=None,
                 max_configs=None, kernels=tuning.KERNELS, num_groups: int = 32, progress: bool = True,
                 batch_sizes=None, dtypes=None, layouts=None, max_minutes=None):
    """Sweep, write every measurement to ``<out_dir>/<device>/autotune.csv`` (the
    tunable part in ``config``, the shape's plan in ``plan``) and the winners to the
    cache. Returns (measurements DataFrame, {key: winning tunable part}).
    ``max_minutes`` stops after the case running at that time; what was measured
    is still written and its winners cached."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    on_gpu = device == "cuda"
    from .timing import cuda_graphed, default_timer

    if timer is None and on_gpu:
        # Replays of a CUDA graph: the kernels' device time. Eager calls would time
        # the host (~0.1 ms per call on the lent H100s), under which most configs tie.
        timer = lambda fn: default_timer()(cuda_graphed(fn))  # noqa: E731
    timer = timer or default_timer()
    meta = info.run_metadata()
    rows = []
    todo = list(cases(suite_name, kernels, batch_sizes=batch_sizes, dtypes=dtypes, layouts=layouts))
    deadline = time.monotonic() + 60 * max_minutes if max_minutes is not None else float("inf")
    for i, (kernel, case) in enumerate(todo, 1):
        if time.monotonic() > deadline:
            print(f"autotune stopped after {max_minutes} min with {len(rows)} measurements")
            break
        if progress:
            print(f"autotune {i}/{len(todo)}: {kernel} {' '.join(str(v) for v in case.values())}")
        dtype = _dtype(case["dtype"])
        layout = case["layout"]
        if kernel.startswith("ws"):
            t, shape = _ws_case(case["conv"].shape, dtype, layout, device)
            make = lambda cfg: _ws_runner(t, kernel, cfg)  # noqa: E731
            n, c, spatial = 0, shape[0], shape[1]
            channels_last = layout == "channels_last"
        else:
            t, shape = _norm_case(case["norm"], case["n"], dtype, layout, device)
            groups = min(num_groups, shape[1])
            make = lambda cfg: _norm_runner(t, groups, kernel, cfg)  # noqa: E731
            n, c, spatial = shape
            channels_last = channels_fastest(t)
        key = tuning.config_key(kernel, dtype, channels_last, shape)
        space = config_space(kernel, t, shape, channels_last)[: max_configs or None]
        for cfg in space:
            p50, p20, p80 = timer(make(cfg))
            tuned = tuning.tunable_part(kernel, cfg)
            plan = {k: v for k, v in cfg.items() if k not in tuned}
            rows.append(dict(kernel=kernel, key=key, config=json.dumps(tuned, sort_keys=True),
                             plan=json.dumps(plan, sort_keys=True), dtype=case["dtype"],
                             layout=layout, N=n, C=c, spatial=spatial, ms_p50=p50, ms_p20=p20, ms_p80=p80, **meta))
    frame = pd.DataFrame(rows)
    winners = pick_winners(frame)
    slug = info.device_slug()
    if out_dir is not None and len(frame):
        path = Path(out_dir) / slug / "autotune.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        # appended through pandas: an earlier file may lack a column (plan)
        whole = pd.concat([pd.read_csv(path), frame], ignore_index=True) if path.exists() else frame
        whole.to_csv(path, index=False)
    tuning.write_cache(cache_path or tuning.cache_dir() / f"{slug}.json", info.device_name(), winners)
    return frame, winners


def pick_winners(frame: pd.DataFrame) -> dict:
    """Per key, the config with the smallest mean time relative to the best
    config of each shape in the key's bucket."""
    if frame.empty:
        return {}
    df = frame.copy()
    shape_cols = ["key", "N", "C", "spatial"]
    df["relative"] = df["ms_p50"] / df.groupby(shape_cols)["ms_p50"].transform("min")
    score = df.groupby(["key", "config"])["relative"].mean().reset_index()
    best = score.loc[score.groupby("key")["relative"].idxmin()]
    return {row.key: json.loads(row.config) for row in best.itertuples()}
