"""WSConv layers always standardize the weight they hold now, and wsbcn.freeze bakes
in that weight; freeze copies by default and converts in place on request. Every
output is checked against the float64 composition of tests/reference.py."""
import pytest
import torch
from torch import nn

import wsbcn
from conftest import DEVICE, TOL, rel_err
from reference import conv_nd, ws_reference


def _ws_conv_reference(conv, x64):
    """The layer written out in float64: standardize its weight, then convolve."""
    w_hat = ws_reference(conv.weight.detach().double(), conv.eps, conv.correction, conv.eps_mode)
    bias = None if conv.bias is None else conv.bias.detach().double()
    return conv_nd(x64, w_hat, bias, conv)


def _model():
    """Two WSConv2d (one nested, two conventions) around a ReLU."""
    return nn.Sequential(
        wsbcn.WSConv2d(3, 8, 3, padding=1, eps_mode="std", correction=1),
        nn.ReLU(),
        nn.Sequential(wsbcn.WSConv2d(8, 4, 1, bias=False)),
    ).to(DEVICE)


def _model_reference(convs, x):
    """_model() in float64, from the given conv layers (the originals, or frozen
    nn.Conv2d holding W_hat, whose weight is then used as it is)."""
    first, second = convs
    h = x.double()
    for i, conv in enumerate((first, second)):
        if isinstance(conv, wsbcn.WSConv2d):
            h = _ws_conv_reference(conv, h)
        else:
            bias = None if conv.bias is None else conv.bias.detach().double()
            h = conv_nd(h, conv.weight.detach().double(), bias, conv)
        if i == 0:
            h = torch.relu(h)
    return h


def _new_weight(w):
    # far from the old weight: another mean and spread per filter
    return torch.randn_like(w) * 3 + torch.linspace(-2, 2, w.shape[0], device=w.device).view(-1, 1, 1, 1)


WRITES = {  # how user code changes a weight; only the last bumps weight._version
    "data.copy_": lambda w, new: w.data.copy_(new),
    "data assigned": lambda w, new: setattr(w, "data", new.clone()),
    "data.mul_": lambda w, new: w.data.mul_(-2.0),
    "no_grad copy_": lambda w, new: w.copy_(new),
}


@pytest.mark.parametrize("write", list(WRITES))
@pytest.mark.parametrize("training", [False, True])
def test_wsconv_computes_with_the_weight_it_holds_now(backend, write, training):
    torch.manual_seed(0)
    conv = wsbcn.WSConv2d(4, 8, 3, padding=1).to(DEVICE).train(training)
    x = torch.randn(2, 4, 6, 6, device=DEVICE)
    with torch.no_grad():  # the calls a cached W_hat would have been reused across
        before = conv(x)
        WRITES[write](conv.weight, _new_weight(conv.weight))
        after = conv(x)
    expected = _ws_conv_reference(conv, x.double())
    assert rel_err(after, expected) <= TOL[torch.float32]
    assert rel_err(before, expected) > 0.1  # the write did change the layer's output
    w_hat = conv.standardized_weight()
    assert rel_err(w_hat, ws_reference(conv.weight.detach().double())) <= TOL[torch.float32]


def test_wsconv_after_data_write_trains_on_the_new_weight(backend):
    torch.manual_seed(1)
    conv = wsbcn.WSConv2d(4, 8, 3).to(DEVICE)
    x = torch.randn(2, 4, 5, 5, device=DEVICE)
    with torch.no_grad():
        conv(x)
    conv.weight.data.copy_(_new_weight(conv.weight))
    w64 = conv.weight.detach().double().requires_grad_(True)
    ref = conv_nd(x.double(), ws_reference(w64), conv.bias.detach().double(), conv)
    y = conv(x)
    assert rel_err(y, ref) <= TOL[torch.float32]
    g = torch.randn_like(ref)
    y.backward(g.float())
    ref.backward(g)
    assert rel_err(conv.weight.grad, w64.grad) <= TOL[torch.float32]


def test_freeze_bakes_in_the_weight_written_through_data(backend):
    torch.manual_seed(2)
    model = _model().eval()
    x = torch.randn(2, 3, 6, 6, device=DEVICE)
    with torch.no_grad():
        model(x)  # standardize once with the old weights
        for conv in (model[0], model[2][0]):
            conv.weight.data.copy_(_new_weight(conv.weight))
    expected = _model_reference((model[0], model[2][0]), x)
    frozen = wsbcn.freeze(model)
    assert rel_err(frozen[0].weight, ws_reference(model[0].weight.detach().double(), 1e-5, 1, "std")) \
        <= TOL[torch.float32]
    with torch.no_grad():
        assert rel_err(frozen(x), expected) <= TOL[torch.float32]


def test_freeze_returns_a_converted_copy_and_leaves_the_model_alone(backend):
    torch.manual_seed(3)
    model = _model().eval()
    params = {name: (p, p.detach().clone()) for name, p in model.named_parameters()}
    x = torch.randn(2, 3, 6, 6, device=DEVICE)
    frozen = wsbcn.freeze(model)
    assert frozen is not model
    kinds = [type(m) for m in frozen.modules()]
    assert wsbcn.WSConv2d not in kinds and kinds.count(nn.Conv2d) == 2
    # the original: still WSConv layers, the same Parameter objects, the same values
    assert type(model[0]) is wsbcn.WSConv2d and type(model[2][0]) is wsbcn.WSConv2d
    for name, p in model.named_parameters():
        assert p is params[name][0] and torch.equal(p, params[name][1]), name
    assert all(p is not q for p in frozen.parameters() for q in model.parameters())
    expected = _model_reference((model[0], model[2][0]), x)
    with torch.no_grad():
        assert rel_err(frozen(x), expected) <= TOL[torch.float32]
        assert rel_err(model(x), expected) <= TOL[torch.float32]
    # the frozen copy in float64 is the original's composition in float64
    assert rel_err(_model_reference((frozen[0], frozen[2][0]), x), expected) <= TOL[torch.float32]


