"""wsbcn.freeze gives the norm layers their inference form in torch ops only
(wsbcn/modules/frozen.py): BatchChannelNorm -> FrozenBatchChannelNormNd (evaluation:
running estimates, fixed), wsbcn.GroupNorm -> nn.GroupNorm / GroupNormAct. Outputs
against the float64 reference of the layer in eval mode; the same state dict; a frozen
model exports (torch.export) with aten ops only and scripts (TorchScript), which is
what ONNX and TensorRT need."""
import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import wsbcn
from conftest import DEVICE, TOL, rel_err
from reference import bcn_reference, gn_reference
from wsbcn.modules.frozen import (FrozenBatchChannelNorm1d, FrozenBatchChannelNorm2d, FrozenBatchChannelNorm3d,
                                  GroupNormAct)

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.:DeprecationWarning")  # torch's own, on every call

BCN = {1: (wsbcn.BatchChannelNorm1d, FrozenBatchChannelNorm1d, (2, 8, 5)),
       2: (wsbcn.BatchChannelNorm2d, FrozenBatchChannelNorm2d, (2, 8, 3, 4)),
       3: (wsbcn.BatchChannelNorm3d, FrozenBatchChannelNorm3d, (2, 8, 2, 3, 2))}


def _trained(layer, shape, steps=3):
    """``layer`` after a few training steps (running estimates away from 0 and 1) and
    with random affine parameters, in eval mode."""
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    for _ in range(steps):
        layer(torch.randn(shape, device=DEVICE) * 2 + 0.5)
    return layer.eval()


# the frozen forms are torch ops: the Triton interpreter only runs the layer they come from
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.slow)], indirect=True)
@pytest.mark.parametrize("dims", [1, 2, pytest.param(3, marks=pytest.mark.slow)])
@pytest.mark.parametrize("estimate,affine,group_affine,activation", [
    (False, True, True, None), (True, True, False, "relu"), (False, False, True, "silu"), (True, True, True, "silu")])
def test_frozen_bcn_computes_the_layer_in_eval_mode(backend, dims, estimate, affine, group_affine, activation):
    torch.manual_seed(dims)
    layer_type, frozen_type, shape = BCN[dims]
    layer = _trained(layer_type(8, num_groups=4, estimate=estimate, affine=affine, group_affine=group_affine,
                                activation=activation, momentum=None if estimate else 0.1).to(DEVICE), shape)
    frozen = wsbcn.freeze(layer)
    assert type(frozen) is frozen_type and type(layer) is layer_type
    state = layer.state_dict()
    assert list(frozen.state_dict()) == list(state)
    for k, v in frozen.state_dict().items():
        assert torch.equal(v, state[k]) and v.data_ptr() != state[k].data_ptr(), k  # copies
    x = torch.randn(shape, device=DEVICE)
    p = {k: (v.double() if v is not None else None) for k, v in
         (("w", layer.weight), ("b", layer.bias), ("gw", layer.group_weight), ("gb", layer.group_bias))}
    ref = bcn_reference(x, 4, p["w"], p["b"], p["gw"], p["gb"], layer.running_mean.double(),
                        layer.running_var.double(), training=False, activation=activation)
    with torch.no_grad():
        assert rel_err(frozen(x), ref) <= TOL[torch.float32]
        assert rel_err(layer(x), ref) <= TOL[torch.float32]
        before = copy.deepcopy(frozen.state_dict())
        assert rel_err(frozen.train()(x), ref) <= TOL[torch.float32]  # frozen: the estimates, in training too
    for k, v in frozen.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_frozen_bcn_without_running_stats_keeps_batch_statistics(backend):
    """A BCN with track_running_stats=False normalizes with batch statistics in eval: its
    frozen form too (F.batch_norm in training mode, no buffers to update)."""
    torch.manual_seed(4)
    layer = _trained(wsbcn.BatchChannelNorm2d(8, num_groups=4, track_running_stats=False).to(DEVICE), (2, 8, 3, 4))
    frozen = wsbcn.freeze(layer)
    assert type(frozen) is FrozenBatchChannelNorm2d and list(frozen.state_dict()) == list(layer.state_dict())
    x = torch.randn(2, 8, 3, 4, device=DEVICE) * 3 - 1
    ref = bcn_reference(x, 4, *[p.double() for p in layer.parameters()], training=True)
    with torch.no_grad():
        assert rel_err(frozen(x), ref) <= TOL[torch.float32]
        assert rel_err(torch.jit.script(frozen)(x), ref) <= TOL[torch.float32]
    # running buffers set to None on a tracking layer: batch statistics too, as nn.BatchNorm2d
    tracking = wsbcn.BatchChannelNorm2d(8, num_groups=4).to(DEVICE).eval()
    tracking.load_state_dict(layer.state_dict(), strict=False)
    tracking.running_mean = tracking.running_var = None
    frozen = wsbcn.freeze(tracking)
    assert list(frozen.state_dict()) == list(tracking.state_dict())  # num_batches_tracked kept
    with torch.no_grad():
        assert rel_err(tracking(x), ref) <= TOL[torch.float32]
        assert rel_err(frozen(x), ref) <= TOL[torch.float32]


