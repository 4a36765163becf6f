"""Distributed BCN: 2 processes on gloo over loopback behave as one batch."""
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HERE = os.path.dirname(os.path.abspath(__file__))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make(estimate, group=None):
    import wsbcn

    torch.manual_seed(0)
    m = wsbcn.BatchChannelNorm2d(8, num_groups=4, estimate=estimate, activation="relu", momentum=0.3,
                                 process_group=group)
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_()
        m.group_weight.uniform_(0.5, 1.5)
        m.group_bias.normal_()
        m.running_mean.normal_(0, 0.2)
    return m


def _data(steps):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 8, 3, 5, generator=gen) * 2 + 1, torch.randn(4, 8, 3, 5, generator=gen)) for _ in range(steps)]


def _run_rank(rank, world, port, estimate, result_path):
    sys.path.insert(0, HERE)
    os.environ["WSBCN_BACKEND"] = "torch"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        from conftest import rel_err

        group = dist.new_group(list(range(world)))
        ours = _make(estimate, group)
        single = _make(estimate)
        b = 4 // world
        for x, g in _data(steps=3):
            x_local = x[rank * b:(rank + 1) * b].clone().requires_grad_(True)
            y_local = ours(x_local)
            y_local.backward(g[rank * b:(rank + 1) * b])
            x_full = x.clone().requires_grad_(True)
            y_full = single(x_full)
            y_full.backward(g)
            assert rel_err(y_local, y_full[rank * b:(rank + 1) * b]) <= 1e-5
            assert rel_err(x_local.grad, x_full.grad[rank * b:(rank + 1) * b]) <= 1e-5
            for p_ours, p_single in zip(ours.parameters(), single.parameters()):
                summed = p_ours.grad.clone()
                dist.all_reduce(summed)  # what DDP's sum of local gradients gives
                assert rel_err(summed, p_single.grad) <= 1e-5
                p_ours.grad = None
                p_single.grad = None
            for b_ours, b_single in zip(ours.buffers(), single.buffers()):
                assert torch.allclose(b_ours.double(), b_single.double(), rtol=1e-5, atol=1e-6)
        if rank == 0:
            with open(result_path, "w") as f:
                f.write("ok")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("estimate", [False, True])
def test_two_ranks_equal_one_batch(tmp_path, estimate):
    result = tmp_path / "result"
    mp.spawn(_run_rank, args=(2, _free_port(), estimate, str(result)), nprocs=2, join=True)
    assert result.read_text() == "ok"


def _run_sync(rank, world, port, result_path):
    sys.path.insert(0, HERE)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        import wsbcn
        from wsbcn.distributed import sync_running_stats

        model = torch.nn.Sequential(wsbcn.BatchChannelNorm2d(4, num_groups=2, estimate=True))
        model[0].running_mean.fill_(float(rank))
        sync_running_stats(model)
        assert torch.allclose(model[0].running_mean, torch.full((4,), 0.5))
        if rank == 0:
            with open(result_path, "w") as f:
                f.write("ok")
    finally:
        dist.destroy_process_group()


def test_sync_running_stats_averages_estimates(tmp_path):
    result = tmp_path / "result"
    mp.spawn(_run_sync, args=(2, _free_port(), str(result)), nprocs=2, join=True)
    assert result.read_text() == "ok"


def test_process_group_without_init_is_a_clear_error():
    import wsbcn

    m = wsbcn.BatchChannelNorm2d(8, num_groups=4, process_group=object())
    with pytest.raises(RuntimeError, match="torch.distributed"):
        m(torch.randn(2, 8, 3, 3))
