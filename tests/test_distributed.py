"""BCN across processes: R ranks on gloo behave as one batch (their concatenation).

R processes on one gloo group (loopback, CPU tensors) are started once per module and
world size (``ranks`` fixture: starting one costs more than most cases, ~10 s on a
loaded 2-core machine) and run the cases the tests send them; a case that fails
takes its ranks down and the next test starts new ones. Every rank compares its part
with a naive float64 reference of the whole batch built on every rank alike
(tests/reference.py, or the ragged reference below when the ranks' image sizes
differ). "triton" runs the kernels through the interpreter, "torch" the torch closed
form (float64 inputs always take it). Parameter gradients are compared summed over the
ranks (what DDP's all_reduce adds up; DDP itself, which averages, in
test_ddp_averages_gradients). CUDA: the gpu-marked tests at the end (NCCL).
"""
import copy
import datetime
import os
import queue
import socket
import sys
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT = datetime.timedelta(seconds=120)  # a collective that never completes fails the test instead of hanging CI
LEARN = ("weight", "bias", "group_weight", "group_bias")
MODES = {"batch": (True, False), "estimate": (True, True)}  # name -> (training, estimate)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out_dir, case, kwargs, pg_backend):
    sys.path.insert(0, HERE)
    torch.set_num_threads(1)  # 2-3 processes on a small shared machine
    os.environ["WSBCN_BACKEND"] = "torch"
    if pg_backend == "nccl":
        torch.cuda.set_device(rank)  # one device per rank
    dist.init_process_group(pg_backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=TIMEOUT)
    done = False
    try:
        globals()[case](rank, world, **kwargs)
        done = True
    finally:
        if done:  # every rank is through its collectives before any leaves the group
            dist.barrier()
            with open(os.path.join(out_dir, f"ok{rank}"), "w") as f:
                f.write("ok")
        dist.destroy_process_group()


def _serve(rank, world, port, tasks, results):
    """A rank of a ``Ranks`` pool: run the cases it is sent until told to stop (None),
    or until one fails (the group may then be out of step: the pool is discarded)."""
    # CPU tensors: "triton" is the interpreter, on a CUDA machine too (set before
    # anything imports triton; the CUDA path has tests of its own below)
    os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, HERE)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=TIMEOUT)
    clean = False
    try:
        while True:
            task = tasks.get()
            if task is None:
                clean = True
                break
            case, kwargs = task
            os.environ["WSBCN_BACKEND"] = "torch"
            try:
                globals()[case](rank, world, **kwargs)
                dist.barrier()
            except BaseException:
                results.put((rank, traceback.format_exc()))
                break
            results.put((rank, None))
    finally:
        if clean:  # every rank is through its collectives before any leaves the group
            dist.barrier()
            dist.destroy_process_group()


class Ranks:
    """``world`` processes on one gloo group that run cases on request."""

    def __init__(self, world):
        ctx = mp.get_context("spawn")
        self.world = world
        self.tasks = [ctx.Queue() for _ in range(world)]
        self.results = ctx.Queue()
        port = _free_port()
        self.procs = [ctx.Process(target=_serve, args=(rank, world, port, self.tasks[rank], self.results), daemon=True)
                      for rank in range(world)]
        for p in self.procs:
            p.start()
        self.alive = True

    def run(self, case, timeout=240, **kwargs):
        """Run ``case(rank, world, **kwargs)`` on every rank; fail with the first rank's
        traceback (and discard the ranks) when one raises, dies or runs out of time."""
        for q in self.tasks:
            q.put((case, kwargs))
        deadline = time.monotonic() + timeout
        done = set()
        while len(done) < self.world:
            try:
                rank, error = self.results.get(timeout=1.0)
            except queue.Empty:
                dead = [r for r, p in enumerate(self.procs) if not p.is_alive() and r not in done]
                if dead or time.monotonic() > deadline:
                    self.close(force=True)
                    pytest.fail(f"{case}: rank(s) {dead or 'all'} " + ("died" if dead else f"took over {timeout} s"))
                continue
            if error is not None:
                self.close(force=True)
                pytest.fail(f"{case} failed on rank {rank}:\n{error}")
            done.add(rank)

    def close(self, force=False):
        self.alive = False
        if not force:
            for q in self.tasks:
                q.put(None)
            for p in self.procs:
                p.join(timeout=30)
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join()


@pytest.fixture(scope="module")
def ranks():
    """``ranks(world)``: a pool of ``world`` ranks, started on first use (again after a
    failure) and stopped with the module."""
    pools = {}

    def get(world):
        pool = pools.get(world)
        if pool is None or not pool.alive:
            pool = pools[world] = Ranks(world)
        return pool

    yield get
    for pool in pools.values():
        if pool.alive:
            pool.close()


def spawn(tmp_path, world, case, pg_backend="gloo", **kwargs):
    """Run ``case(rank, world, **kwargs)`` on ``world`` processes of a ``pg_backend``
    group; fail unless every rank finished it."""
    for rank in range(world):
        (tmp_path / f"ok{rank}").unlink(missing_ok=True)
    mp.spawn(_worker, args=(world, _free_port(), str(tmp_path), case, kwargs, pg_backend), nprocs=world, join=True)
    for rank in range(world):
        assert (tmp_path / f"ok{rank}").read_text() == "ok", rank


# -- the cases (run inside the ranks) ----------------------------------------------------

