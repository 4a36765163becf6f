"""Property-based parity: random shapes, strides, dtypes and modes against the
naive float64 reference, on both backends (Triton through the interpreter)."""
import contextlib
import os

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from wsbcn.functional import batch_channel_norm, group_norm, weight_standardize
from conftest import DEVICE, config_overrides
from reference import bcn_reference, gn_reference, ws_reference

@contextlib.contextmanager
def backend_env(name):
    """WSBCN_BACKEND for one hypothesis example, restored afterwards."""
    old = os.environ.get("WSBCN_BACKEND")
    os.environ["WSBCN_BACKEND"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("WSBCN_BACKEND", None)
        else:
            os.environ["WSBCN_BACKEND"] = old


# Plans for the Triton backend: None keeps the heuristic's (on CPU, one element per
# lane); the others give lanes several elements and several chunks, as GPU plans do
# (kernels/reduce.py).
NORM_PLANS = [None, {"BLOCK_S": 1, "split": 2}, {"BLOCK_S": 2, "split": 1}, {"BLOCK_S": 4, "split": 3}]
WS_PLANS = [None, {"BLOCK": 2}, {"BLOCK": 8}]


# Relative tolerance on the norm, plus an absolute floor per element: tiny groups
# (K * S = 1 or 2) give gradients that are pure rounding noise around zero.
TOLS = {torch.float32: (1e-5, 1e-5), torch.float16: (5e-3, 5e-3), torch.bfloat16: (3e-2, 3e-2)}


def close(actual, expected, dtype, floor_scale=1.0, naive=None):
    """Within the dtype's tolerance of the float64 reference, or (for
    ill-conditioned cases) no more than 10x further from it than the naive fp32
    composition is: both meet the same rounding, amplified by the conditioning."""
    rel, abs_floor = TOLS[dtype]
    abs_floor *= floor_scale
    e = expected.detach().double().cpu()
    # values the dtype cannot hold (|x| > its max) are not compared: inf is right there
    unrepresentable = e.abs() > torch.finfo(actual.dtype).max

    def dist(t):
        t = t.detach().double().cpu()
        skip = (torch.isnan(t) & torch.isnan(e)) | unrepresentable
        return (torch.where(skip, 0.0, t) - torch.where(skip, 0.0, e)).norm().item()

    e_norm = torch.where(torch.isnan(e) | unrepresentable, 0.0, e).norm().item()
    err = dist(actual)
    if err <= rel * e_norm + abs_floor * max(1, e.numel()) ** 0.5:
        return True
    return naive is not None and err <= 10 * dist(naive)


@st.composite
def norm_cases(draw):
    n = draw(st.integers(1, 4))
    g = draw(st.integers(1, 4))
    k = draw(st.integers(1, 4))
    spatial = tuple(draw(st.lists(st.integers(1, 5), min_size=0, max_size=3)))
    layout = draw(st.sampled_from(["contiguous", "channels_last", "sliced", "transposed", "expanded"]))
    dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.float16, torch.bfloat16]))
    mode = draw(st.sampled_from(["batch", "estimate", "eval", "gn"]))
    activation = draw(st.sampled_from([None, "relu", "silu"]))
    group_affine = draw(st.booleans())
    affine = draw(st.booleans())
    offset = draw(st.sampled_from([0.0, 3.0, -50.0]))
    seed = draw(st.integers(0, 2**16))
    plan = draw(st.sampled_from(NORM_PLANS))
    return dict(n=n, g=g, k=k, spatial=spatial, layout=layout, dtype=dtype, mode=mode, activation=activation,
                group_affine=group_affine, affine=affine, offset=offset, seed=seed, plan=plan)


def make_input(case):
    torch.manual_seed(case["seed"])
    n, c, spatial, layout = case["n"], case["g"] * case["k"], case["spatial"], case["layout"]
    shape = (n, c) + spatial
    base = torch.randn(shape, device=DEVICE) * 2 + case["offset"]
    if layout == "channels_last" and len(spatial) in (2, 3):
        fmt = torch.channels_last if len(spatial) == 2 else torch.channels_last_3d
        base = base.contiguous(memory_format=fmt)
    elif layout == "sliced":
        big = torch.randn((n, 2 * c) + tuple(2 * s for s in spatial), device=DEVICE) * 2 + case["offset"]
        base = big[(slice(None), slice(None, None, 2)) + tuple(slice(None, None, 2) for _ in spatial)]
    elif layout == "transposed" and len(spatial) >= 2:
        base = base.transpose(-1, -2).contiguous().transpose(-1, -2)
    elif layout == "expanded":
        base = base[:1].expand(shape)
    return base.to(case["dtype"])


