"""BCN across processes: ``_Call.forward``/``backward`` when the call has a process
group (DESIGN.md section 8; the collectives and their checks: collectives.py).

- Triton (CUDA tensors, or CPU tensors through the interpreter with
  ``WSBCN_BACKEND=triton``): the launch plan's kernels around one collective each way
  (``DistNormPlan``, kernels/norm_plan.py): forward stats pass, this rank's moments
  per channel, ONE all_gather, the merge of all ranks (and the running buffers), group
  statistics and coefficients, apply; backward (batch statistics) reduce pass, ONE
  all_reduce of the per-channel gradient sums, coefficients, apply. No host sync.
- the torch closed form (CPU tensors by default, float64; torch.compile runs the layer
  eagerly, ops/norm.py ``_batch_channel_norm_eagerly``):
  ``norm_forward_torch``/``norm_backward_torch`` with the same collectives as hooks.
Inputs whose spatial dims one stride cannot walk are made contiguous first, as in one
process.
- an empty input (a rank with no images) still takes part in both collectives, so the
  others do not wait for it, and updates its running buffers as they do.

Estimate mode's backward has no collective (no gradient through the statistics).
Parameter gradients are this rank's (DDP averages them); dx is that of the whole batch.
"""
import torch

from .. import _compat, backends
from ..backends.torch_closed_form import (acc_dtype, merged_factor, merged_running_update, norm_backward_torch,
                                         norm_forward_torch)
from ..kernels.layout import contiguous, nsc_strides
from ..kernels.norm import MODE_BATCH
from ..kernels.norm_plan import DistNormPlan
from . import collectives


def _header(call, x):
    return collectives.header_values(call.mode, call.momentum, call.cumulative, call.eps, x.shape[1])


def _check_each_call(x):
    """Compare the ranks' headers on every call? Yes for host tensors (no sync); CUDA
    tensors: on a plan's first call only, never while capturing a CUDA graph."""
    return not x.is_cuda


def _check_header(x, dplan):
    """Compare the ranks' headers in this call of the Triton path? CPU tensors through
    the interpreter: every call (``_check_each_call``); CUDA tensors: a plan's first
    call only, never while a CUDA graph is captured. CPU tensors on an emulated GPU
    (``backends.emulate_gpu`` over the stub driver, for host time): never. They take
    the CUDA path, so that repeat calls time what a CUDA run does, and no kernel
    writes the rows there (they hold whatever memory held), so the first call has
    nothing to compare; host time skips one host read of the rows, once per plan."""
    if x.is_cuda:
        return not dplan.header_checked and not torch.cuda.is_current_stream_capturing()
    return backends.emulated_gpu() is None


def _dist_plan(call, x, gamma, omega, nbt, world):
    plan = call.plan(x, gamma, omega, nbt)
    key = ("dist", plan, world)
    found = call.plans.get(key)
    if found is None:
        found = call.plans[key] = DistNormPlan(plan, world)
    return found


def forward(call, x, gamma, beta, omega, eta, running_mean, running_var, nbt):
    """(y, saved): the Triton path saves its side buffer ``(side,)`` (the eager
    layout), the torch closed form (stats, rstd_c, rho, count)."""
    ranks = call.group
    if x.numel() == 0:
        return _forward_empty(call, x, running_mean, running_var, nbt)
    if nsc_strides(x) is None:
        x = x.contiguous()  # spatial dims that one stride cannot walk (the backward does the same)
    if backends.backend_for(x) == "triton" and not _compat.without_memory(x):  # (compile runs it eagerly)
        dplan = _dist_plan(call, x, gamma, omega, nbt, ranks.size)
        check = _check_header(x, dplan)
        counts_checked = check and not x.is_cuda  # (read on the host: CUDA's merge keeps the variance instead)

        def gather(row):
            rows = collectives.gather_rows(row, ranks, check)
            if check:
                dplan.header_checked = True
            if counts_checked:
                collectives.check_counts(rows, x.shape[1], call.mode == MODE_BATCH)
            return rows

        y, side = dplan.forward(x, gamma, beta, omega, eta, running_mean, running_var, nbt, gather)
        return y, (side,)
    counts = []
    gather = collectives.channel_stats_reducer(ranks, _header(call, x), check=_check_each_call(x))

    def reduce(kind, pivot, mean, second, count):
        merged = gather(kind, pivot, mean, second, count)
        counts.append(merged[2])
        return merged

    y, stats, rstd_c, rho = norm_forward_torch(
        x, gamma, beta, omega, eta, running_mean, running_var, nbt, call.num_groups, call.eps,
        call.momentum, call.cumulative, call.mode, True, call.activation, call.group_affine,
        reduce_channel_stats=reduce)
    return y, (stats, rstd_c, rho, counts[0])


