"""How well the default GPU suite (resnet50_sample) represents the measured grid.

For every op, mode, timing and baseline, the geometric-mean speedup of wsbcn over
the sample's cases against the same over every case a device's bench.csv holds
(both from ``plot.speedups``). The sample's side counts only what the default run
measures of its cases (its modes, ``suites.SAMPLE_MODES``, and compiled baselines,
``suites.compiled_ops``); groups it leaves out are listed, measured by --full:

    python perf/tools/sample_fidelity.py [perf/results/nvidia-h100-80gb-hbm3/bench.csv]
"""
import argparse
import math

from wsbcn.tools import plot, suites
from wsbcn.tools.bench import OPS
from wsbcn.tools.results import newest_per_case, read_bench_csv


def case_key(op, n, c, spatial, dtype, layout):
    return (op, int(n), int(c), str(spatial), str(dtype), str(layout))


def sample_keys():
    keys = set()
    for case in suites.cases("resnet50_sample", OPS):
        if case.op == "ws":
            shape = case.shape.shape
            keys.add(case_key("ws", 0, shape[0], "x".join(map(str, shape[1:])), case.dtype, case.layout))
        else:
            s = case.shape
            keys.add(case_key(case.op, case.n, s.c, f"{s.h}x{s.w}", case.dtype, case.layout))
    return keys


def measured_by_default(op, provider, mode):
    """Whether the default run (suite resnet50_sample) times this provider and mode."""
    compiled = provider.startswith("compiled")
    return mode in suites.SAMPLE_MODES and (not compiled or op in suites.compiled_ops("resnet50_sample", OPS))


def fidelity(bench):
    """(table of sample vs all geomeans, per op/mode/timing/baseline)."""
    micro = plot.micro_rows(newest_per_case(bench))
    keys = sample_keys()
    in_sample = [case_key(r.op, r.N, r.C, r.spatial, r.dtype, r.layout) in keys
                 and measured_by_default(r.op, r.provider, r.mode) for r in micro.itertuples()]
    index = ["op", "mode", "timing", "baseline"]
    everything = plot.speedups(micro).set_index(index)
    sample = plot.speedups(micro[in_sample]).set_index(index)
    table = everything.merge(sample, left_index=True, right_index=True, how="left", suffixes=("_all", "_sample"))
    table["cases_sample"] = table["cases_sample"].astype("Int64")
    table["deviation_pct"] = 100 * (table["speedup_sample"] / table["speedup_all"] - 1)
    return table


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", nargs="?", default="perf/results/nvidia-h100-80gb-hbm3/bench.csv")
    args = parser.parse_args(argv)
    table = fidelity(read_bench_csv(args.csv))
    print(table.to_string(float_format=lambda v: f"{v:.3f}"))
    measured = table["deviation_pct"].dropna().abs()
    if len(measured):
        print(f"\n{len(measured)} of {len(table)} groups in the sample; |deviation| median "
              f"{measured.median():.1f} %, max {measured.max():.1f} % ({' '.join(measured.idxmax())})")
    missing = table[table["speedup_sample"].isna()]
    if len(missing):
        print("groups the default run does not measure (--full does):",
              "; ".join(" ".join(k) for k in missing.index))
    return 0 if all(math.isfinite(v) for v in measured) else 1


if __name__ == "__main__":
    raise SystemExit(main())
