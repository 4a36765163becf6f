"""The shape suites (wsbcn/tools/suites.py), by their properties: every case is an
input the ops accept, the default GPU sample is a small part of the full grid that
still covers every op and layout, and narrowing keeps exactly the cases it names."""
import math

import pytest
import torch

from wsbcn.tools import suites
from wsbcn.tools.bench import NUM_GROUPS, OPS


@pytest.mark.parametrize("name", suites.SUITES)
def test_every_case_of_every_suite_is_an_input_the_ops_accept(name):
    cases = suites.cases(name, OPS)
    assert cases and len(set(cases)) == len(cases)  # no case twice
    assert {c.op for c in cases} == set(OPS)
    for case in cases:
        assert case.layout in suites.LAYOUTS and isinstance(getattr(torch, case.dtype), torch.dtype), case
        if case.op == "ws":  # a conv weight, fp32 (master weights), no batch size
            assert case.n is None and case.dtype == "float32", case
            assert len(case.shape.shape) == 4 and min(case.shape.shape) >= 1, case
        else:  # the benchmark's groups, min(NUM_GROUPS, C), divide C
            shape = case.shape
            assert case.n >= 1 and min(shape.c, shape.h, shape.w) >= 1, case
            assert shape.c % min(NUM_GROUPS, shape.c) == 0, case


def test_the_sample_is_a_small_part_of_the_full_grid_that_covers_every_op_and_layout():
    sample = suites.cases("resnet50_sample", OPS)
    full = suites.cases("resnet50", OPS)
    assert set(sample) <= set(full) and len(sample) < len(full) / 10
    # the grid the sample stands for (what autotune and host_bench sweep for it) holds it
    assert set(sample) <= set(suites.cases("resnet50", OPS, *suites.suite("resnet50_sample")[2:]))
    for op in OPS:
        mine = [c for c in sample if c.op == op]
        assert {c.layout for c in mine} == set(suites.LAYOUTS), op
    norm_batches = {c.n for c in sample if c.op != "ws"}
    assert min(norm_batches) <= 2 < max(norm_batches)  # a micro-batch, and a batch large enough to fill a GPU


@pytest.mark.parametrize("name", ["resnet50_sample", "cpu", "tiny"])
def test_narrowing_keeps_exactly_the_cases_it_names(name):
    every = suites.cases(name, OPS)
    for n in {c.n for c in every if c.n is not None}:
        # a batch size narrows the norm cases only: WS cases have none
        assert suites.cases(name, OPS, batch_sizes=[n]) == [c for c in every if c.op == "ws" or c.n == n]
    for layout in suites.LAYOUTS:
        assert suites.cases(name, OPS, layouts=[layout]) == [c for c in every if c.layout == layout]
    for dtype in {c.dtype for c in every if c.op != "ws"}:
        narrowed = suites.cases(name, OPS, dtypes=[dtype])
        assert [c for c in narrowed if c.op != "ws"] == [c for c in every if c.op != "ws" and c.dtype == dtype]


def test_narrowing_the_full_grid_keeps_its_shapes():
    norms, convs, batches, dtypes, layouts = suites.suite("resnet50", batch_sizes=[2, 32], dtypes=["bfloat16"],
                                                          layouts=["channels_last"])
    full = suites.suite("resnet50")
    assert (norms, convs) == full[:2] and len(norms) > 1 and len(convs) > 1
    assert (batches, dtypes, layouts) == ((2, 32), ("bfloat16",), ("channels_last",))
    assert math.prod(map(len, (norms, batches, dtypes, layouts))) == len(
        suites.cases("resnet50", ("gn",), [2, 32], ["bfloat16"], ["channels_last"]))
