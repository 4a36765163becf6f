"""The benchmark CSV: its columns, how it is read, and how new rows replace old ones.

One long-format CSV per device, ``perf/results/<device>/bench.csv``; one row per
measured case. A case is identified by CASE_COLUMNS. ``suite`` is not among them:
it records which suite last measured the case, and the same case measured by two
suites (the default sample and ``--full``) is one case.
"""
from pathlib import Path

import pandas as pd

# floor_ms_p50 and ratio_to_floor: host rows only (host_bench); files written before
# they existed read back with them empty.
COLUMNS = ["suite", "op", "provider", "variant", "mode", "dtype", "layout", "N", "C", "spatial",
           "ms_p50", "ms_p20", "ms_p80", "gbps", "pct_copy_bw", "peak_mem_mb", "launches", "images_per_s",
           "floor_ms_p50", "ratio_to_floor", "device", "torch", "triton", "commit", "timestamp"]
CASE_COLUMNS = ["op", "provider", "variant", "mode", "dtype", "layout", "N", "C", "spatial"]
# Explicit types, so that a column read back compares equal to the one written:
# without them a C column with blanks (the e2e rows) reads as float, 64 becomes
# 64.0 and no old row matches its new measurement. Blank = missing (<NA>), and
# two missing values are the same key.
INTEGER_COLUMNS = ["N", "C"]
FLOAT_COLUMNS = ["ms_p50", "ms_p20", "ms_p80", "gbps", "pct_copy_bw", "peak_mem_mb", "launches", "images_per_s",
                 "floor_ms_p50", "ratio_to_floor"]
TEXT_COLUMNS = [c for c in COLUMNS if c not in INTEGER_COLUMNS + FLOAT_COLUMNS]
MICRO_OPS = ("ws", "bcn", "bcn_estimate", "gn")  # the per-layer ops; other ops are end-to-end steps
DTYPES = {**{c: "Int64" for c in INTEGER_COLUMNS}, **{c: "float64" for c in FLOAT_COLUMNS},
          **{c: "string" for c in TEXT_COLUMNS}}


def typed(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with exactly COLUMNS, in order, of the CSV's types."""
    frame = frame.reindex(columns=COLUMNS)
    for column in INTEGER_COLUMNS:
        values = pd.to_numeric(frame[column], errors="raise")
        if (values.dropna() % 1 != 0).any():
            raise ValueError(f"column {column} holds non-integer values")
        frame[column] = values.astype("Int64")
    return frame.astype({c: DTYPES[c] for c in FLOAT_COLUMNS + TEXT_COLUMNS})


def read_bench_csv(path) -> pd.DataFrame:
    """A bench CSV, typed (columns the file lacks come back empty)."""
    header = pd.read_csv(path, nrows=0).columns
    frame = pd.read_csv(path, dtype={c: t for c, t in DTYPES.items() if c in header}, keep_default_na=False,
                        na_values=[""])
    return typed(frame)


def newest_per_case(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per case: the latest by timestamp (the last in file order on a tie)."""
    order = frame["timestamp"].fillna("").argsort(kind="stable")
    latest = frame.iloc[order].drop_duplicates(CASE_COLUMNS, keep="last")
    return latest.sort_index()


def upsert(frame: pd.DataFrame, path) -> pd.DataFrame:
    """Write ``frame``'s rows to the CSV at ``path``: a row replaces the old row of
    the same case, other old rows stay (an old file with duplicated cases keeps its
    newest row of each). Written atomically; returns what was written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = typed(frame)
    if path.exists():
        old = newest_per_case(read_bench_csv(path))
        new = pd.concat([old, new], ignore_index=True) if len(new) else old
    merged = new.drop_duplicates(CASE_COLUMNS, keep="last")
    merged = merged.sort_values(CASE_COLUMNS, kind="stable", na_position="first").reset_index(drop=True)
    tmp = path.with_suffix(".csv.tmp")
    merged.to_csv(tmp, index=False)
    tmp.replace(path)
    return merged


def timing_of(variant: str) -> str:
    """How a row was timed, from its variant: "eager" (eager calls, host and device
    time: variants eager, compiled), "graph" (CUDA-graph replays, device time:
    cudagraph, compiled_cudagraph), or the variant itself (e.g. "host")."""
    if variant in ("eager", "compiled"):
        return "eager"
    if variant in ("cudagraph", "compiled_cudagraph"):
        return "graph"
    return variant
