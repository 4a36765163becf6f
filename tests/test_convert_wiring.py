"""wsbcn.convert and wsbcn.freeze on models that wire their layers in less common ways:
hooks on the swapped layers, a layer at two names of one parent, a norm without
tensors, a block named like a norm, a BatchNorm on a Linear's features, branches that
run in one mode only, an Identity between conv and norm."""
import copy

import pytest
import torch
from torch import nn

import wsbcn
from conftest import rel_err
from convert_helpers import matches_reference, randomize


def _summary(model, **kwargs):
    return wsbcn.convert(model, num_groups=4, return_summary=True, **kwargs)


class _Aliased(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.alias = self.conv  # the same conv at a second name of the same parent

    def forward(self, x):
        return self.bn(self.alias(x))


def test_freeze_a_layer_registered_twice_under_one_parent():
    torch.manual_seed(1)
    model = wsbcn.convert(_Aliased().double(), num_groups=4).eval()
    frozen = wsbcn.freeze(model)
    assert type(frozen.conv) is nn.Conv2d and frozen.alias is frozen.conv
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(frozen(x), model(x)) <= 1e-13
        assert rel_err(torch.jit.trace(frozen, x)(x), model(x)) <= 1e-13  # no wsbcn layer left to refuse it


def test_a_group_norm_without_affine_converts_in_the_models_dtype_and_device():
    """nn.GroupNorm(affine=False) has no tensor to tell its new BCN's buffers a dtype or
    device: they take the feeding conv's, not torch's defaults."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8, affine=False)).double()
    out = wsbcn.convert(model)
    assert out[1].running_mean.dtype == out[1].running_var.dtype == torch.float64
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    out.train()(x)
    with torch.no_grad():
        assert rel_err(wsbcn.freeze(out.eval())(x), out(x)) <= 1e-13  # it raised: mixed dtypes
    on_meta = wsbcn.convert(nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8, affine=False)).to("meta"))
    assert on_meta[1].running_mean.device.type == "meta"


class PreNormBlock(nn.Module):
    """A residual block with a layer scale, under a name with "norm" in it."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.act = nn.ReLU()
        self.gamma = nn.Parameter(torch.full((1, c, 1, 1), 0.5))

    def forward(self, x):
        return x + self.gamma * self.act(self.bn(self.conv(x)))


def test_a_block_named_like_a_norm_is_looked_inside():
    torch.manual_seed(2)
    model = randomize(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), PreNormBlock(8))).double()
    original = copy.deepcopy(model)
    out, summary = _summary(model)
    assert type(out[2].conv) is wsbcn.WSConv2d and type(out[2].bn) is wsbcn.BatchChannelNorm2d
    assert not any("no convert rule" in line for line in summary)
    assert matches_reference(original, out, torch.randn(2, 3, 6, 6, dtype=torch.float64))


def test_hooks_of_swapped_layers_run_on_the_new_ones():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()).double()
    seen = []
    model[0].register_forward_pre_hook(lambda m, args: seen.append(("conv pre", type(m).__name__)))
    bn_hook = model[1].register_forward_hook(lambda m, args, out: seen.append(("bn", type(m).__name__)))
    model[1].register_full_backward_hook(lambda m, grad_in, grad_out: seen.append(("bn backward", type(m).__name__)))
    model[2].register_forward_hook(lambda m, args, out: seen.append(("relu", type(m).__name__)))
    out, summary = _summary(model)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    out(x).sum().backward()
    assert seen == [("conv pre", "WSConv2d"), ("bn", "BatchChannelNorm2d"), ("relu", "ReLU"),
                    ("bn backward", "BatchChannelNorm2d")]
    assert "0: its hooks run on the new layer" in summary and "1: its hooks run on the new layer" in summary
    # the ReLU's hook would not run fused into the norm: it stays, and the summary says why
    assert type(out[2]) is nn.ReLU and out[1].activation is None
    assert "1: the following relu not fused: it has hooks, which would not run" in summary
    bn_hook.remove()  # the handles still work
    seen.clear()
    with torch.no_grad():
        out(x)
    assert seen == [("conv pre", "WSConv2d"), ("relu", "ReLU")]
    # and a hook of a wsbcn layer runs on its frozen form
    seen.clear()
    with torch.no_grad():
        wsbcn.freeze(out.eval())(x)
    assert seen == [("conv pre", "Conv2d"), ("relu", "ReLU")]


