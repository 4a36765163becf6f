"""wsbcn: Weight Standardization and Batch-Channel Normalization as fast Triton kernels."""
from . import backend as _backend

_backend.prepare_interpreter()  # before anything imports triton

from . import functional  # noqa: E402
from .modules import WSConv1d, WSConv2d, WSConv3d  # noqa: E402
from .freeze import freeze  # noqa: E402

__all__ = ["functional", "WSConv1d", "WSConv2d", "WSConv3d", "freeze"]
__version__ = "0.1.0"
