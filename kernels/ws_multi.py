"""Weight Standardization of many weights in one launch each way (model-wide WS).

One program per row of every weight of a pack (one dtype, one device), like the
multi-tensor kernels of fused optimizers: a per-program table names the weight,
a per-weight table its offsets, fan-in, plan and scalars. Weights live in separate
tensors: ``W`` is the pointer of one of them (or of a packed copy, when traced) and
every weight sits at an element offset from it (``Meta``; an offset may be negative),
so the kernel needs no integer-to-pointer casts and torch's analysis of a traced
launch sees every access through the pointer arguments.

Each row is computed exactly as ``_ws_fwd_kernel`` / ``_ws_bwd_kernel`` (kernels/ws.py)
compute it with the BLOCK of that weight's own plan, B (wsbcn.tuning.ws_config): the
same loads, the same per-lane accumulation and the same pairwise trees, so the bits
are those of per-layer WS. The kernel's lanes, BLOCK, are the largest B of the launch:
- a row that fits its own block (fan_in <= B, the per-layer ONE_BLOCK) holds element
  j in lane j, as the per-layer kernel does; lanes >= fan_in are empty;
- a row that loops (fan_in > B) strides over chunks of B = BLOCK lanes: the plan
  (kernels/ws_multi_plan.py) puts a weight that loops with another B in a launch of
  its own (B is the GPU cap for every looping row, so on a GPU this never happens);
- the lane trees are the per-layer kernels' trees over BLOCK lanes: their first
  log2(B) levels are the row's own tree, the levels above merge its result with
  empty lanes (>= B), which gives it back bit for bit:
  - backward, sums: those lanes hold -0.0, and x + (-0.0) is x for every x, -0.0
    included (a row of -0.0 gradients sums to -0.0), where + (+0.0) would give +0.0;
  - forward, Chan's merge with a count of 0: count + 0 and mean + d * 0 give count
    and mean back for every finite mean but -0.0, which a row never reaches those
    levels with (a mean of -0.0 is one lane's w - w0, +0.0 or NaN for one element, never
    a merge of two lanes with elements: mean + d w is -0.0 only for mean and d w both
    -0.0, and d = m_b - (-0.0) is never -0.0). M2's term d^2 * 0 is NaN where d^2
    overflows (a mean of 2^64 or more), so above log2(B) that term is masked (the
    ``own_levels`` of reduce.lane_tree_chan): M2 + 0 + 0 is M2, never -0.0 (it starts
    at +0.0 and only adds). An infinite mean becomes NaN there, where per layer it stays
    infinite: only the saved statistic differs, the row's W_hat and dW are NaN either way.
  (An earlier version masked the three of count, mean and M2 with tl.where at each
  level above log2(B), and the backward's sums too: triton 3.6 spilled it, 1224 B a
  thread.)
The ONE_BLOCK and STD_MODE constexprs of the per-layer kernels are run-time branches
here (per weight), each branch the per-layer code: the scales, the W_hat loop and the
backward's two loops are the per-layer kernels' own jit helpers (kernels/ws.py).
"""
import triton
import triton.language as tl

from .reduce import lane_welford
from .ws import _grad_lane_sums, _store_dw, _store_w_hat, _tree_chan_total, _tree_total, _ws_scales

# Meta: int64 [weights, META_FIELDS]. Scal: fp32 [weights, 2] (denom, eps).
M_W_OFF = tl.constexpr(0)  # elements from W to the weight
M_OUT_OFF = tl.constexpr(1)  # elements from W_hat / Dw to the weight's output
M_FIRST_PROG = tl.constexpr(2)  # the launch's first program on this weight
M_STAT_ROW = tl.constexpr(3)  # the weight's first row in Stats
M_FAN_IN = tl.constexpr(4)  # elements per row (the row stride: rows are dense)
M_LEVELS = tl.constexpr(5)  # log2(B), B the weight's per-layer BLOCK
M_STD = tl.constexpr(6)  # 1: D = std + eps ("std"), 0: D = sqrt(var + eps)
META_FIELDS = tl.constexpr(7)


