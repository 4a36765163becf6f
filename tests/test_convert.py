"""wsbcn.convert on the package's ResNet-50, on small hand-made models, and on the
torchvision/timm layers detection and BiT users train (their real classes when
importable, always stand-ins with the same buffers and forward)."""
import copy
import functools
import importlib
import logging
import pathlib
import types
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import wsbcn
from wsbcn.convert import (ConvertRule, NormAct, ScaledWSConv2d, bn_like_norm, convert_rule_for,
                           convert_rules_table, register_convert_rule, unregister_convert_rule)
from wsbcn.ops import collectives
from wsbcn.tools.models import resnet50
from conftest import DEVICE, TOL, rel_err, stand_in_group
from convert_helpers import (Reference, census, import_or_skip, matches_reference, named_as, randomize,
                             reference_model, train_step)
from reference import bcn_reference, conv_nd, gn_reference, ws_reference

convert_module = importlib.import_module("wsbcn.convert")  # the attribute wsbcn.convert is the function


def _count(model, cls):
    return sum(isinstance(m, cls) for m in model.modules())


# ---------------------------------------------------------------------------------------
# The package's ResNet-50 and small torch.nn models


def test_resnet50_conversion_swaps_fuses_and_carries_weights():
    torch.manual_seed(0)
    plain = resnet50("plain_bn", num_classes=10).to(DEVICE)
    with torch.no_grad():  # non-trivial BN state to carry over
        for m in plain.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
    n_convs, n_bns = _count(plain, nn.Conv2d), _count(plain, nn.BatchNorm2d)
    stem_weight = plain.conv1.weight
    stem_rm = plain.bn1.running_mean.clone()
    unfused = wsbcn.convert(copy.deepcopy(plain), fuse_activation=False)
    fused, summary = wsbcn.convert(plain, return_summary=True)
    for model in (fused, unfused):
        assert _count(model, wsbcn.WSConv2d) == n_convs == 53
        assert _count(model, wsbcn.BatchChannelNorm2d) == n_bns == 53
        assert _count(model, nn.BatchNorm2d) == 0
        assert type(model.fc) is nn.Linear  # no norm after it: left alone
    assert fused.conv1.weight is stem_weight  # the same Parameter: optimizers keep working
    assert torch.equal(fused.bn1.running_mean, stem_rm)
    assert type(fused) is type(plain)  # the model itself, its class and forward kept
    fused_acts = [m.activation for m in fused.modules() if isinstance(m, wsbcn.BatchChannelNorm2d)]
    # the stem's ReLU module, called once, fuses (and becomes an Identity); every bottleneck
    # calls one ReLU module after bn1, bn2 and the residual addition, so it stays
    assert fused_acts.count("relu") == 1 and type(fused.relu) is nn.Identity
    assert [line for line in summary if "fused" in line and "not fused" not in line] == [
        "bn1: fused the following relu"]
    not_fused = [line for line in summary if "not fused" in line]
    assert len(not_fused) == 16 * 2 and type(fused.layer1[0].relu) is nn.ReLU
    assert ("layer1.0.bn1: the following relu not fused: layer1.0.relu is also called on other inputs, which "
            "must keep their ReLU") in not_fused
    assert not any("left alone" in line for line in summary)
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    fused.eval()
    unfused.eval()
    with torch.no_grad():
        assert rel_err(fused(x), unfused(x)) <= 1e-5
    fused.train()
    fused(x).sum().backward()
    assert fused.conv1.weight.grad is not None


def test_conv_not_followed_by_norm_is_left_alone_and_named():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.SiLU())
    out, summary = wsbcn.convert(model, return_summary=True)
    kinds = [type(m) for m in out.modules()]
    assert kinds.count(nn.Conv2d) == 1 and kinds.count(wsbcn.WSConv2d) == 1
    assert out.get_submodule("3").activation == "silu"
    assert out(torch.randn(2, 3, 8, 8)).shape == (2, 8, 4, 4)
    assert "0: Conv2d left alone: its output feeds no norm (WS without a norm after it hurts training)" in summary


class _ConvsConcatenatedIntoANorm(nn.Module):
    """timm's MixedConv2d (kernel sizes split over the channels) and Inception's branches:
    convs concatenated along the channels, one norm over all of them; one input of the
    concatenation is no conv's (a skip)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 5, padding=2)
        self.c = nn.Conv2d(8, 4, 1)
        self.drop = nn.Dropout(0.0)
        self.bn = nn.BatchNorm2d(20)

    def forward(self, x):
        xa, xb = torch.split(x, 4, 1)
        return self.bn(torch.cat([self.a(xa), self.drop(self.b(xb)), self.c(x), x], dim=1))


def test_convs_concatenated_into_a_norm_are_standardized():
    """Each conv of a concatenation a norm takes has a norm after it: WS applies (they were
    left alone, "feeds no norm"). Against the float64 twin."""
    torch.manual_seed(3)
    model = _ConvsConcatenatedIntoANorm().double()
    original = copy.deepcopy(model)
    out, summary = wsbcn.convert(model, num_groups=4, return_summary=True)
    assert [type(m) for m in (out.a, out.b, out.c)] == [wsbcn.WSConv2d] * 3, summary
    assert type(out.bn) is wsbcn.BatchChannelNorm2d
    assert matches_reference(original, out, torch.randn(2, 8, 5, 5, dtype=torch.float64))


def test_gn_target_and_group_norm_sources():
    model = nn.Sequential(nn.Conv1d(4, 16, 3), nn.GroupNorm(4, 16), nn.Conv1d(16, 8, 1), nn.BatchNorm1d(8))
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
    as_gn = wsbcn.convert(copy.deepcopy(model), norm="gn", num_groups=4)
    assert isinstance(as_gn[1], wsbcn.GroupNorm) and isinstance(as_gn[3], wsbcn.GroupNorm)
    assert as_gn[1].num_groups == 4 and torch.equal(as_gn[1].weight, model[1].weight)
    as_bcn = wsbcn.convert(copy.deepcopy(model), num_groups=4)
    assert isinstance(as_bcn[1], wsbcn.BatchChannelNorm1d) and not as_bcn[1].group_affine
    assert torch.equal(as_bcn[1].group_weight.reshape(-1), model[1].weight)
    assert as_bcn(torch.randn(3, 4, 10)).shape == (3, 8, 8)


class Untraceable(nn.Module):
    def __init__(self, norm=None):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = norm if norm is not None else nn.BatchNorm2d(8)
        self.act = nn.ReLU()

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            x = x * 2
        return self.act(self.bn(self.conv(x)))


def test_module_order_fallback_warns_and_converts():
    with pytest.warns(UserWarning, match="module order"):
        out, summary = wsbcn.convert(Untraceable(), num_groups=4, return_summary=True)
    assert isinstance(out.conv, wsbcn.WSConv2d) and isinstance(out.bn, wsbcn.BatchChannelNorm2d)
    assert out.bn.activation is None and isinstance(out.act, nn.ReLU)  # nothing fused
    assert out(torch.randn(2, 3, 6, 6)).shape == (2, 8, 4, 4)
    assert any(line.startswith("torch.fx could not trace the model (TraceError: ") and line.endswith(
        "each conv was paired with the norm right after it in registration order, if of its width, and no "
        "activation was fused") for line in summary)  # the summary says so too


def test_module_order_fallback_gives_the_traced_reason_for_a_conv_before_a_norm_without_a_rule():
    """Paired by module order, a conv before a norm without a rule (InstanceNorm2d: it has
    num_features, not num_channels) says so, as traced; it said 'its output feeds no norm'."""
    with pytest.warns(UserWarning, match="module order"):
        out, summary = wsbcn.convert(Untraceable(nn.InstanceNorm2d(8)), num_groups=4, return_summary=True)
    _, traced_summary = wsbcn.convert(nn.Sequential(nn.Conv2d(3, 8, 3), nn.InstanceNorm2d(8)), num_groups=4,
                                      return_summary=True)
    assert type(out.conv) is nn.Conv2d
    assert "conv: Conv2d left alone: feeds bn (InstanceNorm2d), which is left alone" in summary
    assert "0: Conv2d left alone: feeds 1 (InstanceNorm2d), which is left alone" in traced_summary


class _RepBlock(nn.Module):
    """A RepVGG-style block: conv+BN and BN-only identity branches, which reparameterize()
    folds into one conv (timm's RepVggBlock, MobileOneBlock)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.identity = nn.BatchNorm2d(8)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)) + self.identity(x))

    def reparameterize(self):
        raise NotImplementedError  # (the fold itself is timm's)


def test_a_block_that_folds_its_batch_norms_is_named_in_the_summary(caplog):
    model = nn.Sequential(_RepBlock(), _RepBlock(), nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8))
    with caplog.at_level(logging.INFO, logger="wsbcn"):
        out, summary = wsbcn.convert(model, num_groups=4, return_summary=True)
    assert isinstance(out[0].identity, wsbcn.BatchChannelNorm2d) and isinstance(out[1].bn, wsbcn.BatchChannelNorm2d)
    line = ("0 and 1 more: _RepBlock has reparameterize(), which folds its branches' BatchNorms into one conv; the "
            "wsbcn norms they became normalize each sample, which no conv absorbs, so it cannot fold them now (the "
            "blocks train and run unfolded)")
    assert line in summary
    assert [r.levelno for r in caplog.records if line in r.getMessage()] == [logging.WARNING]
    _, again = wsbcn.convert(nn.Sequential(_RepBlock()), num_groups=4, norm="gn", return_summary=True)
    assert any(line.startswith("0: _RepBlock has reparameterize()") for line in again)
    _, root = wsbcn.convert(_RepBlock(), num_groups=4, return_summary=True)
    assert any(line.startswith("(the model itself): _RepBlock has reparameterize()") for line in root)


class _VAE(nn.Module):
    """A VAE's reparameterize(mu, logvar) (the sampling trick) folds nothing."""

    def __init__(self, norm):
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(3, 8, 3), norm)

    def forward(self, x):
        return self.enc(x)

    def reparameterize(self, mu, logvar):
        return mu + torch.randn_like(mu) * (0.5 * logvar).exp()


@pytest.mark.parametrize("model", [lambda: nn.Sequential(_VAE(nn.BatchNorm2d(8))),
                                   lambda: nn.Sequential(_VAE(nn.GroupNorm(2, 8)))], ids=["VAE", "GroupNorm-only"])
def test_the_fold_line_misses_methods_with_arguments_and_blocks_without_batch_norms(model):
    model = model()
    if isinstance(model[0].enc[1], nn.GroupNorm):  # a block whose fold method holds GroupNorms only
        model[0].switch_to_deploy = lambda: None
    _, summary = wsbcn.convert(model, num_groups=4, return_summary=True)
    assert isinstance(model[0].enc[0], wsbcn.WSConv2d)
    assert not any("folds its branches" in line for line in summary)


