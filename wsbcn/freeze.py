"""freeze(model): every wsbcn layer in its inference form, in torch ops only.

A WSConv becomes a plain nn.ConvNd holding W_hat; a BatchChannelNorm its evaluation
form (FrozenBatchChannelNormNd: F.batch_norm with the running estimates, then
F.group_norm); a wsbcn.GroupNorm nn.GroupNorm (GroupNormAct with a fused activation).
The frozen model computes what the model computes in eval mode, with no wsbcn kernel:
what ONNX/TensorRT export, TorchScript and serving want (modules/frozen.py).
"""
import copy
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from . import checks
from .convert import _rebind, carry_hooks
from .convert_layers import AffineWSConv2d, ConvNormAct2d, ScaledWSConv2d, WSConvNormAct2d
from .modules.frozen import (FrozenBatchChannelNorm1d, FrozenBatchChannelNorm2d, FrozenBatchChannelNorm3d,
                             GroupNormAct, copy_parameters)
from .modules.norm import BatchChannelNorm1d, BatchChannelNorm2d, BatchChannelNorm3d, GroupNorm
from .modules.ws_conv import WSConv1d, WSConv2d, WSConv3d

# the exact classes (a user's subclass may compute something else: it stays, with a warning);
# ScaledWSConv2d and AffineWSConv2d fold their gain / affine into W_hat
_PLAIN = {WSConvNormAct2d: ConvNormAct2d, WSConv1d: nn.Conv1d, WSConv2d: nn.Conv2d, WSConv3d: nn.Conv3d,
          ScaledWSConv2d: nn.Conv2d, AffineWSConv2d: nn.Conv2d}
_FROZEN_NORM = {BatchChannelNorm1d: FrozenBatchChannelNorm1d, BatchChannelNorm2d: FrozenBatchChannelNorm2d,
                BatchChannelNorm3d: FrozenBatchChannelNorm3d}
_WSBCN_BASES = tuple(_PLAIN) + tuple(_FROZEN_NORM) + (GroupNorm,)


def _plain_type(m):
    """nn.ConvNd for a WSConvNd (ConvNormAct2d for a WSConvNormAct2d), else None."""
    return _PLAIN.get(_layer_class(m))


# a conv's own activation given as a function (detectron2's activation=F.relu): as a module,
# which TorchScript can call (it cannot call a function held as an attribute)
_ACTIVATION_MODULES = {F.relu: nn.ReLU, torch.relu: nn.ReLU, F.silu: nn.SiLU, torch.sigmoid: nn.Sigmoid,
                       F.sigmoid: nn.Sigmoid, torch.tanh: nn.Tanh, F.gelu: nn.GELU}


def _activation_module(activation):
    try:
        made = _ACTIVATION_MODULES.get(activation)
    except TypeError:  # an unhashable callable
        made = None
    return made() if made is not None else activation


def _frozen_conv(m, plain_type, new_of, left=None) -> nn.Module:
    inside = {}
    if plain_type is ConvNormAct2d:  # a conv applying its own norm and activation keeps them, the norm frozen
        inside = dict(norm=None if m.norm is None else _freeze_in_place(m.norm, new_of, left),
                      activation=_activation_module(m.activation))
    plain = plain_type(
        m.in_channels, m.out_channels, m.kernel_size, stride=m.stride, padding=m.padding,
        dilation=m.dilation, groups=m.groups, bias=m.bias is not None,
        padding_mode=m.padding_mode, device=m.weight.device, dtype=m.weight.dtype, **inside,
    )
    with torch.no_grad():
        plain.weight.copy_(m.standardized_weight())  # W_hat of the weight as it is now (gain included)
        if m.bias is not None:
            plain.bias.copy_(m.bias)
    plain.weight.requires_grad_(m.weight.requires_grad)
    plain.training = m.training  # the conv's own mode (a norm inside keeps its own)
    return plain


def _frozen_group_norm(m: GroupNorm) -> nn.Module:
    weight, bias = m.weight, m.bias  # their values now (parametrized or pruned: what they compute to)
    factory = dict(device=weight.device, dtype=weight.dtype) if weight is not None else {}
    if weight is not None and bias is None:  # nn.GroupNorm(bias=False) (torch >= 2.13)
        factory["bias"] = False
    frozen = (nn.GroupNorm(m.num_groups, m.num_channels, m.eps, m.affine, **factory) if m.activation is None else
              GroupNormAct(m.num_groups, m.num_channels, m.eps, m.affine, m.activation, **factory))
    copy_parameters(m, frozen, ("weight", "bias"))
    return frozen.train(m.training)


def _layer_class(m):
    """The class of ``m``, or for a parametrized layer (torch.nn.utils.parametrize makes a
    subclass per layer) the class it was made from."""
    cls = type(m)
    return cls.__mro__[1] if parametrize.is_parametrized(m) else cls


