"""Small layers ``wsbcn.convert`` builds when a wsbcn layer alone cannot reproduce the
source layer: a norm followed by layers it cannot fuse, a WSConv with a gain, and a
WSConv that applies its own norm and activation (detectron2's Conv2d), with the plain
form ``wsbcn.freeze`` makes of it."""
import torch
from torch import nn

from .modules import WSConv2d
from .modules.tracing import Proxy, fx_leaf


class NormAct(nn.Module):
    """A wsbcn norm, then the drop and activation layers of the source layer (timm's
    ``BatchNormAct2d``/``GroupNormAct``), in that order, when they cannot be fused: an
    activation wsbcn has no kernel for, or a drop layer between norm and activation."""

    def __init__(self, norm: nn.Module, drop: nn.Module, act: nn.Module):
        super().__init__()
        self.norm = norm
        self.drop = drop
        self.act = act

    @property
    def num_channels(self) -> int:
        return self.norm.num_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(self.norm(x)))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # the source layer's state dict (timm's BatchNormAct2d: weight, bias, running_*) loads
        # into the norm, as it did into the source layer
        if not any(k.startswith(prefix + "norm.") for k in state_dict):
            for key in [k for k in state_dict if k.startswith(prefix) and "." not in k[len(prefix):]]:
                state_dict[prefix + "norm." + key[len(prefix):]] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


class ScaledWSConv2d(WSConv2d):
    """WSConv2d whose standardized weight is scaled per output channel:
    W = gain * scale * W_hat (timm's ``ScaledStdConv2d``, the NF-Net convolution;
    ``gain`` a Parameter of shape (out_channels, 1, 1, 1), ``scale`` a float, timm's
    gamma / sqrt(fan_in)). Same state dict keys as timm's layer."""

    def __init__(self, *args, scale: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.scale = float(scale)
        self.gain = nn.Parameter(torch.ones(self.out_channels, 1, 1, 1, device=self.weight.device,
                                            dtype=self.weight.dtype))

    def standardized_weight(self) -> torch.Tensor:
        return super().standardized_weight() * (self.gain * self.scale)

    def forward(self, input):
        # spelled out rather than inherited, so the gain holds whatever WSConv2d's forward becomes
        return self._conv_forward(input, self.standardized_weight(), self.bias)

    def extra_repr(self):
        return super().extra_repr() + f", scale={self.scale}"


class AffineWSConv2d(WSConv2d):
    """WSConv2d whose standardized weight takes an affine per output channel:
    W = weight_gamma * W_hat + weight_beta (mmcv's ``ConvAWS2d``, the weight
    standardization of DetectoRS; W_hat with the unbiased variance and eps 1e-5 under the
    root). ``weight_gamma`` and ``weight_beta`` are buffers of shape (out_channels, 1, 1, 1)
    as mmcv's (not trained), with the same state dict keys; a checkpoint without them sets
    them, as mmcv's layer does, to the loaded weight's std and mean, so that W is the
    loaded weight (a plain conv's pretrained weights)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        factory = dict(device=self.weight.device, dtype=self.weight.dtype)
        self.register_buffer("weight_gamma", torch.ones(self.out_channels, 1, 1, 1, **factory))
        self.register_buffer("weight_beta", torch.zeros(self.out_channels, 1, 1, 1, **factory))

    def standardized_weight(self) -> torch.Tensor:
        return super().standardized_weight() * self.weight_gamma + self.weight_beta

    def forward(self, input):
        # spelled out rather than inherited, so the affine holds whatever WSConv2d's forward becomes
        return self._conv_forward(input, self.standardized_weight(), self.bias)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        own_missing = []
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, own_missing,
                                      unexpected_keys, error_msgs)
        affine = (prefix + "weight_gamma", prefix + "weight_beta")
        if prefix + "weight" in state_dict and not any(k in state_dict for k in affine):
            with torch.no_grad():  # mmcv's recovery: W = std * (W - mean) / std + mean
                flat = self.weight.reshape(self.out_channels, -1)
                self.weight_beta.copy_(flat.mean(dim=1).reshape(-1, 1, 1, 1))
                self.weight_gamma.copy_(torch.sqrt(flat.var(dim=1) + 1e-5).reshape(-1, 1, 1, 1))
            own_missing = [k for k in own_missing if k not in affine]
        missing_keys.extend(own_missing)

    def extra_repr(self):
        return super().extra_repr() + ", affine=(weight_gamma, weight_beta)"


class WSConvNormAct2d(WSConv2d):
    """WSConv2d that applies its own ``norm``, then its own ``activation`` (a module or a
    function; either may be None), to the convolution's output: detectron2's ``Conv2d``
    (detectron2/layers/wrappers.py), weight-standardized, with the same attributes and
    state dict keys (weight, bias, norm.*)."""

    norm_inside = ("norm", "activation")  # read by convert's census: the norm is planned with the conv

    def __init__(self, *args, norm=None, activation=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.norm = norm
        self.activation = activation

    def forward(self, input):
        if isinstance(input, Proxy):  # torch.fx: the whole layer is one leaf
            return fx_leaf(self, input)
        x = super().forward(input)
        if self.norm is not None:
            x = self.norm(x)
        return x if self.activation is None else self.activation(x)


class ConvNormAct2d(nn.Conv2d):
    """What ``wsbcn.freeze`` makes of a ``WSConvNormAct2d``: nn.Conv2d holding W_hat, then
    the frozen norm and the activation."""

    def __init__(self, *args, norm=None, activation=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.norm = norm
        self.activation = activation

    def forward(self, input):  # written for TorchScript too (a frozen model scripts)
        x = self._conv_forward(input, self.weight, self.bias)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x
