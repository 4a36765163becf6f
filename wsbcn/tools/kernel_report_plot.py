"""The figure of the static kernel report (kernel_report.py): registers, resident
CTAs per SM, loads in flight per SM and waves of every launch, per kernel,
optionally over a baseline report (another commit's CSV) drawn in grey."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SHORT = {  # kernel -> axis label
    "_norm_stats_kernel": "stats", "_norm_combine_kernel": "combine", "_norm_apply_kernel": "apply",
    "_norm_bwd_reduce_kernel": "bwd reduce", "_norm_bwd_combine_kernel": "bwd combine",
    "_norm_bwd_apply_kernel": "bwd apply", "_ws_fwd_kernel": "WS fwd", "_ws_bwd_kernel": "WS bwd",
    "_ws_multi_fwd_kernel": "model-wide WS fwd", "_ws_multi_bwd_kernel": "model-wide WS bwd",
}
PASSES = ["_norm_stats_kernel", "_norm_apply_kernel", "_norm_bwd_reduce_kernel", "_norm_bwd_apply_kernel"]
LAYOUTS = {"contiguous": ("NCHW", -0.17), "channels_last": ("channels_last", 0.17)}


def _label(frame) -> str:
    return f"commit {', '.join(sorted(frame.commit.astype(str).unique()))}, triton {frame.triton.iloc[0]}"


def _strip(ax, frame, column, kernels, color, marker, label, offset=0.0, size=18):
    """One point per distinct value of ``column`` per kernel (and layout), spread
    sideways by layout: NCHW left, channels_last right."""
    for i, kernel in enumerate(kernels):
        for layout, (_, side) in LAYOUTS.items():
            values = frame[(frame.kernel == kernel) & (frame.layout == layout)][column].dropna().unique()
            if len(values):
                ax.scatter([i + side + offset] * len(values), values, s=size, color=color, marker=marker,
                           label=label, alpha=0.8, linewidths=1)
                label = None  # one legend entry per series


def plot_report(frame, path, baseline=None):
    """Write the figure to ``path`` (PNG). ``baseline``: a report of another commit."""
    from pathlib import Path

    kernels = [k for k in SHORT if k in set(frame.kernel)]
    fig, axes = plt.subplots(1, 4, figsize=(22, 5.8))
    panels = [
        (axes[0], "registers", kernels, "registers per thread", [(64, "64: 8 CTAs of 4 warps per SM"),
                                                                   (255, "255: the most a thread gets")]),
        (axes[1], "ctas_per_sm", kernels, "resident CTAs per SM (H100 limits)", []),
        (axes[2], "loads_in_flight_kb_per_sm", PASSES, "loads in flight per SM, KB (modelled)",
         [(15, "~15-20 KB: what an H100 needs")]),
        (axes[3], "waves", PASSES, "waves on 132 SMs at N = 32 (log scale)", [(4, "4 waves")]),
    ]
    if baseline is not None and "loads_in_flight_kb_per_sm" not in baseline:
        # reports before the column: every loop was plain, one step in flight
        baseline = baseline.assign(loads_in_flight_kb_per_sm=baseline.step_load_kb_per_sm)
    for ax, column, names, ylabel, lines in panels:
        data = frame if column != "waves" else frame[frame.n == 32]
        if baseline is not None:
            base = baseline if column != "waves" else baseline[baseline.n == 32]
            _strip(ax, base, column, names, "0.6", "x", f"before: {_label(baseline)}", offset=-0.06)
        _strip(ax, data, column, names, "tab:blue", "o", f"now: {_label(frame)}", offset=0.06)
        if column == "registers":  # spilling specialisations, before and now
            label = "spills to local memory"
            for d, off in ((baseline, -0.06), (frame, 0.06)):
                if d is not None and (d.spill_store_bytes > 0).any():
                    _strip(ax, d[d.spill_store_bytes > 0], column, names, "tab:red", "^", label, offset=off, size=40)
                    label = None
        for y, text in lines:
            ax.axhline(y, color="tab:red", lw=0.8, ls="--")
            ax.annotate(text, (len(names) - 0.5, y), ha="right", va="bottom", fontsize=8, color="tab:red")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([SHORT[k] for k in names], rotation=30, ha="right")
        ax.set_ylabel(ylabel)
        ax.set_xlabel("kernel (left of each tick: NCHW, right: channels_last)")
        ax.grid(axis="y", alpha=0.3)
        # headroom above the data for the legend
        if column == "waves":
            ax.set_yscale("log")
            ax.set_ylim(0.3, 80)
        elif column == "registers":
            ax.set_ylim(0, 330)
        elif column == "loads_in_flight_kb_per_sm":
            shown = [d[d.kernel.isin(names)][column].max() for d in (data, baseline) if d is not None]
            top = max([20.0] + [float(v) for v in shown])
            ax.set_ylim(0, 1.35 * top)
        else:
            ax.set_ylim(0, 42)
        ax.legend(fontsize=8, loc="upper left")
    shapes = frame[~frame.op.str.startswith("ws")]
    fig.suptitle("Static sm_90 kernel report (no GPU: compiled with triton, occupancy from H100 limits): every launch of "
                 f"the ResNet-50 BCN (batch, estimate, eval, ReLU)/GN/WS layers, N = {sorted(int(n) for n in shapes.n.dropna().unique())}, "
                 f"{' and '.join(sorted(frame.dtype.unique()))}", fontsize=11)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
