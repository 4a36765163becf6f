"""``wsbcn bench``'s measurements (wsbcn/tools/bench.py): what the default suite
measures against the full grid, the rows it writes, and that timing never advances
running statistics. The tiny suite with injected timers: no timing is asserted."""
import pandas as pd
import pytest
import torch

from conftest import DEVICE
from wsbcn.tools import bench, suites


class CountingTimer:
    """Runs the callable for real (so every provider runs) and reports a fixed time."""

    def __init__(self):
        self.calls = 0

    def __call__(self, fn):
        fn()
        self.calls += 1
        return 1.0, 0.9, 1.1


QUIET = dict(progress=False, log=lambda *a: None)


def measured_plan(monkeypatch, suite, **kwargs):
    """{(op, provider, mode)} and the cases run_bench would measure for ``suite``,
    without measuring (measure_case recorded, not run)."""
    seen, cases = set(), []

    def record(case, provider_names, modes, timings, timer, device, num_groups=bench.NUM_GROUPS):
        cases.append(case)
        seen.update((case.op, p, m) for p in provider_names for m in modes)
        return []

    monkeypatch.setattr(bench, "measure_case", record)
    bench.run_bench(suite, timer=lambda fn: (1.0, 1.0, 1.0), out_dir=None, with_compiled=True, **QUIET, **kwargs)
    return seen, cases


def test_the_default_suite_measures_a_subset_of_what_full_measures(monkeypatch):
    sample, sample_cases = measured_plan(monkeypatch, bench.DEFAULT_GPU_SUITE)
    full, full_cases = measured_plan(monkeypatch, "resnet50", batch_sizes=[2, 32], dtypes=["bfloat16", "float32"])
    assert set(sample_cases) <= set(full_cases) and sample <= full
    # the sample: its own modes, wsbcn in each on every op, compiled baselines on its compiled ops only
    modes = suites.default_modes(bench.DEFAULT_GPU_SUITE, bench.MODES)
    assert set(modes) < set(bench.MODES) and {m for _, _, m in sample} == set(modes)
    assert {(op, m) for op, p, m in sample if p == "wsbcn"} == {(op, m) for op in bench.OPS for m in modes}
    compiled_ops = suites.compiled_ops(bench.DEFAULT_GPU_SUITE, bench.OPS)
    assert compiled_ops and {op for op, p, _ in sample if p.startswith("compiled")} == set(compiled_ops)
    # --full keeps every mode of every provider of every op, compiled baselines included
    assert full == {(c.op, p, m) for c in full_cases for p in bench.providers(c.op, True) for m in bench.MODES}
    # --modes still chooses for the sample
    chosen, _ = measured_plan(monkeypatch, bench.DEFAULT_GPU_SUITE, modes=("bwd",))
    assert {m for _, _, m in chosen} == {"bwd"}


def test_unknown_or_impossible_timings_are_refused_before_anything_runs(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="timings"):
        bench.run_bench("tiny", timings=("host",), timer=CountingTimer(), out_dir=tmp_path, **QUIET)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA device"):
        bench.run_bench("tiny", ops=("bcn",), timer=CountingTimer(), out_dir=tmp_path, graph=True, **QUIET)
    assert not any(tmp_path.iterdir())


def test_bench_rows_columns_and_upsert(tmp_path):
    timer = CountingTimer()
    frame = bench.run_bench("tiny", ops=("bcn", "ws"), modes=("fwd", "bwd"), timer=timer, out_dir=tmp_path,
                            with_compiled=False, **QUIET)
    assert list(frame.columns) == bench.COLUMNS
    # on CPU the vendor baselines are torch's own kernels, named for what runs
    expected = {"wsbcn", "reference_bcn", "reference_ws", *bench.BASELINES[DEVICE].values()}
    assert expected <= set(frame["provider"])
    assert (frame["gbps"] > 0).all() and (frame["pct_copy_bw"] > 0).all()
    path = next(tmp_path.glob("*/bench.csv"))
    first = pd.read_csv(path)
    bench.run_bench("tiny", ops=("bcn",), modes=("fwd",), timer=timer, out_dir=tmp_path, with_compiled=False,
                    **QUIET)
    second = pd.read_csv(path)
    assert len(second) == len(first)  # same cases replaced, not appended
    assert list(second.columns) == bench.COLUMNS


def test_bench_never_advances_running_statistics():
    inp = bench.NormInputs(2, 8, 3, 3, torch.float32, "contiguous", "cpu", 4)
    before = [b.clone() for b in inp.buffers()]
    forward, leaves = bench.norm_fn("bcn", "wsbcn", inp)
    bench.measure(bench.timed_callable(forward, leaves, "fwdbwd"), CountingTimer(), inp.restore)
    for b, s in zip(inp.buffers(), before):
        assert torch.equal(b, s)


def test_a_time_budget_stops_after_the_running_case_and_narrowing_applies(tmp_path):
    lines = []
    frame = bench.run_bench("tiny", ops=("gn",), modes=("fwd",), timer=CountingTimer(), out_dir=None,
                            with_compiled=False, progress=False, log=lines.append, layouts=["contiguous"],
                            max_minutes=0)
    assert frame.empty and any("stopped after" in line for line in lines)
    frame = bench.run_bench("tiny", ops=("gn",), modes=("fwd",), timer=CountingTimer(), out_dir=None,
                            with_compiled=False, layouts=["contiguous"], **QUIET)
    cases = suites.cases("tiny", ("gn",), layouts=["contiguous"])
    assert set(frame["layout"]) == {"contiguous"} and len(frame) == len(cases) * len(bench.providers("gn", False))