def backward(call, dy, x, saved, gamma, beta, omega, eta):
    """dx and the gradients (d_gamma, d_beta, d_omega, d_eta) of this rank: on the
    Triton path each like its parameter, else fp32 vectors."""
    ranks = call.group
    if x.numel() == 0:
        return _backward_empty(call, x, saved, gamma, omega)
    if nsc_strides(x) is None:
        x = x.contiguous()
    if len(saved) == 1:  # the Triton path's side buffer
        # (a saved-tensor hook may give them back strided: the kernels index them densely)
        side, gamma, omega, eta = contiguous(saved[0], gamma, omega, eta)
        if call.mode != MODE_BATCH:  # estimates: nothing to combine
            return call.plan(x, gamma, omega, None).backward(dy, x, side, gamma, beta, omega, eta)
        dplan = _dist_plan(call, x, gamma, omega, None, ranks.size)
        return dplan.backward(dy, x, side, gamma, beta, omega, eta,
                              lambda sums: collectives.all_reduce_rows(sums, ranks))
    stats, rstd_c, rho, count = saved
    reduce = (lambda t: collectives.all_reduce_sum(t, ranks)) if call.mode == MODE_BATCH else None
    return norm_backward_torch(dy, x, stats, rstd_c, rho, gamma, omega, eta, call.num_groups, call.mode,
                               call.activation, call.group_affine, reduce_channel_grads=reduce, batch_count=count)


# -- a rank without images --------------------------------------------------------------

def _forward_empty(call, x, running_mean, running_var, nbt):
    """Take part in the all_gather with a count of 0 and apply the running-buffer update
    every rank applies, with the arithmetic of the ranks with images (the Triton path's
    or the torch closed form's), so that every rank writes the same bits."""
    ranks, c = call.group, x.shape[1]
    f64 = dict(device=x.device, dtype=torch.float64)
    zeros = torch.zeros((c,), **f64)
    row = collectives.local_row(zeros, zeros, zeros, 0.0, _header(call, x))
    check = _check_each_call(x)
    rows = collectives.gather_rows(row, ranks, check=check)
    if check:
        collectives.check_counts(rows, c, call.mode == MODE_BATCH)
    merged = collectives.merge_rows(rows, c, call.mode == MODE_BATCH)
    if backends.backend_for(x) == "triton":
        new_rm, new_rv = _merge_kernel_update(call, running_mean, running_var, nbt, *merged)
    else:  # norm_forward_torch's values and formulas
        new_rm, new_rv, _ = merged_running_update(call.mode == MODE_BATCH, running_mean, running_var, merged,
                                                  merged_factor(call.cumulative, call.momentum, nbt))
    total = merged[3]
    some = total > 0  # no rank has images: the buffers stay, as nn.BatchNorm's on an empty batch (no host read)
    running_mean.copy_(torch.where(some, new_rm, running_mean))
    running_var.copy_(torch.where(some, new_rv, running_var))
    if nbt is not None:
        nbt.add_(1)
    acc = acc_dtype(x.dtype)
    n, g = x.shape[0], call.num_groups
    stats = torch.zeros((6, n, c), device=x.device, dtype=acc)
    return torch.empty_like(x), (stats, torch.zeros((c,), device=x.device, dtype=acc),
                                 torch.zeros((n, g), device=x.device, dtype=acc), total.to(acc))


def _merge_kernel_update(call, running_mean, running_var, nbt, p0, mean, second, total):
    """The running buffers as ``_norm_rank_merge_kernel`` writes them, its precisions
    included: an fp32 factor and old buffers, ``(1 - factor) * running_var`` rounded to
    fp32, the rest in float64 (p0, mean, second, total: the merge's, float64), stored
    through fp32; with one value per channel in all the running variance stays."""
    f32 = torch.float32
    factor = 1.0 / (nbt.to(f32) + 1.0) if call.cumulative else torch.tensor(call.momentum, dtype=f32)
    keep = 1.0 - factor
    rm_old, rv_old = running_mean.to(f32), running_var.to(f32)
    factor, old_var = factor.to(torch.float64), (keep * rv_old).to(torch.float64)
    to_old = p0 - rm_old.to(torch.float64)
    if call.mode == MODE_BATCH:
        new_rv = torch.where(total > 1, old_var + factor * (second / (total - 1.0)), rv_old.to(torch.float64))
        return (rm_old.to(torch.float64) + factor * (to_old + mean)).to(f32), new_rv.to(f32)
    q = factor * mean - keep.to(torch.float64) * to_old  # new running mean - p0
    if running_mean.dtype != f32:
        q = (p0 + q).to(f32).to(running_mean.dtype).to(torch.float64) - p0
    return (p0 + q).to(f32), (old_var + factor * (second / total)).to(f32)  # stored through fp32, as the kernel


def _backward_empty(call, x, saved, gamma, omega):
    """Take part in the all_reduce with zeros; no gradient to give."""
    c, acc = x.shape[1], saved[0].dtype
    if call.mode == MODE_BATCH:
        collectives.all_reduce_rows(torch.zeros((2, c), device=x.device, dtype=torch.float64), call.group)
    bn = c if gamma is not None else 0
    aff = (call.num_groups if call.group_affine else c) if omega is not None else 0
    return (torch.zeros_like(x),) + tuple(torch.zeros((m,), device=x.device, dtype=acc) for m in (bn, bn, aff, aff))
