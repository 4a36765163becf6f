"""Where an eager BCN call's host time goes, against triton's own launcher, over the stub
CUDA driver (no GPU; nothing executes). Interleaved rounds in one process; medians.

    python perf/wsbcn_dev/host_breakdown.py [--rounds 25] [--calls 100]

Cases, (2, 256, 14, 14) bf16, BN-stage parameters in bf16, training with batch
statistics, gradients of x only:
- the module, fwd, fwd+bwd and fwd under no_grad; each inner room of its forward, down
  to the plan;
- FLOOR: a minimal autograd Function that saves its inputs, allocates its output and
  makes the call's launches (3, or 3 + 3) of an empty kernel through triton's cached
  launcher, ``CompiledKernel.run`` (the floor of issue 22; ``wsbcn bench --host``
  times a leaner one, through the C launch wsbcn itself uses).
Works on any wsbcn commit that has ``backend(s).emulate_gpu`` (run it with that
checkout installed); the rooms below the module are skipped where they do not exist.
"""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from wsbcn_dev import GPU_NAME, SM_COUNT, stub_driver  # noqa: E402

stub_driver.install()
import wsbcn  # noqa: E402

try:
    from wsbcn import backends
except ImportError:  # before the redesign
    from wsbcn import backend as backends
backends.emulate_gpu(GPU_NAME, SM_COUNT)


@triton.jit
def _empty(X, Y, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(Y + i, tl.load(X + i, mask=i < n), mask=i < n)


_small = torch.empty(16)
_ck = _empty[(1,)](_small, torch.empty(16), 16, BLOCK=16)


# the launcher's arguments: triton 3.6's take the constexprs too (BLOCK); 3.7 and 3.8 read them by the
# kernel's signature, so one more at the end is harmless there; 3.9 is handed none
_TAIL = (16,) if tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 9) else ()


def _launch(a, b):
    _ck.run(1, 1, 1, 0, _ck.function, _ck.packed_metadata, None, None, None, a.data_ptr(), b.data_ptr(), 16, *_TAIL)


class Floor(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, launches):
        y = torch.empty_like(x)
        for _ in range(launches):
            _launch(x, y)
        ctx.save_for_backward(x, w)
        ctx.launches = launches
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        dx = torch.empty_like(x)
        for _ in range(ctx.launches):
            _launch(x, dx)
        return dx, torch.empty_like(w), None


def cases():
    x = torch.randn(2, 256, 14, 14, dtype=torch.bfloat16)
    xg, dy = x.clone().requires_grad_(True), torch.randn_like(x)
    m = wsbcn.BatchChannelNorm2d(256, 32).to(torch.bfloat16).train()
    w = torch.ones(256, dtype=torch.bfloat16, requires_grad=True)
    def no_grad():
        with torch.no_grad():
            return m(x)

    out = {"module fwd": lambda: m(x), "module fwd+bwd": lambda: torch.autograd.grad(m(xg), [xg], dy),
           "module fwd under no_grad": no_grad,
           "floor fwd (3)": lambda: Floor.apply(x, w, 3),
           "floor fwd+bwd (3+3)": lambda: torch.autograd.grad(Floor.apply(xg, w, 3), [xg], dy)}
    for _ in range(5):
        [f() for f in out.values()]
    try:  # the rooms of the current layout: the validated call, its body, the plan
        from wsbcn.ops import norm
    except ImportError:
        return out
    calls = norm._cache.calls if hasattr(norm, "_cache") else norm._calls  # (before 2026-12-06: a dict of its own)
    call = next(c for c in calls.values() if c.plans)
    plan = next(iter(call.plans.values()))
    p, b = m._parameters, m._buffers
    args = (x, p["weight"], p["bias"], p["group_weight"], p["group_bias"], b["running_mean"], b["running_var"],
            b["num_batches_tracked"])
    enter = getattr(call, "call_plain", call)  # what a recalled call enters (before ddffb4a: the call itself)
    out.update({"fwd: autograd Function + below": lambda: enter(*args),
                "fwd: op body + below": lambda: call.forward(*args),
                "fwd: launch plan (3 launches)": lambda: plan.forward(*args)})
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--calls", type=int, default=100)
    args = parser.parse_args(argv)
    runs = cases()
    times = {k: [] for k in runs}
    for _ in range(args.rounds):
        for name, fn in runs.items():
            start = time.thread_time_ns()
            for _ in range(args.calls):
                fn()
            times[name].append((time.thread_time_ns() - start) / args.calls / 1e3)
    for name, ts in times.items():
        floor = times["floor fwd+bwd (3+3)" if "bwd" in name else "floor fwd (3)"]
        ratio = statistics.median(t / f for t, f in zip(ts, floor))
        print(f"{name:32s} {statistics.median(ts):7.1f} us   x{ratio:.2f} of its floor")


if __name__ == "__main__":
    main()