class _WithFlags(nn.Module):
    """mmcv's ConvModule.forward(x, activate=True, norm=True): branches on its flags."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()

    def forward(self, x, activate=True, norm=True):
        x = self.conv(x)
        if norm:
            x = self.bn(x)
        return self.act(x) if activate else x


def test_a_forward_with_bool_flags_traces_at_their_defaults():
    torch.manual_seed(8)
    model = randomize(_WithFlags()).double()
    original = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback
        out, summary = wsbcn.convert(model, num_groups=4, return_summary=True)
    # paired from that trace; nothing fused: a call with activate=False must still skip the ReLU
    assert type(out.conv) is wsbcn.WSConv2d and out.bn.activation is None and type(out.act) is nn.ReLU
    assert ("traced with the forward's flags at their defaults (activate=True, norm=True), which other calls may "
            "change: convs paired with their norms from that trace, and no activation fused") in summary
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    assert matches_reference(original, out, x)
    twin = reference_model(original, out)
    with torch.no_grad():
        assert rel_err(out(x, activate=False), twin(x, activate=False)) <= 1e-10


def test_a_conv_whose_weight_a_hook_or_parametrization_computes_is_left_alone_and_said_why(caplog):
    hooked = nn.Sequential(nn.utils.spectral_norm(nn.Conv2d(3, 8, 3)), nn.BatchNorm2d(8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the hook form is deprecated
        weight_normed = nn.Sequential(nn.utils.weight_norm(nn.Conv2d(3, 8, 3)), nn.BatchNorm2d(8))
    for model in (hooked, weight_normed):
        conv = model[0]
        out, summary = wsbcn.convert(model, num_groups=4, return_summary=True)
        assert out[0] is conv and type(out[1]) is wsbcn.BatchChannelNorm2d
        assert ("0: Conv2d left alone: its weight is computed by a forward pre-hook (torch.nn.utils.spectral_norm "
                "or weight_norm): convert cannot move that to a new layer; convert the layer without it, then "
                "apply it to the wsbcn layer") in summary
        assert out(torch.randn(2, 3, 6, 6)).shape == (2, 8, 4, 4)
    parametrized = nn.Sequential(nn.utils.parametrizations.spectral_norm(nn.Conv2d(3, 8, 3)), nn.BatchNorm2d(8))
    with caplog.at_level(logging.INFO, logger="wsbcn"):
        out, summary = wsbcn.convert(parametrized, num_groups=4, return_summary=True)
    line = ("0: ParametrizedConv2d left alone: its weight is parametrized (torch.nn.utils.parametrize: "
            "parametrizations.spectral_norm, weight_norm, ...): convert cannot move that to a new layer; convert "
            "the layer without it, then apply it to the wsbcn layer")
    assert line in summary and not any("no convert rule" in s for s in summary)
    assert [r.levelno for r in caplog.records if line in r.getMessage()] == [logging.WARNING]


@pytest.mark.parametrize("norm", ["bcn", "gn"])
def test_a_frozen_affine_stays_frozen_and_a_missing_bias_stays_missing(norm):
    """requires_grad=False on a norm's affine (mmdetection's norm_cfg requires_grad=False):
    the new layer trains none of its affine; a GroupNorm(bias=False) as BCN keeps a zero
    channel-stage bias, untrained."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1), nn.GroupNorm(2, 8))
    for p in list(model[1].parameters()) + list(model[3].parameters()):
        p.requires_grad_(False)
    out = wsbcn.convert(model, norm=norm, num_groups=4)
    assert all(not p.requires_grad for layer in (out[1], out[3]) for p in layer.parameters())
    gn = nn.GroupNorm(2, 8)
    gn.register_parameter("bias", None)  # nn.GroupNorm(2, 8, bias=False) from torch 2.13 on
    no_bias = wsbcn.convert(nn.Sequential(nn.Conv2d(3, 8, 3), gn), norm=norm)
    trains = {name: p.requires_grad for name, p in no_bias[1].named_parameters()}
    if norm == "gn":
        assert no_bias[1].bias is None and trains == {"weight": True}
    else:
        assert torch.equal(no_bias[1].group_bias, torch.zeros(1, 8, 1))
        assert trains == {"weight": True, "bias": True, "group_weight": True, "group_bias": False}
    train_step(no_bias, torch.randn(2, 3, 6, 6))
    if norm == "bcn":
        assert torch.equal(no_bias[1].group_bias, torch.zeros(1, 8, 1))
        # a frozen scale with a training shift: the channel stage's follow each
        half = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8))
        half[1].weight.requires_grad_(False)
        trains = {n: p.requires_grad for n, p in wsbcn.convert(half, norm=norm)[1].named_parameters()}
        assert trains == {"weight": True, "bias": True, "group_weight": False, "group_bias": True}


# ---------------------------------------------------------------------------------------
# Activation fusion: the model keeps its class and its forward


class _Classifier(nn.Module):
    """A forward that decides when it runs: dropout in training only, an optional
    checkpoint set after convert, a method of its own."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.conv2, self.bn2, self.act2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.SiLU()
        self.checkpointing = False

    def block(self, x):
        return self.act2(self.bn2(self.conv2(x)))

    def features(self, x):
        x = self.act(self.bn(self.conv(x)))
        return checkpoint(self.block, x, use_reentrant=False) if self.checkpointing else self.block(x)

    def forward(self, x):
        return F.dropout(self.features(x), p=0.5, training=self.training)


def test_fusing_keeps_the_model_its_class_and_its_forward():
    """Before, a fusion returned an fx.GraphModule traced in the model's mode: the
    dropout stayed on in eval, a flag set later was ignored, methods were gone."""
    torch.manual_seed(40)
    model = randomize(_Classifier()).double()
    original = copy.deepcopy(model)
    out, summary = wsbcn.convert(model, num_groups=4, return_summary=True)  # in training mode
    assert out is model and type(out) is _Classifier and callable(out.features)
    assert type(out.act) is nn.Identity and type(out.act2) is nn.Identity
    assert (out.bn.activation, out.bn2.activation) == ("relu", "silu")
    assert summary[-2:] == ["bn: fused the following relu", "bn2: fused the following silu"]
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    assert matches_reference(original, out, x)  # eval: no dropout, as the forward says
    with torch.no_grad():
        assert torch.equal(out(x), out(x))
    # training, with the checkpoint switched on after convert: the block runs again in
    # backward, and the gradients are those without it (batch statistics)
    runs, grads = [], []
    for checkpointing in (False, True):
        twin = copy.deepcopy(out).train()
        twin.checkpointing = checkpointing
        calls = []
        twin.conv2.register_forward_hook(lambda *_: calls.append(1))
        torch.manual_seed(41)  # the same dropout mask
        twin(x).square().sum().backward()
        runs.append(len(calls))
        grads.append([p.grad for p in twin.parameters()])
    assert runs == [1, 2]
    assert all(rel_err(a, b) <= 1e-12 for a, b in zip(*grads))


class _SharedAct(nn.Module):
    """One ReLU after a norm and after the residual addition (torchvision's blocks)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.relu = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()

    def forward(self, x):
        return self.relu(self.relu(self.bn(self.conv(x))) + x)


class _FunctionalAct(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class _ModeDependentAct(nn.Module):
    """The activation takes the norm's output in training and something else in eval."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.SiLU()

    def forward(self, x):
        x = self.bn(self.conv(x))
        return self.act(x) if self.training else self.act(x - 1)


class _Scale(nn.Module):
    """A stateful module (an fx leaf: its forward is not traced) that calls an activation."""

    def __init__(self, act):
        super().__init__()
        self.s, self.act = nn.Parameter(torch.full((1,), 0.5)), act

    def forward(self, x):
        return self.act(x * self.s)


class _ActInsideALeaf(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.SiLU()
        self.scale = _Scale(self.act)

    def forward(self, x):
        return self.scale(self.act(self.bn(self.conv(x))) - 1)


class _OutputAlsoElsewhere(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.relu = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()

    def forward(self, x):
        y = self.bn(self.conv(x))
        return self.relu(y) + y


class _NormCalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.conv2, self.bn, self.relu = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), \
            nn.ReLU()

    def forward(self, x):
        return self.bn(self.conv2(self.relu(self.bn(self.conv(x)))))


class _TwoNormsOneAct(nn.Module):
    """One ReLU module after two norms and nothing else: it fuses into both."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.relu = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)

    def forward(self, x):
        return self.relu(self.bn2(self.conv2(self.relu(self.bn(self.conv(x))))))


@pytest.mark.parametrize("cls, fused, line", [
    (_SharedAct, {}, "bn: the following relu not fused: relu is also called on other inputs, which must keep their "
                     "ReLU"),
    (_FunctionalAct, {}, "bn: the following relu not fused: it is a function call (relu) in a forward, which "
                         "convert does not rewrite (an nn.ReLU module there would fuse)"),
    (_ModeDependentAct, {}, "bn: the following silu not fused: the forward in eval mode does not feed bn's output "
                            "to act alone"),
    (_ActInsideALeaf, {}, "bn: the following silu not fused: scale, whose forward is not traced, holds it as "
                          "scale.act"),
    (_OutputAlsoElsewhere, {}, "bn: the following relu not fused: the norm's output also goes elsewhere, without "
                               "the activation"),
    (_NormCalledTwice, {}, "bn: the following relu not fused: bn is called 2 times, and a fused activation would "
                           "apply to each"),
    (_TwoNormsOneAct, {"bn": "relu", "bn2": "relu"}, None),
])
def test_activations_fuse_only_where_replacing_their_module_changes_nothing_else(cls, fused, line):
    torch.manual_seed(42)
    model = randomize(cls()).double()
    original = copy.deepcopy(model)
    out, summary = wsbcn.convert(model, num_groups=4, return_summary=True)
    assert out is model and all(m.training for m in out.modules())  # traced in eval too, and put back
    norms = {path: m.activation for path, m in out.named_modules() if isinstance(m, wsbcn.BatchChannelNorm2d)}
    assert norms == {path: fused.get(path) for path in norms}
    assert [type(m) is nn.Identity for m in out.modules()].count(True) == (1 if fused else 0)
    assert (line in summary) if line else not any("not fused" in s for s in summary)
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    assert matches_reference(original, out, x)  # eval mode


def test_convert_rejects_bad_arguments():
    with pytest.raises(ValueError, match="norm"):
        wsbcn.convert(nn.Sequential(), norm="ln")
    with pytest.raises(ValueError, match="num_groups"):
        wsbcn.convert(nn.Sequential(), num_groups=0)
    with pytest.raises(TypeError, match="nn.Module"):
        wsbcn.convert("resnet")
    with pytest.raises(TypeError, match="keep_frozen"):
        wsbcn.convert(nn.Sequential(), keep_frozen="yes")
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    for kwargs, error, match in [(dict(estimate="yes"), TypeError, "estimate must be a bool"),
                                 (dict(fuse_activation="no"), TypeError, "fuse_activation must be a bool"),
                                 (dict(return_summary="no"), TypeError, "return_summary must be a bool"),
                                 (dict(ws=1), ValueError, "ws must be True, False or 'model'"),
                                 (dict(process_group="x"), TypeError, "process_group must be a torch.distributed"),
                                 (dict(norm="gn", process_group=collectives.WORLD), ValueError, "norm='gn'")]:
        with pytest.raises(error, match=match):
            wsbcn.convert(model, num_groups=4, **kwargs)
        assert [type(m) for m in model] == [nn.Conv2d, nn.BatchNorm2d], kwargs
    with pytest.raises(TypeError, match="process_group must be a torch.distributed"):
        wsbcn.BatchChannelNorm2d(8, 4, process_group="x")


def test_a_batch_norm_whose_running_buffers_were_set_to_none_converts():
    """nn.BatchNorm2d with its running buffers set to None and the flag off (its counter
    kept), which torch runs on batch statistics: its BCN does the same (float64)."""
    torch.manual_seed(14)
    bn = nn.BatchNorm2d(8)
    bn.running_mean = bn.running_var = None
    bn.track_running_stats = False
    model = wsbcn.convert(nn.Sequential(bn), num_groups=4)
    bcn = model[0]
    assert isinstance(bcn, wsbcn.BatchChannelNorm2d) and bcn.running_mean is None
    x = torch.randn(2, 8, 3, 3)
    ref = bcn_reference(x.double(), 4, bcn.weight.double(), bcn.bias.double(), bcn.group_weight.double(),
                        bcn.group_bias.double())
    assert rel_err(model.eval()(x), ref) <= TOL[torch.float32]


def test_torchvision_resnet18():
    (torchvision,) = import_or_skip("torchvision")
    model = wsbcn.convert(torchvision.models.resnet18(num_classes=10))
    assert _count(model, nn.BatchNorm2d) == 0 and _count(model, wsbcn.WSConv2d) == 20
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_timm_resnet():
    _, timm = import_or_skip("torchvision", "timm")  # timm's norm layers import torchvision
    model = wsbcn.convert(timm.create_model("resnet18", num_classes=10))
    assert _count(model, nn.BatchNorm2d) == 0
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("ws", [True, "model"])
def test_timm_resnet_keeps_its_methods_dropout_and_checkpointing(ws):
    """timm's own switches still work after convert: the dropout of drop_rate is off in
    eval, and set_grad_checkpointing recomputes the blocks with micro-batch BCN, giving
    the gradients and buffers of the step without it (tests/test_checkpoint.py)."""
    _, timm = import_or_skip("torchvision", "timm")
    torch.manual_seed(43)
    model = wsbcn.convert(timm.create_model("resnet18", num_classes=10, drop_rate=0.5), num_groups=8,
                          estimate=True, ws=ws)
    assert isinstance(model, timm.models.resnet.ResNet)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        assert torch.equal(model.forward_head(model.forward_features(x)), model(x))
    model.train()
    checkpointed = copy.deepcopy(model)
    checkpointed.set_grad_checkpointing(True)
    calls, results = [], []
    checkpointed.layer1[0].conv1.register_forward_hook(lambda *_: calls.append(1))
    for m in (model, checkpointed):
        torch.manual_seed(44)  # the same dropout mask
        (m(x) * torch.arange(10.0)).sum().backward()
        results.append(({n: p.grad for n, p in m.named_parameters()}, dict(m.named_buffers())))
    assert len(calls) == 2  # the block ran again in the backward
    for name, grad in results[0][0].items():
        assert rel_err(results[1][0][name], grad) <= 1e-5, name
    for name, buffer in results[0][1].items():
        assert torch.equal(results[1][1][name], buffer), name


def _converting_again_changes_nothing(model, caplog, expected_counts):
    """Convert ``model`` a second time: the same object comes back with the same
    modules and tensors and the same output, the summary and the log say there was
    nothing to do (and name what stays as it is), and no warning is raised (no
    torch.fx fallback)."""
    modules = dict(model.named_modules())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 16, 16, device=DEVICE)
    model.eval()
    with torch.no_grad():
        before = model(x)
    with warnings.catch_warnings(), caplog.at_level(logging.INFO, logger="wsbcn"):
        warnings.simplefilter("error")
        again, summary = wsbcn.convert(model, return_summary=True)
    assert again is model and dict(model.named_modules()) == modules
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(x), before)
    assert summary[0].startswith("nothing to convert") and all("left alone" in line for line in summary[1:])
    assert f"already converted: {expected_counts[0]} WSConv and {expected_counts[1]} wsbcn norm layers" in summary[0]
    assert [r.getMessage() for r in caplog.records] == [f"wsbcn.convert: {line}" for line in summary]
    assert all(r.levelno == logging.INFO for r in caplog.records)


