"""wsbcn.convert on detectron2's and mmcv's layers: detectron2's Conv2d, which applies its
own norm and activation, its FrozenBatchNorm2d and NaiveSyncBatchNorm, and mmcv's ConvWS2d
(the real classes when importable, always stand-ins with the same buffers and forward,
detectron2/layers/wrappers.py and batch_norm.py, mmcv/cnn/bricks/conv_ws.py)."""
import copy
import logging
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import wsbcn
from wsbcn.convert import AffineWSConv2d, ConvNormAct2d, WSConvNormAct2d
from wsbcn.modules import FrozenBatchChannelNorm2d
from wsbcn.ops.collectives import WORLD
from conftest import rel_err
from convert_helpers import census, import_or_skip, matches_reference, named_as, randomize, train_step
from reference import bcn_reference, conv_nd, ws_reference


@named_as("detectron2.layers.wrappers.Conv2d")
class _Conv2d(nn.Conv2d):
    def __init__(self, *args, **kwargs):
        norm = kwargs.pop("norm", None)
        activation = kwargs.pop("activation", None)
        super().__init__(*args, **kwargs)
        self.norm = norm
        self.activation = activation

    def forward(self, x):
        x = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x


@named_as("detectron2.layers.batch_norm.FrozenBatchNorm2d")
class _FrozenBatchNorm2d(nn.Module):
    def __init__(self, num_features, eps=1e-5):
        super().__init__()
        self.num_features, self.eps = num_features, eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features) - eps)
        self.register_buffer("num_batches_tracked", None)

    def forward(self, x):
        if x.requires_grad:
            scale = self.weight * (self.running_var + self.eps).rsqrt()
            bias = self.bias - self.running_mean * scale
            return x * scale.reshape(1, -1, 1, 1) + bias.reshape(1, -1, 1, 1)
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, training=False,
                            eps=self.eps)


@named_as("detectron2.layers.batch_norm.NaiveSyncBatchNorm")
class _NaiveSyncBatchNorm(nn.BatchNorm2d):
    """On one process, and in eval, nn.BatchNorm2d (what these tests run)."""

    def __init__(self, *args, stats_mode="", **kwargs):
        super().__init__(*args, **kwargs)
        self._stats_mode = stats_mode


@named_as("mmcv.cnn.bricks.conv_ws.ConvWS2d")
class _ConvWS2d(nn.Conv2d):
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1, bias=True,
                 eps=1e-5):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation,
                         groups=groups, bias=bias)
        self.eps = eps

    def forward(self, x):
        c_out = self.weight.size(0)
        flat = self.weight.view(c_out, -1)
        mean = flat.mean(dim=1, keepdim=True).view(c_out, 1, 1, 1)
        std = flat.std(dim=1, keepdim=True).view(c_out, 1, 1, 1)
        weight = (self.weight - mean) / (std + self.eps)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


@named_as("mmcv.cnn.bricks.conv_ws.ConvAWS2d")
class _ConvAWS2d(nn.Conv2d):
    """mmcv's forward and checkpoint recovery (without gamma and beta: the weight's std and mean)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("weight_gamma", torch.ones(self.out_channels, 1, 1, 1))
        self.register_buffer("weight_beta", torch.zeros(self.out_channels, 1, 1, 1))

    def _get_weight(self, weight):
        flat = weight.view(weight.size(0), -1)
        mean = flat.mean(dim=1).view(-1, 1, 1, 1)
        std = torch.sqrt(flat.var(dim=1) + 1e-5).view(-1, 1, 1, 1)
        return self.weight_gamma * ((weight - mean) / std) + self.weight_beta

    def forward(self, x):
        return F.conv2d(x, self._get_weight(self.weight), self.bias, self.stride, self.padding, self.dilation,
                        self.groups)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        self.weight_gamma.data.fill_(-1)
        local_missing = []
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, local_missing, unexpected_keys,
                                      error_msgs)
        if self.weight_gamma.data.mean() > 0:
            missing_keys.extend(local_missing)
            return
        flat = self.weight.data.view(self.weight.size(0), -1)
        self.weight_beta.data.copy_(flat.mean(dim=1).view(-1, 1, 1, 1))
        self.weight_gamma.data.copy_(torch.sqrt(flat.var(dim=1) + 1e-5).view(-1, 1, 1, 1))
        missing_keys.extend(k for k in local_missing if not k.endswith(("weight_gamma", "weight_beta")))


def _fold_bn_into_conv(bn, conv, x):
    """mmcv's efficient_conv_bn_eval_forward: the eval-mode BatchNorm folded into the conv's weight."""
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    weight = conv.weight * scale.reshape(-1, 1, 1, 1)
    bias = bn.bias + ((conv.bias if conv.bias is not None else 0) - bn.running_mean) * scale
    return conv._conv_forward(x, weight, bias)


@named_as("mmcv.cnn.bricks.conv_module.ConvModule")
class _ConvModule(nn.Module):
    """conv, norm, act, with mmcv's eval-mode shortcut (efficient_conv_bn_eval=True)."""

    def __init__(self, in_channels, out_channels, kernel_size, padding=0, norm_cfg=None, efficient_conv_bn_eval=False):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.activate = nn.ReLU()
        self.efficient_conv_bn_eval_forward = _fold_bn_into_conv if efficient_conv_bn_eval else None

    def forward(self, x, activate=True, norm=True):
        if norm and not self.bn.training and self.efficient_conv_bn_eval_forward is not None:
            x = self.efficient_conv_bn_eval_forward(self.bn, self.conv, x)
        else:
            x = self.conv(x)
            x = self.bn(x) if norm else x
        return self.activate(x) if activate else x


