"""Batch-Channel Normalization against the naive float64 composition, both backends."""
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F

import wsbcn
from wsbcn import checks, tuning
from wsbcn.functional import batch_channel_norm
from conftest import DEVICE, TOL, rel_err, stand_in_group
from reference import ReleasedBCNorm, bcn_reference, gn_reference

MODES = {  # name -> (training, estimate)
    "batch": (True, False),
    "estimate": (True, True),
    "eval": (False, False),
}


def _random_params(c, g, group_affine, device=DEVICE, dtype=torch.float32):
    gen = dict(device=device, dtype=dtype)
    aff = g if group_affine else c
    return dict(
        weight=(torch.rand(c, **gen) + 0.5), bias=torch.randn(c, **gen),
        group_weight=(torch.rand(1, aff, 1, **gen) + 0.5), group_bias=torch.randn(1, aff, 1, **gen),
        running_mean=torch.randn(c, **gen) * 0.3, running_var=torch.rand(c, **gen) + 0.5,
    )


def check_bcn(x, num_groups, mode, activation=None, group_affine=True, affine=True, steps=1,
              momentum=0.1, tol=None, params=None):
    """Run ``steps`` forward/backward passes of ours and of the reference; compare
    outputs, every gradient and the running buffers after each step."""
    training, estimate = MODES[mode]
    c = x.shape[1]
    p = params or _random_params(c, num_groups, group_affine, device=x.device)
    tol = tol or TOL[x.dtype]
    learn = ["weight", "bias", "group_weight", "group_bias"] if affine else []
    ours = {k: (v.clone().requires_grad_(k in learn)) for k, v in p.items() if affine or k.startswith("running")}
    ref = {k: v.detach().double().clone().requires_grad_(k in learn) for k, v in ours.items()}
    nbt = torch.zeros((), dtype=torch.long, device=x.device)
    nbt_ref = torch.zeros((), dtype=torch.long)
    for step in range(steps):
        xs = (x.detach() * (1 + 0.3 * step)).requires_grad_(True)
        x64 = xs.detach().double().requires_grad_(True)
        y = batch_channel_norm(xs, num_groups, training=training, estimate=estimate, activation=activation,
                               momentum=momentum, num_batches_tracked=nbt, **ours)
        yr = bcn_reference(x64, num_groups, training=training, estimate=estimate, activation=activation,
                           momentum=momentum, num_batches_tracked=nbt_ref, **ref)
        assert y.dtype == x.dtype and y.shape == x.shape
        assert rel_err(y, yr) <= tol, ("output", step)
        g = torch.randn_like(yr)
        y.backward(g.to(y.dtype))
        yr.backward(g)
        assert rel_err(xs.grad, x64.grad) <= tol, ("dx", step)
        for k in learn:
            assert rel_err(ours[k].grad, ref[k].grad) <= tol, (k, step)
            ours[k].grad = None
            ref[k].grad = None
        for k in ("running_mean", "running_var"):
            assert rel_err(ours[k], ref[k]) <= max(tol, 1e-6), (k, step)
    assert int(nbt) == (steps if training else 0)
    return ours


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("activation", [None, "relu", "silu"])
@pytest.mark.parametrize("group_affine", [True, False])
def test_bcn_modes_match_reference(backend, mode, activation, group_affine):
    torch.manual_seed(0)
    x = torch.randn(3, 8, 5, 4, device=DEVICE) * 2 + 0.5
    check_bcn(x, 4, mode, activation, group_affine)