@triton.jit
def _ws_multi_fwd_kernel(
    W,  # pointer: weight i starts Meta[i, M_W_OFF] elements from here
    W_hat,  # pointer: weight i's W_hat starts Meta[i, M_OUT_OFF] elements from here, laid out as the weight
    Stats,  # fp32 [3, total_rows]: shifted mean, rstd, gcoef of every row of the pack
    Prog,  # int32 [programs]: the weight of each program
    Meta,  # int64 [weights, META_FIELDS]
    Scal,  # fp32 [weights, 2]: denom (fan_in - correction), eps
    total_rows,  # rows of the pack: the stride between the three rows of Stats
    BLOCK: tl.constexpr,  # lanes: the largest per-layer BLOCK of the launch
):
    pid = tl.program_id(0)
    i = tl.load(Prog + pid).to(tl.int64)
    meta = Meta + i * META_FIELDS
    fan_in = tl.load(meta + M_FAN_IN).to(tl.int32)
    levels = tl.load(meta + M_LEVELS).to(tl.int32)
    row = pid - tl.load(meta + M_FIRST_PROG)  # int64
    srow = tl.load(meta + M_STAT_ROW) + row
    denom = tl.load(Scal + 2 * i)
    eps = tl.load(Scal + 2 * i + 1)
    base = W + tl.load(meta + M_W_OFF) + row * fan_in
    out = W_hat + tl.load(meta + M_OUT_OFF) + row * fan_in
    offs = tl.arange(0, BLOCK)
    w0 = tl.load(base).to(tl.float32)
    one_block = fan_in <= (1 << levels)
    if one_block:
        mask = offs < fan_in
        w = tl.where(mask, tl.load(base + offs, mask=mask, other=0.0).to(tl.float32) - w0, 0.0)
        count = mask.to(tl.float32)
        lane_mean = w[None, :]
        lane_m2 = tl.zeros([1, BLOCK], dtype=tl.float32)
    else:
        w = tl.zeros([BLOCK], dtype=tl.float32)
        count = tl.zeros([BLOCK], dtype=tl.float32)
        lane_mean = tl.zeros([1, BLOCK], dtype=tl.float32)
        lane_m2 = tl.zeros([1, BLOCK], dtype=tl.float32)
        for start in range(0, fan_in, BLOCK):
            idx = start + offs
            m = idx < fan_in
            x = tl.load(base + idx, mask=m, other=0.0).to(tl.float32) - w0
            count += m.to(tl.float32)
            lane_mean, lane_m2 = lane_welford(count, lane_mean, lane_m2, x[None, :], m[None, :])
    mean, m2 = _tree_chan_total(count, lane_mean, lane_m2, BLOCK, levels)
    var = m2 / denom
    rstd, k = _ws_scales(var, denom, eps, tl.load(meta + M_STD) != 0)
    tl.store(Stats + srow, mean)
    tl.store(Stats + total_rows + srow, rstd)
    tl.store(Stats + 2 * total_rows + srow, k)
    if one_block:
        tl.store(out + offs, ((w - mean) * rstd).to(W_hat.dtype.element_ty), mask=offs < fan_in)
    else:
        _store_w_hat(base, out, w0, mean, rstd, fan_in, offs, BLOCK)


@triton.jit
def _ws_multi_bwd_kernel(
    Grad,  # pointer: weight i's dL/dW_hat starts G_off[i] elements from here, laid out as the weight
    W,  # pointer: weight i starts Meta[i, M_W_OFF] elements from here
    Dw,  # pointer: weight i's dL/dW starts Meta[i, M_OUT_OFF] elements from here
    Stats,  # fp32 [3, total_rows] from the forward
    Prog,  # int32 [programs]: the weight of each program
    Meta,  # int64 [weights, META_FIELDS]
    G_off,  # int64 [weights]: elements from Grad to each weight's gradient
    total_rows,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    i = tl.load(Prog + pid).to(tl.int64)
    meta = Meta + i * META_FIELDS
    fan_in = tl.load(meta + M_FAN_IN).to(tl.int32)
    levels = tl.load(meta + M_LEVELS).to(tl.int32)
    row = pid - tl.load(meta + M_FIRST_PROG)
    srow = tl.load(meta + M_STAT_ROW) + row
    g_base = Grad + tl.load(G_off + i) + row * fan_in
    w_base = W + tl.load(meta + M_W_OFF) + row * fan_in
    out = Dw + tl.load(meta + M_OUT_OFF) + row * fan_in
    offs = tl.arange(0, BLOCK)
    w0 = tl.load(w_base).to(tl.float32)
    mean = tl.load(Stats + srow)
    rstd = tl.load(Stats + total_rows + srow)
    k = tl.load(Stats + 2 * total_rows + srow)
    if fan_in <= (1 << levels):
        mask = offs < fan_in
        # past fan_in, g is +0.0 in the row's own block (as per layer) and -0.0 beyond it, and so is
        # g * w_hat (w_hat +0.0): the tree's levels above the row's own give its sums back
        g = tl.load(g_base + offs, mask=mask, other=tl.where(offs < (1 << levels), 0.0, -0.0)).to(tl.float32)
        w = tl.load(w_base + offs, mask=mask, other=0.0).to(tl.float32)
        w_hat = tl.where(mask, (w - w0 - mean) * rstd, 0.0)
        sum_g = _tree_total(g, BLOCK)
        sum_gw = _tree_total(g * w_hat, BLOCK)
        dw = rstd * (g - sum_g / fan_in) - k * w_hat * sum_gw
        tl.store(out + offs, dw.to(Dw.dtype.element_ty), mask=mask)
    else:
        lane_g, lane_gw = _grad_lane_sums(g_base, w_base, w0, mean, rstd, fan_in, offs, BLOCK)
        sum_g = _tree_total(lane_g, BLOCK)  # a looping row has B = BLOCK: no lane beyond its own
        sum_gw = _tree_total(lane_gw, BLOCK)
        mean_g = sum_g / fan_in
        tl.assume(fan_in > 0)
        _store_dw(g_base, w_base, out, w0, mean, rstd, k, mean_g, sum_gw, fan_in, offs, BLOCK)
