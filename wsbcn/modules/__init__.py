"""torch.nn modules built on the wsbcn ops."""
from .frozen import FrozenBatchChannelNorm1d, FrozenBatchChannelNorm2d, FrozenBatchChannelNorm3d, GroupNormAct
from .norm import BatchChannelNorm1d, BatchChannelNorm2d, BatchChannelNorm3d, GroupNorm
from .ws_conv import WSConv1d, WSConv2d, WSConv3d

__all__ = ["WSConv1d", "WSConv2d", "WSConv3d", "BatchChannelNorm1d", "BatchChannelNorm2d",
           "BatchChannelNorm3d", "GroupNorm", "FrozenBatchChannelNorm1d", "FrozenBatchChannelNorm2d",
           "FrozenBatchChannelNorm3d", "GroupNormAct"]
