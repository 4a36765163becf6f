"""Double backward (create_graph=True: gradient penalties such as WGAN-GP and R1,
meta-learning) of BCN in every mode, GroupNorm and WS, on both backends, against the
naive float64 references of tests/reference.py; gradgradcheck in float64 where the
statistics carry gradients. Batched gradients (is_grads_batched, vectorized jacobians)
take the same differentiable backward. The module tests (test_torch_module_tests.py) cover the
drop-in layers the same way; this file the functional API and its edge cases."""
import copy

import pytest
import torch

import wsbcn
from wsbcn.functional import batch_channel_norm, group_norm, weight_standardize
from conftest import DEVICE, rel_err
from reference import bcn_reference, gn_reference, ws_reference

def _on_triton_slow(values, default):
    """pytest params of ``values`` with the backend fixture's two values folded in:
    every value on the torch backend, those in ``default`` on the Triton interpreter,
    the others there marked slow (the interpreter is slow)."""
    out = []
    for backend in ("torch", "triton"):
        for v in values:
            v = v if isinstance(v, tuple) else (v,)
            slow = backend == "triton" and v not in default
            out.append(pytest.param(backend, *v, id="-".join([backend, *map(str, v)]),
                                    marks=[pytest.mark.slow] if slow else []))
    return out


@pytest.fixture
def on_backend(monkeypatch):
    def use(backend):
        monkeypatch.setenv("WSBCN_BACKEND", backend)
    return use


BCN_CASES = {  # name -> (training, estimate, affine, group_affine, activation, momentum)
    "batch": (True, False, True, True, "relu", 0.1),
    "batch-no_affine": (True, False, False, True, None, 0.1),
    "batch-channel_affine-silu": (True, False, True, False, "silu", 0.1),
    "estimate": (True, True, True, True, "silu", 0.1),
    "estimate-cumulative": (True, True, True, False, None, None),
    "eval": (False, False, True, True, "relu", 0.1),
    "eval-channel_affine": (False, False, True, False, "silu", 0.1),
}


def _bcn_inputs(case, dtype, seed=0):
    training, estimate, affine, group_affine, activation, momentum = BCN_CASES[case]
    g = torch.Generator().manual_seed(seed)
    c, groups = 8, 4
    x = torch.randn(3, c, 4, 5, generator=g, dtype=torch.float64) * 2 + 0.5
    aff = groups if group_affine else c
    params = dict(weight=torch.rand(c, generator=g, dtype=torch.float64) + 0.5,
                  bias=torch.randn(c, generator=g, dtype=torch.float64),
                  group_weight=torch.rand(1, aff, 1, generator=g, dtype=torch.float64) + 0.5,
                  group_bias=torch.randn(1, aff, 1, generator=g, dtype=torch.float64)) if affine else {}
    buffers = dict(running_mean=torch.randn(c, generator=g, dtype=torch.float64) * 0.3,
                   running_var=torch.rand(c, generator=g, dtype=torch.float64) + 0.5)
    kwargs = dict(training=training, estimate=estimate, activation=activation, momentum=momentum)
    return (x.to(dtype).to(DEVICE), {k: v.to(dtype).to(DEVICE) for k, v in params.items()},
            {k: v.to(dtype).to(DEVICE) for k, v in buffers.items()}, groups, kwargs)


def _penalty_grads(fn, leaves, seed=1):
    """First-order gradients of sum(fn(*leaves) * v) with create_graph=True, then the
    gradients of a penalty on them: sum over the first-order gradients of (grad * u)."""
    leaves = [t.detach().requires_grad_(True) for t in leaves]
    y = fn(*leaves)
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y)
    first = torch.autograd.grad(y, leaves, v, create_graph=True)
    penalty = sum((f * torch.randn(f.shape, generator=g, dtype=torch.float64).to(f)).sum() for f in first)
    second = torch.autograd.grad(penalty, leaves, allow_unused=True)
    return first, second


def _compare(ours, ref, tol_first, tol_second):
    (first, second), (first_ref, second_ref) = ours, ref
    for i, (a, b) in enumerate(zip(first, first_ref)):
        assert rel_err(a, b) <= tol_first, ("first", i, rel_err(a, b))
    for i, (a, b) in enumerate(zip(second, second_ref)):
        if b is None:
            assert a is None or not a.any(), ("second", i)
            continue
        # where the reference has no second derivative (std at 0: NaN), ours is finite
        assert a is not None and torch.isfinite(a).all(), ("second", i)
        ok = torch.isfinite(b)
        assert rel_err(a[ok.to(a.device)], b[ok]) <= tol_second, ("second", i, rel_err(a[ok.to(a.device)], b[ok]))


