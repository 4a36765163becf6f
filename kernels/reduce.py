"""Reductions whose order is fixed by the shape, never by the launch config.

``tl.sum`` adds in the order of the compiler's layout, which follows num_warps and
the tile shape, so two launch configs can differ in the last bit. Every reduction
of the statistics passes is built from these helpers instead:

1. In the loop, per lane: a tile is [rows, LANES]; lane j of a row accumulates
   positions j, j + LANES, j + 2 LANES, ... of its chunk, in order, elementwise.
2. After the loop, one pairwise tree over the lanes: lanes (2i, 2i+1), then pairs
   of pairs, each step a ``tl.split`` of an explicit pair, which leaves the
   compiler no order to choose.

So a row's result depends on LANES and on where its chunk starts and ends (both
taken from the shape), and not on how many rows a program holds, num_warps or
num_stages: those stay free for tuning (wsbcn/tuning.py).
"""
import triton
import triton.language as tl

MAX_LOG2_LANES = tl.constexpr(16)  # lanes per tile <= 2^16, far above any block the wrappers use


@triton.jit
def _pairs(v):
    """[R, W] -> two [R, W / 2]: lanes 0, 2, 4, ... and lanes 1, 3, 5, ..."""
    return tl.split(tl.reshape(v, [v.shape[0], v.shape[1] // 2, 2]))


@triton.jit
def lane_tree_sum(v):
    """[R, LANES] -> [R]: the pairwise sum over the lanes (LANES a power of two)."""
    for _ in tl.static_range(MAX_LOG2_LANES):
        if v.shape[1] > 1:
            a, b = _pairs(v)
            v = a + b
    return tl.reshape(v, [v.shape[0]])


@triton.jit
def lane_welford(count, mean, m2, x, valid):
    """One Welford step per lane. count [LANES] (elements seen by each lane, this
    one included), mean/m2 [R, LANES], x the new values, valid where x is data."""
    inv = 1.0 / tl.maximum(count, 1.0)
    delta = x - mean
    mean = tl.where(valid, mean + delta * inv[None, :], mean)
    m2 = tl.where(valid, m2 + delta * (x - mean), m2)
    return mean, m2


@triton.jit
def lane_tree_chan(count, mean, m2, own_levels=None, first_level: tl.constexpr = 0):
    """[R, LANES] mean/M2 of each lane, [1, LANES] its count (the same in every row)
    -> [R] mean and M2 of each row: lanes merged pairwise with Chan's formula (empty
    lanes have count 0 and change nothing).

    ``own_levels`` (model-wide WS, kernels/ws_multi.py): M2's merge term d^2 na w is
    left out at the levels from ``own_levels`` on (the tree's levels counted from
    ``first_level``), where a row's result merges with empty lanes: there the term is
    0, or NaN where d^2 overflows. None (the norm kernels, per-layer WS): no level is
    masked, in the code the kernels had without the argument (the same IR: triton 3.6
    allocates registers by its order, ``wsbcn report-kernels``)."""
    for k in tl.static_range(MAX_LOG2_LANES):
        if mean.shape[1] > 1:
            na, nb = _pairs(count)
            ma, mb = _pairs(mean)
            qa, qb = _pairs(m2)
            count = na + nb
            w = nb / tl.maximum(count, 1.0)
            delta = mb - ma
            mean = ma + delta * w
            if own_levels is None:
                m2 = qa + qb + delta * delta * (na * w)
            else:
                m2 = qa + qb + tl.where(own_levels > first_level + k, delta * delta * (na * w), 0.0)
    return tl.reshape(mean, [mean.shape[0]]), tl.reshape(m2, [m2.shape[0]])


@triton.jit
def lane_total(v):
    """[LANES] -> scalar: the pairwise sum of one row's lanes."""
    return tl.sum(lane_tree_sum(v[None, :]), axis=0)  # the sum of one element is exact