@pytest.mark.parametrize("mode", list(MODES))
def test_fp32_statistics_under_autocast(backend, mode):
    """Under autocast a float32 input is normalized with float32 statistics and gets
    float32 gradients, as nn.BatchNorm2d does (batch_norm is on no autocast list). The
    torch closed form's sums of squares went through linalg.vecdot, which autocast runs
    in bfloat16: its statistics were ~1e-3 off, forward and backward."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 5, 5, device=DEVICE) * 2 + 0.5
    with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):  # the backward too
        check_bcn(x, 4, mode, activation="silu")


@pytest.mark.parametrize("mode", list(MODES))
def test_bcn_without_affine(backend, mode):
    torch.manual_seed(1)
    check_bcn(torch.randn(2, 6, 3, 3, device=DEVICE), 3, mode, affine=False)


@pytest.mark.parametrize("mode", list(MODES))
def test_bcn_several_training_steps_then_eval(backend, mode):
    """Running buffers over several steps, then the eval output they give."""
    torch.manual_seed(2)
    x = torch.randn(2, 8, 4, 4, device=DEVICE) + 1.0
    state = check_bcn(x, 2, mode, steps=3, momentum=0.3)
    params = {k: v.detach() for k, v in state.items()}
    check_bcn(x, 2, "eval", params=params)


def test_bcn_cumulative_momentum_none(backend):
    torch.manual_seed(3)
    check_bcn(torch.randn(2, 4, 3, 3, device=DEVICE), 2, "batch", steps=3, momentum=None)


@pytest.mark.parametrize("mode", ["batch", "estimate"])
def test_an_empty_batch_counts_a_step_and_leaves_the_estimates_as_batchnorm_does(backend, mode):
    """nn.BatchNorm2d in training, given an empty batch, counts it in num_batches_tracked
    and leaves its running estimates; with momentum=None the count weighs the next
    batch's update. Checked against nn.BatchNorm2d in float64 (batch mode: the BN stage
    updates its estimates as BatchNorm does)."""
    torch.manual_seed(4)
    layer = wsbcn.BatchChannelNorm2d(8, 4, momentum=None, estimate=mode == "estimate").to(DEVICE)
    bn = torch.nn.BatchNorm2d(8, momentum=None).double()
    with torch.no_grad():
        for t, r in ((layer.running_mean, bn.running_mean), (layer.running_var, bn.running_var)):
            t.copy_(torch.rand(8) + 0.5)
            r.copy_(t)
    before = [layer.running_mean.clone(), layer.running_var.clone()]
    empty = torch.randn(0, 8, 3, 3, device=DEVICE, requires_grad=True)
    y = layer(empty)
    bn(empty.detach().double())
    y.sum().backward()
    assert y.shape == empty.shape and empty.grad.shape == empty.shape
    assert int(layer.num_batches_tracked) == int(bn.num_batches_tracked) == 1
    assert torch.equal(layer.running_mean, before[0]) and torch.equal(layer.running_var, before[1])
    assert torch.equal(bn.running_mean, before[0].double()) and torch.equal(bn.running_var, before[1].double())
    if mode == "batch":  # the next batch is the second one of the cumulative average
        x = torch.randn(2, 8, 3, 3, device=DEVICE)
        layer(x)
        bn(x.double())
        assert int(layer.num_batches_tracked) == 2
        assert rel_err(layer.running_mean, bn.running_mean) <= 1e-6
        assert rel_err(layer.running_var, bn.running_var) <= 1e-6


@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_buffers_set_to_none_still_count_training_steps_as_batchnorm(backend, momentum):
    """Running buffers set to None with the counter kept (track_running_stats=True):
    nn.BatchNorm2d normalizes with batch statistics and still counts each training step
    in num_batches_tracked, and not in eval; the layer counted none. Output against
    batch norm then group norm in float64."""
    torch.manual_seed(5)
    layer = wsbcn.BatchChannelNorm2d(8, 4, momentum=momentum).to(DEVICE)
    bn = torch.nn.BatchNorm2d(8, momentum=momentum)
    for m in (layer, bn):
        m.running_mean = m.running_var = None
    x = torch.randn(2, 8, 3, 3, device=DEVICE)
    for _ in range(2):
        y = layer(x)
        bn(x.cpu())
    assert int(layer.num_batches_tracked) == int(bn.num_batches_tracked) == 2
    layer.eval(), bn.eval()
    y_eval = layer(x)
    bn(x.cpu())
    assert int(layer.num_batches_tracked) == int(bn.num_batches_tracked) == 2
    x64 = x.double()
    ref = F.group_norm(F.batch_norm(x64, None, None, training=True, eps=layer.eps), 4, eps=layer.eps)
    assert rel_err(y, ref) <= TOL[torch.float32] and rel_err(y_eval, ref) <= TOL[torch.float32]


def test_an_eps_below_the_smallest_normal_fp32_is_refused_and_the_least_one_taken(backend):
    """An eps below 2^-126 is subnormal or zero in the fp32 statistics: a constant group
    gave NaN. It is refused; the least eps taken gives a constant channel's output as
    batch norm then group norm in float64 does (beta, then the channel stage of it)."""
    with pytest.raises(ValueError, match="smallest normal float32"):
        wsbcn.BatchChannelNorm2d(8, 4, eps=1e-40)
    with pytest.raises(ValueError, match="smallest normal float32"):
        batch_channel_norm(torch.randn(2, 8, 3, 3, device=DEVICE), 4, training=True, eps=1e-40)
    torch.manual_seed(6)
    eps = 2.0 ** -126
    layer = wsbcn.BatchChannelNorm2d(8, 4, eps=eps).to(DEVICE)
    with torch.no_grad():
        layer.bias.copy_(torch.randn(8))
    x = torch.randn(2, 8, 4, 4, device=DEVICE)
    x[:, :2] = 0.5  # the first group: constant (its float64 batch mean exact, so the reference is too)
    y = layer(x)
    # written out in float64 (ATen's batch_norm folds (x - mean) r into x r - mean r, where
    # r = 2^63 loses beta entirely)
    x64, beta = x.double(), layer.bias.detach().double()[:, None, None]
    mean, var = x64.mean((0, 2, 3), keepdim=True)[0], x64.var((0, 2, 3), unbiased=False, keepdim=True)[0]
    u = (x64 - mean) / (var + eps).sqrt() + beta
    groups = u.reshape(2, 4, -1)
    g_mean, g_var = groups.mean(-1, keepdim=True), groups.var(-1, unbiased=False, keepdim=True)
    ref = ((groups - g_mean) / (g_var + eps).sqrt()).reshape_as(x64)
    assert torch.isfinite(y).all() and rel_err(y, ref) <= TOL[torch.float32]


LAYOUTS = {
    "1d_ncl": lambda: torch.randn(3, 8, 7),
    "1d_nc": lambda: torch.randn(5, 8),
    "2d_channels_last": lambda: torch.randn(2, 8, 3, 5).to(memory_format=torch.channels_last),
    "3d_channels_last": lambda: torch.randn(2, 8, 2, 3, 3).to(memory_format=torch.channels_last_3d),
    "3d_contiguous": lambda: torch.randn(2, 8, 2, 3, 2),
    "sliced": lambda: torch.randn(2, 16, 6, 5)[:, ::2, 1:5],
    "transposed_hw": lambda: torch.randn(2, 8, 5, 3).transpose(2, 3),
    "expanded_batch": lambda: torch.randn(1, 8, 3, 3).expand(3, 8, 3, 3),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("mode", ["batch", "estimate"])
def test_bcn_layouts(backend, layout, mode):
    torch.manual_seed(4)
    x = LAYOUTS[layout]().to(DEVICE) * 1.5 + 0.2
    # 4 channels a group: with S = 1 and 2 values a group the output is +-1 and dx
    # is pure rounding noise, an ill-conditioned comparison.
    check_bcn(x, 2, mode, activation="relu")


def test_channels_last_is_read_in_place_and_output_keeps_layout(backend):
    x = torch.randn(2, 8, 4, 4, device=DEVICE).to(memory_format=torch.channels_last)
    m = wsbcn.BatchChannelNorm2d(8, num_groups=4).to(DEVICE)
    y = m(x)
    assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", list(MODES))
def test_bcn_low_precision_inputs_fp32_params(backend, dtype, mode):
    """The autocast case: half-precision activations, fp32 parameters and buffers."""
    torch.manual_seed(5)
    x = (torch.randn(2, 8, 4, 4, device=DEVICE) * 2 + 1).to(dtype)
    check_bcn(x, 4, mode, activation="silu")


def test_bcn_large_common_offset_stays_accurate(backend):
    torch.manual_seed(6)
    x = 1e4 + torch.randn(4, 8, 6, 6, device=DEVICE)
    check_bcn(x, 4, "batch", tol=1e-5)
    # Estimates that track the data, as they do after a few steps (estimates far
    # from the data make the output ill-conditioned in any precision).
    params = _random_params(8, 4, True)
    params["running_mean"] += 1e4
    for mode in ("estimate", "eval"):
        check_bcn(x, 4, mode, tol=1e-5, params=params)


def test_n1_micro_batch(backend):
    torch.manual_seed(7)
    x = torch.randn(1, 8, 3, 3, device=DEVICE)
    for mode in MODES:
        check_bcn(x, 4, mode)
    single = torch.randn(1, 8, 1, 1, device=DEVICE)
    for mode in ("estimate", "eval"):
        check_bcn(single, 2, mode)  # 4 values a group (2 would make dx pure rounding noise)
    m = wsbcn.BatchChannelNorm2d(8, num_groups=4).to(DEVICE)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        m(single)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k])


def test_nan_propagates_like_reference(backend):
    x = torch.randn(2, 8, 3, 3, device=DEVICE)
    x[1, 5, 1, 1] = float("nan")
    for mode in MODES:
        training, estimate = MODES[mode]
        p = _random_params(8, 4, True)
        ref = bcn_reference(x, 4, training=training, estimate=estimate,
                            **{k: v.double().clone() for k, v in p.items()})
        ours = batch_channel_norm(x, 4, training=training, estimate=estimate, **p)
        assert torch.equal(torch.isnan(ours), torch.isnan(ref)), mode
        finite = ~torch.isnan(ref)
        if finite.any():
            assert rel_err(ours[finite], ref[finite]) <= 1e-5


def test_saved_for_backward_is_x_and_small_statistics(backend):
    """Only x and O(N*C) fp32 statistics (plus the parameters) are kept for backward:
    6 values per (n, c), one per channel and one per (n, group), in one or three tensors;
    the eager Triton path's one buffer also holds the backward's 3 coefficients per
    (n, c) (its scratch), each part starting on 16 bytes."""
    n, c, h, w, g = 2, 8, 6, 6, 4
    m = wsbcn.BatchChannelNorm2d(c, num_groups=g, activation="relu").to(DEVICE)
    x = torch.randn(n, c, h, w, device=DEVICE, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = m(x)
    params = {p.data_ptr() for p in m.parameters()}
    stats_numel = 6 * n * c + c + n * g
    if backend == "triton":
        stats_numel += 3 * n * c + 3 * 3  # coefficients, and at most 3 values of padding before each of 3 parts
    big = [t for t in saved if t.numel() > stats_numel]
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr()
    stats = [t for t in saved if t.data_ptr() != x.data_ptr() and t.data_ptr() not in params]
    assert all(t.dtype == torch.float32 for t in stats)
    assert sum(t.numel() for t in stats) <= stats_numel
    assert all(t.data_ptr() != y.data_ptr() for t in saved)


def _strided_copy(t):
    """``t``'s values as a stride-2 view (what a saved-tensor hook may give back)."""
    return t.reshape(-1).repeat_interleave(2)[::2].view(t.shape)