def test_converting_a_converted_resnet50_again_is_a_noop_that_says_so(caplog):
    """The README's two convert lines, one after the other."""
    torch.manual_seed(10)
    model = wsbcn.convert(resnet50("plain_bn", num_classes=10).to(DEVICE))
    assert type(model.relu) is nn.Identity  # the stem's activation was fused
    _converting_again_changes_nothing(model, caplog, (53, 53))


def test_converting_again_traces_through_wsbcn_layers(caplog):
    """A plain conv that feeds no norm stays: the second call must trace the model,
    wsbcn layers included, and find nothing to do but name that conv."""
    torch.manual_seed(11)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.SiLU())
    model = wsbcn.convert(model, num_groups=4)
    _converting_again_changes_nothing(model, caplog, (1, 1))


def test_converting_an_untraceable_model_again_does_not_warn(caplog):
    with pytest.warns(UserWarning, match="module order"):
        model = wsbcn.convert(Untraceable(), num_groups=4)
    _converting_again_changes_nothing(model, caplog, (1, 1))


def test_ws_false_then_ws_true_standardizes_the_convs_feeding_wsbcn_norms():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    weight = model[0].weight
    bcn_only, first = wsbcn.convert(model, num_groups=4, ws=False, return_summary=True)
    assert type(bcn_only.get_submodule("0")) is nn.Conv2d
    assert "0: Conv2d left alone: ws=False" in first
    norm_layer = bcn_only.get_submodule("1")
    both, summary = wsbcn.convert(bcn_only, num_groups=4, return_summary=True)
    assert summary == ["0: Conv2d -> WSConv2d",
                       "3: Conv2d left alone: its output feeds no norm (WS without a norm after it hurts training)"]
    assert type(both.get_submodule("0")) is wsbcn.WSConv2d and both.get_submodule("0").weight is weight
    assert both.get_submodule("1") is norm_layer  # the wsbcn norm is kept, not rebuilt
    assert type(both.get_submodule("3")) is nn.Conv2d  # feeds no norm


@pytest.mark.parametrize("norm", ["bcn", "gn"])
def test_num_groups_that_do_not_divide_the_channels_are_reported(caplog, norm):
    torch.manual_seed(12)
    model = nn.Sequential(nn.Conv2d(3, 48, 1), nn.BatchNorm2d(48), nn.Conv2d(48, 64, 1), nn.BatchNorm2d(64))
    with caplog.at_level(logging.INFO, logger="wsbcn"):
        out, summary = wsbcn.convert(model, norm=norm, num_groups=32, return_summary=True)
    assert out[1].num_groups == 16 and out[3].num_groups == 32
    note = "1: num_groups=32 does not divide its 48 channels; it has 16 groups (the greatest common divisor)"
    assert note in summary and sum("does not divide" in line for line in summary) == 1
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warned == [f"wsbcn.convert: {note}"]
    # the layer does normalize over 16 groups of 3 channels
    x = torch.randn(2, 48, 4, 4, device=DEVICE)
    out[1].eval()
    with torch.no_grad():
        got = out[1](x)
    if norm == "gn":
        expected = gn_reference(x, 16, out[1].weight, out[1].bias)
    else:
        expected = bcn_reference(x, 16, out[1].weight, out[1].bias, out[1].group_weight, out[1].group_bias,
                                 out[1].running_mean.double(), out[1].running_var.double(), training=False)
    assert rel_err(got, expected) <= 1e-5


# ---------------------------------------------------------------------------------------
# Stand-ins for torchvision's and timm's layers: the same buffers, parameters and forward
# (torchvision/ops/misc.py, timm/layers/norm_act.py and std_conv.py), under the same
# module and class names, which is how convert recognizes them.


@named_as("torchvision.ops.misc.FrozenBatchNorm2d")
class _FrozenBatchNorm2d(nn.Module):
    def __init__(self, num_features, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x):
        w, b = self.weight.reshape(1, -1, 1, 1), self.bias.reshape(1, -1, 1, 1)
        rv, rm = self.running_var.reshape(1, -1, 1, 1), self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        return x * scale + (b - rm * scale)


def _drop_act(module, act_layer, drop_layer, apply_act):
    module.drop = drop_layer() if drop_layer is not None else nn.Identity()
    module.act = nn.Identity()
    if apply_act and act_layer is not None:
        try:  # as timm's create_act_layer: inplace where the activation has it
            module.act = act_layer(inplace=True)
        except TypeError:
            module.act = act_layer()


@named_as("timm.layers.norm_act.BatchNormAct2d")
class _BatchNormAct2d(nn.BatchNorm2d):
    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 apply_act=True, act_layer=nn.ReLU, drop_layer=None):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats)
        _drop_act(self, act_layer, drop_layer, apply_act)

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


@named_as("timm.layers.norm_act.GroupNormAct")
class _GroupNormAct(nn.GroupNorm):
    def __init__(self, num_channels, num_groups=32, eps=1e-5, affine=True, apply_act=True, act_layer=nn.ReLU,
                 drop_layer=None):
        super().__init__(num_groups, num_channels, eps=eps, affine=affine)
        _drop_act(self, act_layer, drop_layer, apply_act)

    def forward(self, x):
        x = F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return self.act(self.drop(x))


@named_as("timm.layers.std_conv.StdConv2d")
class _StdConv2d(nn.Conv2d):
    def __init__(self, in_channel, out_channels, kernel_size, stride=1, padding=None, dilation=1, groups=1,
                 bias=False, eps=1e-6):
        padding = ((stride - 1) + dilation * (kernel_size - 1)) // 2 if padding is None else padding
        super().__init__(in_channel, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation,
                         groups=groups, bias=bias)
        self.eps = eps

    def forward(self, x):
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True,
                              momentum=0., eps=self.eps).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


@named_as("timm.layers.std_conv.ScaledStdConv2d")
class _ScaledStdConv2d(nn.Conv2d):
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=None, dilation=1, groups=1,
                 bias=True, gamma=1.0, eps=1e-6, gain_init=1.0):
        padding = ((stride - 1) + dilation * (kernel_size - 1)) // 2 if padding is None else padding
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, groups=groups, bias=bias)
        self.scale = gamma * self.weight[0].numel() ** -0.5
        self.eps = eps
        self.gain = nn.Parameter(torch.full((out_channels, 1, 1, 1), gain_init))

    def forward(self, x):
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                              weight=(self.gain * self.scale).view(-1), training=True, momentum=0.,
                              eps=self.eps).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


@named_as("torchvision.models.video.resnet.Conv3DSimple")
class _Conv3DSimple(nn.Conv3d):
    def __init__(self, in_planes, out_planes, midplanes=None, stride=1, padding=1):
        super().__init__(in_planes, out_planes, kernel_size=(3, 3, 3), stride=stride, padding=padding, bias=False)


@named_as("torchvision.models.video.resnet.Conv3DNoTemporal")
class _Conv3DNoTemporal(nn.Conv3d):
    def __init__(self, in_planes, out_planes, midplanes=None, stride=1, padding=1):
        super().__init__(in_planes, out_planes, kernel_size=(1, 3, 3), stride=(1, stride, stride),
                         padding=(0, padding, padding), bias=False)


@named_as("timm.layers.norm.GroupNorm")
class _TimmGroupNorm(nn.GroupNorm):
    def __init__(self, num_channels, num_groups=32, eps=1e-5, affine=True):
        super().__init__(num_groups, num_channels, eps=eps, affine=affine)

    def forward(self, x):
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


@named_as("timm.layers.norm.GroupNorm1")
class _GroupNorm1(nn.GroupNorm):
    def __init__(self, num_channels, **kwargs):
        super().__init__(1, num_channels, **kwargs)

    def forward(self, x):
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


