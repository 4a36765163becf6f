"""Forward-mode AD through wsbcn layers, as through torch's own: tangents pushed by
``torch.autograd.forward_ad`` (dual tensors) and by ``torch.func.jvp``, under no_grad
too, forward-over-reverse Hessian-vector products and reverse over forward (tangents
differentiable in the inputs). Every tangent against the
float64 reference's (tests/reference.py) pushed by torch's forward AD; the primal
outputs and the running buffers as one call of the reference leaves them."""
import copy

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import wsbcn
from conftest import DEVICE, rel_err
from reference import bcn_reference, gn_reference, ws_reference
from test_func_transforms import _Net
from test_func_transforms import _reference as _net_reference
from wsbcn.functional import batch_channel_norm, group_norm, weight_standardize

C, G = 8, 4
# (training, estimate, activation, group_affine) of the BCN cases
BCN_CASES = {"batch statistics": (True, False, "silu", True), "estimate": (True, True, "relu", False),
             "eval": (False, False, None, True)}


def _bcn_inputs(seed, group_affine):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, C, 3, 3, generator=g).to(DEVICE)
    aff = G if group_affine else C
    params = [torch.rand(C, generator=g) + 0.5, torch.randn(C, generator=g), torch.rand(aff, generator=g) + 0.5,
              torch.randn(aff, generator=g)]
    buffers = [torch.randn(C, generator=g) * 0.3, torch.rand(C, generator=g) + 0.5, torch.tensor(3)]
    tangents = [torch.randn(x.shape, generator=g)] + [torch.randn(p.shape, generator=g) for p in params]
    return x, [p.to(DEVICE) for p in params], [b.to(DEVICE) for b in buffers], [t.to(DEVICE) for t in tangents]


def _reference_tangent(fn, primals, tangents):
    """(output, tangent) of ``fn`` in float64 under torch's forward AD."""
    with fwAD.dual_level():
        out = fn(*[fwAD.make_dual(p.double(), t.double()) for p, t in zip(primals, tangents)])
        primal, tangent = fwAD.unpack_dual(out)
    return primal, tangent


def _dual_call(fn, primals, tangents):
    with fwAD.dual_level():
        out = fn(*[fwAD.make_dual(p, t) for p, t in zip(primals, tangents)])
        return fwAD.unpack_dual(out)


@pytest.mark.parametrize("how", ["dual tensors", "dual tensors under no_grad", "torch.func.jvp"])
@pytest.mark.parametrize("case", list(BCN_CASES))
def test_bcn_tangent_matches_the_reference(backend, case, how):
    """The tangent of y in x and all four parameters at once."""
    training, estimate, activation, group_affine = BCN_CASES[case]
    x, params, buffers, tangents = _bcn_inputs(0, group_affine)
    ref_buffers = [b.double() if b.is_floating_point() else b.clone() for b in buffers]

    def ours(x, gamma, beta, omega, eta):
        return batch_channel_norm(x, G, buffers[0], buffers[1], gamma, beta, omega, eta, training=training,
                                  estimate=estimate, activation=activation, num_batches_tracked=buffers[2])

    def reference(x, gamma, beta, omega, eta):
        return bcn_reference(x, G, gamma, beta, omega, eta, ref_buffers[0], ref_buffers[1], training, estimate,
                             activation=activation, num_batches_tracked=ref_buffers[2])

    primals = [x] + params
    if how == "torch.func.jvp":
        y, y_t = torch.func.jvp(ours, tuple(primals), tuple(tangents))
    elif how == "dual tensors under no_grad":
        with torch.no_grad():
            y, y_t = _dual_call(ours, primals, tangents)
    else:
        y, y_t = _dual_call(ours, primals, tangents)
    ref, ref_t = _reference_tangent(reference, primals, tangents)
    assert y_t is not None and y_t.dtype == y.dtype and y_t.shape == y.shape
    assert rel_err(y, ref) <= 1e-5
    assert rel_err(y_t, ref_t) <= 1e-5
    for b, r in zip(buffers, ref_buffers):  # updated once, as the call ran once
        assert rel_err(b, r) <= 1e-6


