"""torch.compile(fullgraph=True) of models with wsbcn layers: no graph break and
the same results as eager, on both backends (CPU: Triton is the interpreter)."""
import copy

import pytest
import torch

from torch._dynamo.testing import CompileCounterWithBackend

import wsbcn
from conftest import DEVICE, assert_graph_replays_train_like_eager, rel_err



@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: the layers' code objects compiled by earlier tests
    would count toward dynamo's recompile limit (8), which torch 2.11 reaches in this file."""
    torch._dynamo.reset()


def layer_kinds_model():
    """WSConv2d, BCN, GN and micro-batch BCN (tests/test_triton_ops.py uses it too)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        wsbcn.WSConv2d(3, 16, 3, padding=1),
        wsbcn.BatchChannelNorm2d(16, num_groups=4, activation="relu"),
        wsbcn.WSConv2d(16, 16, 3, padding=1, eps_mode="std", correction=1),
        wsbcn.GroupNorm(4, 16, activation="silu"),
        wsbcn.WSConv2d(16, 8, 1),
        wsbcn.BatchChannelNorm2d(8, num_groups=2, estimate=True),
    ).to(DEVICE)


def _train_steps(model, xs):
    outs = []
    for x in xs:
        y = model(x)
        y.square().mean().backward()
        outs.append(y.detach())
    return outs


def _check_compiled_trains_like_eager(eager, compiled_model, compiled, xs):
    """Training steps on ``xs``: the compiled model's outputs, parameter gradients and
    buffers are eager's."""
    for y_e, y_c in zip(_train_steps(eager, xs), _train_steps(compiled, xs)):
        torch.testing.assert_close(y_c, y_e, rtol=1e-5, atol=1e-5)
    for (name, p_e), p_c in zip(eager.named_parameters(), compiled_model.parameters()):
        torch.testing.assert_close(p_c.grad, p_e.grad, rtol=1e-5, atol=1e-5, msg=name)
    for (name, b_e), b_c in zip(eager.named_buffers(), compiled_model.buffers()):
        torch.testing.assert_close(b_c, b_e, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("backend, compile_backend", [
    ("torch", "aot_eager"), ("triton", "aot_eager"), ("triton", "inductor"),
    # inductor writes and compiles C++ for the closed form: ~65 s with a cold cache
    pytest.param("torch", "inductor", marks=pytest.mark.slow)])
def test_fullgraph_compile_matches_eager(monkeypatch, backend, compile_backend):
    """On the torch backend compile traces into the ops' closed form; on Triton
    here (the interpreter) the ops stay opaque and run their plans
    (tests/test_triton_ops.py checks what compile traces on a GPU's Triton path)."""
    monkeypatch.setenv("WSBCN_BACKEND", backend)
    eager = layer_kinds_model()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, backend=compile_backend)
    xs = [torch.randn(2, 3, 8, 8, device=DEVICE) * (1 + i) for i in range(2)]
    _check_compiled_trains_like_eager(eager, compiled_model, compiled, xs)
    eager.eval()
    compiled_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(xs[0]), eager(xs[0]), rtol=1e-5, atol=1e-5)


def test_ops_are_registered_with_fake_kernels():
    from torch._subclasses.fake_tensor import FakeTensorMode

    for name in ("ws_forward", "ws_backward", "norm_forward", "norm_backward"):
        assert hasattr(torch.ops.wsbcn, name)
    with FakeTensorMode():
        w = torch.empty(8, 4, 3, 3)
        w_hat, stats = torch.ops.wsbcn.ws_forward(w, 1e-5, 0, False)
        assert w_hat.shape == w.shape and stats.shape == (3, 8)
        x = torch.empty(2, 8, 5, 5)
        y, st, r, rho = torch.ops.wsbcn.norm_forward(x, None, None, None, None, None, None, None, 4, 1e-5, 0.1,
                                                      False, 0, False, None, False)
        assert y.shape == x.shape and st.shape == (6, 2, 8) and rho.shape == (2, 4)


@pytest.mark.gpu
def test_training_step_captured_in_cuda_graph():
    """A whole training step (micro-batch case included) replays from a CUDA graph
    with the same result as eager: nothing on the hot path syncs the host."""
    eager = layer_kinds_model()
    graphed = copy.deepcopy(eager)
    assert_graph_replays_train_like_eager(eager, graphed, (1, 3, 8, 8))


