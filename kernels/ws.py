"""Weight Standardization kernels: one launch forward, one launch backward.

A weight of shape (O, ...) is handled as O rows of ``fan_in`` elements that lie
contiguously in memory (any dense layout whose outermost dimension is O, which
covers contiguous and channels_last weights). Each program owns one row.

Statistics are taken of ``w - w[row, 0]``: shifting by one element of the row
keeps the variance accurate for rows with a large common offset and makes a
constant filter give exact zeros. The row's sums run in an order fixed by BLOCK
(kernels/reduce.py), so num_warps never changes a result.
"""
import triton
import triton.language as tl

from .reduce import lane_total, lane_tree_chan, lane_tree_sum, lane_welford

# The lane trees below run their first 5 levels in rows of 32 lanes ([BLOCK / 32,
# 32], lane 32 r + j), then merge the row results pairwise: the same pairs in the
# same order as one tree over BLOCK lanes (level k pairs lanes within aligned
# blocks of 2^k), so bitwise the same numbers. The point is the layout: a
# [BLOCK] or [1, BLOCK] tree ends in layouts that hold every lane in every
# thread, which took triton 3.6 255 registers and spills at BLOCK = 1024.
ROW = tl.constexpr(32)
LOG2_ROW = tl.constexpr(5)  # the first level of the trees' second stage


