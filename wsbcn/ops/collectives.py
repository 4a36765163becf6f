"""The collectives of BCN across processes (``process_group=``; DESIGN.md section 8).

R ranks of b_r images behave as one batch of sum b_r. Forward: ONE all_gather of a
float64 row per rank, [4 C + 4] (kernels/norm.py, ``LOCAL_ROWS``): per channel the
rank's pivot p_r (one of its values), the mean of x - p_r, the second moment (M2 about
that mean with batch statistics; the sum of squares about the old running mean with
``estimate=True``) and its count of values, then a header (mode, momentum, eps,
channels). Every rank merges the R rows in rank order, around the pivot p0 of the first
rank with values (mean_r - p0 = (p_r - p0) + mean_r; Chan's formula for M2), so different pivots,
batch sizes and image sizes per rank lose nothing, and updates its running buffers
from rank-independent values: the running estimates stay identical across ranks.
Backward with batch statistics: ONE all_reduce of the per-channel sums (d_gamma,
d_beta) [2, C], float64. Parameter gradients stay local, as with nn.SyncBatchNorm: DDP
averages them. The Triton path merges in a kernel (``_norm_rank_merge_kernel``), the
torch closed form with ``merge_rows`` here: the same row layout, so the two can meet in
one group. Both work on gloo (CPU tensors) and NCCL (CUDA tensors), without a host sync
on CUDA (CUDA-graph capturable), except for the header check of a signature's first call.

What is checked, and when (``resolve`` once per call signature; ``check_header``):
- before any collective, on each rank: torch.distributed initialized, the group a
  ProcessGroup this process belongs to, a backend that can take the tensor's device;
- the header, after the all_gather, on every rank (the same rows everywhere, so every
  rank raises the same error, before any buffer is written): mode (estimate or not),
  momentum, eps, channels. On CPU tensors every call; on CUDA tensors (Triton) the first
  call of each launch plan only (reading the header waits for the GPU), never while a
  CUDA graph is being captured, and not on the torch closed form; never on CPU tensors
  with an emulated GPU (host time over the stub driver, where no kernel writes the rows:
  norm_distributed.py ``_check_header``);
- dtypes need no check: the rows are float64 whatever the input dtype (fp16, bf16,
  fp32, float64), so ranks with different dtypes exchange the same bytes and combine
  correctly;
- channels that differ make the all_gather's sizes differ, which nothing can see before
  the collective itself. gloo: an error, not a hang (seen with 8 and 4 channels: the
  rank expecting less data aborts with "Received data size doesn't match expected size.
  Is there a distributed collective mismatch in your code?", the other raises gloo's
  "Connection reset by peer" or, having read the rows, "disagree on channels"). NCCL
  may hang.
  ``TORCH_DISTRIBUTED_DEBUG=DETAIL`` makes torch compare every collective's shapes
  across ranks before running it.
"""
from typing import NamedTuple

import torch
import torch.distributed as dist

from ..kernels.norm import LOCAL_HEADER, LOCAL_ROWS, MODE_BATCH, MODE_ESTIMATE, local_row_len

LOCAL_ROWS, LOCAL_HEADER = LOCAL_ROWS.value, LOCAL_HEADER.value


class _World:
    """The default process group, looked up when a layer is first called in training:
    what an ``nn.SyncBatchNorm`` with ``process_group=None`` synchronizes over.
    ``wsbcn.convert`` gives it to the BCN layers that replace such layers. When
    torch.distributed is not initialized, or has one process, nothing is combined
    (as nn.SyncBatchNorm does)."""

    def __repr__(self):
        return "wsbcn.ops.collectives.WORLD"

    def __reduce__(self):  # pickle and deepcopy keep the one instance
        return "WORLD"


WORLD = _World()


class Ranks(NamedTuple):
    """A validated process group: the group, its size and this process's rank in it."""

    group: object
    size: int
    rank: int


