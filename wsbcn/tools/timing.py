"""Timers for tuning and benchmarks. Each takes a zero-argument callable and
returns (p50, p20, p80) in milliseconds. Tests inject their own."""
import functools
import statistics
import time

import torch

# The CPU benchmark's repeats: rounds of at least CPU_ROUND_CALLS calls and
# CPU_ROUND_SECONDS each. A round's median is its time; p50 is the median of the
# rounds, so one round slowed down by another process on the same cores does not
# move it. Chosen by measuring the run-to-run spread on a shared 2-core machine
# (README, "How noisy CPU figures are").
CPU_ROUNDS = 7
CPU_ROUND_CALLS = 3
CPU_ROUND_SECONDS = 0.01


# gpu_timer's budgets in ms of warm-up and of timed calls (triton's do_bench adds a
# first call and 5 calls that size them; each sizing and timed call follows a 256 MiB
# cache clear). GPU_BUDGET_MS: triton's defaults, for the full grid, autotune and the
# end-to-end steps. SAMPLE_BUDGET_MS: the default GPU suite (resnet50_sample). Its
# calls take at most 1.55 ms in the H100 rows, so a timer call costs about its budgets:
# the 280 timer calls the sample made in all three modes came to ~33 s at 25 + 100 ms
# and come to ~14 s at 10 + 40 ms, which still times >= 24 calls after >= 6 warm-up
# ones at 1.55 ms.
GPU_BUDGET_MS = (25, 100)
SAMPLE_BUDGET_MS = (10, 40)


def gpu_timer(fn, warmup_ms: float = GPU_BUDGET_MS[0], rep_ms: float = GPU_BUDGET_MS[1]):
    import triton.testing

    p50, p20, p80 = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    return p50, p20, p80


def cpu_timer(fn, reps: int = 5, min_seconds: float = 0.05, rounds: int = 1):
    """Wall-clock times after one warm-up call, in ``rounds`` rounds of at least
    ``reps`` calls and ``min_seconds`` each (at most 200 calls a round).

    p50 is the median of the rounds' medians (with one round: the median call);
    p20 and p80 are the 20th and 80th percentiles of all calls, the spread a
    reader of the CSV sees."""
    if rounds < 1 or reps < 1:
        raise ValueError(f"rounds and reps must be at least 1, got rounds={rounds}, reps={reps}")
    fn()
    medians, samples = [], []
    for _ in range(rounds):
        times = []
        start = time.perf_counter()
        while len(times) < reps or (time.perf_counter() - start < min_seconds and len(times) < 200):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        medians.append(statistics.median(times))
        samples += times
    q = statistics.quantiles(samples, n=10, method="inclusive") if len(samples) > 1 else samples * 9
    return statistics.median(medians), q[1], q[7]


def cuda_graphed(fn, warmup: int = 3):
    """Capture ``fn`` in a CUDA graph after a few warm-up runs on a side stream;
    returns the replay. Timing replays leaves out the host: Python, dispatch and
    launch overhead, which decide eager speed at micro-batch sizes."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def cpu_bench_timer():
    """The CPU timer ``wsbcn bench`` uses: several rounds (see CPU_ROUNDS)."""
    return functools.partial(cpu_timer, reps=CPU_ROUND_CALLS, min_seconds=CPU_ROUND_SECONDS, rounds=CPU_ROUNDS)


def default_timer():
    """gpu_timer on a GPU; on CPU the plain one-round cpu_timer (autotune on CPU only
    exercises its flow through the interpreter, where every call is slow)."""
    return gpu_timer if torch.cuda.is_available() else cpu_timer


def bench_budget_ms(suite: str = None) -> tuple:
    """(warm-up, timed) ms that gpu_timer gets in ``wsbcn bench`` for ``suite``:
    SAMPLE_BUDGET_MS for the default GPU suite, resnet50_sample; else GPU_BUDGET_MS."""
    return SAMPLE_BUDGET_MS if suite == "resnet50_sample" else GPU_BUDGET_MS


def bench_timer(suite: str = None):
    """The timer ``wsbcn bench`` uses for ``suite``: gpu_timer with
    ``bench_budget_ms(suite)`` on a GPU, cpu_bench_timer on CPU."""
    if not torch.cuda.is_available():
        return cpu_bench_timer()
    warmup_ms, rep_ms = bench_budget_ms(suite)
    return functools.partial(gpu_timer, warmup_ms=warmup_ms, rep_ms=rep_ms)