_SEEN = []


def _record_module_type(module, *_):  # a load_state_dict pre-hook pickle can reach
    _SEEN.append(type(module).__name__)


def test_load_state_dict_pre_hooks_of_swapped_layers_take_the_new_ones():
    """torch keeps a load_state_dict pre-hook with a weak reference to its module: carried
    as it was, it was called with the replaced layer, and once that was freed
    load_state_dict, deepcopy and pickle raised "a dead Module" (so did freeze, which
    copies). Now the new layer is the hook's module, in convert and in freeze."""
    import gc
    import pickle

    seen = _SEEN
    seen.clear()
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    handle = model[1].register_load_state_dict_pre_hook(_record_module_type)
    model[0].register_load_state_dict_pre_hook(_record_module_type)
    out, summary = _summary(model)
    gc.collect()
    out.load_state_dict(out.state_dict())
    assert sorted(seen) == ["BatchChannelNorm2d", "WSConv2d"]
    for clone in (copy.deepcopy(out), pickle.loads(pickle.dumps(out))):
        seen.clear()
        clone.load_state_dict(clone.state_dict())
        assert sorted(seen) == ["BatchChannelNorm2d", "WSConv2d"]
    seen.clear()
    frozen = wsbcn.freeze(out)
    gc.collect()
    frozen.load_state_dict(frozen.state_dict())
    assert sorted(seen) == ["Conv2d", "FrozenBatchChannelNorm2d"]
    handle.remove()  # the handle still removes the hook from the converted layer
    seen.clear()
    out.load_state_dict(out.state_dict())
    assert seen == ["WSConv2d"]


def test_a_failed_convert_leaves_the_load_state_dict_hooks_on_the_old_layers(monkeypatch):
    """convert puts everything back when it fails after the swap: the hooks too."""
    import sys

    convert_module = sys.modules["wsbcn.convert"]  # (wsbcn.convert is the function)
    seen = []
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    model[1].register_load_state_dict_pre_hook(lambda m, *_: seen.append(m))

    def fail(*args):
        raise RuntimeError("failed after the swap")

    monkeypatch.setattr(convert_module, "_rebind", fail)
    with pytest.raises(RuntimeError, match="failed after the swap"):
        wsbcn.convert(model, num_groups=4)
    model.load_state_dict(model.state_dict())
    assert type(model[1]) is nn.BatchNorm2d and seen == [model[1]]


class _LinearThenConv(nn.Sequential):
    def __init__(self, width):
        super().__init__(nn.Linear(10, width), nn.BatchNorm1d(width), nn.ReLU(), nn.Linear(width, 4),
                         nn.Conv1d(4, 8, 1), nn.BatchNorm1d(8))

    def forward(self, x):
        return self[5](self[4](self[3](self[2](self[1](self[0](x))))[:, :, None]))


