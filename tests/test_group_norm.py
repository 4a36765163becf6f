"""wsbcn.GroupNorm against nn.GroupNorm and the naive float64 reference."""
import pytest
import torch

import wsbcn
from wsbcn.functional import group_norm
from conftest import DEVICE, TOL, rel_err
from reference import gn_reference

SHAPES = {
    "2d": lambda: torch.randn(2, 8, 5, 3),
    "2d_channels_last": lambda: torch.randn(2, 8, 4, 5).to(memory_format=torch.channels_last),
    "1d": lambda: torch.randn(3, 8, 6),
    "nc": lambda: torch.randn(3, 8),
    "3d_channels_last": lambda: torch.randn(1, 8, 2, 3, 3).to(memory_format=torch.channels_last_3d),
    "sliced": lambda: torch.randn(2, 8, 6, 6)[..., ::2],
}


def check_gn(x, num_groups, activation=None, affine=True, tol=None):
    tol = tol or TOL[x.dtype]
    c = x.shape[1]
    x = x.detach().requires_grad_(True)
    w = (torch.rand(c, device=x.device) + 0.5).requires_grad_(True) if affine else None
    b = torch.randn(c, device=x.device).requires_grad_(True) if affine else None
    y = group_norm(x, num_groups, w, b, 1e-5, activation)
    x64 = x.detach().double().requires_grad_(True)
    w64 = w.detach().double().requires_grad_(True) if affine else None
    b64 = b.detach().double().requires_grad_(True) if affine else None
    yr = gn_reference(x64, num_groups, w64, b64, 1e-5, activation)
    assert y.dtype == x.dtype
    assert rel_err(y, yr) <= tol
    g = torch.randn_like(yr)
    y.backward(g.to(y.dtype))
    yr.backward(g)
    assert rel_err(x.grad, x64.grad) <= tol
    if affine:
        assert rel_err(w.grad, w64.grad) <= tol
        assert rel_err(b.grad, b64.grad) <= tol


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("activation", [None, "relu", "silu"])
def test_group_norm_matches_reference(backend, shape, activation):
    torch.manual_seed(0)
    check_gn(SHAPES[shape]().to(DEVICE) * 2 + 1, 2, activation)


@pytest.mark.parametrize("num_groups", [1, 4, 8])
def test_group_norm_group_counts_and_no_affine(backend, num_groups):
    torch.manual_seed(1)
    check_gn(torch.randn(2, 8, 3, 3, device=DEVICE), num_groups, affine=num_groups != 4)


def test_weight_without_bias_like_f_group_norm(backend):
    x = torch.randn(2, 8, 3, 3, device=DEVICE)
    w = torch.rand(8, device=DEVICE) + 0.5
    expected = torch.nn.functional.group_norm(x, 4, w)
    assert rel_err(group_norm(x, 4, w), expected) <= 1e-5
    assert rel_err(group_norm(x, 4, None, w), torch.nn.functional.group_norm(x, 4, None, w)) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_group_norm_low_precision(backend, dtype):
    torch.manual_seed(2)
    x = torch.randn(2, 8, 4, 4, device=DEVICE).to(dtype).to(memory_format=torch.channels_last)
    check_gn(x, 4, "relu")


def test_fp32_statistics_under_autocast(backend):
    """Under autocast a float32 input gets float32 statistics (see test_bcn's test of the
    same name: the closed form's linalg.vecdot ran in bfloat16)."""
    torch.manual_seed(4)
    with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
        check_gn(torch.randn(2, 8, 5, 5, device=DEVICE) * 2 + 1, 4, "relu")


def test_group_norm_large_offset(backend):
    torch.manual_seed(3)
    check_gn(1e4 + torch.randn(2, 8, 6, 6, device=DEVICE), 4, tol=1e-5)


def test_module_is_a_drop_in_for_nn_group_norm(backend):
    torch.manual_seed(4)
    ref = torch.nn.GroupNorm(4, 8).to(DEVICE)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.normal_()
    ours = wsbcn.GroupNorm(4, 8).to(DEVICE)
    ours.load_state_dict(ref.state_dict())
    assert isinstance(ours, torch.nn.GroupNorm)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(2, 8, 5, 5, device=DEVICE, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y, y_ref = ours(x), ref(x2)
    assert rel_err(y, y_ref) <= 1e-5
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert rel_err(x.grad, x2.grad) <= 1e-5
    assert rel_err(ours.weight.grad, ref.weight.grad) <= 1e-5
    assert rel_err(ours.bias.grad, ref.bias.grad) <= 1e-5
    assert repr(ours) == repr(ref)
    assert repr(wsbcn.GroupNorm(4, 8, activation="silu")).endswith("activation='silu')")


def test_bad_group_norm_inputs(backend, monkeypatch):
    from wsbcn.ops import norm

    monkeypatch.setattr(norm, "_norm_forward_impl", lambda *a, **k: (_ for _ in ()).throw(AssertionError("kernel ran")))
    x = torch.randn(2, 8, 3, 3, device=DEVICE)
    with pytest.raises(ValueError, match="divisible"):
        group_norm(x, 3)
    with pytest.raises(ValueError, match="num_groups"):
        group_norm(x, -2)
    with pytest.raises(ValueError, match="eps"):
        group_norm(x, 4, eps=0)
    with pytest.raises(ValueError, match="activation"):
        group_norm(x, 4, activation="elu")
    with pytest.raises(TypeError, match="floating"):
        group_norm(x.long(), 4)
    with pytest.raises(ValueError, match="dimensions"):
        group_norm(torch.randn(8, device=DEVICE), 4)
    with pytest.raises(ValueError, match="weight"):
        group_norm(x, 4, torch.ones(4, device=DEVICE), torch.ones(4, device=DEVICE))
    with pytest.raises(ValueError, match="bias"):
        group_norm(x, 4, torch.ones(8, device=DEVICE), torch.ones(3, device=DEVICE))
    with pytest.raises(ValueError, match="channels"):
        wsbcn.GroupNorm(4, 8).to(DEVICE)(torch.randn(2, 4, 3, 3, device=DEVICE))
    with pytest.raises(ValueError, match="divisible"):
        wsbcn.GroupNorm(3, 8)
    # one value in all (N * C/G * spatial == 1): refused as nn.GroupNorm refuses it, in eval too
    for shape in ((1, 8, 1, 1), (1, 8, 1)):
        for layer in (torch.nn.GroupNorm(8, 8), wsbcn.GroupNorm(8, 8)):
            with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
                layer.to(DEVICE).eval()(torch.randn(shape, device=DEVICE))