@triton.jit
def _tree_total(v, BLOCK: tl.constexpr):
    """[BLOCK] -> scalar: lane_total(v), computed in rows of ROW lanes."""
    if BLOCK > ROW:
        total = lane_total(lane_tree_sum(tl.reshape(v, [BLOCK // ROW, ROW])))
    else:
        total = lane_total(v)
    return total


@triton.jit
def _tree_chan_total(count, mean, m2, BLOCK: tl.constexpr, own_levels=None):
    """[BLOCK] count, mean, M2 per lane -> scalar mean and M2 of the row: the
    pairwise Chan merge of lane_tree_chan, computed in rows of ROW lanes (its
    ``own_levels``: model-wide WS's rows narrower than BLOCK, kernels/ws_multi.py)."""
    if BLOCK > ROW:
        counts = tl.reshape(count, [BLOCK // ROW, ROW])
        row_mean, row_m2 = lane_tree_chan(counts, tl.reshape(mean, [BLOCK // ROW, ROW]),
                                          tl.reshape(m2, [BLOCK // ROW, ROW]), own_levels, 0)
        mean, m2 = lane_tree_chan(lane_tree_sum(counts)[None, :], row_mean[None, :], row_m2[None, :], own_levels,
                                  LOG2_ROW)
    else:
        mean, m2 = lane_tree_chan(count[None, :], tl.reshape(mean, [1, BLOCK]), tl.reshape(m2, [1, BLOCK]),
                                  own_levels, 0)
    return tl.sum(mean, axis=0), tl.sum(m2, axis=0)  # [1] -> scalars, exact


@triton.jit
def _ws_scales(var, denom, eps, std_mode):
    """(rstd, k) of a row from its variance: D = std + eps (``std_mode``) or
    sqrt(var + eps); k the backward's coefficient (kernels' docstrings). The per-layer
    kernel passes its STD_MODE constexpr, the model-wide one a run-time flag."""
    if std_mode:
        std = tl.sqrt(var)
        rstd = 1.0 / (std + eps)
        # d(std)/dw = w_hat D / (std denom); a zero std has no spread to undo.
        k = tl.where(std > 0.0, 1.0 / tl.maximum(std, 1e-30) / denom, 0.0)
    else:
        rstd = tl.rsqrt(var + eps)
        k = rstd / denom
    return rstd, k


@triton.jit
def _store_w_hat(base, out, w0, mean, rstd, fan_in, offs, BLOCK: tl.constexpr):
    """W_hat of a row that loops over chunks of BLOCK: (w - w0 - mean) * rstd."""
    for start in range(0, fan_in, BLOCK):
        idx = start + offs
        mask = idx < fan_in
        w = tl.load(base + idx, mask=mask, other=0.0).to(tl.float32)
        tl.store(out + idx, ((w - w0 - mean) * rstd).to(out.dtype.element_ty), mask=mask)


@triton.jit
def _grad_lane_sums(g_base, w_base, w0, mean, rstd, fan_in, offs, BLOCK: tl.constexpr):
    """Per lane, the sums of g and of g * W_hat over a row that loops over chunks of
    BLOCK (W_hat recomputed from W in fp32)."""
    lane_g = tl.zeros([BLOCK], dtype=tl.float32)
    lane_gw = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, fan_in, BLOCK):
        idx = start + offs
        mask = idx < fan_in
        g = tl.load(g_base + idx, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_base + idx, mask=mask, other=0.0).to(tl.float32)
        w_hat = tl.where(mask, (w - w0 - mean) * rstd, 0.0)
        lane_g += g
        lane_gw += g * w_hat
    return lane_g, lane_gw


@triton.jit
def _store_dw(g_base, w_base, out, w0, mean, rstd, k, mean_g, sum_gw, fan_in, offs, BLOCK: tl.constexpr):
    """dW of a row that loops over chunks of BLOCK: rstd (g - mean g) - k W_hat sum(g W_hat)."""
    for start in range(0, fan_in, BLOCK):
        idx = start + offs
        mask = idx < fan_in
        g = tl.load(g_base + idx, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_base + idx, mask=mask, other=0.0).to(tl.float32)
        w_hat = (w - w0 - mean) * rstd
        dw = rstd * (g - mean_g) - k * w_hat * sum_gw
        tl.store(out + idx, dw.to(out.dtype.element_ty), mask=mask)


@triton.jit
def _ws_fwd_kernel(
    W,  # pointer to the weight: rows of fan_in contiguous elements
    W_hat,  # pointer to the standardized weight, same layout as W
    Shifted_mean,  # fp32 [O]: mean of (w - w[row, 0])
    Rstd,  # fp32 [O]: 1 / D
    Gcoef,  # fp32 [O]: k of the backward, dW = Rstd (g - mean g) - k w_hat sum(g w_hat)
    row_stride,  # elements between the starts of two rows
    fan_in,  # elements per row
    denom,  # fan_in - correction, the divisor of the variance
    eps,  # added to the variance ("var") or to the std ("std")
    STD_MODE: tl.constexpr,  # False: D = sqrt(var + eps); True: D = std + eps
    ONE_BLOCK: tl.constexpr,  # the row fits one block: keep it in registers
    BLOCK: tl.constexpr,  # elements per step along the row: the lanes of the reductions
    CENTER_ONLY: tl.constexpr = False,  # True: W_hat = W - mean (rstd 1, gcoef 0); eps, STD_MODE unused
):
    row = tl.program_id(0).to(tl.int64)
    base = W + row * row_stride
    out = W_hat + row * row_stride
    offs = tl.arange(0, BLOCK)
    w0 = tl.load(base).to(tl.float32)
    # Welford per lane, then one pairwise Chan merge of the lanes (reduce.py): the
    # order follows BLOCK, which comes from fan_in, and never num_warps.
    count = tl.zeros([BLOCK], dtype=tl.float32)
    lane_mean = tl.zeros([1, BLOCK], dtype=tl.float32)
    lane_m2 = tl.zeros([1, BLOCK], dtype=tl.float32)
    if ONE_BLOCK:
        mask = offs < fan_in
        w = tl.where(mask, tl.load(base + offs, mask=mask, other=0.0).to(tl.float32) - w0, 0.0)
        count = mask.to(tl.float32)
        lane_mean = w[None, :]
    else:
        for start in range(0, fan_in, BLOCK):
            idx = start + offs
            mask = idx < fan_in
            w = tl.load(base + idx, mask=mask, other=0.0).to(tl.float32) - w0
            count += mask.to(tl.float32)
            lane_mean, lane_m2 = lane_welford(count, lane_mean, lane_m2, w[None, :], mask[None, :])
    mean, m2 = _tree_chan_total(count, lane_mean, lane_m2, BLOCK)
    var = m2 / denom
    if CENTER_ONLY:
        # centering only: D = 1 and no spread to undo; x * 1.0 is x, so the stores
        # below write w - w0 - mean as they are
        rstd = tl.full([], 1.0, tl.float32)
        k = tl.full([], 0.0, tl.float32)
    else:
        rstd, k = _ws_scales(var, denom, eps, STD_MODE)
    tl.store(Shifted_mean + row, mean)
    tl.store(Rstd + row, rstd)
    tl.store(Gcoef + row, k)
    if ONE_BLOCK:
        tl.store(out + offs, ((w - mean) * rstd).to(W_hat.dtype.element_ty), mask=mask)
    else:
        _store_w_hat(base, out, w0, mean, rstd, fan_in, offs, BLOCK)


@triton.jit
def _ws_bwd_kernel(
    Grad,  # pointer to dL/dW_hat, same layout as W
    W,  # pointer to the weight
    Dw,  # pointer to dL/dW, same layout as W
    Shifted_mean,  # fp32 [O] from the forward
    Rstd,  # fp32 [O] from the forward
    Gcoef,  # fp32 [O] from the forward
    row_stride,  # elements between the starts of two rows
    fan_in,  # elements per row
    ONE_BLOCK: tl.constexpr,  # the row fits one block: keep it in registers
    BLOCK: tl.constexpr,  # elements per step along the row: the lanes of the reductions
    CENTER_ONLY: tl.constexpr = False,  # True: dW = g - mean(g) (W is not read)
):
    row = tl.program_id(0).to(tl.int64)
    g_base = Grad + row * row_stride
    w_base = W + row * row_stride
    out = Dw + row * row_stride
    offs = tl.arange(0, BLOCK)
    if CENTER_ONLY:
        if ONE_BLOCK:
            mask = offs < fan_in
            g = tl.load(g_base + offs, mask=mask, other=0.0).to(tl.float32)
            dw = g - _tree_total(g, BLOCK) / fan_in
            tl.store(out + offs, dw.to(Dw.dtype.element_ty), mask=mask)
        else:
            lane_g = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, fan_in, BLOCK):
                idx = start + offs
                mask = idx < fan_in
                lane_g += tl.load(g_base + idx, mask=mask, other=0.0).to(tl.float32)
            mean_g = _tree_total(lane_g, BLOCK) / fan_in
            tl.assume(fan_in > 0)
            for start in range(0, fan_in, BLOCK):
                idx = start + offs
                mask = idx < fan_in
                g = tl.load(g_base + idx, mask=mask, other=0.0).to(tl.float32)
                tl.store(out + idx, (g - mean_g).to(Dw.dtype.element_ty), mask=mask)
    else:
        w0 = tl.load(w_base).to(tl.float32)
        mean = tl.load(Shifted_mean + row)
        rstd = tl.load(Rstd + row)
        k = tl.load(Gcoef + row)
        # W_hat is recomputed from W in fp32 rather than read back in the weight dtype.
        if ONE_BLOCK:
            mask = offs < fan_in
            g = tl.load(g_base + offs, mask=mask, other=0.0).to(tl.float32)
            w = tl.load(w_base + offs, mask=mask, other=0.0).to(tl.float32)
            w_hat = tl.where(mask, (w - w0 - mean) * rstd, 0.0)
            sum_g = _tree_total(g, BLOCK)
            sum_gw = _tree_total(g * w_hat, BLOCK)
            dw = rstd * (g - sum_g / fan_in) - k * w_hat * sum_gw
            tl.store(out + offs, dw.to(Dw.dtype.element_ty), mask=mask)
        else:
            lane_g, lane_gw = _grad_lane_sums(g_base, w_base, w0, mean, rstd, fan_in, offs, BLOCK)
            sum_g = _tree_total(lane_g, BLOCK)
            sum_gw = _tree_total(lane_gw, BLOCK)
            mean_g = sum_g / fan_in
            # A row is never empty. Said to the compiler, it computes the sums here rather
            # than sinking the lane trees' replicated tails into the guard of the loop
            # below, where two of them were live at once and spilled (2.9-22 KB, sm_90).
            tl.assume(fan_in > 0)
            _store_dw(g_base, w_base, out, w0, mean, rstd, k, mean_g, sum_gw, fan_in, offs, BLOCK)
