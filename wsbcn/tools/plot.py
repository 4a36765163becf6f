"""``wsbcn plot``: PNGs under perf/plots/ from the CSVs under perf/results/.

Per device: GB/s against shape per op and provider; speedup bars of wsbcn over
each baseline (geometric mean); % of copy bandwidth; the autotune sweep as a heat
map; end-to-end images/s and peak memory. Also ``summary.md``, the table the
README embeds.
"""
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def _case_label(row) -> str:
    dtype = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(row.dtype, row.dtype)
    return f"N{int(row.N)} C{int(row.C)} {row.spatial} {dtype} {'cl' if row.layout == 'channels_last' else 'nchw'}"


def geomean(values) -> float:
    values = [v for v in values if v > 0 and math.isfinite(v)]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else math.nan


def micro_rows(bench: pd.DataFrame) -> pd.DataFrame:
    """The micro-benchmark rows with a ``timing`` column: "eager" (host and device
    time of eager calls) or "graph" (CUDA-graph replays, device time only: `bench
    --graph`). The two are never compared with each other."""
    micro = bench[bench["op"] != "resnet50_step"].copy()
    micro["timing"] = np.where(micro["variant"].astype(str).str.endswith("cudagraph"), "graph", "eager")
    return micro


def speedups(bench: pd.DataFrame) -> pd.DataFrame:
    """Geometric-mean speedup of wsbcn over every other provider, per op, mode and timing."""
    micro = micro_rows(bench)
    keys = ["op", "mode", "timing", "dtype", "layout", "N", "C", "spatial"]
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


def plot_gbps(bench, device, out_dir):
    paths = []
    for (op, timing), frame in micro_rows(bench).groupby(["op", "timing"]):
        modes = sorted(frame["mode"].unique())
        fig, axes = plt.subplots(len(modes), 1, figsize=(12, 3.2 * len(modes)), squeeze=False)
        for ax, mode in zip(axes[:, 0], modes):
            sub = frame[frame["mode"] == mode].copy()
            sub["case"] = [_case_label(r) for r in sub.itertuples()]
            table = sub.pivot_table(index="case", columns="provider", values="gbps", aggfunc="first")
            for provider in table.columns:
                ax.plot(range(len(table)), table[provider].values, marker="o", ms=3, label=provider)
            ax.set_xticks(range(len(table)))
            ax.set_xticklabels(table.index, rotation=90, fontsize=5)
            ax.set_ylabel("effective GB/s")
            ax.set_title(f"{op} {mode} on {device} ({timing})")
            ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(_save(fig, out_dir / (f"gbps_{op}.png" if timing == "eager" else f"gbps_{op}_graph.png")))
    return paths


def plot_speedups(bench, device, out_dir):
    table = speedups(bench)
    if table.empty:
        return []
    fig, ax = plt.subplots(figsize=(8, 1.5 + 0.28 * len(table)))
    labels = [f"{r.op} {r.mode} vs {r.baseline} ({r.timing})" for r in table.itertuples()]
    colors = ["tab:green" if v >= 1 else "tab:red" for v in table["speedup"]]
    ax.barh(range(len(table)), table["speedup"], color=colors)
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_yticks(range(len(table)))
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("wsbcn speedup, geometric mean over the suite (>1: wsbcn faster)")
    ax.set_title(f"wsbcn speedup over each baseline on {device}")
    fig.tight_layout()
    return [_save(fig, out_dir / "speedup.png")]


