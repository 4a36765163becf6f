"""`wsbcn bench`'s default suite, its summary and its CPU timer: the default GPU
sample is part of the full grid, the printed summary is what the CSV says, and
the timer's statistics are the ones documented (on a scripted clock: no timing
is asserted)."""
import argparse
import math
import re
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from wsbcn.tools import bench, cli, commands, e2e, suites, timing
from wsbcn.tools.bench import COLUMNS, OPS


def test_default_gpu_suite_is_a_subset_of_the_full_grid():
    sample = suites.cases("resnet50_sample", OPS)
    full = set(suites.cases("resnet50", OPS))
    assert set(sample) <= full and len(sample) < len(full) / 10
    norm = [c for c in sample if c.op != "ws"]
    ws = [c for c in sample if c.op == "ws"]
    assert {c.op for c in sample} == set(OPS)
    assert {c.n for c in norm} == {2, 32} and {c.dtype for c in norm} == {"bfloat16"}
    assert {c.layout for c in norm} == {c.layout for c in ws} == set(suites.LAYOUTS)
    # the sample's grid (what autotune and host_bench see for it) holds every sampled case
    grid = set(suites.cases("resnet50", OPS, *suites.suite("resnet50_sample")[2:]))
    assert set(sample) <= grid


def test_narrowing_the_sample_keeps_the_cases_it_names():
    cases = suites.cases("resnet50_sample", ("bcn", "ws"), batch_sizes=[32], layouts=["channels_last"])
    assert cases and all(c.layout == "channels_last" for c in cases)
    assert all(c.n == 32 for c in cases if c.op == "bcn") and any(c.op == "ws" for c in cases)
    assert suites.cases("resnet50_sample", ("gn",), dtypes=["float32"]) == []


def parse(argv):
    return cli.build_parser().parse_args(["bench", *argv])


def test_which_suite_bench_runs():
    assert commands.bench_suite(parse([]), on_gpu=True) is None  # run_bench's default: resnet50_sample
    assert commands.bench_suite(parse(["--full"]), on_gpu=True) == "resnet50"
    assert commands.bench_suite(parse(["--batch-sizes", "8"]), on_gpu=True) == "resnet50"  # narrows the grid
    assert commands.bench_suite(parse(["--batch-sizes", "2"]), on_gpu=False) is None  # CPU: the cpu suite
    assert commands.bench_suite(parse(["--suite", "tiny", "--dtypes", "float32"]), on_gpu=True) == "tiny"
    for bad in (["--full", "--suite", "tiny"], ["--graph", "--timings", "eager"], ["--threads", "0"]):
        with pytest.raises(SystemExit):
            parse(bad)


def measured_plan(monkeypatch, suite, **kwargs):
    """{(op, provider, mode)} and the cases run_bench would measure for ``suite``,
    without measuring (measure_case recorded, not run)."""
    seen, cases = set(), []

    def record(case, provider_names, modes, timings, timer, device, num_groups=bench.NUM_GROUPS):
        cases.append(case)
        seen.update((case.op, p, m) for p in provider_names for m in modes)
        return []

    monkeypatch.setattr(bench, "measure_case", record)
    bench.run_bench(suite, timer=lambda fn: (1.0, 1.0, 1.0), out_dir=None, with_compiled=True, progress=False,
                    log=lambda *a: None, **kwargs)
    return seen, cases


def test_the_default_suite_measures_a_subset_of_what_full_measures(monkeypatch):
    sample, sample_cases = measured_plan(monkeypatch, bench.DEFAULT_GPU_SUITE)
    full, full_cases = measured_plan(monkeypatch, "resnet50", batch_sizes=[2, 32], dtypes=["bfloat16", "float32"])
    assert set(sample_cases) <= set(full_cases) and sample <= full
    # the sample: forward and forward+backward; compiled baselines on BCN and WS only
    assert {m for _, _, m in sample} == set(suites.SAMPLE_MODES) == {"fwd", "fwdbwd"}
    compiled = {(op, p) for op, p, _ in sample if p.startswith("compiled")}
    assert compiled == {("bcn", "compiled_bcn"), ("ws", "compiled_ws")}
    # --full (and any other suite) keeps every mode and every compiled baseline
    assert {m for _, _, m in full} == set(bench.MODES)
    assert ("bcn_estimate", "compiled_bcn", "bwd") in full and ("bcn", "compiled_bcn", "bwd") in full
    # --modes still chooses for the sample
    chosen, _ = measured_plan(monkeypatch, bench.DEFAULT_GPU_SUITE, modes=("bwd",))
    assert {m for _, _, m in chosen} == {"bwd"}


