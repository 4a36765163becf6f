"""Test setup: without CUDA, Triton kernels run through the interpreter.

TRITON_INTERPRET must be set before triton is imported, hence here, first.
"""
import contextlib
import os
from unittest import mock

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
if not HAS_CUDA:
    # One CPU thread: the test tensors are small, and on a 2-core machine shared with
    # other work, torch's two threads spin at barriers (a ResNet-50 conversion test:
    # 6.5 s with 2 threads, 1.0 s with 1).
    torch.set_num_threads(1)
if HAS_CUDA:
    # Full fp32 in the convolutions and matmuls that tests compare with float64
    # references: cuDNN's default TF32 convolutions alone miss 1e-5 (seen: the
    # weight gradient of a Conv3d on an H100 at 7.6e-4, with or without wsbcn).
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    """Run the test once per backend (Triton on CPU = the interpreter)."""
    monkeypatch.setenv("WSBCN_BACKEND", request.param)
    return request.param


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64 (absolute when expected is 0)."""
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    denom = e.norm().item()
    return (a - e).norm().item() / (denom if denom > 0 else 1.0)


def stand_in_group():
    """A torch.distributed ProcessGroup object made without initializing torch.distributed
    (no backend): what a layer's process_group argument takes, for the checks that come
    before any collective."""
    import torch.distributed as dist
    return dist.ProcessGroup(dist.HashStore(), 0, 1)


def dead_functorch_wrapper(t: torch.Tensor) -> torch.Tensor:
    """A functorch wrapper of a copy of ``t`` that outlived its transform (leaked from the
    function torch.func.grad ran): ``Function.apply`` unwraps such a tensor first."""
    leaked = []

    def keep(u):
        leaked.append(u)
        return u.sum()

    torch.func.grad(keep)(t.detach().clone())
    assert torch._C._functorch.is_functorch_wrapped_tensor(leaked[0])
    return leaked[0]


def assert_graph_replays_train_like_eager(eager, graphed, input_shape, steps=3):
    """CUDA: SGD training steps of ``graphed`` replayed from one captured CUDA graph give
    the losses and parameters of the same steps run eagerly on ``eager`` (a copy)."""
    opt_e, opt_g = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (eager, graphed))
    static_x = torch.randn(input_shape, device="cuda")

    def step(model, opt, x):
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as CUDA graphs need
        for _ in range(2):
            step(graphed, opt_g, static_x)
            step(eager, opt_e, static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step(graphed, opt_g, static_x)
    for _ in range(steps):
        x = torch.randn(input_shape, device="cuda")
        static_x.copy_(x)
        graph.replay()
        loss = step(eager, opt_e, x)
        torch.testing.assert_close(static_loss, loss, rtol=1e-4, atol=1e-5)
    for p_e, p_g in zip(eager.parameters(), graphed.parameters()):
        torch.testing.assert_close(p_g, p_e, rtol=1e-4, atol=1e-5)


@contextlib.contextmanager
def config_overrides(overrides, kernel=None):
    """Launch with the shape heuristic's config and ``overrides`` laid over it (for
    ``kernel`` only, or every kernel): a plan to test, or a tuned part. A context
    manager rather than a fixture, so hypothesis examples can use it too."""
    from wsbcn import tuning

    heuristic = tuning.config_for

    def config_for(kern, *args, **kwargs):
        config = heuristic(kern, *args, **kwargs)
        if overrides and kernel in (None, kern):
            config.update(overrides)
        return config

    with mock.patch.object(tuning, "config_for", config_for):
        yield


TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2, torch.float64: 1e-10}


try:  # hypothesis profiles: CI replays a fixed set of examples, local runs explore
    from hypothesis import HealthCheck, settings

    settings.register_profile("ci", derandomize=True, deadline=None, database=None,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.register_profile("dev", deadline=None, suppress_health_check=[HealthCheck.too_slow])
    settings.load_profile("ci" if os.environ.get("CI") else "dev")
except ImportError:  # the test extra is not installed: property tests fail to import on their own
    pass