@named_as("mmengine.utils.dl_utils.parrots_wrapper.SyncBatchNorm")
class _MMEngineSyncBatchNorm(nn.SyncBatchNorm):
    pass


STAND_INS = types.SimpleNamespace(Conv2d=_Conv2d, FrozenBatchNorm2d=_FrozenBatchNorm2d,
                                  NaiveSyncBatchNorm=_NaiveSyncBatchNorm, ConvWS2d=_ConvWS2d, ConvModule=_ConvModule,
                                  SyncBatchNorm=_MMEngineSyncBatchNorm, ConvAWS2d=_ConvAWS2d)


@pytest.fixture(params=["stand-in", "real"])
def layers(request):
    """The layer classes: stand-ins always; detectron2's and mmcv's own when importable."""
    if request.param == "stand-in":
        return STAND_INS
    d2, mmcv_cnn, mmengine_wrapper = import_or_skip("detectron2.layers", "mmcv.cnn",
                                                    "mmengine.utils.dl_utils.parrots_wrapper")
    return types.SimpleNamespace(Conv2d=d2.Conv2d, FrozenBatchNorm2d=d2.FrozenBatchNorm2d,
                                 NaiveSyncBatchNorm=d2.NaiveSyncBatchNorm, ConvWS2d=mmcv_cnn.ConvWS2d,
                                 ConvModule=mmcv_cnn.ConvModule, SyncBatchNorm=mmengine_wrapper.SyncBatchNorm,
                                 ConvAWS2d=mmcv_cnn.ConvAWS2d)


_NORMS = {"BN": lambda layers: nn.BatchNorm2d(8), "GN": lambda layers: nn.GroupNorm(4, 8),
          "FrozenBN": lambda layers: layers.FrozenBatchNorm2d(8),
          "naiveSyncBN": lambda layers: layers.NaiveSyncBatchNorm(8)}
_TARGET = {"bcn": wsbcn.BatchChannelNorm2d, "gn": wsbcn.GroupNorm}


@pytest.mark.parametrize("source, activation, norm", [
    ("BN", nn.ReLU(), "bcn"), ("BN", F.relu, "gn"), ("BN", None, "bcn"), ("GN", nn.ReLU(), "gn"),
    ("GN", None, "bcn"), ("FrozenBN", F.relu, "bcn"), ("FrozenBN", None, "gn"), ("naiveSyncBN", nn.SiLU(), "bcn")])
