"""Named shape suites for autotuning and benchmarks.

The ResNet-50 suites are read off the package's own ResNet-50 (a forward pass on
the meta device records every norm-layer input and every conv weight), so they
cannot drift from the model that the end-to-end benchmark trains.
"""
import functools
from dataclasses import dataclass

import torch
from torch import nn

BATCH_SIZES = (1, 2, 8, 32, 128)
DTYPES = ("float32", "bfloat16")
LAYOUTS = ("contiguous", "channels_last")
SUITES = ("resnet50", "resnet50_sample", "cpu", "tiny")


@dataclass(frozen=True)
class NormShape:
    c: int
    h: int
    w: int


@dataclass(frozen=True)
class ConvShape:
    shape: tuple


@dataclass(frozen=True)
class Case:
    """One benchmark case: an op on one input. WS cases have n=None (the weight
    is the input, in fp32: master weights stay fp32 under autocast)."""

    op: str
    shape: object  # NormShape, or ConvShape for "ws"
    n: object      # batch size, None for "ws"
    dtype: str
    layout: str


# The default GPU suite: a sample of the ResNet-50 grid that keeps `wsbcn bench`
# to minutes. Norm layers: one case per (batch size, layout) pair at N = 2 and 32,
# bf16, four shapes from three stages and tensors of 0.1 to 12.8 M elements. WS:
# two weights per layout, from the stem's 3x7x7 to 1024x512. Chosen against the
# H100 rows (perf/results/nvidia-h100-80gb-hbm3/bench.csv) so that the sample's
# geometric-mean speedups stayed close to those of every measured case.
SAMPLE_NORM_CASES = (
    (NormShape(256, 14, 14), 2, "contiguous"),
    (NormShape(128, 56, 56), 2, "channels_last"),
    (NormShape(64, 56, 56), 32, "contiguous"),
    (NormShape(512, 28, 28), 32, "channels_last"),
)
SAMPLE_DTYPE = "bfloat16"
SAMPLE_WS_CASES = (
    (ConvShape((64, 3, 7, 7)), "contiguous"),
    (ConvShape((128, 512, 1, 1)), "contiguous"),
    (ConvShape((256, 64, 1, 1)), "channels_last"),
    (ConvShape((1024, 512, 1, 1)), "channels_last"),
)
# What the sample times of each case, to keep the default run to a few minutes with
# a cold compile cache; other suites time all of it.
# Modes: forward and forward+backward, what the targets are stated in (the backward
# alone, which CUDA-graph timing leaves out anyway, only with --modes or --full).
# torch.compile baselines: compiled_bcn on the BCN cases and compiled_ws on the WS
# cases (one cold compile per case, forward and backward); BCN with estimates, which
# the H100 rows hold no case of yet, against its other baselines alone.
SAMPLE_MODES = ("fwd", "fwdbwd")
SAMPLE_COMPILED_OPS = ("bcn", "ws")


def compiled_ops(name: str, ops) -> tuple:
    """The ops of ``ops`` whose torch.compile baseline suite ``name`` times."""
    return tuple(op for op in ops if name != "resnet50_sample" or op in SAMPLE_COMPILED_OPS)


def default_modes(name: str, modes: tuple) -> tuple:
    """The modes suite ``name`` times when none are asked for: SAMPLE_MODES for the
    sample, else ``modes`` (all of them)."""
    return SAMPLE_MODES if name == "resnet50_sample" else tuple(modes)


@functools.lru_cache(maxsize=None)
def resnet50_shapes(image_size: int = 224):
    """(unique norm-layer (C, H, W) shapes, unique conv weight shapes) of ResNet-50, as tuples."""
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
    return tuple(dict.fromkeys(norms)), tuple(dict.fromkeys(convs))


def suite(name: str, batch_sizes=None, dtypes=None, layouts=None):
    """(norm shapes, conv shapes, batch sizes, dtypes, layouts) of a named suite,
    optionally narrowed to the given batch sizes, dtypes and layouts (so that a run
    fits the time a GPU is lent for).

    resnet50         every norm layer and conv weight of ResNet-50 at 224^2, the full grid
    resnet50_sample  the default GPU benchmark: a few cases of that grid (see
                     SAMPLE_NORM_CASES); here, the grid spanned by its shapes, batch
                     sizes and layouts, which contains them (`cases` lists the cases)
    cpu              a few ResNet-50 shapes at 56^2 input, N in {1, 2}, fp32: what a CPU
                     machine can measure in a minute or two
    tiny             two small shapes, for tests
    """
    if name == "resnet50":
        norms, convs = resnet50_shapes(224)
        full = norms, convs, BATCH_SIZES, DTYPES, LAYOUTS
    elif name == "resnet50_sample":
        norms = list(dict.fromkeys(shape for shape, _, _ in SAMPLE_NORM_CASES))
        convs = list(dict.fromkeys(shape for shape, _ in SAMPLE_WS_CASES))
        batches = tuple(sorted({n for _, n, _ in SAMPLE_NORM_CASES}))
        full = norms, convs, batches, (SAMPLE_DTYPE,), LAYOUTS
    elif name == "cpu":
        norms, convs = resnet50_shapes(56)
        full = norms[:3] + norms[-1:], convs[:3] + convs[-1:], (1, 2), ("float32",), LAYOUTS
    elif name == "tiny":
        full = [NormShape(8, 4, 4), NormShape(16, 3, 3)], [ConvShape((8, 4, 3, 3))], (2,), ("float32",), LAYOUTS
    else:
        raise ValueError(f"unknown suite {name!r}: choose one of {', '.join(SUITES)}")
    norms, convs, batches, kinds, orders = full
    return (norms, convs, tuple(batch_sizes or batches), tuple(dtypes or kinds), tuple(layouts or orders))


def cases(name: str, ops, batch_sizes=None, dtypes=None, layouts=None) -> list:
    """The benchmark cases of a suite, in order: for each op, every shape, batch
    size, dtype and layout of ``suite(name, ...)`` (WS: every weight and layout).

    resnet50_sample lists its own cases; there the narrowing arguments keep the
    cases whose batch size, dtype and layout they name (WS cases are fp32 and have
    no batch size: a dtype or batch size narrows only the norm cases)."""
    if name == "resnet50_sample":
        keep = lambda values, v: values is None or v in values  # noqa: E731
        out = []
        for op in ops:
            if op == "ws":
                out += [Case(op, shape, None, "float32", layout) for shape, layout in SAMPLE_WS_CASES
                        if keep(layouts, layout)]
            else:
                out += [Case(op, shape, n, SAMPLE_DTYPE, layout) for shape, n, layout in SAMPLE_NORM_CASES
                        if keep(batch_sizes, n) and keep(dtypes, SAMPLE_DTYPE) and keep(layouts, layout)]
        return out
    norms, convs, batches, kinds, orders = suite(name, batch_sizes, dtypes, layouts)
    out = []
    for op in ops:
        if op == "ws":
            out += [Case(op, conv, None, "float32", layout) for conv in convs for layout in orders]
        else:
            out += [Case(op, shape, n, dtype, layout) for shape in norms for n in batches for dtype in kinds
                    for layout in orders]
    return out