@named_as("timm.layers.norm_act.GroupNorm1Act")
class _GroupNorm1Act(_GroupNormAct):  # timm's is an nn.GroupNorm of its own, with GroupNormAct's forward
    def __init__(self, num_channels, eps=1e-5, affine=True, apply_act=True, act_layer=nn.ReLU, drop_layer=None):
        super().__init__(num_channels, 1, eps, affine, apply_act, act_layer, drop_layer)


@named_as("timm.layers.norm_act.SyncBatchNormAct")
class _SyncBatchNormAct(nn.SyncBatchNorm):
    """Made by timm's convert_sync_batchnorm, which then sets drop and act."""

    def forward(self, x):
        x = super().forward(x)
        if hasattr(self, "drop"):
            x = self.drop(x)
        if hasattr(self, "act"):
            x = self.act(x)
        return x


STAND_INS = types.SimpleNamespace(FrozenBatchNorm2d=_FrozenBatchNorm2d, BatchNormAct2d=_BatchNormAct2d,
                                  GroupNormAct=_GroupNormAct, StdConv2d=_StdConv2d, ScaledStdConv2d=_ScaledStdConv2d,
                                  Conv3DSimple=_Conv3DSimple, Conv3DNoTemporal=_Conv3DNoTemporal,
                                  GroupNorm=_TimmGroupNorm, GroupNorm1=_GroupNorm1, GroupNorm1Act=_GroupNorm1Act,
                                  SyncBatchNormAct=_SyncBatchNormAct)


@pytest.fixture(params=["stand-in", "real"])
def layers(request):
    """The layer classes: stand-ins always; torchvision's and timm's own when importable."""
    if request.param == "stand-in":
        return STAND_INS
    _, misc, video, timm_layers, timm_norm_act = import_or_skip(
        "torchvision", "torchvision.ops.misc", "torchvision.models.video.resnet", "timm.layers", "timm.layers.norm_act")
    return types.SimpleNamespace(FrozenBatchNorm2d=misc.FrozenBatchNorm2d, BatchNormAct2d=timm_layers.BatchNormAct2d,
                                 GroupNormAct=timm_layers.GroupNormAct, StdConv2d=timm_layers.StdConv2d,
                                 ScaledStdConv2d=timm_layers.ScaledStdConv2d, Conv3DSimple=video.Conv3DSimple,
                                 Conv3DNoTemporal=video.Conv3DNoTemporal, GroupNorm=timm_layers.GroupNorm,
                                 GroupNorm1=timm_layers.GroupNorm1, GroupNorm1Act=timm_layers.GroupNorm1Act,
                                 SyncBatchNormAct=timm_norm_act.SyncBatchNormAct)


# ---------------------------------------------------------------------------------------
# FrozenBatchNorm2d


@pytest.mark.parametrize("norm", ["bcn", "gn"])
def test_frozen_batch_norm_becomes_a_norm_whose_bn_stage_is_the_frozen_layer(layers, norm):
    torch.manual_seed(20)
    frozen = randomize(layers.FrozenBatchNorm2d(8, eps=1e-4)).double()
    model = nn.Sequential(nn.Conv2d(3, 8, 3), frozen, nn.ReLU()).double()
    original = copy.deepcopy(model)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    out, summary = wsbcn.convert(model, norm=norm, num_groups=4, return_summary=True)
    new = out.get_submodule("1")
    assert type(out.get_submodule("0")) is wsbcn.WSConv2d
    assert type(new) is (wsbcn.BatchChannelNorm2d if norm == "bcn" else wsbcn.GroupNorm)
    assert new.activation == "relu" and "1: fused the following relu" in summary
    assert new.eps == frozen.eps and new.weight.requires_grad and isinstance(new.weight, nn.Parameter)
    assert torch.equal(new.weight, frozen.weight) and torch.equal(new.bias, frozen.bias)
    if norm == "bcn":
        # the BN stage, right after conversion, in eval: the frozen layer, exactly
        assert torch.equal(new.running_mean, frozen.running_mean) and torch.equal(new.running_var, frozen.running_var)
        h = torch.randn(2, 8, 5, 5, dtype=torch.float64)
        bn_stage = (h - new.running_mean.view(1, -1, 1, 1)) / torch.sqrt(new.running_var.view(1, -1, 1, 1) + new.eps)
        bn_stage = bn_stage * new.weight.view(1, -1, 1, 1) + new.bias.view(1, -1, 1, 1)
        assert rel_err(bn_stage, frozen(h)) <= 1e-14
    assert matches_reference(original, out, x)
    train_step(out, x)
    assert new.weight.grad is not None  # the frozen affine now trains


def test_keep_frozen_leaves_frozen_layers_and_their_convs_and_says_why(layers, caplog):
    torch.manual_seed(21)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), layers.FrozenBatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    frozen, conv = model[1], model[0]
    with caplog.at_level(logging.INFO, logger="wsbcn"):
        out, summary = wsbcn.convert(model, num_groups=4, keep_frozen=True, return_summary=True)
    assert out is model and type(out.get_submodule("5")) is nn.Identity  # the second ReLU was fused
    # the frozen layer is still a module of its own type
    assert out.get_submodule("1") is frozen and out.get_submodule("0") is conv
    assert type(out.get_submodule("3")) is wsbcn.WSConv2d
    assert "1: FrozenBatchNorm2d left alone: kept frozen (keep_frozen=True)" in summary
    assert ("0: Conv2d left alone: feeds 1 (FrozenBatchNorm2d), kept frozen (keep_frozen=True): a standardized "
            "weight would change what that layer's fixed statistics see") in summary
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert out(torch.randn(2, 3, 8, 8)).shape == (2, 8, 4, 4)


def test_frozen_layer_in_an_untraceable_model_is_converted_by_module_order():
    model = Untraceable(randomize(_FrozenBatchNorm2d(8)))
    with pytest.warns(UserWarning, match="module order"):
        out = wsbcn.convert(model, num_groups=4)
    assert type(out.conv) is wsbcn.WSConv2d and type(out.bn) is wsbcn.BatchChannelNorm2d


# ---------------------------------------------------------------------------------------
# timm


def test_std_convs_become_ws_convs_with_the_same_output(layers):
    torch.manual_seed(22)
    std = layers.StdConv2d(4, 6, 3, eps=1e-8)
    scaled = randomize(layers.ScaledStdConv2d(6, 8, 3, stride=2, gamma=1.7, eps=1e-5))
    model = nn.Sequential(std, nn.ReLU(), scaled).double()  # no norm after them: converted all the same
    original, keys = copy.deepcopy(model), model.state_dict().keys()
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        before = model(x)
    out, summary = wsbcn.convert(model, return_summary=True)
    assert type(out[0]) is wsbcn.WSConv2d and type(out[2]) is ScaledWSConv2d
    assert (out[0].eps, out[0].correction, out[0].eps_mode) == (1e-8, 0, "var")
    assert out[2].gain is scaled.gain and out[2].scale == scaled.scale and out[2].eps == 1e-5
    assert out.state_dict().keys() == keys  # timm checkpoints still load
    with torch.no_grad():
        assert rel_err(out(x), before) <= 1e-13
    assert summary == ["0: StdConv2d -> WSConv2d", "2: ScaledStdConv2d -> ScaledWSConv2d"]
    assert matches_reference(original, out, x)
    _, ws_off = wsbcn.convert(nn.Sequential(layers.StdConv2d(4, 6, 3)), ws=False, return_summary=True)
    assert "0: StdConv2d left alone: ws=False" in ws_off


def test_norm_act_layers_fuse_their_activation_and_keep_the_rest(layers):
    torch.manual_seed(23)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), layers.BatchNormAct2d(8),                                   # ReLU: fused
        nn.Conv2d(8, 8, 1), layers.GroupNormAct(8, num_groups=4, act_layer=nn.GELU),  # GELU: kept after
        nn.Conv2d(8, 8, 1), layers.BatchNormAct2d(8, act_layer=nn.SiLU,              # a drop before SiLU
                                                  drop_layer=functools.partial(nn.Dropout, 0.5)),
        nn.Conv2d(8, 8, 1), layers.BatchNormAct2d(8, apply_act=False), nn.SiLU(),      # the next SiLU fuses
    ).double()
    randomize(model)
    original = copy.deepcopy(model)
    drop = model[5].drop
    out, summary = wsbcn.convert(model, num_groups=4, return_summary=True)
    assert [type(out.get_submodule(str(i))) for i in (0, 2, 4, 6)] == [wsbcn.WSConv2d] * 4
    assert type(out.get_submodule("1")) is wsbcn.BatchChannelNorm2d and out.get_submodule("1").activation == "relu"
    gn_act = out.get_submodule("3")
    assert type(gn_act) is NormAct and type(gn_act.act) is nn.GELU and gn_act.norm.activation is None
    assert gn_act.norm.num_groups == 4 and torch.equal(gn_act.norm.group_weight.reshape(-1), original[3].weight)
    dropped = out.get_submodule("5")
    assert type(dropped) is NormAct and dropped.drop is drop and type(dropped.act) is nn.SiLU
    assert out.get_submodule("7").activation == "silu" and "7: fused the following silu" in summary
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    assert matches_reference(original, out, x)
    train_step(out, x)
    # the second convert finds everything converted (NormAct counts as a wsbcn norm)
    again, summary = wsbcn.convert(out, return_summary=True)
    assert summary == ["nothing to convert: no norm layer with a convert rule, and no convolution feeding a norm "
                       "(already converted: 4 WSConv and 4 wsbcn norm layers)"]


def _without_bias(gn):
    """nn.GroupNorm(..., bias=False) where torch has the argument (2.13), the same layer before."""
    gn.bias = None
    return gn


@pytest.mark.parametrize("norm", ["bcn", "gn"])
def test_a_checkpoint_of_the_source_model_loads_after_convert_as_before_it(layers, norm):
    """Convert, then load the unconverted model's state dict (strict=False: the new
    layers' keys that the source lacks are missing, and stay as convert made them): the
    same model as load, then convert. A GroupNorm's affine lands in the BCN's channel
    stage (it landed in the BN stage, which the channel stage normalizes away), a timm
    norm+act layer kept with its activation (NormAct) takes its source's keys. The
    converted model's own state dicts, whole or partial, load as ever."""
    def source():
        batch_norms = [nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1), layers.FrozenBatchNorm2d(8),
                       nn.Conv2d(8, 8, 1), layers.BatchNormAct2d(8, act_layer=nn.SiLU,
                                                                 drop_layer=functools.partial(nn.Dropout, 0.0))]
        return nn.Sequential(
            nn.Conv2d(3, 8, 3), nn.GroupNorm(4, 8), nn.ReLU(),
            nn.Conv2d(8, 8, 1), _without_bias(nn.GroupNorm(2, 8)),
            nn.Conv2d(8, 8, 1), layers.GroupNormAct(8, num_groups=4, act_layer=nn.GELU),
            *(batch_norms if norm == "bcn" else [])).double()

    torch.manual_seed(25)
    checkpoint = randomize(source()).state_dict()
    loaded_first = source()
    loaded_first.load_state_dict(checkpoint)
    loaded_first = wsbcn.convert(loaded_first, norm=norm, num_groups=2)
    loaded_after = wsbcn.convert(source(), norm=norm, num_groups=2)
    assert isinstance(loaded_after[6], NormAct) and (norm == "gn" or isinstance(loaded_after[12], NormAct))
    result = loaded_after.load_state_dict(checkpoint, strict=False)
    assert not result.unexpected_keys
    missing = set(result.missing_keys)
    if norm == "bcn":  # the channel stage came from the GroupNorms, the BN stage from the BatchNorms
        assert {"1.running_mean", "4.weight", "6.norm.bias", "8.group_weight", "12.norm.group_bias"} <= missing
        loaded = {"1.group_weight", "4.group_weight", "6.norm.group_bias", "8.weight", "12.norm.running_var"}
        assert not loaded & missing
    else:
        assert not missing
    expected = loaded_first.state_dict()
    assert list(loaded_after.state_dict()) == list(expected)
    for key, value in loaded_after.state_dict().items():
        assert torch.equal(value, expected[key]), key
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    for mode in (True, False):
        assert torch.equal(loaded_after.train(mode)(x), loaded_first.train(mode)(x))
    # the converted model's own state dict, whole or any part of it, loads as ever
    with torch.no_grad():  # (a BN stage that trained: not the values a fresh layer has)
        loaded_after[1].weight.uniform_(0.5, 1.5)
    own = loaded_after.state_dict()
    bn_stage_affine = type(own)((k, v) for k, v in own.items() if k.endswith((".weight", ".bias")) and "group" not in k)
    bn_stage_affine._metadata = own._metadata  # its metadata says BatchChannelNorm: not a GroupNorm's dict
    for part in (own, {k: v for k, v in own.items() if "running" in k or "num_batches" in k},
                 dict(loaded_after.named_parameters()), bn_stage_affine):
        again = wsbcn.convert(source(), norm=norm, num_groups=2)
        again.load_state_dict(part, strict=part is own)
        for key, value in again.state_dict().items():
            if key in part:
                assert torch.equal(value, part[key]), key


