"""BatchChannelNorm1d/2d/3d and GroupNorm modules."""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import _compat, checks
from ..ops import collectives
from ..ops.norm import _batch_channel_norm, _group_norm
from .tracing import Proxy, fx_leaf, refuse_script


def _all_equal(t, value) -> bool:
    """Whether every element of ``t`` is ``value``; False for a tensor without values to
    read (meta, fake). One host sync on a GPU: convert and state-dict loads only."""
    if t is None or t.device.type == "meta" or _compat.is_fake(t) or _compat.fake_mode_active():
        return False
    return bool((t.detach() == value).all())


def is_zero_scale(weight, bias) -> bool:
    """A trainable BatchNorm scale of all zeros with a zero (or no) shift: a
    zero-initialised residual branch (torchvision's ``zero_init_residual``, timm's
    ``zero_init_last``, mmdet's ``zero_init_residual``), whose norm outputs 0. As a BCN's
    BN-stage scale it feeds the channel stage a constant, which that stage divides by
    sqrt(eps): the output is still 0, but the first gradient on the scale is ~1/sqrt(eps)
    times BatchNorm's, which undoes the zero init in one step. wsbcn.convert puts the zero
    on the channel stage's scale (``group_weight``) instead, the BN stage's set to 1: the
    block starts at 0 and, as with BatchNorm, only the last affine gets a gradient. A
    frozen zero scale (a branch kept dead on purpose), a nonzero shift (a pruned scale,
    whose norm outputs the shift) or values that cannot be read (meta, fake) are not."""
    return weight is not None and weight.requires_grad and weight.numel() > 0 and _all_equal(weight, 0) and (
        bias is None or _all_equal(bias, 0))