@pytest.mark.parametrize("how", ["dual tensors", "torch.func.jvp"])
def test_group_norm_and_ws_tangents_match_the_reference(backend, how):
    x, (gamma, beta, _, _), _, (x_t, gamma_t, beta_t, _, _) = _bcn_inputs(1, True)
    g = torch.Generator().manual_seed(2)
    w, w_t = torch.randn(4, 3, 2, 2, generator=g).to(DEVICE), torch.randn(4, 3, 2, 2, generator=g).to(DEVICE)
    layers = {
        "group norm": (lambda t, a, b: group_norm(t, G, a, b, activation="relu"),
                       lambda t, a, b: gn_reference(t, G, a, b, activation="relu"),
                       (x, gamma, beta), (x_t, gamma_t, beta_t)),
        "ws": (lambda v: weight_standardize(v, 1e-5, 1, "std"), lambda v: ws_reference(v, 1e-5, 1, "std"),
               (w,), (w_t,)),
        "ws centered": (lambda v: weight_standardize(v, standardize="center"),
                        lambda v: v - v.mean(dim=(1, 2, 3), keepdim=True), (w,), (w_t,)),
    }
    for name, (ours, reference, primals, tangents) in layers.items():
        if how == "torch.func.jvp":
            out, out_t = torch.func.jvp(ours, primals, tangents)
        else:
            out, out_t = _dual_call(ours, primals, tangents)
        ref, ref_t = _reference_tangent(reference, primals, tangents)
        assert rel_err(out, ref) <= 1e-5, name
        assert rel_err(out_t, ref_t) <= 1e-5, name


def _net(model_wide, estimate):
    torch.manual_seed(5)
    model = _Net(estimate).to(DEVICE).train()
    with torch.no_grad():
        model.n1.running_mean.normal_(0, 0.3)
        model.n1.running_var.uniform_(0.5, 1.5)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    if model_wide:
        wsbcn.ModelWeightStandardizer(model)
    return model


@pytest.mark.parametrize("model_wide", [False, True])
def test_jvp_of_a_model_in_its_input_and_parameters(backend, model_wide):
    """torch.func.jvp through functional_call, and dual parameters and input in a dual
    level (model-wide WS standardizes per layer there: its one node has no jvp)."""
    model = _net(model_wide, estimate=True)
    x = torch.randn(2, 3, 4, 4, device=DEVICE)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    p_t = {k: torch.randn_like(v) for k, v in params.items()}
    x_t = torch.randn_like(x)
    start = copy.deepcopy({k: v for k, v in model.named_buffers()})
    ref_buffers = {k: v.double() if v.is_floating_point() else v.clone() for k, v in start.items()}
    names = list(params)

    def reference(x, *ps):
        return _net_reference(dict(zip(names, ps)), ref_buffers, x, estimate=True)

    ref, ref_t = _reference_tangent(reference, [x] + list(params.values()), [x_t] + list(p_t.values()))
    y, y_t = torch.func.jvp(lambda t, p: torch.func.functional_call(model, p, (t,)), (x, params), (x_t, p_t))
    assert rel_err(y, ref) <= 1e-4 and rel_err(y_t, ref_t) <= 1e-4
    for name, b in model.named_buffers():
        assert rel_err(b, ref_buffers[name]) <= 1e-6, name
    model.load_state_dict(start, strict=False)  # the buffers as the reference had them
    with fwAD.dual_level():
        duals = {k: fwAD.make_dual(v, p_t[k]) for k, v in params.items()}
        y2, y2_t = fwAD.unpack_dual(torch.func.functional_call(model, duals, (fwAD.make_dual(x, x_t),)))
    assert rel_err(y2, ref) <= 1e-4 and rel_err(y2_t, ref_t) <= 1e-4


def test_forward_over_reverse_hessian_vector_product(backend):
    """jvp of grad: the Hessian of a loss through WSConv, BCN (batch statistics, so
    second derivatives through them) and GroupNorm times a vector in the parameters,
    against the float64 reference's (double backward)."""
    model = _net(False, estimate=False)
    x = torch.randn(2, 3, 4, 4, device=DEVICE)
    dy = torch.randn(2, C, 4, 4, device=DEVICE)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    v = {k: torch.randn_like(p) for k, p in params.items()}

    def loss(p):
        return (torch.func.functional_call(model, p, (x,)) ** 2 * dy).sum()

    _, hvp = torch.func.jvp(torch.func.grad(loss), (params,), (v,))
    names = list(params)
    p64 = [params[k].double().requires_grad_(True) for k in names]
    ref_buffers = {k: b.double() if b.is_floating_point() else b.clone() for k, b in model.named_buffers()}
    ref_loss = (_net_reference(dict(zip(names, p64)), ref_buffers, x.double(), estimate=False) ** 2
                * dy.double()).sum()
    grads = torch.autograd.grad(ref_loss, p64, create_graph=True)
    ref_hvp = torch.autograd.grad(sum((g * v[k].double()).sum() for g, k in zip(grads, names)), p64)
    scale = max(r.norm().item() for r in ref_hvp)
    for k, r in zip(names, ref_hvp):
        if r.norm().item() > 1e-9 * scale:
            assert rel_err(hvp[k], r) <= 1e-4, k
        else:  # zero in exact arithmetic (c1's bias, before batch statistics): rounding only
            assert hvp[k].norm().item() <= 1e-6 * scale, k