@pytest.mark.parametrize("dims", [1, 3])
def test_fullgraph_compile_of_1d_and_3d_layers_matches_eager(backend, dims):
    """The other layer kinds (WSConv1d/3d, BatchChannelNorm1d/3d) compile without a
    graph break and train like eager, micro-batch (estimate) BCN included."""
    conv = {1: wsbcn.WSConv1d, 3: wsbcn.WSConv3d}[dims]
    norm = {1: wsbcn.BatchChannelNorm1d, 3: wsbcn.BatchChannelNorm3d}[dims]
    torch.manual_seed(0)
    eager = torch.nn.Sequential(conv(3, 8, 3, padding=1), norm(8, num_groups=2, activation="relu"),
                                conv(8, 8, 1, eps_mode="std", correction=1), norm(8, num_groups=4, estimate=True),
                                wsbcn.GroupNorm(2, 8)).to(DEVICE)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    shape = (2, 3) + (5,) * dims
    xs = [torch.randn(shape, device=DEVICE) * (1 + i) for i in range(2)]
    _check_compiled_trains_like_eager(eager, compiled_model, compiled, xs)


@pytest.mark.parametrize("backend", ["triton", pytest.param("torch", marks=pytest.mark.slow)])
def test_compile_with_dynamic_true_runs_every_layer_kind(monkeypatch, backend):
    """The quick check of the slow test below: one forward and backward of each layer kind
    at symbolic sizes, eps and channels (every layer raised dynamo's Unsupported)."""
    monkeypatch.setenv("WSBCN_BACKEND", backend)
    torch.manual_seed(0)
    eager = torch.nn.Sequential(wsbcn.BatchChannelNorm2d(4, num_groups=2), wsbcn.GroupNorm(2, 4),
                                wsbcn.WSConv2d(4, 4, 1)).to(DEVICE)
    compiled_model = copy.deepcopy(eager)
    x = torch.randn(2, 4, 3, 5, device=DEVICE)
    y = torch.compile(compiled_model, fullgraph=True, dynamic=True, backend="aot_eager")(x)
    y_eager = eager(x)
    torch.testing.assert_close(y, y_eager, rtol=1e-5, atol=1e-5)
    y.square().sum().backward()
    y_eager.square().sum().backward()
    for (name, p_e), p_c in zip(eager.named_parameters(), compiled_model.parameters()):
        torch.testing.assert_close(p_c.grad, p_e.grad, rtol=1e-5, atol=1e-5, msg=name)


def test_compile_with_dynamic_true_standardizes_a_weight_of_symbolic_sizes(backend):
    """A weight given as an input (the functional API, a WSConv2d under
    torch.func.functional_call: a hypernetwork, meta-learning) has symbolic sizes and
    strides under dynamic=True; its layout check sorted the strides, which dynamo cannot.
    Output and weight gradient against float64, in one graph."""
    from reference import ws_reference
    import torch.nn.functional as F

    torch.manual_seed(0)
    conv = wsbcn.WSConv2d(3, 8, 3, padding=1, bias=False).to(DEVICE)
    x = torch.randn(2, 3, 5, 5, device=DEVICE)
    for weight in (torch.randn(8, 3, 3, 3, device=DEVICE),
                   torch.randn(8, 3, 3, 3, device=DEVICE).to(memory_format=torch.channels_last)):
        for fn in (lambda w: F.conv2d(x, wsbcn.functional.weight_standardize(w), padding=1),
                   lambda w: torch.func.functional_call(conv, {"weight": w}, (x,))):
            torch._dynamo.reset()
            w = weight.clone().requires_grad_(True)
            y = torch.compile(fn, fullgraph=True, dynamic=True, backend="aot_eager")(w)  # (fullgraph: no break)
            w64 = weight.double().cpu().requires_grad_(True)
            y_ref = F.conv2d(x.double().cpu(), ws_reference(w64), padding=1)
            assert rel_err(y, y_ref) <= 1e-5
            v = torch.randn(y.shape, dtype=torch.float64)
            y.backward(v.to(y))
            y_ref.backward(v)
            assert rel_err(w.grad, w64.grad) <= 1e-5