def run_case(case):
    x = make_input(case)
    c, g = x.shape[1], case["g"]
    torch.manual_seed(case["seed"] + 1)
    gen = dict(device=DEVICE)
    aff = g if case["group_affine"] else c
    params = dict(weight=torch.rand(c, **gen) + 0.5, bias=torch.randn(c, **gen),
                  group_weight=torch.rand(1, aff, 1, **gen) + 0.5, group_bias=torch.randn(1, aff, 1, **gen))
    if not case["affine"]:
        params = {k: None for k in params}
    learn = {k: v.clone().requires_grad_(True) for k, v in params.items() if v is not None}
    learn64 = {k: v.detach().double().requires_grad_(True) for k, v in learn.items()}
    xs = x.detach().requires_grad_(True)  # keeps the drawn strides
    x64 = x.detach().double().requires_grad_(True)
    g_out = torch.randn(x.shape, dtype=torch.float64, device=DEVICE)
    rm, rv = torch.randn(c, **gen) * 0.3 + case["offset"], torch.rand(c, **gen) + 0.5
    rm64, rv64 = rm.double().clone(), rv.double().clone()
    learn32 = {k: v.detach().float().requires_grad_(True) for k, v in learn.items()}
    x32 = x.detach().float().requires_grad_(True)
    act = case["activation"]
    ref_act = None if act == "relu" else act  # the references' ReLU comes below (ties)
    if case["mode"] == "gn":
        if x.numel() // g == 1:  # one value in all: refused, as nn.GroupNorm refuses it
            with pytest.raises(ValueError, match="more than 1 value"):
                group_norm(xs, g, learn.get("weight"), learn.get("bias"))
            with pytest.raises(ValueError, match="more than 1 value"):
                torch.nn.functional.group_norm(x64, g)
            return
        y = group_norm(xs, g, learn.get("weight"), learn.get("bias"), activation=case["activation"])
        y_ref = gn_reference(x64, g, learn64.get("weight"), learn64.get("bias"), activation=ref_act)
        y_naive = gn_reference(x32, g, learn32.get("weight"), learn32.get("bias"), activation=ref_act,
                               dtype=torch.float32)
        leaves = [k for k in ("weight", "bias") if k in learn]
        rho = bn_gain = torch.ones(1)
    else:
        training = case["mode"] != "eval"
        estimate = case["mode"] == "estimate"
        if case["mode"] == "batch" and x[0, 0].numel() * x.shape[0] == 1:
            with pytest.raises(ValueError, match="more than 1 value"):
                batch_channel_norm(xs, g, rm, rv, training=True, **learn)
            return
        if case["k"] * x[0, 0].numel() == 1:  # a channel stage of one value per group: its output the bias alone
            before = rm.clone(), rv.clone()
            with pytest.raises(ValueError, match="one value per group"):
                batch_channel_norm(xs, g, rm, rv, training=training, estimate=estimate, **learn)
            assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])
            return
        rm32, rv32 = rm.clone(), rv.clone()
        y = batch_channel_norm(xs, g, rm, rv, training=training, estimate=estimate,
                               activation=case["activation"], **{k: learn.get(k) for k in params})
        y_ref, bn_gain, rho = bcn_reference(x64, g, running_mean=rm64, running_var=rv64, training=training,
                                   estimate=estimate, activation=ref_act, return_rho=True,
                                   **{k: learn64.get(k) for k in params})
        y_naive = bcn_reference(x32, g, running_mean=rm32, running_var=rv32, training=training, estimate=estimate,
                                activation=ref_act, dtype=torch.float32,
                                **{k: learn32.get(k) for k in params})
        leaves = list(learn)
    dtype = case["dtype"]
    # Groups of variance ~0 turn rounding into rounding * 1/sqrt(eps) (~300 ulp)
    # where the naive composition happens to be exact: a group of one value
    # (K*S = 1), or batch statistics of two values per channel, which BN maps to
    # exactly +-1 so that whole groups often hold equal values. More generally a
    # group or channel whose spread is small next to eps has a gain >> 1 (rho, or
    # r relative to the data's scale), and any fp32 evaluation's absolute error
    # grows with it: the floor scales with the largest gains.
    s = x[0, 0].numel()
    degenerate = case["k"] * s == 1 or (case["mode"] == "batch" and x.shape[0] * s == 2)  # (the first: GN)
    gain = max(1.0, rho.max().item()) * max(1.0, bn_gain.max().item() * max(1.0, x64.detach().std(correction=0).item()))
    floor = max(30.0 if degenerate else 1.0, gain)
    if act == "relu":
        # A pre-activation that is 0 up to rounding (an exact tie: inputs on an fp16 grid
        # can put a value on its channel's mean) lands on either side of 0 in any
        # evaluation, and ReLU's gradient there is 0 on one side and 1 on the other, both
        # subgradients at 0: those elements take the side the layer took.
        pre = y_ref.detach()
        tie = pre.abs() <= 1e-6 * floor * max(1.0, pre.abs().max().item())
        keep = torch.where(tie, y.detach() > 0, pre > 0)
        y_ref, y_naive = y_ref * keep, y_naive * keep
    assert y.dtype == x.dtype and y.shape == x.shape
    assert close(y, y_ref, dtype, floor, y_naive), "output"
    # every composition gets the gradient the layer gets: g_out rounded to the dtype (a
    # float64 g_out would make the references differ by its rounding, which sums of
    # many terms with cancelling signs, e.g. a group weight's gradient, amplify)
    g_in = g_out.to(y.dtype)
    y.backward(g_in)
    y_ref.backward(g_in.double())
    y_naive.backward(g_in.float())
    assert close(xs.grad, x64.grad, dtype, floor, x32.grad), "dx"
    for k in leaves:
        assert close(learn[k].grad, learn64[k].grad, dtype, floor, learn32[k].grad), k
    assert close(rm, rm64, torch.float32) and close(rv, rv64, torch.float32), "running buffers"