def _params(c, g, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return dict(weight=torch.rand(c, generator=gen) + 0.5, bias=torch.randn(c, generator=gen),
                group_weight=torch.rand(1, g, 1, generator=gen) + 0.5, group_bias=torch.randn(1, g, 1, generator=gen),
                running_mean=torch.randn(c, generator=gen) * 0.3, running_var=torch.rand(c, generator=gen) + 0.5)


def _module(c, g, mode, group, params, activation="relu", momentum=0.3, **kwargs):
    import wsbcn

    m = wsbcn.BatchChannelNorm2d(c, num_groups=g, estimate=MODES[mode][1], activation=activation,
                                 momentum=momentum, process_group=group, **kwargs)
    with torch.no_grad():
        for k, v in params.items():
            getattr(m, k).copy_(v)
    return m


def _reference_state(params):
    return {k: v.double().clone().requires_grad_(k in LEARN) for k, v in params.items()}


def _summed_grads(m):
    """The local parameter gradients summed over the ranks (then cleared)."""
    out = {}
    for k in LEARN:
        g = getattr(m, k).grad.detach().double().clone()
        dist.all_reduce(g)
        out[k] = g
        getattr(m, k).grad = None
    return out


def _same_on_every_rank(t):
    """t, gathered from every rank, is bitwise the same everywhere."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return all(torch.equal(p, parts[0]) for p in parts)


def _layout(x, layout):
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x.contiguous()


def _tol(dtype):
    from conftest import TOL

    return TOL[dtype]


def case_matches_single_process(rank, world, backend, sizes, dtypes, layouts, modes, steps=2, c=8, g=4, hw=(3, 5),
                                momentum=0.3):
    """Forward, dx, summed parameter gradients, running buffers and num_batches_tracked
    after each of ``steps`` training steps, then eval, against bcn_reference on the
    concatenated batch; every mode x dtype x layout."""
    from conftest import rel_err
    from reference import bcn_reference

    os.environ["WSBCN_BACKEND"] = backend
    lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
    for mode in modes:
        for dtype in dtypes:
            for layout in layouts:
                what = (mode, str(dtype), layout)
                training, estimate = MODES[mode]
                params = _params(c, g)
                m = _module(c, g, mode, dist.group.WORLD, params, momentum=momentum)
                if dtype == torch.float64:  # float64 all through (fp32 parameters would round their gradients)
                    m.double()
                ref = _reference_state(params)
                nbt_ref = torch.zeros((), dtype=torch.long)
                gen = torch.Generator().manual_seed(1)
                tol = _tol(dtype)
                for step in range(steps):
                    x = torch.randn(sum(sizes), c, *hw, generator=gen) * 2 + 1
                    dy = torch.randn(sum(sizes), c, *hw, generator=gen)
                    x_local = _layout(x[lo:hi].to(dtype), layout).requires_grad_(True)
                    y = m(x_local)
                    assert y.dtype == dtype and y.shape == x_local.shape, what
                    y.backward(_layout(dy[lo:hi].to(dtype), layout))
                    x64 = x.to(dtype).double().requires_grad_(True)
                    yr = bcn_reference(x64, g, training=training, estimate=estimate, activation="relu",
                                       momentum=momentum, num_batches_tracked=nbt_ref, **ref)
                    yr.backward(dy.to(dtype).double())
                    assert rel_err(y, yr[lo:hi]) <= tol, (what, step, "y")
                    assert rel_err(x_local.grad, x64.grad[lo:hi]) <= tol, (what, step, "dx")
                    for k, grad in _summed_grads(m).items():
                        assert rel_err(grad, ref[k].grad) <= tol, (what, step, k)
                        ref[k].grad = None
                    for k in ("running_mean", "running_var"):
                        assert rel_err(getattr(m, k), ref[k]) <= max(tol, 1e-6), (what, step, k)
                        # the merge writes them from rank-independent values only
                        assert _same_on_every_rank(getattr(m, k)), (what, step, k, "differs across ranks")
                    assert int(m.num_batches_tracked) == step + 1
                # eval: the running estimates, no process group involved
                m.eval()
                x = _layout((torch.randn(sum(sizes), c, *hw, generator=gen) + 1)[lo:hi].to(dtype), layout)
                with torch.no_grad():
                    y = m(x)
                    yr = bcn_reference(x.double(), g, training=False, activation="relu", **ref)
                assert rel_err(y, yr) <= tol, (what, "eval")


def _ragged_reference(xs, g, p, mode, momentum, eps=1e-5):
    """The naive float64 composition for ranks with different image sizes: the BN
    stage's statistics over every value of every rank, then each sample's channel
    stage. ``p``: float64 parameters and running buffers (updated in place)."""
    c = xs[0].shape[1]
    values = torch.cat([x.transpose(0, 1).reshape(c, -1) for x in xs], dim=1)
    shape_c = (1, c, 1, 1)
    if mode == "batch":
        mean, var = values.mean(dim=1), values.var(dim=1, correction=0)
        with torch.no_grad():
            p["running_mean"].mul_(1 - momentum).add_(momentum * mean)
            p["running_var"].mul_(1 - momentum).add_(momentum * values.var(dim=1, correction=1))
    else:
        with torch.no_grad():
            dev = (values - p["running_mean"][:, None]).square().mean(dim=1)
            p["running_mean"].mul_(1 - momentum).add_(momentum * values.mean(dim=1))
            p["running_var"].mul_(1 - momentum).add_(momentum * dev)
        mean, var = p["running_mean"].clone(), p["running_var"].clone()
    out = []
    for x in xs:
        u = (x - mean.view(shape_c)) / torch.sqrt(var.view(shape_c) + eps)
        u = u * p["weight"].view(shape_c) + p["bias"].view(shape_c)
        grouped = u.reshape(x.shape[0], g, -1)
        y = (grouped - grouped.mean(dim=2, keepdim=True)) / torch.sqrt(grouped.var(dim=2, correction=0, keepdim=True)
                                                                       + eps)
        y = y.reshape(x.shape) * p["group_weight"].reshape(1, g, 1).repeat_interleave(c // g, 1).view(shape_c)
        y = y + p["group_bias"].reshape(1, g, 1).repeat_interleave(c // g, 1).view(shape_c)
        out.append(torch.relu(y))
    return out


def case_ragged_ranks(rank, world, backend, shapes, modes=("batch", "estimate"), dtype=torch.float32, c=8, g=2,
                      steps=2):
    """Ranks with different batch AND image sizes (``shapes``: (n, h, w) per rank; one
    with a single 1x1 image has one value per channel), against the ragged reference."""
    from conftest import rel_err

    os.environ["WSBCN_BACKEND"] = backend
    for mode in modes:
        params = _params(c, g, seed=3)
        m = _module(c, g, mode, dist.group.WORLD, params)
        ref = _reference_state(params)
        gen = torch.Generator().manual_seed(4)
        tol = _tol(dtype)
        for step in range(steps):
            xs = [torch.randn(n, c, h, w, generator=gen) * 1.5 + 0.5 for n, h, w in shapes]
            dys = [torch.randn(x.shape, generator=gen) for x in xs]
            x_local = xs[rank].to(dtype, copy=True).requires_grad_(True)
            y = m(x_local)
            y.backward(dys[rank].to(dtype))
            x64 = [x.to(dtype).double().requires_grad_(True) for x in xs]
            yr = _ragged_reference(x64, g, ref, mode, 0.3)
            sum((a * b.double()).sum() for a, b in zip(yr, dys)).backward()
            assert rel_err(y, yr[rank]) <= tol, (mode, step, "y")
            assert rel_err(x_local.grad, x64[rank].grad) <= tol, (mode, step, "dx")
            for k, grad in _summed_grads(m).items():
                assert rel_err(grad, ref[k].grad.view(grad.shape)) <= tol, (mode, step, k)
                ref[k].grad = None
            for k in ("running_mean", "running_var"):
                assert rel_err(getattr(m, k), ref[k]) <= max(tol, 1e-6), (mode, step, k)


def case_ddp_averages_gradients(rank, world, backend, sizes, c=8, g=4):
    """Under DistributedDataParallel (which averages the parameter gradients over the
    ranks), the gradients are the single-process ones of the whole batch over R."""
    from conftest import rel_err
    from reference import bcn_reference
    from torch.nn.parallel import DistributedDataParallel as DDP

    os.environ["WSBCN_BACKEND"] = backend
    params = _params(c, g, seed=5)
    model = DDP(torch.nn.Sequential(_module(c, g, "batch", dist.group.WORLD, params)))
    ref = _reference_state(params)
    lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(sum(sizes), c, 4, 3, generator=gen) + 2
    dy = torch.randn(x.shape, generator=gen)
    x_local = x[lo:hi].clone().requires_grad_(True)
    model(x_local).backward(dy[lo:hi])
    x64 = x.double().requires_grad_(True)
    bcn_reference(x64, g, training=True, activation="relu", momentum=0.3, **ref).backward(dy.double())
    assert rel_err(x_local.grad, x64.grad[lo:hi]) <= 2e-5
    layer = model.module[0]
    for k in LEARN:
        assert rel_err(getattr(layer, k).grad, ref[k].grad / world) <= 2e-5, k


def case_compiled_matches_one_batch(rank, world, backend, sizes, c=8, g=4):
    """torch.compile of a model with a BCN over the process group: the BCN runs eagerly
    (a graph break), and each mode's output, dx, summed parameter gradients and running
    buffers are the single-process ones of the whole batch, two steps. The ranks' headers
    are compared on the first call only, as for CUDA tensors, whose calls dynamo traced
    (torch 2.11 then gave a wrong dx; CPU tensors' host read of the headers broke the
    graph)."""
    from wsbcn.ops import norm_distributed

    os.environ["WSBCN_BACKEND"] = backend
    torch._dynamo.reset()
    calls = []

    def first_call_only(x):  # as for CUDA tensors: the headers compared on the first call
        calls.append(x)
        return len(calls) == 1

    each_call = norm_distributed._check_each_call
    norm_distributed._check_each_call = first_call_only
    try:
        _compiled_steps(rank, sizes, c, g)
    finally:
        norm_distributed._check_each_call = each_call


def _compiled_steps(rank, sizes, c, g):
    from conftest import rel_err
    from reference import bcn_reference

    lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
    for mode in MODES:
        training, estimate = MODES[mode]
        params = _params(c, g, seed=8)
        m = _module(c, g, mode, dist.group.WORLD, params)
        compiled = torch.compile(torch.nn.Sequential(torch.nn.Identity(), m, torch.nn.Identity()), backend="aot_eager")
        ref = _reference_state(params)
        gen = torch.Generator().manual_seed(9)
        for step in range(2):
            x = torch.randn(sum(sizes), c, 4, 3, generator=gen) * 2 + 1
            dy = torch.randn(x.shape, generator=gen)
            x_local = x[lo:hi].clone().requires_grad_(True)
            y = compiled(x_local)
            y.backward(dy[lo:hi])
            x64 = x.double().requires_grad_(True)
            yr = bcn_reference(x64, g, training=training, estimate=estimate, activation="relu", momentum=0.3, **ref)
            yr.backward(dy.double())
            assert rel_err(y, yr[lo:hi]) <= 2e-5, (mode, step, "y")
            assert rel_err(x_local.grad, x64.grad[lo:hi]) <= 2e-5, (mode, step, "dx")
            for k, grad in _summed_grads(m).items():
                assert rel_err(grad, ref[k].grad) <= 2e-5, (mode, step, k)
                ref[k].grad = None
            for k in ("running_mean", "running_var"):
                assert rel_err(getattr(m, k), ref[k]) <= 1e-6, (mode, step, k)


def case_fully_shard(rank, world, backend, model_wide, c=8, g=4):
    """Under FSDP2's fully_shard (each layer and the model; its gradients averaged and
    sharded), WSConv (per layer, or under a ModelWeightStandardizer, which leaves the
    sharded weights to the layers) and a BCN over the process group give the
    single-process gradients of the whole batch over R, and the same running buffers."""
    import torch.nn.functional as F
    from conftest import rel_err
    from reference import bcn_reference, ws_reference
    from torch.distributed.fsdp import fully_shard

    import wsbcn

    os.environ["WSBCN_BACKEND"] = backend
    torch.manual_seed(7)  # the same parameters on every rank
    net = torch.nn.Sequential(wsbcn.WSConv2d(3, c, 3, padding=1),
                              wsbcn.BatchChannelNorm2d(c, g, process_group=dist.group.WORLD), torch.nn.ReLU(),
                              wsbcn.WSConv2d(c, c, 3, eps_mode="std", correction=1))
    ref = {k: v.detach().double().requires_grad_(True) for k, v in net.named_parameters()}
    ref_buffers = {k: v.double() if v.is_floating_point() else v.clone() for k, v in net.named_buffers()}
    if model_wide:
        wsbcn.ModelWeightStandardizer(net)
    for layer in (net[0], net[1], net[3]):
        fully_shard(layer)
    fully_shard(net)
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(2 * world, 3, 5, 5, generator=gen)
    dy = torch.randn(2 * world, c, 3, 3, generator=gen)
    mine = slice(2 * rank, 2 * rank + 2)
    (net(x[mine]) * dy[mine]).sum().backward()
    y = F.conv2d(x.double(), ws_reference(ref["0.weight"]), ref["0.bias"], padding=1)
    y = bcn_reference(y, g, ref["1.weight"], ref["1.bias"], ref["1.group_weight"], ref["1.group_bias"],
                      ref_buffers["1.running_mean"], ref_buffers["1.running_var"], training=True,
                      num_batches_tracked=ref_buffers["1.num_batches_tracked"])
    y = F.conv2d(torch.relu(y), ws_reference(ref["3.weight"], correction=1, eps_mode="std"), ref["3.bias"])
    (y * dy.double()).sum().backward()
    scale = max(r.grad.norm().item() for r in ref.values()) / world
    for k, p in net.named_parameters():
        expected = ref[k].grad / world
        if expected.norm().item() > 1e-9 * scale:
            assert rel_err(p.grad.full_tensor(), expected) <= 1e-5, k
        else:  # zero in exact arithmetic (the first conv's bias, before batch statistics): rounding only
            assert p.grad.full_tensor().norm().item() <= 1e-6 * scale, k
    for k, b in net.named_buffers():
        assert rel_err(b, ref_buffers[k]) <= 1e-6, k


def case_fsdp1_nested_model_wide(rank, world, c=8, g=4):
    """Under FSDP's FullyShardedDataParallel wrapping each block (use_orig_params=True: the
    layers' weights are flat 1-D shards until each block's forward gathers them), model-wide
    WS leaves the weights to the layers, as under fully_shard: the gradients are the
    single-process float64 ones of the whole batch, averaged."""
    import torch.nn.functional as F
    from conftest import rel_err
    from reference import bcn_reference, ws_reference
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    import wsbcn

    os.environ["WSBCN_BACKEND"] = "triton"
    torch.manual_seed(7)
    block = torch.nn.Sequential
    net = block(block(wsbcn.WSConv2d(3, c, 3, padding=1), wsbcn.BatchChannelNorm2d(c, g), torch.nn.ReLU()),
                block(wsbcn.WSConv2d(c, c, 3)))
    ref = {k: v.detach().double().requires_grad_(True) for k, v in net.named_parameters()}
    wsbcn.ModelWeightStandardizer(net)
    model = FSDP(net, use_orig_params=True, auto_wrap_policy=ModuleWrapPolicy({block}), device_id=torch.device("cpu"))
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(2 * world, 3, 5, 5, generator=gen)
    dy = torch.randn(2 * world, c, 3, 3, generator=gen)
    mine = slice(2 * rank, 2 * rank + 2)
    (model(x[mine]) * dy[mine]).sum().backward()
    for half in (slice(0, 2), slice(2, 4)):  # each rank's BCN normalizes its own batch (no process group)
        y = F.conv2d(x[half].double(), ws_reference(ref["0.0.weight"]), ref["0.0.bias"], padding=1)
        y = bcn_reference(y, g, ref["0.1.weight"], ref["0.1.bias"], ref["0.1.group_weight"], ref["0.1.group_bias"])
        y = F.conv2d(torch.relu(y), ws_reference(ref["1.0.weight"]), ref["1.0.bias"])
        (y * dy[half].double()).sum().backward()
    scale = max(r.grad.norm().item() for r in ref.values()) / world
    with FSDP.summon_full_params(model, with_grads=True):
        for k, p in net.named_parameters():
            expected = ref[k.replace("_fsdp_wrapped_module.", "")].grad / world
            if expected.norm().item() > 1e-9 * scale:
                assert rel_err(p.grad, expected) <= 1e-5, k
            else:  # zero in exact arithmetic (the conv bias before a batch norm): rounding only
                assert p.grad.norm().item() <= 1e-6 * scale, k


class _SometimesSkipped(torch.nn.Module):
    """Two WSConvs every forward calls and a third only when ``use_extra``."""

    def __init__(self, wsbcn, c=8):
        super().__init__()
        self.a, self.b, self.extra = (wsbcn.WSConv2d(c, c, 3, padding=1) for _ in range(3))
        self.use_extra = False

    def forward(self, x):
        x = self.b(torch.relu(self.a(x)))
        return self.extra(x) if self.use_extra else x


def case_ddp_find_unused_model_wide(rank, world, c=8):
    """DDP(find_unused_parameters=True) with a layer some forwards skip: model-wide WS
    (its one node holds every weight, the skipped one's too) trains as per-layer WS does,
    every step, the skipped layer's weight without a gradient in the steps that skip it."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    import wsbcn

    os.environ["WSBCN_BACKEND"] = "triton"
    runs = []
    for model_wide in (False, True):
        torch.manual_seed(9)
        net = _SometimesSkipped(wsbcn, c)
        if model_wide:
            wsbcn.ModelWeightStandardizer(net)
        model = DDP(net, find_unused_parameters=True)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        gen = torch.Generator().manual_seed(10 + rank)
        trace = []
        for step in range(3):
            net.use_extra = step == 1
            opt.zero_grad(set_to_none=True)
            model(torch.randn(2, c, 4, 4, generator=gen)).square().sum().backward()
            trace.append([None if p.grad is None else p.grad.clone() for p in net.parameters()])
            opt.step()
        runs.append(trace)
    for step, (per_layer, model_wide) in enumerate(zip(*runs)):
        for i, (a, b) in enumerate(zip(per_layer, model_wide)):
            assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), (step, i)
    assert runs[1][0][4] is None and runs[1][1][4] is not None  # extra.weight: skipped, then used


