"""Weight Standardization against the naive float64 reference, on both backends."""
import pytest
import torch
from torch import nn

import wsbcn
from wsbcn.functional import weight_standardize
from conftest import DEVICE, TOL, rel_err
from reference import conv_nd, ws_reference

# (eps_mode, correction, eps): the conventions of DESIGN.md section 3.
CONVENTIONS = [
    ("var", 0, 1e-5),  # paper default
    ("var", 0, 1e-6),  # timm StdConv2d
    ("var", 0, 1e-8),  # BiT
    ("var", 0, 1e-10),  # BiT
    ("std", 1, 1e-5),  # authors' released code, mmcv ConvWS2d
    ("var", 1, 1e-5),
    ("std", 0, 1e-5),
]


def _check_ws(w, eps, correction, eps_mode, tol):
    w = w.detach().requires_grad_(True)
    ref_w = w.detach().double().requires_grad_(True)
    out = weight_standardize(w, eps=eps, correction=correction, eps_mode=eps_mode)
    ref = ws_reference(ref_w, eps, correction, eps_mode)
    assert out.shape == w.shape and out.dtype == w.dtype
    assert rel_err(out, ref) <= tol
    g = torch.randn_like(ref)
    out.backward(g.to(out.dtype))
    ref.backward(g)
    assert rel_err(w.grad, ref_w.grad) <= tol