def test_reverse_over_forward_matches_the_reference(backend):
    """The tangent is differentiable in the input and the parameters, as torch's own
    layers' are: the gradient of a function of it (BCN with batch statistics: the
    tangent in x alone, the parameters' tangents zero) against the float64 reference's."""
    x, params, _, (x_t, *_) = _bcn_inputs(3, True)
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(4)).to(DEVICE)

    def grads(fn, x, params):
        x = x.clone().requires_grad_(True)
        params = [p.clone().requires_grad_(True) for p in params]
        with fwAD.dual_level():
            y_t = fwAD.unpack_dual(fn(fwAD.make_dual(x, x_t.to(x.dtype)), *params)).tangent
        return torch.autograd.grad((y_t * v.to(y_t.dtype)).sum(), [x] + params)

    ours = grads(lambda *a: batch_channel_norm(a[0], G, None, None, *a[1:], training=True, activation="silu"),
                 x, params)
    ref = grads(lambda *a: bcn_reference(a[0], G, *a[1:], training=True, activation="silu"),
                x.double(), [p.double() for p in params])
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert rel_err(a, b) <= 1e-4, i


def test_jacfwd_and_hessian_match_the_reference(backend):
    """jacfwd is vmap over jvp, hessian jacfwd of jacrev: under vmap the layers compute
    with torch ops, which both see through (GroupNorm and BCN in eval in the input, WS in
    the weight), against the float64 reference."""
    torch.manual_seed(7)
    x = torch.randn(2, C, 2, 2, device=DEVICE)
    gamma, beta = torch.rand(C, device=DEVICE) + 0.5, torch.randn(C, device=DEVICE)
    rm, rv = torch.randn(C, device=DEVICE) * 0.3, torch.rand(C, device=DEVICE) + 0.5
    dy = torch.randn(2, C, 2, 2, device=DEVICE)
    cases = {
        "group norm": (lambda t: group_norm(t, G, gamma, beta, activation="silu"),
                       lambda t: gn_reference(t, G, gamma.double(), beta.double(), activation="silu")),
        "bcn eval": (lambda t: batch_channel_norm(t, G, rm, rv, gamma, beta, training=False, activation="silu"),
                     lambda t: bcn_reference(t, G, gamma.double(), beta.double(), running_mean=rm.double(),
                                             running_var=rv.double(), training=False, activation="silu")),
    }
    for name, (ours, ref) in cases.items():
        jac = torch.func.jacfwd(ours)(x)
        assert rel_err(jac, torch.autograd.functional.jacobian(ref, x.double())) <= 1e-5, name
        hess = torch.func.hessian(lambda t: (ours(t) * dy).sum())(x)
        want = torch.autograd.functional.hessian(lambda t: (ref(t) * dy.double()).sum(), x.double())
        assert rel_err(hess, want) <= 1e-4, name
    w = torch.randn(3, 2, 2, 2, device=DEVICE)
    jac = torch.func.jacfwd(lambda t: weight_standardize(t, 1e-5, 1, "std"))(w)
    assert rel_err(jac, torch.autograd.functional.jacobian(lambda t: ws_reference(t, 1e-5, 1, "std"),
                                                           w.double())) <= 1e-5


def test_jacfwd_of_a_running_buffer_update_is_refused_before_any_buffer_changes(backend):
    """jacfwd is vmap over jvp: a BatchChannelNorm in training with running statistics
    raises vmap's refusal, the running buffers as they were."""
    m = wsbcn.BatchChannelNorm2d(C, G).to(DEVICE).train()
    before = copy.deepcopy(m.state_dict())
    with pytest.raises(RuntimeError, match="vmap"):
        torch.func.jacfwd(m)(torch.randn(2, C, 2, 2, device=DEVICE))
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
