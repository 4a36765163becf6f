"""GPU-only checks (``-m gpu``): large shapes, > 2^31 elements, determinism run to run
and across every autotune candidate.
They compare the Triton kernels with the torch closed form on the same device."""
import pytest
import torch

from wsbcn.functional import batch_channel_norm, weight_standardize
from conftest import rel_err

pytestmark = pytest.mark.gpu


def _both_backends(fn, monkeypatch):
    monkeypatch.setenv("WSBCN_BACKEND", "torch")
    expected = fn()
    monkeypatch.setenv("WSBCN_BACKEND", "triton")
    return fn(), expected


@pytest.mark.parametrize("shape,groups", [((1024, 64, 4, 4), 32), ((8, 8192, 1, 1), 32), ((2, 8192, 7, 7), 1),
                                          ((1, 256, 112, 112), 32), ((128, 2048, 7, 7), 32)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_large_shapes_match_torch_backend(monkeypatch, shape, groups, layout):
    torch.manual_seed(0)
    x = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    c = shape[1]

    def run():
        rm, rv = torch.zeros(c, device="cuda"), torch.ones(c, device="cuda")
        xs = x.detach().requires_grad_(True)
        y = batch_channel_norm(xs, groups, rm, rv, training=True, activation="relu")
        (dx,) = torch.autograd.grad(y, xs, torch.ones_like(y))
        return y.float(), dx.float(), rm

    got, expected = _both_backends(run, monkeypatch)
    for a, b in zip(got, expected):
        assert rel_err(a, b) <= 2e-2


def test_more_than_2_pow_31_elements(monkeypatch):
    """One sample of 2^31 elements: offsets need int64. x[0, c, s] = a_c z_s + b_c
    normalizes (BN stage) to the same z_hat in every channel, so the result is known."""
    c, s = 128, 1 << 24
    z = torch.randn(s, device="cuda")
    z_hat = (z - z.double().mean().float()) / z.double().std(correction=0).float()
    a = torch.rand(c, 1, device="cuda") + 0.5
    b = torch.randn(c, 1, device="cuda")
    x = (a * z + b).to(torch.bfloat16).reshape(1, c, 4096, 4096)
    del a, b
    monkeypatch.setenv("WSBCN_BACKEND", "triton")
    y2 = batch_channel_norm(x, 1, torch.zeros(c, device="cuda"), torch.ones(c, device="cuda"), training=True)
    expected = z_hat / torch.sqrt(torch.tensor(1.0 + 1e-5, device="cuda"))
    for idx in (0, 12345, s // 2, s - 1):
        assert torch.allclose(y2.reshape(c, s)[:, idx].float(), expected[idx].expand(c), atol=5e-2)


def test_ws_large_fan_in_and_bitwise_determinism(monkeypatch):
    monkeypatch.setenv("WSBCN_BACKEND", "triton")
    w = torch.randn(2048, 1024, 3, 3, device="cuda", requires_grad=True)
    outs = []
    for _ in range(2):
        w_hat = weight_standardize(w)
        (g,) = torch.autograd.grad(w_hat, w, torch.ones_like(w_hat))
        outs.append((w_hat, g))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_bcn_bitwise_determinism(monkeypatch):
    monkeypatch.setenv("WSBCN_BACKEND", "triton")
    x = torch.randn(2, 256, 56, 56, device="cuda", requires_grad=True)
    outs = []
    for _ in range(3):
        rm, rv = torch.zeros(256, device="cuda"), torch.ones(256, device="cuda")
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
    x = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    n, c = shape[:2]
    nsc = (n, c, shape[2] * shape[3])
    spaces = {k: autotune.config_space(k, x, nsc, channels_fastest(x)) for k in ("norm_fwd", "norm_bwd")}
    assert min(len(v) for v in spaces.values()) > 4

    def run(fwd, bwd):
        configs = {"norm_fwd": fwd, "norm_bwd": bwd}
        monkeypatch.setattr(tuning, "config_for", lambda kernel, *a, **k: dict(configs[kernel]))
        rm, rv = torch.zeros(c, device="cuda"), torch.ones(c, device="cuda")
        leaves = [x.detach().requires_grad_(True), torch.ones(c, device="cuda", requires_grad=True),
                  torch.zeros(c, device="cuda", requires_grad=True),
                  torch.ones(1, 32, 1, device="cuda", requires_grad=True),
                  torch.zeros(1, 32, 1, device="cuda", requires_grad=True)]
        y = batch_channel_norm(leaves[0], 32, rm, rv, *leaves[1:], training=True, activation="silu")
        grads = torch.autograd.grad(y, leaves, torch.linspace(-1, 1, y.numel(), device="cuda").reshape(y.shape).to(y.dtype))
        return [y, *grads, rm, rv]

    first = run(spaces["norm_fwd"][0], spaces["norm_bwd"][0])
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
    w = torch.randn(shape, device="cuda", requires_grad=True)
    fan_in = w[0].numel()
    spaces = {k: autotune.config_space(k, w, (shape[0], fan_in), False) for k in ("ws_fwd", "ws_bwd")}
    results = []
    for fwd, bwd in zip(spaces["ws_fwd"], spaces["ws_bwd"]):
        configs = {"ws_fwd": fwd, "ws_bwd": bwd}
        monkeypatch.setattr(tuning, "config_for", lambda kernel, *a, **k: dict(configs[kernel]))
        w_hat = weight_standardize(w)
        (g,) = torch.autograd.grad(w_hat, w, torch.linspace(-1, 1, w.numel(), device="cuda").reshape(shape))
        results.append((w_hat, g))
    assert len(results) > 2
    for w_hat, g in results[1:]:
        assert torch.equal(w_hat, results[0][0]) and torch.equal(g, results[0][1])
