"""torch.nn modules built on the wsbcn ops."""
from .ws_conv import WSConv1d, WSConv2d, WSConv3d

__all__ = ["WSConv1d", "WSConv2d", "WSConv3d"]