def _bcn_fns(case, dtype):
    x, params, buffers, groups, kwargs = _bcn_inputs(case, dtype)
    names = list(params)

    def ours(x, *p):  # fresh running buffers every call: the same statistics every time
        nbt = torch.tensor(3, device=x.device)
        return batch_channel_norm(x, groups, **{k: v.clone() for k, v in buffers.items()},
                                  **dict(zip(names, p)), num_batches_tracked=nbt, **kwargs)

    def ref(x, *p):
        nbt = torch.tensor(3)
        return bcn_reference(x, groups, **{k: v.double().clone() for k, v in buffers.items()},
                             **dict(zip(names, p)), num_batches_tracked=nbt, **kwargs)

    return ours, ref, [x, *params.values()]


@pytest.mark.parametrize("backend,case", _on_triton_slow(list(BCN_CASES), {("batch",), ("estimate",)}))
def test_bcn_double_backward_matches_the_reference(on_backend, backend, case):
    """float32 on either backend (the Triton path: its kernels forward, the
    differentiable recompute backward), and float64 (torch backend) to 1e-9."""
    on_backend(backend)
    for dtype, tol_first, tol_second in ((torch.float32, 1e-5, 1e-4), (torch.float64, 1e-10, 1e-9)):
        ours, ref, leaves = _bcn_fns(case, dtype)
        _compare(_penalty_grads(ours, leaves), _penalty_grads(ref, [t.double().cpu() for t in leaves]),
                 tol_first, tol_second)


@pytest.mark.parametrize("case", [c for c in BCN_CASES if not BCN_CASES[c][1]])
def test_bcn_gradgradcheck(case):
    """gradgradcheck in float64 (estimate mode is left out: its statistics take no
    gradient by design, which finite differences through them would see)."""
    ours, _, leaves = _bcn_fns(case, torch.float64)
    leaves = [t.detach().requires_grad_(True) for t in leaves]
    assert torch.autograd.gradcheck(ours, leaves, fast_mode=True)
    assert torch.autograd.gradgradcheck(ours, leaves, fast_mode=True)


@pytest.mark.parametrize("backend,activation,layout", _on_triton_slow(
    [(a, lay) for a in (None, "relu", "silu") for lay in ("contiguous", "channels_last")], {("silu", "channels_last")}))
def test_group_norm_double_backward(on_backend, backend, activation, layout):
    on_backend(backend)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 6, 3, 4, generator=g, dtype=torch.float64) * 3 + 1
    w, b = torch.rand(6, generator=g, dtype=torch.float64) + 0.5, torch.randn(6, generator=g, dtype=torch.float64)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)

    def ours(x, w, b):
        return group_norm(x, 3, w, b, 1e-5, activation)

    def ref(x, w, b):
        return gn_reference(x, 3, w, b, 1e-5, activation)

    for dtype, tol_first, tol_second in ((torch.float32, 1e-5, 1e-4), (torch.float64, 1e-10, 1e-9)):
        leaves = [t.to(dtype).to(DEVICE) for t in (x, w, b)]
        _compare(_penalty_grads(ours, leaves), _penalty_grads(ref, [x, w, b]), tol_first, tol_second)
    leaves = [t.detach().requires_grad_(True) for t in (x, w, b)]
    assert torch.autograd.gradgradcheck(ours, leaves, fast_mode=True)


WS_WEIGHTS = {
    "contiguous": lambda w: w,
    "channels_last": lambda w: w.to(memory_format=torch.channels_last),
    "strided": lambda w: torch.cat([w, w], dim=3)[..., ::2],  # not row dense: the forward copies it
    "constant_filter": lambda w: torch.cat([torch.full_like(w[:1], 0.7), w[1:]]),
}


@pytest.mark.parametrize("backend,weight,eps_mode,correction", _on_triton_slow(
    [(w, m, c) for w in WS_WEIGHTS for m, c in (("var", 0), ("std", 1), ("var", 1))],
    {("channels_last", "var", 0), ("strided", "std", 1)}))
