"""The ops: validation, one autograd Function per op, the functional API and the
``wsbcn::`` torch.library ops. Each op body picks its backend (backends/) and
launches through a plan (kernels/*_plan.py)."""
from .norm import batch_channel_norm, group_norm
from .ws import weight_standardize

__all__ = ["batch_channel_norm", "group_norm", "weight_standardize"]