@pytest.mark.parametrize("width", [4, 16])
def test_a_batch_norm_on_a_linears_features_converts_unless_its_groups_hold_one_value(width):
    """(N, C) features have no spatial or length dimension: the channel stage normalizes
    each sample's C / G values alone, which with one value per group (C = G = 4) gives
    the bias whatever the input: left alone, with the reason. With 4 values per group
    (C = 16) it is a channel stage, and the norm converts (BatchChannelNorm1d takes
    (N, C)), as an MLP layer takes a GroupNorm."""
    torch.manual_seed(0)
    model = randomize(_LinearThenConv(width).double())
    original = copy.deepcopy(model)
    out, summary = _summary(model)
    assert type(out[4]) is wsbcn.WSConv1d and type(out[5]) is wsbcn.BatchChannelNorm1d  # a length dimension
    if width == 4:
        assert type(out[1]) is nn.BatchNorm1d and type(out[2]) is nn.ReLU
        assert any(line.startswith("1: BatchNorm1d left alone: its input is one value per channel and sample (the "
                                   "output of 0 (nn.Linear)), and its groups would hold one channel each")
                   for line in summary), summary
    else:
        assert type(out[1]) is wsbcn.BatchChannelNorm1d and out[1].num_groups == 4
    assert matches_reference(original, out, torch.randn(3, 10, dtype=torch.float64))


