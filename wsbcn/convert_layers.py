"""Two small layers ``wsbcn.convert`` builds when a wsbcn layer alone cannot reproduce
the source layer: a norm followed by layers it cannot fuse, and a WSConv with a gain."""
import torch
from torch import nn

from .modules import WSConv2d


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
