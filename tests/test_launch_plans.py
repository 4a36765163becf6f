"""The eager launch path (kernels/launch.py): launch plans and direct launches.

After a plan's first launch through ``kernel[grid]``, later calls hand their
arguments straight to the cached CompiledKernel. That is only right when triton
would pick that very kernel: these tests run the real JIT path over the stub CUDA
driver (wsbcn.tools.stub_driver; nothing executes) in a subprocess, because this
process runs triton's interpreter (conftest), and check that
- the kernel a plan launches directly is the one ``kernel[grid]`` returns for the
  same arguments;
- a call with a misaligned pointer, or another shape, goes through ``kernel[grid]``
  again (triton specialises on 16-byte alignment and on the integers);
- the values handed to the launcher directly are those triton's own path hands it.
Correctness of the numbers is the interpreter's job (test_bcn, test_ws, ...), where
every call goes through ``kernel[grid]`` and the same plans.
"""
import json
import os
import subprocess
import sys

import torch

import wsbcn
from wsbcn import checks, tuning
from wsbcn.ops import norm
from wsbcn.functional import batch_channel_norm
from conftest import DEVICE, rel_err

CHECK_DIRECT_LAUNCHES = r"""
import json
import torch
import stub_launches
from wsbcn import backends
from wsbcn.ops import norm, ws
from wsbcn.functional import batch_channel_norm, group_norm, weight_standardize
from wsbcn.kernels import launch
from wsbcn.tools import stub_driver

stub_driver.install()
backends.emulate_gpu(stub_driver.GPU_NAME, stub_driver.SM_COUNT)
out = {}

seen = []  # every launch: (kernel hash, grid, arguments), tensors as addresses (stub_launches.py)
stub_launches.record(seen)


def bcn(x, params, nbt):
    return batch_channel_norm(x, 8, *params[:2], *params[2:], training=True, num_batches_tracked=nbt)


torch.manual_seed(0)
f32 = dict(dtype=torch.float32)
params = [torch.zeros(64), torch.ones(64), torch.ones(64, **f32), torch.zeros(64, **f32),
          torch.ones(1, 8, 1, **f32), torch.zeros(1, 8, 1, **f32)]
nbt = torch.zeros((), dtype=torch.long)
storage = torch.randn(2 * 64 * 6 * 6 + 1, dtype=torch.bfloat16)
x = storage[:-1].view(2, 64, 6, 6)               # 16-byte aligned
x_off = storage[1:].view(2, 64, 6, 6)            # same shape and strides, 2 bytes off

def counts():
    return dict(launch.stats)

c0 = counts(); bcn(x, params, nbt); c1 = counts()
out["first call"] = [c1["jit"] - c0["jit"], c1["direct"] - c0["direct"]]
first_kernels = [h for h, _, _ in seen]
bcn(x, params, nbt); c2 = counts()
out["repeat call"] = [c2["jit"] - c1["jit"], c2["direct"] - c1["direct"]]
# a launch hook (a profiler) must see every launch: while one is set, calls go through
# kernel[grid] (triton 3.9 chains hooks, 3.6 holds one callable)
from triton import knobs
hooked = []
chain = knobs.runtime.launch_enter_hook
if hasattr(chain, "add"):
    chain.add(hooked.append)
else:
    knobs.runtime.launch_enter_hook = hooked.append
bcn(x, params, nbt); c_hook = counts()
if hasattr(chain, "remove"):
    chain.remove(hooked.append)
else:
    knobs.runtime.launch_enter_hook = None
out["call under a launch hook"] = [c_hook["jit"] - c2["jit"], c_hook["direct"] - c2["direct"], len(hooked)]
bcn(x, params, nbt); c2 = counts()
out["repeat call after the hook"] = [c2["jit"] - c_hook["jit"], c2["direct"] - c_hook["direct"]]
seen.clear()
bcn(x_off, params, nbt); c3 = counts()
misaligned_kernels = [h for h, _, _ in seen]
out["misaligned call"] = [c3["jit"] - c2["jit"], c3["direct"] - c2["direct"]]
x_big = torch.randn(2, 64, 7, 7, dtype=torch.bfloat16)
bcn(x_big, params, nbt); c4 = counts()
out["other shape"] = [c4["jit"] - c3["jit"], c4["direct"] - c3["direct"]]
# x's signature again, with bf16 parameters and buffers: triton specialises on each
# pointer's dtype, so these are other kernels, never the fp32 ones launched directly
seen.clear()
bcn(x, [p.to(torch.bfloat16) for p in params], nbt); c5 = counts()
out["bf16 parameters"] = [c5["jit"] - c4["jit"], c5["direct"] - c4["direct"]]
out["bf16 parameters' kernels differ"] = [a != b for a, (b, _, _) in zip(first_kernels, seen)]
# bf16 parameters, forward and backward: the backward writes their gradients in bf16,
# launched directly from the second step on
xg = x.detach().requires_grad_(True)
p16 = [p.to(torch.bfloat16) for p in params[:2]] + [p.to(torch.bfloat16).requires_grad_(True) for p in params[2:]]
def step16():
    y = bcn(xg, p16, nbt)
    return torch.autograd.grad(y, [xg] + p16[2:], torch.ones_like(y))
step16(); c0 = counts(); g16 = step16(); c1 = counts()
out["bf16 parameters fwd+bwd repeat"] = [c1["jit"] - c0["jit"], c1["direct"] - c0["direct"]]
out["bf16 parameter gradients"] = sorted({str(g.dtype) for g in g16[1:]})
# GroupNorm: its affine in fp32, then in bf16 (as a model cast to bf16 has it)
gn_counts = []
for dtype in (torch.float32, torch.float32, torch.bfloat16):
    c0 = counts(); group_norm(x, 8, torch.ones(64, dtype=dtype), torch.zeros(64, dtype=dtype)); c1 = counts()
    gn_counts.append([c1["jit"] - c0["jit"], c1["direct"] - c0["direct"]])
out["group norm fp32, fp32, bf16 affine"] = gn_counts

# The plan's kernels are the ones kernel[grid] returns for the same (aligned) arguments,
# and the misaligned call compiled other ones (triton's specialisation differs).
call = next(c for k, c in norm._cache.calls.items() if k[2] == x.shape)
plan = next(iter(call.plans.values()))
side = torch.empty(plan.fwd_size)
views = [side[o:o + 1] for o in plan.fwd_offsets]
# x is an argument of the statistics and apply kernels, not of the combine
out["misaligned kernels differ"] = [a != b for a, b in zip(first_kernels, misaligned_kernels)]

# Same values to the launcher on both paths: one call direct, one through kernel[grid]
# (the plan's compiled kernels dropped), with the same output and side buffers.
y = torch.empty_like(x)
seen.clear()
plan.forward(x, *params[2:], params[0], params[1], nbt, y=y)
direct = list(seen)
saved = [(l.compiled, l.device) for l in plan.fwd]
for l in plan.fwd:
    l.compiled = l.launcher = None
seen.clear()
plan.forward(x, *params[2:], params[0], params[1], nbt, y=y)
jitted = list(seen)
out["same kernels both paths"] = [d[0] for d in direct] == [j[0] for j in jitted]
out["same kernels as stored"] = [l.compiled for l in plan.fwd] == [s for s, _ in saved]
# the side buffers are fresh per call: compare every value but the addresses
out["same grids and argument counts"] = [(h, g, len(a)) for h, g, a in direct] == [(h, g, len(a)) for h, g, a in jitted]
same_fixed = all(
    [v for v in d[2] if not (isinstance(v, int) and v > 1 << 20)] == [v for v in j[2] if not (isinstance(v, int) and v > 1 << 20)]
    for d, j in zip(direct, jitted))
out["same integers and constexprs"] = same_fixed
x_ptr, y_ptr = x.data_ptr(), y.data_ptr()
out["x and y at the same positions"] = all(
    [i for i, v in enumerate(d[2]) if v in (x_ptr, y_ptr)] == [i for i, v in enumerate(j[2]) if v in (x_ptr, y_ptr)]
    for d, j in zip(direct, jitted))

# The same with the buffers the plan allocates itself: the partial sums in y (forward)
# and dx (backward), the coefficients in the side buffer, a gradient per parameter.
# Each address is named by the tensor whose storage holds it, and its byte offset.
def named(calls, bases):
    rows = []
    for h, g, args in calls:
        row = []
        for v in args:
            hit = v
            if isinstance(v, int) and v > 1 << 20:
                for name, t in bases.items():
                    start = t.untyped_storage().data_ptr()
                    if start <= v < start + t.untyped_storage().nbytes():
                        hit = (name, v - start)
                        break
            row.append(hit)
        rows.append((h, g, row))
    return rows


def both_paths(run, launches, names):
    seen.clear()
    first = run()
    direct = named(list(seen), names(first))
    for l in launches:
        l.compiled = l.launcher = None
    seen.clear()
    second = run()
    jitted = named(list(seen), names(second))
    return direct, jitted, first


fwd_names = lambda r: dict(x=x, y=r[0], side=r[1], **dict(zip("abcdef", params)))
plan.forward(x, *params[2:], params[0], params[1], nbt)
direct, jitted, (y_own, side_own) = both_paths(lambda: plan.forward(x, *params[2:], params[0], params[1], nbt),
                                               plan.fwd, fwd_names)
out["own buffers forward: same named arguments"] = direct == jitted
out["own buffers forward: partial sums in y"] = plan.part_in_y and ("y", 0) in direct[0][2]
dy = torch.randn_like(y_own)
bwd_args = (dy, x, side_own, params[2], params[3], params[4], params[5])
bwd_names = lambda r: dict(x=x, dy=dy, side=side_own, dx=r[0], **dict(zip(("dg", "db", "do", "de"), r[1:])),
                           **dict(zip("abcdef", params)))
plan.backward(*bwd_args)
backward_plan = plan._backward_plan(dy)
direct, jitted, grads = both_paths(lambda: plan.backward(*bwd_args), backward_plan.launches, bwd_names)
out["own buffers backward: same named arguments"] = direct == jitted
out["own buffers backward: partial sums in dx"] = backward_plan.part_in_dx and ("dx", 0) in direct[0][2]
out["own buffers backward: gradients like the parameters"] = [
    (g.shape == p.shape, g.dtype == p.dtype) for g, p in zip(grads[1:], params[2:])]

# WS: one launch each way, direct on repeat
w = torch.randn(16, 8, 3, 3, requires_grad=True)
c0 = counts()
for _ in range(3):
    torch.autograd.grad(weight_standardize(w), [w], torch.ones(16, 8, 3, 3))
c1 = counts()
out["ws three fwd+bwd"] = [c1["jit"] - c0["jit"], c1["direct"] - c0["direct"]]
print("RESULT" + json.dumps(out))
"""


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "WSBCN_BACKEND")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (os.path.dirname(__file__), env.get("PYTHONPATH"))))
    return env


