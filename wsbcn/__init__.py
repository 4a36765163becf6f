"""wsbcn: Weight Standardization and Batch-Channel Normalization as fast Triton kernels."""
from . import backends as _backends

_backends.prepare_interpreter()  # before anything imports triton

from . import distributed, functional  # noqa: E402
from .convert import convert  # noqa: E402
from .convert_registry import register_convert_rule  # noqa: E402
from .freeze import freeze  # noqa: E402
from .modules import (BatchChannelNorm1d, BatchChannelNorm2d, BatchChannelNorm3d,  # noqa: E402
                      GroupNorm, WSConv1d, WSConv2d, WSConv3d)
from .ops.ws_model import ModelWeightStandardizer  # noqa: E402
from .swa_utils import update_bn  # noqa: E402

__all__ = ["distributed", "functional", "convert", "register_convert_rule", "freeze", "WSConv1d", "WSConv2d", "WSConv3d", "BatchChannelNorm1d",
           "BatchChannelNorm2d", "BatchChannelNorm3d", "GroupNorm", "ModelWeightStandardizer",
           "update_bn"]
__version__ = "0.1.0"