@pytest.mark.parametrize("layer", ["bcn", "bcn_estimate", "gn"])
@pytest.mark.parametrize("pack", ["contiguous", "channels_last", "strided_vectors"])
def test_saved_tensor_hook_giving_tensors_back_in_another_layout(backend, layer, pack):
    """A saved-tensor hook may give a tensor back in another layout than the forward's
    (torch.autograd.graph.save_on_cpu and a ``.contiguous()`` pack turn a channels_last x
    into NCHW; a hook may give 1-d tensors back as strided views): the gradients are still
    those of the forward's tensors (the eager Triton backward walks x with the strides its
    forward planned and indexes the saved statistics and parameters densely)."""
    torch.manual_seed(3)
    n, c, g = 2, 8, 2
    fmt = torch.contiguous_format if pack == "channels_last" else torch.channels_last
    x0 = (torch.randn(n, c, 3, 5, device=DEVICE) + 1).contiguous(memory_format=fmt)
    dy = torch.randn(n, c, 3, 5, device=DEVICE)
    p = _random_params(c, g, True)
    if layer == "gn":
        m = wsbcn.GroupNorm(g, c, activation="silu").to(DEVICE)
        with torch.no_grad():
            m.weight.copy_(p["weight"]), m.bias.copy_(p["bias"])
    else:
        m = wsbcn.BatchChannelNorm2d(c, num_groups=g, estimate=layer == "bcn_estimate", activation="silu").to(DEVICE)
        with torch.no_grad():
            for k in ("weight", "bias", "group_weight", "group_bias", "running_mean", "running_var"):
                getattr(m, k).copy_(p[k])
    x = x0.clone().requires_grad_()
    relayout = torch.channels_last if pack == "channels_last" else torch.contiguous_format
    if pack == "strided_vectors":  # every saved tensor but x: the side buffer, statistics, parameters
        hooks = (lambda t: t if t.dim() == 4 else _strided_copy(t)), (lambda t: t)
    else:
        hooks = (lambda t: t.contiguous(memory_format=relayout) if t.dim() == 4 else t), (lambda t: t)
    with torch.autograd.graph.saved_tensors_hooks(*hooks):
        y = m(x)
    y.backward(dy)
    xr = x0.double().requires_grad_()
    params = {k: m.get_parameter(k).detach().double().requires_grad_() for k, _ in m.named_parameters()}
    if layer == "gn":
        ref = gn_reference(xr, g, params["weight"], params["bias"], activation="silu")
    else:
        ref = bcn_reference(xr, g, params["weight"], params["bias"], params["group_weight"], params["group_bias"],
                            p["running_mean"].double(), p["running_var"].double(), training=True,
                            estimate=layer == "bcn_estimate", activation="silu")
    ref.backward(dy.double())
    assert rel_err(y, ref) <= TOL[torch.float32]
    assert rel_err(x.grad, xr.grad) <= TOL[torch.float32]
    for k, t in params.items():
        assert rel_err(m.get_parameter(k).grad, t.grad) <= TOL[torch.float32], k


@pytest.mark.parametrize("estimate", [False, True])
def test_released_state_dict_loads_and_matches(backend, estimate):
    torch.manual_seed(8)
    released = ReleasedBCNorm(8, 4, 1e-5, estimate=estimate).double()
    with torch.no_grad():
        for p in released.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        released.bn.running_mean.normal_(0, 0.3)
        released.bn.running_var.uniform_(0.5, 1.5)
        if estimate:
            released.bn.estbn_moving_speed.fill_(0.2)
    ours = wsbcn.BatchChannelNorm2d(8, num_groups=4, estimate=estimate).to(DEVICE)
    ours.load_state_dict(released.state_dict())
    assert ours.momentum == pytest.approx(0.2 if estimate else 0.1)
    x = torch.randn(2, 8, 3, 3, device=DEVICE) + 0.5
    for training in (True, False):
        released.train(training)
        ours.train(training)
        expected = released(x.double().cpu())
        got = ours(x)
        assert rel_err(got, expected) <= 1e-5
        assert rel_err(ours.running_mean, released.bn.running_mean) <= 1e-5
        assert rel_err(ours.running_var, released.bn.running_var) <= 1e-5


def test_bcn_module_state_dict_and_repr():
    m = wsbcn.BatchChannelNorm2d(64, num_groups=32, activation="relu")
    assert set(m.state_dict()) == {"weight", "bias", "group_weight", "group_bias", "running_mean",
                                   "running_var", "num_batches_tracked"}
    assert m.group_weight.shape == (1, 32, 1)
    assert repr(m) == ("BatchChannelNorm2d(64, num_groups=32, eps=1e-05, momentum=0.1, estimate=False, "
                       "affine=True, group_affine=True, activation='relu')")
    per_channel = wsbcn.BatchChannelNorm1d(16, num_groups=4, group_affine=False, affine=True)
    assert per_channel.group_weight.shape == (1, 16, 1)
    bare = wsbcn.BatchChannelNorm3d(16, num_groups=4, affine=False)
    assert bare.weight is None and "group_affine" not in repr(bare)
    bn = torch.nn.BatchNorm2d(64)
    missing = m.load_state_dict(bn.state_dict(), strict=False).missing_keys
    assert sorted(missing) == ["group_bias", "group_weight"]


