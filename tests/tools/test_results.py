"""The benchmark CSV across runs (upsert on typed case keys, blank = missing) and
the plots drawn from it (newest row per case, no stale PNGs, readable figures).
The tiny suite with injected timers: seconds, and no timing is asserted."""
import csv
import math

import numpy as np
import pandas as pd
import pytest

from wsbcn.tools import bench, info, plot, results

QUIET = dict(progress=False, log=lambda *a: None)


class FixedTimer:
    """Runs the callable once (so every provider really runs) and reports ``ms``."""

    def __init__(self, ms):
        self.ms = ms

    def __call__(self, fn):
        fn()
        return self.ms, self.ms * 0.9, self.ms * 1.1


def e2e_frame(n_values, images_per_s=10.0, timestamp="2026-01-01T00:00:00Z"):
    """End-to-end rows as e2e.run_e2e writes them: no channel count (C blank)."""
    rows = [dict(suite="e2e", op="resnet50_step", provider=p, variant="eager", mode="fwdbwd", dtype="float32",
                 layout="contiguous", N=n, C=math.nan, spatial="64x64", ms_p50=n / images_per_s * 1e3,
                 ms_p20=1.0, ms_p80=1.0, gbps=math.nan, pct_copy_bw=math.nan, peak_mem_mb=math.nan,
                 launches=math.nan, images_per_s=images_per_s, device="cpu (test)", torch="t", triton="t",
                 commit="abc", timestamp=timestamp)
            for p in ("plain_bn", "wsbcn_ws_bcn") for n in n_values]
    return pd.DataFrame(rows, columns=bench.COLUMNS)


def raw_rows(path):
    """The CSV as text fields, read without pandas (an independent reader)."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def run_tiny(out_dir, ms):
    return bench.run_bench("tiny", ops=("bcn", "gn"), modes=("fwd",), timer=FixedTimer(ms), out_dir=out_dir,
                           with_compiled=False, **QUIET)


def test_rerunning_bench_on_a_csv_with_blank_columns_replaces_its_rows(tmp_path):
    out = tmp_path / "results"
    first = run_tiny(out, ms=1.0)
    path = out / info.device_slug() / "bench.csv"
    results.upsert(e2e_frame([2]), path)
    rows = raw_rows(path)
    assert any(r["C"] == "" for r in rows)  # the case that made pandas read C as float
    expected = len(first) + 2
    assert len(rows) == expected
    for ms in (2.0, 3.0):  # two more runs on the existing CSV
        run_tiny(out, ms=ms)
        rows = raw_rows(path)
        assert len(rows) == expected
        keys = [tuple(r[c] for c in results.CASE_COLUMNS) for r in rows]
        assert len(set(keys)) == len(keys)
        micro = [r for r in rows if r["op"] != "resnet50_step"]
        assert {float(r["ms_p50"]) for r in micro} == {ms}  # every measured case replaced by the newest run
        assert all(r["C"].isdigit() and r["N"].isdigit() for r in micro)  # integers stay integers ("8", not "8.0")
    written = plot.run_plot(out, tmp_path / "plots", log=lambda *a: None)
    assert {"speedup.png", "e2e.png", "summary.md"} <= {p.name for p in written}


def test_blank_case_columns_are_missing_values_that_match_each_other(tmp_path):
    path = tmp_path / "bench.csv"
    results.upsert(e2e_frame([2], images_per_s=10.0), path)
    results.upsert(e2e_frame([2], images_per_s=20.0, timestamp="2026-01-02T00:00:00Z"), path)
    assert [float(r["images_per_s"]) for r in raw_rows(path)] == [20.0, 20.0]  # replaced, not appended
    results.upsert(e2e_frame([1]), path)  # another batch size is another case
    assert sorted(r["N"] for r in raw_rows(path)) == ["1", "1", "2", "2"]


def duplicated_csv(path):
    """A CSV as the old upsert left it: every micro case twice, the older copy with
    C written as a float; the newer copy 4x faster for wsbcn."""
    base = dict(suite="tiny", op="bcn", variant="eager", mode="fwd", dtype="float32", layout="contiguous", N=2,
                spatial="4x4", gbps=1.0, pct_copy_bw=1.0, device="cpu (test)", torch="t", triton="t", commit="abc")
    rows = []
    for c, old_ms, new_ms in ((8, 2.0, 0.5), (16, 4.0, 1.0)):
        rows += [dict(base, provider="wsbcn", C=float(c), ms_p50=old_ms, timestamp="2026-01-01T00:00:00Z"),
                 dict(base, provider="torch_bn", C=float(c), ms_p50=1.0, timestamp="2026-01-01T00:00:00Z"),
                 dict(base, provider="wsbcn", C=c, ms_p50=new_ms, timestamp="2026-01-02T00:00:00Z"),
                 dict(base, provider="torch_bn", C=c, ms_p50=1.0, timestamp="2026-01-02T00:00:00Z")]
    frame = pd.DataFrame(rows).reindex(columns=bench.COLUMNS)
    frame["C"] = frame["C"].astype(float)  # written as 8.0, like a float column
    frame.to_csv(path, index=False)


def test_plot_of_a_csv_with_duplicated_cases_uses_the_newest_rows(tmp_path):
    folder = tmp_path / "results" / "cpu"
    folder.mkdir(parents=True)
    duplicated_csv(folder / "bench.csv")
    written = plot.run_plot(tmp_path / "results", tmp_path / "plots", log=lambda *a: None)
    summary = next(p for p in written if p.name == "summary.md").read_text()
    # newest rows: torch_bn 1.0 ms against wsbcn 0.5 and 1.0 ms -> ratios 2 and 1
    expected = math.exp(np.mean(np.log([1.0 / 0.5, 1.0 / 1.0])))
    assert f"| bcn | fwd | eager | torch_bn | {expected:.2f}x | 2 |" in summary


def test_upsert_repairs_a_csv_with_duplicated_cases(tmp_path):
    path = tmp_path / "bench.csv"
    duplicated_csv(path)
    results.upsert(e2e_frame([2]), path)
    rows = raw_rows(path)
    micro = [r for r in rows if r["op"] == "bcn"]
    assert len(micro) == 4 and len(rows) == 6
    assert sorted(float(r["ms_p50"]) for r in micro if r["provider"] == "wsbcn") == [0.5, 1.0]


def test_a_non_integer_case_column_is_refused_and_the_csv_left_alone(tmp_path):
    path = tmp_path / "bench.csv"
    results.upsert(e2e_frame([2]), path)
    before = path.read_text()
    bad = e2e_frame([2])
    bad["N"] = 2.5
    with pytest.raises(ValueError, match="column N"):
        results.upsert(bad, path)
    assert path.read_text() == before


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
