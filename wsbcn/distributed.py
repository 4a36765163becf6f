"""Batch-Channel Normalization across processes: public helpers.

``BatchChannelNorm{1,2,3}d(process_group=...)`` combines the batch statistics of all
ranks (wsbcn/ops/collectives.py); ``sync_running_stats`` re-synchronizes running
estimates that did drift (e.g. after ranks trained apart).
"""
import torch
import torch.distributed as dist

from .modules.norm import _BatchChannelNorm


@torch.no_grad()
def sync_running_stats(model, process_group=None):
    """Average the running estimates of every BatchChannelNorm in ``model`` across
    the ranks of ``process_group`` (one all_reduce per layer; layers without running
    estimates, track_running_stats=False, have none to average). On a process outside
    ``process_group`` it changes nothing."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if process_group is dist.GroupMember.NON_GROUP_MEMBER or (process_group is not None
                                                              and dist.get_rank(process_group) < 0):
        return  # this process is outside the group (dist.new_group's placeholder): nothing of it to average
    world = dist.get_world_size(process_group)
    for m in model.modules():
        if isinstance(m, _BatchChannelNorm) and m.running_mean is not None:
            both = torch.stack([m.running_mean, m.running_var])
            dist.all_reduce(both, group=process_group)
            both /= world
            m.running_mean.copy_(both[0])
            m.running_var.copy_(both[1])
