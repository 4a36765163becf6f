"""torch.fx and TorchScript over wsbcn's layers and functions (wsbcn/modules/tracing.py).

torch.fx.symbolic_trace keeps torch's own layers as leaf modules; wsbcn's layers are
leaves too, so a traced model (torchvision's create_feature_extractor traces the same
way) calls them at run time: outputs, gradients, running buffers and train/eval as the
float64 reference gives them, and a later weight update is seen (a WSConv traced
through would have kept its W_hat as a constant); a wsbcn.functional call is one
call_function node, as torch.nn.functional's are. TorchScript cannot compile or record
a Triton launch made from Python: script and trace raise TypeError, before any buffer
or parameter changes, also at a call site that remembered plain calls."""
import copy

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

import wsbcn
from conftest import DEVICE, rel_err
from reference import bcn_reference, gn_reference, ws_reference
from wsbcn.functional import batch_channel_norm, group_norm, weight_standardize
from wsbcn.ops.ws_model import weight_standardize_all

C, G = 8, 4
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.:DeprecationWarning")  # torch's own, on every call


def _net(estimate=False):
    torch.manual_seed(0)
    net = nn.Sequential(wsbcn.WSConv2d(3, C, 3, padding=1, correction=1, eps_mode="std"),
                        wsbcn.BatchChannelNorm2d(C, G, estimate=estimate), nn.ReLU(),
                        wsbcn.WSConv2d(C, C, 1), wsbcn.GroupNorm(G, C)).to(DEVICE)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, wsbcn.BatchChannelNorm2d):
                m.running_mean.normal_(0, 0.3)
                m.running_var.uniform_(0.5, 1.5)
                for p in m.parameters():
                    p.add_(torch.randn_like(p) * 0.2)
    return net


def _reference(net, x, buffers, training, estimate=False):
    """``net`` in float64 from its current parameters (``buffers``: float64 copies of the
    BCN running buffers, updated in place); returns (output, parameters as leaves)."""
    p = {k: v.detach().double().requires_grad_(True) for k, v in net.named_parameters()}
    y = F.conv2d(x.double(), ws_reference(p["0.weight"], correction=1, eps_mode="std"), p["0.bias"], padding=1)
    y = bcn_reference(y, G, p["1.weight"], p["1.bias"], p["1.group_weight"], p["1.group_bias"],
                      buffers["running_mean"], buffers["running_var"], training=training, estimate=estimate,
                      num_batches_tracked=buffers["num_batches_tracked"])
    y = F.conv2d(torch.relu(y), ws_reference(p["3.weight"]), p["3.bias"])
    return gn_reference(y, G, p["4.weight"], p["4.bias"]), p


def _bcn_buffers(net):
    bcn = net[1]
    return dict(running_mean=bcn.running_mean.double(), running_var=bcn.running_var.double(),
                num_batches_tracked=bcn.num_batches_tracked.clone())