def check_group_type(group) -> None:
    """A TypeError unless ``group`` can be a layer's process_group: None, WORLD (the
    default group, looked up per call), a ProcessGroup, or the placeholder dist.new_group
    gives processes outside the group (refused, with its own message, when it runs)."""
    if group is None or group is WORLD:
        return
    if dist.is_available() and (isinstance(group, dist.ProcessGroup) or (
            isinstance(group, int) and not isinstance(group, bool) and group == dist.GroupMember.NON_GROUP_MEMBER)):
        return
    raise TypeError(f"process_group must be a torch.distributed ProcessGroup or None, got {type(group).__name__}")


def check_initialized() -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("BatchChannelNorm with process_group needs torch.distributed to be initialized")


def world_group():
    """The default process group when torch.distributed runs with several processes, else
    None (nothing to combine): what ``WORLD`` stands for now."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def resolve(group, x):
    """``Ranks`` of ``group`` for a call with input ``x`` (``WORLD`` is looked up by the
    caller on every call: ``world_group``). Raises a clear error for what each rank can
    see alone: no torch.distributed, not a process group, this process outside the
    group, a backend without the tensor's device."""
    check_initialized()
    if isinstance(group, int) and group == dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError("process_group: this process is not a member of the group (dist.new_group returns a "
                         "placeholder to processes outside it); pass process_group=None on those ranks")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed ProcessGroup, got {type(group).__name__}")
    backend = str(dist.get_backend(group))
    if backend == "nccl" and x.device.type != "cuda":
        raise ValueError(f"process_group uses NCCL, which takes CUDA tensors, but the input is on {x.device}; "
                         "use a gloo group for CPU tensors")
    return Ranks(group, dist.get_world_size(group), dist.get_rank(group))


def header_values(mode, momentum, cumulative, eps, channels):
    """The header of a rank's row (kernels/norm.py ``_store_local_moments``)."""
    return (float(mode), -1.0 if cumulative else float(momentum), float(eps), float(channels))


def _all_gather(out, row, group):
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, row, group=group)


def gather_rows(row: torch.Tensor, ranks: Ranks, check: bool) -> torch.Tensor:
    """Every rank's row, [R, len(row)] in rank order (one all_gather); with ``check``, the
    headers compared first (``check_header``)."""
    rows = torch.empty((ranks.size * row.numel(),), dtype=row.dtype, device=row.device)
    _all_gather(rows, row, ranks.group)
    rows = rows.view(ranks.size, row.numel())
    if check:
        check_header(rows)
    return rows


_HEADER_NAMES = ("estimate", "momentum", "eps", "channels")


def _describe(name, value):
    if name == "estimate":
        return {MODE_BATCH: "estimate=False", MODE_ESTIMATE: "estimate=True"}.get(int(value), f"mode {value}")
    if name == "momentum":
        return "momentum=None" if value < 0 else f"momentum={value:.6g}"
    if name == "channels":
        return f"{int(value)} channels"
    return f"eps={value:.6g}"


def check_header(rows: torch.Tensor) -> None:
    """Raise, on every rank alike, when the ranks' rows disagree on the mode, momentum,
    eps or channels (reads the rows on the host)."""
    headers = rows[:, -LOCAL_HEADER:].tolist()
    first = headers[0]
    for i in (3, 0, 1, 2):  # channels first: rows of another size are misread from there on
        name = _HEADER_NAMES[i]
        values = [h[i] for h in headers]
        ref = first[i]
        # momentum and eps: the kernels write them as fp32, the torch backend as float64
        if any(abs(v - ref) > 1e-6 * abs(ref) for v in values):
            ranks = ", ".join(f"rank {r}: {_describe(name, v)}" for r, v in enumerate(values))
            raise ValueError(f"BatchChannelNorm across processes: the ranks of the process_group disagree on "
                             f"{name} ({ranks}); every rank must run the same layer at the same point")


