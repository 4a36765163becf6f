"""Eager PyTorch baselines with the semantics of the authors' released layers.

These are what users run today without wsbcn; ``wsbcn bench`` measures against
them (and against torch.compile of them). They are not used by the wsbcn ops.
"""
import torch
import torch.nn.functional as F
from torch import nn


def reference_ws(weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """The released WS formula: (W - mean) / (std_unbiased + eps) over dims 1..."""
    dims = tuple(range(1, weight.dim()))
    mean = weight.mean(dim=dims, keepdim=True)
    centered = weight - mean
    std = centered.reshape(weight.shape[0], -1).std(dim=1).reshape((-1,) + (1,) * (weight.dim() - 1)) + eps
    return centered / std


def reference_bcn(x, num_groups, weight, bias, group_weight, group_bias, running_mean, running_var,
                  training=True, estimate=False, momentum=0.1, eps=1e-5):
    """BN stage (nn.BatchNorm or EstBN semantics) then the released channel stage."""
    if estimate and training:
        with torch.no_grad():
            dims = [0] + list(range(2, x.dim()))
            shape_c = (1, -1) + (1,) * (x.dim() - 2)
            batch_mean = x.mean(dim=dims)
            centred = x - running_mean.view(shape_c)
            batch_var = (centred * centred).mean(dim=dims)
            running_mean.mul_(1 - momentum).add_(momentum * batch_mean)
            running_var.mul_(1 - momentum).add_(momentum * batch_var)
        out = F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)
    else:
        out = F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    n = x.shape[0]
    out = out.reshape(1, n * num_groups, -1)
    out = F.batch_norm(out, None, None, None, None, True, 0.0, eps)
    out = out.reshape(n, num_groups, -1)
    out = group_weight * out + group_bias
    return out.reshape(x.shape)


class ReferenceWSConv2d(nn.Conv2d):
    """The released WS conv: standardize with the eager formula on every call."""

    def forward(self, x):
        return self._conv_forward(x, reference_ws(self.weight), self.bias)


class ReferenceBCN2d(nn.Module):
    """The released BCNorm (estimate=False: nn.BatchNorm2d then the channel stage)."""

    def __init__(self, num_channels, num_groups=32, eps=1e-5, momentum=0.1, estimate=False):
        super().__init__()
        self.num_groups, self.eps, self.momentum, self.estimate = num_groups, eps, momentum, estimate
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.group_weight = nn.Parameter(torch.ones(1, num_groups, 1))
        self.group_bias = nn.Parameter(torch.zeros(1, num_groups, 1))
        self.register_buffer("running_mean", torch.zeros(num_channels))
        self.register_buffer("running_var", torch.ones(num_channels))

    def forward(self, x):
        return reference_bcn(x, self.num_groups, self.weight, self.bias, self.group_weight, self.group_bias,
                             self.running_mean, self.running_var, self.training, self.estimate,
                             self.momentum, self.eps)
