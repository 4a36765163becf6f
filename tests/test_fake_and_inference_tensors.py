"""Tensors without memory to launch on, and tensors autograd may not keep: the layers under
FakeTensorMode (shape propagation), and inference tensors (torch.inference_mode) used
outside inference mode, against what torch's own layers do."""
import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

import wsbcn


def _model():
    return nn.Sequential(
        wsbcn.WSConv2d(8, 8, 3, padding=1), wsbcn.BatchChannelNorm2d(8, num_groups=4),
        wsbcn.WSConv2d(8, 8, 3, padding=1), wsbcn.BatchChannelNorm2d(8, num_groups=4, estimate=True),
        wsbcn.WSConv2d(8, 8, 1), wsbcn.GroupNorm(4, 8, activation="relu"))


@pytest.mark.parametrize("model_wide", [False, True])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_fake_tensor_mode_propagates_shapes(backend, model_wide, layout):
    """A model made and run under FakeTensorMode (fake initialization, FLOP and memory
    estimators) gives fake outputs and gradients laid out as a real run's; no kernel is
    launched on fake memory (the Triton path once did: a null address)."""
    def run():
        m = _model()
        if model_wide:
            wsbcn.ModelWeightStandardizer(m)
        x = torch.randn(2, 8, 6, 6).contiguous(memory_format=layout).requires_grad_()
        y = m(x)
        y.sum().backward()
        return m, x, y

    real_m, real_x, real_y = run()
    with FakeTensorMode():
        m, x, y = run()
    assert type(y).__name__ == "FakeTensor" and y.shape == real_y.shape and y.stride() == real_y.stride()
    assert x.grad.shape == real_x.grad.shape and x.grad.stride() == real_x.grad.stride()
    for (name, p), real_p in zip(m.named_parameters(), real_m.parameters()):
        assert p.grad is not None and p.grad.shape == real_p.grad.shape and p.grad.dtype == real_p.grad.dtype, name


def test_real_layers_under_fake_tensor_mode(backend):
    """Real layers and a fake input (FakeTensorMode(allow_non_fake_inputs=True)): every
    tensor the mode allocates is fake, so the call propagates shapes; the real running
    buffers end as nn.BatchNorm2d's do under the same mode."""
    torch.manual_seed(0)
    m = nn.Sequential(wsbcn.WSConv2d(8, 8, 3, padding=1), wsbcn.BatchChannelNorm2d(8, num_groups=4))
    bn = nn.BatchNorm2d(8)
    before = m[1].running_mean.clone(), m[1].num_batches_tracked.clone()
    bn_before = bn.running_mean.clone(), bn.num_batches_tracked.clone()
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.randn(2, 8, 6, 6)
        y = m(x)
        w_hat = wsbcn.functional.weight_standardize(m[0].weight)
        bn(x)
    assert type(y).__name__ == "FakeTensor" and y.shape == (2, 8, 6, 6)
    assert type(w_hat).__name__ == "FakeTensor" and w_hat.shape == m[0].weight.shape
    assert torch.equal(m[1].running_mean, before[0]) == torch.equal(bn.running_mean, bn_before[0])
    assert torch.equal(m[1].num_batches_tracked, before[1]) == torch.equal(bn.num_batches_tracked, bn_before[1])
    y_real = m(torch.randn(2, 8, 6, 6))  # the same signature on real tensors still computes
    assert type(y_real) is torch.Tensor and torch.isfinite(y_real).all()


@pytest.mark.parametrize("make", [lambda: wsbcn.GroupNorm(4, 8), lambda: wsbcn.BatchChannelNorm2d(8, num_groups=4),
                                  lambda: nn.GroupNorm(4, 8)], ids=["wsbcn_gn", "bcn", "torch_gn"])
def test_fake_parameters_with_a_real_input_outside_the_mode(backend, make):
    """A layer made under FakeTensorMode, called outside it on a real tensor: torch's own
    error, as nn.GroupNorm gives (a fake tensor's memory is never handed to a kernel), and
    a real layer of the same signature still computes."""
    with FakeTensorMode():
        fake_layer = make()
    x = torch.randn(2, 8, 4, 4)
    real_layer = make()
    real_layer(x)  # the signature with real parameters first
    with pytest.raises(Exception, match="FakeTensor"):
        fake_layer(x)
    y = real_layer(x)
    assert type(y) is torch.Tensor and torch.isfinite(y).all()