def test_the_default_suite_has_shorter_timer_budgets_than_the_full_grid():
    assert timing.bench_budget_ms(bench.DEFAULT_GPU_SUITE) == timing.SAMPLE_BUDGET_MS
    assert timing.bench_budget_ms("resnet50") == timing.GPU_BUDGET_MS == (25, 100)  # triton's, as before
    assert all(a < b for a, b in zip(timing.SAMPLE_BUDGET_MS, timing.GPU_BUDGET_MS))
    assert commands.bench_suite(parse(["--full"]), on_gpu=True) == "resnet50"


def planned_e2e_runs(options):
    """{(case, variant, mode, N)} run_e2e makes on a GPU with these options."""
    runs = set()
    for case in e2e.default_cases(True, detection_batch_sizes=options.get("detection_batch_sizes")):
        modes = e2e.case_graph_modes(case, True, options.get("graph_modes"))
        runs |= {(case.name, v, m, n) for v, m in e2e._runs(case, e2e.VARIANTS, modes, options["with_compiled"])
                 for n in case.batch_sizes}
    return runs


def test_the_default_e2e_runs_compile_nothing_and_full_runs_what_the_default_ran_before():
    default = commands.e2e_options(parse(["--e2e"]), on_gpu=True)
    full = commands.e2e_options(parse(["--full", "--e2e"]), on_gpu=True)
    assert default == {"with_compiled": False}
    ours, everything = planned_e2e_runs(default), planned_e2e_runs(full)
    assert ours < everything and not any(m == "compiled" for _, _, m, _ in ours)
    # the default: classification at N = 2 and 32 eager and graphed, detection at N = 2 eager
    variants = e2e.VARIANTS
    assert ours == ({("classification", v, m, n) for v in variants for m in e2e.GRAPH_MODES for n in (2, 32)}
                    | {("detection", v, "eager", 2) for v in variants})
    # --full: everything the default run did before it was trimmed (detection N = 1 and 2,
    # eager and graphed, and the compiled trunk of plain_bn and wsbcn_ws_bcn), and the
    # compiled classification steps
    before = ({("classification", v, m, n) for v in variants for m in e2e.GRAPH_MODES for n in (2, 32)}
              | {("detection", v, m, n) for v in variants for m in e2e.GRAPH_MODES for n in (1, 2)}
              | {("detection", v, "compiled", n) for v in e2e.COMPILED_VARIANTS for n in (1, 2)})
    assert everything == before | {("classification", v, "compiled", n) for v in e2e.COMPILED_VARIANTS
                                   for n in (2, 32)}
    # the compiled trunk on request, never with --no-compiled, never by --full on CPU (as before)
    assert commands.e2e_options(parse(["--e2e-compile"]), on_gpu=True) == {"with_compiled": True}
    assert commands.e2e_options(parse(["--full", "--e2e", "--no-compiled"]), on_gpu=True)["with_compiled"] is False
    assert commands.e2e_options(parse(["--full", "--e2e"]), on_gpu=False) == {"with_compiled": False}


def test_bench_passes_the_e2e_options_to_run_e2e(tmp_path, monkeypatch):
    seen, micro = [], []
    monkeypatch.setattr(e2e, "run_e2e", lambda **kwargs: seen.append(kwargs) or fake_e2e())
    monkeypatch.setattr(bench, "run_bench", lambda *a, **kw: micro.append(a) or pd.DataFrame(columns=COLUMNS))
    for argv in (["--e2e-only"], ["--e2e-compile"], ["--e2e-only", "--e2e-compile", "--no-compiled"], []):
        assert cli.main(["bench", *argv, "--out", str(tmp_path)]) == 0
    assert [kw["with_compiled"] for kw in seen] == [False, True, False]  # --e2e-compile implies --e2e
    assert len(micro) == 2  # --e2e-compile alone keeps the micro-benchmarks, as --e2e does