@pytest.mark.parametrize("estimate", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_symbolic_trace_calls_each_layer_as_torch_calls_its_own(backend, estimate):
    net = _net(estimate)
    gm = torch.fx.symbolic_trace(net)
    calls = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert calls == {"0", "1", "2", "3", "4"}  # every layer one node: leaves, as nn.ReLU is
    assert not [n for n in gm.graph.nodes if n.op == "get_attr"]  # no W_hat kept as a constant

    x = torch.randn(2, 3, 5, 5, device=DEVICE)
    dy = torch.randn(2, C, 5, 5, device=DEVICE)
    buffers = _bcn_buffers(net)
    for step in range(2):  # the second step after an update of every parameter
        ref, p = _reference(net, x, buffers, training=True, estimate=estimate)
        y = gm(x)
        assert rel_err(y, ref) <= 1e-5, step
        grads = torch.autograd.grad((y * dy).sum(), list(gm.parameters()))
        ref_grads = torch.autograd.grad((ref * dy.double()).sum(), list(p.values()))
        for (name, _), g, r in zip(gm.named_parameters(), grads, ref_grads):
            if r.norm() > 1e-8:  # the first conv's bias before batch statistics: zero, rounding only
                assert rel_err(g, r) <= 1e-4, (step, name)
        for name in ("running_mean", "running_var"):
            assert rel_err(getattr(net[1], name), buffers[name]) <= 1e-5, (step, name)  # fp32 updates
        assert torch.equal(net[1].num_batches_tracked.cpu(), buffers["num_batches_tracked"].cpu())
        with torch.no_grad():
            for q, g in zip(gm.parameters(), grads):
                q.sub_(0.5 * g)

    gm.eval()  # read when the layers run, as nn.BatchNorm2d's leaf reads it
    assert not net[1].training
    ref, _ = _reference(net, x, buffers, training=False)
    assert rel_err(gm(x), ref) <= 1e-5


class _Functional(nn.Module):
    """wsbcn.functional calls in a forward, parameters and buffers read as attributes."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(C, 3, 3, 3))
        self.gamma, self.beta = nn.Parameter(torch.rand(C) + 0.5), nn.Parameter(torch.randn(C))
        self.register_buffer("running_mean", torch.randn(C) * 0.3)
        self.register_buffer("running_var", torch.rand(C) + 0.5)

    def forward(self, x):
        y = F.conv2d(x, weight_standardize(self.w, 1e-5, 1, "std"), padding=1)
        y = batch_channel_norm(y, G, self.running_mean, self.running_var, self.gamma, self.beta,
                               training=self.training, activation="relu")
        return group_norm(y, G, self.gamma, self.beta)


def test_symbolic_trace_records_functional_calls_as_torch_records_its_own(backend):
    """One call_function node per wsbcn.functional call (as F.group_norm gets), the
    parameters and buffers as the graph's attributes: run on the current values."""
    torch.manual_seed(2)
    model = _Functional().to(DEVICE).train()
    gm = torch.fx.symbolic_trace(model)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets == [weight_standardize, torch.conv2d, batch_channel_norm, group_norm]
    with torch.no_grad():
        gm.w.mul_(2).add_(0.1)  # the graph reads the weight when it runs
    x = torch.randn(2, 3, 5, 5, device=DEVICE)
    rm, rv = gm.running_mean.double(), gm.running_var.double()
    p = {k: v.detach().double().requires_grad_(True) for k, v in gm.named_parameters()}
    y = F.conv2d(x.double(), ws_reference(p["w"], 1e-5, 1, "std"), padding=1)
    y = bcn_reference(y, G, p["gamma"], p["beta"], running_mean=rm, running_var=rv, training=True, activation="relu")
    ref = gn_reference(y, G, p["gamma"], p["beta"])
    out = gm(x)
    assert rel_err(out, ref) <= 1e-5
    grads = torch.autograd.grad(out.square().sum(), list(gm.parameters()))
    for g, r in zip(grads, torch.autograd.grad(ref.square().sum(), list(p.values()))):
        assert rel_err(g, r) <= 1e-4
    assert rel_err(gm.running_mean, rm) <= 1e-6 and rel_err(gm.running_var, rv) <= 1e-6


def test_a_layer_traced_alone_is_refused():
    for layer in (wsbcn.WSConv2d(3, C, 3), wsbcn.BatchChannelNorm2d(C, G), wsbcn.GroupNorm(G, C)):
        with pytest.raises(TypeError, match=f"{type(layer).__name__} is a leaf module"):
            torch.fx.symbolic_trace(layer)


def test_script_is_refused_naming_the_layer():
    for layer in (wsbcn.WSConv2d(3, C, 3), wsbcn.BatchChannelNorm2d(C, G), wsbcn.GroupNorm(G, C)):
        with pytest.raises(TypeError, match=f"torch.jit.script cannot compile {type(layer).__name__}"):
            torch.jit.script(nn.Sequential(nn.Identity(), layer))


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# refused before any kernel: the Triton interpreter only runs the remembered calls before
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.slow)], indirect=True)
@pytest.mark.parametrize("remembered", [False, True])
@pytest.mark.parametrize("model_wide", [False, True])
def test_trace_is_refused_before_anything_changes(backend, remembered, model_wide):
    """Also at a call site whose plain calls were remembered (checks.recalled: no entry
    matches under a trace), and under a ModelWeightStandardizer, whose call is kept
    across forwards; the functional calls too."""
    net = _net().train()
    if model_wide:
        wsbcn.ModelWeightStandardizer(net)
    x = torch.randn(2, 3, 5, 5, device=DEVICE)
    if remembered:
        for _ in range(2):
            net(x)
    before = _state(net)
    with pytest.raises(TypeError, match="torch.jit.trace cannot record"):
        torch.jit.trace(net, x)
    for layer in (net[1], net[3], net[4]):  # each wsbcn layer alone, given its own input
        with pytest.raises(TypeError, match="torch.jit.trace cannot record"):
            torch.jit.trace(layer, torch.randn(2, C, 5, 5, device=DEVICE))
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    convs = nn.Sequential(wsbcn.WSConv2d(3, C, 3), nn.ReLU(), wsbcn.WSConv2d(C, C, 1)).to(DEVICE)  # WS alone
    if model_wide:
        wsbcn.ModelWeightStandardizer(convs)
    if remembered:
        convs(x)
    with pytest.raises(TypeError, match="torch.jit.trace cannot record"):
        torch.jit.trace(convs, x)
    w = torch.randn(4, 3, 3, 3, device=DEVICE)
    gamma, beta = torch.rand(C, device=DEVICE), torch.randn(C, device=DEVICE)
    for fn, arg in ((weight_standardize, w), (lambda t: group_norm(t, G, gamma, beta), x.new_ones(2, C, 3, 3)),
                    (lambda t: weight_standardize_all([t])[0], w)):
        if remembered:
            fn(arg)
        with pytest.raises(TypeError, match="torch.jit.trace cannot record"):
            torch.jit.trace(fn, arg)
    assert torch.equal(net[1].num_batches_tracked, before["1.num_batches_tracked"])
    copy.deepcopy(net)(x)  # plain calls still run
