"""The stock-op forms ``wsbcn.freeze`` gives the norm layers, for serving.

A frozen model holds no wsbcn kernel: ONNX, TensorRT, TorchScript and torch.export
see torch ops only (F.batch_norm, F.group_norm, F.relu / F.silu).

- ``FrozenBatchChannelNorm1d/2d/3d``: BatchChannelNorm in its evaluation form. The BN
  stage normalizes with the running estimates, which stay fixed, in training mode too
  (as torchvision's FrozenBatchNorm2d; a layer with track_running_stats=False: with
  batch statistics, as it does in eval); the channel stage is F.group_norm with the group
  affine given per channel (a per-group value repeated over the group's channels), as
  the channel stage computes it; then the activation. The same parameters, buffers and
  state dict keys as the layer.
- ``GroupNormAct``: nn.GroupNorm followed by wsbcn.GroupNorm's fused activation (a
  wsbcn.GroupNorm without one becomes nn.GroupNorm itself).
"""
import torch
import torch.nn.functional as F
from torch import nn


def _activate(y: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "relu":
        return F.relu(y)
    if activation == "silu":
        return F.silu(y)
    return y


def copy_parameters(layer: nn.Module, frozen: nn.Module, names) -> None:
    """Give ``frozen`` a copy of each named parameter of ``layer`` that is not None: its
    value now (a parametrized or pruned one: what it computes to), and whether it
    requires grad."""
    for name in names:
        p = getattr(layer, name)
        if p is not None:
            setattr(frozen, name, nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad))


class _FrozenBatchChannelNorm(nn.Module):
    """BatchChannelNorm in its evaluation form, in torch ops (see the module docstring)."""

    _valid_dims: tuple = ()

    def __init__(self, num_channels: int, num_groups: int, eps: float, affine: bool, group_affine: bool,
                 activation: str = "", track_running_stats: bool = True, device=None, dtype=None):
        super().__init__()
        self.num_channels, self.num_groups, self.eps = num_channels, num_groups, eps
        self.affine, self.group_affine = affine, group_affine
        self.activation = activation  # "relu", "silu" or "" (a str either way: TorchScript types it)
        self.valid_dims = list(self._valid_dims)
        self.dims_text = " or ".join(f"{d}D" for d in self._valid_dims)
        factory = dict(device=device, dtype=dtype)
        if affine:
            self.weight = nn.Parameter(torch.ones(num_channels, **factory))
            self.bias = nn.Parameter(torch.zeros(num_channels, **factory))
            shape = (1, num_groups if group_affine else num_channels, 1)
            self.group_weight = nn.Parameter(torch.ones(shape, **factory))
            self.group_bias = nn.Parameter(torch.zeros(shape, **factory))
        else:
            for name in ("weight", "bias", "group_weight", "group_bias"):
                self.register_parameter(name, None)
        self.track_running_stats = track_running_stats
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_channels, **factory))
            self.register_buffer("running_var", torch.ones(num_channels, **factory))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:  # the layer normalizes with batch statistics in eval too: so does its frozen form
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                self.register_buffer(name, None)

    @classmethod
    def of(cls, layer) -> "_FrozenBatchChannelNorm":
        """The evaluation form of ``layer`` (a BatchChannelNorm of the same dims), holding
        copies of its parameters and buffers."""
        frozen = cls(layer.num_channels, layer.num_groups, layer.eps, layer.affine, layer.group_affine,
                     layer.activation or "", track_running_stats=False)
        copy_parameters(layer, frozen, ("weight", "bias", "group_weight", "group_bias"))
        with torch.no_grad():
            # the buffers the layer has now (a running buffer set to None: batch statistics, as the layer)
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                t = getattr(layer, name)
                frozen.register_buffer(name, None if t is None else t.detach().clone())
        frozen.track_running_stats = frozen.running_mean is not None
        return frozen.train(layer.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() not in self.valid_dims:  # as nn.BatchNormNd's _check_input_dim
            raise ValueError(f"expected {self.dims_text} input (got {x.dim()}D input)")
        batch = self.running_mean is None  # track_running_stats=False: batch statistics, as the layer
        y = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, batch, 0.0, self.eps)
        omega, eta = self.group_weight, self.group_bias
        if omega is not None and eta is not None:
            c, g = self.num_channels, omega.numel()
            # one value per group: the same for each of its c // g channels (an expand, not a copy)
            omega = omega.reshape(g, 1).expand(g, c // g).reshape(c)
            eta = eta.reshape(g, 1).expand(g, c // g).reshape(c)
        return _activate(F.group_norm(y, self.num_groups, omega, eta, self.eps), self.activation)

    def extra_repr(self) -> str:
        text = f"{self.num_channels}, num_groups={self.num_groups}, eps={self.eps}, affine={self.affine}"
        if self.affine:
            text += f", group_affine={self.group_affine}"
        return text + (f", activation={self.activation!r}" if self.activation else "")


class FrozenBatchChannelNorm1d(_FrozenBatchChannelNorm):
    _valid_dims = (2, 3)


class FrozenBatchChannelNorm2d(_FrozenBatchChannelNorm):
    _valid_dims = (4,)


class FrozenBatchChannelNorm3d(_FrozenBatchChannelNorm):
    _valid_dims = (5,)


class GroupNormAct(nn.GroupNorm):
    """nn.GroupNorm, then ``activation`` ("relu" or "silu"): wsbcn.GroupNorm's fused
    activation in torch ops. Same state dict as nn.GroupNorm."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 activation: str = "relu", device=None, dtype=None, **kwargs):
        super().__init__(num_groups, num_channels, eps, affine, device=device, dtype=dtype, **kwargs)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _activate(F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps), self.activation)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", activation={self.activation!r}"