def case_convert_refuses_a_wrapped_model(rank, world):
    """convert on a model that DDP, FSDP or fully_shard (FSDP2) wraps, or that holds such a
    module, raises before anything changes, saying to convert before wrapping: the
    wrapper would not synchronize the parameters convert adds."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    import wsbcn

    def net():
        torch.manual_seed(3)
        return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU())

    def shard_first(model):
        fully_shard(model[0])
        return model

    wraps = {"DistributedDataParallel": DDP, "DistributedDataParallel ": lambda m: torch.nn.Sequential(DDP(m)),
             "FullyShardedDataParallel": lambda m: FSDP(m, device_id=torch.device("cpu")),
             "fully_shard": fully_shard, "fully_shard ": shard_first}
    for name, wrap in wraps.items():
        model = wrap(net())
        before = [(type(m), [p.data_ptr() for p in m.parameters(recurse=False)]) for m in model.modules()]
        try:
            wsbcn.convert(model, num_groups=4)
        except ValueError as e:
            assert name.strip() in str(e) and "convert before wrapping" in str(e), (name, str(e))
        else:
            raise AssertionError(f"{name}: convert did not refuse")
        after = [(type(m), [p.data_ptr() for p in m.parameters(recurse=False)]) for m in model.modules()]
        assert after == before, name


def case_mixed_dtypes_and_backends(rank, world, c=8, g=4):
    """Ranks with different input dtypes and backends combine their statistics (the
    rows travel as float64 whatever the input): rank 0 float64 through the torch
    closed form, rank 1 fp32 through the kernels, rank 2 bf16 through the kernels."""
    from conftest import TOL, rel_err
    from reference import bcn_reference

    dtype = [torch.float64, torch.float32, torch.bfloat16][rank]
    os.environ["WSBCN_BACKEND"] = "triton"
    params = _params(c, g, seed=7)
    m = _module(c, g, "batch", dist.group.WORLD, params)
    ref = _reference_state(params)
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(2 * world, c, 3, 3, generator=gen) + 1
    xs = torch.cat([x[2 * r:2 * r + 2].to([torch.float64, torch.float32, torch.bfloat16][r]).double()
                    for r in range(world)])
    y = m(x[2 * rank:2 * rank + 2].to(dtype))
    yr = bcn_reference(xs, g, training=True, activation="relu", momentum=0.3, **ref)
    # (the other ranks' statistics are fp32 sums of theirs, whatever this rank's dtype)
    assert rel_err(y, yr[2 * rank:2 * rank + 2]) <= (TOL[dtype] if dtype == torch.bfloat16 else 2e-5)
    assert rel_err(m.running_mean, ref["running_mean"]) <= 1e-6


def case_disagreeing_ranks_raise(rank, world):
    """What the ranks disagree on (estimate, momentum, eps) is an error on every rank
    alike, before anything is updated; the group stays usable. A process outside the
    group gets a clear error before any collective."""
    import wsbcn

    for backend in ("triton", "torch"):
        os.environ["WSBCN_BACKEND"] = backend
        for name, kwargs in (("estimate", dict(estimate=rank == 1)), ("momentum", dict(momentum=0.1 + 0.1 * rank)),
                             ("eps", dict(eps=1e-5 * (1 + rank)))):
            m = wsbcn.BatchChannelNorm2d(8, num_groups=4, process_group=dist.group.WORLD, **kwargs)
            before = m.running_mean.clone()
            with pytest.raises(ValueError, match=f"disagree on {name}"):
                m(torch.randn(2, 8, 3, 3))
            assert torch.equal(m.running_mean, before)
        dist.barrier()
    outside = dist.new_group([0])
    if rank != 0:
        m = wsbcn.BatchChannelNorm2d(8, num_groups=4, process_group=outside)
        with pytest.raises(ValueError, match="not a member"):
            m(torch.randn(2, 8, 3, 3))
    with pytest.raises(TypeError, match="ProcessGroup"):
        wsbcn.BatchChannelNorm2d(8, num_groups=4, process_group="not a group")
    m = wsbcn.BatchChannelNorm2d(8, num_groups=4)
    m.process_group = "not a group"  # set after construction: refused when it runs
    with pytest.raises(TypeError, match="ProcessGroup"):
        m(torch.randn(2, 8, 3, 3))


def case_forward_ad_refused(rank, world):
    """Forward-mode AD (a dual level's tangents, torch.func.jvp) is refused with a clear
    error before anything runs: the statistics are combined across the ranks, which the
    jvp would not see. Without a tangent in a dual level the call runs."""
    import torch.autograd.forward_ad as fwAD

    import wsbcn

    for backend in ("triton", "torch"):
        os.environ["WSBCN_BACKEND"] = backend
        m = wsbcn.BatchChannelNorm2d(8, num_groups=4, process_group=dist.group.WORLD)
        x = torch.randn(2, 8, 3, 3)
        before = copy.deepcopy(m.state_dict())
        with fwAD.dual_level():
            with pytest.raises(RuntimeError, match="process_group does not support forward-mode AD"):
                m(fwAD.make_dual(x, torch.randn_like(x)))
        with pytest.raises(RuntimeError, match="process_group does not support forward-mode AD"):
            torch.func.jvp(m, (x,), (torch.randn_like(x),))
        for k, v in m.state_dict().items():
            assert torch.equal(v, before[k]), k
        with fwAD.dual_level():
            m(x)
        assert int(m.num_batches_tracked) == 1
        dist.barrier()


def case_double_backward_refused(rank, world):
    """Double backward (create_graph=True) is refused on every rank with the clear error,
    a rank without images too, before the backward's collective: else the rank without
    images waited in it for ranks that had raised (and went on to other collectives)."""
    import wsbcn

    for backend in ("triton", "torch"):
        os.environ["WSBCN_BACKEND"] = backend
        m = wsbcn.BatchChannelNorm2d(8, num_groups=4, process_group=dist.group.WORLD)
        x = torch.randn(2 if rank == 0 else 0, 8, 3, 3, requires_grad=True)
        y = m(x)
        with pytest.raises(RuntimeError, match="process_group does not support double backward"):
            torch.autograd.grad((y * y).sum(), x, create_graph=True)
        dist.barrier()  # every rank reaches it: none is left inside a collective


def case_empty_rank(rank, world, backend, c=8, g=4):
    """A rank without images takes part in both collectives; the others get the
    statistics of their own images, and every rank the same running buffers."""
    from conftest import rel_err
    from reference import bcn_reference

    os.environ["WSBCN_BACKEND"] = backend
    for mode, momentum in [(mode, 0.3) for mode in MODES] + [("batch", None)]:  # None: a cumulative average
        params = _params(c, g, seed=10)
        m = _module(c, g, mode, dist.group.WORLD, params, momentum=momentum)
        m.num_batches_tracked.fill_(2)
        ref = _reference_state(params)
        x = torch.randn(3, c, 3, 4, generator=torch.Generator().manual_seed(11)) + 1
        x_local = (x if rank == 1 else x[:0]).clone().requires_grad_(True)
        y = m(x_local)
        y.backward(torch.ones_like(y))
        x64 = x.double().requires_grad_(True)
        yr = bcn_reference(x64, g, training=True, estimate=mode == "estimate", activation="relu", momentum=momentum,
                           num_batches_tracked=torch.tensor(2), **ref)
        yr.backward(torch.ones_like(yr))
        if rank == 1:
            assert rel_err(y, yr) <= 2e-5 and rel_err(x_local.grad, x64.grad) <= 2e-5, mode
        else:
            assert y.shape == (0, c, 3, 4) and x_local.grad.shape == y.shape
        for k in ("running_mean", "running_var"):
            assert rel_err(getattr(m, k), ref[k]) <= 2e-6, (mode, k)
            assert _same_on_every_rank(getattr(m, k)), (mode, k, "differs across ranks")
        assert int(m.num_batches_tracked) == 3


def case_no_values_or_one_in_all(rank, world, backend, c=4, g=2):
    """No rank has images: the running buffers stay (nn.BatchNorm on an empty batch), the
    step is counted. One value per channel in all (one 1x1 image on rank 0): the error
    nn.BatchNorm gives on one value, on every rank, before anything changes. (Both gave
    NaN buffers.)"""
    os.environ["WSBCN_BACKEND"] = backend
    for mode in MODES:
        params = _params(c, g, seed=12)
        m = _module(c, g, mode, dist.group.WORLD, params)
        y = m(torch.randn(0, c, 3, 3, requires_grad=True))
        y.sum().backward()
        assert torch.equal(m.running_mean, params["running_mean"]) and torch.equal(m.running_var, params["running_var"])
        assert int(m.num_batches_tracked) == 1
    m = _module(c, g, "batch", dist.group.WORLD, _params(c, g, seed=12))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    one = torch.randn(1 if rank == 0 else 0, c, 1, 1, generator=torch.Generator().manual_seed(16))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training, got 1"):
        m(one)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    # without that host read (CUDA tensors), the running variance stays, the mean moves
    from wsbcn.ops import collectives
    read = collectives.check_counts
    collectives.check_counts = lambda *args: None
    try:
        m(one)
    finally:
        collectives.check_counts = read
    assert torch.equal(m.running_var, before["running_var"])
    assert torch.isfinite(m.running_mean).all() and not torch.equal(m.running_mean, before["running_mean"])
    assert _same_on_every_rank(m.running_mean)


def case_world_group_looked_up_per_call(rank, world):
    """A layer on the default group (converted from nn.SyncBatchNorm) looks the group up
    on every call, as nn.SyncBatchNorm does: a call before torch.distributed ran (here:
    while the lookup finds nothing) does not keep it local afterwards, nor its signature's
    other layers."""
    import wsbcn
    from wsbcn.ops import collectives

    os.environ["WSBCN_BACKEND"] = "torch"
    first, second = (wsbcn.convert(torch.nn.Sequential(torch.nn.Conv2d(8, 8, 1), torch.nn.SyncBatchNorm(8)),
                                   num_groups=4, ws=False)[1] for _ in "ab")
    real = collectives.world_group
    collectives.world_group = lambda: None  # as before init_process_group
    try:
        first(torch.randn(2, 8, 3, 3))
    finally:
        collectives.world_group = real
    first.reset_running_stats()
    x = torch.full((2, 8, 3, 3), float(rank))
    x[:, :, 0, 0] += 0.5  # (some variance)
    for layer in (first, second):
        layer(x)
        whole = torch.cat([torch.full((2, 8, 3, 3), float(r)) for r in range(world)])
        for r in range(world):
            whole[2 * r:2 * r + 2, :, 0, 0] += 0.5
        assert torch.allclose(layer.running_mean, 0.1 * whole.mean(dim=(0, 2, 3)), atol=1e-6)


def case_sync_running_stats_outside_the_group(rank, world):
    """sync_running_stats over a group this rank is not in changes nothing here (it made
    the buffers negative: the world size of a non-member is -1)."""
    import wsbcn

    pair = dist.new_group([0, 1])
    m = torch.nn.Sequential(wsbcn.BatchChannelNorm2d(4, num_groups=2))
    with torch.no_grad():
        m[0].running_mean.fill_(float(rank + 1))
        m[0].running_var.fill_(float(rank + 1))
    wsbcn.distributed.sync_running_stats(m, process_group=pair)
    want = 1.5 if rank < 2 else float(rank + 1)
    assert torch.equal(m[0].running_mean, torch.full((4,), want)) and torch.equal(m[0].running_var, torch.full((4,), want))


def case_large_offset_keeps_its_precision(rank, world, backend, c=4, g=2):
    """Data far from 0 with a small spread (mean 1000, std 0.01): the torch closed form
    sent each rank's absolute mean in fp32 (errors of 1.5e-3); the Triton path and one
    process are near 1e-7."""
    from conftest import rel_err
    from reference import bcn_reference

    os.environ["WSBCN_BACKEND"] = backend
    for mode in MODES:
        gen = torch.Generator().manual_seed(13)
        x = 1000 + 0.01 * torch.randn(2 * world, c, 3, 3, generator=gen)
        params = _params(c, g)
        params["running_mean"] += 1000  # (estimates near the data)
        m = _module(c, g, mode, dist.group.WORLD, params, activation=None)
        x_local = x[2 * rank:2 * rank + 2].clone().requires_grad_(True)
        y = m(x_local)
        dy = torch.randn(x.shape, generator=gen)
        y.backward(dy[2 * rank:2 * rank + 2])
        x64 = x.double().requires_grad_(True)
        ref = _reference_state(params)
        yr = bcn_reference(x64, g, momentum=0.3, estimate=mode == "estimate", **ref)
        yr.backward(dy.double())
        mine = slice(2 * rank, 2 * rank + 2)
        assert rel_err(y, yr[mine]) <= 1e-6 and rel_err(x_local.grad, x64.grad[mine]) <= 1e-6, mode
        assert rel_err(m.running_mean, ref["running_mean"]) <= 1e-6, mode


def case_half_precision_buffers(rank, world, backend, dtype, c=4, g=2):
    """A layer in bf16/fp16 (its running buffers too): the merge stored float64 straight
    into them (the interpreter's float64 -> bf16 store wrote values near 1e-40); now through
    fp32, as a rank without images writes them, so every rank writes the same bits."""
    from conftest import rel_err
    from reference import bcn_reference

    os.environ["WSBCN_BACKEND"] = backend
    for mode in MODES:
        params = _params(c, g, seed=14)
        m = _module(c, g, mode, dist.group.WORLD, params).to(dtype)
        ref = {k: v.to(dtype).double() for k, v in params.items()}
        x = torch.randn(3, c, 3, 3, generator=torch.Generator().manual_seed(15)) + 1
        local = x[:2] if rank == 0 else (x[2:] if rank == 1 else x[:0])
        m(local.to(dtype))
        bcn_reference(x.to(dtype).double(), g, training=True, estimate=mode == "estimate", activation="relu",
                      momentum=0.3, **ref)
        for k in ("running_mean", "running_var"):
            assert rel_err(getattr(m, k), ref[k]) <= 1e-2, (mode, k)
            assert _same_on_every_rank(getattr(m, k)), (mode, k, "differs across ranks")


def case_converted_sync_batch_norm(rank, world):
    """wsbcn.convert of a model with nn.SyncBatchNorm: the BCN layers keep its process
    group (default group: combined over the world), and train as one batch."""
    import wsbcn
    from conftest import rel_err
    from reference import bcn_reference
    from wsbcn.ops.collectives import WORLD

    os.environ["WSBCN_BACKEND"] = "triton"
    pair = dist.new_group([0, 1])
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.SyncBatchNorm(8),
                                torch.nn.Conv2d(8, 8, 1), torch.nn.SyncBatchNorm(8, process_group=pair),
                                torch.nn.Conv2d(8, 8, 1), torch.nn.BatchNorm2d(8))
    converted = wsbcn.convert(model, num_groups=4)
    bcn = [m for m in converted.modules() if isinstance(m, wsbcn.BatchChannelNorm2d)]
    assert [m.process_group for m in bcn] == [WORLD, pair, None]
    explicit = wsbcn.convert(torch.nn.Sequential(torch.nn.SyncBatchNorm(8), torch.nn.BatchNorm2d(8)),
                             process_group=pair)
    assert [m.process_group for m in explicit] == [pair, pair]
    # the converted layer on the default group behaves as one batch of all ranks
    layer = bcn[0]
    x = torch.randn(2 * world, 8, 3, 3, generator=torch.Generator().manual_seed(12)) + 1
    ref = {k: getattr(layer, k).detach().double().clone() for k in ("weight", "bias", "group_weight", "group_bias",
                                                                    "running_mean", "running_var")}
    y = layer(x[2 * rank:2 * rank + 2])
    yr = bcn_reference(x.double(), 4, training=True, momentum=layer.momentum, **ref)
    assert rel_err(y, yr[2 * rank:2 * rank + 2]) <= 2e-5
    assert rel_err(layer.running_var, ref["running_var"]) <= 1e-6


def case_one_collective_each_way(rank, world, c=8, g=4):
    """The Triton path: forward 5 launches around one all_gather, backward with batch
    statistics 4 launches around one all_reduce; estimates: 5 and 0 collectives
    forward, the 3 launches of one process and no collective backward."""
    from wsbcn.kernels import launch

    os.environ["WSBCN_BACKEND"] = "triton"
    calls = []
    wrapped = {}
    for name in ("all_gather_single", "all_gather_into_tensor", "all_gather", "all_reduce", "broadcast",
                 "reduce_scatter_tensor", "all_to_all_single", "barrier"):
        if hasattr(dist, name):
            wrapped[name] = getattr(dist, name)
            setattr(dist, name, (lambda fn, n: lambda *a, **k: (calls.append(n), fn(*a, **k))[1])(wrapped[name], name))
    try:
        for mode, backward_collectives, backward_launches in (("batch", ["all_reduce"], 4), ("estimate", [], 3)):
            m = _module(c, g, mode, dist.group.WORLD, _params(c, g))
            x = torch.randn(2, c, 3, 3).requires_grad_(True)
            m(x).sum().backward()  # first call: compiles (interpreter) and checks
            calls.clear()
            before = dict(launch.stats)
            y = m(x)
            assert calls == ["all_gather_single" if "all_gather_single" in wrapped else "all_gather_into_tensor"]
            assert sum(launch.stats.values()) - sum(before.values()) == 5, mode
            calls.clear()
            before = dict(launch.stats)
            y.sum().backward()
            assert calls == backward_collectives, mode
            assert sum(launch.stats.values()) - sum(before.values()) == backward_launches, mode
    finally:
        for name, fn in wrapped.items():
            setattr(dist, name, fn)


def case_sync_running_stats(rank, world):
    import wsbcn
    from wsbcn.distributed import sync_running_stats

    model = torch.nn.Sequential(wsbcn.BatchChannelNorm2d(4, num_groups=2, estimate=True))
    model[0].running_mean.fill_(float(rank))
    sync_running_stats(model)
    assert torch.allclose(model[0].running_mean, torch.full((4,), 0.5))


# -- the tests ------------------------------------------------------------------------------

def test_two_ranks_triton_match_one_batch(ranks):
    """1 and 3 images; batch statistics on NCHW, estimates on channels_last, fp32."""
    ranks(2).run("case_matches_single_process", backend="triton", sizes=[1, 3], dtypes=[torch.float32],
                 layouts=["nchw"], modes=["batch"])
    ranks(2).run("case_matches_single_process", backend="triton", sizes=[1, 3], dtypes=[torch.float32],
                 layouts=["channels_last"], modes=["estimate"])


def test_three_ranks_torch_match_one_batch(ranks):
    """1, 2 and 1 images through the torch closed form, float64 and fp32."""
    ranks(3).run("case_matches_single_process", backend="torch", sizes=[1, 2, 1],
                 dtypes=[torch.float64, torch.float32], layouts=["nchw", "channels_last"], modes=["batch", "estimate"])


def test_ragged_ranks_single_1x1_image(ranks):
    """Rank 0: one 1x1 image (one value per channel); rank 1: three 3x5 images."""
    ranks(2).run("case_ragged_ranks", backend="triton", shapes=[(1, 1, 1), (3, 3, 5)])


def test_ddp_averages_gradients(ranks):
    ranks(2).run("case_ddp_averages_gradients", backend="triton", sizes=[3, 1])


@pytest.mark.parametrize("backend", [pytest.param("torch", marks=pytest.mark.slow), "triton"])
def test_compiled_model_matches_one_batch(ranks, backend):
    ranks(2).run("case_compiled_matches_one_batch", backend=backend, sizes=[1, 3])


@pytest.mark.parametrize("model_wide", [False, True])
def test_fully_shard_matches_one_batch(ranks, model_wide):
    ranks(2).run("case_fully_shard", backend="triton", model_wide=model_wide)


@pytest.mark.parametrize("case", ["case_fsdp1_nested_model_wide", "case_convert_refuses_a_wrapped_model",
                                  "case_ddp_find_unused_model_wide"])
def test_data_parallel_wrappers(ranks, case):
    """FSDP wrapping blocks under model-wide WS, convert of a wrapped model, and DDP's
    find_unused_parameters with model-wide WS (each case's docstring)."""
    ranks(2).run(case)


def test_mixed_dtypes_and_backends_combine(ranks):
    ranks(3).run("case_mixed_dtypes_and_backends")


def test_disagreeing_ranks_raise_clear_errors(ranks):
    ranks(2).run("case_disagreeing_ranks_raise")


def test_forward_ad_is_refused_before_anything_runs(ranks):
    ranks(2).run("case_forward_ad_refused")


def test_double_backward_is_refused_on_every_rank(ranks):
    ranks(2).run("case_double_backward_refused")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_rank_without_images(ranks, backend):
    ranks(2).run("case_empty_rank", backend=backend)


def test_convert_keeps_sync_batch_norm_process_group(ranks):
    ranks(2).run("case_converted_sync_batch_norm")


def test_one_collective_each_way(ranks):
    ranks(2).run("case_one_collective_each_way")


def test_sync_running_stats_averages_estimates(ranks):
    ranks(2).run("case_sync_running_stats")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_no_values_or_one_value_in_all_ranks(ranks, backend):
    ranks(2).run("case_no_values_or_one_in_all", backend=backend)


def test_default_group_is_looked_up_on_every_call(ranks):
    ranks(2).run("case_world_group_looked_up_per_call")


def test_sync_running_stats_changes_nothing_outside_its_group(ranks):
    ranks(3).run("case_sync_running_stats_outside_the_group")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_running_buffers(ranks, dtype):
    ranks(3).run("case_half_precision_buffers", backend="triton", dtype=dtype)  # rank 2 without images


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_large_offsets_keep_their_precision_across_ranks(ranks, backend):
    ranks(2).run("case_large_offset_keeps_its_precision", backend=backend)


@pytest.mark.slow
@pytest.mark.parametrize("world, sizes", [(2, [1, 3]), (3, [1, 2, 1])])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_ranks_match_one_batch_sweep(ranks, world, sizes, backend):
    """Every mode x dtype x layout."""
    dtypes = [torch.float32, torch.bfloat16] if backend == "triton" else [torch.float64, torch.float32]
    ranks(world).run("case_matches_single_process", backend=backend, sizes=sizes, dtypes=dtypes,
                     layouts=["nchw", "channels_last"], modes=["batch", "estimate"], steps=3)
    ranks(world).run("case_ragged_ranks", backend=backend,
                     shapes=[(1, 1, 1), (3, 3, 5), (2, 4, 2)][:world])
    ranks(world).run("case_empty_rank", backend=backend)


# -- without a second process ------------------------------------------------------------

def test_process_group_without_init_is_a_clear_error():
    import wsbcn

    from conftest import stand_in_group

    m = wsbcn.BatchChannelNorm2d(8, num_groups=4, process_group=stand_in_group())
    with pytest.raises(RuntimeError, match="torch.distributed"):
        m(torch.randn(2, 8, 3, 3))


def test_converted_sync_batch_norm_without_distributed_is_local(backend):
    """As nn.SyncBatchNorm: without torch.distributed, the default group combines nothing."""
    import copy
    import pickle

    import wsbcn
    from wsbcn.ops.collectives import WORLD

    from conftest import DEVICE

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), torch.nn.SyncBatchNorm(8)).to(DEVICE)
    converted = wsbcn.convert(model, num_groups=4)
    assert converted[1].process_group is WORLD
    assert copy.deepcopy(converted)[1].process_group is WORLD and pickle.loads(pickle.dumps(WORLD)) is WORLD
    x = torch.randn(2, 3, 4, 4, device=DEVICE)
    plain = wsbcn.convert(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), torch.nn.BatchNorm2d(8)).to(DEVICE),
                          num_groups=4)
    plain.load_state_dict(converted.state_dict())
    assert torch.equal(converted(x), plain(x))
    assert torch.equal(converted[1].running_var, plain[1].running_var)


