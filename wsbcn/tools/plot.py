"""``wsbcn plot``: PNGs under perf/plots/<device>/ from the CSVs under perf/results/<device>/.

Per device: effective bandwidth per case, op and provider; wsbcn's speedup over
each baseline (geometric mean); wsbcn's % of the measured copy bandwidth; the
autotune sweep as a heat map; end-to-end images/s and peak memory. Also
``summary.md``, the table the README embeds. A device's old PNGs are deleted
first, so every file in its folder comes from the data plotted now. Each figure
names its device and commits at the bottom.
"""
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from .results import MICRO_OPS, newest_per_case, read_bench_csv, timing_of  # noqa: E402

OP_NAMES = {"bcn": "BCN (batch statistics)", "bcn_estimate": "BCN (micro-batch estimates)", "gn": "GroupNorm",
            "ws": "Weight Standardization"}
MODE_NAMES = {"fwd": "forward", "bwd": "backward", "fwdbwd": "forward+backward"}
TIMING_NAMES = {"eager": "eager calls (host + device time)", "graph": "CUDA-graph replays (device time)",
                "host": "host time of eager calls"}
PROVIDER_NAMES = {
    "wsbcn": "wsbcn",
    "cudnn_bn": "cuDNN BatchNorm (F.batch_norm)", "aten_gn": "ATen GroupNorm (F.group_norm)",
    "torch_bn": "torch BatchNorm on CPU (F.batch_norm)", "torch_gn": "torch GroupNorm on CPU (F.group_norm)",
    "reference_bcn": "reference BCN (eager BN then GN)", "compiled_bcn": "torch.compile of reference BCN",
    "reference_ws": "reference WS (eager)", "compiled_ws": "torch.compile of reference WS",
    "plain_bn": "plain BN", "reference_ws_bcn": "WS+BCN, reference layers", "wsbcn_ws_bcn": "WS+BCN, wsbcn",
    "wsbcn_ws_gn": "WS+GN, wsbcn", "wsbcn_ws_bcn_modelws": "WS+BCN, wsbcn, model-wide WS",
    "wsbcn_single": "wsbcn without a process group (1 process)",
}
E2E_NAMES = {"resnet50_step": "ResNet-50 training step (classification)",
             "resnet50_trunk_step": "ResNet-50 trunk training step (detection)"}
E2E_VARIANT_NAMES = {"eager": "eager", "cudagraph": "CUDA graph", "compiled": "torch.compile"}
DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "bf16_autocast": "bf16 autocast"}
LAYOUT_NAMES = {"contiguous": "NCHW", "channels_last": "NHWC"}
CASE_AXIS = "case: batch N, channels C, H x W, dtype, layout (NCHW contiguous, NHWC channels_last)"
WS_AXIS = "weight: out x in x kH x kW, dtype, layout (NCHW contiguous, NHWC channels_last)"
COPY_TARGET_PCT = 85  # DESIGN target: BCN forward at >= 85 % of copy bandwidth
STYLE = {"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "xtick.labelsize": 8, "ytick.labelsize": 9,
         "legend.fontsize": 9, "figure.titlesize": 12}


# One colour per provider and per (mode, timing) series in every figure, so that a
# colour means the same thing across plots.
PROVIDER_COLORS = {"wsbcn": "tab:blue", "cudnn_bn": "tab:orange", "torch_bn": "tab:orange", "aten_gn": "tab:green",
                   "torch_gn": "tab:green", "reference_bcn": "tab:red", "compiled_bcn": "tab:purple",
                   "reference_ws": "tab:red", "compiled_ws": "tab:purple", "plain_bn": "tab:gray",
                   "reference_ws_bcn": "tab:red", "wsbcn_ws_bcn": "tab:blue", "wsbcn_ws_gn": "tab:cyan",
                   "wsbcn_ws_bcn_modelws": "tab:olive"}
SERIES_COLORS = {("fwd", "eager"): "tab:blue", ("fwd", "graph"): "tab:cyan", ("bwd", "eager"): "tab:red",
                 ("bwd", "graph"): "tab:pink", ("fwdbwd", "eager"): "tab:green", ("fwdbwd", "graph"): "tab:olive"}
TIMING_MARKERS = {"eager": "o", "graph": "s"}


def _name(table, key) -> str:
    return table.get(key, str(key))


