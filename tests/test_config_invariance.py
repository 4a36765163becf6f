"""Tuning never changes a result: for one plan (BLOCK_S, split, which fix the
reduction order; wsbcn/tuning.py), every tunable setting (BLOCK_C, num_warps,
num_stages) gives bit-identical outputs, gradients and running buffers, and each
plan agrees with the float64 reference.

On CPU the kernels run through the interpreter, where num_warps and num_stages do
nothing and numpy sums each row of a tile the same way whatever the tile holds.
A GPU does not: the order of a tl.sum follows the layout, i.e. the tile's shape
and num_warps. So on CPU the tests replace the interpreter's sum with one whose
order follows the size of the tile (per-thread strided partial sums, then a
butterfly, the way a GPU reduction runs), and vary BLOCK_C, which changes the
tiles and the program grid. A kernel that reduced a BLOCK_C-dependent tile with
tl.sum fails them (the kernels before kernels/reduce.py did). On a GPU the same
tests run on the hardware's own order and vary all three settings for real;
tests/gpu/test_gpu.py also sweeps autotune's whole space there.
"""
import numpy as np
import pytest
import torch

from wsbcn import tuning
from wsbcn.tools import autotune
from wsbcn.functional import batch_channel_norm, group_norm
from conftest import DEVICE
from reference import bcn_reference, gn_reference

# S = 35: plans with one chunk, 2 chunks of 3 steps of 8 lanes, 35 one-position
# chunks, and those 35 merged 4 at a time in the combine kernels (9 steps, the last
# one partly masked)
PLANS = [
    {"BLOCK_S": 64, "split": 1},
    {"BLOCK_S": 8, "split": 2},
    {"BLOCK_S": 1, "split": 35},
    {"BLOCK_S": 1, "split": 35, "BLOCK_J": 4},
]
TUNABLES = [
    {"BLOCK_C": 8, "num_warps": 2, "num_stages": 2},
    {"BLOCK_C": 2, "num_warps": 4, "num_stages": 3},
    {"BLOCK_C": 16, "num_warps": 8, "num_stages": 1},
]


def _layout_order_sum(self, input):
    """tl.sum in the interpreter, in an order set by the tile's size: t "threads"
    (2, 4, 8 or 16, from the element count) each add a strided slice of the axis in
    sequence, then the t partials meet in a butterfly."""
    data = input.handle.data
    axis = self.axis
    if axis is None:
        data, axis = data.reshape(-1), 0
    moved = np.moveaxis(data, axis, 0)
    length = moved.shape[0]
    threads = min(2 ** (data.size.bit_length() % 4 + 1), length)
    partials = []
    for t in range(threads):
        acc = moved[t].copy()
        for k in range(t + threads, length, threads):
            acc = acc + moved[k]
        partials.append(acc)
    while len(partials) > 1:
        half = (len(partials) + 1) // 2
        partials = [partials[i] + partials[i + half] if i + half < len(partials) else partials[i]
                    for i in range(half)]
    out = partials[0].astype(data.dtype)
    if self.keep_dims:
        out = np.expand_dims(out, axis)
    return self.to_tensor(out if self.axis is not None or self.keep_dims else out.item(), input.dtype)


@pytest.fixture(autouse=True)
def gpu_like_reduction_order(monkeypatch):
    if not torch.cuda.is_available():
        from triton.runtime import interpreter

        monkeypatch.setattr(interpreter.ReduceOps, "sum", _layout_order_sum)


def _use(monkeypatch, fwd, bwd):
    """Make the norm wrappers launch with ``fwd`` / ``bwd``."""
    configs = {"norm_fwd": fwd, "norm_bwd": bwd}
    monkeypatch.setattr(tuning, "config_for", lambda kernel, *a, **k: dict(configs[kernel]))


def _bcn_run(x, op, estimate=False):
    """Output, dx, parameter gradients and running buffers of one training step."""
    c = x.shape[1]
    xg = x.detach().clone().requires_grad_(True)
    params = [torch.linspace(0.5, 1.5, c, device=DEVICE, requires_grad=True),
              torch.linspace(-0.2, 0.2, c, device=DEVICE, requires_grad=True),
              torch.linspace(0.8, 1.2, 4, device=DEVICE).reshape(1, 4, 1).requires_grad_(True),
              torch.linspace(-0.1, 0.1, 4, device=DEVICE).reshape(1, 4, 1).requires_grad_(True)]
    if op == "gn":
        w = torch.linspace(0.8, 1.2, c, device=DEVICE, requires_grad=True)
        b = torch.linspace(-0.1, 0.1, c, device=DEVICE, requires_grad=True)
        y = group_norm(xg, 4, w, b, 1e-5, activation="silu")
        leaves, buffers = [xg, w, b], []
    else:
        rm = torch.linspace(-0.5, 0.5, c, device=DEVICE)
        rv = torch.linspace(0.5, 2.0, c, device=DEVICE)
        y = batch_channel_norm(xg, 4, rm, rv, params[0], params[1], params[2], params[3], training=True,
                               estimate=estimate, activation="silu")
        leaves, buffers = [xg] + params, [rm, rv]
    dy = torch.linspace(-1.0, 1.0, y.numel(), device=DEVICE).reshape(y.shape)
    grads = torch.autograd.grad(y, leaves, dy)
    return [y.detach(), *grads, *buffers]


