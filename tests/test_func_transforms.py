"""torch.func transforms over wsbcn layers (grad, jacrev, functional_call), as over
torch's own: under a transform the layers take Functions with ``setup_context``
(ops/norm.py ``FunctorchNormFunction``, ops/ws.py ``FunctorchWeightStandardizeFunction``),
which torch.func requires; under vmap (jacfwd, hessian, per-sample gradients) they
compute with torch ops. Every result against the float64 reference; a vmap that would
update running buffers every instance shares is refused before any buffer changes."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import wsbcn
from conftest import DEVICE, rel_err
from reference import bcn_reference, gn_reference, ws_reference
from wsbcn.functional import batch_channel_norm, group_norm, weight_standardize
from wsbcn.ops.ws_model import ModelWeightStandardizer, weight_standardize_all

C, G = 8, 4


class _Net(nn.Module):
    def __init__(self, estimate):
        super().__init__()
        self.c1 = wsbcn.WSConv2d(3, C, 3, padding=1)
        self.n1 = wsbcn.BatchChannelNorm2d(C, G, estimate=estimate)
        self.c2 = wsbcn.WSConv2d(C, C, 3, padding=1, eps_mode="std", correction=1)
        self.n2 = wsbcn.GroupNorm(G, C)

    def forward(self, x):
        return self.n2(self.c2(torch.relu(self.n1(self.c1(x)))))


def _reference(p, buffers, x, estimate):
    """_Net in float64 from its parameters ``p`` (running buffers updated in place)."""
    w1 = ws_reference(p["c1.weight"])
    y = F.conv2d(x, w1, p["c1.bias"], padding=1)
    y = bcn_reference(y, G, p["n1.weight"], p["n1.bias"], p["n1.group_weight"], p["n1.group_bias"],
                      buffers["n1.running_mean"], buffers["n1.running_var"], training=True, estimate=estimate,
                      num_batches_tracked=buffers["n1.num_batches_tracked"])
    w2 = ws_reference(p["c2.weight"], correction=1, eps_mode="std")
    y = F.conv2d(torch.relu(y), w2, p["c2.bias"], padding=1)
    return gn_reference(y, G, p["n2.weight"], p["n2.bias"])


@pytest.mark.parametrize("estimate", [False, True])
@pytest.mark.parametrize("model_wide", [False, True])
def test_grad_of_functional_call_matches_the_reference(backend, estimate, model_wide):
    """torch.func.grad of a loss through functional_call: every parameter's gradient and
    the running buffers as the float64 reference gives them (model-wide WS included:
    its weights are then functorch wrappers, standardized per layer)."""
    torch.manual_seed(0)
    model = _Net(estimate).to(DEVICE).train()
    with torch.no_grad():
        model.n1.running_mean.normal_(0, 0.3)
        model.n1.running_var.uniform_(0.5, 1.5)
    if model_wide:
        ModelWeightStandardizer(model)
    x = torch.randn(2, 3, 5, 5, device=DEVICE)
    dy = torch.randn(2, C, 5, 5, device=DEVICE)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    ref_params = {k: v.double().requires_grad_(True) for k, v in params.items()}
    ref_buffers = {k: v.clone() if not v.is_floating_point() else v.double() for k, v in model.named_buffers()}

    def loss(p):
        return (torch.func.functional_call(model, p, (x,)) * dy).sum()

    grads = torch.func.grad(loss)(params)
    ref_loss = (_reference(ref_params, ref_buffers, x.double(), estimate) * dy.double()).sum()
    ref_grads = torch.autograd.grad(ref_loss, list(ref_params.values()))
    scale = max(r.norm().item() for r in ref_grads)
    for (name, g), r in zip(grads.items(), ref_grads):
        assert g.shape == params[name].shape, name
        if r.norm().item() > 1e-9 * scale:
            assert rel_err(g, r) <= 1e-4, name
        else:  # zero in exact arithmetic (c1's bias before batch statistics): rounding only
            assert g.norm().item() <= 1e-6 * scale, name
    for name, b in model.named_buffers():
        assert rel_err(b, ref_buffers[name]) <= 1e-6, name
    # the input's gradient, the weights captured as they are (model-wide WS: plain
    # weights under a transform, standardized per weight)
    dx = torch.func.grad(lambda t: (model(t) * dy).sum())(x)
    x64 = x.double().requires_grad_(True)
    ref_p = {k: v.detach() for k, v in ref_params.items()}
    (ref_dx,) = torch.autograd.grad((_reference(ref_p, ref_buffers, x64, estimate) * dy.double()).sum(), x64)
    assert rel_err(dx, ref_dx) <= 1e-4
    for name, b in model.named_buffers():  # two fp32 updates now
        assert rel_err(b, ref_buffers[name]) <= 1e-5, name


def test_jacrev_of_each_layer_matches_the_reference(backend):
    """torch.func.jacrev of WS (weight), GroupNorm and BCN in estimate mode (input)."""
    torch.manual_seed(1)
    w = torch.randn(3, 2, 2, 2, device=DEVICE)
    jac = torch.func.jacrev(lambda t: weight_standardize(t, 1e-5, 1, "std"))(w)
    ref = torch.autograd.functional.jacobian(lambda t: ws_reference(t, 1e-5, 1, "std"), w.double())
    assert rel_err(jac, ref) <= 1e-5
    x = torch.randn(2, C, 2, 2, device=DEVICE)
    gamma, beta = torch.rand(C, device=DEVICE) + 0.5, torch.randn(C, device=DEVICE)
    jac = torch.func.jacrev(lambda t: group_norm(t, G, gamma, beta))(x)
    ref = torch.autograd.functional.jacobian(lambda t: gn_reference(t, G, gamma.double(), beta.double()), x.double())
    assert rel_err(jac, ref) <= 1e-5
    rm, rv = torch.randn(C, device=DEVICE) * 0.3, torch.rand(C, device=DEVICE) + 0.5
    rm_ref, rv_ref = rm.double(), rv.double()
    jac = torch.func.jacrev(lambda t: batch_channel_norm(t, G, rm, rv, gamma, beta, training=True, estimate=True))(x)
    ref = torch.autograd.functional.jacobian(
        lambda t: bcn_reference(t, G, gamma.double(), beta.double(), running_mean=rm_ref.clone(),
                                running_var=rv_ref.clone(), training=True, estimate=True), x.double())
    assert rel_err(jac, ref) <= 1e-5
    bcn_reference(x.double(), G, running_mean=rm_ref, running_var=rv_ref, training=True, estimate=True)
    assert rel_err(rm, rm_ref) <= 1e-6 and rel_err(rv, rv_ref) <= 1e-6  # updated once, as the call ran once


def test_grad_of_weight_standardize_all_matches_the_reference(backend):
    torch.manual_seed(2)
    ws = [torch.randn(4, 3, 3, 3, device=DEVICE), torch.randn(6, 4, 1, 1, device=DEVICE)]
    scale = [torch.randn(4, 3, 3, 3, device=DEVICE), torch.randn(6, 4, 1, 1, device=DEVICE)]
    grads = torch.func.grad(lambda w: sum((h * s).sum() for h, s in zip(weight_standardize_all(w), scale)))(ws)
    ws64 = [w.double().requires_grad_(True) for w in ws]
    ref = torch.autograd.grad(sum((ws_reference(w) * s.double()).sum() for w, s in zip(ws64, scale)), ws64)
    for g, r in zip(grads, ref):
        assert rel_err(g, r) <= 1e-5


def test_a_compiled_model_ensemble_updates_each_instance_s_running_buffers():
    """torch.compile of a model ensemble in training: the layer runs eagerly there (the ops
    have no batching rule), each instance its own buffers, as eager (float64 reference)."""
    torch.manual_seed(5)
    models = [wsbcn.BatchChannelNorm2d(C, G).to(DEVICE).train() for _ in range(2)]
    params, buffers = torch.func.stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    xs = torch.randn(2, 2, C, 3, 3, device=DEVICE) + 1

    def ensemble(p, b, x):
        return torch.func.vmap(lambda p, b, x: torch.func.functional_call(base, (p, b), (x,)))(p, b, x)

    out = torch.compile(ensemble, backend="aot_eager")(params, buffers, xs)
    for i, m in enumerate(models):
        mean, var = m.running_mean.double().clone(), m.running_var.double().clone()
        y = bcn_reference(xs[i], G, m.weight.double(), m.bias.double(), m.group_weight.double(),
                          m.group_bias.double(), mean, var, training=True)
        assert rel_err(out[i], y) <= 1e-5 and rel_err(buffers["running_mean"][i], mean) <= 1e-5, i
    assert buffers["num_batches_tracked"].tolist() == [1, 1]


@pytest.mark.parametrize("estimate", [False, True])
def test_vmap_of_a_running_buffer_update_is_refused_before_any_buffer_changes(backend, estimate):
    """As nn.BatchNorm under vmap: a BatchChannelNorm that would update its running
    buffers in training (one update standing for every instance) raises, naming vmap,
    and the buffers are as they were."""
    torch.manual_seed(3)
    m = wsbcn.BatchChannelNorm2d(C, G, estimate=estimate).to(DEVICE).train()
    before = copy.deepcopy(m.state_dict())
    xs = torch.randn(3, 2, C, 2, 2, device=DEVICE)
    with pytest.raises(RuntimeError, match="torch.func.vmap"):
        torch.func.vmap(m)(xs)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("estimate,momentum", [(False, 0.1), (True, 0.3), (False, None), (True, None)])
def test_a_model_ensemble_updates_each_instance_s_running_buffers(backend, estimate, momentum):
    """A model ensemble in training (torch.func.stack_module_state: buffers batched per
    instance, as vmap batches the input), which nn.BatchNorm runs: each instance
    normalizes and updates its own running buffers and num_batches_tracked, output,
    buffers and parameter gradients as the float64 reference of each model alone."""
    torch.manual_seed(4)
    models = [wsbcn.BatchChannelNorm2d(C, G, estimate=estimate, momentum=momentum).to(DEVICE).train()
              for _ in range(3)]
    with torch.no_grad():
        for m in models:
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
            m.num_batches_tracked.fill_(2)
            for p in m.parameters():
                p.uniform_(0.5, 1.5)
    params, buffers = torch.func.stack_module_state(models)
    params = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    base = copy.deepcopy(models[0]).to("meta")
    xs = torch.randn(3, 2, C, 3, 3, device=DEVICE) * 2 + 1
    dy = torch.randn_like(xs)
    out = torch.func.vmap(lambda p, b, x: torch.func.functional_call(base, (p, b), (x,)))(params, buffers, xs)
    (out * dy).sum().backward()
    for i, m in enumerate(models):
        ref = {k: v.detach().double().requires_grad_(k in ("weight", "bias", "group_weight", "group_bias"))
               for k, v in m.state_dict().items()}
        y = bcn_reference(xs[i], G, ref["weight"], ref["bias"], ref["group_weight"], ref["group_bias"],
                          ref["running_mean"], ref["running_var"], training=True, estimate=estimate,
                          momentum=momentum, num_batches_tracked=ref["num_batches_tracked"])
        (y * dy[i].double()).sum().backward()
        assert rel_err(out[i], y) <= 1e-5, i
        for k in ("running_mean", "running_var"):
            assert rel_err(buffers[k][i], ref[k]) <= 1e-5, (i, k)
        assert buffers["num_batches_tracked"][i].item() == 3
        for k, p in params.items():
            assert rel_err(p.grad[i], ref[k].grad) <= 1e-5, (i, k)


def test_vmap_of_each_layer_is_the_loop_of_float64_references(backend):
    """Under vmap the layers compute with torch ops: a batch of inputs (GroupNorm, BCN in
    eval, BCN on batch statistics without running buffers) and a batch of weights (WS)
    give, instance by instance, the float64 reference."""
    torch.manual_seed(5)
    xs = torch.randn(3, 2, C, 3, 3, device=DEVICE)
    gamma, beta = torch.rand(C, device=DEVICE) + 0.5, torch.randn(C, device=DEVICE)
    omega, eta = torch.rand(1, G, 1, device=DEVICE) + 0.5, torch.randn(1, G, 1, device=DEVICE)
    rm, rv = torch.randn(C, device=DEVICE) * 0.3, torch.rand(C, device=DEVICE) + 0.5
    buffers = (rm.clone(), rv.clone())
    cases = {
        "group norm": (lambda t: group_norm(t, G, gamma, beta, activation="silu"),
                       lambda t: gn_reference(t, G, gamma.double(), beta.double(), activation="silu")),
        "bcn eval": (lambda t: batch_channel_norm(t, G, rm, rv, gamma, beta, omega, eta, training=False),
                     lambda t: bcn_reference(t, G, gamma.double(), beta.double(), omega.double(), eta.double(),
                                             rm.double(), rv.double(), training=False)),
        "bcn batch statistics": (
            lambda t: batch_channel_norm(t, G, None, None, gamma, beta, omega, eta, training=True, activation="relu"),
            lambda t: bcn_reference(t, G, gamma.double(), beta.double(), omega.double(), eta.double(),
                                    training=True, activation="relu")),
    }
    for name, (ours, ref) in cases.items():
        got = torch.func.vmap(ours)(xs)
        want = torch.stack([ref(x.double()) for x in xs])
        assert got.shape == xs.shape and rel_err(got, want) <= 1e-5, name
    ws = torch.randn(3, 4, 2, 3, 3, device=DEVICE)
    got = torch.func.vmap(lambda w: weight_standardize(w, 1e-5, 1, "std"))(ws)
    assert rel_err(got, torch.stack([ws_reference(w, 1e-5, 1, "std") for w in ws])) <= 1e-5
    assert torch.equal(rm, buffers[0]) and torch.equal(rv, buffers[1])  # eval reads them only


class _WSGroupNormNet(nn.Module):
    """WS convs with GroupNorm and an eval-mode BCN: the layers of a private (DP-SGD)
    training step, whose per-sample gradients are vmap of grad."""

    def __init__(self):
        super().__init__()
        self.c1 = wsbcn.WSConv2d(3, C, 3, padding=1)
        self.n1 = wsbcn.GroupNorm(G, C, activation="relu")
        self.c2 = wsbcn.WSConv2d(C, C, 3, eps_mode="std", correction=1)
        self.n2 = wsbcn.BatchChannelNorm2d(C, G)
        self.head = nn.Linear(C, 3)

    def forward(self, x):
        return self.head(self.n2(self.c2(self.n1(self.c1(x)))).mean((2, 3)))


@pytest.mark.parametrize("model_wide", [False, True])
def test_per_sample_gradients_are_vmap_of_grad(backend, model_wide):
    """vmap(grad(loss)) over the samples of a batch: each sample's gradient of every
    parameter as the float64 reference gives it for that sample alone."""
    model, params, x, target, loss = _per_sample_setup(model_wide)
    grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, target)
    _check_per_sample_gradients(model, params, x, target, grads)


def _per_sample_setup(model_wide):
    """_WSGroupNormNet (its BCN in eval with non-trivial estimates), its parameters, a
    batch and targets, and the per-sample loss of functional_call."""
    torch.manual_seed(6)
    model = _WSGroupNormNet().to(DEVICE)
    with torch.no_grad():
        model.n2.running_mean.normal_(0, 0.3)
        model.n2.running_var.uniform_(0.5, 1.5)
    model.n2.eval()
    if model_wide:
        ModelWeightStandardizer(model)
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, target = torch.randn(4, 3, 5, 5, device=DEVICE), torch.randint(0, 3, (4,), device=DEVICE)

    def loss(p, xi, ti):
        return F.cross_entropy(torch.func.functional_call(model, p, (xi[None],)), ti[None])

    return model, params, x, target, loss


def _check_per_sample_gradients(model, params, x, target, grads):
    """Each sample's gradients against the float64 reference of that sample alone."""
    n2 = model.n2
    for i in range(len(x)):
        p64 = {k: v.double().requires_grad_(True) for k, v in params.items()}
        h = F.conv2d(x[i:i + 1].double(), ws_reference(p64["c1.weight"]), p64["c1.bias"], padding=1)
        h = gn_reference(h, G, p64["n1.weight"], p64["n1.bias"], activation="relu")
        h = F.conv2d(h, ws_reference(p64["c2.weight"], correction=1, eps_mode="std"), p64["c2.bias"])
        h = bcn_reference(h, G, p64["n2.weight"], p64["n2.bias"], p64["n2.group_weight"], p64["n2.group_bias"],
                          n2.running_mean.double(), n2.running_var.double(), training=False)
        out = F.linear(h.mean((2, 3)), p64["head.weight"], p64["head.bias"])
        ref = torch.autograd.grad(F.cross_entropy(out, target[i:i + 1]), list(p64.values()))
        for (name, g), r in zip(grads.items(), ref):
            assert g.shape == (len(x), *params[name].shape), name
            assert rel_err(g[i], r) <= 1e-4, (name, i)


