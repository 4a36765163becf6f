"""The networks and layers the benchmarks run (wsbcn/tools/models.py): the authors'
released WS and BCN layers (the "reference" baselines) compute what the one naive
float64 reference (tests/reference.py) computes, the ResNet-50 trunk has
torchvision's strides, and reference_ws_bcn and wsbcn_ws_bcn are the same network."""
import pytest
import torch

from conftest import TOL, rel_err
from reference import bcn_reference, ws_reference
from wsbcn.tools import models
from wsbcn.tools.models import resnet50_trunk


def test_the_released_ws_is_the_reference_ws_with_the_released_convention():
    w = torch.randn(8, 4, 3, 3, dtype=torch.float64) * 3 + 1
    expected = ws_reference(w, eps=1e-5, correction=1, eps_mode="std")
    assert rel_err(models.reference_ws(w), expected) < TOL[torch.float64]


@pytest.mark.parametrize("estimate", [False, True])
def test_the_released_bcn_is_the_reference_bcn(estimate):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 8, 3, 5, dtype=torch.float64, generator=gen) * 2 + 1).requires_grad_(True)
    params = [torch.rand(8, dtype=torch.float64, generator=gen) + 0.5, torch.randn(8, dtype=torch.float64, generator=gen),
              torch.rand(1, 4, 1, dtype=torch.float64, generator=gen) + 0.5,
              torch.randn(1, 4, 1, dtype=torch.float64, generator=gen)]
    params = [p.requires_grad_(True) for p in params]
    running = (torch.randn(8, dtype=torch.float64, generator=gen), torch.rand(8, dtype=torch.float64, generator=gen) + 0.5)
    buffers = [tuple(b.clone() for b in running) for _ in range(2)]
    outs = [models.reference_bcn(x, 4, *params, *buffers[0], training=True, estimate=estimate),
            bcn_reference(x, 4, *params, running_mean=buffers[1][0], running_var=buffers[1][1], training=True,
                          estimate=estimate)]
    dy = torch.randn(x.shape, dtype=torch.float64, generator=gen)
    grads = [torch.autograd.grad(out, [x, *params], dy) for out in outs]
    assert rel_err(outs[0], outs[1]) < TOL[torch.float64]
    for got, expected in zip(*grads):
        assert rel_err(got, expected) < TOL[torch.float64]
    for got, expected in zip(*buffers):  # the running estimates, updated in place
        assert rel_err(got, expected) < TOL[torch.float64]


def test_trunk_has_torchvision_strides_and_no_head():
    # Shapes only, on the meta device: no memory, no arithmetic. torchvision's
    # resnet50 (and detectron's C2..C5) at 800 x 1216: strides 4, 8, 16, 32 with
    # 256, 512, 1024, 2048 channels; every stride-2 step rounds up, so 801 x 1217
    # gives ceil(801 / 32) x ceil(1217 / 32) = 26 x 39 at layer4.
    with torch.device("meta"):
        trunk = resnet50_trunk("plain_bn")
        assert not any(name.startswith(("fc", "avgpool")) for name, _ in trunk.named_modules() if name)
        shapes = {}
        for name in ("layer1", "layer2", "layer3", "layer4"):
            getattr(trunk, name).register_forward_hook(lambda m, i, o, name=name: shapes.__setitem__(name, o.shape))
        out = trunk(torch.empty(2, 3, 800, 1216))
        assert shapes == {"layer1": (2, 256, 200, 304), "layer2": (2, 512, 100, 152),
                          "layer3": (2, 1024, 50, 76), "layer4": (2, 2048, 25, 38)}
        assert out.shape == (2, 2048, 25, 38)
        assert trunk(torch.empty(1, 3, 801, 1217)).shape == (1, 2048, 26, 39)


def _randomize_norm_affines(model, gen):
    """Non-trivial BN-stage and channel-stage affines, so that a parameter landing in
    the wrong place on the other network changes the result."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("bn1.weight", "bn2.weight", "bn3.weight", "downsample.1.weight", "group_weight")):
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
            elif name.endswith(("bn1.bias", "bn2.bias", "bn3.bias", "downsample.1.bias", "group_bias")):
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))


def test_wsbcn_ws_bcn_trunk_is_the_reference_ws_bcn_trunk_in_float64():
    # reference_ws_bcn is the naive eager composition (the released WS formula, then
    # F.batch_norm over channels and over (sample, group)); wsbcn_ws_bcn must be the
    # same network: same state dict, same loss, same gradients, same running stats.
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    ref = resnet50_trunk("reference_ws_bcn")
    _randomize_norm_affines(ref, gen)
    ours = resnet50_trunk("wsbcn_ws_bcn")
    result = ours.load_state_dict(ref.state_dict(), strict=False)
    # the reference has no num_batches_tracked: as nn.BatchNorm does for a state dict of a
    # module of version < 2, each layer keeps its own count
    assert not result.unexpected_keys and not result.missing_keys
    ref, ours = ref.double().train(), ours.double().train()
    x = torch.randn(2, 3, 48, 72, dtype=torch.float64, generator=gen)
    losses, outs = [], []
    for model in (ref, ours):
        out = model(x)
        loss = out.square().mean()  # the detection case's loss
        loss.backward()
        losses.append(loss.item())
        outs.append(out.detach())
    assert outs[1].shape == (2, 2048, 2, 3)
    # Seen: loss 1e-15, output 2e-13, gradients < 1e-12 apart. The BN stage after
    # each conv cancels a per-channel scale, so another WS formula (biased variance,
    # eps inside the root) moves the loss by only ~1e-9 but the gradients by ~2e-7:
    # the gradients are the sharp check.
    assert abs(losses[1] - losses[0]) <= 1e-12 * abs(losses[0])
    assert rel_err(outs[1], outs[0]) < 1e-11
    ref_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        assert rel_err(p.grad, ref_params[name].grad) < TOL[torch.float64], name
    ref_buffers = dict(ref.named_buffers())
    for name, b in ours.named_buffers():
        if name.endswith(("running_mean", "running_var")):
            assert rel_err(b, ref_buffers[name]) < TOL[torch.float64], name
