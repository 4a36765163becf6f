"""A ResNet-50 (torchvision's v1.5 layout) with pluggable conv and norm layers,
so benchmarks and examples need no torchvision; with ``num_classes=None`` the
trunk alone, as detectors use it."""
from functools import partial

from torch import nn


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
    wsbcn_ws_gn       wsbcn.WSConv2d + wsbcn.GroupNorm

    The wsbcn convs use the released WS formula (W - mean) / (std_unbiased + 1e-5)
    that ReferenceWSConv2d computes, so reference_ws_bcn and wsbcn_ws_bcn are the
    same network (same parameter and buffer names, same function).
    """
    import wsbcn

    from .reference import ReferenceBCN2d, ReferenceWSConv2d

    ws_conv = partial(wsbcn.WSConv2d, eps=1e-5, correction=1, eps_mode="std")
    variants = {
        "plain_bn": (nn.Conv2d, nn.BatchNorm2d),
        "reference_ws_bcn": (ReferenceWSConv2d, partial(ReferenceBCN2d, num_groups=num_groups)),
        "wsbcn_ws_bcn": (ws_conv, partial(wsbcn.BatchChannelNorm2d, num_groups=num_groups)),
        "wsbcn_ws_gn": (ws_conv, lambda c: wsbcn.GroupNorm(num_groups, c)),
    }
    if variant not in variants:
        raise ValueError(f"variant must be one of {sorted(variants)}, got {variant!r}")
    conv, norm = variants[variant]
    return ResNet(num_classes=num_classes, conv=conv, norm=norm, **kwargs)


def resnet50_trunk(variant: str = "plain_bn", num_groups: int = 32, **kwargs) -> ResNet:
    """The ResNet-50 trunk (stem to layer4, no avgpool or fc) of ``variant``."""
    return resnet50(variant, num_classes=None, num_groups=num_groups, **kwargs)


VARIANTS = ("plain_bn", "reference_ws_bcn", "wsbcn_ws_bcn", "wsbcn_ws_gn")