class _TrainOnlyHead(nn.Module):
    """googlenet's aux heads: a branch the forward runs in training only; and one in eval only."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
        self.aux = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8))
        self.eval_only = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8))

    def forward(self, x):
        y = self.stem(x)
        return (y, self.aux(y)) if self.training else self.eval_only(y)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_layers_the_forward_runs_in_one_mode_only_convert_in_either(mode):
    torch.manual_seed(4)
    model = _TrainOnlyHead().double().train(mode == "train")
    out, summary = _summary(model)
    for part in (out.stem, out.aux, out.eval_only):
        assert [type(m) for m in part] == [wsbcn.WSConv2d, wsbcn.BatchChannelNorm2d], summary
        assert part[1].training == (mode == "train")
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    stem, aux = out.train()(x)
    (stem.square().sum() + aux.square().sum()).backward()
    assert all(p.grad is not None for p in out.aux.parameters())
    with torch.no_grad():
        assert out.eval()(x).shape == (2, 8, 4, 4)


def test_an_identity_between_conv_and_norm_changes_nothing():
    torch.manual_seed(5)
    model = randomize(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Identity(), nn.BatchNorm2d(8))).double()
    original = copy.deepcopy(model)
    out, summary = _summary(model)
    assert type(out[0]) is wsbcn.WSConv2d, summary
    assert matches_reference(original, out, torch.randn(2, 3, 6, 6, dtype=torch.float64))


class _FunctionalBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        b = self.bn
        return torch.nn.functional.batch_norm(self.conv(x), b.running_mean, b.running_var, b.weight, b.bias,
                                              self.training, 0.1, b.eps)


def test_a_norm_called_as_a_function_is_named_in_the_summary():
    out, summary = _summary(_FunctionalBatchNorm())
    assert type(out.conv) is nn.Conv2d and type(out.bn) is nn.BatchNorm2d
    assert ("the forward calls F.batch_norm 1 time: a function, which convert cannot swap (it swaps norm modules); "
            "its inputs stay as they are") in summary


def test_an_activation_is_not_fused_into_a_norm_whose_output_hooks_would_see_it():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).double()
    seen = []
    model[1].register_forward_hook(lambda m, args, out: seen.append(out.min().item()))
    out, summary = _summary(model)
    assert type(out[2]) is nn.ReLU and out[1].activation is None
    assert ("1: the following relu not fused: the norm has forward or backward hooks, which would see its output "
            "activated") in summary
    out(torch.randn(2, 3, 6, 6, dtype=torch.float64))
    assert seen[-1] < 0  # the norm's own output, as before convert


class _AfterResidual(nn.Module):
    """A norm of a residual sum (pre-activation order): no conv feeds it directly."""

    def __init__(self, conv, norm):
        super().__init__()
        self.conv, self.norm = conv, norm

    def forward(self, x):
        return self.norm(x + self.conv(x))


class _Reshaped(nn.Module):
    """Convs of two ranks, and a GroupNorm after a reshape, whose rank convert cannot see."""

    def __init__(self):
        super().__init__()
        self.conv1d, self.conv2d = nn.Conv1d(4, 4, 1), nn.Conv2d(4, 4, 1)
        self.bn1d, self.bn2d = nn.BatchNorm1d(4), nn.BatchNorm2d(4)
        self.gn = nn.GroupNorm(2, 4)

    def forward(self, x):  # x: (N, 4, H, W)
        y = self.bn2d(self.conv2d(x))
        z = self.bn1d(self.conv1d(y.flatten(2)))
        return self.gn(z.reshape(x.shape))


@pytest.mark.parametrize("case", ["gn-3d-residual", "sync-bn-3d-residual", "gn-1d-model-input", "gn-3d-dropout"])
def test_a_norm_that_takes_any_rank_gets_the_rank_of_the_convs_around_it(backend, case):
    """nn.GroupNorm and nn.SyncBatchNorm take inputs of any rank, a BatchChannelNormNd one
    rank: with no conv feeding it directly, the norm became a BatchChannelNorm2d whatever
    its input, and a 3D or 1D model's first forward raised. Its rank is now the conv's
    that reaches it through rank-keeping ops (upstream, else downstream)."""
    torch.manual_seed(0)
    if case == "gn-3d-residual":
        model, x, cls = _AfterResidual(nn.Conv3d(8, 8, 3, padding=1), nn.GroupNorm(4, 8)), (2, 8, 2, 4, 4), 3
    elif case == "sync-bn-3d-residual":
        model, x, cls = _AfterResidual(nn.Conv3d(8, 8, 3, padding=1), nn.SyncBatchNorm(8)), (2, 8, 2, 4, 4), 3
    elif case == "gn-1d-model-input":
        model, x, cls = nn.Sequential(nn.GroupNorm(2, 4), nn.Conv1d(4, 8, 3), nn.BatchNorm1d(8)), (2, 4, 8), 1
    else:
        model, x, cls = nn.Sequential(nn.Conv3d(3, 8, 3), nn.Dropout3d(0.1), nn.GroupNorm(4, 8)), (2, 3, 3, 4, 4), 3
    model = randomize(model.double())
    out, summary = _summary(copy.deepcopy(model))
    norms = [m for m in out.modules() if isinstance(m, wsbcn.modules.norm._BatchChannelNorm)]
    assert norms and all(type(m) is getattr(wsbcn, f"BatchChannelNorm{cls}d") for m in norms), summary
    x = torch.randn(x, dtype=torch.float64)
    assert matches_reference(model, out, x)
    out.train()(x).square().sum().backward()


def test_a_norm_whose_rank_is_unknown_is_left_alone_with_the_reason():
    model = _Reshaped()
    out, summary = _summary(model)
    assert type(out.gn) is nn.GroupNorm
    assert any(line.startswith("gn: GroupNorm left alone: the rank of its input is not known") for line in summary)
    assert type(out.bn1d) is wsbcn.BatchChannelNorm1d and type(out.bn2d) is wsbcn.BatchChannelNorm2d
    out(torch.randn(2, 4, 3, 3))


class _EmbeddingHead(nn.Module):
    """A "BNNeck": the pooled, flattened features go through a BatchNorm1d."""

    def __init__(self, c):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, c, 3), nn.BatchNorm2d(c)
        self.neck, self.fc = nn.BatchNorm1d(c), nn.Linear(c, 5)

    def forward(self, x):
        f = torch.flatten(nn.functional.adaptive_avg_pool2d(torch.relu(self.bn(self.conv(x))), 1), 1)
        return self.fc(self.neck(f))


def test_a_batch_norm_on_flattened_features_with_one_value_per_group_is_left_alone():
    """As after an nn.Linear: a BatchChannelNorm1d on (N, C) features with C = G gave every
    sample the same output; also for features made by a view to (N, -1)."""
    out, summary = _summary(_EmbeddingHead(4))
    assert type(out.neck) is nn.BatchNorm1d and type(out.bn) is wsbcn.BatchChannelNorm2d
    assert any(line.startswith("neck: BatchNorm1d left alone: its input is one value per channel and sample "
                               "(flattened by torch.flatten)") for line in summary), summary
    viewed = _EmbeddingHead(4)
    viewed.forward = lambda x: viewed.fc(viewed.neck(viewed.bn(viewed.conv(x)).mean((2, 3)).view(x.shape[0], -1)))
    out, summary = _summary(viewed)
    assert type(out.neck) is nn.BatchNorm1d, summary
    with_channels = _EmbeddingHead(16)  # 4 values per group: a channel stage
    out, summary = _summary(with_channels)
    assert type(out.neck) is wsbcn.BatchChannelNorm1d and out.neck.num_groups == 4
    out.neck.estimate = True  # one sample: the micro-batch mode
    out(torch.randn(1, 3, 5, 5)).sum().backward()


def test_a_conv_feeds_the_norm_after_a_dropout():
    """A dropout between a conv and its norm keeps what the conv gave: the conv feeds the
    norm (it was said to feed none, and stayed unstandardized)."""
    model = nn.Sequential(nn.Conv3d(3, 8, 3), nn.Dropout3d(0.1), nn.BatchNorm3d(8))
    out, summary = _summary(model)
    assert type(out[0]) is wsbcn.WSConv3d and type(out[2]) is wsbcn.BatchChannelNorm3d, summary


class _SqueezeExcite(nn.Module):
    """timm's squeeze-and-excitation with a norm: mean over H, W kept, 1x1 conv, BN, act."""

    def __init__(self, c, rd):
        super().__init__()
        self.fc1, self.bn, self.fc2 = nn.Conv2d(c, rd, 1), nn.BatchNorm2d(rd), nn.Conv2d(rd, c, 1)
        self.conv, self.bn0 = nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c)
        self.after = nn.BatchNorm2d(c)

    def forward(self, x):
        x = torch.relu(self.bn0(self.conv(x)))
        s = self.fc2(torch.relu(self.bn(self.fc1(x.mean((2, 3), keepdim=True)))))
        return self.after(x * s.sigmoid() + s)  # gated (and shifted): a map again


