"""GPU-only checks (``-m gpu``): large shapes, > 2^31 elements, determinism run to run
and across every autotune candidate.

They compare the Triton kernels with the naive float64 references of tests/reference.py
on the same device (or with a result known in closed form), never with wsbcn's own
torch backend: a mistake the two backends share would pass that comparison."""
import pytest
import torch

from wsbcn.functional import batch_channel_norm, group_norm, weight_standardize
from conftest import TOL, rel_err
from reference import bcn_reference, gn_reference, ws_reference

pytestmark = pytest.mark.gpu
DEVICE = "cuda"


def _grad_output(shape, dtype):
    """A deterministic output gradient with both signs (ones would hide sign errors)."""
    return torch.linspace(-1, 1, torch.Size(shape).numel(), device=DEVICE).reshape(shape).to(dtype)


@pytest.mark.parametrize("shape,groups", [((1024, 64, 4, 4), 32), ((8, 8192, 1, 1), 32), ((2, 8192, 7, 7), 1),
                                          ((1, 256, 112, 112), 32), ((128, 2048, 7, 7), 32)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_large_shapes_match_the_float64_reference(monkeypatch, shape, groups, layout):
    """BCN (training, relu) and GroupNorm in bf16 at large shapes: outputs, input
    gradients and running buffers against the float64 references of the same input."""
    monkeypatch.setenv("WSBCN_BACKEND", "triton")
    torch.manual_seed(0)
    x = torch.randn(shape, device=DEVICE, dtype=torch.bfloat16) * 2 + 0.5
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    c = shape[1]
    dy = _grad_output(shape, x.dtype)
    tol = TOL[torch.bfloat16]

    rm, rv = torch.zeros(c, device=DEVICE), torch.ones(c, device=DEVICE)
    xs = x.detach().requires_grad_(True)
    y = batch_channel_norm(xs, groups, rm, rv, training=True, activation="relu")
    (dx,) = torch.autograd.grad(y, xs, dy)
    rm64, rv64 = torch.zeros(c, device=DEVICE, dtype=torch.float64), torch.ones(c, device=DEVICE, dtype=torch.float64)
    x64 = x.detach().double().requires_grad_(True)
    y64 = bcn_reference(x64, groups, running_mean=rm64, running_var=rv64, training=True, activation="relu")
    (dx64,) = torch.autograd.grad(y64, x64, dy.double())
    assert rel_err(y, y64) <= tol and rel_err(dx, dx64) <= tol
    assert rel_err(rm, rm64) <= 1e-5 and rel_err(rv, rv64) <= 1e-5
    del y64, dx64, x64

    w = torch.rand(c, device=DEVICE) + 0.5
    b = torch.randn(c, device=DEVICE)
    xs = x.detach().requires_grad_(True)
    y = group_norm(xs, groups, w, b)
    (dx,) = torch.autograd.grad(y, xs, dy)
    x64 = x.detach().double().requires_grad_(True)
    y64 = gn_reference(x64, groups, w.double(), b.double())
    (dx64,) = torch.autograd.grad(y64, x64, dy.double())
    assert rel_err(y, y64) <= tol and rel_err(dx, dx64) <= tol


def test_more_than_2_pow_31_elements(monkeypatch):
    """One sample of 2^31 elements: offsets need int64. x[0, c, s] = a_c z_s + b_c
    normalizes (BN stage) to the same z_hat in every channel, so the result is known."""
    c, s = 128, 1 << 24
    z = torch.randn(s, device=DEVICE)
    z_hat = (z - z.double().mean().float()) / z.double().std(correction=0).float()
    a = torch.rand(c, 1, device=DEVICE) + 0.5
    b = torch.randn(c, 1, device=DEVICE)
    x = (a * z + b).to(torch.bfloat16).reshape(1, c, 4096, 4096)
    del a, b
    monkeypatch.setenv("WSBCN_BACKEND", "triton")
    y2 = batch_channel_norm(x, 1, torch.zeros(c, device=DEVICE), torch.ones(c, device=DEVICE), training=True)
    expected = z_hat / torch.sqrt(torch.tensor(1.0 + 1e-5, device=DEVICE))
    for idx in (0, 12345, s // 2, s - 1):
        assert torch.allclose(y2.reshape(c, s)[:, idx].float(), expected[idx].expand(c), atol=5e-2)


def test_ws_large_fan_in_and_bitwise_determinism(monkeypatch):
    monkeypatch.setenv("WSBCN_BACKEND", "triton")
    torch.manual_seed(1)
    w = (torch.randn(2048, 1024, 3, 3, device=DEVICE) * 0.05 + 0.01).requires_grad_(True)
    dw_hat = _grad_output(w.shape, w.dtype)
    outs = []
    for _ in range(2):
        w_hat = weight_standardize(w)
        (g,) = torch.autograd.grad(w_hat, w, dw_hat)
        outs.append((w_hat, g))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    w64 = w.detach().double().requires_grad_(True)
    ref = ws_reference(w64)
    (g64,) = torch.autograd.grad(ref, w64, dw_hat.double())
    assert rel_err(outs[0][0], ref) <= TOL[torch.float32] and rel_err(outs[0][1], g64) <= 1e-4


def test_bcn_bitwise_determinism(monkeypatch):
    monkeypatch.setenv("WSBCN_BACKEND", "triton")
    x = torch.randn(2, 256, 56, 56, device=DEVICE, requires_grad=True)
    outs = []
    for _ in range(3):
        rm, rv = torch.zeros(256, device=DEVICE), torch.ones(256, device=DEVICE)
        y = batch_channel_norm(x, 32, rm, rv, training=True, activation="silu")
        (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
        outs.append((y, dx, rm, rv))
    for run in outs[1:]:
        for a, b in zip(outs[0], run):
            assert torch.equal(a, b)


@pytest.mark.parametrize("shape", [(2, 256, 56, 56), (32, 512, 14, 14), (1, 64, 112, 112)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_every_autotune_candidate_gives_bit_identical_bcn(monkeypatch, shape, layout):
    """The whole autotune space of the forward and of the backward (BLOCK_C,
    num_warps, num_stages on the heuristic's plan) gives the same bits: output, dx,
    parameter gradients, running buffers."""
    from wsbcn import tuning
    from wsbcn.tools import autotune
    from wsbcn.kernels.layout import channels_fastest

    monkeypatch.setenv("WSBCN_BACKEND", "triton")
    torch.manual_seed(0)
    x = torch.randn(shape, device=DEVICE, dtype=torch.bfloat16)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    n, c = shape[:2]
    nsc = (n, c, shape[2] * shape[3])
    spaces = {k: autotune.config_space(k, x, nsc, channels_fastest(x)) for k in ("norm_fwd", "norm_bwd")}
    assert min(len(v) for v in spaces.values()) > 4

    def run(fwd, bwd):
        configs = {"norm_fwd": fwd, "norm_bwd": bwd}
        monkeypatch.setattr(tuning, "config_for", lambda kernel, *a, **k: dict(configs[kernel]))
        rm, rv = torch.zeros(c, device=DEVICE), torch.ones(c, device=DEVICE)
        leaves = [x.detach().requires_grad_(True), torch.ones(c, device=DEVICE, requires_grad=True),
                  torch.zeros(c, device=DEVICE, requires_grad=True),
                  torch.ones(1, 32, 1, device=DEVICE, requires_grad=True),
                  torch.zeros(1, 32, 1, device=DEVICE, requires_grad=True)]
        y = batch_channel_norm(leaves[0], 32, rm, rv, *leaves[1:], training=True, activation="silu")
        grads = torch.autograd.grad(y, leaves, torch.linspace(-1, 1, y.numel(), device=DEVICE).reshape(y.shape).to(y.dtype))
        return [y, *grads, rm, rv]

    first = run(spaces["norm_fwd"][0], spaces["norm_bwd"][0])
    # the shared bits are right: against the float64 reference
    leaves64 = [x.detach().double().requires_grad_(True), torch.ones(c, device=DEVICE, dtype=torch.float64, requires_grad=True),
                torch.zeros(c, device=DEVICE, dtype=torch.float64, requires_grad=True),
                torch.ones(1, 32, 1, device=DEVICE, dtype=torch.float64, requires_grad=True),
                torch.zeros(1, 32, 1, device=DEVICE, dtype=torch.float64, requires_grad=True)]
    rm64, rv64 = torch.zeros(c, device=DEVICE, dtype=torch.float64), torch.ones(c, device=DEVICE, dtype=torch.float64)
    y64 = bcn_reference(leaves64[0], 32, *leaves64[1:], running_mean=rm64, running_var=rv64, training=True,
                        activation="silu")
    dy = torch.linspace(-1, 1, y64.numel(), device=DEVICE).reshape(y64.shape).to(x.dtype)  # run's
    grads64 = torch.autograd.grad(y64, leaves64, dy.double())
    tol = TOL[torch.bfloat16]
    for got, expected in zip(first, [y64, *grads64, rm64, rv64]):
        assert rel_err(got, expected) <= tol
    for fwd in spaces["norm_fwd"][1:]:
        for a, b in zip(first, run(fwd, spaces["norm_bwd"][0])):
            assert torch.equal(a, b), fwd
    for bwd in spaces["norm_bwd"][1:]:
        for a, b in zip(first, run(spaces["norm_fwd"][0], bwd)):
            assert torch.equal(a, b), bwd


@pytest.mark.parametrize("shape", [(256, 128, 3, 3), (64, 512, 3, 3), (2048, 1024, 1, 1)])
def test_every_autotune_candidate_gives_bit_identical_ws(monkeypatch, shape):
    from wsbcn import tuning
    from wsbcn.tools import autotune

    monkeypatch.setenv("WSBCN_BACKEND", "triton")
    torch.manual_seed(0)
    w = torch.randn(shape, device=DEVICE, requires_grad=True)
    fan_in = w[0].numel()
    spaces = {k: autotune.config_space(k, w, (shape[0], fan_in), False) for k in ("ws_fwd", "ws_bwd")}
    results = []
    for fwd, bwd in zip(spaces["ws_fwd"], spaces["ws_bwd"]):
        configs = {"ws_fwd": fwd, "ws_bwd": bwd}
        monkeypatch.setattr(tuning, "config_for", lambda kernel, *a, **k: dict(configs[kernel]))
        w_hat = weight_standardize(w)
        (g,) = torch.autograd.grad(w_hat, w, torch.linspace(-1, 1, w.numel(), device=DEVICE).reshape(shape))
        results.append((w_hat, g))
    assert len(results) > 2
    for w_hat, g in results[1:]:
        assert torch.equal(w_hat, results[0][0]) and torch.equal(g, results[0][1])
    w64 = w.detach().double().requires_grad_(True)
    ref = ws_reference(w64)
    (g64,) = torch.autograd.grad(ref, w64, torch.linspace(-1, 1, w.numel(), device=DEVICE, dtype=torch.float64)
                                 .reshape(shape))
    assert rel_err(results[0][0], ref) <= TOL[torch.float32] and rel_err(results[0][1], g64) <= 1e-4