# -- CUDA --------------------------------------------------------------------------------

@pytest.mark.gpu
def test_two_gpus_nccl_match_one_batch(tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices (NCCL takes one device per rank)")
    spawn(tmp_path, 2, "case_cuda_matches", pg_backend="nccl", sizes=[1, 3])


@pytest.mark.gpu
def test_one_gpu_nccl_group_runs_the_distributed_kernels(tmp_path):
    """A one-rank NCCL group takes the same path (merge over R = 1, both collectives):
    what a one-GPU machine can check of it, CUDA graph capture included."""
    spawn(tmp_path, 1, "case_cuda_matches", pg_backend="nccl", sizes=[3])


def case_cuda_matches(rank, world, sizes, c=16, g=4):
    """The kernels on CUDA with NCCL, one device per rank, against the float64 reference;
    then a training step captured in a CUDA graph and replayed gives the eager results."""
    from conftest import rel_err
    from reference import bcn_reference

    os.environ["WSBCN_BACKEND"] = "auto"
    lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
    for mode in MODES:
        params = _params(c, g)
        m = _module(c, g, mode, dist.group.WORLD, params).cuda()
        ref = _reference_state(params)
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(sum(sizes), c, 7, 5, generator=gen) + 1
        dy = torch.randn(x.shape, generator=gen)
        x_local = x[lo:hi].cuda().requires_grad_(True)
        y = m(x_local)
        y.backward(dy[lo:hi].cuda())
        x64 = x.double().requires_grad_(True)
        bcn_reference(x64, g, training=True, estimate=mode == "estimate", activation="relu", momentum=0.3,
                      **ref).backward(dy.double())
        assert rel_err(x_local.grad, x64.grad[lo:hi]) <= 2e-5, mode
        for k, grad in _summed_grads(m).items():
            assert rel_err(grad, ref[k].grad) <= 2e-5, (mode, k)
        assert rel_err(m.running_var, ref["running_var"]) <= 1e-6, mode
        assert _same_on_every_rank(m.running_mean) and _same_on_every_rank(m.running_var), mode
    # CUDA graph: no host sync in a step (the header check ran on the first call)
    m = _module(c, g, "batch", dist.group.WORLD, _params(c, g)).cuda()
    static_x = x[lo:hi].cuda().requires_grad_(True)
    static_dy = dy[lo:hi].cuda()

    def step():
        y = m(static_x)
        return y, torch.autograd.grad(y, static_x, static_dy)[0]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y, static_dx = step()
    state = {k: v.clone() for k, v in m.state_dict().items()}
    graph.replay()
    torch.cuda.synchronize()
    replayed = {k: v.clone() for k, v in m.state_dict().items()}
    m.load_state_dict(state)
    y, dx = step()
    assert torch.equal(y, static_y) and torch.equal(dx, static_dx)
    for k, v in m.state_dict().items():
        assert torch.equal(v, replayed[k]), k
