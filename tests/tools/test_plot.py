"""``wsbcn plot`` (wsbcn/tools/plot.py): PNGs and summary.md from the bench and
autotune CSVs, drawn from the newest row per case, with no stale files, readable
figures, and speedups that never mix eager and graph timings."""
import math

import numpy as np
import pandas as pd
import pytest

from conftest import DEVICE
from wsbcn.tools import autotune, bench, info, plot, results

from .test_results import QUIET, FixedTimer, duplicated_csv, e2e_frame, run_tiny


def test_plot_writes_pngs_and_summary(tmp_path):
    timer = FixedTimer(1.0)
    out = tmp_path / "results"
    bench.run_bench("tiny", ops=("bcn", "gn"), modes=("fwd",), timer=timer, out_dir=out, with_compiled=False, **QUIET)
    autotune.run_autotune("tiny", timer=timer, out_dir=out, cache_path=tmp_path / "c.json", max_configs=2,
                          kernels=("norm_fwd",), num_groups=4, progress=False)
    written = plot.run_plot(out, tmp_path / "plots", log=lambda *a: None)
    names = {p.name for p in written}
    assert {"gbps_bcn.png", "gbps_gn.png", "speedup.png", "pct_copy_bw.png", "autotune_norm_fwd.png", "summary.md"} <= names
    for p in written:
        assert p.stat().st_size > 0
    summary = next(p for p in written if p.name == "summary.md").read_text()
    assert f"| bcn | fwd | eager | {bench.BASELINES[DEVICE]['bn']} |" in summary


def test_plot_of_a_csv_with_duplicated_cases_uses_the_newest_rows(tmp_path):
    folder = tmp_path / "results" / "cpu"
    folder.mkdir(parents=True)
    duplicated_csv(folder / "bench.csv")
    written = plot.run_plot(tmp_path / "results", tmp_path / "plots", log=lambda *a: None)
    summary = next(p for p in written if p.name == "summary.md").read_text()
    # newest rows: torch_bn 1.0 ms against wsbcn 0.5 and 1.0 ms -> ratios 2 and 1
    expected = math.exp(np.mean(np.log([1.0 / 0.5, 1.0 / 1.0])))
    assert f"| bcn | fwd | eager | torch_bn | {expected:.2f}x | 2 |" in summary
    assert ("Names: `bcn` = BCN (batch statistics); `eager` = eager calls (host + device time); `torch_bn` = torch "
            "BatchNorm on CPU (F.batch_norm).") in summary


def test_every_provider_and_timing_the_benchmarks_write_has_a_name_a_person_reads():
    """The e2e networks, the distributed benchmark's single-process provider and its
    host_dist<W> timing: named in the plots and the summary, each network its own colour."""
    from wsbcn.tools import dist_bench, models

    for network in models.VARIANTS:
        assert network in plot.PROVIDER_NAMES and network in plot.PROVIDER_COLORS, network
    colors = [plot.PROVIDER_COLORS[n] for n in models.VARIANTS]
    assert len(set(colors)) == len(colors)
    assert plot.PROVIDER_NAMES["wsbcn_single"] == "wsbcn without a process group (1 process)"
    assert plot._timing_name(dist_bench.variant_name(4)) == "host time across 4 processes"



def test_plot_deletes_what_this_run_did_not_draw(tmp_path):
    out = tmp_path / "results"
    run_tiny(out, ms=1.0)  # bcn and gn only: no WS, no e2e
    folder = tmp_path / "plots" / info.device_slug()
    folder.mkdir(parents=True)
    for stale in ("gbps_ws.png", "e2e.png", "something_old.png"):
        (folder / stale).write_bytes(b"old")
    written = plot.run_plot(out, tmp_path / "plots", log=lambda *a: None)
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in written)
    assert not {"gbps_ws.png", "e2e.png", "something_old.png"} & {p.name for p in folder.iterdir()}



def test_every_figure_has_labelled_axes_a_legend_and_its_provenance(tmp_path, monkeypatch):
    out = tmp_path / "results"
    bench.run_bench("tiny", ops=("ws", "bcn", "gn"), modes=("fwd", "fwdbwd"), timer=FixedTimer(1.0), out_dir=out,
                    with_compiled=False, **QUIET)
    results.upsert(e2e_frame([1, 2]), out / info.device_slug() / "bench.csv")
    figures = []
    save = plot._save

    def inspect(fig, path):
        texts = [t.get_text() for t in fig.texts]
        axes = [ax for ax in fig.axes if ax.has_data()]
        figures.append((path.name, texts, axes))
        for ax in axes:
            assert ax.get_ylabel(), (path.name, "y label")
            assert ax.get_legend() is not None or fig.legends, (path.name, "legend")
            labels = [t for t in ax.get_xticklabels() + ax.get_yticklabels() if t.get_text() and t.get_visible()]
            assert all(t.get_fontsize() >= 7 for t in labels), (path.name, "tick labels too small")
        assert any(ax.get_xlabel() for ax in axes), (path.name, "x label")
        assert any("commit" in t for t in texts), (path.name, "device and commit")
        return save(fig, path)

    monkeypatch.setattr(plot, "_save", inspect)
    plot.run_plot(out, tmp_path / "plots", log=lambda *a: None)
    assert {"gbps_bcn.png", "gbps_gn.png", "gbps_ws.png", "speedup.png", "pct_copy_bw.png", "e2e.png"} <= {
        name for name, _, _ in figures}
    case = next(ax for name, _, axes in figures if name == "gbps_bcn.png" for ax in axes[-1:])
    ticks = [t.get_text() for t in case.get_xticklabels()]
    assert "N=2 C=8 4x4 fp32 NHWC" in ticks  # a case as a person reads it


def test_geomean():
    assert plot.geomean([2.0, 8.0]) == pytest.approx(4.0)
    assert math.isnan(plot.geomean([]))


def test_speedups_never_mix_eager_and_graph_timings():
    base = dict(op="bcn", mode="fwd", dtype="bfloat16", layout="contiguous", N=2, C=8, spatial="4x4")
    rows = [dict(base, provider="wsbcn", variant="eager", ms_p50=2.0),
            dict(base, provider="cudnn_bn", variant="eager", ms_p50=1.0),
            dict(base, provider="wsbcn", variant="cudagraph", ms_p50=0.1),
            dict(base, provider="cudnn_bn", variant="cudagraph", ms_p50=0.4),
            dict(base, provider="compiled_bcn", variant="compiled_cudagraph", ms_p50=0.3)]
    table = plot.speedups(pd.DataFrame(rows)).set_index(["timing", "baseline"])["speedup"]
    assert table.to_dict() == {("eager", "cudnn_bn"): 0.5, ("graph", "compiled_bcn"): pytest.approx(3.0),
                               ("graph", "cudnn_bn"): pytest.approx(4.0)}
