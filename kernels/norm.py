"""Batch-Channel Normalization and GroupNorm kernels (DESIGN.md section 4).

All of BCN is one affine map per (n, c). x is viewed as (N, C, S) through three
strides, so NCHW, channels_last and channels_last_3d are read in place.

Forward, 3 launches:
  1. _norm_stats_kernel    one read of x: per (n, c) and spatial chunk, mean and
                           centred M2 of x - pivot (chunks merged with Chan's formula)
  2. _norm_combine_kernel  one program per group: batch statistics, running-buffer
                           update, group statistics, coefficients per (n, c)
  3. _norm_apply_kernel    read x, write y = act(omega y_hat + eta)
Backward, 3 launches:
  1. _norm_bwd_reduce_kernel   read dy, x: per (n, c) chunk sums D1 = sum dz, De = sum dz e
  2. _norm_bwd_combine_kernel  one program per group: parameter gradients and the
                               coefficients of dx = CA dz + CE e + CC
  3. _norm_bwd_apply_kernel    read dy, x, write dx
Across processes (a process group; kernels/norm_plan.py DistNormPlan), the combines
run in two halves (DIST 1 and 2) around one collective each way: forward stats |
combine DIST 1 (this rank's moments per channel, a fp64 row: LOCAL_ROWS) | all_gather
| _norm_rank_merge_kernel (all ranks' rows merged in rank order: the batch
statistics, the running buffers) | combine DIST 2 | apply; backward with batch
statistics reduce | bwd combine DIST 1 (this rank's d_gamma, d_beta sums) |
all_reduce | bwd combine DIST 2 (the dx coefficients) | apply. DIST 0 (one process)
compiles to the same code as before the flag existed.

Numerics. Statistics are taken of x - pivot, where the pivot is one element of the
data (x[0, c, 0] for the batch statistics of channel c, x[n, first channel of the
group, 0] for GroupNorm) or the running mean (eval), so inputs with a large common
offset (1e4 + N(0, 1)) keep full fp32 accuracy. Every pass then works with
e = (x - pivot) - mean_nc, the deviation of x from its own (n, c) mean, and the
channel-stage output is y_hat = y_hat_mean_nc + P_nc e. This is DESIGN.md's closed
form (there y_hat = P x' + Q with x' = x - mu_c) regrouped: when a group's spread
is small next to its mean, rho is large and P x' + Q cancels two large terms;
centring per (n, c) first keeps the same bytes and launches without that loss.
The saved statistics per (n, c) are: pivot, mean (of x - pivot), dm (= mean_nc -
mu_c, the BN-centred mean; x' = e + dm), P = rho a_c, y_hat_mean = rho (u_mean - nu)
and M2 = sum e^2.

No atomics: partial buffers and a combine step, so results are bitwise identical
run to run. Every reduction over x runs in an order fixed by BLOCK_S and the chunking
(kernels/reduce.py), so results are also identical for any BLOCK_C, num_warps and
num_stages. Statistics and coefficients are fp32 whatever the input dtype.
"""
import triton
import triton.language as tl

from .reduce import lane_tree_chan, lane_tree_sum, lane_welford

# The lane trees of the statistics passes run their first levels in rows of ROW
# lanes ([BLOCK_C * BLOCK_S / ROW, ROW], row-major), then merge each channel's row
# results pairwise: the same pairs in the same order as one tree over BLOCK_S
# lanes (level k pairs lanes within aligned blocks of 2^k), so bitwise the same
# numbers. The point is the layout: triton 3.6 ran the long rows' upper levels in
# layouts that replicate lanes across threads (108 registers for the NCHW stats
# pass at BLOCK_S = 128 in fp32; 56 in rows of 32).
ROW = tl.constexpr(32)