def test_bench_help_says_what_the_default_run_does(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for part in ("resnet50_sample", "modes fwd and fwdbwd", "no torch.compile of the networks", "detection at N = 1 and 2",
                 "--e2e-compile"):
        assert part in text, part


def test_unknown_or_impossible_timings_are_refused_before_anything_runs(tmp_path):
    with pytest.raises(ValueError, match="timings"):
        bench.run_bench("tiny", timings=("host",), timer=lambda fn: (1.0, 1.0, 1.0), out_dir=tmp_path,
                        progress=False, log=lambda *a: None)
    assert not any(tmp_path.iterdir())


class ScriptedTimer:
    """Runs each callable once and reports times from a fixed cycle, so that the
    speedups differ from case to case. (Made as bench_timer(suite) is.)"""

    def __init__(self, suite=None):
        self.times = iter([0.3, 1.7, 0.9, 2.3, 1.1, 0.5, 3.1] * 1000)

    def __call__(self, fn):
        fn()
        ms = next(self.times)
        return ms, ms * 0.9, ms * 1.1


def fake_e2e(**kwargs):
    rows = [dict(suite="e2e", op="resnet50_step", provider=p, variant="eager", mode="fwdbwd", dtype="float32",
                 layout="contiguous", N=2, C=math.nan, spatial="64x64", ms_p50=ms, ms_p20=ms, ms_p80=ms,
                 gbps=math.nan, pct_copy_bw=math.nan, peak_mem_mb=math.nan, launches=math.nan,
                 images_per_s=2 / (ms * 1e-3), device="cpu", torch="t", triton="t", commit="abc",
                 timestamp="2026-01-01T00:00:00Z")
            for p, ms in (("plain_bn", 90.0), ("wsbcn_ws_bcn", 230.0))]
    return pd.DataFrame(rows, columns=COLUMNS)


def test_cli_summary_matches_the_csv(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(timing, "bench_timer", ScriptedTimer)
    monkeypatch.setattr(e2e, "run_e2e", fake_e2e)
    out = tmp_path / "results"
    assert cli.main(["bench", "--suite", "tiny", "--ops", "bcn", "gn", "--modes", "fwd", "fwdbwd", "--e2e",
                     "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    path = next(out.glob("*/bench.csv"))
    assert str(path) in printed
    table = {}
    for op, mode, kind, baseline, value, cases in re.findall(
            r"^\| (\w+) \| (\w+) \| (\w+) \| (\w+) \| ([\d.]+)x \| (\d+) \|$", printed, flags=re.M):
        table[(op, mode, kind, baseline)] = (float(value), int(cases))
    # the reference: per case baseline time / wsbcn time, geometric mean with numpy
    frame = pd.read_csv(path)
    micro = frame[frame["op"].isin(OPS)]
    case = ["op", "mode", "dtype", "layout", "N", "C", "spatial"]
    ours = micro[micro["provider"] == "wsbcn"].set_index(case)["ms_p50"]
    expected = {}
    for (op, mode, provider), group in micro[micro["provider"] != "wsbcn"].groupby(["op", "mode", "provider"]):
        ratios = group.set_index(case)["ms_p50"] / ours
        ratios = ratios.dropna()
        expected[(op, mode, "eager", provider)] = (float(np.exp(np.log(ratios).mean())), len(ratios))
    assert table.keys() == expected.keys() and len(table) == 2 * 4  # bcn: 3 baselines, gn: 1; 2 modes
    for key, (value, cases) in table.items():
        assert cases == expected[key][1]
        assert value == pytest.approx(expected[key][0], abs=0.0051)
    images = re.findall(r"^\| resnet50_step \| 64x64 \| 2 \| (\w+) \| eager \| ([\d.]+) \|", printed, flags=re.M)
    e2e_rows = frame[frame["op"] == "resnet50_step"].set_index("provider")["images_per_s"]
    assert {p: float(v) for p, v in images} == pytest.approx(e2e_rows.round(1).to_dict())


def scripted_clock(durations):
    """A perf_counter that advances only inside the timed callable, by the next duration (s)."""
    state = SimpleNamespace(now=0.0, durations=iter(durations))

    def fn():
        state.now += next(state.durations)

    return fn, SimpleNamespace(perf_counter=lambda: state.now)


def test_cpu_timer_takes_the_median_of_round_medians_and_reports_the_spread(monkeypatch):
    rounds = [[1.0, 1.2, 0.8], [1.1, 0.9, 1.0], [40.0, 50.0, 45.0], [1.0, 1.3, 0.9], [0.9, 1.0, 1.1]]
    fn, clock = scripted_clock([0.005] + [ms * 1e-3 for r in rounds for ms in r])  # warm-up first
    monkeypatch.setattr(timing, "time", clock)
    p50, p20, p80 = timing.cpu_timer(fn, reps=3, min_seconds=0, rounds=len(rounds))
    calls = np.array([ms for r in rounds for ms in r])
    assert p50 == pytest.approx(np.median([np.median(r) for r in rounds]))  # one slow round does not move it
    assert (p20, p80) == pytest.approx(tuple(np.percentile(calls, [20, 80])))
    with pytest.raises(ValueError, match="rounds"):
        timing.cpu_timer(fn, rounds=0)


def test_bench_runs_cpu_single_threaded_by_default_and_restores_the_setting(tmp_path, monkeypatch):
    import torch

    seen = []
    monkeypatch.setattr(commands, "_bench_parts", lambda args: seen.append(torch.get_num_threads()) or 0)
    before = torch.get_num_threads()
    assert cli.main(["bench", "--out", str(tmp_path)]) == 0
    assert cli.main(["bench", "--threads", "2", "--out", str(tmp_path)]) == 0
    assert seen == ([1, 2] if not torch.cuda.is_available() else [before, 2])
    assert torch.get_num_threads() == before


def test_positive_int_names_the_bad_value():
    with pytest.raises(argparse.ArgumentTypeError, match="'-3'"):
        commands.positive_int("-3")