@pytest.mark.parametrize("activation,affine", [(None, True), ("relu", True), ("silu", False)])
def test_frozen_group_norm_is_torch_group_norm(backend, activation, affine):
    torch.manual_seed(7)
    layer = wsbcn.GroupNorm(2, 6, eps=1e-4, affine=affine, activation=activation).to(DEVICE)
    if affine:
        with torch.no_grad():
            layer.weight.normal_()
            layer.bias.normal_()
    frozen = wsbcn.freeze(layer)
    assert type(frozen) is (nn.GroupNorm if activation is None else GroupNormAct)
    assert list(frozen.state_dict()) == list(layer.state_dict())
    x = torch.randn(3, 6, 4, device=DEVICE)
    w, b = (layer.weight.double(), layer.bias.double()) if affine else (None, None)
    ref = gn_reference(x, 2, w, b, eps=1e-4, activation=activation)
    with torch.no_grad():
        assert rel_err(frozen(x), ref) <= TOL[torch.float32]


def test_a_frozen_model_holds_torch_ops_only():
    """A converted model, frozen: its torch.export graph has aten ops only (no
    torch.ops.wsbcn op: ONNX and TensorRT can take it), TorchScript compiles it, and
    both compute what the model computes in eval mode."""
    torch.manual_seed(3)
    plain = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.SiLU())
    model = nn.Sequential(wsbcn.convert(plain, num_groups=4), wsbcn.GroupNorm(2, 8, activation="relu"),
                          wsbcn.BatchChannelNorm2d(8, num_groups=8, affine=False)).to(DEVICE)
    x = torch.randn(2, 3, 6, 6, device=DEVICE)
    for _ in range(2):
        model(x)
    model.eval()
    with torch.no_grad():
        expected = model(x)
    frozen = wsbcn.freeze(model)
    assert {GroupNormAct, FrozenBatchChannelNorm2d} <= {type(m) for m in frozen.modules()}
    kernel_layers = (wsbcn.WSConv2d, wsbcn.BatchChannelNorm2d, wsbcn.GroupNorm)
    assert not [m for m in frozen.modules() if isinstance(m, kernel_layers)]
    program = torch.export.export(frozen, (x,))
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert ops and all(op.startswith("aten.") for op in ops), ops
    scripted = torch.jit.script(frozen)
    with torch.no_grad():
        for out in (frozen(x), program.module()(x), scripted(x)):
            assert rel_err(out, expected) <= TOL[torch.float32]


def test_freeze_in_place_swaps_the_norms_of_the_model():
    model = nn.Sequential(wsbcn.WSConv2d(3, 4, 1), wsbcn.BatchChannelNorm2d(4, num_groups=2), wsbcn.GroupNorm(2, 4))
    frozen = wsbcn.freeze(model, inplace=True)
    assert frozen is model
    assert [type(m) for m in model] == [nn.Conv2d, FrozenBatchChannelNorm2d, nn.GroupNorm]
    with pytest.raises(ValueError, match="expected 4D input"):
        model[1](torch.randn(2, 4, 3))


