"""Activation checkpointing (torch.utils.checkpoint) through BatchChannelNorm and WSConv:
the recompute in backward gives what the first forward gave, so the gradients are those
of the same step without checkpointing, and the running buffers are updated once."""
import copy

import pytest
import torch
from torch import nn
from torch.autograd import forward_ad as fwAD
from torch.utils.checkpoint import checkpoint

import wsbcn
from conftest import DEVICE, rel_err
from reference import bcn_reference


class _Net(nn.Module):
    """A stem, then two conv + BCN blocks in one checkpointed segment (or not)."""

    def __init__(self, estimate, checkpointing):
        super().__init__()
        self.stem = nn.Sequential(wsbcn.WSConv2d(3, 8, 3, padding=1, bias=False),
                                  wsbcn.BatchChannelNorm2d(8, num_groups=2, estimate=estimate, activation="relu"))
        self.body = nn.Sequential(
            wsbcn.WSConv2d(8, 8, 3, padding=1, bias=False),
            wsbcn.BatchChannelNorm2d(8, num_groups=4, estimate=estimate, activation="silu"),
            wsbcn.WSConv2d(8, 8, 1, bias=False), wsbcn.BatchChannelNorm2d(8, num_groups=2, estimate=estimate))
        self.checkpointing = checkpointing  # None, or use_reentrant

    def forward(self, x):
        x = self.stem(x)
        if self.checkpointing is None:
            return self.body(x)
        return checkpoint(self.body, x, use_reentrant=self.checkpointing)


def _estimates_away_from_init(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, wsbcn.BatchChannelNorm2d):
                m.running_mean.normal_(0, 0.3)
                m.running_var.uniform_(0.5, 2.0)


def _step(model, x, weights):
    x = x.clone().requires_grad_(True)
    out = model(x)
    (out * weights).sum().backward()
    return out.detach(), x.grad, {n: p.grad for n, p in model.named_parameters()}, dict(model.named_buffers())


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("estimate", [False, True], ids=["batch", "estimate"])
@pytest.mark.parametrize("backend, ws", [  # the Triton interpreter's cases in the slow pass (~5 s each)
    ("torch", "per-layer"), ("torch", "model-wide"),
    pytest.param("triton", "per-layer", marks=pytest.mark.slow),
    pytest.param("triton", "model-wide", marks=pytest.mark.slow),
])
def test_checkpointed_step_matches_the_plain_step(monkeypatch, backend, ws, estimate, reentrant):
    """Before, the recompute updated the running buffers a second time (as nn.BatchNorm
    does), and in estimate mode normalized with those twice-updated estimates: its output,
    and so the gradients, differed from the first forward's. With model-wide WS, the
    non-reentrant recompute standardized per layer and saved other tensors than the
    forward had (torch's CheckpointError)."""
    monkeypatch.setenv("WSBCN_BACKEND", backend)
    torch.manual_seed(0)
    plain = _Net(estimate, None).to(DEVICE)
    if ws == "model-wide":
        wsbcn.ModelWeightStandardizer(plain)  # copied with the model below
    _estimates_away_from_init(plain)
    checkpointed = copy.deepcopy(plain)
    checkpointed.checkpointing = reentrant
    x = torch.randn(2, 3, 6, 6, device=DEVICE)
    weights = torch.randn(2, 8, 6, 6, device=DEVICE)
    want, got = _step(plain, x, weights), _step(checkpointed, x, weights)
    assert torch.equal(got[0], want[0])
    assert rel_err(got[1], want[1]) <= 1e-6
    for name, grad in want[2].items():
        assert rel_err(got[2][name], grad) <= 1e-6, name
    for name, buffer in want[3].items():  # updated once
        assert torch.equal(got[3][name], buffer), name
    assert int(checkpointed.body[1].num_batches_tracked) == 1
    if ws == "model-wide":  # the W_hat kept for the recompute is let go once the backward is through
        standardizer = checkpointed.body[0]._ws_model
        assert standardizer.model is checkpointed and standardizer._kept is None


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("twice", ["two segments", "one segment"])
def test_two_checkpointed_micro_batches_then_one_backward(backend, reentrant, twice):
    """Micro-batch BCN run on two inputs before one backward (two micro-batches, two
    views), each the input of a checkpoint: each recompute normalizes with the estimates
    its own forward did, though the second forward has updated the buffers since (it
    took those: dx off by 6e-2, the weight's gradient by 0.3). Against the float64
    composition. (An input the region computes reads the buffers: README.)"""
    _two_checkpointed_micro_batches(reentrant, twice)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_two_checkpointed_micro_batches_inside_a_dual_level(backend, reentrant):
    """The same inside a forward-AD dual level (no tangent given), where a call misses its
    hot path: a call that has one (``_Call.fast``: on torch 2.11-2.13, and on 2.14 and
    later since `aab8821`) kept no estimates there (a.grad off by 0.1)."""
    with fwAD.dual_level():
        _two_checkpointed_micro_batches(reentrant, "two segments")


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_two_checkpointed_micro_batches_with_strided_running_buffers(backend, reentrant):
    """The same with running buffers that are views with gaps (every other element of a
    longer tensor), which the layer hands over as dense copies: each forward's estimates
    were kept under its own copy, which no recompute finds (a.grad off by 3e-2)."""
    _two_checkpointed_micro_batches(reentrant, "two segments", strided=True)