# an exact ReLU tie hypothesis found: x[0, 6, 0] is its channel's mean (-50.875 in fp16)
RELU_TIE = {"n": 1, "g": 2, "k": 4, "spatial": (4,), "layout": "contiguous", "dtype": torch.float16,
            "mode": "batch", "activation": "relu", "group_affine": False, "affine": False, "offset": -50.0,
            "seed": 5, "plan": None}


@settings(max_examples=110)
@given(case=norm_cases())
@example(case=RELU_TIE)
def test_norm_parity_torch_backend(case):
    with backend_env("torch"):
        run_case(case)


@pytest.mark.slow  # 30-45 s through the interpreter; fast cousins: the Triton cases of test_bcn/test_group_norm
@settings(max_examples=110)
@given(case=norm_cases())
@example(case=RELU_TIE)
def test_norm_parity_triton_backend(case):
    with backend_env("triton"), config_overrides(case["plan"]):
        run_case(case)


@st.composite
def ws_cases(draw):
    out_channels = draw(st.integers(1, 6))
    fan_dims = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=4)))
    eps_mode, correction = draw(st.sampled_from([("var", 0), ("std", 1), ("var", 1), ("std", 0)]))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    layout = draw(st.sampled_from(["contiguous", "channels_last", "sliced"]))
    backend = draw(st.sampled_from(["torch", "triton"]))
    return dict(shape=(out_channels,) + fan_dims, eps_mode=eps_mode, correction=correction, dtype=dtype,
                layout=layout, backend=backend, seed=draw(st.integers(0, 2**16)), plan=draw(st.sampled_from(WS_PLANS)))


@settings(max_examples=60)
@given(case=ws_cases())
def test_ws_parity(case):
    with backend_env(case["backend"]), config_overrides(case["plan"]):
        check_ws_case(case)


def check_ws_case(case):
    torch.manual_seed(case["seed"])
    shape = case["shape"]
    if shape[1:] and torch.Size(shape[1:]).numel() <= case["correction"]:
        with pytest.raises(ValueError, match="correction"):
            weight_standardize(torch.randn(shape), correction=case["correction"], eps_mode=case["eps_mode"])
        return
    w = torch.randn(shape, device=DEVICE) * 0.1
    if case["layout"] == "channels_last" and w.dim() == 4:
        w = w.contiguous(memory_format=torch.channels_last)
    elif case["layout"] == "sliced":
        w = torch.randn((shape[0], 2 * shape[1]) + shape[2:], device=DEVICE)[:, ::2] * 0.1
    w = w.to(case["dtype"]).requires_grad_(True)
    w64 = w.detach().double().requires_grad_(True)
    w32 = w.detach().float().requires_grad_(True)
    out = weight_standardize(w, 1e-5, case["correction"], case["eps_mode"])
    ref = ws_reference(w64, 1e-5, case["correction"], case["eps_mode"])
    # the naive fp32 composition: a row whose spread is small next to eps (std + eps
    # with fan-in 2 maps every row to +-1) turns rounding into large gradient errors
    # in any fp32 evaluation, as close() allows
    naive = ws_reference(w32, 1e-5, case["correction"], case["eps_mode"], dtype=torch.float32)
    assert close(out, ref, case["dtype"], naive=naive)
    g = torch.randn_like(ref)
    out.backward(g.to(out.dtype))
    ref.backward(g)
    naive.backward(g.float())
    assert close(w.grad, w64.grad, case["dtype"], naive=w32.grad)