def test_detectron2_conv_becomes_a_ws_conv_holding_its_converted_norm(layers, source, activation, norm):
    torch.manual_seed(40)
    inner = _NORMS[source](layers)
    conv = layers.Conv2d(3, 8, 3, padding=1, bias=source == "GN", norm=inner, activation=activation)
    head = layers.Conv2d(8, 6, 1)  # no norm: its output feeds none, so it stays
    model = randomize(nn.Sequential(conv, head)).double()
    original, keys = copy.deepcopy(model), model.state_dict().keys()
    out, summary = wsbcn.convert(model, norm=norm, num_groups=4, return_summary=True)
    new = out[0]
    assert type(new) is WSConvNormAct2d and type(new.norm) is _TARGET[norm] and out[1] is head
    assert new.weight is conv.weight and (new.bias is conv.bias or conv.bias is None)
    outside = [k for k in out.state_dict() if not k.startswith("0.norm.")]
    assert outside == [k for k in keys if not k.startswith("0.norm.")] and "0.norm.weight" in out.state_dict()
    assert conv.norm is inner  # the source layer is as it was
    act = {nn.ReLU: "relu", nn.SiLU: "silu"}.get(type(activation), "relu" if activation is F.relu else None)
    if act is None:
        assert new.activation is None and new.norm.activation is None
    else:  # fused into its norm
        assert new.activation is None and new.norm.activation == act
        assert f"0.norm: fused the {act} its convolution 0 applied" in summary
    assert summary[:2] == ["0: Conv2d -> WSConvNormAct2d", f"0.norm: {type(inner).__name__} -> {new.norm!r}"]
    assert "1: Conv2d left alone: its output feeds no norm (WS without a norm after it hurts training)" in summary
    if source == "naiveSyncBN":
        assert new.norm.process_group is WORLD  # synchronizes as NaiveSyncBatchNorm did
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    assert matches_reference(original, out, x)
    train_step(out, x)
    assert new.norm.weight.grad is not None


def test_detectron2_conv_in_training_against_float64():
    """The converted layer in training: conv with W_hat, BCN on batch statistics, its
    fused ReLU, and the running estimates' update, against the composition in float64."""
    torch.manual_seed(41)
    model = randomize(nn.Sequential(_Conv2d(3, 8, 3, bias=False, norm=nn.BatchNorm2d(8), activation=F.relu)))
    out = wsbcn.convert(model, num_groups=4)
    layer = out[0]
    x = torch.randn(2, 3, 7, 7)
    rm, rv = layer.norm.running_mean.double().clone(), layer.norm.running_var.double().clone()
    h = conv_nd(x.double(), ws_reference(layer.weight.double()), None, layer)
    want = bcn_reference(h, 4, layer.norm.weight.double(), layer.norm.bias.double(),
                         layer.norm.group_weight.double(), layer.norm.group_bias.double(), rm, rv,
                         training=True).relu()
    got = out.train()(x)
    assert rel_err(got, want) <= 1e-5
    assert rel_err(layer.norm.running_mean, rm) <= 1e-5 and rel_err(layer.norm.running_var, rv) <= 1e-5


def test_a_detectron2_conv_whose_norm_stays_stays_too(layers):
    frozen = nn.Sequential(layers.Conv2d(3, 8, 3, norm=layers.FrozenBatchNorm2d(8)))
    out, summary = wsbcn.convert(frozen, keep_frozen=True, return_summary=True)
    assert type(out[0]) is layers.Conv2d and type(out[0].norm) is layers.FrozenBatchNorm2d
    assert "0.norm: FrozenBatchNorm2d left alone: kept frozen (keep_frozen=True)" in summary
    assert ("0: Conv2d left alone: feeds 0.norm (FrozenBatchNorm2d), kept frozen (keep_frozen=True): a "
            "standardized weight would change what that layer's fixed statistics see") in summary
    unknown = nn.Sequential(layers.Conv2d(3, 8, 3, norm=nn.InstanceNorm2d(8, affine=True), activation=F.relu))
    out, summary = wsbcn.convert(unknown, return_summary=True)
    assert type(out[0]) is layers.Conv2d and type(out[0].norm) is nn.InstanceNorm2d
    assert "0: Conv2d left alone: feeds 0.norm (InstanceNorm2d), which is left alone" in summary
    other = nn.Sequential(layers.Conv2d(3, 8, 3, norm=nn.Identity()), nn.BatchNorm2d(8))  # its output: Identity's
    out, summary = wsbcn.convert(other, num_groups=4, return_summary=True)
    assert type(out[0]) is layers.Conv2d and type(out[1]) is wsbcn.BatchChannelNorm2d
    assert "0: Conv2d left alone: its output feeds no norm (WS without a norm after it hurts training)" in summary
    reflect = nn.Sequential(layers.Conv2d(3, 8, 3, padding=1, padding_mode="reflect", norm=nn.BatchNorm2d(8)))
    out, summary = wsbcn.convert(reflect, num_groups=4, return_summary=True)
    assert type(out[0]) is layers.Conv2d and type(out[0].norm) is wsbcn.BatchChannelNorm2d
    assert ("0: Conv2d left alone: padding_mode='reflect', which detectron2's forward ignores and WSConv2d would "
            "apply") in summary