def test_state_dicts_without_num_batches_tracked_load_as_batchnorm_loads_them():
    """Version < 2 (torch < 0.4.1, before num_batches_tracked) or no version metadata: the
    layer keeps its own count, as nn.BatchNorm2d does, directly and as a released layer's
    BN stage ("pbn."); a current state dict without the key is still an error, as there."""
    bn = torch.nn.BatchNorm2d(8)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
    old = bn.state_dict()
    del old["num_batches_tracked"]
    old._metadata = OrderedDict({"": {"version": 1}})
    released = OrderedDict([("weight", torch.full((1, 2, 1), 2.0)), ("bias", torch.zeros(1, 2, 1))] +
                           [("pbn." + k, v) for k, v in old.items()])
    released._metadata = OrderedDict({"": {"version": 1}, "pbn": {"version": 1}})
    unversioned = OrderedDict(old)  # a dict made by hand: no _metadata
    for state in (old, released, unversioned):
        torch_bn, m = torch.nn.BatchNorm2d(8), wsbcn.BatchChannelNorm2d(8, num_groups=2)
        torch_bn.num_batches_tracked.fill_(3)
        m.num_batches_tracked.fill_(3)
        torch_bn.load_state_dict(old if state is released else state, strict=True)
        missing = m.load_state_dict(state, strict=state is released).missing_keys
        assert int(m.num_batches_tracked) == int(torch_bn.num_batches_tracked) == 3
        assert torch.equal(m.running_mean, bn.running_mean) and set(missing) <= {"group_weight", "group_bias"}
    current = bn.state_dict()
    del current["num_batches_tracked"]
    for layer in (torch.nn.BatchNorm2d(8), wsbcn.BatchChannelNorm2d(8, num_groups=2)):
        assert "num_batches_tracked" in layer.load_state_dict(current, strict=False).missing_keys


@pytest.mark.parametrize("activation", [None, "silu"])
def test_without_running_stats_batch_statistics_in_eval_too(backend, activation):
    """track_running_stats=False, as nn.BatchNorm2d: no running buffers, and the BN stage
    normalizes with the batch's statistics in training and in eval; forward and the
    gradients of x and every parameter against the float64 reference."""
    torch.manual_seed(11)
    m = wsbcn.BatchChannelNorm2d(8, num_groups=4, activation=activation, track_running_stats=False).to(DEVICE)
    assert set(m.state_dict()) == {"weight", "bias", "group_weight", "group_bias"}
    assert m.running_mean is None and repr(m).endswith("track_running_stats=False)")
    m.reset_running_stats()  # nothing to reset, as nn.BatchNorm2d
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    for training in (True, False):
        m.train(training)
        x = (torch.randn(2, 8, 3, 5, device=DEVICE) * 2 + 1).requires_grad_(True)
        x64 = x.detach().double().requires_grad_(True)
        p64 = [t.detach().double().requires_grad_(True) for t in m.parameters()]
        ref = bcn_reference(x64, 4, *p64, training=True, activation=activation)
        y = m(x)
        assert rel_err(y, ref) <= TOL[torch.float32], training
        dy = torch.randn_like(y)
        got = torch.autograd.grad(y, [x, *m.parameters()], dy)
        want = torch.autograd.grad(ref, [x64, *p64], dy.double())
        for g, w in zip(got, want):
            assert rel_err(g, w) <= 1e-4, training
    with pytest.raises(ValueError, match="estimate=True .* needs track_running_stats=True"):
        wsbcn.BatchChannelNorm2d(8, num_groups=4, estimate=True, track_running_stats=False)
    with pytest.raises(ValueError, match="process_group .* needs track_running_stats=True"):
        wsbcn.BatchChannelNorm2d(8, num_groups=4, process_group=stand_in_group(), track_running_stats=False)


def test_track_running_stats_switched_off_later_is_read_on_every_call_as_batchnorm_reads_it(backend):
    """Set to False after construction (a common way to keep some batches out of the
    statistics): nn.BatchNorm2d then trains on batch statistics and leaves its buffers and
    num_batches_tracked, and in eval still normalizes with them. So does the BCN: outputs
    against the float64 reference, buffers against nn.BatchNorm2d's. With estimate=True
    or a process group it raises, as the constructor does, before anything changes."""
    torch.manual_seed(12)
    m = wsbcn.BatchChannelNorm2d(8, num_groups=4).to(DEVICE)
    bn = torch.nn.BatchNorm2d(8).double()
    with torch.no_grad():
        for t, r in ((m.running_mean, bn.running_mean), (m.running_var, bn.running_var)):
            t.copy_(torch.rand(8) + 0.5)
            r.copy_(t)
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    x = torch.randn(2, 8, 3, 5, device=DEVICE) * 2 + 1
    p64 = [t.detach().double() for t in m.parameters()]
    before = {k: v.clone() for k, v in m.state_dict().items()}
    m.track_running_stats = bn.track_running_stats = False
    bn(x.double())
    assert rel_err(m(x), bcn_reference(x.double(), 4, *p64, training=True)) <= TOL[torch.float32]
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert torch.equal(bn.running_mean, before["running_mean"].double()) and int(bn.num_batches_tracked) == 0
    m.eval()
    ref = bcn_reference(x.double(), 4, *p64, running_mean=before["running_mean"].double(),
                        running_var=before["running_var"].double(), training=False)
    assert rel_err(m(x), ref) <= TOL[torch.float32]
    m.train()
    m.track_running_stats = True  # on again: the next training step updates them
    m(x)
    assert int(m.num_batches_tracked) == 1 and not torch.equal(m.running_mean, before["running_mean"])
    for kwargs in (dict(estimate=True), dict(process_group=stand_in_group())):
        layer = wsbcn.BatchChannelNorm2d(8, num_groups=4, **kwargs).to(DEVICE)
        layer.track_running_stats = False
        _bad(lambda: layer(x), ValueError, "needs track_running_stats=True", layer)


def _bad(fn, exc, words, module=None):
    state = {k: v.clone() for k, v in module.state_dict().items()} if module is not None else None
    with pytest.raises(exc, match=words):
        fn()
    if module is not None:
        for k, v in module.state_dict().items():
            assert torch.equal(v, state[k]), k


