"""``wsbcn.update_bn``: torch.optim.swa_utils.update_bn for models that hold
BatchChannelNorm layers. torch's recomputes the running statistics of its _BatchNorm
layers only, and leaves a BatchChannelNorm's as they were (those of the last trained
weights, not of the averaged ones)."""
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from .modules.norm import _BatchChannelNorm


@torch.no_grad()
def update_bn(loader, model: torch.nn.Module, device=None) -> None:
    """One pass over ``loader`` that recomputes the running statistics of every BatchNorm
    and BatchChannelNorm in ``model`` (the stochastic weight averaging step).

    As torch.optim.swa_utils.update_bn: the statistics are reset, then each layer takes
    the cumulative average (``momentum=None``) of the batches' mean and unbiased variance,
    the model in training mode. Each item of ``loader`` is the input or a list/tuple whose
    first element is; ``device``: where to move it. A BatchChannelNorm with
    ``estimate=True`` runs this pass with batch statistics, as a BatchNorm does: its own
    update takes the variance around the previous estimate, which after the reset is 0,
    and would average E[x^2] into the first batch's. Each layer's momentum and estimate
    flag and each module's training flag are put back afterwards, also when a forward
    raises."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    norms = [m for m in model.modules() if isinstance(m, (_BatchNorm, _BatchChannelNorm))]
    if not norms:
        return
    modes = [(m, m.training) for m in model.modules()]
    saved = [(m, m.momentum, getattr(m, "estimate", None)) for m in norms]
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
            if isinstance(m, _BatchChannelNorm):
                m.estimate = False
        model.train()
        for batch in loader:
            if isinstance(batch, (list, tuple)):
                batch = batch[0]
            if device is not None:
                batch = batch.to(device)
            model(batch)
    finally:
        for m, momentum, estimate in saved:
            m.momentum = momentum
            if isinstance(m, _BatchChannelNorm):
                m.estimate = estimate
        for m, training in modes:
            m.training = training
