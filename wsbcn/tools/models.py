"""A ResNet-50 (torchvision's v1.5 layout) with pluggable conv and norm layers,
so benchmarks and examples need no torchvision."""
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
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.in_planes, num_classes)

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
        return self.fc(self.avgpool(x).flatten(1))


def resnet50(variant: str = "plain_bn", num_classes: int = 1000, num_groups: int = 32, **kwargs) -> ResNet:
    """ResNet-50 in one of the benchmark variants:

    plain_bn          nn.Conv2d + nn.BatchNorm2d
    reference_ws_bcn  the released WS conv + the released BCN layer (eager)
    wsbcn_ws_bcn      wsbcn.WSConv2d + wsbcn.BatchChannelNorm2d
    wsbcn_ws_gn       wsbcn.WSConv2d + wsbcn.GroupNorm
    """
    import wsbcn

    from .reference import ReferenceBCN2d, ReferenceWSConv2d

    variants = {
        "plain_bn": (nn.Conv2d, nn.BatchNorm2d),
        "reference_ws_bcn": (ReferenceWSConv2d, partial(ReferenceBCN2d, num_groups=num_groups)),
        "wsbcn_ws_bcn": (wsbcn.WSConv2d, partial(wsbcn.BatchChannelNorm2d, num_groups=num_groups)),
        "wsbcn_ws_gn": (wsbcn.WSConv2d, lambda c: wsbcn.GroupNorm(num_groups, c)),
    }
    if variant not in variants:
        raise ValueError(f"variant must be one of {sorted(variants)}, got {variant!r}")
    conv, norm = variants[variant]
    return ResNet(num_classes=num_classes, conv=conv, norm=norm, **kwargs)


VARIANTS = ("plain_bn", "reference_ws_bcn", "wsbcn_ws_bcn", "wsbcn_ws_gn")