def test_bad_bcn_inputs_raise_before_any_kernel(backend, monkeypatch):
    from wsbcn.ops import norm

    def no_kernel(*a, **k):
        raise AssertionError("a kernel ran before validation")

    monkeypatch.setattr(norm, "_norm_forward_impl", no_kernel)
    m = wsbcn.BatchChannelNorm2d(8, num_groups=4).to(DEVICE)
    x = torch.randn(2, 8, 3, 3, device=DEVICE)
    _bad(lambda: m(torch.randn(2, 6, 3, 3, device=DEVICE)), ValueError, "channels", m)
    _bad(lambda: m(torch.randn(2, 8, 3, device=DEVICE)), ValueError, "4D", m)
    _bad(lambda: m(x.to(torch.int32)), TypeError, "floating", m)
    _bad(lambda: m(x.to(torch.complex64)), TypeError, "floating", m)
    _bad(lambda: m([1.0]), TypeError, "Tensor", m)
    _bad(lambda: batch_channel_norm(x, 3, training=True), ValueError, "divisible", None)
    _bad(lambda: batch_channel_norm(x, 0, training=True), ValueError, "num_groups", None)
    _bad(lambda: batch_channel_norm(x, 4, training=True, eps=0.0), ValueError, "eps", None)
    _bad(lambda: batch_channel_norm(x, 4, training=True, activation="gelu"), ValueError, "activation", None)
    _bad(lambda: batch_channel_norm(x, 4, training=True, momentum=1.5), ValueError, "momentum", None)
    _bad(lambda: batch_channel_norm(x, 4, training=False), ValueError, "running_mean", None)
    _bad(lambda: batch_channel_norm(x, 4, training=True, estimate=True), ValueError, "running_mean", None)
    _bad(lambda: batch_channel_norm(x, 4, weight=torch.ones(5, device=DEVICE), bias=torch.ones(5, device=DEVICE),
                                    training=True), ValueError, "weight", None)
    _bad(lambda: batch_channel_norm(torch.randn(8, device=DEVICE), 4, training=True), ValueError, "dimensions", None)
    _bad(lambda: batch_channel_norm(x, 4, training=True, momentum=None, running_mean=torch.zeros(8, device=DEVICE),
                                    running_var=torch.ones(8, device=DEVICE)), ValueError, "num_batches_tracked", None)
    _bad(lambda: batch_channel_norm(x, 4, training=True, running_mean=torch.zeros(8, device=DEVICE),
                                    running_var=torch.ones(8, device=DEVICE), num_batches_tracked=5),
         TypeError, "num_batches_tracked must be a one-element integer tensor or None", None)
    for kwargs, words in ((dict(num_groups=0), "num_groups"), (dict(num_groups=3), "divisible"),
                          (dict(eps=-1.0), "eps"), (dict(activation="tanh"), "activation"),
                          (dict(momentum=-0.1), "momentum")):
        args = dict(num_channels=8, num_groups=4)
        args.update(kwargs)
        with pytest.raises(ValueError, match=words):
            wsbcn.BatchChannelNorm2d(**args)
    for make in (lambda: wsbcn.BatchChannelNorm2d(8, 4, dtype=torch.int64),
                 lambda: wsbcn.GroupNorm(4, 8, dtype=torch.int32)):
        with pytest.raises(TypeError, match="must be floating-point"):
            make()


def test_bad_running_buffers_raise_before_anything_changes(backend):
    m = wsbcn.BatchChannelNorm2d(8, num_groups=4).to(DEVICE)
    x = torch.randn(2, 8, 3, 3, device=DEVICE)
    m.num_batches_tracked = torch.tensor(False, device=DEVICE)  # a bool counter: rejected before anything runs
    _bad(lambda: m(x), ValueError, "num_batches_tracked must be a one-element integer tensor", m)
    m.num_batches_tracked = torch.tensor(0, device=DEVICE)
    m(x)  # (a signature validated with buffers that need no gradient does not let the next one through)
    m.running_mean.requires_grad_(True)  # nn.BatchNorm2d raises as well: no derivative for it
    _bad(lambda: m(x), ValueError, "running_mean requires grad", m)
    m.running_mean.requires_grad_(False)
    m.running_mean = torch.zeros(1, device=DEVICE).expand(8)  # one value under 8 names: no place for 8 statistics
    _bad(lambda: m(x), ValueError, "running_mean has elements sharing memory", m)
    with torch.no_grad():
        assert rel_err(m.eval()(x), bcn_reference(x.double(), 4, m.weight.double(), m.bias.double(),
                                                  m.group_weight.double(), m.group_bias.double(),
                                                  m.running_mean.double(), m.running_var.double(),
                                                  training=False)) <= TOL[torch.float32]  # read only: fine


def test_parameters_of_any_shape_with_their_channel_count(backend):
    """As F.batch_norm: a (2, 2) weight, bias and running buffers for 4 channels; both
    backends, against the float64 composition; the buffers update in place."""
    torch.manual_seed(6)
    x = torch.randn(2, 4, 3, 3, device=DEVICE, requires_grad=True)
    w = (torch.rand(2, 2, device=DEVICE) + 0.5).requires_grad_(True)
    b = torch.randn(2, 2, device=DEVICE).requires_grad_(True)
    rm, rv = torch.zeros(2, 2, device=DEVICE), torch.ones(2, 2, device=DEVICE)
    ref = {k: t.detach().double().reshape(-1).clone().requires_grad_(k in ("weight", "bias"))
           for k, t in (("weight", w), ("bias", b), ("running_mean", rm), ("running_var", rv))}
    y = batch_channel_norm(x, 2, rm, rv, w, b, training=True)
    x64 = x.detach().double().requires_grad_(True)
    yr = bcn_reference(x64, 2, ref["weight"], ref["bias"], None, None, ref["running_mean"], ref["running_var"],
                       training=True)
    dy = torch.randn_like(y)
    y.backward(dy)
    yr.backward(dy.double())
    assert rel_err(y, yr) <= TOL[torch.float32] and rel_err(x.grad, x64.grad) <= TOL[torch.float32]
    assert w.grad.shape == (2, 2) and rel_err(w.grad.reshape(-1), ref["weight"].grad) <= TOL[torch.float32]
    assert rel_err(rm.reshape(-1), ref["running_mean"]) <= TOL[torch.float32]
    assert rel_err(rv.reshape(-1), ref["running_var"]) <= TOL[torch.float32]


class _CountingKernel:
    """Wraps a Triton kernel and counts its launches."""

    def __init__(self, kernel, counter):
        self.kernel, self.counter = kernel, counter

    def __getitem__(self, grid):
        self.counter.append(getattr(self.kernel, "__name__", repr(self.kernel)))
        return self.kernel[grid]

    def __getattr__(self, name):  # arg_names and the rest, for the launch plans
        return getattr(self.kernel, name)


@pytest.mark.parametrize("shape,layout", [((1, 8, 40, 40), "contiguous"), ((3, 16, 5, 5), "channels_last"),
                                          ((2, 8, 7), "contiguous"), ((64, 8, 1, 1), "contiguous")])