def test_ws_double_backward(on_backend, backend, weight, eps_mode, correction):
    on_backend(backend)
    g = torch.Generator().manual_seed(3)
    base = torch.randn(5, 3, 3, 3, generator=g, dtype=torch.float64) * 0.2 + 0.05
    w = WS_WEIGHTS[weight](base)

    def ours(w):
        return weight_standardize(w, 1e-5, correction, eps_mode)

    def ref(w):
        return ws_reference(w, 1e-5, correction, eps_mode)

    # a constant filter's second derivative scales as eps^-1.5: float32 keeps ~2 digits
    fp32_second = 1e-2 if weight == "constant_filter" else 1e-4
    for dtype, tol_first, tol_second in ((torch.float32, 1e-5, fp32_second), (torch.float64, 1e-10, 1e-9)):
        leaf = WS_WEIGHTS[weight](base.to(dtype).to(DEVICE))
        _compare(_penalty_grads(ours, [leaf]), _penalty_grads(ref, [w]), tol_first, tol_second)
    if weight != "constant_filter":  # std + eps has no derivative at std = 0 to check numerically
        leaf = w.detach().requires_grad_(True)
        assert torch.autograd.gradgradcheck(ours, [leaf], fast_mode=True)


def test_wsconv_gradient_penalty_trains_like_the_reference(backend):
    """An R1-style penalty step on a WSConv2d + BCN + GroupNorm stack: the parameter
    gradients of loss + |d loss / d x|^2 against the same stack in float64."""
    torch.manual_seed(4)
    # (no conv bias: the BN stage removes it, its gradient is 0 and float32 returns noise)
    model = torch.nn.Sequential(wsbcn.WSConv2d(3, 8, 3, padding=1, bias=False),
                                wsbcn.BatchChannelNorm2d(8, num_groups=4),
                                torch.nn.ReLU(), wsbcn.GroupNorm(2, 8, activation="silu")).to(DEVICE)
    x = torch.randn(2, 3, 6, 6, device=DEVICE)

    def grads(m, x):
        x = x.detach().requires_grad_(True)
        out = m(x).square().mean()
        (dx,) = torch.autograd.grad(out, x, create_graph=True)
        loss = out + dx.square().sum()
        return torch.autograd.grad(loss, list(m.parameters()))

    ref_model = copy.deepcopy(model).to("cpu").double()
    got = grads(model, x)
    expected = grads(ref_model, x.double().cpu())  # float64: the torch closed form and its recompute
    for a, b in zip(got, expected):
        assert rel_err(a, b) <= 1e-4


def test_double_backward_across_processes_raises_a_clear_error():
    from types import SimpleNamespace

    from wsbcn.ops import differentiable
    from wsbcn.kernels.norm import MODE_BATCH

    ctx = SimpleNamespace(call=SimpleNamespace(group=object(), mode=MODE_BATCH), needs_input_grad=(True,) * 7)
    x = torch.randn(2, 4, 3)
    with pytest.raises(RuntimeError, match="BatchChannelNorm with a process_group does not support double backward"):
        differentiable.norm_double_backward(ctx, torch.ones_like(x), x, None, None, None, None, ())


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.slow)])
def test_first_order_gradients_stay_the_kernels(on_backend, backend):
    """create_graph=False keeps the first-order path: the gradients are bitwise what
    the op's backward computes (here: twice the same call gives the same bits, and
    they match the recompute's first derivative to rounding only)."""
    on_backend(backend)
    torch.manual_seed(5)
    x = torch.randn(2, 8, 4, 4, device=DEVICE, requires_grad=True)
    w = torch.rand(8, device=DEVICE, requires_grad=True)
    b = torch.randn(8, device=DEVICE, requires_grad=True)
    dy = torch.randn(2, 8, 4, 4, device=DEVICE)
    plain = torch.autograd.grad(group_norm(x, 4, w, b), (x, w, b), dy)
    again = torch.autograd.grad(group_norm(x, 4, w, b), (x, w, b), dy)
    graph = torch.autograd.grad(group_norm(x, 4, w, b), (x, w, b), dy, create_graph=True)
    for p, a, gr in zip(plain, again, graph):
        assert torch.equal(p, a) and not p.requires_grad
        assert rel_err(gr, p) <= 1e-5
    assert graph[0].requires_grad and graph[1].requires_grad  # d/d bias = sum(dy): a constant


def _batched_and_looped(fn, ref, leaves, batch=3, seed=6, how="is_grads_batched"):
    """The gradients of ``fn`` for ``batch`` output gradients at once (torch's batched
    backward, ``is_grads_batched=True``; ``how="vmap"``: torch.func.vmap over
    torch.autograd.grad of the graph made outside it), and the float64 reference's, one
    backward per output gradient."""
    leaves = [t.detach().requires_grad_(True) for t in leaves]
    y = fn(*leaves)
    g = torch.Generator().manual_seed(seed)
    vs = torch.randn((batch, *y.shape), generator=g, dtype=torch.float64)
    if how == "vmap":
        batched = torch.func.vmap(lambda v: torch.autograd.grad(y, leaves, v, retain_graph=True))(vs.to(y))
    else:
        batched = torch.autograd.grad(y, leaves, vs.to(y), is_grads_batched=True)
    ref_leaves = [t.detach().double().cpu().requires_grad_(True) for t in leaves]
    y_ref = ref(*ref_leaves)
    looped = [torch.autograd.grad(y_ref, ref_leaves, v, retain_graph=True) for v in vs]
    return batched, [torch.stack(gs) for gs in zip(*looped)]