def test_grad_of_grad_matches_the_reference(backend):
    """Transforms compose: the backward under a transform is itself differentiated by the
    outer one (GroupNorm and BCN in the input, WS in the weight)."""
    torch.manual_seed(4)
    x = torch.randn(2, C, 2, 2, device=DEVICE)
    dy = torch.randn(2, C, 2, 2, device=DEVICE)
    gamma, beta = torch.rand(C, device=DEVICE) + 0.5, torch.randn(C, device=DEVICE)
    layers = {
        "group norm": (lambda t: group_norm(t, G, gamma, beta),
                       lambda t: gn_reference(t, G, gamma.double(), beta.double())),
        "bcn": (lambda t: batch_channel_norm(t, G, weight=gamma, bias=beta, training=True),
                lambda t: bcn_reference(t, G, gamma.double(), beta.double(), training=True)),
    }
    for name, (ours, ref) in layers.items():
        second = torch.func.grad(lambda t: torch.func.grad(lambda u: (ours(u) * dy).sum())(t).square().sum())(x)
        x64 = x.double().requires_grad_(True)
        (first,) = torch.autograd.grad((ref(x64) * dy.double()).sum(), x64, create_graph=True)
        (expected,) = torch.autograd.grad(first.square().sum(), x64)
        assert rel_err(second, expected) <= 1e-4, name
    w = torch.randn(3, 2, 2, 2, device=DEVICE)
    dw = torch.randn(3, 2, 2, 2, device=DEVICE)
    second = torch.func.grad(lambda t: torch.func.grad(lambda u: (weight_standardize(u) * dw).sum())(t).square().sum())(w)
    w64 = w.double().requires_grad_(True)
    (first,) = torch.autograd.grad((ws_reference(w64) * dw.double()).sum(), w64, create_graph=True)
    (expected,) = torch.autograd.grad(first.square().sum(), w64)
    assert rel_err(second, expected) <= 1e-4