@pytest.mark.parametrize("mode", list(MODES))
def test_three_launches_forward_and_backward_whatever_the_shape(monkeypatch, shape, layout, mode):
    from wsbcn.kernels import norm as knorm

    monkeypatch.setenv("WSBCN_BACKEND", "triton")
    launches = []
    for name in [n for n in dir(knorm) if n.startswith("_norm_") and n.endswith("_kernel")]:
        monkeypatch.setattr(knorm, name, _CountingKernel(getattr(knorm, name), launches))
    tuning.forget_loaded_tables()  # launch plans built before the patch hold the unwrapped kernels
    x = torch.randn(shape, device=DEVICE)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_(True)
    m = wsbcn.BatchChannelNorm2d(shape[1], num_groups=4, estimate=mode == "estimate", activation="relu")
    if len(shape) == 3:
        m = wsbcn.BatchChannelNorm1d(shape[1], num_groups=4, estimate=mode == "estimate", activation="relu")
    m = m.to(DEVICE).train(mode != "eval")
    y = m(x)
    assert len(launches) == 3
    y.backward(torch.randn_like(y))
    assert len(launches) == 6


@pytest.mark.parametrize("with_speed", [False, True])
def test_released_pbn_state_dict_loads_and_matches(backend, with_speed):
    """The BCN repository's ImageNet ``GN`` layer (imagenet/models/layers.py) and DeepLab
    ``PBCNorm`` (DeepLabV3/deeplab.py) keep their BN stage, an nn.BatchNorm2d /
    nn.SyncBatchNorm, under ``pbn.``; their own weight/bias, shape (1, G, 1), are the
    channel-stage affine. Such a state dict, written by hand with those key names,
    loads strictly and gives the float64 composition of its parameters."""
    torch.manual_seed(9)
    c, g = 8, 4
    gen = torch.Generator().manual_seed(9)
    released = {
        "weight": torch.rand(1, g, 1, generator=gen) + 0.5, "bias": torch.randn(1, g, 1, generator=gen),
        "pbn.weight": torch.rand(c, generator=gen) + 0.5, "pbn.bias": torch.randn(c, generator=gen),
        "pbn.running_mean": torch.randn(c, generator=gen) * 0.3,
        "pbn.running_var": torch.rand(c, generator=gen) + 0.5,
        "pbn.num_batches_tracked": torch.tensor(7),
    }
    if with_speed:
        released["pbn.estbn_moving_speed"] = torch.tensor([0.25])
    kept = {k: v.clone() for k, v in released.items()}
    ours = wsbcn.BatchChannelNorm2d(c, num_groups=g).to(DEVICE)
    result = ours.load_state_dict(released, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert all(torch.equal(released[k], kept[k]) for k in kept) and released.keys() == kept.keys()
    momentum = 0.25 if with_speed else 0.1
    assert ours.momentum == pytest.approx(momentum)
    ref = dict(weight=kept["pbn.weight"], bias=kept["pbn.bias"], group_weight=kept["weight"],
               group_bias=kept["bias"], running_mean=kept["pbn.running_mean"].double(),
               running_var=kept["pbn.running_var"].double())
    nbt = kept["pbn.num_batches_tracked"].clone()
    x = torch.randn(2, c, 3, 3, device=DEVICE) * 2 + 0.5
    for training in (True, False):
        ours.train(training)
        with torch.no_grad():
            got = ours(x)
        expected = bcn_reference(x.cpu(), g, training=training, momentum=momentum,
                                 num_batches_tracked=nbt, **ref)
        assert rel_err(got, expected) <= TOL[torch.float32], training
        assert rel_err(ours.running_mean, ref["running_mean"]) <= 1e-6
        assert rel_err(ours.running_var, ref["running_var"]) <= 1e-6
        assert int(ours.num_batches_tracked) == int(nbt) == 8


def test_released_state_dict_with_bad_moving_speed_changes_nothing():
    ours = wsbcn.BatchChannelNorm2d(8, num_groups=4, estimate=True)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    released = {"weight": torch.ones(1, 4, 1), "bias": torch.zeros(1, 4, 1), "bn.weight": torch.ones(8) * 2,
                "bn.bias": torch.ones(8), "bn.running_mean": torch.ones(8), "bn.running_var": torch.ones(8) * 3,
                "bn.num_batches_tracked": torch.tensor(5), "bn.estbn_moving_speed": torch.tensor([1.5])}
    with pytest.raises(ValueError, match="momentum"):
        ours.load_state_dict(released)
    assert ours.momentum == 0.1
    for k, v in ours.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_meta_tensors_take_the_closed_form_whatever_the_backend(monkeypatch):
    """Shapes only: with WSBCN_BACKEND=triton a meta input still gets a meta output of
    the right shape and dtype (no kernel runs on meta tensors)."""
    monkeypatch.setenv("WSBCN_BACKEND", "triton")
    m = wsbcn.BatchChannelNorm2d(8, num_groups=4, device="meta")
    gn = wsbcn.GroupNorm(4, 8, device="meta")
    conv = wsbcn.WSConv2d(8, 8, 3, device="meta")
    x = torch.empty(2, 8, 5, 5, device="meta")
    for layer in (m, gn, conv):
        y = layer(x)
        assert y.is_meta and y.shape[:2] == (2, 8) and y.dtype == x.dtype


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layer", ["bcn", "bcn per-channel affine", "bcn fp32 bn stage", "group norm"])
def test_parameter_gradients_are_autograds_cast_of_the_fp32_ones(monkeypatch, dtype, layer):
    """The eager Triton backward writes each parameter gradient in its parameter's dtype
    (autograd has nothing to cast): bitwise autograd's cast of the fp32 gradients, which
    the same kernels write when told to (the path of the torch.library op), also with
    parameters of two dtypes (a BN stage kept in fp32)."""
    from wsbcn.kernels.norm_plan import NormPlan
    from wsbcn.ops import norm

    monkeypatch.setenv("WSBCN_BACKEND", "triton")
    eager_backward = NormPlan.backward

    def fp32_backward(self, dy, x, saved, gamma, beta, omega, eta, **kwargs):
        dx, *grads = eager_backward(self, dy, x, saved, gamma, beta, omega, eta, fp32_grads=True, **kwargs)
        return (dx, *(g if g is None else g.view(p.shape) for g, p in zip(grads, (gamma, beta, omega, eta))))

    def gradients(in_fp32):
        norm._cache.clear()  # the validated calls and the ones recalled per site (checks.recalled)
        torch.manual_seed(0)
        if layer == "group norm":
            m = wsbcn.GroupNorm(4, 16)
        else:
            m = wsbcn.BatchChannelNorm2d(16, 4, group_affine=layer != "bcn per-channel affine")
        m = m.to(device=DEVICE, dtype=dtype)
        if layer == "bcn fp32 bn stage":
            m.weight.data, m.bias.data = m.weight.data.float(), m.bias.data.float()
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(torch.randn_like(p))
        x = torch.randn(2, 16, 5, 5, device=DEVICE, dtype=dtype, requires_grad=True)
        with monkeypatch.context() as patch:
            if in_fp32:
                patch.setattr(NormPlan, "backward", fp32_backward)
            y = m(x)
            return torch.autograd.grad(y, [x, *m.parameters()], torch.randn_like(y)), list(m.parameters())

    (ours, params), (cast, _) = gradients(False), gradients(True)
    for a, b, p in zip(ours, cast, [None, *params]):
        assert a.dtype == b.dtype == (dtype if p is None else p.dtype)
        assert torch.equal(a, b)
    if layer == "bcn fp32 bn stage":
        assert {g.dtype for g in ours[1:]} == {torch.float32, dtype}


@pytest.mark.parametrize("layer", ["bcn", "group norm"])
def test_parameters_and_running_buffers_with_gaps_or_repeats(backend, layer):
    """Parameters and running buffers that are views with gaps (every other element of a
    larger tensor) or repeats (an expanded group affine): bitwise the call on contiguous
    copies, the gradients reach the views' bases, and the running buffers' updates land
    in their own elements, the gaps between them untouched."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 4, 4, device=DEVICE)
    dy = torch.randn_like(x)
    bases = [torch.randn(16, device=DEVICE, requires_grad=True) for _ in range(2)]
    group = [torch.rand(1, 1, 1, device=DEVICE, requires_grad=True) + 0.5, torch.randn(1, 1, 1, device=DEVICE)]
    group[1].requires_grad_(True)

    def run(dense):
        weight, bias = (b[::2] for b in bases)
        omega, eta = (g.expand(1, 4, 1) for g in group)
        running = [torch.zeros(16, device=DEVICE), torch.ones(16, device=DEVICE)]
        rm, rv = (r[::2] for r in running)
        if dense:
            weight, bias, omega, eta, rm, rv = (t.contiguous() for t in (weight, bias, omega, eta, rm, rv))
        if layer == "bcn":
            y = batch_channel_norm(x, 4, rm, rv, weight, bias, omega, eta, training=True, momentum=0.5)
        else:
            y = wsbcn.functional.group_norm(x, 4, weight, bias)
        leaves = bases + ([] if layer != "bcn" else [g for g in group])
        grads = torch.autograd.grad(y, leaves, dy)
        return y, grads, (rm, rv), running

    y, grads, buffers, running = run(dense=False)
    y_ref, grads_ref, buffers_ref, _ = run(dense=True)
    assert torch.equal(y, y_ref)
    for g, g_ref in zip(grads, grads_ref):
        assert torch.equal(g, g_ref)
    if layer == "bcn":
        for b, b_ref, whole, fill in zip(buffers, buffers_ref, running, (0.0, 1.0)):
            assert torch.equal(b, b_ref) and not torch.equal(b_ref, torch.full_like(b_ref, fill))
            assert torch.equal(whole[1::2], torch.full_like(whole[1::2], fill))  # the gaps


@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("model_wide", [False, True])
def test_without_grad_the_layers_skip_autograd_and_compute_the_same(backend, monkeypatch, context, model_wide):
    """Under no_grad or inference_mode there is nothing for autograd to record: BCN,
    GroupNorm and WS (per layer and model-wide) run their op bodies without their
    autograd Functions, with the grad-enabled call's outputs and running buffers."""
    from wsbcn.ops.norm import NormFunction
    from wsbcn.ops.ws import WeightStandardizeFunction
    from wsbcn.ops.ws_model import ModelWeightStandardizeFunction

    def model():
        torch.manual_seed(0)
        layers = torch.nn.Sequential(wsbcn.WSConv2d(4, 8, 3, padding=1), wsbcn.BatchChannelNorm2d(8, 4),
                                     wsbcn.GroupNorm(4, 8), wsbcn.WSConv2d(8, 8, 1)).to(DEVICE)
        return layers, (wsbcn.ModelWeightStandardizer(layers) if model_wide else None)

    x = torch.randn(2, 4, 5, 5, device=DEVICE)
    with_grad, _ = model()
    y_ref = with_grad(x)
    assert y_ref.requires_grad
    without, _ = model()

    def refuse(*args):
        raise AssertionError("an autograd Function ran")

    for function in (NormFunction, WeightStandardizeFunction, ModelWeightStandardizeFunction):
        monkeypatch.setattr(function, "forward", staticmethod(refuse))
    with getattr(torch, context)():
        y = without(x)
    assert not y.requires_grad and torch.equal(y, y_ref.detach())
    for ours, theirs in zip(without.buffers(), with_grad.buffers()):
        assert torch.equal(ours, theirs)


def test_parameters_replaced_in_place_between_calls(backend):
    """A ``.data`` assignment between calls: of the same size and another shape the
    call needs nothing new (gradients take the new shape, values the float64
    reference's); of another size it is rejected with a ValueError naming the
    parameter before anything changes; of another dtype it is a new signature."""
    torch.manual_seed(3)
    m = wsbcn.BatchChannelNorm2d(8, 4).to(DEVICE)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.rand_like(p) + 0.5)
    x = torch.randn(2, 8, 3, 3, device=DEVICE, requires_grad=True)
    m(x)
    m.group_weight.data = m.group_weight.data.view(4)  # (1, 4, 1) -> (4,)
    m.group_bias.data = m.group_bias.data.view(4)
    ref = {k: t.detach().double().clone() for k, t in list(m.named_parameters()) + list(m.named_buffers())}
    for k in ("weight", "bias", "group_weight", "group_bias"):
        ref[k].requires_grad_(True)
    x64 = x.detach().double().requires_grad_(True)
    y = m(x)
    y_ref = bcn_reference(x64, 4, ref["weight"], ref["bias"], ref["group_weight"].view(1, 4, 1),
                          ref["group_bias"].view(1, 4, 1), ref["running_mean"], ref["running_var"],
                          num_batches_tracked=ref["num_batches_tracked"])
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *m.parameters()], dy)
    grads_ref = torch.autograd.grad(y_ref, [x64, ref["weight"], ref["bias"], ref["group_weight"], ref["group_bias"]],
                                    dy.double())
    assert rel_err(y, y_ref) <= TOL[torch.float32]
    for g, g_ref in zip(grads, grads_ref):
        assert g.shape == g_ref.shape and rel_err(g, g_ref) <= TOL[torch.float32]
    before = {k: t.clone() for k, t in m.state_dict().items()}
    m.weight.data = m.weight.data[:4]
    with pytest.raises(ValueError, match="weight must have 8 elements"):
        m(x)
    assert all(torch.equal(before[k], t) for k, t in m.state_dict().items() if k != "weight")
    m.weight.data = before["weight"].double()
    m.bias.data = before["bias"].double()
    y64 = m(x.detach().double())  # float64: the torch closed form on every backend
    assert y64.dtype == torch.float64 and rel_err(y64, y_ref) <= TOL[torch.float32] * 10