@pytest.mark.parametrize("reduced", [4, 16])
def test_a_squeeze_excitation_norm_converts_unless_its_groups_hold_one_value(backend, reduced):
    """The SE block's norm takes one element per channel (N, C, 1, 1): as BCN with 4
    channels in 4 groups, its output was the group bias whatever the input (the gate
    constant): left alone with the reason. With 16 channels in 4 groups it converts (the
    micro-batch mode trains it with one sample, which a BatchNorm cannot), and the
    norm after the gated map converts either way (a gate times a map is a map)."""
    torch.manual_seed(1)
    model = randomize(_SqueezeExcite(16, reduced).double())
    out, summary = _summary(copy.deepcopy(model))
    assert type(out.bn0) is wsbcn.BatchChannelNorm2d and type(out.after) is wsbcn.BatchChannelNorm2d, summary
    if reduced == 4:
        assert type(out.bn) is nn.BatchNorm2d
        assert any(line.startswith("bn: BatchNorm2d left alone: its input is one value per channel and sample "
                                   "(pooled by .mean(), then fc1)") for line in summary), summary
    else:
        assert type(out.bn) is wsbcn.BatchChannelNorm2d and out.bn.num_groups == 4
    assert matches_reference(model, out, torch.randn(2, 3, 4, 4, dtype=torch.float64))
    if reduced == 16:
        for m in out.modules():
            if isinstance(m, wsbcn.BatchChannelNorm2d):
                m.estimate = True
        out.train()(torch.randn(1, 3, 4, 4, dtype=torch.float64)).sum().backward()