def _timing_name(timing) -> str:
    """TIMING_NAMES, and the distributed host rows' "host_dist<W>" (dist_bench.py)."""
    if str(timing).startswith("host_dist") and str(timing)[9:].isdigit():
        return f"host time across {str(timing)[9:]} processes"
    return _name(TIMING_NAMES, timing)


def case_label(row) -> str:
    """A case as a person reads it: "N=32 C=256 14x14 bf16 NHWC", or for WS
    "256x128x3x3 fp32 NCHW"."""
    layout = _name(LAYOUT_NAMES, row.layout)
    dtype = _name(DTYPE_NAMES, row.dtype)
    if row.op == "ws":
        return f"{int(row.C)}x{row.spatial} {dtype} {layout}"
    return f"N={int(row.N)} C={int(row.C)} {row.spatial} {dtype} {layout}"


def _case_order(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows sorted by batch size, then tensor size, then layout: the x-axis order."""
    sizes = frame["C"].astype(float) * [math.prod(int(v) for v in str(s).split("x")) for s in frame["spatial"]]
    return frame.assign(_size=sizes.values).sort_values(["N", "_size", "layout"], kind="stable").drop(columns="_size")


def _log_axis(axis) -> None:
    """A log scale with plain numbers at 1, 2 and 5 per decade (not 2 x 10^0)."""
    axis.axes.set_yscale("log") if axis is axis.axes.yaxis else axis.axes.set_xscale("log")
    axis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def geomean(values) -> float:
    values = [v for v in values if v > 0 and math.isfinite(v)]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else math.nan


def micro_rows(bench: pd.DataFrame) -> pd.DataFrame:
    """The per-layer rows with a ``timing`` column (results.timing_of): "eager"
    (eager calls) or "graph" (CUDA-graph replays); the two are never compared with
    each other."""
    micro = bench[bench["op"].isin(MICRO_OPS)].copy()
    micro["timing"] = [timing_of(v) for v in micro["variant"].astype(str)]
    return micro


def e2e_rows(bench: pd.DataFrame) -> pd.DataFrame:
    """The end-to-end rows (whole training steps, in images/s)."""
    return bench[~bench["op"].isin(MICRO_OPS)]


def speedups(bench: pd.DataFrame) -> pd.DataFrame:
    """Geometric-mean speedup of wsbcn over every other provider, per op, mode and
    timing, over the cases both measured (one row per case and provider: the last)."""
    micro = micro_rows(bench)
    keys = ["op", "mode", "timing", "dtype", "layout", "N", "C", "spatial"]
    if "timestamp" in micro:
        micro = micro.iloc[micro["timestamp"].fillna("").argsort(kind="stable")]
    micro = micro.drop_duplicates(keys + ["provider"], keep="last")
    ours = micro[micro["provider"] == "wsbcn"].set_index(keys)["ms_p50"]
    out = []
    for (op, mode, timing, provider), group in micro[micro["provider"] != "wsbcn"].groupby(
            ["op", "mode", "timing", "provider"]):
        theirs = group.set_index(keys)["ms_p50"]
        ratio = (theirs / ours.reindex(theirs.index)).dropna()
        if len(ratio):
            out.append(dict(op=op, mode=mode, timing=timing, baseline=provider, speedup=geomean(ratio),
                            cases=len(ratio)))
    return pd.DataFrame(out, columns=["op", "mode", "timing", "baseline", "speedup", "cases"])


def _provenance(frame: pd.DataFrame) -> str:
    devices = "; ".join(sorted(frame["device"].dropna().astype(str).unique()))
    commits = ", ".join(sorted(frame["commit"].dropna().astype(str).unique()))
    return f"{devices}; commit {commits}"


def _footer(fig, frame, source):
    fig.text(0.005, 0.003, f"{_provenance(frame)}; data: {source}", fontsize=7, color="0.3", ha="left", va="bottom")


def _device_title(frame) -> str:
    return " / ".join(sorted(frame["device"].dropna().astype(str).unique()))


def plot_gbps(bench, out_dir, source):
    """Effective bandwidth (the bytes the closed form must move / time) per case."""
    paths = []
    micro = micro_rows(bench)
    micro = micro[np.isfinite(micro["gbps"].astype(float))]
    for (op, timing), frame in micro.groupby(["op", "timing"]):
        modes = [m for m in MODE_NAMES if m in set(frame["mode"])]
        cases = _case_order(frame.drop_duplicates(["N", "C", "spatial", "dtype", "layout"]))
        labels = [case_label(r) for r in cases.itertuples()]
        width = max(12.0, 0.32 * len(labels) + 6)
        fig, axes = plt.subplots(len(modes), 1, figsize=(width, 3.0 * len(modes) + 2.6), squeeze=False, sharex=True)
        for ax, mode in zip(axes[:, 0], modes):
            sub = frame[frame["mode"] == mode].copy()
            sub["case"] = [case_label(r) for r in sub.itertuples()]
            table = sub.pivot_table(index="case", columns="provider", values="gbps", aggfunc="last").reindex(labels)
            for provider in sorted(table.columns, key=lambda p: (p != "wsbcn", p)):
                ax.plot(range(len(labels)), table[provider].values, marker="o", ms=4, lw=0.8, ls=":",
                        label=_name(PROVIDER_NAMES, provider), color=PROVIDER_COLORS.get(provider))
            ax.set_xticks(range(len(labels)))
            ax.set_xticklabels(labels, rotation=60, ha="right")
            _log_axis(ax.yaxis)
            ax.set_ylabel("effective bandwidth (GB/s)")
            ax.set_title(f"{_name(OP_NAMES, op)}, {_name(MODE_NAMES, mode)}: {_timing_name(timing)}")
            ax.grid(True, which="both", axis="y", alpha=0.3)
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), title="provider (higher is faster)")
        axes[-1, 0].set_xlabel(WS_AXIS if op == "ws" else CASE_AXIS)
        fig.suptitle(f"Effective bandwidth (bytes the closed form must move / time) on {_device_title(frame)}")
        fig.tight_layout(rect=(0, 0.02, 1, 0.98))
        _footer(fig, frame, source)
        paths.append(_save(fig, out_dir / (f"gbps_{op}.png" if timing == "eager" else f"gbps_{op}_{timing}.png")))
    return paths


def plot_speedups(bench, out_dir, source):
    """wsbcn's geometric-mean speedup over each baseline: a panel per op (rows) and
    timing (columns), a bar per mode and baseline."""
    table = speedups(bench)
    if table.empty:
        return []
    ops = [op for op in MICRO_OPS if op in set(table["op"])]
    timings = [t for t in ("eager", "graph") if t in set(table["timing"])]
    timings += sorted(set(table["timing"]) - set(timings))
    counts = [max(len(table[(table["op"] == op) & (table["timing"] == t)]) for t in timings) for op in ops]
    height = 0.34 * sum(counts) + 1.0 * len(ops) + 2
    fig, axes = plt.subplots(len(ops), len(timings), figsize=(11.5 * len(timings), height), squeeze=False,
                             gridspec_kw={"height_ratios": [c + 1.5 for c in counts]})
    lo, hi = table["speedup"].min(), table["speedup"].max()
    limits = (min(lo / 1.6, 0.5), max(hi * 1.8, 2.0))
    modes = list(MODE_NAMES)
    for (row, op), (col, timing) in [(r, c) for r in enumerate(ops) for c in enumerate(timings)]:
        ax = axes[row, col]
        sub = table[(table["op"] == op) & (table["timing"] == timing)]
        sub = sub.assign(_m=[modes.index(m) if m in modes else 9 for m in sub["mode"]]).sort_values(
            ["baseline", "_m"], kind="stable")
        labels = [f"vs {_name(PROVIDER_NAMES, r.baseline)}, {_name(MODE_NAMES, r.mode)} ({r.cases} cases)"
                  for r in sub.itertuples()]
        ax.barh(range(len(sub)), sub["speedup"], color=["tab:green" if v >= 1 else "tab:red" for v in sub["speedup"]])
        for i, v in enumerate(sub["speedup"]):
            ax.text(v, i, f" {v:.2f}x", va="center", fontsize=8)
        ax.axvline(1.0, color="black", lw=0.8)
        ax.set_yticks(range(len(sub)))
        ax.set_yticklabels(labels)
        ax.invert_yaxis()
        _log_axis(ax.xaxis)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.set_xlim(*limits)
        ax.grid(True, axis="x", alpha=0.3)
        ax.set_title(f"{_name(OP_NAMES, op)}: {_timing_name(timing)}", loc="left")
        ax.set_ylabel("baseline, mode")
        if row == len(ops) - 1:
            ax.set_xlabel("wsbcn speedup = baseline time / wsbcn time\n(geometric mean over the cases, log scale)")
        if sub.empty:  # (across processes only BCN runs: WS and GroupNorm take no process group)
            why = "does not apply: it takes no process group" if str(timing).startswith("host_dist") \
                else "not measured"
            ax.text(0.5, 0.5, why, transform=ax.transAxes, ha="center", va="center")
    fig.legend(handles=[Patch(color="tab:green", label="wsbcn faster (> 1x)"),
                        Patch(color="tab:red", label="wsbcn slower (< 1x)")], loc="upper right", ncols=2)
    micro = micro_rows(bench)
    on = "; ".join(f"{_timing_name(t)} on {_device_title(micro[micro['timing'] == t])}" for t in timings)
    fig.suptitle(f"wsbcn speedup over each baseline\n({on})", x=0.02, ha="left")
    fig.tight_layout(rect=(0, 0.02, 1, 0.96))
    _footer(fig, micro_rows(bench), source)
    return [_save(fig, out_dir / "speedup.png")]


def plot_copy_bw(bench, out_dir, source):
    """wsbcn's effective bandwidth as % of the device's measured copy bandwidth."""
    micro = micro_rows(bench)
    ours = micro[(micro["provider"] == "wsbcn") & np.isfinite(micro["pct_copy_bw"].astype(float))]
    if ours.empty:
        return []
    ops = [op for op in MICRO_OPS if op in set(ours["op"])]
    copy_bw = float(np.nanmedian(ours["gbps"] / ours["pct_copy_bw"] * 100))
    heights = []
    for op in ops:
        heights.append(len(ours[ours["op"] == op].drop_duplicates(["N", "C", "spatial", "dtype", "layout"])))
    fig, axes = plt.subplots(len(ops), 1, figsize=(max(12.0, 0.32 * max(heights) + 7), 4.2 * len(ops) + 1.5),
                             squeeze=False)
    for ax, op in zip(axes[:, 0], ops):
        frame = ours[ours["op"] == op]
        cases = _case_order(frame.drop_duplicates(["N", "C", "spatial", "dtype", "layout"]))
        labels = [case_label(r) for r in cases.itertuples()]
        sub = frame.assign(case=[case_label(r) for r in frame.itertuples()])
        modes = list(MODE_NAMES)
        pairs = sorted(sub.groupby(["mode", "timing"]),
                       key=lambda item: (modes.index(item[0][0]) if item[0][0] in modes else 9, item[0][1]))
        for (mode, timing), group in pairs:
            values = group.set_index("case")["pct_copy_bw"]
            values = values[~values.index.duplicated(keep="last")].reindex(labels)
            ax.plot(range(len(labels)), values.values, marker=TIMING_MARKERS.get(timing, "^"), ms=5, ls="none",
                    color=SERIES_COLORS.get((mode, timing)),
                    label=f"{_name(MODE_NAMES, mode)}, {_name(TIMING_NAMES, timing)}")
        ax.axhline(COPY_TARGET_PCT, color="black", lw=0.9, ls="--",
                   label=f"design target for BCN forward at N >= 32: {COPY_TARGET_PCT} %")
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=60, ha="right")
        ax.set_ylabel("% of measured copy bandwidth")
        ax.set_xlabel(WS_AXIS if op == "ws" else CASE_AXIS)
        ax.set_title(f"wsbcn {_name(OP_NAMES, op)}")
        ax.grid(True, axis="y", alpha=0.3)
        ax.set_ylim(0, max(100, float(np.nanmax(frame["pct_copy_bw"])) * 1.1))
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(f"wsbcn against the copy roofline on {_device_title(ours)} "
                 f"(measured copy bandwidth, read + write: {copy_bw:.0f} GB/s)")
    fig.tight_layout(rect=(0, 0.02, 1, 0.98))
    _footer(fig, ours, source)
    return [_save(fig, out_dir / "pct_copy_bw.png")]


def _config_label(config: str) -> str:
    """'{"BLOCK_C": 16, "num_warps": 4, ...}' -> 'BLOCK_C=16 num_warps=4 ...'."""
    import json

    try:
        return " ".join(f"{k}={v}" for k, v in json.loads(config).items())
    except (TypeError, ValueError):
        return str(config)


def plot_autotune(tune, out_dir, source):
    """Per kernel: each config's time relative to the best config of each case."""
    paths = []
    for kernel, frame in tune.groupby("kernel"):
        frame = frame.copy()
        frame["shape"] = [f"N={r.N} C={r.C} S={r.spatial} {_name(DTYPE_NAMES, r.dtype)} {_name(LAYOUT_NAMES, r.layout)}"
                          for r in frame.itertuples()]
        frame["config"] = [_config_label(c) for c in frame["config"]]
        frame["relative"] = frame["ms_p50"] / frame.groupby("shape")["ms_p50"].transform("min")
        grid = frame.pivot_table(index="config", columns="shape", values="relative", aggfunc="min")
        fig, ax = plt.subplots(figsize=(max(10, 0.35 * grid.shape[1] + 7), max(4, 0.2 * grid.shape[0] + 3)))
        im = ax.imshow(np.log2(grid.values), aspect="auto", cmap="viridis_r")
        ax.set_yticks(range(grid.shape[0]))
        ax.set_yticklabels(grid.index, fontsize=7)
        ax.set_xticks(range(grid.shape[1]))
        ax.set_xticklabels(grid.columns, rotation=60, ha="right", fontsize=8)
        ax.set_xlabel("case: batch N, channels C, spatial size S = H x W, dtype, layout")
        ax.set_ylabel("kernel config (blank: not tried on that case)")
        fig.colorbar(im, ax=ax, fraction=0.05, pad=0.02, label="log2(time / the case's best time); 0 = fastest")
        ax.set_title(f"autotune sweep of {kernel} on {_device_title(frame)}")
        fig.tight_layout(rect=(0, 0.02, 1, 1))
        _footer(fig, frame, source)
        paths.append(_save(fig, out_dir / f"autotune_{kernel}.png"))
    return paths


def plot_e2e(bench, out_dir, source):
    """Images/s (and peak memory, where measured) per end-to-end workload."""
    e2e = e2e_rows(bench)
    e2e = e2e[np.isfinite(e2e["images_per_s"].astype(float))]
    if e2e.empty:
        return []
    workloads = list(e2e.groupby(["op", "spatial", "dtype", "layout"], sort=False))
    has_mem = e2e["peak_mem_mb"].notna().any()
    rows = 2 if has_mem else 1
    fig, axes = plt.subplots(rows, len(workloads), figsize=(7.5 * len(workloads), 4.6 * rows + 1), squeeze=False)
    for col, ((op, spatial, dtype, layout), frame) in enumerate(workloads):
        order = list(E2E_VARIANT_NAMES)
        runs = frame.drop_duplicates(["N", "variant"])
        runs = runs.assign(_v=[order.index(v) if v in order else len(order) for v in runs["variant"]]).sort_values(
            ["N", "_v"], kind="stable")
        run_labels = [f"N={r.N}\n{_name(E2E_VARIANT_NAMES, r.variant)}" for r in runs.itertuples()]
        providers = list(dict.fromkeys(frame["provider"]))
        width = 0.8 / len(providers)
        metrics = [("images_per_s", "images/s (higher is better)")]
        if has_mem:
            metrics.append(("peak_mem_mb", "peak memory (MB, lower is better)"))
        for row, (metric, ylabel) in enumerate(metrics):
            ax = axes[row, col]
            for i, provider in enumerate(providers):
                mine = frame[frame["provider"] == provider].set_index(["N", "variant"])[metric]
                values = [mine.get((r.N, r.variant), np.nan) for r in runs.itertuples()]
                bars = ax.bar(np.arange(len(runs)) + (i - (len(providers) - 1) / 2) * width, values, width,
                              label=_name(PROVIDER_NAMES, provider), color=PROVIDER_COLORS.get(provider))
                ax.bar_label(bars, fmt="%.0f" if metric == "peak_mem_mb" else "%.1f", fontsize=7, rotation=90,
                             padding=2)
            ax.set_xticks(range(len(runs)))
            ax.set_xticklabels(run_labels)
            ax.set_ylabel(ylabel)
            ax.set_xlabel("batch size and execution")
            ax.margins(y=0.25)
            if not frame[metric].notna().any():
                ax.text(0.5, 0.5, "peak memory is measured on CUDA devices only", transform=ax.transAxes,
                        ha="center", va="center")
            ax.set_title(f"{_name(E2E_NAMES, op)}\n{spatial.replace('x', ' x ')}, {_name(DTYPE_NAMES, dtype)}, "
                         f"{_name(LAYOUT_NAMES, layout)}")
    fig.suptitle(f"End-to-end training steps on {_device_title(e2e)}")
    handles = {h.get_label(): h for ax in axes.flat for h in ax.get_legend_handles_labels()[0]}
    fig.legend(handles=list(handles.values()), title="network", loc="lower center", ncols=len(handles),
               bbox_to_anchor=(0.5, 0.25 / fig.get_figheight()))
    fig.tight_layout(rect=(0, 1.0 / fig.get_figheight(), 1, 1))
    _footer(fig, e2e, source)
    return [_save(fig, out_dir / "e2e.png")]


def _save(fig, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summary_markdown(bench: pd.DataFrame) -> str:
    """The speedup table (op, mode, timing, baseline) and the end-to-end table, in Markdown."""
    commits = ", ".join(sorted(bench["commit"].dropna().astype(str).unique()))
    lines = [f"Device: {_device_title(bench)}; commits: {commits}",
             "", "Speedup = baseline time / wsbcn time, geometric mean over the cases both measured.", "",
             "| op | mode | timing | baseline | wsbcn speedup (geomean) | cases |", "|---|---|---|---|---|---|"]
    table = speedups(bench)
    for r in table.itertuples():
        lines.append(f"| {r.op} | {r.mode} | {r.timing} | {r.baseline} | {r.speedup:.2f}x | {r.cases} |")
    if len(table):  # what the short names in the table mean
        lines += ["", "Names: " + "; ".join(
            [f"`{op}` = {_name(OP_NAMES, op)}" for op in dict.fromkeys(table["op"])]
            + [f"`{t}` = {_timing_name(t)}" for t in dict.fromkeys(table["timing"])]
            + [f"`{b}` = {_name(PROVIDER_NAMES, b)}" for b in dict.fromkeys(table["baseline"])]) + "."]
    e2e = e2e_rows(bench)
    if len(e2e):
        lines += ["", "| end-to-end step | input | N | network | execution | images/s | peak MB |",
                  "|---|---|---|---|---|---|---|"]
        for r in e2e.itertuples():
            mem = "n/a" if not math.isfinite(r.peak_mem_mb) else f"{r.peak_mem_mb:.0f}"
            lines.append(f"| {r.op} | {r.spatial} | {r.N} | {r.provider} | {r.variant} | {r.images_per_s:.1f} "
                         f"| {mem} |")
    return "\n".join(lines) + "\n"


def _clear(out: Path) -> None:
    """Delete the PNGs and summary a previous run left in a device's plot folder."""
    for old in [*out.glob("*.png"), out / "summary.md"]:
        if old.exists():
            old.unlink()


def run_plot(results_dir="perf/results", plots_dir="perf/plots", log=print):
    """Plot every device folder under ``results_dir``; returns the written paths."""
    written = []
    results = Path(results_dir)
    if results.exists() and not results.is_dir():
        raise NotADirectoryError(f"{results} is a file: give the results folder (the one `wsbcn bench --out` wrote)")
    devices = sorted(p for p in results.iterdir() if p.is_dir()) if results.exists() else []
    if not devices:
        raise FileNotFoundError(f"no results under {results}: run `wsbcn bench` first")
    skipped = []
    for folder in devices:
        out = Path(plots_dir) / folder.name
        bench_csv, tune_csv = folder / "bench.csv", folder / "autotune.csv"
        present = set()
        for csv, command in ((bench_csv, "wsbcn bench"), (tune_csv, "wsbcn autotune")):
            if not csv.exists():
                continue
            try:  # a run stopped before writing leaves an empty file: skipped, the rest plotted
                pd.read_csv(csv, nrows=0)
                present.add(csv)
            except pd.errors.EmptyDataError:
                skipped.append(f"{csv} holds no results (run `{command}` again, or delete it)")
                log(f"skipped: {skipped[-1]}")
        if not present:
            continue
        _clear(out)
        mine = []
        with plt.rc_context(STYLE):
            if bench_csv in present:
                bench = newest_per_case(read_bench_csv(bench_csv))
                source = bench_csv.as_posix()
                mine += plot_gbps(bench, out, source) + plot_speedups(bench, out, source)
                mine += plot_copy_bw(bench, out, source) + plot_e2e(bench, out, source)
                summary = out / "summary.md"
                summary.parent.mkdir(parents=True, exist_ok=True)
                summary.write_text(summary_markdown(bench))
                mine.append(summary)
            if tune_csv in present:
                tune = pd.read_csv(tune_csv, dtype={"spatial": str})
                mine += plot_autotune(tune, out, tune_csv.as_posix())
        log(f"{folder.name}: {len(mine)} files in {out}/: {', '.join(p.name for p in mine)}")
        written += mine
    if not written and skipped:
        raise FileNotFoundError(f"nothing to plot: {'; '.join(skipped)}")
    return written