@triton.jit
def _rows_tree_sum(v, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """lane_tree_sum of a [BLOCK_C, BLOCK_S] tile -> [BLOCK_C], in rows of ROW lanes."""
    if BLOCK_S > ROW:
        rows = lane_tree_sum(tl.reshape(v, [BLOCK_C * (BLOCK_S // ROW), ROW]))
        out = lane_tree_sum(tl.reshape(rows, [BLOCK_C, BLOCK_S // ROW]))
    else:
        out = lane_tree_sum(v)
    return out


@triton.jit
def _rows_tree_chan(count, mean, m2, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """lane_tree_chan(count[None, :], mean, m2) of [BLOCK_C, BLOCK_S] lanes (count
    [BLOCK_S], the same for every channel) -> [BLOCK_C] mean and M2, in rows of ROW."""
    if BLOCK_S > ROW:
        rows: tl.constexpr = BLOCK_C * (BLOCK_S // ROW)
        counts = tl.reshape(tl.broadcast_to(count[None, :], [BLOCK_C, BLOCK_S]), [rows, ROW])
        row_mean, row_m2 = lane_tree_chan(counts, tl.reshape(mean, [rows, ROW]), tl.reshape(m2, [rows, ROW]))
        row_count = lane_tree_sum(tl.reshape(count, [BLOCK_S // ROW, ROW]))
        out_mean, out_m2 = lane_tree_chan(row_count[None, :], tl.reshape(row_mean, [BLOCK_C, BLOCK_S // ROW]),
                                          tl.reshape(row_m2, [BLOCK_C, BLOCK_S // ROW]))
    else:
        out_mean, out_m2 = lane_tree_chan(count[None, :], mean, m2)
    return out_mean, out_m2

# Modes of the BN stage.
MODE_GN = 0  # no BN stage (GroupNorm)
MODE_BATCH = 1  # training, batch statistics (estimate=False)
MODE_ESTIMATE = 2  # training, micro-batch estimates (estimate=True)
MODE_RUNNING = 3  # eval: running estimates

ACTIVATIONS = {None: 0, "relu": 1, "silu": 2}


@triton.jit
def _activate(z, ACT: tl.constexpr):
    if ACT == 1:  # NaN stays NaN, as torch.relu (maximum's default returns the number)
        z = tl.maximum(z, 0.0, propagate_nan=tl.PropagateNan.ALL)
    elif ACT == 2:
        z = z / (1.0 + tl.exp(-z))
    return z


@triton.jit
def _activation_grad(dy, z, ACT: tl.constexpr):
    if ACT == 1:  # torch's threshold_backward: zero where z <= 0, so a NaN z passes dy
        dy = tl.where(z <= 0.0, 0.0, dy)
    elif ACT == 2:
        sig = 1.0 / (1.0 + tl.exp(-z))
        dy = dy * sig * (1.0 + z * (1.0 - sig))
    return dy


@triton.jit
def _as_element_of(v, Ptr):
    """fp32 ``v`` in the element type of ``Ptr``, rounded to nearest even, as torch casts
    (a parameter gradient written in its parameter's dtype gets the bits autograd's
    cast of the fp32 gradient would give it). bf16 is rounded on the bits, because
    triton's interpreter truncates a bf16 cast; a NaN becomes 0x7FFF, CUDA's NaN (torch's
    CPU cast gives another NaN)."""
    if Ptr.dtype.element_ty == tl.bfloat16:
        u = v.to(tl.uint32, bitcast=True)
        r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        r = tl.where(v != v, 0x7FFF, r)
        return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(Ptr.dtype.element_ty)


@triton.jit
def _tile_offsets(pid, split, C, S, chunk, stride_xc, BLOCK_C: tl.constexpr, LARGE: tl.constexpr,
                  ALIGN: tl.constexpr):
    """Sample n, channels c [BLOCK_C], their mask, the spatial range of this split,
    and the per-channel part of the offsets within one sample."""
    n_cblocks = tl.cdiv(C, BLOCK_C)
    n = pid // n_cblocks
    c = (pid % n_cblocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    # S, chunk and every stride are multiples of ALIGN (the wrapper's promise), so are
    # the chunk's ends: the row masks then come in runs the loads can vectorize
    s_begin = split * chunk
    s_end = tl.minimum(S, s_begin + chunk)
    if ALIGN > 1:  # (see _channel_offsets)
        s_begin = tl.multiple_of(s_begin, ALIGN)
        s_end = tl.multiple_of(s_end, ALIGN)
    return n, c, cmask, s_begin, s_end, _channel_offsets(c, stride_xc, LARGE, ALIGN)


@triton.jit
def _channel_offsets(c, stride_c, LARGE: tl.constexpr, ALIGN: tl.constexpr):
    """c * stride_c, which the wrapper knows to be a multiple of ALIGN elements (a
    power of two, at most 16, dividing S, chunk and every sample and channel stride):
    with it the compiler can vectorize rows whose length is no multiple of 16 (S = 196).
    No hint at ALIGN = 1: tl.multiple_of(v, 1) overwrites what triton proves by itself
    (a channel block starts at a multiple of BLOCK_C; strides divisible by 16 are
    specialised), which left every channels_last load scalar (perf/NOTES.md). The
    hints sit on the op computing the value: on a jit function's argument they vanish,
    and so do they on a jit function's result on triton 3.6, which inlines calls after
    the hints are attached (so the product is written out here, not via _offsets)."""
    if LARGE:
        off = c.to(tl.int64) * stride_c
    else:
        off = c * stride_c
    if ALIGN > 1:
        off = tl.multiple_of(off, ALIGN)
    return off


@triton.jit
def _sample_start(ptr, n, stride_n, ALIGN: tl.constexpr):
    """ptr + n * stride_n, an offset that is a multiple of ALIGN elements."""
    off = n.to(tl.int64) * stride_n
    if ALIGN > 1:  # (see _channel_offsets)
        off = tl.multiple_of(off, ALIGN)
    return ptr + off


@triton.jit
def _offsets(index, stride, LARGE: tl.constexpr):
    """index * stride, in int64 when one sample can pass 2^31 elements."""
    # one return statement: the compiler checks every return of a function for one
    # type, even those a constexpr branch never reaches
    if LARGE:
        off = index.to(tl.int64) * stride
    else:
        off = index * stride
    return off


@triton.jit
def _load_e_dz(x_n, dy_n, c_off, dc_off, s, mask, stride_xs, stride_ds, pivot, mean, coef_a, coef_b,
               ACT: tl.constexpr, LARGE: tl.constexpr):
    """One tile of the backward: e = (x - pivot) - mean and dz = dy act'(z), with
    z = A e + B recomputed from x (y is never saved). Padding gives e = dz = 0."""
    x = tl.load(x_n + c_off[:, None] + _offsets(s, stride_xs, LARGE)[None, :], mask=mask, other=0.0)
    dy = tl.load(dy_n + dc_off[:, None] + _offsets(s, stride_ds, LARGE)[None, :], mask=mask, other=0.0)
    e = tl.where(mask, (x.to(tl.float32) - pivot[:, None]) - mean[:, None], 0.0)
    dz = _activation_grad(dy.to(tl.float32), coef_a[:, None] * e + coef_b[:, None], ACT)
    return e, tl.where(mask, dz, 0.0)


@triton.jit
def _norm_stats_kernel(
    X,  # input (N, C, S), read through strides
    Pivot,  # fp32 [N, C] out: the value statistics are taken relative to
    Running_mean,  # [C] pivot source in PIVOT_MODE 2 (eval)
    Part_mean,  # fp32 [N, C, n_split] out: mean of x - pivot over each spatial chunk
    Part_m2,  # fp32 [N, C, n_split] out: centred sum of squares over each chunk
    C,  # channels
    S,  # spatial size (product of the spatial dims)
    K,  # channels per group
    stride_xn,  # element strides of x over n, c and the flattened spatial axis
    stride_xc,
    stride_xs,
    chunk,  # spatial elements per split (a multiple of BLOCK_S)
    n_split,  # number of spatial chunks
    PIVOT_MODE: tl.constexpr,  # 0: x[n, first channel of group, 0]; 1: x[0, c, 0]; 2: running mean
    LARGE: tl.constexpr,  # one sample holds >= 2^31 elements: int64 offsets
    BLOCK_C: tl.constexpr,  # channels per tile
    BLOCK_S: tl.constexpr,  # spatial positions per tile: the lanes of the reductions
    ALIGN: tl.constexpr,  # a power of two (<= 16) dividing S, chunk and every sample and channel stride
    NUM_STAGES: tl.constexpr,  # software-pipelining stages of the loop over S (1: a plain loop)
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    n, c, cmask, s_begin, s_end, c_off = _tile_offsets(pid, split, C, S, chunk, stride_xc, BLOCK_C, LARGE, ALIGN)
    x_n = _sample_start(X, n, stride_xn, ALIGN)
    if PIVOT_MODE == 0:
        pc = (c // K) * K
        pivot = tl.load(x_n + pc.to(tl.int64) * stride_xc, mask=cmask, other=0.0).to(tl.float32)
    elif PIVOT_MODE == 1:
        pivot = tl.load(X + c.to(tl.int64) * stride_xc, mask=cmask, other=0.0).to(tl.float32)
    else:
        pivot = tl.load(Running_mean + c, mask=cmask, other=0.0).to(tl.float32)
    if split == 0:
        tl.store(Pivot + n * C + c, pivot, mask=cmask)

    # Per lane (reduce.py): Welford over positions s0 + j of the chunk, then one
    # pairwise Chan merge of the lanes, so the result is the same for any BLOCK_C,
    # num_warps or num_stages.
    mean = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
    count = tl.zeros([BLOCK_S], dtype=tl.float32)
    for s0 in tl.range(s_begin, s_end, BLOCK_S, num_stages=NUM_STAGES):
        s = s0 + tl.arange(0, BLOCK_S)
        smask = s < s_end
        mask = cmask[:, None] & smask[None, :]
        x = tl.load(x_n + c_off[:, None] + _offsets(s, stride_xs, LARGE)[None, :], mask=mask, other=0.0)
        count += smask.to(tl.float32)
        mean, m2 = lane_welford(count, mean, m2, x.to(tl.float32) - pivot[:, None], mask)
    mean, m2 = _rows_tree_chan(count, mean, m2, BLOCK_C, BLOCK_S)
    out = (n * C + c) * n_split + split
    tl.store(Part_mean + out, mean, mask=cmask)
    tl.store(Part_m2 + out, m2, mask=cmask)


@triton.jit
def _merge_splits(Part_mean, Part_m2, nn, c, mask, C, S, chunk, n_split, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, BLOCK_J: tl.constexpr):
    """Per (n, c) mean and M2 over the whole spatial axis, from its chunks.

    BLOCK_J chunks at a time as one [BLOCK_N, BLOCK_K, BLOCK_J] tile (a micro-batch
    can have hundreds of chunks: a loop of one dependent load each would make this
    latency-bound): the tile's count-weighted mean, then M2 = sum M2_j +
    sum n_j (mean_j - mean)^2, and tiles merged with Chan's formula."""
    base = ((nn[:, None] * C + c[None, :]) * n_split)[:, :, None]
    mean = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    count = 0.0
    for j0 in range(0, n_split, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        jmask = j < n_split
        n_j1 = tl.where(jmask, tl.minimum(S - j * chunk, chunk), 0).to(tl.float32)
        n_b = tl.sum(n_j1, axis=0)  # values in this block of chunks (a scalar, like count)
        n_j = n_j1[None, None, :]
        m3 = mask[:, :, None] & jmask[None, None, :]
        mean_j = tl.load(Part_mean + base + j[None, None, :], mask=m3, other=0.0)
        m2_j = tl.load(Part_m2 + base + j[None, None, :], mask=m3, other=0.0)
        mean_b = tl.sum(n_j * mean_j, axis=2) / n_b
        dev = tl.where(m3, mean_j - mean_b[:, :, None], 0.0)
        m2_b = tl.sum(m2_j, axis=2) + tl.sum(n_j * dev * dev, axis=2)
        total = count + n_b
        delta = mean_b - mean
        mean += delta * (n_b / total)
        m2 += m2_b + delta * delta * (count * n_b / total)
        count = total
    return mean, m2


@triton.jit
def _old_running(Pivot, Running_mean, Running_var, c, kmask, UPDATE_RUNNING: tl.constexpr, BLOCK_K: tl.constexpr):
    """The combine's pivot per channel (the same for every n in the BN modes), the
    running buffers before this step (0 and 1 when they are not updated) and
    pivot - running mean."""
    pivot_c = tl.load(Pivot + c, mask=kmask, other=0.0)
    rm_old = tl.zeros([BLOCK_K], dtype=tl.float32)
    rv_old = tl.full([BLOCK_K], 1.0, tl.float32)
    if UPDATE_RUNNING:
        rm_old = tl.load(Running_mean + c, mask=kmask, other=0.0).to(tl.float32)
        rv_old = tl.load(Running_var + c, mask=kmask, other=1.0).to(tl.float32)
    return pivot_c, rm_old, rv_old, pivot_c - rm_old


# Across processes (DIST): each rank's combine writes its moments per channel into a
# fp64 row of LOCAL_ROWS * C + LOCAL_HEADER values: pivot_c (x[0, c, 0] of this rank),
# mean (of x - pivot_c), second (MODE_BATCH: M2 about that mean; MODE_ESTIMATE: sum of
# (x - running_mean_old)^2) and count (N S) per channel, then a header (MODE, momentum
# or -1 for the cumulative average, eps, C) that ops/collectives.py compares across
# ranks. One all_gather makes the rows [R, LOCAL_ROWS * C + LOCAL_HEADER] on every rank;
# _norm_rank_merge_kernel merges them in rank order. float64 whatever the input dtype:
# ranks with different input dtypes exchange the same bytes, and counts stay exact.
LOCAL_ROWS = tl.constexpr(4)
LOCAL_HEADER = tl.constexpr(4)


def local_row_len(channels: int) -> int:
    """Values in one rank's row (fp64)."""
    return LOCAL_ROWS.value * channels + LOCAL_HEADER.value


@triton.jit
def _store_local_moments(Local, Pivot, c, kmask, C, mean, second, N, S, g, momentum, eps, MODE: tl.constexpr,
                         CUMULATIVE: tl.constexpr, BLOCK_K: tl.constexpr):
    """This rank's row for the collective (see LOCAL_ROWS); program 0 writes the header."""
    pivot_c = tl.load(Pivot + c, mask=kmask, other=0.0)
    count = (tl.zeros([BLOCK_K], dtype=tl.float64) + N) * S
    tl.store(Local + c, pivot_c.to(tl.float64), mask=kmask)
    tl.store(Local + C + c, mean.to(tl.float64), mask=kmask)
    tl.store(Local + 2 * C + c, second.to(tl.float64), mask=kmask)
    tl.store(Local + 3 * C + c, count, mask=kmask)
    h = tl.arange(0, LOCAL_HEADER)
    if CUMULATIVE:
        mom = -1.0
    else:
        mom = momentum
    header = tl.where(h == 0, MODE * 1.0, tl.where(h == 1, mom, tl.where(h == 2, eps, C * 1.0)))
    tl.store(Local + LOCAL_ROWS * C + h, header.to(tl.float64), mask=h + LOCAL_HEADER * g < LOCAL_HEADER)


@triton.jit
def _norm_combine_kernel(
    Part_mean,  # fp32 [N, C, n_split] from the stats pass
    Part_m2,  # fp32 [N, C, n_split] from the stats pass
    Pivot,  # fp32 [N, C] from the stats pass
    Gamma,  # [C] BN-stage weight (HAS_BN_AFFINE)
    Beta,  # [C] BN-stage bias (HAS_BN_AFFINE)
    Running_mean,  # [C] running mean, updated in place in training
    Running_var,  # [C] running variance, updated in place in training
    Num_batches,  # int64 [1] num_batches_tracked before this step (CUMULATIVE)
    Mean,  # fp32 [N, C] out: mean of x - pivot per (n, c)
    Dm,  # fp32 [N, C] out: mean_nc - mu_c, the (n, c) mean centred as the BN stage centres
    Rstd_c,  # fp32 [C] out: r_c = 1 / sqrt(var_c + eps) of the BN stage
    Rho,  # fp32 [N, G] out: 1 / sqrt(tau^2 + eps) of the channel stage
    P,  # fp32 [N, C] out: rho * a_c, the slope of y_hat in e
    Ym,  # fp32 [N, C] out: rho * (u_mean - nu), the (n, c) mean of y_hat
    M2,  # fp32 [N, C] out: sum_s e^2
    Local,  # fp64 [4 C + 4] out (DIST 1): this rank's moments per channel and a header (LOCAL_ROWS)
    Glob,  # fp32 [2 C + 1] (DIST 2): shift_c and r_c per channel, from _norm_rank_merge_kernel
    N,  # batch size
    C,  # channels
    S,  # spatial size
    K,  # channels per group
    chunk,  # spatial elements per split
    n_split,  # number of spatial chunks
    momentum,  # running-average factor (unless CUMULATIVE)
    eps,  # added to both variances
    MODE: tl.constexpr,  # MODE_GN / MODE_BATCH / MODE_ESTIMATE / MODE_RUNNING
    HAS_BN_AFFINE: tl.constexpr,  # gamma, beta present
    UPDATE_RUNNING: tl.constexpr,  # write the running buffers (training)
    CUMULATIVE: tl.constexpr,  # momentum=None: factor 1 / (num_batches_tracked + 1)
    DIST: tl.constexpr,  # 0: one process; across processes 1: loop A only, into Local; 2: the rest, from Glob
    BLOCK_N: tl.constexpr,  # samples per step
    BLOCK_K: tl.constexpr,  # >= K: the whole group in one tile
    BLOCK_J: tl.constexpr,  # spatial chunks merged per step
):
    g = tl.program_id(0)
    G = C // K
    k = tl.arange(0, BLOCK_K)
    kmask = k < K
    c = g * K + k
    ns = N * S
    a = tl.full([BLOCK_K], 1.0, tl.float32)
    beta = tl.zeros([BLOCK_K], dtype=tl.float32)
    shift_c = tl.zeros([BLOCK_K], dtype=tl.float32)
    if CUMULATIVE:
        factor = 1.0 / (tl.load(Num_batches).to(tl.float32) + 1.0)
    else:
        factor = momentum

    if MODE == 1 or MODE == 2:
        if DIST == 2:
            # Across processes, second launch: the statistics of the whole batch, merged
            # over the ranks by _norm_rank_merge_kernel (which also updated the running
            # buffers): shift_c = mu_c - pivot_c of this rank, and r_c.
            shift_c = tl.load(Glob + c, mask=kmask, other=0.0)
            r = tl.load(Glob + C + c, mask=kmask, other=1.0)
        else:
            # Loop A: per-channel batch statistics over all samples. The pivot and the old
            # running buffers are loaded where they are used: inside the loop (EstBN's
            # pivot - running mean) and after it, not once before it. Kept alive across
            # the loop, triton 3.6's ptxas spilled them (4-16 bytes at 72-128 registers,
            # perf/NOTES.md). Nothing writes these buffers before the loop ends, so every
            # load reads the same values: the results are bitwise those of one load.
            mean_acc = tl.zeros([BLOCK_K], dtype=tl.float32)
            m2_acc = tl.zeros([BLOCK_K], dtype=tl.float32)
            dev_acc = tl.zeros([BLOCK_K], dtype=tl.float32)
            count = 0.0
            for n0 in range(0, N, BLOCK_N):
                nn = n0 + tl.arange(0, BLOCK_N)
                mask = (nn < N)[:, None] & kmask[None, :]
                m, m2 = _merge_splits(Part_mean, Part_m2, nn, c, mask, C, S, chunk, n_split, BLOCK_N, BLOCK_K, BLOCK_J)
                n_b = tl.minimum(N - n0, BLOCK_N).to(tl.float32)
                mean_b = tl.sum(m, axis=0) / n_b
                d = tl.where(mask, m - mean_b[None, :], 0.0)
                m2_b = tl.sum(m2, axis=0) + S * tl.sum(d * d, axis=0)
                total = count + n_b
                delta = mean_b - mean_acc
                mean_acc += delta * (n_b / total)
                m2_acc += m2_b + delta * delta * (S * count * n_b / total)
                count = total
                if MODE == 2:
                    to_old = _old_running(Pivot, Running_mean, Running_var, c, kmask, UPDATE_RUNNING, BLOCK_K)[3]
                    e = tl.where(mask, m + to_old[None, :], 0.0)  # m_nc - running_mean_old
                    dev_acc += tl.sum(m2, axis=0) + S * tl.sum(e * e, axis=0)
            if DIST == 1:
                # Across processes, first launch: this rank's moments, for the collective
                _store_local_moments(Local, Pivot, c, kmask, C, mean_acc, m2_acc if MODE == 1 else dev_acc,
                                     N, S, g, momentum, eps, MODE, CUMULATIVE, BLOCK_K)
            else:
                if MODE == 2:
                    # The channel mask again, written so that the compiler cannot merge it with
                    # the first one (c < (g + 1) K is k < K): triton 3.6's ptxas kept the first
                    # one's predicates in local memory across loop A (16 B at 72 registers in
                    # one specialisation; perf/NOTES.md). Same values, so results are unchanged.
                    kmask = c < (g + 1) * K
                if MODE == 1:
                    shift_c = mean_acc
                    var = m2_acc / ns
                    if UPDATE_RUNNING:
                        pivot_c, rm_old, rv_old, to_old = _old_running(Pivot, Running_mean, Running_var, c, kmask,
                                                                       UPDATE_RUNNING, BLOCK_K)
                        unbiased = m2_acc / (ns - 1)
                        new_rm = rm_old + factor * (to_old + mean_acc)
                        new_rv = (1.0 - factor) * rv_old + factor * unbiased
                        tl.store(Running_mean + c, new_rm, mask=kmask)
                        tl.store(Running_var + c, new_rv, mask=kmask)
                else:
                    # EstBN: update first, then normalize with the updated estimates as the
                    # buffers hold them (a half-precision buffer rounds them: what a recompute
                    # under activation checkpointing reads back, and what eval mode uses).
                    pivot_c, rm_old, rv_old, to_old = _old_running(Pivot, Running_mean, Running_var, c, kmask,
                                                                   UPDATE_RUNNING, BLOCK_K)
                    var = (1.0 - factor) * rv_old + factor * (dev_acc / ns)
                    shift_c = factor * mean_acc - (1.0 - factor) * to_old  # new running mean - pivot
                    if Running_mean.dtype.element_ty != tl.float32:
                        shift_c = (pivot_c + shift_c).to(Running_mean.dtype.element_ty).to(tl.float32) - pivot_c
                    if Running_var.dtype.element_ty != tl.float32:
                        var = var.to(Running_var.dtype.element_ty).to(tl.float32)
                    tl.store(Running_mean + c, pivot_c + shift_c, mask=kmask)
                    tl.store(Running_var + c, var, mask=kmask)
                r = tl.rsqrt(var + eps)
    elif MODE == 3:
        var = tl.load(Running_var + c, mask=kmask, other=1.0).to(tl.float32)
        r = tl.rsqrt(var + eps)  # the pivot is the running mean itself: shift 0
    else:
        r = tl.full([BLOCK_K], 1.0, tl.float32)
    if DIST != 1:  # (DIST 1 stops after loop A)
        if MODE != 0:
            tl.store(Rstd_c + c, r, mask=kmask)
            a = r
            if HAS_BN_AFFINE:
                a = r * tl.load(Gamma + c, mask=kmask, other=1.0).to(tl.float32)
                beta = tl.load(Beta + c, mask=kmask, other=0.0).to(tl.float32)

        # Loop B: u = a x' + beta per (n, c); group statistics; coefficients.
        for n0 in range(0, N, BLOCK_N):
            nn = n0 + tl.arange(0, BLOCK_N)
            nmask = nn < N
            mask = nmask[:, None] & kmask[None, :]
            m, m2 = _merge_splits(Part_mean, Part_m2, nn, c, mask, C, S, chunk, n_split, BLOCK_N, BLOCK_K, BLOCK_J)
            if MODE == 0:
                shift = tl.sum(m, axis=1)[:, None] / K + tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
            else:
                shift = shift_c[None, :] + tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
            dm = tl.where(mask, m - shift, 0.0)  # m_nc - mu
            u_mean = a[None, :] * dm + beta[None, :]
            u_var = a[None, :] * a[None, :] * m2 / S
            nu = tl.sum(tl.where(mask, u_mean, 0.0), axis=1) / K
            du = tl.where(mask, u_mean - nu[:, None], 0.0)
            tau = (tl.sum(tl.where(mask, u_var, 0.0), axis=1) + tl.sum(du * du, axis=1)) / K
            rho = tl.rsqrt(tau + eps)
            idx = nn[:, None] * C + c[None, :]
            tl.store(Mean + idx, m, mask=mask)
            tl.store(Dm + idx, dm, mask=mask)
            tl.store(P + idx, rho[:, None] * a[None, :], mask=mask)
            tl.store(Ym + idx, rho[:, None] * du, mask=mask)
            tl.store(M2 + idx, m2, mask=mask)
            tl.store(Rho + nn * G + g, rho, mask=nmask)


@triton.jit
def _norm_rank_merge_kernel(
    Gathered,  # fp64 [R, LOCAL_ROWS * C + LOCAL_HEADER]: every rank's row, in rank order
    Local,  # fp64 [LOCAL_ROWS * C + LOCAL_HEADER]: this rank's row (its pivots)
    Running_mean,  # [C] running mean, updated in place
    Running_var,  # [C] running variance, updated in place
    Num_batches,  # int64 [1] num_batches_tracked before this step (CUMULATIVE)
    Glob,  # fp32 [2 C + 1] out: shift_c = mu_c - pivot_c (this rank's pivot), r_c, total count
    C,  # channels
    R,  # ranks
    momentum,  # running-average factor (unless CUMULATIVE)
    eps,  # added to the variance
    MODE: tl.constexpr,  # MODE_BATCH / MODE_ESTIMATE
    UPDATE_RUNNING: tl.constexpr,  # write the running buffers
    CUMULATIVE: tl.constexpr,  # momentum=None: factor 1 / (num_batches_tracked + 1)
    BLOCK: tl.constexpr,  # channels per program
):
    """The batch statistics of all ranks, from their rows (see LOCAL_ROWS), in float64.

    Every rank's mean is taken relative to one common reference, the pivot p0 of the
    first rank with values (rank 0 unless it has no images):
    d_r = (pivot_r - p0) + mean_r, so different pivots per rank lose nothing. Then
    mu - p0 = sum n_r d_r / sum n_r and (batch statistics) M2 = sum M2_r + sum n_r
    (d_r - mu + p0)^2, both in rank order. The running buffers are updated from
    rank-independent values only (p0, the merged moments, the old buffers), so every
    rank writes the same bits; the shift of this rank's pivot comes last."""
    pid = tl.program_id(0)
    c = pid * BLOCK + tl.arange(0, BLOCK)
    cmask = c < C
    row_len = LOCAL_ROWS * C + LOCAL_HEADER
    p0 = tl.zeros([BLOCK], dtype=tl.float64)
    found = tl.zeros([BLOCK], dtype=tl.int1)
    for rank in range(0, R):
        row = Gathered + rank * row_len
        has = tl.load(row + 3 * C + c, mask=cmask, other=0.0) > 0.0
        p0 = tl.where(has & ~found, tl.load(row + c, mask=cmask, other=0.0), p0)
        found = found | has
    total = tl.zeros([BLOCK], dtype=tl.float64)
    sum_d = tl.zeros([BLOCK], dtype=tl.float64)
    for rank in range(0, R):
        row = Gathered + rank * row_len
        n_r = tl.load(row + 3 * C + c, mask=cmask, other=0.0)
        d_r = (tl.load(row + c, mask=cmask, other=0.0) - p0) + tl.load(row + C + c, mask=cmask, other=0.0)
        total += n_r
        sum_d += n_r * d_r
    mean = sum_d / total  # mu - p0
    second = tl.zeros([BLOCK], dtype=tl.float64)
    for rank in range(0, R):
        row = Gathered + rank * row_len
        s_r = tl.load(row + 2 * C + c, mask=cmask, other=0.0)
        if MODE == 1:
            n_r = tl.load(row + 3 * C + c, mask=cmask, other=0.0)
            d_r = (tl.load(row + c, mask=cmask, other=0.0) - p0) + tl.load(row + C + c, mask=cmask, other=0.0)
            dev = d_r - mean
            second += s_r + n_r * dev * dev
        else:
            second += s_r  # sums of squares about the old running mean: a plain sum
    if CUMULATIVE:
        factor = 1.0 / (tl.load(Num_batches).to(tl.float32) + 1.0)
    else:
        factor = momentum
    to_pivot = p0 - tl.load(Local + c, mask=cmask, other=0.0)  # p0 - this rank's pivot
    rm_old = tl.zeros([BLOCK], dtype=tl.float32)
    rv_old = tl.full([BLOCK], 1.0, tl.float32)
    if UPDATE_RUNNING:
        rm_old = tl.load(Running_mean + c, mask=cmask, other=0.0).to(tl.float32)
        rv_old = tl.load(Running_var + c, mask=cmask, other=1.0).to(tl.float32)
    to_old = p0 - rm_old
    if MODE == 1:
        var = second / total
        shift = to_pivot + mean
        if UPDATE_RUNNING:
            # float64 values are stored through fp32, rounded to nearest, as torch's copy_
            # rounds them (a rank without images writes its buffers so); one value per
            # channel in all has no unbiased variance: the running one stays (on CPU the
            # error is raised first)
            new_rm = rm_old + factor * (to_old + mean)
            new_rv = tl.where(total > 1.0, (1.0 - factor) * rv_old + factor * (second / (total - 1.0)), rv_old)
            tl.store(Running_mean + c, _as_element_of(new_rm.to(tl.float32), Running_mean), mask=cmask)
            tl.store(Running_var + c, _as_element_of(new_rv.to(tl.float32), Running_var), mask=cmask)
    else:
        # EstBN: update first, then normalize with the updated estimates as the buffers
        # hold them (rounded in a half-precision buffer, as in _norm_combine_kernel)
        var = (1.0 - factor) * rv_old + factor * (second / total)
        q = factor * mean - (1.0 - factor) * to_old  # new running mean - p0
        if Running_mean.dtype.element_ty != tl.float32:
            q = _as_element_of((p0 + q).to(tl.float32), Running_mean).to(p0.dtype) - p0
        if Running_var.dtype.element_ty != tl.float32:
            var = _as_element_of(var.to(tl.float32), Running_var).to(second.dtype)
        tl.store(Running_mean + c, _as_element_of((p0 + q).to(tl.float32), Running_mean), mask=cmask)
        tl.store(Running_var + c, _as_element_of(var.to(tl.float32), Running_var), mask=cmask)
        shift = to_pivot + q
    r = tl.rsqrt(var.to(tl.float32) + eps)
    tl.store(Glob + c, shift.to(tl.float32), mask=cmask)
    tl.store(Glob + C + c, r, mask=cmask)
    tl.store(Glob + 2 * C + c * 0, total.to(tl.float32), mask=cmask & (c == 0))


@triton.jit
def _load_channel_coefs(Pivot, Mean, P, Ym, Omega, Eta, n, c, cmask, K, HAS_AFFINE: tl.constexpr, GROUP_AFFINE: tl.constexpr, C):
    """Per channel of the tile: pivot, mean, and z = A e + B with e = (x - pivot) - mean."""
    idx = n * C + c
    pivot = tl.load(Pivot + idx, mask=cmask, other=0.0)
    mean = tl.load(Mean + idx, mask=cmask, other=0.0)
    p = tl.load(P + idx, mask=cmask, other=0.0)
    ym = tl.load(Ym + idx, mask=cmask, other=0.0)
    if HAS_AFFINE:
        aff = c // K if GROUP_AFFINE else c
        omega = tl.load(Omega + aff, mask=cmask, other=0.0).to(tl.float32)
        eta = tl.load(Eta + aff, mask=cmask, other=0.0).to(tl.float32)
    else:
        omega = tl.full(p.shape, 1.0, tl.float32)
        eta = tl.zeros(p.shape, dtype=tl.float32)
    # z = omega y_hat + eta, y_hat = ym + P e
    return pivot, mean, omega * p, omega * ym + eta


@triton.jit
def _norm_apply_kernel(
    X,  # input (N, C, S), read through strides
    Y,  # output, same shape, written through its own strides
    Pivot,  # fp32 [N, C] from the stats pass
    Mean,  # fp32 [N, C] from the combine
    P,  # fp32 [N, C] from the combine
    Ym,  # fp32 [N, C] from the combine
    Omega,  # channel-stage weight: [G] (GROUP_AFFINE) or [C]
    Eta,  # channel-stage bias, like Omega
    Num_batches,  # int64 [1] num_batches_tracked, incremented here (INCREMENT)
    C,  # channels
    S,  # spatial size
    K,  # channels per group
    stride_xn,  # strides of x
    stride_xc,
    stride_xs,
    stride_yn,  # strides of y
    stride_yc,
    stride_ys,
    chunk,  # spatial elements per split
    ACT: tl.constexpr,  # 0 none, 1 relu, 2 silu
    HAS_AFFINE: tl.constexpr,  # omega, eta present
    GROUP_AFFINE: tl.constexpr,  # omega, eta per group
    INCREMENT: tl.constexpr,  # bump num_batches_tracked (after the combine read it)
    LARGE: tl.constexpr,  # int64 offsets within a sample
    BLOCK_C: tl.constexpr,  # channels per tile
    BLOCK_S: tl.constexpr,  # spatial positions per tile: the lanes of the reductions
    ALIGN: tl.constexpr,  # a power of two (<= 16) dividing S, chunk and every sample and channel stride
    NUM_STAGES: tl.constexpr,  # software-pipelining stages of the loop over S (1: a plain loop)
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    if INCREMENT:
        if pid == 0 and split == 0:
            tl.store(Num_batches, tl.load(Num_batches) + 1)
    n, c, cmask, s_begin, s_end, c_off = _tile_offsets(pid, split, C, S, chunk, stride_xc, BLOCK_C, LARGE, ALIGN)
    pivot, mean, coef_a, coef_b = _load_channel_coefs(Pivot, Mean, P, Ym, Omega, Eta, n, c, cmask, K, HAS_AFFINE, GROUP_AFFINE, C)
    yc_off = _channel_offsets(c, stride_yc, LARGE, ALIGN)
    x_n = _sample_start(X, n, stride_xn, ALIGN)
    y_n = _sample_start(Y, n, stride_yn, ALIGN)
    for s0 in tl.range(s_begin, s_end, BLOCK_S, num_stages=NUM_STAGES):
        s = s0 + tl.arange(0, BLOCK_S)
        mask = cmask[:, None] & (s < s_end)[None, :]
        x = tl.load(x_n + c_off[:, None] + _offsets(s, stride_xs, LARGE)[None, :], mask=mask, other=0.0)
        e = (x.to(tl.float32) - pivot[:, None]) - mean[:, None]
        z = coef_a[:, None] * e + coef_b[:, None]
        y = _activate(z, ACT)
        tl.store(y_n + yc_off[:, None] + _offsets(s, stride_ys, LARGE)[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _norm_bwd_reduce_kernel(
    Dy,  # upstream gradient, read through its strides
    X,  # input, read through its strides
    Pivot,  # fp32 [N, C] saved by the forward
    Mean,  # fp32 [N, C] saved by the forward
    P,  # fp32 [N, C] saved by the forward
    Ym,  # fp32 [N, C] saved by the forward
    Omega,  # channel-stage weight
    Eta,  # channel-stage bias
    Part_d1,  # fp32 [N, C, n_split] out: sum of dz over each chunk
    Part_de,  # fp32 [N, C, n_split] out: sum of dz * e over each chunk
    C,  # channels
    S,  # spatial size
    K,  # channels per group
    stride_xn,  # strides of x
    stride_xc,
    stride_xs,
    stride_dn,  # strides of dy
    stride_dc,
    stride_ds,
    chunk,  # spatial elements per split
    n_split,  # number of chunks
    ACT: tl.constexpr,  # 0 none, 1 relu, 2 silu: dz = dy act'(z), z recomputed from x
    HAS_AFFINE: tl.constexpr,  # omega, eta present
    GROUP_AFFINE: tl.constexpr,  # omega, eta per group
    LARGE: tl.constexpr,  # int64 offsets within a sample
    BLOCK_C: tl.constexpr,  # channels per tile
    BLOCK_S: tl.constexpr,  # spatial positions per tile: the lanes of the reductions
    ALIGN: tl.constexpr,  # a power of two (<= 16) dividing S, chunk and every sample and channel stride
    NUM_STAGES: tl.constexpr,  # software-pipelining stages of the loop over S (1: a plain loop)
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    n, c, cmask, s_begin, s_end, c_off = _tile_offsets(pid, split, C, S, chunk, stride_xc, BLOCK_C, LARGE, ALIGN)
    pivot, mean, coef_a, coef_b = _load_channel_coefs(Pivot, Mean, P, Ym, Omega, Eta, n, c, cmask, K, HAS_AFFINE, GROUP_AFFINE, C)
    dc_off = _channel_offsets(c, stride_dc, LARGE, ALIGN)
    x_n = _sample_start(X, n, stride_xn, ALIGN)
    dy_n = _sample_start(Dy, n, stride_dn, ALIGN)
    # per-lane sums, then one pairwise tree over the lanes (reduce.py)
    d1 = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
    de = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
    for s0 in tl.range(s_begin, s_end, BLOCK_S, num_stages=NUM_STAGES):
        s = s0 + tl.arange(0, BLOCK_S)
        mask = cmask[:, None] & (s < s_end)[None, :]
        e, dz = _load_e_dz(x_n, dy_n, c_off, dc_off, s, mask, stride_xs, stride_ds, pivot, mean, coef_a, coef_b,
                           ACT, LARGE)
        d1 += dz
        de += dz * e
    d1 = _rows_tree_sum(d1, BLOCK_C, BLOCK_S)
    de = _rows_tree_sum(de, BLOCK_C, BLOCK_S)
    out = (n * C + c) * n_split + split
    tl.store(Part_d1 + out, d1, mask=cmask)
    tl.store(Part_de + out, de, mask=cmask)


@triton.jit
def _norm_bwd_combine_kernel(
    Part_d1,  # fp32 [N, C, n_split] from the backward reduce
    Part_de,  # fp32 [N, C, n_split] from the backward reduce
    Rstd_c,  # fp32 [C] r_c saved by the forward (BN modes)
    Rho,  # fp32 [N, G] saved by the forward
    Dm,  # fp32 [N, C] saved by the forward
    P,  # fp32 [N, C] saved by the forward
    Ym,  # fp32 [N, C] saved by the forward
    M2,  # fp32 [N, C] saved by the forward
    Gamma,  # [C] BN-stage weight (HAS_BN_AFFINE)
    Omega,  # channel-stage weight (HAS_AFFINE)
    Dgamma,  # [C] out (HAS_BN_AFFINE): fp32, or the parameters' dtype (rounded as torch casts)
    Dbeta,  # [C] out (HAS_BN_AFFINE), as Dgamma
    Domega,  # [G] or [C] out (HAS_AFFINE), as Dgamma
    Deta,  # [G] or [C] out (HAS_AFFINE), as Dgamma
    CA,  # fp32 [N, C] out: dx = CA dz + CE e + CC
    CE,  # fp32 [N, C] out
    CC,  # fp32 [N, C] out
    Gsum,  # fp64 [2, C] (DIST): d_gamma, d_beta as sums over this rank's batch (DIST 1, out), over all ranks (DIST 2)
    Glob,  # fp32 [2 C + 1] (DIST 2): the forward's merged statistics; [2 C]: values per channel of the whole batch
    N,  # batch size
    C,  # channels
    S,  # spatial size
    K,  # channels per group
    n_split,  # number of chunks
    MODE: tl.constexpr,  # as in the forward
    HAS_BN_AFFINE: tl.constexpr,  # gamma, beta present
    HAS_AFFINE: tl.constexpr,  # omega, eta present
    GROUP_AFFINE: tl.constexpr,  # omega, eta per group
    DIST: tl.constexpr,  # 0: one process; across processes (MODE_BATCH) 1: sweep 0 into Gsum; 2: sweep 1 from it
    BLOCK_N: tl.constexpr,  # samples per step
    BLOCK_K: tl.constexpr,  # >= K
    BLOCK_J: tl.constexpr,  # spatial chunks summed per step
):
    # Per (n, c), with y_hat = ym + P e and du = alpha dz - rho E1 - rho E2 y_hat
    # (the channel stage's backward; alpha = rho omega):
    #   t = sum_s dz y_hat = ym D1 + P De             -> d_omega = sum_n t, d_eta = sum_n D1
    #   E1 = sum_{c in g} omega D1 / L, E2 = sum_{c in g} omega t / L, L = K S
    #   sum_s du    = alpha D1 - rho S (E1 + E2 ym)   -> d_beta = sum_n
    #   sum_s du x' = alpha (De + dm D1) - rho E1 S dm - rho E2 (S ym dm + P M2)
    #                                                 -> d_gamma = sum_n r (...)
    # dx = r gamma [du - (r d_gamma x' + d_beta) / M] with batch statistics (M = N S),
    # dx = r gamma du with estimates; x' = e + dm.
    # Across processes d_gamma, d_beta and M in dx are those of the whole batch: DIST 1
    # runs sweep 0 (writing the parameter gradients of this rank's batch, as DDP wants
    # them, and the sums for the all_reduce), DIST 2 sweep 1 with the all_reduced sums.
    g = tl.program_id(0)
    G = C // K
    k = tl.arange(0, BLOCK_K)
    kmask = k < K
    c = g * K + k
    L = K * S
    if MODE != 0:
        r = tl.load(Rstd_c + c, mask=kmask, other=0.0)
    else:
        r = tl.full([BLOCK_K], 1.0, tl.float32)
    gamma = tl.full([BLOCK_K], 1.0, tl.float32)
    if HAS_BN_AFFINE:
        gamma = tl.load(Gamma + c, mask=kmask, other=0.0).to(tl.float32)
    omega = tl.where(kmask, 1.0, 0.0)
    if HAS_AFFINE:
        aff = c // K if GROUP_AFFINE else c
        omega = tl.load(Omega + aff, mask=kmask, other=0.0).to(tl.float32)
    d_gamma = tl.zeros([BLOCK_K], dtype=tl.float32)
    d_beta = tl.zeros([BLOCK_K], dtype=tl.float32)
    d_omega = tl.zeros([BLOCK_K], dtype=tl.float32)
    d_eta = tl.zeros([BLOCK_K], dtype=tl.float32)
    if DIST == 2:
        d_gamma = tl.load(Gsum + c, mask=kmask, other=0.0).to(tl.float32)
        d_beta = tl.load(Gsum + C + c, mask=kmask, other=0.0).to(tl.float32)
    # Batch mode sweeps the samples twice: sweep 0 sums the parameter gradients, sweep 1
    # writes the dx coefficients, which need the complete d_gamma and d_beta. The other
    # modes' coefficients (GN, estimates, eval) do not, so there one sweep does both:
    # the partial sums are read once, and nothing lives from one sweep to the next
    # (triton 3.9's ptxas spilled channel offsets across sweep 0 in the estimate and
    # eval modes; perf/NOTES.md). Each value is computed as in two sweeps: same bits.
    for sweep in tl.static_range(1 if DIST == 2 else 0, 1 if DIST == 1 else (2 if MODE == 1 else 1)):
        for n0 in range(0, N, BLOCK_N):
            nn = n0 + tl.arange(0, BLOCK_N)
            nmask = nn < N
            mask = nmask[:, None] & kmask[None, :]
            base = (nn[:, None] * C + c[None, :]) * n_split
            # BLOCK_J chunks per load, as in _merge_splits, summed elementwise in the
            # loop and reduced once after it (a tl.sum per step into a loop-carried
            # accumulator breaks triton 3.6's thread-locality pass when N = 1)
            d1_j = tl.zeros([BLOCK_N, BLOCK_K, BLOCK_J], dtype=tl.float32)
            de_j = tl.zeros([BLOCK_N, BLOCK_K, BLOCK_J], dtype=tl.float32)
            for j0 in range(0, n_split, BLOCK_J):
                j = j0 + tl.arange(0, BLOCK_J)
                m3 = mask[:, :, None] & (j < n_split)[None, None, :]
                offs = base[:, :, None] + j[None, None, :]
                d1_j += tl.load(Part_d1 + offs, mask=m3, other=0.0)
                de_j += tl.load(Part_de + offs, mask=m3, other=0.0)
            d1 = tl.sum(d1_j, axis=2)
            de = tl.sum(de_j, axis=2)
            idx = nn[:, None] * C + c[None, :]
            dm = tl.load(Dm + idx, mask=mask, other=0.0)
            p = tl.load(P + idx, mask=mask, other=0.0)
            ym = tl.load(Ym + idx, mask=mask, other=0.0)
            rho = tl.load(Rho + nn * G + g, mask=nmask, other=0.0)[:, None]
            t = ym * d1 + p * de
            e1 = tl.sum(omega[None, :] * d1, axis=1)[:, None] / L
            e2 = tl.sum(omega[None, :] * t, axis=1)[:, None] / L
            alpha = rho * omega[None, :]
            if sweep == 0:
                m2 = tl.load(M2 + idx, mask=mask, other=0.0)
                sum_du = alpha * d1 - rho * S * (e1 + e2 * ym)
                sum_dux = alpha * (de + dm * d1) - rho * e1 * S * dm - rho * e2 * (S * ym * dm + p * m2)
                d_omega += tl.sum(t, axis=0)
                d_eta += tl.sum(d1, axis=0)
                d_gamma += tl.sum(tl.where(mask, r[None, :] * sum_dux, 0.0), axis=0)
                d_beta += tl.sum(tl.where(mask, sum_du, 0.0), axis=0)
            if sweep == 1 or MODE != 1:
                scale = (r * gamma)[None, :]
                ca = scale * alpha
                ce = -scale * rho * e2 * p
                cc = -scale * rho * (e1 + e2 * ym)
                if MODE == 1:
                    if DIST == 2:
                        count = tl.load(Glob + 2 * C)
                        slope = (r * d_gamma)[None, :] / count
                        ce -= scale * slope
                        cc -= scale * (d_beta[None, :] / count + slope * dm)
                    else:
                        slope = (r * d_gamma)[None, :] / (N * S)
                        ce -= scale * slope
                        cc -= scale * (d_beta[None, :] / (N * S) + slope * dm)
                tl.store(CA + idx, ca, mask=mask)
                tl.store(CE + idx, ce, mask=mask)
                tl.store(CC + idx, cc, mask=mask)
    if DIST == 1:
        tl.store(Gsum + c, d_gamma.to(tl.float64), mask=kmask)
        tl.store(Gsum + C + c, d_beta.to(tl.float64), mask=kmask)
    if HAS_BN_AFFINE and DIST != 2:
        tl.store(Dgamma + c, _as_element_of(d_gamma, Dgamma), mask=kmask)
        tl.store(Dbeta + c, _as_element_of(d_beta, Dbeta), mask=kmask)
    if HAS_AFFINE and DIST != 2:
        if GROUP_AFFINE:
            tl.store(Domega + g, _as_element_of(tl.sum(d_omega, axis=0), Domega))
            tl.store(Deta + g, _as_element_of(tl.sum(d_eta, axis=0), Deta))
        else:
            tl.store(Domega + c, _as_element_of(d_omega, Domega), mask=kmask)
            tl.store(Deta + c, _as_element_of(d_eta, Deta), mask=kmask)


@triton.jit
def _norm_bwd_apply_kernel(
    Dy,  # upstream gradient, read through its strides
    X,  # input, read through its strides
    Dx,  # output gradient, written through its strides
    Pivot,  # fp32 [N, C] saved by the forward
    Mean,  # fp32 [N, C] saved by the forward
    P,  # fp32 [N, C] saved by the forward (to recompute z for act')
    Ym,  # fp32 [N, C] saved by the forward
    Omega,  # channel-stage weight
    Eta,  # channel-stage bias
    CA,  # fp32 [N, C] from the backward combine
    CE,  # fp32 [N, C]
    CC,  # fp32 [N, C]
    C,  # channels
    S,  # spatial size
    K,  # channels per group
    stride_xn,  # strides of x
    stride_xc,
    stride_xs,
    stride_dn,  # strides of dy
    stride_dc,
    stride_ds,
    stride_on,  # strides of dx
    stride_oc,
    stride_os,
    chunk,  # spatial elements per split
    ACT: tl.constexpr,  # 0 none, 1 relu, 2 silu
    HAS_AFFINE: tl.constexpr,  # omega, eta present
    GROUP_AFFINE: tl.constexpr,  # omega, eta per group
    LARGE: tl.constexpr,  # int64 offsets within a sample
    BLOCK_C: tl.constexpr,  # channels per tile
    BLOCK_S: tl.constexpr,  # spatial positions per tile: the lanes of the reductions
    ALIGN: tl.constexpr,  # a power of two (<= 16) dividing S, chunk and every sample and channel stride
    NUM_STAGES: tl.constexpr,  # software-pipelining stages of the loop over S (1: a plain loop)
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    n, c, cmask, s_begin, s_end, c_off = _tile_offsets(pid, split, C, S, chunk, stride_xc, BLOCK_C, LARGE, ALIGN)
    pivot, mean, coef_a, coef_b = _load_channel_coefs(Pivot, Mean, P, Ym, Omega, Eta, n, c, cmask, K, HAS_AFFINE, GROUP_AFFINE, C)
    idx = n * C + c
    ca = tl.load(CA + idx, mask=cmask, other=0.0)
    ce = tl.load(CE + idx, mask=cmask, other=0.0)
    cc = tl.load(CC + idx, mask=cmask, other=0.0)
    dc_off = _channel_offsets(c, stride_dc, LARGE, ALIGN)
    oc_off = _channel_offsets(c, stride_oc, LARGE, ALIGN)
    x_n = _sample_start(X, n, stride_xn, ALIGN)
    dy_n = _sample_start(Dy, n, stride_dn, ALIGN)
    dx_n = _sample_start(Dx, n, stride_on, ALIGN)
    for s0 in tl.range(s_begin, s_end, BLOCK_S, num_stages=NUM_STAGES):
        s = s0 + tl.arange(0, BLOCK_S)
        mask = cmask[:, None] & (s < s_end)[None, :]
        e, dz = _load_e_dz(x_n, dy_n, c_off, dc_off, s, mask, stride_xs, stride_ds, pivot, mean, coef_a, coef_b,
                           ACT, LARGE)
        dx = ca[:, None] * dz + ce[:, None] * e + cc[:, None]
        tl.store(dx_n + oc_off[:, None] + _offsets(s, stride_os, LARGE)[None, :], dx.to(Dx.dtype.element_ty), mask=mask)
