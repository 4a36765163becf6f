"""Functional API: ``weight_standardize``, ``batch_channel_norm``, ``group_norm``."""
from .norm import batch_channel_norm, group_norm
from .ws import weight_standardize

__all__ = ["weight_standardize", "batch_channel_norm", "group_norm"]