class _ResidualPointMLP(nn.Module):
    """Residual blocks of 1x1 convs (a point-cloud MLP): every block a diamond in the graph."""

    def __init__(self, blocks, c=8):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv1d(c, c, 1) for _ in range(blocks))
        self.norms = nn.ModuleList(nn.BatchNorm1d(c) for _ in range(blocks))

    def forward(self, x):
        for conv, norm in zip(self.convs, self.norms):
            x = torch.relu(norm(conv(x)) + x)
        return x


def test_the_graph_walks_look_at_each_node_a_bounded_number_of_times(monkeypatch):
    """Each residual block doubled the paths the one-value-per-channel walk followed (20
    blocks: minutes); each node is now looked at once per norm."""
    from wsbcn import convert_rank

    calls = []
    real = convert_rank._one_per_channel
    monkeypatch.setattr(convert_rank, "_one_per_channel", lambda *a: calls.append(1) or real(*a))
    model = _ResidualPointMLP(20)
    nodes = len(torch.fx.symbolic_trace(model).graph.nodes)
    out = wsbcn.convert(model, num_groups=4)
    assert all(type(m) is wsbcn.BatchChannelNorm1d for m in out.norms)
    assert len(calls) <= 3 * 20 * nodes  # (up to three traces, one walk per norm)


def test_flatten_of_the_last_dims_and_lazy_convs_are_not_features():
    """flatten(-2) keeps a length dimension ((N, C, H*W)): not (N, C) features; a lazy conv
    feeding a norm is named as not initialized (reading its weight's rank raised)."""
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm1d(4)

        def forward(self, x):
            return self.bn(self.conv(x).flatten(-2))

    out = wsbcn.convert(Flat(), num_groups=4)
    assert type(out.bn) is wsbcn.BatchChannelNorm1d
    out(torch.randn(2, 3, 5, 5))
    lazy, summary = _summary(nn.Sequential(nn.LazyConv2d(16, 3), nn.BatchNorm2d(16)))
    assert any("is not initialized yet" in line for line in summary), summary


class _Pooled(nn.Module):
    """A map pooled some way, then a norm (one of them takes the pooled values)."""

    def __init__(self, pool, norm, dims=2):
        super().__init__()
        conv = {2: nn.Conv2d, 3: nn.Conv3d}[dims]
        self.conv, self.bn0, self.pool, self.norm = conv(3, 16, 3, padding=1), nn.BatchNorm2d(16), pool, norm
        if dims == 3:
            self.bn0 = nn.BatchNorm3d(16)

    def forward(self, x):
        return self.norm(self.pool(torch.relu(self.bn0(self.conv(x)))))