@pytest.mark.parametrize("eps_mode,correction,eps", CONVENTIONS)
@pytest.mark.parametrize("shape", [(16, 4, 3, 3), (8, 3, 7, 7), (6, 5, 1, 1), (4, 3)])
def test_weight_standardize_matches_reference(backend, eps_mode, correction, eps, shape):
    torch.manual_seed(0)
    w = torch.randn(shape, device=DEVICE) * 0.05 + 0.01
    _check_ws(w, eps, correction, eps_mode, TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_weight_standardize_low_precision(backend, dtype):
    torch.manual_seed(1)
    w = (torch.randn(8, 4, 3, 3, device=DEVICE) * 0.1).to(dtype)
    _check_ws(w, 1e-5, 0, "var", TOL[dtype])


def test_long_rows_loop_path(backend, monkeypatch):
    """Rows longer than the block go through the looped kernel path."""
    from wsbcn import tuning

    monkeypatch.setattr(tuning, "config_for", lambda *a, **k: {"BLOCK": 16, "num_warps": 1})
    torch.manual_seed(2)
    w = torch.randn(5, 3, 5, 5, device=DEVICE) + 100.0  # fan-in 75 = 4 full blocks + 11
    for eps_mode, correction in (("var", 0), ("std", 1)):
        _check_ws(w, 1e-5, correction, eps_mode, TOL[torch.float32])


def test_fan_in_above_2_pow_20(backend):
    torch.manual_seed(3)
    w = torch.randn(2, 1 << 20, device=DEVICE) * 3 + 1
    _check_ws(w, 1e-5, 0, "var", TOL[torch.float32])


def test_channels_last_weight_read_in_place(backend):
    torch.manual_seed(4)
    w = torch.randn(8, 6, 3, 3, device=DEVICE).to(memory_format=torch.channels_last)
    from wsbcn.ops.ws import row_dense

    assert row_dense(w) is w
    _check_ws(w, 1e-5, 0, "var", TOL[torch.float32])
    sliced = torch.randn(8, 12, 3, 3, device=DEVICE)[:, ::2]
    assert not row_dense(sliced).data_ptr() == sliced.data_ptr()
    _check_ws(sliced, 1e-5, 1, "std", TOL[torch.float32])


@pytest.mark.parametrize("eps", [1e-5, 2.0 ** -126])  # the default, and the least eps taken (a normal fp32)
@pytest.mark.parametrize("eps_mode,correction", [("var", 0), ("std", 1)])
def test_constant_filter_gives_zeros_and_finite_grads(backend, eps_mode, correction, eps):
    w = torch.full((4, 3, 3, 3), 0.3, device=DEVICE)
    w[1] = torch.randn(3, 3, 3)  # one ordinary filter beside the constant ones
    w.requires_grad_(True)
    out = weight_standardize(w, eps=eps, eps_mode=eps_mode, correction=correction)
    assert torch.isfinite(out).all()
    assert (out[0] == 0).all() and (out[2] == 0).all()
    out.backward(torch.randn_like(out))
    assert torch.isfinite(w.grad).all()


def test_gradcheck_float64_torch_backend(monkeypatch):
    monkeypatch.setenv("WSBCN_BACKEND", "torch")
    torch.manual_seed(5)
    for eps_mode, correction in (("var", 0), ("std", 1), ("var", 2)):
        w = torch.randn(3, 2, 3, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda t: weight_standardize(t, 1e-3, correction, eps_mode), (w,))


CONV_CASES = [
    (wsbcn.WSConv1d, dict(in_channels=4, out_channels=6, kernel_size=3, padding=1), (2, 4, 9)),
    (wsbcn.WSConv2d, dict(in_channels=4, out_channels=8, kernel_size=1), (2, 4, 5, 5)),
    (wsbcn.WSConv2d, dict(in_channels=4, out_channels=8, kernel_size=3, stride=2, padding=1, dilation=1), (2, 4, 7, 7)),
    (wsbcn.WSConv2d, dict(in_channels=3, out_channels=4, kernel_size=7, padding=3, padding_mode="reflect"), (1, 3, 8, 8)),
    (wsbcn.WSConv2d, dict(in_channels=8, out_channels=8, kernel_size=3, padding=2, dilation=2, groups=4), (2, 8, 6, 6)),
    (wsbcn.WSConv2d, dict(in_channels=8, out_channels=8, kernel_size=3, padding=1, groups=8, bias=False), (2, 8, 5, 5)),
    (wsbcn.WSConv2d, dict(in_channels=4, out_channels=4, kernel_size=3, padding="same", padding_mode="circular"), (1, 4, 6, 6)),
    (wsbcn.WSConv3d, dict(in_channels=2, out_channels=4, kernel_size=3, padding=1), (1, 2, 4, 4, 4)),
]


@pytest.mark.parametrize("cls,kwargs,xshape", CONV_CASES)
@pytest.mark.parametrize("eps_mode,correction,eps", [("var", 0, 1e-5), ("std", 1, 1e-5)])
def test_wsconv_matches_reference(backend, cls, kwargs, xshape, eps_mode, correction, eps):
    torch.manual_seed(6)
    conv = cls(**kwargs, eps=eps, correction=correction, eps_mode=eps_mode).to(DEVICE)
    x = torch.randn(xshape, device=DEVICE, requires_grad=True)
    y = conv(x)
    w64 = conv.weight.detach().double().requires_grad_(True)
    b64 = None if conv.bias is None else conv.bias.detach().double().requires_grad_(True)
    x64 = x.detach().double().requires_grad_(True)
    ref = conv_nd(x64, ws_reference(w64, eps, correction, eps_mode), b64, conv)
    assert rel_err(y, ref) <= TOL[torch.float32]
    g = torch.randn_like(ref)
    y.backward(g.float())
    ref.backward(g)
    assert rel_err(x.grad, x64.grad) <= TOL[torch.float32]
    assert rel_err(conv.weight.grad, w64.grad) <= TOL[torch.float32]
    if b64 is not None:
        assert rel_err(conv.bias.grad, b64.grad) <= TOL[torch.float32]


def test_wsconv_state_dict_and_repr_match_conv():
    plain = torch.nn.Conv2d(4, 8, 3, padding=1, groups=2)
    ws = wsbcn.WSConv2d(4, 8, 3, padding=1, groups=2, eps_mode="std", correction=1)
    assert plain.state_dict().keys() == ws.state_dict().keys()
    ws.load_state_dict(plain.state_dict())
    assert torch.equal(ws.weight, plain.weight)
    text = repr(ws)
    assert text.startswith("WSConv2d(4, 8, kernel_size=(3, 3)") and "eps_mode='std'" in text and "correction=1" in text


BAD_WS_INPUTS = [
    (dict(weight=torch.ones(4, 3, dtype=torch.int32)), TypeError, "floating"),
    (dict(weight=torch.ones(4, 3, dtype=torch.complex64)), TypeError, "floating"),
    (dict(weight=torch.ones(4)), ValueError, "at least 2 dimensions"),
    (dict(weight=torch.ones(4, 3), eps=0.0), ValueError, "eps"),
    (dict(weight=torch.ones(4, 3), eps=-1e-5), ValueError, "eps"),
    (dict(weight=torch.ones(4, 3), eps=1e-40), ValueError, "smallest normal float32"),  # NaN for a constant filter
    (dict(weight=torch.ones(4, 3), eps_mode="l2"), ValueError, "eps_mode"),
    (dict(weight=torch.ones(4, 3), correction=3), ValueError, "correction"),
    (dict(weight=torch.ones(4, 3), correction=-1), ValueError, "correction"),
    (dict(weight=torch.ones(4, 3), correction=0.5), TypeError, "correction"),
    (dict(weight=[[1.0, 2.0]]), TypeError, "weight"),
]


@pytest.mark.parametrize("kwargs,exc,words", BAD_WS_INPUTS)
def test_bad_ws_input_raises_before_kernels(backend, monkeypatch, kwargs, exc, words):
    from wsbcn.ops import ws

    def no_kernel(*a, **k):
        raise AssertionError("a kernel ran before validation")

    monkeypatch.setattr(ws, "_ws_forward_impl", no_kernel)
    with pytest.raises(exc, match=words):
        weight_standardize(**kwargs)


def test_bad_wsconv_arguments():
    with pytest.raises(ValueError, match="eps_mode"):
        wsbcn.WSConv2d(3, 4, 3, eps_mode="bad")
    with pytest.raises(ValueError, match="eps"):
        wsbcn.WSConv2d(3, 4, 3, eps=0)
    with pytest.raises(ValueError, match="correction"):
        wsbcn.WSConv2d(1, 4, 1, correction=1)


@pytest.mark.parametrize("make", [lambda: wsbcn.WSConv2d(4, 4, 1, groups=4), lambda: wsbcn.WSConv2d(1, 4, 1),
                                  lambda: wsbcn.WSConv1d(3, 3, 1, groups=3), lambda: wsbcn.WSConv3d(2, 4, 1, groups=2)])
def test_a_wsconv_with_a_fan_in_of_1_is_refused_before_its_weight_is_drawn(make):
    """One element per filter standardizes to 0 whatever its value, with no gradient: such
    a layer would output its bias alone (float64: (w - w) / sqrt(0 + eps) = 0), so it is
    refused, as a norm of one value per group is, before nn.ConvNd draws its weight."""
    w = torch.randn(4, 1, 1, 1, dtype=torch.float64)
    assert torch.equal(ws_reference(w), torch.zeros_like(w))  # the dead layer refused
    state = torch.get_rng_state()
    with pytest.raises(ValueError, match="fan-in of 1"):
        make()
    assert torch.equal(torch.get_rng_state(), state)


def test_wsconv_pickles_and_deep_copies(tmp_path):
    import copy

    conv = wsbcn.WSConv2d(3, 4, 3).eval()
    clone = copy.deepcopy(conv)
    torch.save(conv, tmp_path / "conv.pt")
    loaded = torch.load(tmp_path / "conv.pt", weights_only=False)
    x = torch.randn(1, 3, 5, 5)
    with torch.no_grad():
        assert torch.equal(loaded(x), conv(x)) and torch.equal(clone(x), conv(x))


# --- standardize="center": centering only, W_hat = W - mean, dW = g - mean(g) ---------

def _center_reference(w64):
    rows = w64.reshape(w64.shape[0], -1)
    return (rows - rows.mean(dim=1, keepdim=True)).reshape(w64.shape)


@pytest.mark.parametrize("block", [None, 16])  # 16: fan-in 75 takes the looped kernel path
def test_center_only_matches_float64_reference(backend, monkeypatch, block):
    from wsbcn import tuning

    if block is not None:
        monkeypatch.setattr(tuning, "config_for", lambda *a, **k: {"BLOCK": block, "num_warps": 1})
    torch.manual_seed(5)
    w = (torch.randn(5, 3, 5, 5, device=DEVICE) * 0.1 + 3.0).requires_grad_(True)
    ref_w = w.detach().double().requires_grad_(True)
    out = weight_standardize(w, standardize="center")
    ref = _center_reference(ref_w)
    assert rel_err(out, ref) <= TOL[torch.float32]
    g = torch.randn_like(ref)
    out.backward(g.float())
    ref.backward(g)
    assert rel_err(w.grad, ref_w.grad) <= TOL[torch.float32]
    assert rel_err(w.grad, g - g.reshape(5, -1).mean(1).view(5, 1, 1, 1)) <= TOL[torch.float32]
    # the full standardization of the same weight is still what it was
    full = weight_standardize(w.detach())
    assert rel_err(full, ws_reference(w.detach().double(), 1e-5, 0, "var")) <= TOL[torch.float32]


def test_center_only_gradcheck_float64_torch_backend(monkeypatch):
    monkeypatch.setenv("WSBCN_BACKEND", "torch")
    torch.manual_seed(6)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    fn = lambda t: weight_standardize(t, standardize="center")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (w,))
    assert torch.autograd.gradgradcheck(fn, (w,))  # the double backward's formula