def _reference(x, op, estimate):
    x64 = x.detach().double().requires_grad_(True)
    c = x.shape[1]
    dy = torch.linspace(-1.0, 1.0, x.numel(), dtype=torch.float64, device=DEVICE).reshape(x.shape)
    f64 = dict(dtype=torch.float64, device=DEVICE)
    if op == "gn":
        y = gn_reference(x64, 4, torch.linspace(0.8, 1.2, c, **f64), torch.linspace(-0.1, 0.1, c, **f64),
                         activation="silu")
    else:
        y = bcn_reference(x64, 4, torch.linspace(0.5, 1.5, c, **f64), torch.linspace(-0.2, 0.2, c, **f64),
                          torch.linspace(0.8, 1.2, 4, **f64), torch.linspace(-0.1, 0.1, 4, **f64),
                          running_mean=torch.linspace(-0.5, 0.5, c, **f64),
                          running_var=torch.linspace(0.5, 2.0, c, **f64), training=True, estimate=estimate,
                          activation="silu")
    (dx,) = torch.autograd.grad(y, x64, dy)
    return y, dx


# The 35-chunk plans take 10-30 s each through the interpreter: slow (CI runs them);
# one-chunk and 2-chunks stay in the default run.
@pytest.mark.parametrize("plan", [PLANS[0], PLANS[1], pytest.param(PLANS[2], marks=pytest.mark.slow),
                                  pytest.param(PLANS[3], marks=pytest.mark.slow)],
                         ids=["one-chunk", "2-chunks", "35-chunks", "combine-4-at-a-time"])
@pytest.mark.parametrize("op,estimate,layout", [("bcn", False, "contiguous"), ("bcn", True, "channels_last"),
                                                ("gn", False, "channels_last")])
def test_tunable_settings_give_bit_identical_results(monkeypatch, plan, op, estimate, layout):
    monkeypatch.setenv("WSBCN_BACKEND", "triton")
    torch.manual_seed(0)
    x = torch.randn(2, 8, 5, 7, device=DEVICE) * 3 + 2
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    runs = []
    for fwd, bwd in zip(TUNABLES, TUNABLES[1:] + TUNABLES[:1]):
        _use(monkeypatch, dict(plan, **fwd), dict(plan, **bwd))
        runs.append(_bcn_run(x, op, estimate))
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            assert torch.equal(a, b)
    y64, dx64 = _reference(x, op, estimate)
    assert (runs[0][0].double() - y64).abs().max().item() <= 1e-5
    assert (runs[0][1].double() - dx64).abs().max().item() <= 1e-5


def test_autotune_space_keeps_the_plan_and_the_cache_cannot_change_it(tmp_path, monkeypatch):
    """Every candidate of the sweep shares the heuristic's plan, and a cache entry
    carrying a plan (a schema 1 file, or a hand-edited one) is refused."""
    x = torch.empty(32, 256, 14, 14, device=DEVICE).to(memory_format=torch.channels_last)
    shape = (32, 256, 196)
    for kernel in ("norm_fwd", "norm_bwd"):
        base = tuning.heuristic_config(kernel, x, shape, True)
        space = autotune.config_space(kernel, x, shape, True)
        assert len(space) > 1
        assert {(c["BLOCK_S"], c["split"]) for c in space} == {(base["BLOCK_S"], base["split"])}
        # pipelining (NUM_STAGES of the loops over S) is the sweep's to decide, per shape
        assert {c["num_stages"] for c in space} == {1, 2, 3}
    for kernel, shape_ in (("ws_fwd", (64, 4608)), ("ws_bwd", (64, 4608))):
        space = autotune.config_space(kernel, torch.empty(shape_, device=DEVICE), shape_, False)
        assert len(space) > 1 and len({c["BLOCK"] for c in space}) == 1
    assert not tuning.valid_config("norm_fwd", {"BLOCK_C": 16, "BLOCK_S": 32, "split": 4, "num_warps": 4,
                                                "num_stages": 2})
    assert tuning.valid_config("norm_fwd", {"BLOCK_C": 16, "num_warps": 4, "num_stages": 2})


def test_autotune_space_of_an_input_has_the_plan_that_input_gets_on_a_gpu():
    """The GPU plan depends on the element size (one 16-byte load per thread); the
    sweep for a bf16 input must time the bf16 plan, not an fp32 one."""
    from wsbcn import backends

    shape = (32, 256, 3136)
    backends.emulate_gpu("NVIDIA H100 80GB HBM3", 132)
    try:
        plans = {}
        for dtype in (torch.bfloat16, torch.float32):
            x = torch.empty(32, 256, 56, 56, dtype=dtype)
            runtime = tuning.config_for("norm_fwd", x, shape)
            space = autotune.config_space("norm_fwd", x, shape, False)
            assert {(c["BLOCK_S"], c["split"]) for c in space} == {(runtime["BLOCK_S"], runtime["split"])}
            assert space[0]["BLOCK_C"] * space[0]["BLOCK_S"] * x.element_size() == 16 * 32 * space[0]["num_warps"]
            # down to half the heuristic's tile: whether more programs beat narrower
            # loads (layers with fewer tiles than 4 waves) is the GPU sweep's to measure
            assert min(c["BLOCK_C"] for c in space) == runtime["BLOCK_C"] // 2
            plans[dtype] = (runtime["BLOCK_C"], runtime["split"])
        assert plans[torch.bfloat16] != plans[torch.float32]
    finally:
        backends.emulate_gpu(None)