@pytest.mark.parametrize("layer", ["bcn", "group norm"])
def test_partial_sums_in_the_output_or_in_a_buffer_of_their_own_give_the_same_bits(monkeypatch, layer):
    """The partial sums of each pass live in the pass's output (y, dx) when they fit
    there, else in a buffer of their own: the same launches either way, so the same
    bits (output, every gradient, running buffers)."""
    from wsbcn.kernels import norm_plan
    from wsbcn.ops import norm

    monkeypatch.setenv("WSBCN_BACKEND", "triton")
    torch.manual_seed(0)
    x = torch.randn(2, 8, 6, 6, device=DEVICE, requires_grad=True)
    dy = torch.randn_like(x)

    def run(fits):
        monkeypatch.setattr(norm, "_cache", checks.CallCache())
        monkeypatch.setattr(norm, "_plans", {})
        monkeypatch.setattr(norm_plan, "_fits", fits)
        torch.manual_seed(1)
        m = wsbcn.GroupNorm(4, 8) if layer == "group norm" else wsbcn.BatchChannelNorm2d(8, 4)
        m = m.to(DEVICE)
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(torch.rand_like(p) + 0.5)
        y = m(x)
        (call,) = norm._cache.calls.values()
        plan = next(iter(call.plans.values()))
        grads = torch.autograd.grad(y, [x, *m.parameters()], dy)
        return plan, [y, *grads, *m.buffers()]

    fits = norm_plan._fits
    own_plan, own = run(lambda part_stride, nbytes: False)
    in_plan, inside = run(fits)
    assert not own_plan.part_in_y and in_plan.part_in_y
    assert not any(b.part_in_dx for b in own_plan._bwd.values()) and all(b.part_in_dx for b in in_plan._bwd.values())
    for a, b in zip(own, inside):
        assert torch.equal(a, b)