def test_the_norm_inside_keeps_its_own_mode():
    """A norm put in eval inside a training conv (frozen statistics): the new norm is in
    eval too, and convert changes no mode of the source layers."""
    conv = _Conv2d(3, 8, 3, norm=nn.BatchNorm2d(8))
    inner = conv.norm.eval()
    out = wsbcn.convert(nn.Sequential(conv), num_groups=4)
    assert out[0].training and not out[0].norm.training
    assert conv.training and not inner.training


def test_detectron2_convs_convert_after_ws_false_and_then_not_again(caplog):
    model = nn.Sequential(_Conv2d(3, 8, 3, norm=nn.BatchNorm2d(8), activation=nn.ReLU()))
    first, summary = wsbcn.convert(model, ws=False, num_groups=4, return_summary=True)
    norm = first[0].norm
    assert type(first[0]) is _Conv2d and type(norm) is wsbcn.BatchChannelNorm2d
    assert norm.activation is None and isinstance(first[0].activation, nn.ReLU)  # the conv keeps its activation
    assert "0: Conv2d left alone: ws=False" in summary
    second = wsbcn.convert(first, num_groups=4)
    assert type(second[0]) is WSConvNormAct2d and second[0].norm is norm and isinstance(second[0].activation, nn.ReLU)
    with caplog.at_level(logging.INFO, logger="wsbcn"):
        _, summary = wsbcn.convert(second, return_summary=True)
    assert summary == ["nothing to convert: no norm layer with a convert rule, and no convolution feeding a norm "
                       "(already converted: 1 WSConv and 1 wsbcn norm layers)"]


@pytest.mark.parametrize("norm", ["bcn", "gn"])
def test_freeze_keeps_the_norm_and_activation_of_a_converted_detectron2_conv(norm):
    torch.manual_seed(42)
    model = randomize(nn.Sequential(_Conv2d(3, 8, 3, norm=nn.BatchNorm2d(8), activation=nn.ReLU()),
                                    _Conv2d(8, 8, 3, norm=nn.GroupNorm(2, 8), activation=torch.sigmoid)))
    converted = wsbcn.convert(model, norm=norm, num_groups=4).eval()
    frozen = wsbcn.freeze(converted)
    assert [type(m) for m in frozen] == [ConvNormAct2d, ConvNormAct2d]
    assert not any(isinstance(m, (wsbcn.WSConv2d, wsbcn.BatchChannelNorm2d, wsbcn.GroupNorm))
                   for m in frozen.modules())
    if norm == "bcn":
        assert type(frozen[0].norm) is FrozenBatchChannelNorm2d and frozen[0].norm.activation == "relu"
    assert type(frozen[1].activation) is nn.Sigmoid  # a function as its module: the frozen model scripts
    scripted = torch.jit.script(frozen)
    assert frozen.state_dict().keys() == converted.state_dict().keys()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert rel_err(frozen(x), converted(x)) <= 1e-5 and rel_err(scripted(x), converted(x)) <= 1e-5


def test_model_wide_ws_covers_detectron2_convs():
    torch.manual_seed(43)
    model = nn.Sequential(_Conv2d(3, 8, 3, norm=nn.BatchNorm2d(8), activation=F.relu),
                          _Conv2d(8, 8, 3, norm=nn.BatchNorm2d(8)))
    per_layer = wsbcn.convert(copy.deepcopy(model), num_groups=4)
    model_wide = wsbcn.convert(model, num_groups=4, ws="model")
    x = torch.randn(2, 3, 8, 8)
    y, y_model = per_layer(x), model_wide(x)
    assert torch.equal(y, y_model)
    y.square().sum().backward()
    y_model.square().sum().backward()
    for a, b in zip(per_layer.parameters(), model_wide.parameters()):
        assert torch.equal(a.grad, b.grad)