def test_parametrized_and_pruned_norms_freeze_to_their_values_now():
    """A weight-normed BCN weight and a pruned GroupNorm weight freeze to the values they
    compute to, as a parametrized WSConv does; the frozen layers hold plain parameters."""
    torch.manual_seed(9)
    bcn = _trained(wsbcn.BatchChannelNorm2d(8, num_groups=4).to(DEVICE), (2, 8, 3, 3))
    nn.utils.parametrizations.weight_norm(bcn, "group_weight", dim=1)
    gn = wsbcn.GroupNorm(4, 8, activation="relu").to(DEVICE)
    prune.random_unstructured(gn, "weight", amount=0.5)
    model = nn.Sequential(bcn, gn).eval()
    x = torch.randn(2, 8, 3, 3, device=DEVICE)
    y = bcn_reference(x, 4, bcn.weight.double(), bcn.bias.double(), bcn.group_weight.double(),
                      bcn.group_bias.double(), bcn.running_mean.double(), bcn.running_var.double(), training=False)
    ref = gn_reference(y, 4, gn.weight.double(), gn.bias.double(), activation="relu")
    with torch.no_grad():
        expected = model(x)
    frozen = wsbcn.freeze(model, inplace=True)  # a pruned layer cannot be deep-copied (torch's own limit)
    assert [type(m) for m in frozen] == [FrozenBatchChannelNorm2d, GroupNormAct]
    assert sorted(frozen.state_dict()) == sorted(
        ["0." + k for k in ("weight", "bias", "group_weight", "group_bias", "running_mean", "running_var",
                            "num_batches_tracked")] + ["1.weight", "1.bias"])
    with torch.no_grad():
        assert rel_err(frozen(x), ref) <= TOL[torch.float32]
    assert rel_err(expected, ref) <= TOL[torch.float32]


class _DoubledWSConv(wsbcn.WSConv2d):
    """A user's WSConv with a forward and a parameter of its own."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.alpha = nn.Parameter(torch.tensor(2.0))

    def forward(self, x):
        return super().forward(x) * self.alpha


class _MyBCN(wsbcn.BatchChannelNorm2d):
    pass


def test_a_subclass_of_a_wsbcn_layer_is_left_as_it_is_with_a_warning():
    """freeze made any WSConv subclass a plain conv: its own forward and parameters were
    dropped (a frozen output off by 0.5). Subclasses stay, as norms' did, with a warning."""
    torch.manual_seed(3)
    model = nn.Sequential(_DoubledWSConv(3, 4, 3), _MyBCN(4, num_groups=2), wsbcn.WSConv2d(4, 4, 1)).eval()
    x = torch.randn(2, 3, 5, 5)
    with pytest.warns(UserWarning, match="left these subclasses of wsbcn layers as they are") as caught:
        frozen = wsbcn.freeze(model)
    assert len(caught) == 1 and caught[0].filename == __file__
    assert str(caught[0].message).endswith(": _DoubledWSConv (a WSConv2d), _MyBCN (a BatchChannelNorm2d)")
    assert type(frozen[0]) is _DoubledWSConv and type(frozen[1]) is _MyBCN and type(frozen[2]) is nn.Conv2d
    assert "0.alpha" in frozen.state_dict()
    with torch.no_grad():
        assert rel_err(frozen(x), model(x)) <= TOL[torch.float32]


def test_a_subclass_norm_inside_a_conv_with_its_own_norm_is_named_too():
    """A WSConvNormAct2d (convert's form of detectron2's conv) freezes with its norm; a
    subclass of a wsbcn norm there stayed without a word."""
    from wsbcn.convert_layers import WSConvNormAct2d

    conv = WSConvNormAct2d(3, 4, 3, norm=_MyBCN(4, num_groups=2), activation=nn.ReLU())
    with pytest.warns(UserWarning, match=r"_MyBCN \(a BatchChannelNorm2d\)"):
        frozen = wsbcn.freeze(nn.Sequential(conv).eval())
    assert type(frozen[0].norm) is _MyBCN
