"""Model-wide Weight Standardization (wsbcn/ops/ws_model.py, kernels/ws_multi.py):
every changed path gives bitwise the W_hat and weight gradients of per-layer WS, on
the torch backend and on the Triton interpreter, and both stay within the float64
reference's tolerance. No test here times anything."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import wsbcn
from compiled_graphs import refuses_cpu_triton
from conftest import DEVICE, TOL, assert_graph_replays_train_like_eager, dead_functorch_wrapper, rel_err
from reference import ws_reference
from wsbcn import tuning
from wsbcn.functional import weight_standardize
from wsbcn.kernels.layout import next_pow2
from wsbcn.kernels.ws_multi_plan import WSMultiPlan
from wsbcn.ops import ws_model
from wsbcn.ops.ws_model import ModelWeightStandardizer, weight_standardize_all


def bits(t):
    """The bit pattern of ``t`` (torch.equal says -0.0 == 0.0; this does not)."""
    t = t.detach().contiguous()
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


def assert_bitwise(a, b, what=""):
    assert a.shape == b.shape and a.dtype == b.dtype, what
    assert torch.equal(bits(a), bits(b)), what


def _weights():
    """(weight, eps, correction, eps_mode): every convention, layouts (channels_last,
    rows that are not dense), fan-ins from 1 to 300, fp32, bf16, float64, a constant
    filter, and rows with signed zeros."""
    torch.manual_seed(0)
    w = [torch.randn(4, 3, 3, 3) * 0.05 + 0.01,
         torch.randn(6, 4, 1, 1).to(memory_format=torch.channels_last),
         torch.randn(5, 7) + 100.0,
         torch.randn(3, 2, 3),
         torch.randn(2, 300) * 3 + 1,
         torch.randn(3, 1),
         torch.randn(8, 12, 3, 3)[:, ::2],
         torch.randn(4, 3, 3, 3, dtype=torch.float64),
         (torch.randn(4, 4, 2, 2) * 0.1).to(torch.bfloat16),
         torch.full((4, 16), 0.3)]
    w[9][1] = torch.randn(16)
    w[9][2] = 0.0
    w[9][3] = torch.tensor([0.0, -0.0] * 8)
    args = [(1e-5, 0, "var"), (1e-3, 1, "std"), (1e-5, 1, "var"), (1e-6, 0, "std"), (1e-5, 0, "var"),
            (1e-5, 0, "var"), (1e-5, 1, "std"), (1e-5, 0, "var"), (1e-5, 1, "std"), (1e-5, 0, "std")]
    return [t.to(DEVICE) for t in w], args


def _per_layer_and_model_wide(weights, args, grads=None):
    """(W_hat, dW) per weight from per-layer WS and from weight_standardize_all."""
    results = []
    for model_wide in (False, True):
        leaves = [w.detach().clone().requires_grad_(True) for w in weights]
        if model_wide:
            eps, correction, mode = (list(x) for x in zip(*args))
            hats = weight_standardize_all(leaves, eps, correction, mode)
        else:
            hats = [weight_standardize(w, *a) for w, a in zip(leaves, args)]
        if grads is None:
            torch.manual_seed(1)
            grads = [torch.randn_like(h) for h in hats]
        roots = [(h, g) for h, g in zip(hats, grads) if g is not None]
        torch.autograd.backward([h for h, _ in roots], [g for _, g in roots])
        results.append((hats, [w.grad for w in leaves]))
    return results


def _check_bitwise(weights, args, grads=None):
    (hats_a, dws_a), (hats_b, dws_b) = _per_layer_and_model_wide(weights, args, grads)
    for i, (ha, hb, da, db) in enumerate(zip(hats_a, hats_b, dws_a, dws_b)):
        assert_bitwise(hb, ha, f"W_hat {i}")
        assert hb.stride() == ha.stride(), i
        if da is None:
            assert db is None, i
        else:
            assert_bitwise(db, da, f"dW {i}")
    return hats_b, dws_b


def test_all_weights_at_once_bitwise_per_layer_and_near_float64(backend):
    weights, args = _weights()
    hats, dws = _check_bitwise(weights, args)
    torch.manual_seed(1)
    grads = [torch.randn_like(h) for h in hats]
    for w, (eps, correction, mode), h, g, dw in zip(weights, args, hats, grads, dws):
        w64 = w.detach().double().requires_grad_(True)
        ref = ws_reference(w64, eps, correction, mode)
        ref.backward(g.double())
        tol = TOL[w.dtype]
        assert rel_err(h, ref) <= tol and rel_err(dw, w64.grad) <= tol


def test_weights_without_gradient_get_none(backend):
    weights, args = _weights()
    weights, args = weights[:4] + weights[7:8], args[:4] + args[7:8]
    grads = [None if i in (2, 4) else torch.randn(w.shape, dtype=w.dtype, device=DEVICE)
             for i, w in enumerate(weights)]
    _check_bitwise(weights, args, grads)


def _capped_configs(cap, looped_cap=None):
    """A config function whose BLOCK is the heuristic's capped at ``cap`` lanes (rows
    longer than the cap loop, as on a GPU, whose cap is 512); with ``looped_cap``,
    rows longer than 64 get that BLOCK instead (a looping weight whose B is not the
    pack's largest: a launch of its own)."""
    heuristic = tuning.config_for

    def config_for(kernel, t, shape, *a, **k):
        config = heuristic(kernel, t, shape, *a, **k)
        config["BLOCK"] = min(config["BLOCK"], cap)
        if looped_cap is not None and shape[1] > 64:
            config["BLOCK"] = looped_cap
        return config

    return config_for


@pytest.mark.parametrize("cap,looped_cap,launches", [(16, None, 1), (128, 16, 2)])
def test_looping_rows_and_mixed_blocks_bitwise(monkeypatch, cap, looped_cap, launches):
    """Rows that loop beside rows that fit their own (smaller) block, in one launch,
    give the per-layer bits; a looping weight of another block gets a launch of its own."""
    monkeypatch.setenv("WSBCN_BACKEND", "triton")
    monkeypatch.setattr(tuning, "config_for", _capped_configs(cap, looped_cap))
    torch.manual_seed(2)
    shapes = [(3, 1), (2, 5), (2, 16), (2, 33), (3, 64), (2, 75), (2, 3, 7, 7)]
    weights = [(torch.randn(s) * 0.1 + 0.05).to(DEVICE) for s in shapes]
    weights[3][0, 7] = -0.0
    args = [(1e-5, 0, "var"), (1e-5, 1, "std")] * 3 + [(1e-4, 1, "var")]
    _check_bitwise(weights, args)
    assert ws_model._validate(weights, args).launches() == (launches, launches)


def test_rows_narrower_than_the_launch_bitwise_with_signed_zeros_and_huge_values(monkeypatch):
    """Rows whose own block B is narrower than the launch's lanes: the tree levels above
    log2(B) merge the row's result with empty lanes (kernels/ws_multi.py), which must
    give it back bit for bit, also when it is -0.0 itself: rows of gradients of -0.0
    only (with fan_in = B their sums are -0.0) and of zeros of both signs, and weight
    rows of signed zeros, beside rows that fill the launch's block and rows that loop;
    and rows whose mean is 2^64 or more (per layer their M2 overflows to inf, W_hat is
    0: the merge's M2 term, inf * 0, must not make it NaN).
    The interpreter's tl.sum of one element adds +0.0, so there the last step of every
    sum loses a -0.0 both ways; on a GPU this tells the signs of zero sums apart."""
    monkeypatch.setenv("WSBCN_BACKEND", "triton")
    monkeypatch.setattr(tuning, "config_for", _capped_configs(64))
    torch.manual_seed(3)
    shapes = [(3, 5), (3, 8), (3, 16), (3, 33), (3, 64), (3, 100)]  # B = 8, 8, 16, 64, 64; 100 loops
    weights = [(torch.randn(s) * 0.1 + 0.05).to(DEVICE) for s in shapes]
    grads = [torch.randn(s).to(DEVICE) for s in shapes]
    for w, g in zip(weights, grads):
        g[0] = -0.0
        g[1] = torch.tensor([0.0, -0.0]).repeat(w.shape[1])[:w.shape[1]]
        w[2] = torch.tensor([-0.0, 0.0, -0.0]).repeat(w.shape[1])[:w.shape[1]]
    huge = torch.tensor([[0.0] + [4e19] * 7, [0.0] + [-4e19] * 7, [0.0] + [1e30] * 7]).to(DEVICE)  # fan_in 8 = B
    weights += [huge, huge.clone()]
    grads += [torch.randn(3, 8).to(DEVICE) for _ in range(2)]
    args = [(1e-5, 0, "var"), (1e-5, 1, "std")] * 4
    _check_bitwise(weights, args, grads)
    assert ws_model._validate(weights, args).launches() == (1, 1)


def test_forward_and_backward_blocks_may_differ(monkeypatch):
    monkeypatch.setenv("WSBCN_BACKEND", "triton")
    heuristic = tuning.config_for

    def config_for(kernel, t, shape, *a, **k):
        config = heuristic(kernel, t, shape, *a, **k)
        if kernel == "ws_bwd":
            config["BLOCK"] = min(config["BLOCK"], 8)
        return config

    monkeypatch.setattr(tuning, "config_for", config_for)
    torch.manual_seed(3)
    weights = [(torch.randn(s) * 0.1).to(DEVICE) for s in [(3, 20), (2, 4, 3, 3), (2, 6)]]
    _check_bitwise(weights, [(1e-5, 0, "var"), (1e-5, 1, "std"), (1e-5, 0, "var")])


def _resnet50_fan_ins():
    """Fan-ins of ResNet-50's 53 convs: the stem, then per stage the first block's
    conv1, conv2, conv3 and downsample, and the other blocks' conv1, conv2, conv3."""
    fan_ins, width = [3 * 7 * 7], 64
    for planes, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        fan_ins += [width, planes * 9, planes, width]
        fan_ins += [planes * 4, planes * 9, planes] * (blocks - 1)
        width = planes * 4
    return fan_ins


RESNET50_FAN_INS = _resnet50_fan_ins()


@pytest.mark.parametrize("on_gpu", [True, False])
def test_a_resnet50_takes_one_launch_each_way(on_gpu):
    """The plans the 53 ResNet-50 conv weights get (GPU: rows longer than 512 loop)
    fit one forward and one backward launch."""
    assert len(RESNET50_FAN_INS) == 53
    specs = [((64, f), (f, 1), 1e-5, 1, True) for f in RESNET50_FAN_INS]
    configs = [tuning.ws_config(f, on_gpu) for f in RESNET50_FAN_INS]
    plan = WSMultiPlan(specs, torch.float32, torch.device("cpu"), configs, configs)
    assert len(plan.fwd) == 1 and len(plan.bwd) == 1
    assert plan.fwd[0].grid == (53 * 64, 1, 1)


class _Net(nn.Module):
    """WSConvs of both conventions, one called twice, one not called at all, one
    with a channels_last weight."""

    def __init__(self):
        super().__init__()
        self.c1 = wsbcn.WSConv2d(3, 4, 3, padding=1)
        self.c2 = wsbcn.WSConv2d(4, 4, 3, padding=1, eps_mode="std", correction=1)
        self.c3 = wsbcn.WSConv2d(4, 2, 1)
        self.unused = wsbcn.WSConv2d(2, 2, 1)
        self.c3.weight.data = self.c3.weight.data.to(memory_format=torch.channels_last)

    def forward(self, x):
        y = torch.relu(self.c1(x))
        y = torch.relu(self.c2(y))
        y = self.c2(y)
        return self.c3(y)


def _train(model, xs, compiled=None):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    outs, grads = [], []
    for x in xs:
        opt.zero_grad(set_to_none=True)
        y = (model if compiled is None else compiled)(x)
        y.square().mean().backward()
        outs.append(y.detach())
        grads.append({n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()})
        opt.step()
    return outs, grads


def _check_trains_bitwise(a, b, unused_gets_zeros=False):
    for ya, yb in zip(*(r[0] for r in (a, b))):
        assert_bitwise(yb, ya, "output")
    for ga, gb in zip(a[1], b[1]):
        for name in ga:
            if ga[name] is None and unused_gets_zeros and gb[name] is not None:
                assert not gb[name].any(), name
            elif ga[name] is None:
                assert gb[name] is None, name
            else:
                assert_bitwise(gb[name], ga[name], name)


def test_standardizer_trains_bitwise_like_per_layer(backend):
    torch.manual_seed(4)
    per_layer = _Net().to(DEVICE)
    model = copy.deepcopy(per_layer)
    standardizer = ModelWeightStandardizer(model)
    assert [m for m in standardizer.layers] == [model.c1, model.c2, model.c3, model.unused]
    xs = [torch.randn(1, 3, 4, 4, device=DEVICE) for _ in range(2)]
    a, b = _train(per_layer, xs), _train(model, xs)
    _check_trains_bitwise(a, b)
    assert b[1][0]["unused.weight"] is None
    assert standardizer._hats is None  # the hand-over ended with the forward


@pytest.mark.parametrize("guards", ["TensorGuards", "without"])
def test_the_validated_call_is_kept_while_the_weights_keep_their_layout(monkeypatch, guards):
    """Steps with the same weights reuse the standardizer's validated call (one before the
    layout check returned a new one every step); a weight given another layout in place
    gets a new one. With TensorGuards and, where torch has none, by sizes and strides; a
    weight tied at two layers too."""
    from wsbcn import _compat

    if guards == "without":
        monkeypatch.setattr(_compat, "_TENSOR_GUARDS", None)
    model = nn.Sequential(wsbcn.WSConv2d(3, 8, 3), wsbcn.WSConv2d(8, 8, 1), wsbcn.WSConv2d(8, 8, 1)).to(DEVICE)
    model[2].weight = model[1].weight
    standardizer = ModelWeightStandardizer(model)
    x = torch.randn(1, 3, 6, 6, device=DEVICE)
    model(x).sum().backward()
    call = standardizer._call
    for _ in range(2):
        model(x).sum().backward()
        assert standardizer._call is call
    model[0].weight.data = model[0].weight.data.transpose(2, 3)
    model(x).sum().backward()
    assert standardizer._call is not call


@pytest.mark.parametrize("relayout", ["transpose", "view", "as_strided"])
def test_a_weight_given_another_layout_in_place_is_standardized_as_it_is_now(backend, relayout):
    """``weight.data = w.transpose(2, 3)`` (or a view of another shape) keeps the Parameter
    object and its address: the standardizer's validated call must not be reused (the
    kernels read the old strides and shape: errors of 177, a 3x3 kernel on a 9x1 weight)."""
    torch.manual_seed(5)
    model = nn.Sequential(wsbcn.WSConv2d(4, 6, 3), nn.ReLU(), wsbcn.WSConv2d(6, 6, 1)).to(DEVICE)
    per_layer = copy.deepcopy(model)
    ModelWeightStandardizer(model)
    x = torch.randn(2, 4, 11, 11, device=DEVICE)
    model(x)
    for m in (model, per_layer):
        w = m[0].weight.data
        m[0].weight.data = {"transpose": lambda: w.transpose(2, 3), "view": lambda: w.view(6, 4, 9, 1),
                            "as_strided": lambda: w.as_strided((6, 4, 3, 3), (36, 1, 12, 4))}[relayout]()
    assert_bitwise(model(x), per_layer(x), relayout)
    w_hat = ws_reference(model[0].weight, 1e-5, 0, "var")
    reference = torch.nn.functional.conv2d(x.double(), w_hat, model[0].bias.double())
    assert rel_err(model[0](x), reference) <= TOL[torch.float32]


def test_standardizer_hand_over_rules(monkeypatch):
    """A W_hat is taken once, inside the model's forward only; a layer whose weight or
    arguments changed standardizes per layer; remove() detaches. (Python logic: the
    torch backend only.)"""
    monkeypatch.setenv("WSBCN_BACKEND", "torch")
    torch.manual_seed(5)
    model = _Net().to(DEVICE)
    standardizer = ModelWeightStandardizer(model)
    calls = []
    real = ws_model.ModelCall.call_plain  # where every call goes (__call__ after unwrapping)
    monkeypatch.setattr(ws_model.ModelCall, "call_plain", lambda self, w: calls.append(len(w)) or real(self, w))
    x = torch.randn(1, 3, 4, 4, device=DEVICE)
    model(x)
    assert calls == [4] and standardizer._hats is None
    # outside the model's forward a layer standardizes its own weight
    assert model.c1._ws_model.take(model.c1, model.c1.weight) is None
    assert_bitwise(model.c1.standardized_weight(), weight_standardize(model.c1.weight, 1e-5, 0, "var"))
    # a forward that raises ends the hand-over too
    with pytest.raises(RuntimeError):
        model(torch.randn(1, 5, 4, 4, device=DEVICE))
    assert standardizer._hats is None
    # changed arguments: per layer for that forward, read again for the next
    model.c3.eps = 1e-3
    ref = copy.deepcopy(model)
    standardizer_ref = ref.c1._ws_model
    standardizer_ref.remove()
    assert_bitwise(model(x), ref(x))
    # a new Parameter object is picked up
    model.c1.weight = nn.Parameter(model.c1.weight.detach() * 2)
    ref.c1.weight = nn.Parameter(ref.c1.weight.detach() * 2)
    assert_bitwise(model(x), ref(x))
    assert standardizer._args[2] == (1e-3, 0, "var")
    # a parametrized weight leaves the model-wide call
    torch.nn.utils.parametrize.register_parametrization(model.c2, "weight", _Double())
    torch.nn.utils.parametrize.register_parametrization(ref.c2, "weight", _Double())
    assert_bitwise(model(x), ref(x))
    assert model.c2 not in standardizer.layers and calls[-1] == 3
    standardizer.remove()
    n = len(calls)
    model(x)
    assert len(calls) == n and all(m._ws_model is None and "_ws_model_ref" not in m.__dict__
                                   for m in (model.c1, model.c2, model.c3, model.unused))


def test_standardizer_unwraps_nothing_it_validated_and_leaves_functorch_wrappers_per_layer(backend, monkeypatch):
    """The standardizer's validated weights are plain tensors, so its calls skip the
    unwrap (53 of them cost ~14 us a step). A weight that is a functorch wrapper (one
    that outlived its transform, put in _parameters) sends every layer per layer for
    that forward, which unwraps it (it used to fail reading its address), and the next forward
    of the validated weights is model-wide again. Bitwise per layer's throughout."""
    torch.manual_seed(7)
    per_layer = _Net().to(DEVICE)
    model = copy.deepcopy(per_layer)
    ModelWeightStandardizer(model)
    unwraps = []
    real_unwrap = ws_model._compat.unwrap_if_dead
    monkeypatch.setattr(ws_model._compat, "unwrap_if_dead", lambda t: unwraps.append(1) or real_unwrap(t))
    calls = []
    real = ws_model.ModelCall.call_plain
    monkeypatch.setattr(ws_model.ModelCall, "call_plain", lambda self, w: calls.append(len(w)) or real(self, w))
    x = torch.randn(1, 3, 4, 4, device=DEVICE)

    def run(m):
        out = m(x)
        return [out, *torch.autograd.grad(out.square().sum(), [m.c2.weight, m.c3.weight])]

    for _ in range(2):
        ref = run(per_layer)
        before = len(unwraps)
        for a, b in zip(run(model), ref):
            assert_bitwise(a, b)
    assert calls == [4, 4]
    assert len(unwraps) == before  # the second forward: model-wide and recalled calls unwrap nothing
    plain, plain_ref = model.c1._parameters["weight"], per_layer.c1._parameters["weight"]
    model.c1._parameters["weight"] = dead_functorch_wrapper(plain)
    per_layer.c1._parameters["weight"] = dead_functorch_wrapper(plain_ref)
    before = len(unwraps)
    for a, b in zip(run(model), run(per_layer)):
        assert_bitwise(a, b)
    assert calls == [4, 4] and len(unwraps) > before  # per layer, unwrapped
    model.c1._parameters["weight"], per_layer.c1._parameters["weight"] = plain, plain_ref
    for a, b in zip(run(model), run(per_layer)):
        assert_bitwise(a, b)
    assert calls == [4, 4, 4]


class _Double(nn.Module):
    def forward(self, w):
        return w * 2


def test_grads_of_every_ws_weight_are_ready_at_the_end(backend):
    """What the README states for DDP: with model-wide WS every WSConv weight's
    gradient is accumulated after every other parameter's (post-accumulate hooks)."""
    torch.manual_seed(6)
    order = {}
    for model_wide in (False, True):
        model = nn.Sequential(wsbcn.WSConv2d(3, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(),
                              wsbcn.WSConv2d(4, 4, 3, padding=1), nn.GroupNorm(2, 4)).to(DEVICE)
        if model_wide:
            ModelWeightStandardizer(model)
        seen = []
        for name, p in model.named_parameters():
            p.register_post_accumulate_grad_hook(lambda p, name=name: seen.append(name))
        model(torch.randn(1, 3, 4, 4, device=DEVICE)).sum().backward()
        order[model_wide] = seen
    per_layer, model_wide = order[False], order[True]
    assert sorted(per_layer) == sorted(model_wide)
    # per layer: a conv's weight is ready as the backward passes it (before the norm below it)
    assert per_layer.index("3.weight") < per_layer.index("1.weight")
    # model-wide: both WS weights after every other parameter
    assert sorted(model_wide[-2:]) == ["0.weight", "3.weight"]


@pytest.mark.parametrize("dims", [1, 3])
def test_1d_and_3d_layers(backend, dims):
    conv = {1: wsbcn.WSConv1d, 3: wsbcn.WSConv3d}[dims]
    torch.manual_seed(7)
    per_layer = nn.Sequential(conv(2, 4, 3, padding=1), nn.ReLU(), conv(4, 3, 1, eps_mode="std", correction=1))
    per_layer = per_layer.to(DEVICE)
    model = copy.deepcopy(per_layer)
    ModelWeightStandardizer(model)
    xs = [torch.randn((1, 2) + (4,) * dims, device=DEVICE)]
    _check_trains_bitwise(_train(per_layer, xs), _train(model, xs))


def test_fullgraph_compile_bitwise_like_compiled_per_layer(backend):
    """torch.compile(fullgraph=True): no graph break; on the torch backend the ops trace
    into the closed form, on the interpreter the model op stays opaque. With aot_eager
    (each op run as eager runs it) the bits are those of the per-layer model compiled
    the same way, and both are eager's within float32 tolerance. One difference: a
    compiled graph hands an autograd.Function zeros for the gradient of an output it
    did not use, so the layer not called gets a zero weight gradient, not None."""
    torch._dynamo.reset()  # the graphs of the other backend's run do not guard on WSBCN_BACKEND
    torch.manual_seed(8)
    eager = _Net().to(DEVICE)
    per_layer, model = copy.deepcopy(eager), copy.deepcopy(eager)
    ModelWeightStandardizer(model)
    xs = [torch.randn(1, 3, 4, 4, device=DEVICE) for _ in range(2 if backend == "torch" else 1)]
    compiled = [torch.compile(m, fullgraph=True, backend="aot_eager") for m in (per_layer, model)]
    a, b = _train(per_layer, xs, compiled[0]), _train(model, xs, compiled[1])
    _check_trains_bitwise(a, b, unused_gets_zeros=True)
    for y, y_eager in zip(b[0], _train(eager, xs)[0]):
        torch.testing.assert_close(y, y_eager, rtol=1e-5, atol=1e-5)


def test_compiled_functional_mixed_packs_bitwise(monkeypatch):
    """Under torch.compile the Triton weights go through the model op (rows that are not
    dense included) and the rest (float64, an empty weight) through the per-layer ops,
    forward and backward, bitwise per-layer WS compiled the same way."""
    monkeypatch.setenv("WSBCN_BACKEND", "triton")
    torch._dynamo.reset()
    torch.manual_seed(13)
    weights = [torch.randn(4, 3, 3, 3), torch.randn(6, 8, 3)[:, ::2], torch.randn(3, 5, dtype=torch.float64),
               torch.randn(0, 3), torch.randn(2, 7).to(torch.bfloat16)]
    weights = [w.to(DEVICE) for w in weights]
    args = [(1e-5, 0, "var"), (1e-5, 1, "std"), (1e-4, 1, "var"), (1e-5, 0, "var"), (1e-5, 1, "std")]
    grads = [torch.randn(w.shape, dtype=w.dtype, device=DEVICE) for w in weights]
    eps, correction, mode = (list(x) for x in zip(*args))
    results = []
    for fn in (lambda ws: [weight_standardize(w, *a) for w, a in zip(ws, args)],
               lambda ws: list(weight_standardize_all(ws, eps, correction, mode))):
        leaves = [w.detach().clone().requires_grad_(True) for w in weights]
        hats = torch.compile(fn, fullgraph=True, backend="aot_eager")(leaves)
        torch.autograd.backward(hats, grads)
        results.append((hats, [w.grad for w in leaves]))
    for a, b in zip(*(h + g for h, g in results)):
        assert_bitwise(b, a)


def test_ops_are_registered_with_fake_kernels():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        ws = [torch.empty(8, 4, 3, 3), torch.empty(4, 8, 1, 1)]
        out = torch.ops.wsbcn.ws_model_forward(ws, [1e-5, 1e-5], [0, 1], [False, True])
        assert [t.shape for t in out] == [(8 * 36 + 4 * 8,), (3, 12)]  # per pack: a flat W_hat, stats
        dws = torch.ops.wsbcn.ws_model_backward([torch.empty_like(w) for w in ws], ws, out[1:])
        assert [t.shape for t in dws] == [(8 * 36 + 4 * 8,)]


def test_ops_pass_opcheck(backend):
    torch.manual_seed(9)
    ws = [torch.randn(4, 3, 3, 3, device=DEVICE), torch.randn(3, 5, device=DEVICE)]
    args = (ws, [1e-5, 1e-3], [1, 0], [True, False])
    torch.library.opcheck(torch.ops.wsbcn.ws_model_forward.default, args)
    flat, stats = torch.ops.wsbcn.ws_model_forward(*args)
    torch.library.opcheck(torch.ops.wsbcn.ws_model_backward.default, ([torch.randn_like(w) for w in ws], ws, [stats]))
    ref = [weight_standardize(w, e, c, "std" if s else "var") for w, e, c, s in zip(*args)]
    for a, b in zip(ws_model._layout(ws).views(flat), ref):
        assert_bitwise(a, b)


def test_double_backward_against_float64(monkeypatch):
    monkeypatch.setenv("WSBCN_BACKEND", "torch")
    torch.manual_seed(10)
    for mode, correction in (("var", 0), ("std", 1)):
        ws = [torch.randn(3, 2, 3, dtype=torch.float64, requires_grad=True),
              torch.randn(2, 5, dtype=torch.float64, requires_grad=True)]
        assert torch.autograd.gradgradcheck(lambda *w: weight_standardize_all(w, 1e-3, correction, mode), ws)


def test_functional_validates_like_per_layer():
    with pytest.raises(ValueError, match="correction"):
        weight_standardize_all([torch.ones(4, 3), torch.ones(4, 1)], correction=1)
    with pytest.raises(ValueError, match="2 values for 3 weights"):
        weight_standardize_all([torch.ones(4, 3)] * 3, eps=[1e-5, 1e-5])
    with pytest.raises(TypeError, match="floating"):
        weight_standardize_all([torch.ones(4, 3, dtype=torch.int32)])
    assert weight_standardize_all([]) == ()


def test_standardizer_survives_deepcopy_and_pickle(tmp_path):
    model = _Net()
    ModelWeightStandardizer(model)
    x = torch.randn(1, 3, 4, 4)
    y = model(x)
    clone = copy.deepcopy(model)
    torch.save(model, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    for m in (clone, loaded):
        assert m.c1._ws_model is not model.c1._ws_model and m.c1._ws_model.layers[0] is m.c1
        assert_bitwise(m(x), y)


def test_a_layer_copied_alone_leaves_its_standardizer_behind():
    """copy.deepcopy of covered layers without their model: the copies standardize per
    layer (no copy of the whole model rides along) and can join another standardizer."""
    model = _Net()
    standardizer = ModelWeightStandardizer(model)
    x = torch.randn(1, 3, 4, 4)
    head = copy.deepcopy(nn.Sequential(model.c1, nn.ReLU(), model.c2))
    assert head[0]._ws_model is None and head[2]._ws_model is None
    assert model.c1._ws_model is standardizer and standardizer.layers[0] is model.c1
    ref = torch.relu(nn.functional.conv2d(
        x.double(), ws_reference(head[0].weight), head[0].bias.double(), padding=1))
    ref = nn.functional.conv2d(ref, ws_reference(head[2].weight, 1e-5, 1, "std"), head[2].bias.double(), padding=1)
    assert rel_err(head(x), ref) <= TOL[torch.float32]
    joined = ModelWeightStandardizer(head)
    assert joined.layers == [head[0], head[2]]
    assert_bitwise(head(x), nn.Sequential(model.c1, nn.ReLU(), model.c2)(x))


def test_convert_ws_model(monkeypatch):
    """convert(ws="model") converts as ws=True and attaches one standardizer (once)."""
    monkeypatch.setenv("WSBCN_BACKEND", "torch")  # convert's logic; the kernels are tested above
    torch.manual_seed(12)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)).to(DEVICE)
    per_layer = wsbcn.convert(copy.deepcopy(plain), num_groups=2)
    model = wsbcn.convert(plain, num_groups=2, ws="model")  # the model itself: the ReLU is fused
    convs = [m for m in model.modules() if isinstance(m, wsbcn.WSConv2d)]
    standardizer = convs[0]._ws_model
    assert isinstance(standardizer, wsbcn.ModelWeightStandardizer) and standardizer.model is model
    assert standardizer.layers == convs and len(convs) == 2
    assert wsbcn.convert(model, num_groups=2, ws="model") is model and convs[0]._ws_model is standardizer
    xs = [torch.randn(2, 3, 4, 4, device=DEVICE)]
    _check_trains_bitwise(_train(per_layer, xs), _train(model, xs))
    with pytest.raises(ValueError, match="ws must be"):
        wsbcn.convert(model, ws="all")


@pytest.mark.gpu
def test_cuda_bitwise_resnet50_shapes_and_a_model():
    """On a GPU the multi-tensor kernels compile to their own code: the bits must still
    be the per-layer kernels' (ResNet-50's fan-ins: rows that loop beside rows that fit
    a smaller block, fp32 and bf16), and a standardized model trains like per-layer."""
    torch.manual_seed(11)
    for dtype in (torch.float32, torch.bfloat16):
        weights = [(torch.randn(16, f, device="cuda") * 0.05 + 0.01).to(dtype) for f in sorted(set(RESNET50_FAN_INS))]
        weights += [torch.randn(64, 64, 3, 3, device="cuda").to(dtype=dtype, memory_format=torch.channels_last)]
        args = [(1e-5, 1, "std"), (1e-5, 0, "var")] * (len(weights) // 2) + [(1e-5, 0, "var")] * (len(weights) % 2)
        _check_bitwise(weights, args)
    per_layer = _Net().cuda()
    model = copy.deepcopy(per_layer)
    ModelWeightStandardizer(model)
    xs = [torch.randn(2, 3, 8, 8, device="cuda") for _ in range(2)]
    _check_trains_bitwise(_train(per_layer, xs), _train(model, xs))


@pytest.mark.gpu
def test_training_step_with_standardizer_captured_in_cuda_graph():
    """A training step of a standardized model replays from a CUDA graph like eager: the
    tables of new addresses reach the device by copies from pinned memory (no host sync)."""
    torch.manual_seed(14)
    eager = _Net().cuda()
    graphed = copy.deepcopy(eager)
    ModelWeightStandardizer(eager)
    ModelWeightStandardizer(graphed)
    assert_graph_replays_train_like_eager(eager, graphed, (2, 3, 8, 8))


def test_next_pow2_blocks_in_meta():
    """The plan writes each weight's own per-layer block (log2) into its meta row."""
    specs = [((2, f), (f, 1), 1e-5, 0, False) for f in (1, 5, 64, 600)]
    configs = [tuning.ws_config(f, True) for f in (1, 5, 64, 600)]
    plan = WSMultiPlan(specs, torch.float32, torch.device("cpu"), configs, configs)
    _, meta = plan.passes["fwd"]
    assert [1 << row[5] for row in meta] == [min(next_pow2(f), 512) for f in (1, 5, 64, 600)]


CHECK_GPU_PATH = r"""
import json
import torch
from wsbcn.tools import stub_driver
stub_driver.install()
import wsbcn
from wsbcn import backends
from wsbcn.ops.ws_model import ModelWeightStandardizer
from compiled_graphs import calls, capture, inductor_code
backends.emulate_gpu(stub_driver.GPU_NAME, stub_driver.SM_COUNT)

def model():
    torch.manual_seed(0)
    m = torch.nn.Sequential(wsbcn.WSConv2d(3, 16, 3, padding=1), wsbcn.GroupNorm(4, 16, activation="silu"),
                            wsbcn.WSConv2d(16, 16, 3, padding=1, eps_mode="std", correction=1),
                            wsbcn.WSConv2d(16, 8, 1), wsbcn.WSConv2d(8, 8, 1, bias=False))
    ModelWeightStandardizer(m)
    return m

result = {}
m = model()
for step in range(3):  # eager: the first call compiles for sm_90, the third goes direct
    before = stub_driver.launch_count()
    standardizer = m[0]._ws_model
    standardizer._before(m, ())  # the forward pre-hook, then what each layer takes
    hats = [c.standardized_weight() for c in standardizer.layers]
    standardizer._after(m, (), None)
    torch.autograd.backward(hats, [torch.ones_like(h) for h in hats])
    result[f"eager launches {step}"] = stub_driver.launch_count() - before

graphs = []

def describe(g):
    out = []
    for n, kernel in calls(g):
        if kernel is not None:
            out.append([kernel, sorted(n.kwargs["tensors_to_clone"])])
        elif "wsbcn" in str(n.target):
            out.append([str(n.target), []])
    return out

compiled = torch.compile(model(), fullgraph=True, backend=capture(graphs))
y = compiled(torch.randn(2, 3, 8, 8))
y.square().mean().backward()
result["graphs"] = [describe(g) for g in graphs]
result.update(inductor_code(model(), torch.randn(2, 3, 8, 8)))
print("RESULT" + json.dumps(result))
"""


@pytest.mark.slow  # sm_90 compiles and an inductor compile over the stub driver: ~1 min
def test_gpu_path_one_launch_each_way_eager_and_compiled():
    """Over the stub CUDA driver (a GPU's Triton path, nothing executes): eager, a
    model's WS is 1 forward + 1 backward launch; compiled, the forward graph holds one
    _ws_multi_fwd_kernel launch and the backward one _ws_multi_bwd_kernel, writing only
    fresh buffers, and inductor's code launches the kernel itself."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "WSBCN_BACKEND")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (os.path.dirname(__file__), env.get("PYTHONPATH"))))  # compiled_graphs
    proc = subprocess.run([sys.executable, "-c", CHECK_GPU_PATH], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert [out[f"eager launches {i}"] for i in range(3)] == [2, 2, 2]
    forward, backward = out["graphs"]
    multi = [k for k, _ in forward if k.startswith("_ws_multi")]
    assert multi == ["_ws_multi_fwd_kernel"] and forward[0][0] == "_ws_multi_fwd_kernel"
    assert sorted(forward[0][1]) == ["Stats", "W_hat"]
    assert [(k, c) for k, c in backward if k.startswith("_ws_multi")] == [("_ws_multi_bwd_kernel", ["Dw"])]
    assert not any(k.startswith(("_ws_fwd", "_ws_bwd")) for k, _ in forward + backward)
    if refuses_cpu_triton(out):
        pytest.skip(f"torch {torch.__version__}'s inductor writes no Triton launch for CPU tensors (the stub's GPU)")
    assert "_ws_multi_fwd_kernel" in out["output code"] and ".run(" in out["output code"]


def _grads(model):
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("move", ["saved_tensor_hooks", "data_swap", "data_swap_to_contiguous", "strided_statistics"])
def test_weights_moved_before_the_backward_get_the_per_layer_gradients(backend, move):
    """The backward read the weights at the addresses the forward had used: after a
    saved-tensor hook that unpacks a copy (torch.autograd.graph.save_on_cpu on a GPU) or
    a ``.data`` swap between forward and backward (a reshard), the kernel read stale
    memory (NaN gradients). It reads where the saved weights are now, laid out as the
    forward's plans walk them: a channels_last weight swapped to a contiguous one gave
    gradients off by 100 % model-wide, and per layer too (the per-layer plan walked the
    new data with the forward's strides)."""
    torch.manual_seed(6)
    per_layer = nn.Sequential(wsbcn.WSConv2d(3, 4, 3, padding=1), nn.ReLU(), wsbcn.WSConv2d(4, 4, 3, eps_mode="std"),
                              nn.ReLU(), wsbcn.WSConv2d(4, 2, 1)).to(DEVICE)  # every weight gets a gradient
    if move == "data_swap_to_contiguous":
        per_layer = per_layer.to(memory_format=torch.channels_last)
    model = copy.deepcopy(per_layer)
    ModelWeightStandardizer(model)
    x = torch.randn(1, 3, 5, 5, device=DEVICE)
    convs = [m for m in per_layer if isinstance(m, wsbcn.WSConv2d)]
    leaves = [t.detach().double().requires_grad_(True) for m in convs for t in (m.weight, m.bias)]
    y = x.double()
    for i, m in enumerate(convs):  # the float64 reference, before anything moves
        w_hat = ws_reference(leaves[2 * i], m.eps, m.correction, m.eps_mode)
        y = nn.functional.conv2d(y, w_hat, leaves[2 * i + 1], padding=m.padding)
        y = torch.relu(y) if i < len(convs) - 1 else y
    y.square().sum().backward()
    for m in (per_layer, model):
        if move == "saved_tensor_hooks":
            with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t.clone()):
                loss = m(x).square().sum()
        elif move == "strided_statistics":  # the WS statistics [3, rows] given back as a strided view
            with torch.autograd.graph.saved_tensors_hooks(
                    lambda t: t.repeat_interleave(2, dim=-1)[..., ::2] if t.dim() == 2 else t, lambda t: t):
                loss = m(x).square().sum()
        else:
            loss = m(x).square().sum()
            for p in m.parameters():
                p.data = p.data.contiguous() if move == "data_swap_to_contiguous" else p.data.clone()
        loss.backward()
    a, b = _grads(per_layer), _grads(model)
    for name in a:
        assert_bitwise(b[name], a[name], name)
    for p, ref in zip(model.parameters(), leaves):
        assert rel_err(p.grad, ref.grad) <= 1e-5


class _Wrapper(nn.Module):
    """A head registered before the model that holds it: a deep copy reaches a covered
    layer before its model."""

    def __init__(self, net):
        super().__init__()
        self.head = net.c3
        self.net = net

    def forward(self, x):
        return self.net(x)


def test_a_copy_that_reaches_a_layer_before_its_model_copies_both(tmp_path):
    """deepcopy (and freeze, which copies) raised TypeError when it reached a covered
    layer before the model: the layer's standardizer took None. A layer's state now
    leaves the standardizer out; the model's hooks carry it, and it links the copies."""
    net = _Net()
    ModelWeightStandardizer(net)
    wrapper = _Wrapper(net)
    x = torch.randn(1, 3, 4, 4)
    y = wrapper(x)
    clone = copy.deepcopy(wrapper)
    standardizer = clone.net.c1._ws_model
    assert standardizer is not net.c1._ws_model and standardizer.model is clone.net
    assert clone.head is clone.net.c3 and clone.head._ws_model is standardizer
    assert_bitwise(clone(x), y)
    wsbcn.freeze(wrapper)
    torch.save(net.c1, tmp_path / "layer.pt")  # a layer alone: without its model
    assert torch.load(tmp_path / "layer.pt", weights_only=False)._ws_model is None


def test_a_shallow_copy_of_the_standardizer_takes_no_layers():
    """copy.copy of a standardizer linked the model's layers to the copy (which has no
    hooks): every forward then went per layer. The layers stay with the original."""
    net = _Net()
    standardizer = ModelWeightStandardizer(net)
    copy.copy(standardizer)
    assert all(m._ws_model is standardizer for m in standardizer.layers)


def test_a_model_and_its_standardizer_are_freed_when_the_model_is(backend):
    """The standardizer and its model referred to each other (its hooks, the layers'
    links, its validated call's backward callback): ``del model`` freed them, and the
    parameters' memory (a GPU's too), only at the next cyclic garbage collection. Now
    by reference counting, after training forwards and backwards and a no_grad forward."""
    import gc
    import weakref

    model = _Net().to(DEVICE)
    standardizer = ModelWeightStandardizer(model)
    x = torch.randn(1, 3, 4, 4, device=DEVICE)
    for _ in range(2):
        model(x).sum().backward()
    with torch.no_grad():
        model(x)
    refs = [weakref.ref(o) for o in (model, model.c1, model.c1.weight, standardizer)]
    assert standardizer.model is model and model.c1._ws_model is standardizer
    enabled = gc.isenabled()
    gc.disable()
    try:
        del model, standardizer
        assert [r() is None for r in refs] == [True] * len(refs)
    finally:
        if enabled:
            gc.enable()


def test_a_copy_of_the_standardizer_alone_keeps_its_copied_model():
    """deepcopy of the standardizer alone copies its model too: the copy holds it (the
    standardizer refers to its model weakly, so the copied model was freed at once)."""
    model = _Net()
    standardizer = ModelWeightStandardizer(model)
    clone = copy.deepcopy(standardizer)
    assert isinstance(clone.model, _Net) and clone.model is not model
    assert [m._ws_model for m in clone.layers] == [clone] * 4
    x = torch.randn(1, 3, 4, 4, device=DEVICE)
    assert_bitwise(clone.model.to(DEVICE)(x), model.to(DEVICE)(x))


def test_a_standardizer_kept_after_its_model_is_freed_takes_no_layers():
    """A standardizer the caller keeps does not keep its model: once the model is freed
    it has none, and remove() still works."""
    import pickle

    model = _Net()
    standardizer = ModelWeightStandardizer(model)
    del model
    assert standardizer.model is None
    for clone in (copy.copy(standardizer), copy.deepcopy(standardizer), pickle.loads(pickle.dumps(standardizer))):
        assert clone.model is None
    standardizer.remove()
    assert standardizer.layers == []


def test_frozen_weights_give_w_hat_without_gradient(backend):
    """One node for every weight made every W_hat require grad once any weight did: a
    frozen backbone's features required grad (``.numpy()`` raised) and the backward ran
    through it. A frozen weight's W_hat needs none, as per layer; gradients as per layer."""
    torch.manual_seed(7)
    per_layer = _Net().to(DEVICE)
    for m in (per_layer.c1, per_layer.c2):
        m.requires_grad_(False)
    model = copy.deepcopy(per_layer)
    ModelWeightStandardizer(model)
    x = torch.randn(1, 3, 4, 4, device=DEVICE)
    for m in (per_layer, model):
        assert not m.c1(x).requires_grad  # (outside the model's forward: per layer)
        m(x).square().sum().backward()
    features = []
    handle = model.c2.register_forward_hook(lambda mod, args, out: features.append(out))
    model(x)
    handle.remove()
    assert not features[0].requires_grad
    a, b = _grads(per_layer), _grads(model)
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] is None) == (b[name] is None), name
        if a[name] is not None:
            assert_bitwise(b[name], a[name], name)


def test_a_forward_without_gradients_keeps_what_a_checkpoint_recomputes():
    """A no_grad forward of the model (logging, a teacher) between a forward under a
    non-reentrant checkpoint and its backward cleared the W_hat kept for the recompute:
    torch's CheckpointError. A forward without gradients keeps it."""
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = wsbcn.WSConv2d(3, 4, 3, padding=1), wsbcn.WSConv2d(4, 2, 1)

        def forward(self, x):
            return self.c2(checkpoint(lambda t: torch.relu(self.c1(t)), x, use_reentrant=False))

    torch.manual_seed(8)
    per_layer = Checkpointed()
    model = copy.deepcopy(per_layer)
    ModelWeightStandardizer(model)
    x, x2 = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    for m in (per_layer, model):
        loss = m(x).square().sum()
        with torch.no_grad():
            m(x2)
        loss.backward()
    for (name, p), q in zip(model.named_parameters(), per_layer.parameters()):
        assert_bitwise(p.grad, q.grad, name)
