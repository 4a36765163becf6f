"""Functional API: ``weight_standardize``, ``batch_channel_norm``, ``group_norm``."""
from .ops.norm import batch_channel_norm, group_norm
from .ops.ws import weight_standardize

__all__ = ["weight_standardize", "batch_channel_norm", "group_norm"]