def test_group_norm_act_as_gn_computes_what_timm_does(layers):
    torch.manual_seed(24)
    model = randomize(nn.Sequential(layers.StdConv2d(3, 8, 3), layers.GroupNormAct(8, num_groups=4),
                                     layers.StdConv2d(8, 8, 3), layers.GroupNormAct(8, num_groups=2,
                                                                                     act_layer=nn.SiLU))).double()
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        before = model(x)
    out = wsbcn.convert(model, norm="gn")
    assert [getattr(m, "activation", None) for m in out if isinstance(m, wsbcn.GroupNorm)] == ["relu", "silu"]
    with torch.no_grad():
        assert rel_err(out(x), before) <= 1e-13


def test_timm_group_norms_keep_their_groups_and_compute_what_timm_does(layers):
    """timm's GroupNorm (channels first), GroupNorm1 and GroupNorm1Act (one group): as
    wsbcn GroupNorms, timm's output; as BCN, the float64 reference."""
    torch.manual_seed(25)
    model = randomize(nn.Sequential(
        nn.Conv2d(3, 8, 3), layers.GroupNorm(8, num_groups=4), nn.ReLU(),
        nn.Conv2d(8, 8, 1), layers.GroupNorm1(8),
        nn.Conv2d(8, 8, 1), layers.GroupNorm1Act(8, act_layer=nn.SiLU))).double()
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        before = model(x)
    original = copy.deepcopy(model)
    gn, summary = wsbcn.convert(copy.deepcopy(model), norm="gn", ws=False, return_summary=True)
    norms = [m for m in gn.modules() if isinstance(m, wsbcn.GroupNorm)]
    assert [(m.num_groups, m.activation) for m in norms] == [(4, "relu"), (1, None), (1, "silu")]
    assert not [line for line in summary if "GroupNorm" in line and "left alone" in line]
    with torch.no_grad():
        assert rel_err(gn(x), before) <= 1e-13
    bcn = wsbcn.convert(model, num_groups=4)
    assert [(m.num_groups, m.group_affine) for m in bcn.modules() if isinstance(m, wsbcn.BatchChannelNorm2d)] == [
        (4, False), (1, False), (1, False)]
    assert matches_reference(original, bcn, x)
    train_step(bcn, x)


def test_timm_sync_batch_norm_act_keeps_synchronizing_and_fuses_its_act(layers):
    """timm's convert_sync_batchnorm of a BatchNormAct2d: a SyncBatchNormAct with drop and
    act set after it is made. It becomes a BCN over the default group, as nn.SyncBatchNorm
    does (tests/test_distributed.py runs one across processes), its ReLU fused; without
    drop and act (made directly) it is the norm alone."""
    from wsbcn.ops.collectives import WORLD

    torch.manual_seed(26)
    synced = layers.SyncBatchNormAct(8, 1e-4, 0.2, True, True)
    synced.act, synced.drop = nn.ReLU(inplace=True), nn.Identity()
    bare = layers.SyncBatchNormAct(8)
    model = randomize(nn.Sequential(nn.Conv2d(3, 8, 3), synced, nn.Conv2d(8, 8, 1), bare, nn.SiLU())).double()
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    out, summary = wsbcn.convert(model, num_groups=4, return_summary=True)
    first, second = out[1], out[3]
    assert type(first) is wsbcn.BatchChannelNorm2d and type(second) is wsbcn.BatchChannelNorm2d
    assert first.process_group is WORLD and second.process_group is WORLD
    assert (first.activation, first.eps, first.momentum) == ("relu", 1e-4, 0.2)
    assert second.activation == "silu" and "3: fused the following silu" in summary  # nothing of its own after it
    reference = copy.deepcopy(out)  # eval: each BCN against the float64 reference
    reference.eval()
    with torch.no_grad():
        h = reference[0](x)
        want = bcn_reference(h, 4, first.weight, first.bias, first.group_weight, first.group_bias,
                             first.running_mean.double().clone(), first.running_var.double().clone(), training=False,
                             eps=first.eps).relu()
        assert rel_err(reference[1](h), want) <= 1e-10
    train_step(out, x)  # torch.distributed is not initialized: the default group combines nothing


def test_video_resnet_convs_become_ws_convs(layers):
    """torchvision's video ResNets build their convs as Conv3DSimple / Conv3DNoTemporal,
    nn.Conv3d with a fixed geometry: WSConv3d with that geometry and the same Parameters."""
    torch.manual_seed(27)
    model = randomize(nn.Sequential(layers.Conv3DSimple(3, 8, stride=2), nn.BatchNorm3d(8), nn.ReLU(),
                                     layers.Conv3DNoTemporal(8, 8), nn.BatchNorm3d(8))).double()
    weights = [model[0].weight, model[3].weight]
    geometry = [(m.kernel_size, m.stride, m.padding) for m in (model[0], model[3])]
    original = copy.deepcopy(model)
    x = torch.randn(2, 3, 4, 9, 9, dtype=torch.float64)
    out, summary = wsbcn.convert(model, num_groups=4, return_summary=True)
    assert [type(out[i]) for i in (0, 1, 3, 4)] == [wsbcn.WSConv3d, wsbcn.BatchChannelNorm3d] * 2
    assert [out[0].weight, out[3].weight] == weights and out[0].weight is weights[0]
    assert [(m.kernel_size, m.stride, m.padding) for m in (out[0], out[3])] == geometry
    assert "0: Conv3DSimple -> WSConv3d" in summary and "3: Conv3DNoTemporal -> WSConv3d" in summary
    assert matches_reference(original, out, x)
    train_step(out, x)


def test_torchvision_video_resnets():
    (video,) = import_or_skip("torchvision.models.video")
    for build in (video.r3d_18, video.mc3_18, video.r2plus1d_18):
        model = wsbcn.convert(build(num_classes=10), num_groups=8)
        convs = [m for m in model.modules() if isinstance(m, nn.Conv3d)]
        assert convs and all(type(m) is wsbcn.WSConv3d for m in convs), build.__name__
        assert _count(model, nn.BatchNorm3d) == 0
        assert model(torch.randn(1, 3, 4, 32, 32)).shape == (1, 10)


# ---------------------------------------------------------------------------------------
# What the summary says about what convert left alone


@named_as("tests.custom.MyNorm")
class _MyNorm(nn.Module):
    """A hand-written norm convert has no rule for."""

    def __init__(self, c):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(c))

    def forward(self, x):
        return x / x.std(dim=(2, 3), keepdim=True) * self.scale.view(1, -1, 1, 1)


def test_layers_without_a_rule_stay_modules_and_are_named(caplog):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), _MyNorm(8), nn.InstanceNorm2d(8), nn.ConvTranspose2d(8, 8, 3),
                          nn.BatchNorm2d(8), nn.ReLU())
    mine = model[1]
    with caplog.at_level(logging.INFO, logger="wsbcn"):
        out, summary = wsbcn.convert(model, num_groups=4, return_summary=True)
    assert out is model and out.get_submodule("1") is mine
    assert "1: MyNorm left alone: no convert rule for MyNorm" in summary
    assert "2: InstanceNorm2d left alone: no convert rule for InstanceNorm2d" in summary
    assert "3: ConvTranspose2d left alone: no convert rule for ConvTranspose2d" in summary
    assert "0: Conv2d left alone: feeds 1 (MyNorm), which is left alone" in summary
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 3 and all("left alone: no convert rule for" in w for w in warned)
    # a conv without a rule that feeds no norm would stay with a rule too: said so, no warning
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="wsbcn"):
        _, summary = wsbcn.convert(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ConvTranspose2d(8, 4, 2)),
                                   num_groups=4, return_summary=True)
    assert "2: ConvTranspose2d left alone: its output feeds no norm (WS without a norm after it hurts training)" in \
        summary and not [r for r in caplog.records if r.levelno >= logging.WARNING]
    sub = type("SubBatchNorm", (nn.BatchNorm2d,), {})
    _, summary = wsbcn.convert(nn.Sequential(nn.Conv2d(3, 4, 1), sub(4)), return_summary=True)
    assert ("1: SubBatchNorm left alone: no convert rule for SubBatchNorm (a subclass of BatchNorm2d: its forward "
            "may differ; register it if it computes the same)") in summary


