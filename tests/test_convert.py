"""wsbcn.convert on the package's ResNet-50 and on small hand-made models."""
import copy
import importlib.util
import logging
import warnings

import pytest
import torch
from torch import nn

import wsbcn
from wsbcn.tools.models import resnet50
from conftest import DEVICE, rel_err
from reference import bcn_reference, gn_reference


def _count(model, cls):
    return sum(isinstance(m, cls) for m in model.modules())


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
    fused_acts = [m.activation for m in fused.modules() if isinstance(m, wsbcn.BatchChannelNorm2d)]
    assert fused_acts.count("relu") == 1 + 16 * 2  # the stem and bn1, bn2 of every bottleneck
    assert sum("fused" in line for line in summary) == 33
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    fused.eval()
    unfused.eval()
    with torch.no_grad():
        assert rel_err(fused(x), unfused(x)) <= 1e-5
    fused.train()
    fused(x).sum().backward()
    assert fused.conv1.weight.grad is not None


def test_conv_not_followed_by_norm_is_left_alone():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.SiLU())
    out = wsbcn.convert(model)
    kinds = [type(m) for m in out.modules()]
    assert kinds.count(nn.Conv2d) == 1 and kinds.count(wsbcn.WSConv2d) == 1
    assert out.get_submodule("3").activation == "silu"
    assert out(torch.randn(2, 3, 8, 8)).shape == (2, 8, 4, 4)


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
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU()

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            x = x * 2
        return self.act(self.bn(self.conv(x)))


def test_module_order_fallback_warns_and_converts():
    with pytest.warns(UserWarning, match="module order"):
        out = wsbcn.convert(Untraceable(), num_groups=4)
    assert isinstance(out.conv, wsbcn.WSConv2d) and isinstance(out.bn, wsbcn.BatchChannelNorm2d)
    assert out.bn.activation is None and isinstance(out.act, nn.ReLU)  # nothing fused
    assert out(torch.randn(2, 3, 6, 6)).shape == (2, 8, 4, 4)


def test_convert_rejects_bad_arguments():
    with pytest.raises(ValueError, match="norm"):
        wsbcn.convert(nn.Sequential(), norm="ln")
    with pytest.raises(ValueError, match="num_groups"):
        wsbcn.convert(nn.Sequential(), num_groups=0)
    with pytest.raises(TypeError, match="nn.Module"):
        wsbcn.convert("resnet")


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None, reason="torchvision is not installed")
def test_torchvision_resnet18():
    import torchvision

    model = wsbcn.convert(torchvision.models.resnet18(num_classes=10))
    assert _count(model, nn.BatchNorm2d) == 0 and _count(model, wsbcn.WSConv2d) == 20
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="timm is not installed")
def test_timm_resnet():
    import timm

    model = wsbcn.convert(timm.create_model("resnet18", num_classes=10))
    assert _count(model, nn.BatchNorm2d) == 0
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def _converting_again_changes_nothing(model, caplog, expected_counts):
    """Convert ``model`` a second time: the same object comes back with the same
    modules and tensors and the same output, the summary and the log say there was
    nothing to do, and no warning is raised (no torch.fx fallback)."""
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
    assert len(summary) == 1 and summary[0].startswith("nothing to convert")
    assert f"already converted: {expected_counts[0]} WSConv and {expected_counts[1]} wsbcn norm layers" in summary[0]
    assert [r.getMessage() for r in caplog.records] == [f"wsbcn.convert: {summary[0]}"]
    assert caplog.records[0].levelno == logging.INFO


def test_converting_a_converted_resnet50_again_is_a_noop_that_says_so(caplog):
    """The README's two convert lines, one after the other."""
    torch.manual_seed(10)
    model = wsbcn.convert(resnet50("plain_bn", num_classes=10).to(DEVICE))
    assert isinstance(model, torch.fx.GraphModule)  # activations were fused
    _converting_again_changes_nothing(model, caplog, (53, 53))


def test_converting_again_traces_through_wsbcn_layers(caplog):
    """A plain conv that feeds no norm stays: the second call must trace the model,
    wsbcn layers included, and find nothing to do."""
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
    bcn_only = wsbcn.convert(model, num_groups=4, ws=False)
    assert type(bcn_only.get_submodule("0")) is nn.Conv2d
    norm_layer = bcn_only.get_submodule("1")
    both, summary = wsbcn.convert(bcn_only, num_groups=4, return_summary=True)
    assert summary == ["0: Conv2d -> WSConv2d"]
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