def test_a_compiled_layer_that_raised_computes_the_next_call_eagerly_and_right(backend):
    """A compiled BatchChannelNorm given one value per channel raises (as nn.BatchNorm2d);
    dynamo then runs its forward eagerly and starts a frame at each function it calls.
    Those run eagerly too: traced alone, a call validated by an eager layer of the same
    signature had its plan and launches traced (the interpreter crashed). The next call
    against float64, its running buffers too."""
    from reference import bcn_reference

    torch.manual_seed(0)
    layer, eager = wsbcn.BatchChannelNorm2d(8, num_groups=2), wsbcn.BatchChannelNorm2d(8, num_groups=2)
    compiled = torch.compile(layer, backend="aot_eager")
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        compiled(torch.randn(1, 8, 1, 1))
    x = torch.randn(3, 8, 1, 1) * 2 + 1
    eager(x)  # the same signature, validated eagerly
    mean, var = layer.running_mean.double().clone(), layer.running_var.double().clone()
    y = compiled(x)
    expected = bcn_reference(x.double(), 2, layer.weight.double(), layer.bias.double(), layer.group_weight.double(),
                             layer.group_bias.double(), running_mean=mean, running_var=var, training=True)
    assert rel_err(y, expected) <= 1e-5
    assert rel_err(layer.running_mean, mean) <= 1e-6 and rel_err(layer.running_var, var) <= 1e-6