_POOLS = {  # name -> (pool, norm of 16 channels, input, what convert should make of the norm)
    "mean-negative-dims": (lambda x: x.mean((-2, -1), keepdim=True), nn.BatchNorm2d(16), (2, 3, 4, 4), "alone"),
    "mean-no-keepdim": (lambda x: x.mean([2, 3]), nn.BatchNorm1d(16), (2, 3, 4, 4), "alone"),
    "cat-of-features": (lambda x: torch.cat([x.mean([2, 3]), x.amax([2, 3])], 1), nn.BatchNorm1d(32), (2, 3, 4, 4),
                        "alone"),
    "mean-of-a-sum-over-a-stack": (lambda x: torch.stack([x, x.flip(2)], 1).sum(1).mean((2, 3), keepdim=True),
                                   nn.BatchNorm2d(16), (2, 3, 4, 4), "alone"),  # timm's split attention
    "means-over-one-dim-each": (lambda x: x.mean(3).mean(2), nn.BatchNorm1d(16), (2, 3, 4, 4), "alone"),
    "mean-with-keywords": (lambda x: torch.mean(input=x, dim=(2, 3), keepdim=True), nn.BatchNorm2d(16),
                           (2, 3, 4, 4), "alone"),
    "cat-of-pooled-maps-along-a-spatial-dim": (
        lambda x: torch.cat([x.mean((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)], dim=2),
        nn.GroupNorm(8, 16), (2, 3, 4, 4), "BatchChannelNorm2d"),
    "window-of-the-map": (lambda x: nn.functional.avg_pool2d(x, x.size()[2:]), nn.BatchNorm2d(16), (2, 3, 4, 4),
                          "alone"),  # BiSeNet's attention refinement
    "pooled-then-viewed": (lambda x: nn.functional.adaptive_avg_pool2d(x, 1).view(x.shape[0], 16, 1, 1),
                           nn.BatchNorm2d(16), (2, 3, 4, 4), "alone"),
    "kept-means-one-dim-at-a-time": (lambda x: x.mean(2, keepdim=True).mean(3, keepdim=True), nn.BatchNorm2d(16),
                                     (2, 3, 4, 4), "alone"),
    "cat-along-a-negative-channel-dim": (
        lambda x: torch.cat([x.mean((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)], dim=-3),
        nn.BatchNorm2d(32), (2, 3, 4, 4), "alone"),  # (two channels per group)
    "mean-over-one-of-two-dims": (lambda x: x.mean((2,), keepdim=True), nn.GroupNorm(16, 16), (2, 3, 4, 4),
                                  "BatchChannelNorm2d"),
    "mean-over-two-of-three-dims": (lambda x: x.mean((3, 4), keepdim=True), nn.GroupNorm(16, 16), (2, 3, 2, 4, 4),
                                    "BatchChannelNorm3d"),
}


@pytest.mark.parametrize("case", list(_POOLS))
def test_pooled_inputs_are_told_from_maps(case):
    """A pooling over every spatial dim (negative dims too; kept or dropped) gives one
    value per channel and sample: with 16 channels in 16 groups the norm is left alone
    (as BCN its first forward raised "one value per group"). A pooling over some of the
    spatial dims keeps a map, of the input's rank (it was taken for one value per channel
    and given the pooled dims' count as its rank)."""
    pool, norm, shape, expected = _POOLS[case]
    model = _Pooled(_Lambda(pool), norm, dims=len(shape) - 2)
    out, summary = wsbcn.convert(model, num_groups=16, return_summary=True)
    made = type(out.norm).__name__
    if expected == "alone":
        assert made == type(norm).__name__, summary
        assert any(line.startswith("norm: ") and "one value per channel and sample" in line for line in summary)
    else:
        assert made == expected, summary
    out(torch.randn(shape))


class _Lambda(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def test_a_batch_norm_on_an_input_of_unknown_rank_with_one_channel_per_group_is_left_alone():
    """A BatchNorm1d on the model's input (tabular (N, C) or a sequence (N, C, L): nothing
    tells) whose groups would hold one channel: left alone, with the reason (as BCN, an
    (N, C) input raised "one value per group" on the first forward)."""
    out, summary = _summary(nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 2)))
    assert type(out[0]) is nn.BatchNorm1d
    assert any(line.startswith("0: BatchNorm1d left alone: nothing shows whether its input has a length dimension")
               for line in summary), summary


def test_two_channels_per_group_on_one_value_per_channel_are_left_alone_too():
    """Two values per group normalize to +-1 (the sign of their difference): as
    degenerate as one; three or more convert."""
    for width, expected in ((8, nn.BatchNorm1d), (12, wsbcn.BatchChannelNorm1d)):
        out, summary = _summary(_LinearThenConv(width))  # num_groups=4: 2 and 3 channels per group
        assert type(out[1]) is expected, summary


def test_a_deep_chain_of_pointwise_layers_converts():
    """The memoized walk recursed once per node: 400 pointwise blocks hit Python's
    recursion limit. It looks a bounded depth up."""
    model = nn.Sequential(*[m for _ in range(400) for m in (nn.Conv1d(8, 8, 1), nn.BatchNorm1d(8), nn.ReLU())])
    out = wsbcn.convert(model, num_groups=4, ws=False)
    assert sum(type(m) is wsbcn.BatchChannelNorm1d for m in out) == 400