class _ZeroInitResidual(nn.Module):
    """A residual block whose last BatchNorm scale is zero (torchvision's zero_init_residual,
    timm's zero_init_last): the block starts as the identity."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        nn.init.zeros_(self.bn.weight)

    def forward(self, x):
        return x + self.bn(self.conv(x))


def test_a_zero_initialised_residual_scale_goes_to_the_channel_stage(caplog):
    """A zero BN scale as a BCN's BN-stage scale feeds the channel stage a constant, which
    it divides by sqrt(eps): the block's first gradients are then ~1/sqrt(eps) times
    BatchNorm's and one step undoes the zero init. convert puts the zero on group_weight
    (the BN stage's scale 1, a new Parameter; the source layer's is left as it was): the
    block starts as the identity and, as with BatchNorm, only the last affine gets a
    gradient (float64 reference); the summary says so."""
    torch.manual_seed(11)
    block = _ZeroInitResidual()
    zero_scale = block.bn.weight
    x = torch.randn(2, 8, 5, 5)
    with caplog.at_level(logging.INFO, logger="wsbcn"):
        model, summary = wsbcn.convert(block, num_groups=4, return_summary=True)
    assert any(line.startswith("bn: its scale is all zero") for line in summary)
    bcn = model.bn
    assert torch.equal(zero_scale, torch.zeros(8)) and bcn.weight is not zero_scale
    assert torch.equal(bcn.weight, torch.ones(8)) and bcn.weight.requires_grad
    assert torch.equal(bcn.group_weight, torch.zeros(1, 4, 1))
    x = x.requires_grad_(True)
    y = model(x)
    assert torch.equal(y, x)  # the identity, as the BatchNorm block
    g = torch.randn_like(y)
    y.backward(g)
    # float64: the channel stage's input (conv output through the BN stage) and its gradient
    conv = model.conv
    h = conv_nd(x.detach().double(), ws_reference(conv.weight.double()), conv.bias.double(), conv)
    gw = torch.zeros(1, 4, 1, dtype=torch.float64, requires_grad=True)
    ref = bcn_reference(h, 4, bcn.weight.double(), bcn.bias.double(), gw, bcn.group_bias.double())
    ref.backward(g.double())
    assert rel_err(bcn.group_weight.grad, gw.grad) <= TOL[torch.float32]
    assert gw.grad.abs().max() < 1e2  # BatchNorm's scale: O(sum g x_hat), no 1/sqrt(eps)
    for p in (conv.weight, bcn.weight):  # nothing reaches the branch past its zero scale
        assert not p.grad.any()
    assert torch.equal(x.grad, g)


def test_a_model_built_with_zero_initialised_batch_channel_norms_gets_them_moved():
    """A model built with BatchChannelNorm as its norm layer, whose builder zeroed the last
    norm's scale (torchvision's zero_init_residual, timm's zero_init_last: nn.init on
    ``weight``): convert moves that zero to group_weight in place (the same Parameters),
    says so, and standardizes the convs; only the last affine then gets a gradient."""
    torch.manual_seed(15)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, padding=1)
            self.bn = wsbcn.BatchChannelNorm2d(8, num_groups=4)
            nn.init.zeros_(self.bn.weight)  # what the builders' zero init writes

        def forward(self, x):
            return x + self.bn(self.conv(x))

    block = Block()
    weight, group_weight = block.bn.weight, block.bn.group_weight
    model, summary = wsbcn.convert(block, num_groups=4, return_summary=True)
    assert any(line.startswith("bn: its BN-stage scale (weight) was all zero") for line in summary)
    assert isinstance(model.conv, wsbcn.WSConv2d)
    assert model.bn.weight is weight and model.bn.group_weight is group_weight
    assert torch.equal(weight, torch.ones(8)) and torch.equal(group_weight, torch.zeros(1, 4, 1))
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    y = model(x)
    assert torch.equal(y, x)
    y.backward(torch.randn_like(y))
    assert not model.conv.weight.grad.any() and not weight.grad.any() and group_weight.grad.abs().max() < 1e2
    _, again = wsbcn.convert(model, num_groups=4, return_summary=True)  # moved once: nothing more to move
    assert not any("was all zero" in line for line in again)


def test_only_a_trainable_zero_scale_with_a_zero_shift_is_moved():
    """A zero scale with a nonzero shift (a pruned scale: the norm outputs its shift), a
    frozen zero scale (a branch kept dead on purpose), or a BCN whose group_weight is
    frozen or no longer 1: left as they are, so each layer's output is unchanged."""
    torch.manual_seed(16)
    x = torch.randn(2, 8, 5, 5)

    def bcn_model(setup):
        m = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), wsbcn.BatchChannelNorm2d(8, num_groups=4)).eval()
        with torch.no_grad():
            nn.init.zeros_(m[1].weight)
            setup(m[1])
        return m

    cases = {"pruned": lambda b: b.bias.normal_(), "frozen": lambda b: b.weight.requires_grad_(False),
             "frozen channel scale": lambda b: b.group_weight.requires_grad_(False),
             "trained channel scale": lambda b: b.group_weight.fill_(0.5)}
    for name, setup in cases.items():
        model = bcn_model(setup)
        before = {k: v.clone() for k, v in model[1].state_dict().items()}
        y = model[1](model[0](x))
        _, summary = wsbcn.convert(model, num_groups=4, ws=False, return_summary=True)
        assert not any("all zero" in line for line in summary), name
        for k, v in model[1].state_dict().items():
            assert torch.equal(v, before[k]), (name, k)
        assert torch.equal(model(x), y), name
    bn = nn.BatchNorm2d(8)  # the same for a BatchNorm convert replaces
    with torch.no_grad():
        bn.weight.zero_()
        bn.bias.normal_()
    converted = wsbcn.convert(nn.Sequential(nn.Conv2d(8, 8, 3), bn), num_groups=4)
    assert torch.equal(converted[1].weight, torch.zeros(8)) and torch.equal(converted[1].group_weight,
                                                                             torch.ones(1, 4, 1))


def test_convert_of_a_fake_model_reads_no_scale():
    """Under FakeTensorMode (a model made for shape propagation) no value can be read:
    convert neither reads nor moves a scale, and converts as before."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        plain = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
        built = nn.Sequential(nn.Conv2d(3, 8, 3), wsbcn.BatchChannelNorm2d(8, num_groups=2))
        for model in (plain, built):
            converted = wsbcn.convert(model, num_groups=2)
            assert [type(m) for m in converted] == [wsbcn.WSConv2d, wsbcn.BatchChannelNorm2d]


def test_batch_channel_norm_takes_batch_norm_s_num_features():
    """Model builders may pass nn.BatchNorm's keyword, num_features; tools read it back."""
    m = wsbcn.BatchChannelNorm2d(num_features=8, num_groups=4)
    assert m.num_channels == m.num_features == 8 and m.weight.shape == (8,)
    with pytest.raises(TypeError, match="num_channels .* one of them"):
        wsbcn.BatchChannelNorm2d(8, num_features=8)


def test_a_batch_norm_checkpoint_loads_after_convert_moved_its_zero_scale():
    """After convert moved a zero scale to the channel stage, a state dict of the source
    BatchNorm (no group_* keys) loads as convert would have converted it: a trained scale
    goes to the BN stage with group_weight back at 1 (bitwise a conversion of the trained
    model), a zero one stays moved; a BatchChannelNorm's own state dict loads as it is."""
    torch.manual_seed(12)
    block = _ZeroInitResidual()
    trained = copy.deepcopy(block)
    nn.init.uniform_(trained.bn.weight, 0.5, 1.5)
    trained_state = copy.deepcopy(trained.state_dict())
    zero_state = copy.deepcopy(block.state_dict())
    model = wsbcn.convert(block, num_groups=4)
    own = copy.deepcopy(model.state_dict())
    missing = model.load_state_dict(trained_state, strict=False).missing_keys
    assert sorted(missing) == ["bn.group_bias", "bn.group_weight"]
    expected = wsbcn.convert(trained, num_groups=4)
    x = torch.randn(2, 8, 5, 5)
    assert torch.equal(model.bn.weight, trained_state["bn.weight"])
    assert torch.equal(model.bn.group_weight, torch.ones(1, 4, 1))
    assert torch.equal(model(x), expected(x))
    with torch.no_grad():
        model.bn.group_weight.fill_(0.7)  # trained since
    model.load_state_dict(zero_state, strict=False)  # the zero-initialised one again: moved again
    assert torch.equal(model.bn.weight, torch.ones(8)) and torch.equal(model.bn.group_weight, torch.zeros(1, 4, 1))
    model.load_state_dict(own)  # its own state dict: as it is
    assert torch.equal(model.bn.group_weight, torch.zeros(1, 4, 1))
    torch.manual_seed(12)
    moved = wsbcn.convert(_ZeroInitResidual(), num_groups=4)
    moved.load_state_dict(zero_state, strict=False)
    assert torch.equal(moved.bn.weight, torch.ones(8)) and torch.equal(moved.bn.group_weight, torch.zeros(1, 4, 1))
    assert torch.equal(moved(x), x)


def test_batch_norm_without_running_stats_keeps_batch_statistics_in_eval(monkeypatch):
    """BatchNorm2d(track_running_stats=False) normalizes with batch statistics in eval:
    its BCN does too (it would otherwise start using running estimates it never had);
    estimate=True, which needs them, is refused naming the layer, the model unchanged."""
    monkeypatch.setenv("WSBCN_BACKEND", "torch")
    torch.manual_seed(5)
    plain = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, track_running_stats=False), nn.ReLU())
    with pytest.raises(ValueError, match="needs track_running_stats=True") as info:
        wsbcn.convert(plain, num_groups=4, estimate=True)
    assert "layer '1'" in " ".join(getattr(info.value, "__notes__", []))
    assert type(plain[1]) is nn.BatchNorm2d
    model = wsbcn.convert(plain, num_groups=4).eval()
    bcn = next(m for m in model.modules() if isinstance(m, wsbcn.BatchChannelNorm2d))
    assert not bcn.track_running_stats and bcn.running_mean is None
    x = torch.randn(2, 3, 6, 6)
    conv = next(m for m in model.modules() if isinstance(m, wsbcn.WSConv2d))
    h = conv_nd(x.double(), ws_reference(conv.weight.double()), conv.bias.double(), conv)
    ref = bcn_reference(h, 4, bcn.weight.double(), bcn.bias.double(), bcn.group_weight.double(),
                        bcn.group_bias.double(), training=True, activation="relu")
    with torch.no_grad():
        assert rel_err(model(x), ref) <= TOL[torch.float32]


def test_a_batch_norm_switched_off_after_construction_converts_as_it_runs():
    """track_running_stats set to False after construction: BatchNorm keeps its buffers,
    uses batch statistics in training without updating them, and the buffers in eval. The
    BCN keeps the buffers and the flag, which it reads on every call; estimate=True, which
    needs them updated, is refused naming the layer, the model unchanged."""
    torch.manual_seed(7)
    plain = randomize(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)))
    plain[1].track_running_stats = False
    with pytest.raises(ValueError, match=r"needs track_running_stats=True \(set to False after construction\)") as info:
        wsbcn.convert(plain, num_groups=4, estimate=True)
    assert "layer '1'" in " ".join(getattr(info.value, "__notes__", [])) and type(plain[1]) is nn.BatchNorm2d
    rm, rv = plain[1].running_mean.clone(), plain[1].running_var.clone()
    model = wsbcn.convert(plain, num_groups=4)
    bcn, conv = model[1], model[0]
    assert not bcn.track_running_stats and torch.equal(bcn.running_mean, rm) and torch.equal(bcn.running_var, rv)
    x = torch.randn(2, 3, 6, 6)
    h = conv_nd(x.double(), ws_reference(conv.weight.double()), conv.bias.double(), conv)
    affine = (bcn.weight.double(), bcn.bias.double(), bcn.group_weight.double(), bcn.group_bias.double())
    with torch.no_grad():
        assert rel_err(model.train()(x), bcn_reference(h, 4, *affine, training=True)) <= TOL[torch.float32]
        assert torch.equal(bcn.running_mean, rm) and int(bcn.num_batches_tracked) == 0  # as BatchNorm: untouched
        want = bcn_reference(h, 4, *affine, rm.double(), rv.double(), training=False)
        assert rel_err(model.eval()(x), want) <= TOL[torch.float32]


