"""The benchmark timers (wsbcn/tools/timing.py): the CPU timer's statistics on a
scripted clock, and which budgets each suite gets. No timing is asserted."""
from types import SimpleNamespace

import numpy as np
import pytest

from wsbcn.tools import bench, timing


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


def test_the_default_suite_has_shorter_timer_budgets_than_the_full_grid():
    sample, full = timing.bench_budget_ms(bench.DEFAULT_GPU_SUITE), timing.bench_budget_ms("resnet50")
    assert sample == timing.SAMPLE_BUDGET_MS and full == timing.GPU_BUDGET_MS
    assert all(0 < a < b for a, b in zip(sample, full))
