"""The collectives of BCN across processes (``process_group=``; DESIGN.md section 8).

R ranks of b images behave as one batch of R*b: in forward the per-channel batch
statistics are combined with one collective (an all_gather of mean, M2 and count
per channel, merged with Chan's formula); in backward the per-channel gradient
sums (d_gamma, d_beta) with one all_reduce. Parameter gradients stay local, as
with nn.SyncBatchNorm: DDP averages them. With ``estimate=True`` the batch mean and
the spread about the old running mean are combined the same way, so every rank
applies the same update and the running estimates stay identical across ranks.
They work on gloo (CPU) and NCCL (GPU).
"""
import torch
import torch.distributed as dist


def check_initialized() -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("BatchChannelNorm with process_group needs torch.distributed to be initialized")


def channel_stats_reducer(group):
    """``reduce(kind, mean, second, count) -> (mean, second, count)`` over the ranks of
    ``group``: one all_gather of [3, C]. ``kind`` "chan": ``second`` is M2 about each
    rank's mean (merged with Chan's formula); "sum": a plain sum over ranks."""

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


def all_reduce_sum(t: torch.Tensor, group) -> torch.Tensor:
    """``t`` summed over the ranks of ``group`` (one all_reduce)."""
    t = t.contiguous()
    dist.all_reduce(t, group=group)
    return t