LAYERS = {"bcn": lambda: wsbcn.BatchChannelNorm2d(8, num_groups=4),
          "bcn_estimate_no_affine": lambda: wsbcn.BatchChannelNorm2d(8, num_groups=4, estimate=True, affine=False),
          "gn": lambda: wsbcn.GroupNorm(4, 8), "wsconv": lambda: wsbcn.WSConv2d(8, 8, 3, padding=1)}


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("training", [True, False])
def test_fake_tensors_used_outside_their_mode(backend, layer, training):
    """Fake tensors keep propagating shapes after their FakeTensorMode exits, as torch's
    layers' do: a layer and input made under the mode and called outside it (the closed
    form's own tensors are made in the input's mode), a forward under the mode whose
    backward runs outside it (its saved statistics are fake: no kernel reads them), and a
    real forward whose backward gets a fake gradient."""
    with FakeTensorMode():
        m = LAYERS[layer]().train(training)
        x = torch.randn(2, 8, 6, 6, requires_grad=True)
    y = m(x)
    y.sum().backward()
    assert type(y).__name__ == "FakeTensor" and y.shape == (2, 8, 6, 6)
    assert type(x.grad).__name__ == "FakeTensor" and x.grad.shape == x.shape
    real = LAYERS[layer]().train(training)
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    with FakeTensorMode(allow_non_fake_inputs=True):
        y = real(x)
    y.sum().backward()
    assert type(x.grad).__name__ == "FakeTensor" and x.grad.shape == x.shape
    for name, p in real.named_parameters():
        assert type(p.grad).__name__ == "FakeTensor" and p.grad.shape == p.shape, name
    real = LAYERS[layer]().train(training)  # a real forward, a fake gradient into its backward
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    with FakeTensorMode(allow_non_fake_inputs=True):
        w = torch.randn(2, 8, 6, 6)
    (real(x) * w).sum().backward()
    assert type(x.grad).__name__ == "FakeTensor" and x.grad.shape == x.shape


@pytest.mark.parametrize("estimate", [False, True])
def test_inference_input_to_a_training_layer_changes_no_buffer(backend, estimate):
    """An inference tensor given to a training BatchChannelNorm whose parameters require
    grad raises torch's error (autograd cannot save it) before the running buffers are
    updated, as nn.BatchNorm2d's running statistics stay (its forward saves before it
    computes). Each such call is checked (the call is not recalled), so a first call
    with a normal tensor, remembered, does not let it through."""
    with torch.inference_mode():
        x_inf = torch.randn(2, 8, 4, 4) + 3
    m = wsbcn.BatchChannelNorm2d(8, num_groups=2, estimate=estimate)
    m(torch.randn(2, 8, 4, 4))  # the signature with a normal tensor, remembered at this module
    state = {k: v.clone() for k, v in m.state_dict().items()}
    for _ in range(2):
        with pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward"):
            m(x_inf)
        for k, v in m.state_dict().items():
            assert torch.equal(v, state[k]), k
    with torch.inference_mode():  # inside inference mode nothing is saved: it runs, as nn.BatchNorm2d
        m(x_inf)
    assert m.num_batches_tracked.item() == state["num_batches_tracked"].item() + 1
    with torch.no_grad():  # nothing recorded: it runs too
        m(x_inf)


def test_running_buffers_made_in_inference_mode(backend):
    """A BatchChannelNorm made under inference_mode (no affine) and trained outside it:
    its running buffers are inference tensors, which torch refuses to update in place
    there; the call raises that before anything is written (the Triton path wrote them
    through their addresses, the torch backend half of them)."""
    with torch.inference_mode():
        m = wsbcn.BatchChannelNorm2d(8, num_groups=2, affine=False)
    x = torch.randn(2, 8, 4, 4) + 3
    with pytest.raises(RuntimeError, match="Inplace update to inference tensor outside InferenceMode"):
        m(x)
    assert torch.equal(m.running_mean, torch.zeros(8)) and torch.equal(m.running_var, torch.ones(8))
    assert m.num_batches_tracked.item() == 0
    m.eval()  # eval updates nothing: it runs
    assert torch.isfinite(m(x)).all()
    with torch.inference_mode():  # in inference mode the update is allowed, as for nn.BatchNorm2d
        m.train()
        m(x)
    assert m.num_batches_tracked.item() == 1 and not torch.equal(m.running_mean, torch.zeros(8))