def _two_checkpointed_micro_batches(reentrant, twice, strided=False):
    torch.manual_seed(7)
    layer = wsbcn.BatchChannelNorm2d(8, num_groups=2, estimate=True).to(DEVICE)
    _estimates_away_from_init(layer)
    if strided:
        for name in ("running_mean", "running_var"):
            longer = getattr(layer, name).repeat_interleave(2)
            setattr(layer, name, longer[::2])
    names = ("weight", "bias", "group_weight", "group_bias", "running_mean", "running_var")
    ref = {k: getattr(layer, k).detach().double().clone().requires_grad_(k in names[:4]) for k in names}
    a, b = (torch.randn(2, 8, 3, 3, device=DEVICE) * 2 + 1).requires_grad_(True), \
        (torch.randn(2, 8, 3, 3, device=DEVICE) - 1).requires_grad_(True)
    ga, gb = torch.randn_like(a), torch.randn_like(b)
    if twice == "two segments":
        ya, yb = (checkpoint(layer, x, use_reentrant=reentrant) for x in (a, b))
    else:
        ya, yb = checkpoint(lambda u, v: (layer(u), layer(v)), a, b, use_reentrant=reentrant)
    ((ya * ga).sum() + (yb * gb).sum()).backward()
    a64, b64 = (t.detach().double().requires_grad_(True) for t in (a, b))
    ya64, yb64 = (bcn_reference(t, 2, *(ref[k] for k in names), training=True, estimate=True) for t in (a64, b64))
    ((ya64 * ga.double()).sum() + (yb64 * gb.double()).sum()).backward()
    for got, want in ((ya, ya64), (yb, yb64), (a.grad, a64.grad), (b.grad, b64.grad),
                      *((getattr(layer, k).grad, ref[k].grad) for k in names[:4]),
                      *((getattr(layer, k), ref[k]) for k in names[4:])):
        assert rel_err(got, want) <= 1e-5
    assert int(layer.num_batches_tracked) == 2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_checkpointed_half_precision_model_matches_the_plain_step(backend, dtype):
    """A model cast to a half dtype keeps its running estimates in it. Estimate mode
    normalizes with them as the buffers hold them, which the recompute reads back: the
    gradients are the plain step's (before, the first forward used the unrounded values,
    and the gradients differed by up to a few percent)."""
    torch.manual_seed(1)
    plain = _Net(True, None).to(DEVICE, dtype)
    _estimates_away_from_init(plain)
    checkpointed = copy.deepcopy(plain)
    checkpointed.checkpointing = False
    x = torch.randn(2, 3, 6, 6, device=DEVICE, dtype=dtype)
    weights = torch.randn(2, 8, 6, 6, device=DEVICE, dtype=dtype)
    want, got = _step(plain, x, weights), _step(checkpointed, x, weights)
    assert rel_err(got[1].float(), want[1].float()) <= 1e-6
    for name, grad in want[2].items():
        assert rel_err(got[2][name].float(), grad.float()) <= 1e-6, name
    for name, buffer in want[3].items():
        assert torch.equal(got[3][name], buffer), name