@pytest.mark.slow  # 10-20 s on the 2-core machine: test_compile_with_dynamic_true_runs_every_layer_kind is quick
@pytest.mark.parametrize("backend", ["triton"])
def test_compile_with_dynamic_true_trains_like_eager(monkeypatch, backend):
    """``torch.compile(dynamic=True)``, as detection and multi-scale training use it: sizes
    are symbolic from the first call, and so are float attributes (eps, momentum) and a
    norm layer's channels when it takes the input itself. One compile serves new batch
    and spatial sizes; eps changed between calls is used (dynamo guards on it)."""
    monkeypatch.setenv("WSBCN_BACKEND", backend)
    torch.manual_seed(0)
    eager = torch.nn.Sequential(  # the first norm takes the input: its channels are symbolic too
        wsbcn.BatchChannelNorm2d(4, num_groups=2, momentum=None), wsbcn.GroupNorm(2, 4, activation="relu"),
        wsbcn.WSConv2d(4, 4, 3, padding=1), wsbcn.BatchChannelNorm2d(4, num_groups=2, estimate=True)).to(DEVICE)
    compiled_model = copy.deepcopy(eager)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(compiled_model, fullgraph=True, dynamic=True, backend=counter)
    for i, shape in enumerate([(2, 4, 8, 6), (3, 4, 6, 10), (1, 4, 9, 7)]):
        if i == 1:
            compiles = counter.frame_count
        if i == 2:
            assert counter.frame_count == compiles  # the second size ran the first compile
            for m in (eager, compiled_model):
                m[0].eps = m[1].eps = m[2].eps = 1e-2
        x = torch.randn(shape, device=DEVICE) * (1 + i)
        y_e, y_c = eager(x), compiled(x)
        torch.testing.assert_close(y_c, y_e, rtol=1e-5, atol=1e-5)
        y_e.square().mean().backward()
        y_c.square().mean().backward()
    for (name, p_e), p_c in zip(eager.named_parameters(), compiled_model.parameters()):
        torch.testing.assert_close(p_c.grad, p_e.grad, rtol=1e-5, atol=1e-5, msg=name)
    for (name, b_e), b_c in zip(eager.named_buffers(), compiled_model.buffers()):
        torch.testing.assert_close(b_c, b_e, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("model_wide", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["per layer", "model-wide"])
def test_eager_calls_between_compiled_calls_recompile_nothing(monkeypatch, model_wide):
    """Eager calls of new signatures (another model, other input sizes: an eval loop run
    eagerly) between calls of a compiled model leave its graphs' guards passing. torch
    2.11 guarded the length of the module-level dicts of validated calls that the traced
    checks were handed, so each such call recompiled (checks.CallCache)."""
    monkeypatch.setenv("WSBCN_BACKEND", "triton")
    model = torch.nn.Sequential(wsbcn.WSConv2d(3, 4, 3), wsbcn.BatchChannelNorm2d(4, 2),
                                wsbcn.GroupNorm(2, 4)).to(DEVICE)
    eager = copy.deepcopy(model)
    if model_wide:
        wsbcn.ModelWeightStandardizer(model)
        wsbcn.ModelWeightStandardizer(eager)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    x = torch.randn(2, 3, 8, 8, device=DEVICE)
    eager(x).sum().backward()  # validated calls there when compile traces
    compiled(x).sum().backward()
    compiles = counter.frame_count
    for size in (5, 6):  # new signatures of every layer kind, eagerly
        eager(torch.randn(1, 3, size, size + 1, device=DEVICE)).sum().backward()
        compiled(x).sum().backward()
    assert counter.frame_count == compiles


@pytest.mark.parametrize("backend, spatial", [("torch", (1, 1)), ("torch", (2, 2)), ("triton", (2, 2)),
                                              pytest.param("torch", (1, 4), marks=pytest.mark.slow)])
def test_compiled_estimate_mode_gradients_at_small_feature_maps(monkeypatch, backend, spatial):
    """Micro-batch BCN (estimate=True) compiled with the min-cut partitioner (aot_eager's
    and inductor's) on small feature maps (a ResNet's last stage at a small image size):
    the gradients are the float64 reference's. Traced into on the torch backend, the
    partitioner recomputed the closed form's reads of the running estimates in the
    backward, after their update (3-19 % off); estimate mode's forward op now stays opaque
    there (ops/library.py)."""
    from reference import bcn_reference

    monkeypatch.setenv("WSBCN_BACKEND", backend)
    torch.manual_seed(0)
    m = wsbcn.BatchChannelNorm2d(16, 4, estimate=True).to(DEVICE)
    ref = copy.deepcopy(m).double()
    x = (torch.randn(2, 16, *spatial, device=DEVICE) * 2 + 1).requires_grad_(True)
    w = torch.randn(x.shape, device=DEVICE)
    (torch.compile(m, fullgraph=True, backend="aot_eager")(x) * w).sum().backward()
    x64 = x.detach().double().requires_grad_(True)
    y64 = bcn_reference(x64, 4, ref.weight, ref.bias, ref.group_weight, ref.group_bias, ref.running_mean,
                        ref.running_var, training=True, estimate=True, momentum=0.1, eps=1e-5)
    (y64 * w.double()).sum().backward()
    assert rel_err(x.grad, x64.grad) <= 1e-5
    for name, p in m.named_parameters():
        assert rel_err(p.grad, getattr(ref, name).grad) <= 1e-5, name
    assert rel_err(m.running_var, ref.running_var) <= 1e-6


@pytest.mark.parametrize("ws", ["layer", "model"])
def test_compiled_autograd_of_an_eager_forward_gives_the_eager_gradients(backend, ws):
    """torch._dynamo's compiled autograd traces the backward of an eager forward: on the
    Triton path it traced into the eager launch plan and failed; the backward now takes
    the ops there, with the eager gradients. Model-wide WS's one node runs its backward
    eagerly there (a graph break; traced, it failed inside the interpreter)."""
    from torch._dynamo import compiled_autograd

    torch.manual_seed(8)
    model = torch.nn.Sequential(
        wsbcn.WSConv2d(3, 8, 3, padding=1), wsbcn.BatchChannelNorm2d(8, num_groups=2, activation="relu"),
        wsbcn.WSConv2d(8, 8, 1), wsbcn.BatchChannelNorm2d(8, num_groups=4, estimate=True),
        wsbcn.WSConv2d(8, 8, 1), wsbcn.GroupNorm(2, 8, activation="silu")).to(DEVICE)
    eager = copy.deepcopy(model)
    if ws == "model":
        wsbcn.ModelWeightStandardizer(model)
    x = torch.randn(2, 3, 5, 5, device=DEVICE)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    eager(xs[0]).square().sum().backward()
    torch._dynamo.reset()
    with compiled_autograd._enable(torch.compile(backend="aot_eager")):
        model(xs[1]).square().sum().backward()
    assert rel_err(xs[1].grad, xs[0].grad) <= 1e-6
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        assert rel_err(p.grad, q.grad) <= 1e-6, name