def _frozen_layer(m, new_of, left=None) -> nn.Module:
    """The inference form of one wsbcn layer, or ``m`` itself for anything else."""
    plain_type = _plain_type(m)
    if plain_type is not None:
        return _frozen_conv(m, plain_type, new_of, left)
    layer_class = _layer_class(m)  # the exact classes: a subclass may compute something else
    if layer_class in _FROZEN_NORM:
        return _FROZEN_NORM[layer_class].of(m)
    if layer_class is GroupNorm:
        return _frozen_group_norm(m)
    return m


def _subclass_left(m):
    """The wsbcn class a layer freeze leaves as it is subclasses, or None."""
    return next((base for base in type(m).__mro__ if base in _WSBCN_BASES), None) \
        if isinstance(m, _WSBCN_BASES) else None


def _freeze_in_place(model: nn.Module, new_of=None, left=None) -> nn.Module:
    """``model`` with every wsbcn layer frozen; ``new_of`` maps id(old) to (old, new): a
    layer registered at several paths becomes one frozen layer, still shared. ``left``
    collects the subclasses of wsbcn layers left as they are (children included)."""
    new_of = {} if new_of is None else new_of
    if id(model) in new_of:
        return new_of[id(model)][1]
    new = _frozen_layer(model, new_of, left)
    if new is not model:
        carry_hooks(model, new)  # a hook on the layer runs on its frozen form
        new_of[id(model)] = (model, new)
        return new
    base = _subclass_left(model)
    if base is not None:  # a subclass of a wsbcn layer: as it is, whole (its forward may use its children)
        if left is not None:
            left.append(f"{type(model).__name__} (a {base.__name__})")
        return model
    for name, child in list(model._modules.items()):  # every name (named_children skips a second one)
        if child is not None:
            setattr(model, name, _freeze_in_place(child, new_of, left))
    return model


def freeze(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Return ``model`` with every wsbcn layer in its inference form, in torch ops only:
    WSConv -> nn.ConvNd holding W_hat, BatchChannelNormNd -> FrozenBatchChannelNormNd
    (its eval-mode computation; the running estimates stay fixed), wsbcn.GroupNorm ->
    nn.GroupNorm (GroupNormAct with a fused activation). Parameters and buffers are
    copies of their values now (a parametrized or pruned parameter: what it computes
    to), under the layer's own state dict keys; a frozen conv's ``weight`` is W_hat
    (ScaledWSConv2d's gain and AffineWSConv2d's affine folded in, their keys gone), so
    load a training checkpoint before freezing, not into the frozen model. A subclass
    of a wsbcn layer is left as it is, with a warning. A layer shared by several paths is
    frozen once, and the frozen layers replace the wsbcn ones in plain lists, tuples and
    dicts the model's modules hold too (detectron2's FPN), as ``wsbcn.convert`` does.

    Like torch's ``inplace`` convention: by default the model is deep-copied and the
    copy converted, so ``model`` keeps its wsbcn layers, weights and buffers (training
    can go on). ``inplace=True`` swaps the layers of ``model`` itself and returns it (a
    new module when ``model`` is itself a wsbcn layer) and saves the copy's memory.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {type(inplace).__name__}")
    for name, m in model.named_modules():  # what the layers' forwards check, before anything changes
        try:  # the layers freeze replaces (a subclass is left as it is, with a warning)
            if _layer_class(m) in _FROZEN_NORM or _layer_class(m) is GroupNorm:
                checks.check_num_groups(m.num_channels, m.num_groups)
                checks.check_eps(m.eps)
                checks.check_activation(m.activation)
            elif _plain_type(m) is not None:
                checks.check_ws_scalars(m.eps, m.correction, m.eps_mode, tuple(m.weight.shape))
        except (ValueError, TypeError) as e:
            raise type(e)(f"layer {name!r} ({type(m).__name__}): {e}") from None
    model = model if inplace else copy.deepcopy(model)
    # a model-wide standardizer (ops/ws_model.py) would go on standardizing the layers
    # freeze takes out of the model: detach it first
    for standardizer in {id(s): s for s in (getattr(m, "_ws_model", None) for m in model.modules()) if s}.values():
        standardizer.remove()
    new_of, left = {}, []
    frozen = _freeze_in_place(model, new_of, left)
    if left:
        warnings.warn("wsbcn.freeze left these subclasses of wsbcn layers as they are (one may compute something "
                      "else than the layer freeze knows); they still run wsbcn's kernels: "
                      + ", ".join(dict.fromkeys(left)), stacklevel=2)
    _rebind(frozen, new_of, [])  # layers a forward calls from plain lists too (detectron2's FPN), as convert does
    return frozen
