"""What the benchmarks run besides wsbcn: the authors' released WS and BCN layers
(the eager baselines users run without wsbcn: the "reference" providers of ``wsbcn
bench`` and the reference_ws_bcn network), and a ResNet-50 (torchvision's v1.5
layout) with pluggable conv and norm layers, so benchmarks need no torchvision; with
``num_classes=None`` the trunk alone, as detectors use it.

The released layers are baselines to time, in the input's dtype, not the naive
float64 reference that tests check every backend against (tests/reference.py);
tests/tools/test_models.py checks that they compute what it computes.
"""
from functools import partial

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


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, conv, norm, in_planes, planes, stride=1, downsample=None):
        super().__init__()
        width = planes
        self.conv1 = conv(in_planes, width, 1, bias=False)
        self.bn1 = norm(width)
        self.conv2 = conv(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = norm(width)
        self.conv3 = conv(width, planes * self.expansion, 1, bias=False)
        self.bn3 = norm(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """``num_classes=None`` builds the trunk (backbone) alone: no avgpool, no fc, and
    ``forward`` returns layer4's (N, 2048, H/32, W/32) feature map (each stride-2
    step rounds up), the input of a detector's FPN or heads."""

    def __init__(self, layers=(3, 4, 6, 3), num_classes=1000, conv=nn.Conv2d, norm=nn.BatchNorm2d, width=64):
        super().__init__()
        self.in_planes = width
        self.conv1 = conv(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = norm(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        stages = []
        for i, blocks in enumerate(layers):
            stages.append(self._make_stage(conv, norm, width * 2**i, blocks, stride=1 if i == 0 else 2))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        if num_classes is not None:
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(self.in_planes, num_classes)
        else:
            self.avgpool = self.fc = None

    def _make_stage(self, conv, norm, planes, blocks, stride):
        downsample = None
        if stride != 1 or self.in_planes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(
                conv(self.in_planes, planes * Bottleneck.expansion, 1, stride=stride, bias=False),
                norm(planes * Bottleneck.expansion),
            )
        layers = [Bottleneck(conv, norm, self.in_planes, planes, stride, downsample)]
        self.in_planes = planes * Bottleneck.expansion
        layers += [Bottleneck(conv, norm, self.in_planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        if self.fc is None:
            return x
        return self.fc(self.avgpool(x).flatten(1))


def resnet50(variant: str = "plain_bn", num_classes=1000, num_groups: int = 32, **kwargs) -> ResNet:
    """ResNet-50 in one of the benchmark variants (``num_classes=None``: the trunk):

    plain_bn          nn.Conv2d + nn.BatchNorm2d
    reference_ws_bcn  the released WS conv + the released BCN layer (eager)
    wsbcn_ws_bcn      wsbcn.WSConv2d + wsbcn.BatchChannelNorm2d
    wsbcn_ws_bcn_modelws  the same, every WS weight standardized in one launch each way
                      (wsbcn.ModelWeightStandardizer)
    wsbcn_ws_gn       wsbcn.WSConv2d + wsbcn.GroupNorm

    The wsbcn convs use the released WS formula (W - mean) / (std_unbiased + 1e-5)
    that ReferenceWSConv2d computes, so reference_ws_bcn and wsbcn_ws_bcn are the
    same network (same parameter and buffer names, same function).
    """
    import wsbcn

    ws_conv = partial(wsbcn.WSConv2d, eps=1e-5, correction=1, eps_mode="std")
    variants = {
        "plain_bn": (nn.Conv2d, nn.BatchNorm2d),
        "reference_ws_bcn": (ReferenceWSConv2d, partial(ReferenceBCN2d, num_groups=num_groups)),
        "wsbcn_ws_bcn": (ws_conv, partial(wsbcn.BatchChannelNorm2d, num_groups=num_groups)),
        "wsbcn_ws_bcn_modelws": (ws_conv, partial(wsbcn.BatchChannelNorm2d, num_groups=num_groups)),
        "wsbcn_ws_gn": (ws_conv, lambda c: wsbcn.GroupNorm(num_groups, c)),
    }
    if variant not in variants:
        raise ValueError(f"variant must be one of {sorted(variants)}, got {variant!r}")
    conv, norm = variants[variant]
    net = ResNet(num_classes=num_classes, conv=conv, norm=norm, **kwargs)
    if variant == "wsbcn_ws_bcn_modelws":
        wsbcn.ModelWeightStandardizer(net)  # its hooks live on net; the layers hold it
    return net


def resnet50_trunk(variant: str = "plain_bn", num_groups: int = 32, **kwargs) -> ResNet:
    """The ResNet-50 trunk (stem to layer4, no avgpool or fc) of ``variant``."""
    return resnet50(variant, num_classes=None, num_groups=num_groups, **kwargs)


VARIANTS = ("plain_bn", "reference_ws_bcn", "wsbcn_ws_bcn", "wsbcn_ws_bcn_modelws", "wsbcn_ws_gn")
