"""Batch-Channel Normalization across processes (``process_group=``): the autograd
Function behind ``BatchChannelNorm(process_group=...)``; ``wsbcn.distributed`` holds the
public helpers.

R ranks of b images behave as one batch of R*b: in forward the per-channel batch
statistics are combined with one collective (an all_gather of mean, M2 and count
per channel, merged with Chan's formula); in backward the per-channel gradient
sums (d_gamma, d_beta) with one all_reduce. Parameter gradients stay local, as
with nn.SyncBatchNorm: DDP averages them.

With ``estimate=True`` the batch mean and the spread about the old running mean
are combined the same way, so every rank applies the same update and the running
estimates stay identical across ranks (no gradient flows through them, so no
backward collective).

This path computes with the torch closed form (wsbcn/torch_norm.py) on any device;
its collectives work on gloo (CPU) and NCCL (GPU).
"""
import torch
import torch.distributed as dist

from .norm import param_grads
from .torch_norm import MODE_BATCH, MODE_ESTIMATE, norm_backward_torch, norm_forward_torch


def _gather_channel_stats(group):
    def reduce(kind, mean_abs, second, count):
        count_t = torch.full_like(mean_abs, float(count)) if not torch.is_tensor(count) else count.expand_as(mean_abs)
        local = torch.stack([mean_abs, second, count_t.to(mean_abs.dtype)])
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, local.contiguous(), group=group)
        allp = torch.stack(parts)  # [R, 3, C]
        means, seconds, counts = allp[:, 0], allp[:, 1], allp[:, 2]
        total = counts.sum(dim=0)
        mean = (counts * means).sum(dim=0) / total
        if kind == "chan":  # Chan: M2 = sum M2_r + sum n_r (mean_r - mean)^2
            second = seconds.sum(dim=0) + (counts * (means - mean).square()).sum(dim=0)
        else:
            second = seconds.sum(dim=0)
        return mean, second, total

    return reduce


class DistributedBatchChannelNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gamma, beta, omega, eta, running_mean, running_var, num_batches_tracked,
                num_groups, eps, momentum, cumulative, mode, activation, group_affine, group):
        counts = []
        gather = _gather_channel_stats(group)

        def reduce(kind, mean_abs, second, count):
            mean, second, total = gather(kind, mean_abs, second, count)
            counts.append(total)
            return mean, second, total

        y, stats, rstd_c, rho = norm_forward_torch(
            x, gamma, beta, omega, eta, running_mean, running_var, num_batches_tracked, num_groups, eps,
            momentum, cumulative, mode, True, activation, group_affine, reduce_channel_stats=reduce)
        ctx.save_for_backward(x, stats, rstd_c, rho, gamma, omega, eta, counts[0])
        ctx.config = (num_groups, mode, activation, group_affine, group)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, stats, rstd_c, rho, gamma, omega, eta, count = ctx.saved_tensors
        num_groups, mode, activation, group_affine, group = ctx.config

        def all_reduce(t):
            t = t.contiguous()
            dist.all_reduce(t, group=group)
            return t

        dx, *grads = norm_backward_torch(
            dy, x, stats, rstd_c, rho, gamma, omega, eta, num_groups, mode, activation, group_affine,
            reduce_channel_grads=all_reduce if mode == MODE_BATCH else None, batch_count=count)
        return (dx, *param_grads(*grads, gamma, omega)) + (None,) * 11


def distributed_batch_channel_norm(module, x):
    """Training forward of a BatchChannelNorm module over its ``process_group``."""
    group = module.process_group
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("BatchChannelNorm with process_group needs torch.distributed to be initialized")
    mode = MODE_ESTIMATE if module.estimate else MODE_BATCH
    cumulative = module.momentum is None
    return DistributedBatchChannelNormFunction.apply(
        x, module.weight, module.bias, module.group_weight, module.group_bias, module.running_mean,
        module.running_var, module.num_batches_tracked, module.num_groups, module.eps,
        0.0 if cumulative else module.momentum, cumulative, mode, module.activation,
        module.group_weight is not None and module.group_weight.numel() == module.num_groups, group)