def test_vmap_over_stacked_models_is_each_model(backend):
    """Model ensembling (torch.func.stack_module_state, vmap of functional_call): batched
    parameters and running buffers, one input; each slice of the output is its model's
    eval output, against the float64 reference."""
    torch.manual_seed(8)
    models = [nn.Sequential(wsbcn.WSConv2d(3, C, 3), wsbcn.BatchChannelNorm2d(C, G, activation="relu"),
                            wsbcn.GroupNorm(G, C)).to(DEVICE).eval() for _ in range(3)]
    for m in models:
        with torch.no_grad():
            m[1].running_mean.normal_(0, 0.3)
            m[1].running_var.uniform_(0.5, 1.5)
    params, buffers = torch.func.stack_module_state(models)
    base = copy.deepcopy(models[0])
    x = torch.randn(2, 3, 6, 6, device=DEVICE)
    out = torch.func.vmap(lambda p, b: torch.func.functional_call(base, (p, b), (x,)))(params, buffers)
    for i, m in enumerate(models):
        h = F.conv2d(x.double(), ws_reference(m[0].weight), m[0].bias.double())
        h = bcn_reference(h, G, m[1].weight.double(), m[1].bias.double(), m[1].group_weight.double(),
                          m[1].group_bias.double(), m[1].running_mean.double(), m[1].running_var.double(),
                          training=False, activation="relu")
        assert rel_err(out[i], gn_reference(h, G, m[2].weight.double(), m[2].bias.double())) <= 1e-5, i


