"""Where the host time of one eager wsbcn call goes (a lent-GPU diagnostic).

At micro-batch sizes a BCN layer moves well under a megabyte, so eager speed is
decided on the host: Python, dispatch and kernel launches. This times one eager
call of BCN forward, BCN forward+backward and WS forward+backward against the
same call replayed from a CUDA graph (device time only), then profiles the eager
forward+backward with cProfile (top functions by own time).

    python perf/tools/host_overhead.py [--c 256] [--hw 14] [--n 2]
"""
import argparse
import cProfile
import pstats
import time

import torch

from wsbcn.functional import batch_channel_norm, weight_standardize
from wsbcn.tools.timing import cuda_graphed


def host_us(fn, reps=300):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps * 1e6


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=2)
    p.add_argument("--c", type=int, default=256)
    p.add_argument("--hw", type=int, default=14)
    a = p.parse_args()
    f32 = dict(device="cuda", dtype=torch.float32)
    c = a.c
    x = torch.randn(a.n, c, a.hw, a.hw, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    params = [torch.ones(c, **f32, requires_grad=True), torch.zeros(c, **f32, requires_grad=True),
              torch.ones(1, 32, 1, **f32, requires_grad=True), torch.zeros(1, 32, 1, **f32, requires_grad=True)]
    rm, rv = torch.zeros(c, **f32), torch.ones(c, **f32)
    nbt = torch.zeros((), dtype=torch.long, device="cuda")
    w = torch.randn(c, c, 3, 3, **f32, requires_grad=True)

    def bcn():
        return batch_channel_norm(x, 32, rm, rv, *params, training=True, num_batches_tracked=nbt)

    grad = torch.randn_like(bcn())
    cases = {
        "bcn fwd": bcn,
        "bcn fwd+bwd": lambda: torch.autograd.grad(bcn(), [x] + params, grad),
        "ws fwd+bwd": lambda: torch.autograd.grad(weight_standardize(w, 1e-5, 1, "std"), [w], torch.ones_like(w)),
        "empty torch op": lambda: torch.add(rm, 1.0),
    }
    print(f"{torch.cuda.get_device_name()}, N={a.n} C={c} {a.hw}x{a.hw} bf16")
    for name, fn in cases.items():
        eager = host_us(fn)
        graphed = host_us(cuda_graphed(fn))
        print(f"{name:>16}: eager {eager:8.1f} us/call, graph replay {graphed:8.1f} us/call")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(200):
        cases["bcn fwd+bwd"]()
    torch.cuda.synchronize()
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(22)


if __name__ == "__main__":
    main()
