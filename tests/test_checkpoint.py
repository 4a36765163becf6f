"""Activation checkpointing (torch.utils.checkpoint) through BatchChannelNorm and WSConv:
the recompute in backward gives what the first forward gave, so the gradients are those
of the same step without checkpointing, and the running buffers are updated once."""
import copy

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import wsbcn
from conftest import DEVICE, rel_err


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


def _step(model, x, weights):
    x = x.clone().requires_grad_(True)
    out = model(x)
    (out * weights).sum().backward()
    return out.detach(), x.grad, {n: p.grad for n, p in model.named_parameters()}, dict(model.named_buffers())


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("estimate", [False, True], ids=["batch", "estimate"])
def test_checkpointed_step_matches_the_plain_step(backend, estimate, reentrant):
    """Before, the recompute updated the running buffers a second time (as nn.BatchNorm
    does), and in estimate mode normalized with those twice-updated estimates: its output,
    and so the gradients, differed from the first forward's."""
    torch.manual_seed(0)
    plain = _Net(estimate, None).to(DEVICE)
    with torch.no_grad():  # running estimates away from their initial values
        for m in plain.modules():
            if isinstance(m, wsbcn.BatchChannelNorm2d):
                m.running_mean.normal_(0, 0.3)
                m.running_var.uniform_(0.5, 2.0)
    checkpointed = copy.deepcopy(plain)
    checkpointed.checkpointing = reentrant
    x = torch.randn(2, 3, 6, 6, device=DEVICE)
    weights = torch.randn(2, 8, 6, 6, device=DEVICE)
    for _ in range(2):  # two training steps (no optimizer: the buffers carry over)
        want, got = _step(plain, x, weights), _step(checkpointed, x, weights)
        assert torch.equal(got[0], want[0])
        assert rel_err(got[1], want[1]) <= 1e-6
        for name, grad in want[2].items():
            assert rel_err(got[2][name], grad) <= 1e-6, name
        for name, buffer in want[3].items():  # updated once per step
            assert torch.equal(got[3][name], buffer), name
        plain.zero_grad()
        checkpointed.zero_grad()
    assert int(checkpointed.body[1].num_batches_tracked) == 2