class _Twice(nn.Module):
    """One WSConv called twice inside the checkpointed segment."""

    def __init__(self, checkpointing):
        super().__init__()
        self.stem = wsbcn.WSConv2d(3, 8, 3, padding=1)
        self.conv, self.norm = wsbcn.WSConv2d(8, 8, 3, padding=1), wsbcn.GroupNorm(4, 8)
        self.checkpointing = checkpointing

    def body(self, x):
        return self.norm(self.conv(self.conv(x)))

    def forward(self, x):
        x = self.stem(x)
        return checkpoint(self.body, x, use_reentrant=False) if self.checkpointing else self.body(x)


def test_model_wide_layer_called_twice_in_a_checkpointed_segment(monkeypatch):
    """The forward hands the layer its W_hat once and standardizes the second call per
    layer; the non-reentrant recompute must do the same, or it saves other tensors."""
    monkeypatch.setenv("WSBCN_BACKEND", "torch")
    torch.manual_seed(2)
    plain = _Twice(False).to(DEVICE)
    checkpointed = copy.deepcopy(plain)
    checkpointed.checkpointing = True
    for model in (plain, checkpointed):
        wsbcn.ModelWeightStandardizer(model)
    x = torch.randn(2, 3, 6, 6, device=DEVICE)
    weights = torch.randn(2, 8, 6, 6, device=DEVICE)
    want, got = _step(plain, x, weights), _step(checkpointed, x, weights)
    for name, grad in want[2].items():
        assert rel_err(got[2][name], grad) <= 1e-6, name


def test_model_wide_forward_without_backward_keeps_nothing(monkeypatch):
    """Outside a checkpoint nothing is kept for a recompute: a forward with gradients on
    and no backward (a validation step without no_grad) leaves no graph alive, so
    module.to() by torch.utils.swap_tensors still works. Before, the kept W_hat held the
    forward's graph and its saved weights, and swap_tensors refused them."""
    monkeypatch.setenv("WSBCN_BACKEND", "torch")
    model = _Net(False, None).to(DEVICE)
    wsbcn.ModelWeightStandardizer(model)
    model(torch.randn(2, 3, 6, 6, device=DEVICE))
    weight = model.stem[0].weight
    previous = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model.double()
    finally:
        torch.__future__.set_swap_module_params_on_conversion(previous)
    assert model.stem[0].weight is weight and weight.dtype == torch.float64
    out = model(torch.randn(2, 3, 6, 6, device=DEVICE, dtype=torch.float64))
    out.sum().backward()
    assert out.dtype == torch.float64 and weight.grad.dtype == torch.float64


class _ConvsCheckpointedInside(nn.Module):
    """Three WSConvs, the middle one in a non-reentrant checkpoint inside a model whose
    forward torch.compile traces (dynamo runs the checkpoint eagerly, apart)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = (wsbcn.WSConv2d(3, 8, 3, padding=1), wsbcn.WSConv2d(8, 8, 3, padding=1),
                                  wsbcn.WSConv2d(8, 4, 1))

    def forward(self, x):
        return self.c(checkpoint(self.b, self.a(x), use_reentrant=False))


def test_compiled_model_wide_ws_with_a_checkpoint_inside_gives_the_float64_gradients(backend):
    """A compiled forward validates no weights in the standardizer: the recompute of a
    checkpointed layer looked its weight up there and failed (TypeError on None). The
    W_hat kept for the recompute now carries the weight it was computed from."""
    from torch.nn import functional as F
    from reference import ws_reference

    torch.manual_seed(0)
    model = _ConvsCheckpointedInside().to(DEVICE)
    wsbcn.ModelWeightStandardizer(model)
    x = torch.randn(2, 3, 6, 6, device=DEVICE)
    weights = torch.randn(2, 4, 6, 6, device=DEVICE)
    torch._dynamo.reset()
    (torch.compile(model, backend="aot_eager")(x) * weights).sum().backward()
    params = {n: p.detach().double().requires_grad_(True) for n, p in model.named_parameters()}
    y = x.double()
    for name, padding in (("a", 1), ("b", 1), ("c", 0)):
        y = F.conv2d(y, ws_reference(params[f"{name}.weight"]), params[f"{name}.bias"], padding=padding)
    (y * weights.double()).sum().backward()
    for name, p in model.named_parameters():
        assert rel_err(p.grad, params[name].grad) <= 1e-5, name