def test_a_sync_batch_norm_without_running_stats_is_left_alone():
    """nn.SyncBatchNorm(track_running_stats=False) synchronizes batch statistics without
    running ones; a BatchChannelNorm combining statistics across processes updates them,
    so the layer (and the conv feeding it) is left alone with the reason, and the rest of
    the model converts. A plain BatchNorm without them, asked to synchronize
    (``process_group=``), is refused naming the layer, the model unchanged, as for
    ``estimate=True``."""
    sync = nn.Sequential(nn.Conv2d(3, 8, 3), nn.SyncBatchNorm(8, track_running_stats=False), nn.ReLU(),
                         nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    model, summary = wsbcn.convert(sync, num_groups=4, return_summary=True)
    assert type(model[1]) is nn.SyncBatchNorm and type(model[0]) is nn.Conv2d
    assert isinstance(model[4], wsbcn.BatchChannelNorm2d) and isinstance(model[3], wsbcn.WSConv2d)
    assert ("1: SyncBatchNorm left alone: it keeps no running statistics (track_running_stats=False), which a "
            "BatchChannelNorm combining statistics across processes updates") in summary
    assert "0: Conv2d left alone: feeds 1 (SyncBatchNorm), which is left alone" in summary
    plain = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, track_running_stats=False))
    with pytest.raises(ValueError, match=r"process_group .* needs track_running_stats=True") as info:
        wsbcn.convert(plain, num_groups=4, process_group=stand_in_group())
    assert "layer '1'" in " ".join(getattr(info.value, "__notes__", [])) and type(plain[1]) is nn.BatchNorm2d


def test_replaced_layers_are_freed_when_convert_returns():
    """Nothing convert keeps holds the layers it replaced: they are freed by reference
    counting when convert returns (a recursive walk's closure once kept them in a
    cycle until the cyclic collector ran: their memory, a GPU's too, stayed)."""
    import gc
    import weakref

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Sequential(nn.Conv2d(8, 8, 3),
                                                                                          nn.BatchNorm2d(8)))
    old = [weakref.ref(m) for m in (model[0], model[1], model[2], model[3][0], model[3][1])]
    enabled = gc.isenabled()
    gc.disable()
    try:
        wsbcn.convert(model, num_groups=4)
        assert [r() is None for r in old] == [True] * len(old)
    finally:
        if enabled:
            gc.enable()


def test_a_layer_registered_at_two_paths_is_replaced_at_both():
    """A norm shared by two branches, and a conv tied at two attributes: one new layer,
    still shared, at every path."""
    class SharedNorm(nn.Module):
        def __init__(self):
            super().__init__()
            bn = nn.BatchNorm2d(8)
            self.a, self.b = nn.Sequential(nn.Conv2d(8, 8, 1), bn), nn.Sequential(nn.Conv2d(8, 8, 1), bn)

        def forward(self, x):
            return self.a(x) + self.b(x)

    class TiedConv(nn.Module):
        def __init__(self):
            super().__init__()
            conv = nn.Conv2d(8, 8, 1)
            self.c1, self.b1, self.c2, self.b2 = conv, nn.BatchNorm2d(8), conv, nn.BatchNorm2d(8)

        def forward(self, x):
            return self.b1(self.c1(x)) + self.b2(self.c2(x))

    shared, summary = wsbcn.convert(SharedNorm(), num_groups=4, return_summary=True)
    assert shared.a[1] is shared.b[1] and type(shared.a[1]) is wsbcn.BatchChannelNorm2d
    assert "b.1: the same BatchNorm2d as a.1, replaced there too" in summary
    shared.train()(torch.randn(2, 8, 4, 4))
    assert int(shared.b[1].num_batches_tracked) == 2  # one layer, called twice, as the BatchNorm was
    tied, summary = wsbcn.convert(TiedConv(), num_groups=4, return_summary=True)
    assert tied.c1 is tied.c2 and type(tied.c1) is wsbcn.WSConv2d
    assert "c2: the same Conv2d as c1, replaced there too" in summary


def test_lazy_layers_are_left_alone_until_their_first_forward(monkeypatch, caplog):
    """An uninitialized LazyConv2d / LazyBatchNorm2d has no shapes to convert: the summary
    says to run a forward first, at WARNING (logging's default level shows it); after one
    they are Conv2d / BatchNorm2d and convert."""
    monkeypatch.setenv("WSBCN_BACKEND", "torch")
    model = nn.Sequential(nn.LazyConv2d(8, 3), nn.LazyBatchNorm2d(), nn.ReLU())
    with caplog.at_level(logging.INFO, logger="wsbcn"):
        _, summary = wsbcn.convert(model, num_groups=4, return_summary=True)
    assert ("0: LazyConv2d left alone: LazyConv2d is not initialized yet: run one forward first (it then becomes "
            "Conv2d), then convert") in summary
    lazy = [r for r in caplog.records if "not initialized yet" in r.getMessage()]
    assert len(lazy) == 2 and all(r.levelno == logging.WARNING for r in lazy)
    assert "1: LazyBatchNorm2d left alone: LazyBatchNorm2d is not initialized yet" in " ".join(summary)
    assert not [line for line in summary if "register_convert_rule" in line]  # no rule is missing
    model(torch.randn(2, 3, 6, 6))
    out = wsbcn.convert(model, num_groups=4)
    assert [type(m) for m in out.modules()][1:3] == [wsbcn.WSConv2d, wsbcn.BatchChannelNorm2d]


def test_a_conv_with_a_fan_in_of_1_is_left_alone_and_its_norm_converted():
    """A depthwise 1x1 conv (one weight per filter) would standardize to zeros: convert
    leaves it a plain conv, says why, and converts the norm it feeds, whose output is
    the float64 composition of the plain conv and the BCN."""
    torch.manual_seed(13)
    model = nn.Sequential(nn.Conv2d(4, 4, 1, groups=4), nn.BatchNorm2d(4))
    model, summary = wsbcn.convert(model, num_groups=2, return_summary=True)
    assert type(model[0]) is nn.Conv2d and isinstance(model[1], wsbcn.BatchChannelNorm2d)
    assert "0: Conv2d left alone: its fan-in is 1 (one weight per filter)" in " ".join(summary)
    x = torch.randn(2, 4, 5, 5)
    conv, bcn = model
    h = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), groups=4)
    ref = bcn_reference(h, 2, bcn.weight.double(), bcn.bias.double(), bcn.group_weight.double(),
                        bcn.group_bias.double())
    assert rel_err(model(x), ref) <= TOL[torch.float32]


def test_a_model_that_is_itself_a_layer_is_left_alone_and_the_summary_says_why(caplog):
    bn = nn.BatchNorm2d(8)
    state = {k: v.clone() for k, v in bn.state_dict().items()}
    with caplog.at_level(logging.INFO, logger="wsbcn"):
        out, summary = wsbcn.convert(bn, return_summary=True)
    assert out is bn and type(bn) is nn.BatchNorm2d
    assert all(torch.equal(v, bn.state_dict()[k]) for k, v in state.items())
    assert summary == ["nothing to convert: the model is itself a layer (BatchNorm2d)",
                       "(the model itself): BatchNorm2d left alone: convert swaps the layers inside a model; wrap the "
                       "layer (nn.Sequential(layer)) to convert it"]
    assert [r.levelno for r in caplog.records] == [logging.WARNING] * 2
    # wrapped, it converts
    assert type(wsbcn.convert(nn.Sequential(bn))[0]) is wsbcn.BatchChannelNorm2d
    # a layer without a rule, and a wsbcn layer: wrapping would not convert them, and the line says why
    for layer, why in ((nn.InstanceNorm2d(8), "no convert rule for it"),
                       (wsbcn.BatchChannelNorm2d(8, num_groups=2), "it is a wsbcn layer already")):
        _, summary = wsbcn.convert(layer, return_summary=True)
        name = type(layer).__name__
        assert summary[:2] == [f"nothing to convert: the model is itself a layer ({name})",
                               f"(the model itself): {name} left alone: convert swaps the layers inside a model; {why}"]


def test_a_model_with_nothing_convertible_says_so_at_warning(caplog):
    with caplog.at_level(logging.INFO, logger="wsbcn"):
        _, summary = wsbcn.convert(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)), return_summary=True)
    assert summary[0] == "nothing to convert: 1 conv/norm layer left alone, listed below"
    assert caplog.records[0].levelno == logging.WARNING
    assert "1: LayerNorm left alone: no convert rule for LayerNorm" in summary


class _Scaled(nn.Module):
    """A block holding a parameter of its own besides its layers: kept whole."""

    def __init__(self):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((1,), 0.5))
        self.conv = nn.Conv2d(8, 8, 1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.gamma * self.bn(self.conv(x))


def test_a_block_with_its_own_parameters_is_kept_whole_and_converted_inside():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.ReLU(), _Scaled())
    block = model[3]
    out, summary = wsbcn.convert(model, num_groups=4, return_summary=True)
    assert out.get_submodule("3") is block and type(block.conv) is wsbcn.WSConv2d
    assert type(block.bn) is wsbcn.BatchChannelNorm2d and block.bn.activation is None
    assert any(line.startswith("3: _Scaled kept as one module") for line in summary)
    assert out(torch.randn(2, 3, 4, 4)).shape == (2, 8, 4, 4)


class _Split(nn.Module):
    """A module with a parameter that returns a tuple its caller iterates over (as
    torchvision's FPN does with its LastLevelMaxPool's): as an fx leaf it would make
    tracing fail, so convert traces through it instead."""

    def __init__(self):
        super().__init__()
        self.alpha = nn.Parameter(torch.full((1,), 2.0))

    def forward(self, x):
        return x * self.alpha, x


class _UsesSplit(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.relu, self.split = nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.ReLU(), _Split()

    def forward(self, x):
        return sum(list(self.split(self.relu(self.bn(self.conv(x))))))


def test_a_stateful_module_that_cannot_be_a_leaf_is_traced_through():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no module-order fallback
        out, summary = wsbcn.convert(_UsesSplit(), num_groups=4, return_summary=True)
    assert out.get_submodule("bn").activation == "relu"
    assert any(line.startswith("torch.fx could not trace the model with its stateful modules as leaves")
               for line in summary)
    assert out(torch.randn(2, 3, 4, 4)).shape == (2, 8, 4, 4)


# ---------------------------------------------------------------------------------------
# The registry


def test_builtin_rules_and_the_docs_table():
    for name in ("torchvision.ops.misc.FrozenBatchNorm2d", "timm.layers.norm_act.BatchNormAct2d",
                 "timm.layers.norm_act.GroupNormAct", "timm.layers.std_conv.StdConv2d",
                 "timm.layers.std_conv.ScaledStdConv2d", "torchvision.models.video.resnet.Conv3DSimple",
                 "torchvision.models.video.resnet.Conv3DNoTemporal", "timm.layers.norm.GroupNorm",
                 "timm.layers.norm.GroupNorm1", "timm.layers.norm_act.GroupNorm1Act",
                 "timm.layers.norm_act.SyncBatchNormAct", "timm.models.layers.norm.GroupNorm"):
        assert convert_rule_for(name) is not None, name
    for cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm, nn.Conv1d,
                nn.Conv2d, nn.Conv3d):
        assert convert_rule_for(cls) is not None, cls
    assert convert_rule_for(_FrozenBatchNorm2d) is convert_rule_for("torchvision.ops.misc.FrozenBatchNorm2d")
    table = convert_rules_table()
    assert len(table.splitlines()) <= 15
    docs = pathlib.Path(__file__).resolve().parents[1] / "docs" / "convert.md"
    assert table in docs.read_text(), "docs/convert.md's table is out of date: paste convert_rules_table()"


@pytest.fixture
def registered():
    """Register rules for the test, and forget them afterwards."""
    done = []

    def register(layer_type, rule, **kwargs):
        register_convert_rule(layer_type, rule, **kwargs)
        done.append(layer_type)

    yield register
    for layer_type in done:
        unregister_convert_rule(layer_type)