def test_bad_standardize_is_refused():
    w = torch.randn(4, 3, 3, 3)
    for bad in ("centre", "", None, 1):
        with pytest.raises(ValueError, match="standardize"):
            weight_standardize(w, standardize=bad)
        with pytest.raises(ValueError, match="standardize"):
            wsbcn.WSConv2d(3, 4, 3, standardize=bad)


@pytest.mark.parametrize("kwargs", [dict(eps=-1.0), dict(eps_mode="bad"), dict(correction=27), dict(correction=-1),
                                    dict(standardize="bad"), dict(dtype=torch.complex64), dict(in_channels=0)])
def test_refused_wsconv_arguments_leave_the_random_generator_as_it_was(kwargs):
    """WS's own arguments are checked before nn.Conv2d draws the initial weight: a
    refused call leaves the generator as a refused nn.Conv2d call does, so seeded runs
    that catch the error still reproduce."""
    args = dict(in_channels=3, out_channels=4, kernel_size=3) | kwargs
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    with pytest.raises((ValueError, TypeError)):
        wsbcn.WSConv2d(**args)
    assert torch.equal(torch.rand(4), expected)


@pytest.mark.parametrize("cls,args", [(wsbcn.WSConv1d, (3, 4, 3)), (wsbcn.WSConv2d, (3, 4, 3)),
                                      (wsbcn.WSConv3d, (3, 4, 3)), (wsbcn.GroupNorm, (2, 4)),
                                      (wsbcn.BatchChannelNorm2d, (4, 2))])
def test_skip_init_builds_the_layer_uninitialized(cls, args):
    """torch.nn.utils.skip_init reads ``device`` in the constructor's signature (a
    ``*args`` signature hid it) and builds the layer on meta, then allocates it."""
    m = nn.utils.skip_init(cls, *args, eps=1e-3)
    ref = cls(*args, eps=1e-3)
    assert type(m) is cls and m.eps == 1e-3
    assert [(n, p.shape, p.device) for n, p in m.named_parameters()] == \
        [(n, p.shape, p.device) for n, p in ref.named_parameters()]