def _negated_view(t):
    """A view of -t through torch's negative bit (the imaginary part of a conjugate):
    its memory holds t, its value is -t."""
    view = torch.complex(torch.zeros_like(t), t).conj().imag
    assert view.is_neg() and torch.equal(view, -t)
    return view


def test_negated_views_are_read_as_their_values(backend):
    """A lazily negated view (Tensor.is_neg()) as input or weight is read as its value,
    as torch's layers read it: output, running buffers and gradients as the float64
    reference of the value, also at a site whose plain-tensor call was remembered (the
    kernels read memory, which holds the negation)."""
    from reference import bcn_reference, gn_reference, ws_reference

    torch.manual_seed(6)
    bcn, gn = wsbcn.BatchChannelNorm2d(8, num_groups=2), wsbcn.GroupNorm(2, 8)
    bcn(torch.randn(2, 8, 4, 4))  # remembered with a plain tensor
    gn(torch.randn(2, 8, 4, 4))
    ref_mean, ref_var = bcn.running_mean.double().clone(), bcn.running_var.double().clone()
    base = (torch.randn(2, 8, 4, 4) + 2).requires_grad_(True)
    x = _negated_view(base)
    y = bcn(x)
    x64 = -base.detach().double()
    expected = bcn_reference(x64, 2, bcn.weight.double(), bcn.bias.double(), bcn.group_weight.double(),
                             bcn.group_bias.double(), ref_mean, ref_var, training=True)
    assert (y.double() - expected).abs().max() <= 1e-5
    assert (bcn.running_mean.double() - ref_mean).abs().max() <= 1e-6
    assert (bcn.running_var.double() - ref_var).abs().max() <= 1e-5
    assert (gn(x).double() - gn_reference(x64, 2, gn.weight.double(), gn.bias.double())).abs().max() <= 1e-5
    dy = torch.randn_like(y)
    y.backward(dy)
    x64.requires_grad_(True)
    bcn_reference(x64, 2, bcn.weight.double(), bcn.bias.double(), bcn.group_weight.double(),
                  bcn.group_bias.double(), training=True).backward(dy.double())
    assert (base.grad.double() + x64.grad).abs().max() <= 1e-5  # d(-base): the negated gradient
    w = torch.randn(4, 3, 3, 3)
    wsbcn.functional.weight_standardize(w)  # remembered at w
    w_neg = _negated_view(w)
    assert (wsbcn.functional.weight_standardize(w_neg).double() - ws_reference(-w.double())).abs().max() <= 1e-5
    conv = wsbcn.WSConv2d(3, 4, 3)
    conv.standardized_weight()  # remembered at the weight, its Parameter object kept below
    conv.weight.data = _negated_view(conv.weight.detach().clone())
    assert conv.weight.is_neg()
    assert (conv.standardized_weight().double() - ws_reference(conv.weight.double())).abs().max() <= 1e-5


def test_a_negated_running_buffer_is_refused_in_training_and_read_in_eval(backend):
    """A running buffer that is a negated view cannot be updated in place by the kernels:
    in training refused with a ValueError naming it, nothing written; in eval, which only
    reads it, normalized with its value (float64 reference)."""
    from reference import bcn_reference

    x = torch.randn(2, 8, 4, 4)
    running_mean, running_var = _negated_view(torch.randn(8)), torch.rand(8) + 0.5
    before = running_mean.clone()
    with pytest.raises(ValueError, match="running_mean is a negated view"):
        wsbcn.functional.batch_channel_norm(x, 2, running_mean, running_var, training=True)
    assert torch.equal(running_mean, before)
    y = wsbcn.functional.batch_channel_norm(x, 2, running_mean, running_var, training=False)
    expected = bcn_reference(x.double(), 2, running_mean=running_mean.double(), running_var=running_var.double(),
                             training=False)
    assert (y.double() - expected).abs().max() <= 1e-5
