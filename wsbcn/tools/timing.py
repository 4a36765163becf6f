"""Timers for tuning and benchmarks. Each takes a zero-argument callable and
returns (p50, p20, p80) in milliseconds. Tests inject their own."""
import statistics
import time

import torch


def gpu_timer(fn, warmup_ms: float = 25, rep_ms: float = 100):
    import triton.testing

    p50, p20, p80 = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    return p50, p20, p80


def cpu_timer(fn, reps: int = 5, min_seconds: float = 0.05):
    """Wall-clock quantiles over a few repeats, after one warm-up call."""
    fn()
    samples = []
    start = time.perf_counter()
    while len(samples) < reps or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
        if len(samples) >= 200:
            break
    q = statistics.quantiles(samples, n=10) if len(samples) > 1 else samples * 9
    return statistics.median(samples), q[1], q[7]


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


def default_timer():
    return gpu_timer if torch.cuda.is_available() else cpu_timer