@pytest.mark.parametrize("how", ["is_grads_batched", "vmap"])
@pytest.mark.parametrize("backend,case", _on_triton_slow(["batch", "estimate", "eval", "batch-channel_affine-silu"],
                                                         {("batch",), ("eval",)}))
def test_batched_gradients_of_bcn_match_the_reference(on_backend, backend, case, how):
    """torch.autograd.grad(..., is_grads_batched=True) (what jacobian/hessian with
    vectorize=True use), and torch.func.vmap over autograd.grad: the kernels cannot read
    batched gradients, so the backward differentiates the torch-op forward, which torch's
    batching batches."""
    on_backend(backend)
    ours, ref, leaves = _bcn_fns(case, torch.float32)
    batched, looped = _batched_and_looped(ours, ref, leaves, how=how)
    for a, b in zip(batched, looped):
        assert rel_err(a, b) <= 1e-5


@pytest.mark.parametrize("how", ["is_grads_batched", "vmap"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_batched_gradients_of_group_norm_and_ws_match_the_reference(on_backend, backend, how):
    on_backend(backend)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 6, 3, 4, generator=g) * 3 + 1
    w, b = torch.rand(6, generator=g) + 0.5, torch.randn(6, generator=g)
    batched, looped = _batched_and_looped(lambda x, w, b: group_norm(x, 3, w, b, 1e-5, "silu"),
                                          lambda x, w, b: gn_reference(x, 3, w, b, 1e-5, "silu"), [x, w, b], how=how)
    for a, r in zip(batched, looped):
        assert rel_err(a, r) <= 1e-5
    weight = torch.randn(5, 3, 3, 3, generator=g) * 0.2 + 0.05
    batched, looped = _batched_and_looped(lambda w: weight_standardize(w, 1e-5, 1, "std"),
                                          lambda w: ws_reference(w, 1e-5, 1, "std"), [weight], how=how)
    assert rel_err(batched[0], looped[0]) <= 1e-5


@pytest.mark.parametrize("ws", ["layer", "model"])
def test_vectorized_jacobian_of_a_converted_model_matches_the_reference(backend, ws):
    """torch.autograd.functional.jacobian(vectorize=True) of WSConv2d + BCN + GroupNorm
    (per-layer and model-wide WS) with respect to the input and the conv weight, against
    the naive float64 composition (tests/reference.py) with vectorize=False."""
    torch.manual_seed(8)
    model = torch.nn.Sequential(wsbcn.WSConv2d(2, 4, 3, padding=1, bias=False),
                                wsbcn.BatchChannelNorm2d(4, num_groups=2), wsbcn.GroupNorm(2, 4)).to(DEVICE)
    conv, bcn, gn = model
    params = {k: v.detach().double().cpu() for k, v in model.state_dict().items()}
    if ws == "model":
        wsbcn.ModelWeightStandardizer(model)
    x = torch.randn(2, 2, 3, 3, device=DEVICE)

    def reference(x, w):  # training mode: batch statistics (the running buffers cloned, unused after)
        h = torch.nn.functional.conv2d(x, ws_reference(w, conv.eps), padding=1)
        h = bcn_reference(h, 2, params["1.weight"], params["1.bias"], params["1.group_weight"],
                          params["1.group_bias"], params["1.running_mean"].clone(), params["1.running_var"].clone(),
                          eps=bcn.eps)
        return gn_reference(h, 2, params["2.weight"], params["2.bias"], gn.eps)

    got = torch.autograd.functional.jacobian(
        lambda x, w: torch.func.functional_call(model, {"0.weight": w}, (x,)), (x, conv.weight.detach()),
        vectorize=True)
    expected = torch.autograd.functional.jacobian(reference, (x.double().cpu(), params["0.weight"]))
    for a, b in zip(got, expected):
        assert rel_err(a, b) <= 1e-5
    # torch.func.vmap over autograd.grad of the model's own graph (its weight, model-wide or not)
    batched, looped = _batched_and_looped(
        lambda x, w: torch.func.functional_call(model, {"0.weight": w}, (x,)), reference,
        [x, conv.weight.detach()], how="vmap")
    for a, b in zip(batched, looped):
        assert rel_err(a, b) <= 1e-5