@pytest.mark.parametrize("buffer_dtype", [torch.bfloat16, torch.float16])
def test_estimate_mode_normalizes_with_the_estimates_as_narrower_buffers_hold_them(backend, buffer_dtype):
    """Estimate mode updates the running estimates, then normalizes with them as the
    buffers hold them: rounded to a half-precision buffer's dtype (what eval mode, and a
    recompute under activation checkpointing, read back). Before, it normalized with the
    unrounded fp32 values. The channel means sit far from zero against their spread, so
    the rounding of the mean (about 2e-3 of it) shows in y."""
    torch.manual_seed(5)
    n, c, g = 2, 8, 4
    x = (torch.randn(n, c, 5, 5) * 0.5 + torch.linspace(4, 12, c).view(1, c, 1, 1)).to(DEVICE)
    rm = (torch.linspace(4, 12, c) + 0.3 * torch.randn(c)).to(DEVICE, buffer_dtype)
    rv = torch.rand(c, device=DEVICE).add(0.5).to(buffer_dtype)
    weight, bias = torch.rand(c, device=DEVICE) + 0.5, torch.randn(c, device=DEVICE) * 0.1
    gw, gb = torch.rand(1, g, 1, device=DEVICE) + 0.5, torch.randn(1, g, 1, device=DEVICE) * 0.1
    rm64, rv64 = rm.double(), rv.double()
    bcn_reference(x, g, running_mean=rm64, running_var=rv64, training=True, estimate=True)  # the update
    y = batch_channel_norm(x, g, rm, rv, weight, bias, gw, gb, training=True, estimate=True)
    # y: eval mode's composition in float64 with the values the buffers now hold
    want = bcn_reference(x, g, weight, bias, gw, gb, rm.double(), rv.double(), training=False)
    assert rel_err(y, want) <= 1e-5
    # the buffers: the float64 update, to one unit of their last place (the Triton
    # interpreter converts to bfloat16 by truncation, a GPU to the nearest)
    for got, value in ((rm, rm64), (rv, rv64)):
        ulp = torch.finfo(buffer_dtype).eps * value.abs()
        assert ((got.double() - value).abs() <= ulp).all()


def test_a_parametrized_running_buffer_is_read_as_nn_batchnorm_reads_it(backend):
    """A parametrization on running_var takes it out of ``_buffers`` (the layer read
    only the dict: KeyError); the layer reads the attribute then, as nn.BatchNorm2d
    does: eval normalizes with the parametrized value, training updates that computed
    tensor and leaves the stored one as it is, as nn.BatchNorm2d's training does."""
    from torch.nn.utils import parametrize

    class Positive(torch.nn.Module):
        def forward(self, v):
            return v.abs() + 1e-3

    torch.manual_seed(5)
    m = wsbcn.BatchChannelNorm2d(8, num_groups=4).to(DEVICE)
    m.running_var.uniform_(-2.0, -0.5)
    parametrize.register_parametrization(m, "running_var", Positive())
    stored = m.parametrizations.running_var.original.clone()
    x = torch.randn(2, 8, 3, 3, device=DEVICE)
    m.train()(x)
    assert torch.equal(m.parametrizations.running_var.original, stored)
    assert m.num_batches_tracked.item() == 1
    y = m.eval()(x)
    ref = bcn_reference(x.double(), 4, m.weight, m.bias, m.group_weight, m.group_bias, m.running_mean.double(),
                        stored.double().abs() + 1e-3, training=False)
    assert rel_err(y, ref) <= 1e-5


@pytest.mark.parametrize("shape,groups", [((4, 16), 16), ((4, 16, 1, 1), 16), ((2, 8, 1, 1, 1), 8)])
def test_a_channel_stage_of_one_value_per_group_is_refused(shape, groups):
    """C / num_groups channels of one element each: every group is one value, normalized
    to 0, so the output is group_bias whatever the input (an SE block's (N, C, 1, 1), a
    head's (N, C) features). Refused with the reason, in every mode, before any buffer
    changes; two values per group are a channel stage again."""
    m = getattr(wsbcn, f"BatchChannelNorm{max(len(shape) - 2, 1)}d")(shape[1], num_groups=groups)
    x = torch.randn(shape)
    for training in (True, False):
        with pytest.raises(ValueError, match="one value per group"):
            m.train(training)(x)
    assert m.num_batches_tracked.item() == 0 and torch.equal(m.running_var, torch.ones(shape[1]))
    m2 = getattr(wsbcn, f"BatchChannelNorm{max(len(shape) - 2, 1)}d")(shape[1], num_groups=groups // 2)
    x64 = x.double()
    ref = bcn_reference(x64, groups // 2, running_mean=torch.zeros(shape[1], dtype=torch.float64),
                        running_var=torch.ones(shape[1], dtype=torch.float64), training=True)
    assert rel_err(m2.train()(x), ref) <= 1e-5