def merge_rows(rows: torch.Tensor, channels: int, batch: bool):
    """(p0, mean - p0, second, count) per channel, float64, from the rows of all ranks:
    what ``_norm_rank_merge_kernel`` computes, for the torch closed form."""
    c = channels
    rows = rows.to(torch.float64)
    pivots, means, seconds, counts = (rows[:, i * c:(i + 1) * c] for i in range(LOCAL_ROWS))
    first = (counts > 0).to(torch.int8).argmax(dim=0)  # the first rank with values (argmax: the first maximum)
    p0 = pivots.gather(0, first[None]).squeeze(0)
    d = (pivots - p0) + means
    total = counts.sum(dim=0)
    mean = (counts * d).sum(dim=0) / total
    if batch:  # Chan: M2 = sum M2_r + sum n_r (d_r - mean)^2
        second = seconds.sum(dim=0) + (counts * (d - mean).square()).sum(dim=0)
    else:
        second = seconds.sum(dim=0)
    return p0, mean, second, total


def check_counts(rows: torch.Tensor, channels: int, batch: bool) -> None:
    """Batch statistics of one value per channel in all (one 1x1 image on one rank, none
    elsewhere) have no variance to normalize by: the error nn.BatchNorm gives, on every
    rank (all read the same rows), before any buffer changes. (A read of the rows: for
    CPU tensors only; on CUDA the merge keeps the running variance instead.)"""
    if batch:
        total = float(rows[:, 3 * channels].sum())
        if total == 1:
            raise ValueError("Expected more than 1 value per channel when training, got 1 across the "
                             f"{rows.shape[0]} processes of the group")


def local_row(pivot, mean, second, count, header) -> torch.Tensor:
    """A rank's row (see the module docstring) from per-channel tensors (``count``: a
    number or a tensor), float64."""
    c = pivot.numel()
    row = torch.empty((local_row_len(c),), dtype=torch.float64, device=pivot.device)
    row[:c] = pivot
    row[c:2 * c] = mean
    row[2 * c:3 * c] = second
    row[3 * c:4 * c] = count
    for i, value in enumerate(header):  # scalar fills: no host-to-device copy
        row[4 * c + i] = value
    return row


def channel_stats_reducer(ranks: Ranks, header, check: bool):
    """The torch closed form's ``reduce_channel_stats(kind, pivot, mean, second, count) ->
    (mean, second, count, merged)`` over ``ranks``: one all_gather of this
    rank's row. ``mean`` is the per-channel mean of the local batch about ``pivot``;
    ``kind`` "chan": ``second`` is M2 about the mean (merged with Chan's formula); "sum":
    a plain sum over ranks. Returns the whole batch's mean about ``pivot``, second moment
    and count per channel, in ``mean``'s dtype, and ``merge_rows``' float64 values (the
    same on every rank: the running buffers are updated from these). ``check``
    (CPU tensors): the rows' headers, and the counts (``check_counts``)."""

    def reduce(kind, pivot, mean, second, count):
        row = local_row(pivot, mean, second, count, header)
        rows = gather_rows(row, ranks, check)
        if check:
            check_counts(rows, pivot.numel(), kind == "chan")
        merged = merge_rows(rows, pivot.numel(), kind == "chan")
        p0, mean_all, second_all, total = merged
        about_pivot = (p0 - pivot.to(torch.float64)) + mean_all  # in float64: no absolute mean in fp32
        dtype = mean.dtype
        return about_pivot.to(dtype), second_all.to(dtype), total.to(dtype), merged

    return reduce


def all_reduce_sum(t: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """``t`` summed over the ranks (one all_reduce, in float64 whatever ``t``'s dtype),
    in ``t``'s dtype."""
    both = t.to(torch.float64, copy=True).contiguous()
    dist.all_reduce(both, group=ranks.group)
    return both.to(t.dtype)


def all_reduce_rows(t: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """``t`` (float64) summed over the ranks in place (one all_reduce)."""
    dist.all_reduce(t, group=ranks.group)
    return t
