"""Named shape suites for autotuning and benchmarks.

The ResNet-50 suites are read off the package's own ResNet-50 (a forward pass on
the meta device records every norm-layer input and every conv weight), so they
cannot drift from the model that the end-to-end benchmark trains.
"""
from dataclasses import dataclass

import torch
from torch import nn

BATCH_SIZES = (1, 2, 8, 32, 128)
DTYPES = ("float32", "bfloat16")
LAYOUTS = ("contiguous", "channels_last")


@dataclass(frozen=True)
class NormShape:
    c: int
    h: int
    w: int


@dataclass(frozen=True)
class ConvShape:
    shape: tuple


def resnet50_shapes(image_size: int = 224):
    """(unique norm-layer (C, H, W) shapes, unique conv weight shapes) of ResNet-50."""
    from .models import resnet50

    with torch.device("meta"):
        model = resnet50("plain_bn")
    norms, convs = [], []

    def record(module, inputs):
        x = inputs[0]
        norms.append(NormShape(x.shape[1], x.shape[2], x.shape[3]))

    hooks = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    convs = [ConvShape(tuple(m.weight.shape)) for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(torch.empty(1, 3, image_size, image_size, device="meta"))
    for h in hooks:
        h.remove()
    return list(dict.fromkeys(norms)), list(dict.fromkeys(convs))


def suite(name: str, batch_sizes=None, dtypes=None, layouts=None):
    """(norm shapes, conv shapes, batch sizes, dtypes, layouts) of a named suite,
    optionally narrowed to the given batch sizes, dtypes and layouts (so that a run
    fits the time a GPU is lent for).

    resnet50   every norm layer and conv weight of ResNet-50 at 224^2, the full grid
    cpu        a few ResNet-50 shapes at 56^2 input, N in {1, 2}, fp32: what a CPU
               machine can measure in a minute or two
    tiny       two small shapes, for tests
    """
    if name == "resnet50":
        norms, convs = resnet50_shapes(224)
        full = norms, convs, BATCH_SIZES, DTYPES, LAYOUTS
    elif name == "cpu":
        norms, convs = resnet50_shapes(56)
        full = norms[:3] + norms[-1:], convs[:3] + convs[-1:], (1, 2), ("float32",), LAYOUTS
    elif name == "tiny":
        full = [NormShape(8, 4, 4), NormShape(16, 3, 3)], [ConvShape((8, 4, 3, 3))], (2,), ("float32",), LAYOUTS
    else:
        raise ValueError(f"unknown suite {name!r}: choose resnet50, cpu or tiny")
    norms, convs, batches, kinds, orders = full
    return (norms, convs, tuple(batch_sizes or batches), tuple(dtypes or kinds), tuple(layouts or orders))


SUITES = ("resnet50", "cpu", "tiny")