def test_mmcv_conv_ws_becomes_a_ws_conv_with_the_same_output(layers):
    torch.manual_seed(44)
    conv = layers.ConvWS2d(4, 6, 3, stride=2, padding=1, eps=1e-4)
    model = nn.Sequential(conv, nn.ReLU(), nn.Conv2d(6, 8, 1), nn.GroupNorm(2, 8)).double()
    original, keys = copy.deepcopy(model), model.state_dict().keys()
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        mmcv_out = model[0](x)
    out, summary = wsbcn.convert(model, return_summary=True)
    assert type(out[0]) is wsbcn.WSConv2d and out[0].weight is conv.weight
    assert (out[0].eps, out[0].correction, out[0].eps_mode) == (1e-4, 1, "std")
    assert [k for k in out.state_dict() if k.startswith("0.")] == [k for k in keys if k.startswith("0.")]
    with torch.no_grad():
        assert rel_err(out[0](x), mmcv_out) <= 1e-13
    assert summary[0] == "0: ConvWS2d -> WSConv2d"  # always: its forward standardizes
    assert matches_reference(original, out, x)


def test_mmcv_conv_aws_becomes_an_affine_ws_conv_with_the_same_output_and_checkpoints(layers):
    torch.manual_seed(45)
    conv = layers.ConvAWS2d(4, 6, 3, padding=1, groups=2)
    with torch.no_grad():
        conv.weight_gamma.uniform_(0.5, 1.5)
        conv.weight_beta.normal_(0, 0.1)
    model = nn.Sequential(conv, nn.GroupNorm(2, 6), nn.ReLU()).double()
    original, checkpoint = copy.deepcopy(model), copy.deepcopy(model.state_dict())
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    with torch.no_grad():
        mmcv_out = model[0](x)
    out, summary = wsbcn.convert(model, return_summary=True)
    assert type(out[0]) is AffineWSConv2d and out[0].weight is conv.weight and out[0].bias is conv.bias
    assert (out[0].eps, out[0].correction, out[0].eps_mode) == (1e-5, 1, "var")
    assert list(out[0].state_dict()) == ["weight", "bias", "weight_gamma", "weight_beta"]
    with torch.no_grad():
        assert rel_err(out[0](x), mmcv_out) <= 1e-13
    assert summary[0] == "0: ConvAWS2d -> AffineWSConv2d"
    assert matches_reference(original, out, x)
    model_wide = wsbcn.convert(copy.deepcopy(original), ws="model")
    y, y_model_wide = out.train()(x), model_wide.train()(x)
    y.square().sum().backward()
    y_model_wide.square().sum().backward()
    assert torch.equal(y, y_model_wide) and torch.equal(out[0].weight.grad, model_wide[0].weight.grad)
    frozen = wsbcn.freeze(out.eval())
    with torch.no_grad():
        assert type(frozen[0]) is nn.Conv2d and rel_err(frozen(x), out(x)) <= 1e-13
    train_step(out, x)
    assert not out[0].weight_gamma.requires_grad  # buffers, as mmcv's
    # its own checkpoint, and one without gamma and beta (a plain conv's pretrained weight:
    # mmcv recovers them from the weight) load as into mmcv's layer
    plain = {k: v for k, v in checkpoint.items() if not k.endswith(("weight_gamma", "weight_beta"))}
    for state in (checkpoint, plain):
        ours = wsbcn.convert(layers.ConvAWS2d(4, 6, 3, padding=1, groups=2).double())
        theirs = layers.ConvAWS2d(4, 6, 3, padding=1, groups=2).double()
        conv_state = {k[2:]: v for k, v in state.items() if k.startswith("0.")}
        result = ours.load_state_dict(conv_state, strict=False)
        assert result == theirs.load_state_dict(conv_state, strict=False)
        with torch.no_grad():
            assert rel_err(ours(x), theirs(x)) <= 1e-13
    with torch.no_grad():
        plain_conv = F.conv2d(x, checkpoint["0.weight"], checkpoint["0.bias"], padding=1, groups=2)
        assert rel_err(ours(x), plain_conv) <= 1e-10  # W is the loaded weight again


