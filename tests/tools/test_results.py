"""The benchmark CSV across runs (wsbcn/tools/results.py): upsert on typed case keys,
blank = missing, old files read with today's columns. The tiny suite with injected
timers: seconds, and no timing is asserted."""
import csv
import math

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


def test_a_csv_written_before_a_column_existed_reads_back_and_upserts(tmp_path):
    """Files written before floor_ms_p50/ratio_to_floor (the host rows' floor) read back
    with those columns empty, and an upsert keeps their rows."""
    path = tmp_path / "bench.csv"
    old_columns = [c for c in results.COLUMNS if c not in ("floor_ms_p50", "ratio_to_floor")]
    e2e_frame([2])[old_columns].to_csv(path, index=False)
    frame = results.read_bench_csv(path)
    assert list(frame.columns) == results.COLUMNS and frame["floor_ms_p50"].isna().all()
    host = e2e_frame([2]).iloc[:1].assign(suite="tiny", op="gn", provider="wsbcn", variant="host", C=8,
                                          floor_ms_p50=0.05, ratio_to_floor=2.0)
    merged = results.upsert(host, path)
    assert len(merged) == 3 and list(merged.dropna(subset=["ratio_to_floor"])["variant"]) == ["host"]
    assert [r["floor_ms_p50"] for r in raw_rows(path) if r["variant"] == "host"] == ["0.05"]
