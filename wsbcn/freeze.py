"""freeze(model): replace every WSConv by a plain nn.ConvNd that holds W_hat.

The frozen model computes the same outputs with stock layers only, which is what
ONNX/TensorRT export and serving want.
"""
import copy

import torch
from torch import nn

from .modules.ws_conv import WSConv1d, WSConv2d, WSConv3d

_PLAIN = {WSConv1d: nn.Conv1d, WSConv2d: nn.Conv2d, WSConv3d: nn.Conv3d}


def _plain_type(m):
    """nn.ConvNd for a WSConvNd or a subclass of one (e.g. ScaledWSConv2d), else None."""
    return next((plain for ws, plain in _PLAIN.items() if isinstance(m, ws)), None)


def _frozen_conv(m, plain_type) -> nn.Module:
    plain = plain_type(
        m.in_channels, m.out_channels, m.kernel_size, stride=m.stride, padding=m.padding,
        dilation=m.dilation, groups=m.groups, bias=m.bias is not None,
        padding_mode=m.padding_mode, device=m.weight.device, dtype=m.weight.dtype,
    )
    with torch.no_grad():
        plain.weight.copy_(m.standardized_weight())  # W_hat of the weight as it is now (gain included)
        if m.bias is not None:
            plain.bias.copy_(m.bias)
    plain.weight.requires_grad_(m.weight.requires_grad)
    plain.train(m.training)
    return plain


def _freeze_in_place(model: nn.Module) -> nn.Module:
    plain_type = _plain_type(model)
    if plain_type is not None:
        return _frozen_conv(model, plain_type)
    for name, child in list(model.named_children()):
        setattr(model, name, _freeze_in_place(child))
    return model


def freeze(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Return ``model`` with every WSConv swapped for an nn.ConvNd holding W_hat.

    Like torch's ``inplace`` convention: by default the model is deep-copied and the
    copy converted, so ``model`` keeps its WSConv layers and weights (training can go
    on). ``inplace=True`` swaps the layers of ``model`` itself and returns it (a new
    module when ``model`` is itself a WSConv) and saves the copy's memory.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {type(inplace).__name__}")
    model = model if inplace else copy.deepcopy(model)
    # a model-wide standardizer (ops/ws_model.py) would go on standardizing the layers
    # freeze takes out of the model: detach it first
    for standardizer in {id(s): s for s in (m.__dict__.get("_ws_model") for m in model.modules()) if s}.values():
        standardizer.remove()
    return _freeze_in_place(model)