def test_mmcv_conv_module_folding_is_turned_off(layers):
    """ConvModule(efficient_conv_bn_eval=True) folds its BatchNorm into its conv's weight
    in eval mode; with a WSConv and a BCN that computes something else, so convert turns
    it off: eval output against the float64 reference, and after freeze."""
    torch.manual_seed(47)
    block = layers.ConvModule(4, 8, 3, padding=1, norm_cfg=dict(type="BN"), efficient_conv_bn_eval=True)
    model = randomize(nn.Sequential(block)).double()
    original = copy.deepcopy(model)
    original[0].efficient_conv_bn_eval_forward = None  # the twin: conv, norm, act
    out, summary = wsbcn.convert(model, num_groups=4, return_summary=True)
    assert out[0] is block and block.efficient_conv_bn_eval_forward is None
    assert type(block.conv) is wsbcn.WSConv2d and type(block.bn) is wsbcn.BatchChannelNorm2d
    assert ("0: efficient_conv_bn_eval turned off: it folds a plain BatchNorm into a plain conv's weight in eval "
            "mode, which a WSConv and a wsbcn norm are not") in summary
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    assert matches_reference(original, out, x)
    with torch.no_grad():
        assert rel_err(wsbcn.freeze(out).eval()(x), out.eval()(x)) <= 1e-12


def test_mmengine_sync_batch_norm_converts_as_sync_batch_norm(layers):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), layers.SyncBatchNorm(8), nn.ReLU())
    out, summary = wsbcn.convert(model, num_groups=4, return_summary=True)
    assert type(out[0]) is wsbcn.WSConv2d and type(out[1]) is wsbcn.BatchChannelNorm2d
    assert out[1].process_group is WORLD and out[1].activation == "relu"
    train_step(out, torch.randn(2, 3, 6, 6))


def _detectron2_cfg(norm, fpn_norm=""):
    config, = import_or_skip("detectron2.config")
    cfg = config.get_cfg()
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.RESNETS.NORM, cfg.MODEL.FPN.NORM = norm, fpn_norm
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = norm == "FrozenBN"  # as detectron2's configs: MSRA weights for GN/SyncBN
    cfg.MODEL.BACKBONE.FREEZE_AT = 2 if norm == "FrozenBN" else 0
    return cfg


@pytest.mark.parametrize("norm, fpn_norm", [("FrozenBN", ""), ("GN", "GN"), ("SyncBN", ""), ("BN", "GN")])
def test_detectron2_resnet_fpn_backbones(norm, fpn_norm):
    cfg = _detectron2_cfg(norm, fpn_norm)
    fpn, shape_spec = import_or_skip("detectron2.modeling.backbone.fpn", "detectron2.layers")
    torch.manual_seed(45)
    backbone = randomize(fpn.build_resnet_fpn_backbone(cfg, shape_spec.ShapeSpec(channels=3)))
    original = copy.deepcopy(backbone).double()
    converted, summary = wsbcn.convert(copy.deepcopy(backbone).double(), num_groups=16, return_summary=True)
    after = census(converted)
    with_norm = 53 + (8 if fpn_norm else 0)  # the ResNet's convs; the FPN's with its norm
    assert after["WSConvNormAct2d"] == with_norm and after["BatchChannelNorm2d"] == with_norm
    assert after["Conv2d"] == 61 - with_norm  # the FPN's convs without a norm feed none
    if fpn_norm:  # its forward calls them from plain lists
        assert converted.lateral_convs[0] is converted.fpn_lateral5 and converted.output_convs[-1] is \
            converted.fpn_output2 and type(converted.fpn_output2) is WSConvNormAct2d
        assert {f"{name}: 4 entries of this plain list replaced by the new layers too"
                for name in ("lateral_convs", "output_convs")} <= set(summary)
    assert matches_reference(original, converted, torch.randn(1, 3, 64, 64, dtype=torch.float64))
    train_step(converted, torch.randn(2, 3, 64, 64, dtype=torch.float64))