def test_freeze_inplace_converts_the_model_itself(backend):
    torch.manual_seed(4)
    model = _model().eval()
    x = torch.randn(2, 3, 6, 6, device=DEVICE)
    expected = _model_reference((model[0], model[2][0]), x)
    frozen = wsbcn.freeze(model, inplace=True)
    assert frozen is model
    kinds = [type(m) for m in model.modules()]
    assert wsbcn.WSConv2d not in kinds and kinds.count(nn.Conv2d) == 2
    with torch.no_grad():
        assert rel_err(model(x), expected) <= TOL[torch.float32]


@pytest.mark.parametrize("inplace", [False, True])
def test_freeze_a_single_wsconv(backend, inplace):
    torch.manual_seed(5)
    conv = wsbcn.WSConv1d(2, 3, 3).to(DEVICE)
    weight = conv.weight.detach().clone()
    plain = wsbcn.freeze(conv, inplace=inplace)
    assert type(plain) is nn.Conv1d and type(conv) is wsbcn.WSConv1d  # a module cannot change its own class
    assert torch.equal(conv.weight, weight)
    x = torch.randn(2, 2, 7, device=DEVICE)
    with torch.no_grad():
        assert rel_err(plain(x), _ws_conv_reference(conv, x.double())) <= TOL[torch.float32]


def test_freeze_rejects_bad_inplace_and_changes_nothing():
    model = _model()
    with pytest.raises(TypeError, match="inplace"):
        wsbcn.freeze(model, inplace="yes")
    assert type(model[0]) is wsbcn.WSConv2d and type(model[2][0]) is wsbcn.WSConv2d


@pytest.mark.parametrize("layer,attribute,value", [(1, "activation", "gelu"), (1, "num_groups", 3),
                                                   (1, "eps", -1.0), (3, "activation", "tanh"), (2, "eps", 0.0)])
@pytest.mark.parametrize("inplace", [False, True])
def test_freeze_checks_what_the_layers_check_before_changing_anything(layer, attribute, value, inplace):
    """A layer argument made invalid after construction (which the layer's forward
    refuses) is refused by freeze too, naming the layer, before any layer is swapped:
    it was frozen without its activation, or failed in the frozen forward."""
    model = nn.Sequential(wsbcn.WSConv2d(3, 8, 3), wsbcn.BatchChannelNorm2d(8, num_groups=2),
                          wsbcn.WSConv2d(8, 8, 3), wsbcn.GroupNorm(2, 8))
    setattr(model[layer], attribute, value)
    types = [type(m) for m in model]
    with pytest.raises(ValueError, match=f"layer '{layer}'"):
        wsbcn.freeze(model, inplace=inplace)
    assert [type(m) for m in model] == types


def test_wsconv_center_only_matches_float64_reference(backend):
    """WSConv2d(standardize="center"): the conv of W - mean, forward and backward."""
    torch.manual_seed(7)
    conv = wsbcn.WSConv2d(3, 4, 3, padding=1, standardize="center").to(DEVICE)
    assert "standardize='center'" in repr(conv)
    x = torch.randn(2, 3, 5, 5, device=DEVICE, requires_grad=True)
    x64 = x.detach().double().requires_grad_(True)
    w64 = conv.weight.detach().double().requires_grad_(True)
    rows = w64.reshape(4, -1)
    w_hat = (rows - rows.mean(dim=1, keepdim=True)).reshape(w64.shape)
    ref = conv_nd(x64, w_hat, conv.bias.detach().double(), conv)
    out = conv(x)
    assert rel_err(out, ref) <= TOL[torch.float32]
    g = torch.randn_like(ref)
    out.backward(g.float())
    ref.backward(g)
    assert rel_err(conv.weight.grad, w64.grad) <= TOL[torch.float32]
    assert rel_err(x.grad, x64.grad) <= TOL[torch.float32]
    frozen = wsbcn.freeze(conv)  # freeze bakes in W - mean
    assert rel_err(frozen(x.detach()), ref) <= TOL[torch.float32]


def test_freeze_detaches_a_model_wide_standardizer():
    """A frozen model has no WSConv left: its model-wide standardizer's hooks go with
    them (they would launch for layers no longer in the model), and the output is the
    same as before freezing."""
    torch.manual_seed(0)
    model = nn.Sequential(wsbcn.WSConv2d(3, 4, 3), wsbcn.GroupNorm(2, 4), wsbcn.WSConv2d(4, 4, 3)).double()
    wsbcn.ModelWeightStandardizer(model)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    frozen = wsbcn.freeze(model)
    assert len(model._forward_pre_hooks) == 1  # the original keeps its standardizer
    assert len(frozen._forward_pre_hooks) == 0 and len(frozen._forward_hooks) == 0
    assert torch.allclose(frozen(x), model(x), rtol=1e-12, atol=1e-12)