def _my_norm_rule(width_change=0):
    return ConvertRule("norm", lambda m, spec: bn_like_norm(spec, m.scale.numel() + width_change, weight=m.scale,
                                                            bias=torch.zeros_like(m.scale)),
                       channels=lambda m: m.scale.numel(), carries="scale")


@pytest.mark.parametrize("by", ["class", "name"])
def test_a_registered_user_layer_is_converted(registered, by):
    registered(_MyNorm if by == "class" else "tests.custom.MyNorm", _my_norm_rule())
    model = nn.Sequential(nn.Conv2d(3, 8, 3), _MyNorm(8), nn.ReLU())
    scale = model[1].scale
    out, summary = wsbcn.convert(model, num_groups=4, return_summary=True)
    assert type(out.get_submodule("0")) is wsbcn.WSConv2d
    assert type(out.get_submodule("1")) is wsbcn.BatchChannelNorm2d and out.get_submodule("1").activation == "relu"
    assert out.get_submodule("1").weight is scale  # the same Parameter
    assert not any("left alone" in line for line in summary)


def test_a_builtin_rule_serves_a_user_class(registered):
    class MyFrozen(_FrozenBatchNorm2d):  # a subclass: no rule until registered
        pass

    model = nn.Sequential(nn.Conv2d(3, 8, 3), MyFrozen(8))
    assert "left alone" in wsbcn.convert(copy.deepcopy(model), return_summary=True)[1][-1]
    registered(MyFrozen, convert_rule_for("torchvision.ops.misc.FrozenBatchNorm2d"))
    assert type(wsbcn.convert(model, num_groups=4)[1]) is wsbcn.BatchChannelNorm2d


def test_registering_checks_its_arguments(registered):
    with pytest.raises(ValueError, match="already has a convert rule"):
        register_convert_rule(nn.BatchNorm2d, convert_rule_for(nn.BatchNorm2d))
    with pytest.raises(TypeError, match="ConvertRule"):
        register_convert_rule(_MyNorm, lambda m, spec: m)
    with pytest.raises(TypeError, match="nn.Module"):
        register_convert_rule(int, _my_norm_rule())
    with pytest.raises(ValueError, match="package.module.Class"):
        register_convert_rule("MyNorm", _my_norm_rule())
    with pytest.raises(ValueError, match="kind"):
        ConvertRule("act", lambda m: m)
    for kind, inside in (("norm", ("norm", "activation")), ("conv", "norm"), ("conv", ("norm", None))):
        with pytest.raises(ValueError, match="norm_inside must be None or, for a conv rule, a"):
            ConvertRule(kind, lambda m: m, norm_inside=inside)
    with pytest.raises(KeyError, match="no convert rule"):
        unregister_convert_rule(_MyNorm)


def _snapshot(model):
    return dict(model.named_modules()), {k: v.clone() for k, v in model.state_dict().items()}, \
        [id(p) for p in model.parameters()]


def _unchanged(model, snapshot):
    modules, state, params = snapshot
    return (dict(model.named_modules()) == modules and [id(p) for p in model.parameters()] == params
            and all(torch.equal(v, state[k]) for k, v in model.state_dict().items()))


def test_a_rule_returning_the_wrong_width_fails_naming_the_layer_and_changes_nothing(registered):
    registered(_MyNorm, _my_norm_rule(width_change=8))
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Sequential(nn.Conv2d(8, 8, 3), _MyNorm(8)))
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match=r"'3\.1' has 8") as info:
        wsbcn.convert(model, num_groups=4)
    assert "16 channels" in str(info.value) and "MyNorm" in str(info.value)
    assert _unchanged(model, snapshot)


def test_a_failure_while_swapping_puts_the_old_layers_back(monkeypatch):
    real_identity = nn.Identity
    made = []

    def identity_that_breaks_the_second_time():
        made.append(1)
        if len(made) == 2:
            raise RuntimeError("boom")
        return real_identity()

    fusion_module = importlib.import_module("wsbcn.convert_fusion")
    monkeypatch.setattr(fusion_module, "nn", types.SimpleNamespace(Identity=identity_that_breaks_the_second_time))
    model = _TwoFusions()
    snapshot = _snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        wsbcn.convert(model, num_groups=4)  # the activations are swapped last; the second fails
    assert _unchanged(model, snapshot) and model.alias is model.body[2] and type(model.body[2]) is nn.ReLU


class _CallsFromPlainContainers(nn.Module):
    """Registered layers that its forward calls from a plain list, tuple and dict (as
    detectron2's FPN calls its convs from ``self.lateral_convs``), or as attributes."""

    def __init__(self, via_containers):
        super().__init__()
        self.via_containers = via_containers
        self.conv_a, self.bn_a, self.conv_b, self.bn_b = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3), \
            nn.BatchNorm2d(8)
        self.act = nn.SiLU()
        self.convs, self.norms = [self.conv_a, self.conv_b, None], (self.bn_a, self.bn_b)
        self.acts = {"out": self.act, "none": None}

    def forward(self, x):
        if self.via_containers:
            return self.acts["out"](self.norms[1](self.convs[1](self.norms[0](self.convs[0](x)))))
        return self.act(self.bn_b(self.conv_b(self.bn_a(self.conv_a(x)))))


def test_layers_a_forward_calls_from_plain_containers_are_swapped_there_too():
    torch.manual_seed(6)
    model = randomize(_CallsFromPlainContainers(via_containers=True))
    by_attributes = copy.deepcopy(model)
    by_attributes.via_containers = False
    out, summary = wsbcn.convert(model, num_groups=4, return_summary=True)
    wsbcn.convert(by_attributes, num_groups=4)
    assert out.convs == [out.conv_a, out.conv_b, None] and type(out.conv_a) is wsbcn.WSConv2d
    assert out.norms == (out.bn_a, out.bn_b) and type(out.bn_b) is wsbcn.BatchChannelNorm2d
    assert out.bn_b.activation is None and out.acts["out"] is out.act and type(out.act) is nn.SiLU
    assert {"convs: 2 entries of this plain list replaced by the new layers too",
            "norms: 2 entries of this plain tuple replaced by the new layers too"} <= set(summary)
    # the activation the dict holds is called from there, which the trace cannot see: not fused
    assert "bn_b: the following silu not fused: acts also holds it, in a plain container whose calls convert " \
        "cannot see" in summary
    x = torch.randn(2, 3, 8, 8)
    assert rel_err(out(x), by_attributes(x)) <= 1e-6  # the SiLU once, the new layers


class _TwoFusions(nn.Module):
    """Two activations that fuse, the first also registered at a second path."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 1),
                                  nn.BatchNorm2d(8), nn.SiLU())
        self.alias = self.body[2]  # never called from here: convert replaces it at both paths

    def forward(self, x):
        return self.body(x)


# ---------------------------------------------------------------------------------------
# Whole models: torchvision detection with FrozenBatchNorm2d, timm BiT (real classes only)


def test_detection_backbone_with_frozen_batch_norm():
    _, misc, backbone_utils, detection = import_or_skip(
        "torchvision", "torchvision.ops.misc", "torchvision.models.detection.backbone_utils",
        "torchvision.models.detection")
    torch.manual_seed(30)
    backbone = backbone_utils.resnet_fpn_backbone(backbone_name="resnet50", weights=None,
                                                  norm_layer=misc.FrozenBatchNorm2d)
    randomize(backbone)
    before = census(backbone)
    assert before["FrozenBatchNorm2d"] == 53 and before["Conv2d"] == 61
    original = copy.deepcopy(backbone).double()
    converted, summary = wsbcn.convert(copy.deepcopy(backbone).double(), return_summary=True)
    after = census(converted)
    assert after["FrozenBatchNorm2d"] == 0 and after["BatchChannelNorm2d"] == 53
    assert after["WSConv2d"] == 53 and after["Conv2d"] == 8  # the FPN's convs feed no norm
    assert sum("left alone: its output feeds no norm" in line for line in summary) == 8
    # the stem's ReLU fuses; each bottleneck's one ReLU also follows its residual addition
    assert type(converted) is type(backbone) and type(converted.body.relu) is nn.Identity
    assert sum(line.endswith("fused the following relu") for line in summary) == 1
    assert sum("relu not fused: " in line for line in summary) == 32
    assert matches_reference(original, converted, torch.randn(1, 3, 64, 64, dtype=torch.float64))
    kept, summary = wsbcn.convert(copy.deepcopy(backbone), keep_frozen=True, return_summary=True)
    assert census(kept)["FrozenBatchNorm2d"] == 53 and census(kept)["WSConv2d"] == 0
    assert summary[0] == "nothing to convert: 114 conv/norm layers left alone, listed below"
    assert sum("kept frozen (keep_frozen=True)" in line for line in summary) == 53 * 2
    # a detection train step with the converted backbone
    model = detection.FasterRCNN(backbone, num_classes=3, min_size=64, max_size=64)
    model.backbone = wsbcn.convert(model.backbone)
    model.train()
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 40.0, 40.0]]), "labels": torch.tensor([1])}] * 2
    losses = model(images, targets)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    assert model.backbone.get_submodule("body.layer1.0.bn1").weight.grad is not None


@pytest.mark.parametrize("norm", ["bcn", "gn"])
def test_timm_bit_resnetv2(norm):
    _, timm = import_or_skip("torchvision", "timm")
    torch.manual_seed(31)
    model = randomize(timm.create_model("resnetv2_50x1_bit", pretrained=False, num_classes=10)).double()
    before = census(model)
    assert before["StdConv2d"] == 53 and before["GroupNormAct"] == 49
    original = copy.deepcopy(model)
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        timm_out = model.eval()(x)
    converted, summary = wsbcn.convert(model, norm=norm, return_summary=True)
    after = census(converted)
    target = "BatchChannelNorm2d" if norm == "bcn" else "GroupNorm"
    assert after["StdConv2d"] == 0 and after["GroupNormAct"] == 0
    assert after["WSConv2d"] == 53 and after[target] == 49
    assert all(m.activation == "relu" for m in converted.modules() if type(m).__name__ == target)
    assert "head.fc: Conv2d left alone: its output feeds no norm (WS without a norm after it hurts training)" in summary
    assert matches_reference(original, converted, x)
    if norm == "gn":  # GroupNorm for GroupNorm, WS for WS: timm's numbers
        with torch.no_grad():
            assert rel_err(converted.eval()(x), timm_out) <= 1e-12
    train_step(converted, x.repeat(2, 1, 1, 1))


def test_freeze_bakes_the_gain_of_a_scaled_wsconv():
    """freeze turns a WSConvNd subclass (ScaledWSConv2d) into nn.Conv2d holding
    gain * scale * W_hat, against a float64 standardization written out here."""
    torch.manual_seed(0)
    conv = ScaledWSConv2d(4, 6, 3, padding=1, scale=0.7, eps=1e-6).double()
    with torch.no_grad():
        conv.gain.uniform_(0.5, 1.5)
    frozen = wsbcn.freeze(conv)
    assert type(frozen) is nn.Conv2d
    w = conv.weight.detach().reshape(6, -1)
    w_hat = (w - w.mean(1, keepdim=True)) / torch.sqrt(w.var(1, unbiased=False, keepdim=True) + 1e-6)
    expected = (w_hat.reshape(conv.weight.shape) * conv.gain.detach() * 0.7)
    assert torch.allclose(frozen.weight, expected, rtol=1e-12, atol=1e-12)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    assert torch.allclose(frozen(x), F.conv2d(x, expected, conv.bias, padding=1), rtol=1e-12, atol=1e-12)
