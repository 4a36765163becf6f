"""wsbcn.update_bn (stochastic weight averaging's pass over the data) against the float64
cumulative average of the batches' statistics, BatchChannelNorm and BatchNorm alike."""
import pytest
import torch
from torch import nn

import wsbcn
from conftest import TOL, rel_err
from reference import bcn_reference, conv_nd, ws_reference


def _model():
    torch.manual_seed(21)
    model = nn.Sequential(wsbcn.WSConv2d(3, 8, 3, padding=1),
                          wsbcn.BatchChannelNorm2d(8, num_groups=4, estimate=True, momentum=0.3),
                          nn.ReLU(), nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8))
    with torch.no_grad():  # statistics of other weights, as after training: all to be replaced
        for norm in (model[1], model[4]):
            norm.running_mean.uniform_(-3, 3)
            norm.running_var.uniform_(5, 9)
            norm.num_batches_tracked.fill_(40)
            if norm.weight is not None:
                norm.weight.uniform_(0.5, 1.5)
                norm.bias.normal_()
        model[1].group_weight.uniform_(0.5, 1.5)
        model[1].group_bias.normal_()
    return model


def _batch_stats(h):
    """Per channel: the mean and unbiased variance over (N, H, W), float64."""
    flat = h.transpose(0, 1).reshape(h.shape[1], -1)
    return flat.mean(dim=1), flat.var(dim=1, unbiased=True)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_update_bn_recomputes_batch_channel_norm_and_batch_norm_statistics(monkeypatch, backend):
    """Every BatchChannelNorm (an estimate=True one with batch statistics, as a BatchNorm)
    and BatchNorm takes the mean over the loader of each batch's mean and unbiased
    variance; momenta, estimate flags and each module's training flag are put back."""
    monkeypatch.setenv("WSBCN_BACKEND", backend)
    model = _model().eval()
    model[3].train()  # a module's own flag, put back as it was
    torch.manual_seed(22)
    loader = [(torch.randn(2, 3, 5, 5) * 2 + 1, torch.tensor([0, 1])) for _ in range(3)]
    conv, bcn, _, conv2, bn = model
    w_hat = ws_reference(conv.weight.double())
    means = {1: [], 4: []}
    for x, _ in loader:
        h = conv_nd(x.double(), w_hat, conv.bias.double(), conv)
        means[1].append(_batch_stats(h))
        y = bcn_reference(h, 4, bcn.weight.double(), bcn.bias.double(), bcn.group_weight.double(),
                          bcn.group_bias.double(), training=True, activation="relu")
        means[4].append(_batch_stats(conv_nd(y, conv2.weight.double(), conv2.bias.double(), conv2)))

    wsbcn.update_bn(loader, model)

    for i, norm in ((1, bcn), (4, bn)):
        mean = torch.stack([m for m, _ in means[i]]).mean(dim=0)
        var = torch.stack([v for _, v in means[i]]).mean(dim=0)
        assert rel_err(norm.running_mean, mean) <= TOL[torch.float32]
        assert rel_err(norm.running_var, var) <= TOL[torch.float32]
        assert norm.num_batches_tracked.item() == 3
    assert (bcn.momentum, bn.momentum, bcn.estimate) == (0.3, 0.1, True)
    assert [m.training for m in model.modules()] == [False, False, False, False, True, False]


def test_update_bn_puts_flags_back_when_a_forward_raises():
    model = _model().train()

    def loader():
        yield torch.randn(2, 3, 5, 5)
        yield torch.randn(2, 4, 5, 5)  # the wrong channel count: the conv raises

    with pytest.raises(RuntimeError):
        wsbcn.update_bn(loader(), model)
    assert (model[1].momentum, model[4].momentum, model[1].estimate) == (0.3, 0.1, True)
    assert all(m.training for m in model.modules())


def test_update_bn_moves_each_batch_to_the_device_and_skips_a_model_without_norms():
    """``device``: each batch is moved there with ``.to`` (a list's first element is the
    input); a model with no norm runs no forward, as torch's update_bn."""
    seen = []
    model = nn.Sequential(nn.Identity())
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    wsbcn.update_bn([torch.zeros(1)], model)
    assert seen == []
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        wsbcn.update_bn([torch.zeros(1)], "model")

    class Batch:
        def to(self, device):
            seen.append(device)
            return torch.randn(2, 3, 5, 5)

    model = _model()
    wsbcn.update_bn([[Batch(), "label"]], model, device="cpu")
    assert seen == ["cpu"] and model[1].num_batches_tracked.item() == 1