def plot_copy_bw(bench, device, out_dir):
    micro = micro_rows(bench)
    ours = micro[micro["provider"] == "wsbcn"]
    if ours.empty:
        return []
    fig, ax = plt.subplots(figsize=(10, 4))
    for (op, mode, timing), group in ours.groupby(["op", "mode", "timing"]):
        ax.plot(np.arange(len(group)), group["pct_copy_bw"].values, ".", label=f"{op} {mode} ({timing})")
    ax.axhline(85, color="black", lw=0.8, ls="--")
    ax.set_ylabel("% of measured copy bandwidth")
    ax.set_xlabel("case")
    ax.set_title(f"wsbcn against the copy roofline on {device}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return [_save(fig, out_dir / "pct_copy_bw.png")]


def plot_autotune(tune, device, out_dir):
    paths = []
    for kernel, frame in tune.groupby("kernel"):
        frame = frame.copy()
        frame["shape"] = [f"N{r.N} C{r.C} S{r.spatial} {str(r.dtype)[:4]} {r.layout[:4]}" for r in frame.itertuples()]
        frame["relative"] = frame["ms_p50"] / frame.groupby("shape")["ms_p50"].transform("min")
        grid = frame.pivot_table(index="config", columns="shape", values="relative", aggfunc="min")
        fig, ax = plt.subplots(figsize=(max(6, 0.25 * grid.shape[1] + 3), max(3, 0.2 * grid.shape[0] + 2)))
        im = ax.imshow(np.log2(grid.values), aspect="auto", cmap="viridis_r")
        ax.set_yticks(range(grid.shape[0]))
        ax.set_yticklabels(grid.index, fontsize=4)
        ax.set_xticks(range(grid.shape[1]))
        ax.set_xticklabels(grid.columns, rotation=90, fontsize=4)
        fig.colorbar(im, ax=ax, label="log2(time / best)")
        ax.set_title(f"autotune {kernel} on {device}")
        fig.tight_layout()
        paths.append(_save(fig, out_dir / f"autotune_{kernel}.png"))
    return paths


def plot_e2e(bench, device, out_dir):
    e2e = bench[bench["op"] == "resnet50_step"]
    if e2e.empty:
        return []
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    e2e = e2e.copy()
    e2e["label"] = [f"{r.provider}\nN{r.N} {r.variant}" for r in e2e.itertuples()]
    axes[0].bar(e2e["label"], e2e["images_per_s"])
    axes[0].set_ylabel("images/s")
    if e2e["peak_mem_mb"].notna().any():
        axes[1].bar(e2e["label"], e2e["peak_mem_mb"])
        axes[1].set_ylabel("peak memory (MB)")
    else:
        axes[1].axis("off")
        axes[1].text(0.5, 0.5, "peak memory is measured on CUDA devices only", ha="center", va="center")
    for ax in axes:
        ax.tick_params(axis="x", labelsize=5, rotation=90)
    fig.suptitle(f"ResNet-50 training step on {device}")
    fig.tight_layout()
    return [_save(fig, out_dir / "e2e.png")]


def _save(fig, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def summary_markdown(bench: pd.DataFrame, device: str) -> str:
    lines = [f"Device: {device}; commits: {', '.join(sorted(bench['commit'].astype(str).unique()))}", "",
             "Timing: eager = eager calls (host and device); graph = CUDA-graph replays (device only).", "",
             "| op | mode | timing | baseline | wsbcn speedup (geomean) | cases |", "|---|---|---|---|---|---|"]
    for r in speedups(bench).itertuples():
        lines.append(f"| {r.op} | {r.mode} | {r.timing} | {r.baseline} | {r.speedup:.2f}x | {r.cases} |")
    e2e = bench[bench["op"] == "resnet50_step"]
    if len(e2e):
        lines += ["", "| ResNet-50 step | N | variant | images/s | peak MB |", "|---|---|---|---|---|"]
        for r in e2e.itertuples():
            mem = "n/a" if not math.isfinite(r.peak_mem_mb) else f"{r.peak_mem_mb:.0f}"
            lines.append(f"| {r.provider} | {r.N} | {r.variant} | {r.images_per_s:.1f} | {mem} |")
    return "\n".join(lines) + "\n"


def run_plot(results_dir="perf/results", plots_dir="perf/plots", log=print):
    """Plot every device folder under ``results_dir``; returns the written paths."""
    written = []
    results = Path(results_dir)
    devices = sorted(p for p in results.iterdir() if p.is_dir()) if results.exists() else []
    if not devices:
        raise FileNotFoundError(f"no results under {results}: run `wsbcn bench` first")
    for folder in devices:
        out = Path(plots_dir) / folder.name
        bench_csv, tune_csv = folder / "bench.csv", folder / "autotune.csv"
        if bench_csv.exists():
            bench = pd.read_csv(bench_csv, dtype={"spatial": str})
            device = str(bench["device"].iloc[0]) if len(bench) else folder.name
            written += plot_gbps(bench, device, out) + plot_speedups(bench, device, out)
            written += plot_copy_bw(bench, device, out) + plot_e2e(bench, device, out)
            summary = out / "summary.md"
            summary.write_text(summary_markdown(bench, device))
            written.append(summary)
        if tune_csv.exists():
            tune = pd.read_csv(tune_csv, dtype={"spatial": str})
            written += plot_autotune(tune, str(tune["device"].iloc[0]) if len(tune) else folder.name, out)
    for path in written:
        log(f"wrote {path}")
    return written