@pytest.mark.slow
def test_detectron2_mask_rcnn_with_group_norm_heads_trains():
    """Misc/mask_rcnn_R_50_FPN_3x_gn.yaml, built in code: GN everywhere, the box and
    mask heads' convs with nn.ReLU() activations, which fuse into their norms."""
    cfg = _detectron2_cfg("GN", "GN")
    modeling, structures, events = import_or_skip("detectron2.modeling", "detectron2.structures",
                                                  "detectron2.utils.events")
    cfg.MODEL.MASK_ON, cfg.MODEL.BACKBONE.NAME = True, "build_resnet_fpn_backbone"
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[32], [64], [128], [256], [512]]
    cfg.MODEL.RPN.IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
    cfg.MODEL.ROI_HEADS.NAME, cfg.MODEL.ROI_HEADS.IN_FEATURES = "StandardROIHeads", ["p2", "p3", "p4", "p5"]
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE, cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 16, 32
    cfg.MODEL.ROI_BOX_HEAD.NAME, cfg.MODEL.ROI_BOX_HEAD.NUM_CONV, cfg.MODEL.ROI_BOX_HEAD.NUM_FC = (
        "FastRCNNConvFCHead", 4, 1)
    cfg.MODEL.ROI_BOX_HEAD.NORM = cfg.MODEL.ROI_MASK_HEAD.NORM = "GN"
    cfg.MODEL.ROI_MASK_HEAD.NAME, cfg.MODEL.ROI_MASK_HEAD.NUM_CONV = "MaskRCNNConvUpsampleHead", 4
    torch.manual_seed(46)
    model = modeling.build_model(cfg)
    model, summary = wsbcn.convert(model, return_summary=True)
    heads = [m for name, m in model.named_modules() if name.startswith("roi_heads.") and type(m) is WSConvNormAct2d]
    assert len(heads) == 8 and all(m.activation is None and m.norm.activation == "relu" for m in heads)
    assert census(model)["WSConvNormAct2d"] == 53 + 8 + 8
    boxes = torch.tensor([[4.0, 4.0, 40.0, 40.0]])
    instances = structures.Instances((64, 64), gt_boxes=structures.Boxes(boxes), gt_classes=torch.tensor([1]),
                                     gt_masks=structures.BitMasks(torch.zeros(1, 64, 64, dtype=torch.bool)))
    batch = [{"image": torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8), "instances": instances}] * 2
    model.train()
    with events.EventStorage():  # what detectron2's trainer opens around a step
        losses = model(batch)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    assert all(m.norm.weight.grad is not None for m in heads)


class _AliasFirst(nn.Module):
    """The conv's own norm also registered before it, at another path, and never called there."""

    def __init__(self):
        super().__init__()
        norm = nn.BatchNorm2d(8)
        self.alias = norm
        self.conv = _Conv2d(3, 8, 3, norm=norm, activation=nn.ReLU())

    def forward(self, x):
        return self.conv(x)


class _CalledDirectly(nn.Module):
    """The conv's own norm, also called by the forward itself."""

    def __init__(self):
        super().__init__()
        self.conv = _Conv2d(3, 8, 3, padding=1, norm=nn.BatchNorm2d(8), activation=nn.ReLU())
        self.bn = self.conv.norm
        self.head = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        return self.conv(x) + self.bn(self.head(x))


class _SharedByTwoConvs(nn.Module):
    def __init__(self):
        super().__init__()
        norm = nn.BatchNorm2d(8)
        self.c1 = _Conv2d(3, 8, 3, padding=1, norm=norm, activation=nn.ReLU())
        self.c2 = _Conv2d(3, 8, 3, padding=1, norm=norm)

    def forward(self, x):
        return self.c1(x) + self.c2(x)


@pytest.mark.parametrize("case", ["no norm of its own", "alias first", "called directly", "shared by two convs"])
def test_a_convs_own_activation_fuses_only_into_the_norm_only_it_applies(case):
    """Against the same model converted without fusion (train mode, the same parameters):
    an activation moves into a norm only where nothing else can call that norm."""
    torch.manual_seed(48)
    make = {"no norm of its own": lambda: nn.Sequential(_Conv2d(3, 8, 3, activation=nn.ReLU()), nn.BatchNorm2d(8)),
            "alias first": _AliasFirst, "called directly": _CalledDirectly, "shared by two convs": _SharedByTwoConvs}
    model = randomize(make[case]())
    unfused = wsbcn.convert(copy.deepcopy(model), num_groups=4, fuse_activation=False)
    out, summary = wsbcn.convert(model, num_groups=4, return_summary=True)
    x = torch.randn(2, 3, 6, 6)
    assert rel_err(out.train()(x), unfused.train()(x)) <= 1e-6
    assert not any(m.activation for m in out.modules() if isinstance(m, wsbcn.BatchChannelNorm2d))
    convs = [m for m in out.modules() if isinstance(m, (wsbcn.WSConv2d, _Conv2d))]
    assert all(type(m) is not _Conv2d for m in convs)  # every detectron2 conv converted
    if case == "alias first":  # the one norm, converted at both paths (registered twice: the ReLU stays the conv's)
        assert out.alias is out.conv.norm and type(out.alias) is wsbcn.BatchChannelNorm2d
        assert isinstance(out.conv.activation, nn.ReLU) and not any("left alone" in line for line in summary)
    if case == "shared by two convs":
        assert out.c1.norm is out.c2.norm and type(out.c1.norm) is wsbcn.BatchChannelNorm2d
        assert isinstance(out.c1.activation, nn.ReLU) and not any("left alone" in line for line in summary)