def test_compiled_transforms_trace_the_torch_op_forward():
    """torch.compile of torch.func.grad and of vmap of grad (per-sample gradients), whole
    graphs: the traced layers compute in torch ops (the wsbcn ops have no functorch
    rules), with the gradients of the float64 reference."""
    torch.manual_seed(9)
    x = torch.randn(2, C, 3, 3, device=DEVICE)
    gamma, beta = torch.rand(C, device=DEVICE) + 0.5, torch.randn(C, device=DEVICE)
    rm, rv = torch.randn(C, device=DEVICE) * 0.3, torch.rand(C, device=DEVICE) + 0.5

    def ours(t):
        h = batch_channel_norm(t, G, rm, rv, gamma, beta, training=False, activation="silu")
        return (group_norm(h, G, gamma, beta) * t).sum()

    def ref(t):
        h = bcn_reference(t, G, gamma.double(), beta.double(), running_mean=rm.double(), running_var=rv.double(),
                          training=False, activation="silu")
        return (gn_reference(h, G, gamma.double(), beta.double()) * t).sum()

    got = torch.compile(torch.func.grad(ours), backend="aot_eager", fullgraph=True)(x)
    x64 = x.double().requires_grad_(True)
    assert rel_err(got, torch.autograd.grad(ref(x64), x64)[0]) <= 1e-4
    ws = torch.randn(3, 4, 2, 3, 3, device=DEVICE)
    got = torch.compile(torch.func.vmap(torch.func.grad(lambda w: (weight_standardize(w) * w).sum())),
                        backend="aot_eager", fullgraph=True)(ws)
    for w, g in zip(ws, got):
        w64 = w.double().requires_grad_(True)
        assert rel_err(g, torch.autograd.grad((ws_reference(w64) * w64).sum(), w64)[0]) <= 1e-4
    # per-sample gradients of a model with model-wide WS (per weight under a transform)
    model, params, x, target, loss = _per_sample_setup(model_wide=True)
    per_sample = torch.compile(torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0)), backend="aot_eager",
                               fullgraph=True)
    _check_per_sample_gradients(model, params, x, target, per_sample(params, x, target))
