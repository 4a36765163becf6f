"""DistNormPlan's direct launches (kernels/norm_plan.py, kernels/launch.py), over the
stub CUDA driver in a subprocess (this process runs triton's interpreter: conftest),
with a gloo group of one process: the Triton path across processes runs, nothing
executes. As test_launch_plans does for NormPlan, it checks that
- a signature's first call compiles through ``kernel[grid]`` (5 launches forward, 4
  backward) and repeat calls launch the same kernels directly;
- the values handed to triton's launcher directly are those ``kernel[grid]`` hands it,
  on both sides of each collective.
The numbers themselves are the interpreter's job (test_distributed.py), where every
launch goes through ``kernel[grid]``.
"""
import json
import os
import socket
import subprocess
import sys

CHECK = r"""
import json, sys
import torch
import torch.distributed as dist
import stub_launches
import wsbcn
from wsbcn import backends
from wsbcn.kernels import launch
from wsbcn.ops import collectives, norm
from wsbcn.tools import stub_driver

stub_driver.install()
backends.emulate_gpu(stub_driver.GPU_NAME, stub_driver.SM_COUNT)
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{sys.argv[1]}", rank=0, world_size=1)
group = dist.new_group()
seen = []
stub_launches.record(seen)
out = {}

def counts():
    return dict(launch.stats)

torch.manual_seed(0)
x = torch.randn(2, 64, 6, 6, dtype=torch.bfloat16, requires_grad=True)
layer = wsbcn.BatchChannelNorm2d(64, 8, process_group=group)

for name in ("first", "repeat"):
    c0 = counts()
    y = layer(x)
    c1 = counts()
    torch.autograd.grad(y, [x], torch.ones_like(y))
    c2 = counts()
    out[name + " fwd"] = [c1["jit"] - c0["jit"], c1["direct"] - c0["direct"]]
    out[name + " bwd"] = [c2["jit"] - c1["jit"], c2["direct"] - c1["direct"]]

call = next(c for c in norm._cache.calls.values() if c.group is not None)
dplan = next(p for k, p in call.plans.items() if k[0] == "dist")
plan = dplan.plan
params = [layer.weight, layer.bias, layer.group_weight, layer.group_bias]
xd = x.detach()
buffers = (layer.running_mean, layer.running_var, layer.num_batches_tracked)


def gather(row):
    return collectives.gather_rows(row, call.group, False)


def all_reduce(sums):
    return collectives.all_reduce_rows(sums, call.group)


def both_paths(run, launches):
    # one call direct, one through kernel[grid] (the compiled kernels dropped)
    seen.clear()
    result = run()
    direct = list(seen)
    stored = [l.compiled for l in launches]
    for l in launches:
        l.compiled = l.launcher = None
    seen.clear()
    run()
    jitted = list(seen)
    addresses = lambda a: [v for v in a if not (isinstance(v, int) and v > 1 << 20)]
    x_ptr = xd.data_ptr()
    return result, dict(
        launches=len(direct),
        same_kernels=[d[0] for d in direct] == [j[0] for j in jitted],
        same_as_stored=[l.compiled for l in launches] == stored,
        same_grids_and_counts=[(h, g, len(a)) for h, g, a in direct] == [(h, g, len(a)) for h, g, a in jitted],
        same_integers_and_constexprs=all(addresses(d[2]) == addresses(j[2]) for d, j in zip(direct, jitted)),
        x_at_same_positions=all([i for i, v in enumerate(d[2]) if v == x_ptr] == [i for i, v in enumerate(j[2]) if v == x_ptr]
                                for d, j in zip(direct, jitted)))


(y, side), out["forward"] = both_paths(
    lambda: dplan.forward(xd, *params, *buffers, gather), plan.fwd[:1] + dplan.fwd_local + dplan.fwd_merge + plan.fwd[2:])
dy = torch.ones_like(y)
reduce_, _, apply_ = plan._backward_plan(dy).launches
local, merged, _ = dplan.bwd
_, out["backward"] = both_paths(lambda: dplan.backward(dy, xd, side, *params, all_reduce),
                                [reduce_] + local + merged + [apply_])
dist.destroy_process_group()
print("RESULT" + json.dumps(out))
"""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dist_plan_direct_launches_are_the_jit_launches():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "WSBCN_BACKEND")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (os.path.dirname(__file__), env.get("PYTHONPATH"))))
    proc = subprocess.run([sys.executable, "-c", CHECK, str(_free_port())], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert out["first fwd"] == [5, 0] and out["first bwd"] == [4, 0]  # compiled through kernel[grid]
    assert out["repeat fwd"] == [0, 5] and out["repeat bwd"] == [0, 4]  # the cached kernels, launched directly
    for name in ("forward", "backward"):
        check = out[name]
        assert check.pop("launches") == (5 if name == "forward" else 4), name
        assert all(check.values()), (name, check)