class _BatchChannelNorm(nn.Module):
    """Batch-Channel Normalization (Qiao et al., arXiv 1903.10520).

    BN stage (``weight``, ``bias``: gamma, beta per channel; running buffers as in
    nn.BatchNorm), then a GroupNorm-style channel stage (``group_weight``,
    ``group_bias``: shape (1, G, 1) when ``group_affine``, else (1, C, 1)), then
    ``activation`` (None, "relu" or "silu"), all in one fused op.

    ``estimate=True`` is the micro-batch mode: in training the running estimates
    are updated from the batch (no gradient through them) and used to normalize.
    ``num_batches_tracked`` counts training steps in both modes.
    ``track_running_stats=False``, as in nn.BatchNorm: no running buffers, and the BN
    stage normalizes with batch statistics in eval mode too (not with estimate=True,
    which normalizes with running estimates, nor across processes).

    State dicts of the authors' released layers load directly: BCNorm/EstBN (BN
    stage ``bn.*``) and the ImageNet ``GN`` / DeepLab ``PBCNorm`` layers (BN stage
    ``pbn.*``). Their ``weight``/``bias`` (shape (1, G, 1)) are our group affine,
    their BN stage our ``weight``, ``bias`` and running buffers, and
    ``bn.estbn_moving_speed`` sets ``momentum``. One ``eps`` serves both stages;
    the released BN stage always uses 1e-5.
    """

    _valid_dims: tuple = ()
    track_running_stats = True  # (layers pickled before the option existed)

    def __init__(self, num_channels: Optional[int] = None, num_groups: int = 32, eps: float = 1e-5,
                 momentum: Optional[float] = 0.1, estimate: bool = False, affine: bool = True,
                 group_affine: bool = True, activation: Optional[str] = None, process_group=None,
                 track_running_stats: bool = True, device=None, dtype=None, *, num_features: Optional[int] = None):
        super().__init__()
        # num_features: nn.BatchNorm's name for it, which model builders may pass by keyword
        if (num_channels is None) == (num_features is None):
            raise TypeError(f"{type(self).__name__} takes num_channels (or nn.BatchNorm's name, num_features): "
                            f"one of them, got num_channels={num_channels!r} and num_features={num_features!r}")
        num_channels = num_features if num_channels is None else num_channels
        checks.check_num_groups(num_channels, num_groups)
        checks.check_factory_dtype(f"{type(self).__name__}'s parameters and buffers", dtype)
        self.num_channels = num_channels
        self.num_groups = num_groups
        self.eps = checks.check_eps(eps)
        self.momentum = checks.check_momentum(momentum)
        self.estimate = bool(estimate)
        self.track_running_stats = bool(track_running_stats)
        collectives.check_group_type(process_group)
        self.process_group = process_group
        if not self.track_running_stats:
            self._check_untracked()
        self.affine = bool(affine)
        self.group_affine = bool(group_affine)
        self.activation = checks.check_activation(activation)
        factory = dict(device=device, dtype=dtype)
        if affine:
            self.weight = nn.Parameter(torch.ones(num_channels, **factory))
            self.bias = nn.Parameter(torch.zeros(num_channels, **factory))
            affine_shape = (1, num_groups if group_affine else num_channels, 1)
            self.group_weight = nn.Parameter(torch.ones(affine_shape, **factory))
            self.group_bias = nn.Parameter(torch.zeros(affine_shape, **factory))
        else:
            for name in ("weight", "bias", "group_weight", "group_bias"):
                self.register_parameter(name, None)
        if self.track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_channels, **factory))
            self.register_buffer("running_var", torch.ones(num_channels, **factory))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                self.register_buffer(name, None)

    @property
    def num_features(self) -> int:
        """num_channels, by nn.BatchNorm's name for it (what tools written for it read)."""
        return self.num_channels

    def reset_running_stats(self) -> None:
        if not self.track_running_stats:
            return
        self.running_mean.zero_()
        self.running_var.fill_(1)
        self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            for p, v in ((self.weight, 1), (self.bias, 0), (self.group_weight, 1), (self.group_bias, 0)):
                nn.init.constant_(p, v)

    def _check_input(self, x):
        checks.check_float_tensor("input", x)
        if x.dim() not in self._valid_dims:
            raise ValueError(
                f"{type(self).__name__} expects a {' or '.join(f'{d}D' for d in self._valid_dims)} input, "
                f"got shape {tuple(x.shape)}")
        if x.shape[1] != self.num_channels:
            raise ValueError(
                f"{type(self).__name__}({self.num_channels}) got an input with {x.shape[1]} channels "
                f"(shape {tuple(x.shape)})")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The functional checks, with _check_input, run once per call signature. The
        # parameters and buffers are read from their dicts (what self.weight resolves
        # to, without nn.Module.__getattr__: eager micro-batch layers are host-bound).
        # A parametrization or pruning takes a parameter out of _parameters: then the
        # attributes are what the parameters are (see WSConv's standardized_weight).
        if isinstance(x, Proxy):  # torch.fx.symbolic_trace: a leaf (modules/tracing.py)
            return fx_leaf(self, x)
        p, b = self._parameters, self._buffers
        try:
            weight, bias, group_weight, group_bias = p["weight"], p["bias"], p["group_weight"], p["group_bias"]
        except KeyError:
            weight, bias, group_weight, group_bias = self.weight, self.bias, self.group_weight, self.group_bias
        training = self.training
        group = self.process_group if training else None
        try:  # None without track_running_stats: batch statistics in eval too
            running_mean, running_var, num_batches_tracked = b["running_mean"], b["running_var"], b["num_batches_tracked"]
        except KeyError:  # a parametrized buffer: what the attribute gives (nn.BatchNorm reads it too)
            running_mean, running_var = self.running_mean, self.running_var
            num_batches_tracked = self.num_batches_tracked
        if training and running_mean is not None and not self.track_running_stats:
            # switched off after construction: nn.BatchNorm reads it on every call and then
            # trains on batch statistics, its buffers left as they are (eval still uses them)
            self._check_untracked(" (set to False after construction)")
            running_mean = running_var = num_batches_tracked = None
        y = _batch_channel_norm(
            x, self.num_groups, running_mean, running_var, weight, bias, group_weight, group_bias,
            training or running_mean is None, self.estimate, self.momentum, self.eps, self.activation,
            num_batches_tracked, owner=self, group=group)
        if running_mean is None and training and num_batches_tracked is not None and self.track_running_stats:
            # running buffers set to None, the counter kept: nn.BatchNorm still counts the step
            with torch.no_grad():
                num_batches_tracked.add_(1)
        return y

    def _check_untracked(self, when: str = ""):
        """What needs running statistics, refused without them: at construction, and before
        a training call when track_running_stats was set to False later (``when`` says so)."""
        if self.estimate:
            raise ValueError("estimate=True normalizes with running estimates: it needs "
                             f"track_running_stats=True{when}")
        if self.process_group is not None:  # the merged statistics update them
            raise ValueError("process_group (statistics combined across processes) needs "
                             f"track_running_stats=True{when}")

    __prepare_scriptable__ = refuse_script

    def extra_repr(self) -> str:
        text = (f"{self.num_channels}, num_groups={self.num_groups}, eps={self.eps}, "
                f"momentum={self.momentum}, estimate={self.estimate}, affine={self.affine}")
        if self.affine:
            text += f", group_affine={self.group_affine}"
        if self.activation is not None:
            text += f", activation={self.activation!r}"
        return text + ("" if self.track_running_stats else ", track_running_stats=False")

    _version = 2  # as nn.BatchNorm's: a state dict of an earlier version has no num_batches_tracked
    _from_group_norm = False  # set by wsbcn.convert on a BCN made from a GroupNorm
    _zero_scale_on_channel_stage = False  # set by wsbcn.convert: a zero BN scale carried by group_weight

    def _zero_scale_to_channel_stage(self) -> None:
        """The BN stage's zero scale (is_zero_scale) carried by the channel stage instead:
        weight 1, group_weight 0, in place (wsbcn.convert)."""
        with torch.no_grad():
            self.weight.fill_(1)
            self.group_weight.zero_()
        self._zero_scale_on_channel_stage = True

    def _batch_norm_state_as_convert_puts_it(self, state_dict, prefix):
        """A state dict of the BatchNorm whose zero scale convert put on the channel stage
        loads as convert would convert that BatchNorm: a zero scale (with a zero shift)
        goes to the channel stage again, any other stays on the BN stage with group_weight
        1. Returns what to do after a successful load (None for a BatchChannelNorm's own
        state dict)."""
        if prefix + "weight" not in state_dict or any(
                prefix + k in state_dict for k in ("group_weight", "group_bias")):
            return None
        loaded = state_dict[prefix + "weight"]
        if isinstance(loaded, torch.Tensor) and _all_equal(loaded, 0) and _all_equal(
                state_dict.get(prefix + "bias", torch.zeros(())), 0):
            return self._zero_scale_to_channel_stage
        return lambda: self.group_weight.detach().fill_(1)

    def _group_norm_state_to_bcn(self, state_dict, prefix, local_metadata):
        """A state dict of the GroupNorm this layer was converted from loads its affine where
        convert put it, the channel stage (``group_weight``, ``group_bias``); the BN stage's
        keys are missing from it (strict loading says so; otherwise they stay as they are).
        Such a dict has ``weight`` or ``bias`` and none of the keys only a BCN has, and its
        metadata, when it has some, is not of a BatchChannelNorm (a GroupNorm's version is 1)."""
        if any(prefix + k in state_dict for k in
               ("group_weight", "group_bias", "running_mean", "running_var", "num_batches_tracked")):
            return
        version = local_metadata.get("version")
        if version is not None and version >= self._version:
            return  # a BatchChannelNorm's own (partial) state dict
        for gn_key, key in (("weight", "group_weight"), ("bias", "group_bias")):
            target = getattr(self, key)
            if prefix + gn_key in state_dict and target is not None:
                value = state_dict.pop(prefix + gn_key)  # (C,) -> our (1, C, 1)
                state_dict[prefix + key] = value.reshape(target.shape) if value.numel() == target.numel() else value

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # The released layers keep their BN stage as a child module: "bn." in BCNorm /
        # EstBN (README of the BCN repository), "pbn." in the ImageNet GN layer
        # (imagenet/models/layers.py) and DeepLab's PBCNorm (DeepLabV3/deeplab.py).
        # Their own weight/bias, shape (1, G, 1), are our group affine.
        stage = next((s for s in ("bn.", "pbn.") if prefix + s + "running_mean" in state_dict), None)
        if stage is None and self._from_group_norm:
            self._group_norm_state_to_bcn(state_dict, prefix, local_metadata)
        after = None
        if stage is None and self._zero_scale_on_channel_stage and self.group_weight is not None:
            after = self._batch_norm_state_as_convert_puts_it(state_dict, prefix)
        speed = None
        if stage is not None:
            speed = state_dict.pop(prefix + stage + "estbn_moving_speed", None)
            if speed is not None:  # checked before anything is loaded
                speed = checks.check_momentum(float(speed.reshape(-1)[0]))
            renames = [("weight", "group_weight"), ("bias", "group_bias")] + [
                (stage + k, k) for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]
            for old, new in renames:
                if prefix + old in state_dict:
                    state_dict[prefix + new] = state_dict.pop(prefix + old)
        # a BatchNorm (or BN stage) saved before num_batches_tracked existed (version < 2, torch
        # < 0.4.1) or a state dict without version metadata: the layer keeps its own count, as
        # nn.BatchNorm does (the BN stage's metadata, when it was a child module, says which)
        version = local_metadata.get("version") if stage is None else \
            getattr(state_dict, "_metadata", {}).get(prefix + stage[:-1], {}).get("version")
        count = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and count not in state_dict:
            own = self.num_batches_tracked
            state_dict[count] = own if own is not None and own.device.type != "meta" else \
                torch.tensor(0, dtype=torch.long)
        n_errors = len(error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if speed is not None and len(error_msgs) == n_errors:  # EstBN's moving speed is our momentum
            self.momentum = speed
        if after is not None and len(error_msgs) == n_errors:
            after()


class BatchChannelNorm1d(_BatchChannelNorm):
    _valid_dims = (2, 3)


class BatchChannelNorm2d(_BatchChannelNorm):
    _valid_dims = (4,)


class BatchChannelNorm3d(_BatchChannelNorm):
    _valid_dims = (5,)


class GroupNorm(nn.GroupNorm):
    """Drop-in for nn.GroupNorm (same arguments and state dict) running the wsbcn
    kernels, with an optional fused ``activation`` ("relu" or "silu")."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True, device=None,
                 dtype=None, *, activation: Optional[str] = None, **kwargs):
        # nn.GroupNorm's arguments by name (skip_init reads device); kwargs: torch's keyword-only ones (bias)
        checks.check_num_groups(num_channels, num_groups)
        checks.check_eps(eps)
        checks.check_factory_dtype("GroupNorm's parameters", dtype)
        super().__init__(num_groups, num_channels, eps, affine, device, dtype, **kwargs)
        self.activation = checks.check_activation(activation)

    def _check_input(self, x):
        checks.check_float_tensor("input", x, min_dim=2)
        if x.shape[1] != self.num_channels:
            raise ValueError(f"GroupNorm({self.num_groups}, {self.num_channels}) got an input with "
                             f"{x.shape[1]} channels (shape {tuple(x.shape)})")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the functional checks, with _check_input, run once per call signature
        if isinstance(x, Proxy):  # torch.fx.symbolic_trace: a leaf (modules/tracing.py)
            return fx_leaf(self, x)
        p = self._parameters  # what self.weight resolves to, without nn.Module.__getattr__
        try:
            weight, bias = p["weight"], p["bias"]
        except KeyError:  # parametrized or pruned: see WSConv's standardized_weight
            weight, bias = self.weight, self.bias
            c = self.num_channels
            if (weight is not None and weight.shape != (c,)) or (bias is not None and bias.shape != (c,)):
                F.group_norm(x, self.num_groups, weight, bias, self.eps)  # raises nn.GroupNorm's error
        return _group_norm(x, self.num_groups, weight, bias, self.eps, self.activation, owner=self)

    __prepare_scriptable__ = refuse_script

    def extra_repr(self) -> str:
        text = super().extra_repr()
        return text + (f", activation={self.activation!r}" if self.activation is not None else "")