def test_a_norm_inside_rule_whose_layer_does_not_hold_the_norm_is_refused():
    @named_as("userlib.layers.ConvBN")
    class ConvBN(_Conv2d):
        pass

    def build(layer):  # keeps the norm as .norm, not as the rule's .bn
        return WSConvNormAct2d(layer.in_channels, layer.out_channels, layer.kernel_size, norm=layer.bn, activation=None)

    from wsbcn.convert import ConvertRule, register_convert_rule, unregister_convert_rule
    register_convert_rule(ConvBN, ConvertRule("conv", build, norm_inside=("bn", "act")))
    try:
        layer = ConvBN(3, 8, 3)
        layer.bn, layer.act = nn.BatchNorm2d(8), None
        model = nn.Sequential(layer)
        with pytest.raises(TypeError, match=r"does not hold the layer's norm as \.bn and its activation as \.act"):
            wsbcn.convert(model, num_groups=4)
        assert model[0] is layer and type(layer.bn) is nn.BatchNorm2d
    finally:
        unregister_convert_rule(ConvBN)


def test_mmcv_conv_module_with_folding_converts_in_eval_mode_too(layers):
    torch.manual_seed(49)
    block = layers.ConvModule(4, 8, 3, padding=1, norm_cfg=dict(type="BN"), efficient_conv_bn_eval=True)
    model = randomize(nn.Sequential(block)).double().eval()
    original = copy.deepcopy(model)
    original[0].efficient_conv_bn_eval_forward = None
    out, summary = wsbcn.convert(model, num_groups=4, return_summary=True)
    assert type(block.conv) is wsbcn.WSConv2d and type(block.bn) is wsbcn.BatchChannelNorm2d
    assert block.efficient_conv_bn_eval_forward is None and not any("left alone" in line for line in summary)
    assert matches_reference(original, out, torch.randn(2, 4, 6, 6, dtype=torch.float64))


class _FPNLike(nn.Module):
    """detectron2's FPN: registered convs its forward calls from plain lists, and one norm
    shared by two of them."""

    def __init__(self):
        super().__init__()
        shared = nn.GroupNorm(2, 8)
        self.lateral = _Conv2d(3, 8, 1, norm=nn.GroupNorm(2, 8))
        self.output = _Conv2d(8, 8, 3, padding=1, norm=shared)
        self.extra = _Conv2d(8, 8, 3, padding=1, norm=shared)
        self.lateral_convs, self.output_convs = [self.lateral], [self.output, self.extra]

    def forward(self, x):
        y = self.lateral_convs[0](x)
        return self.output_convs[0](y) + self.output_convs[1](y)


@pytest.mark.parametrize("inplace", [False, True])
def test_freeze_replaces_layers_in_plain_lists_too(inplace):
    """A frozen FPN-like model runs only torch layers (torch.jit.trace refuses a layer with
    trainable Parameters left in the forward), shared norms stay shared."""
    torch.manual_seed(50)
    converted = wsbcn.convert(randomize(_FPNLike()), num_groups=2).eval()
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        want = converted(x)
    frozen = wsbcn.freeze(converted, inplace=inplace)
    assert frozen.lateral_convs == [frozen.lateral] and frozen.output_convs == [frozen.output, frozen.extra]
    assert type(frozen.output) is ConvNormAct2d and frozen.output.norm is frozen.extra.norm
    assert not any(isinstance(m, (wsbcn.WSConv2d, wsbcn.BatchChannelNorm2d)) for m in vars(frozen)["output_convs"])
    traced = torch.jit.trace(frozen, x)
    with torch.no_grad():
        assert rel_err(frozen(x), want) <= 1e-5 and rel_err(traced(x), want) <= 1e-5