def test_direct_launches_are_the_jit_launches_and_fall_back_when_specialisation_differs():
    proc = subprocess.run([sys.executable, "-c", CHECK_DIRECT_LAUNCHES], env=_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert out["first call"] == [3, 0]  # compiles through kernel[grid]
    assert out["repeat call"] == [0, 3]  # the cached kernels, launched directly
    assert out["call under a launch hook"] == [3, 0, 3]  # the hook sees each launch
    assert out["repeat call after the hook"] == [0, 3]
    assert out["misaligned call"] == [3, 0]  # x 2 bytes off: triton's specialisation differs
    assert out["other shape"] == [3, 0]  # a new plan
    assert out["bf16 parameters"] == [3, 0]  # the parameters' dtypes are part of the plan
    assert out["bf16 parameters' kernels differ"] == [True, True, True]
    assert out["group norm fp32, fp32, bf16 affine"] == [[3, 0], [0, 3], [3, 0]]
    assert out["bf16 parameters fwd+bwd repeat"] == [0, 6]
    assert out["bf16 parameter gradients"] == ["torch.bfloat16"]
    assert out["misaligned kernels differ"] == [True, False, True]
    assert out["same kernels both paths"] and out["same kernels as stored"]
    assert out["same grids and argument counts"]
    assert out["same integers and constexprs"]
    assert out["x and y at the same positions"]
    assert out["own buffers forward: same named arguments"] and out["own buffers forward: partial sums in y"]
    assert out["own buffers backward: same named arguments"] and out["own buffers backward: partial sums in dx"]
    assert out["own buffers backward: gradients like the parameters"] == [[True, True]] * 4
    assert out["ws three fwd+bwd"] == [2, 4]


def test_plans_follow_the_config_function_and_the_tuned_tables(monkeypatch):
    """A plan is rebuilt when the config it was built from could differ: another
    config function (tests lay plans over it) or reloaded tuned tables."""
    monkeypatch.setenv("WSBCN_BACKEND", "triton")
    monkeypatch.setattr(norm, "_cache", checks.CallCache())  # the one GroupNorm call below, not an earlier test's
    torch.manual_seed(1)
    x = torch.randn(2, 16, 5, 5, device=DEVICE)
    m = wsbcn.GroupNorm(4, 16).to(DEVICE)
    y0 = m(x)
    call = next(c for k, c in norm._cache.calls.items() if k[0] == "gn" and k[2] == x.shape)
    plans_before = set(map(id, call.plans.values()))
    tuning.forget_loaded_tables()
    y1 = m(x)
    assert set(map(id, call.plans.values())) - plans_before
    heuristic = tuning.config_for
    monkeypatch.setattr(tuning, "config_for",
                        lambda kernel, *a, **k: dict(heuristic(kernel, *a, **k), BLOCK_C=1, num_warps=1))
    y2 = m(x)
    newest = list(call.plans.values())[-1]
    assert newest.config_bwd["BLOCK_C"] == 1
    ref = torch.nn.functional.group_norm(x.double(), 4, m.weight.double(), m.bias.double())
    for y in (y0, y1, y2):
        assert rel_err(y, ref) <= 1e-5


def test_repeat_calls_skip_the_checks_but_a_new_signature_is_checked(monkeypatch):
    """Checks run once per signature: a bad call with a new signature is still
    rejected before any kernel runs, and leaves the running buffers alone."""
    monkeypatch.setenv("WSBCN_BACKEND", "triton")
    m = wsbcn.BatchChannelNorm2d(8, num_groups=4).to(DEVICE).train()
    m(torch.randn(2, 8, 3, 3, device=DEVICE))
    before = (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
    for bad, error in ((torch.randn(2, 6, 3, 3, device=DEVICE), ValueError),
                       (torch.randn(2, 8, 3, device=DEVICE), ValueError),
                       (torch.randint(0, 3, (2, 8, 3, 3), device=DEVICE), TypeError)):
        try:
            m(bad)
        except error:
            pass
        else:
            raise AssertionError(f"accepted {tuple(bad.shape)} {bad.dtype}")
    assert all(torch.equal(a, b) for a, b in zip(before, (m.running_mean, m.running_var, m.num_batches_tracked)))
    try:
        batch_channel_norm(torch.randn(2, 8, 3, 3, device=DEVICE), 4, training=True, eps=-1.0)
    except ValueError as exc:
        assert "eps" in str(exc)
    else:
        raise AssertionError("eps=-1 accepted")
