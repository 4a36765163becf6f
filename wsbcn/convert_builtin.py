"""The rules ``wsbcn.convert`` ships with: torch.nn, torchvision and timm layers.

torchvision and timm are never imported here: their rules are registered by class
name (see ``convert_registry``) and read only the attributes the layers have. The
formulas each rule reproduces:

- torchvision ``FrozenBatchNorm2d`` (torchvision/ops/misc.py): y = (x - running_mean)
  * weight / sqrt(running_var + eps) + bias, all four buffers. The BN stage of the
  BCN layer starts from them (as trainable Parameters), so in eval it computes y.
- timm ``StdConv2d`` / ``ScaledStdConv2d`` (timm/layers/std_conv.py): the weight goes
  through ``F.batch_norm(w.reshape(1, out, -1), training=True, eps=eps)``: biased
  variance, eps inside the square root, i.e. WSConv's eps_mode="var", correction=0,
  with the layer's eps (timm's default 1e-6; BiT uses 1e-8). ScaledStdConv2d then
  multiplies by gain * scale per output channel (``ScaledWSConv2d``).
- timm ``BatchNormAct2d`` / ``GroupNormAct`` / ``FrozenBatchNormAct2d``
  (timm/layers/norm_act.py): the norm, then ``self.drop``, then ``self.act``.
- detectron2 ``Conv2d`` (detectron2/layers/wrappers.py): ``F.conv2d`` with the layer's
  geometry (its padding_mode unused), then ``self.norm``, then ``self.activation``
  (either may be None). ``FrozenBatchNorm2d`` (detectron2/layers/batch_norm.py):
  torchvision's formula. ``NaiveSyncBatchNorm``: nn.BatchNorm2d on one process and in
  eval; in training across processes, the mean of each process's mean and mean square.
- mmcv ``ConvWS2d`` (mmcv/cnn/bricks/conv_ws.py): W_hat = (W - mean) / (std + eps), std
  unbiased, i.e. WSConv's eps_mode="std", correction=1, with the layer's eps; its
  forward is ``F.conv2d`` (padding_mode unused). ``ConvAWS2d`` (same file): W =
  weight_gamma * (W - mean) / sqrt(unbiased var + 1e-5) + weight_beta, two buffers per
  output channel (``AffineWSConv2d``).
"""
import dataclasses

import torch
from torch import nn

from .convert_layers import AffineWSConv2d, NormAct, ScaledWSConv2d, WSConvNormAct2d
from .convert_plan import _ACT_MODULES  # the activation modules wsbcn's kernels apply
from .convert_registry import ConvertRule, NormSpec, register_convert_rule
from .modules import (BatchChannelNorm1d, BatchChannelNorm2d, BatchChannelNorm3d, GroupNorm, WSConv1d, WSConv2d,
                      WSConv3d)
from .modules.norm import is_zero_scale
from .ops.collectives import WORLD

_BCN_BY_DIMS = {1: BatchChannelNorm1d, 2: BatchChannelNorm2d, 3: BatchChannelNorm3d}
_WS_BY_DIMS = {1: WSConv1d, 2: WSConv2d, 3: WSConv3d}
_NORM_TARGET = "BatchChannelNormNd / GroupNorm"


def _factory(layer) -> dict:
    """device and dtype of the layer's first floating-point tensor (parameters, then buffers:
    a FrozenBatchNorm2d has no parameters)."""
    for t in list(layer.parameters(recurse=False)) + list(layer.buffers(recurse=False)):
        if t.is_floating_point():
            return dict(device=t.device, dtype=t.dtype)
    return dict(device=None, dtype=None)


def _as_parameter(t):
    """The same Parameter object (an optimizer holding it keeps working), or a new
    Parameter with a copy of a buffer's values (a frozen layer's affine becomes trainable)."""
    if t is None or isinstance(t, nn.Parameter):
        return t
    return nn.Parameter(t.detach().clone())


def bn_like_norm(spec: NormSpec, channels: int, *, weight=None, bias=None, running_mean=None, running_var=None,
                 num_batches_tracked=None, eps: float = 1e-5, momentum=0.1, factory=None,
                 track_running_stats: bool = True) -> nn.Module:
    """The wsbcn norm for a BatchNorm-like layer (per-channel statistics and affine):
    BatchChannelNorm with its BN stage starting from ``weight``, ``bias`` and the running
    statistics (``spec.norm == "bcn"``), or GroupNorm with the affine (``"gn"``; a
    GroupNorm has no running statistics). A public helper for user rules; ``factory``
    (device, dtype) defaults to that of the tensors given. ``track_running_stats=False``
    (a BatchNorm without running statistics, which normalizes with batch statistics in
    eval too): a BatchChannelNorm that does the same; with running statistics given (a
    BatchNorm whose flag was switched off after construction), one that keeps them for
    eval and reads the flag on every call, as BatchNorm does."""
    if factory is None:  # the device and dtype of the statistics and affine given
        given = next((t for t in (weight, running_mean, bias, running_var) if t is not None), None)
        factory = dict(device=given.device, dtype=given.dtype) if given is not None else {}
    groups = spec.groups_for(channels)
    affine = weight is not None
    # a BatchNorm's track_running_stats set to False after construction: it keeps its buffers
    # (eval uses them) and reads the flag on every call, as BatchChannelNorm does
    switched_off = not track_running_stats and running_mean is not None
    if spec.norm == "gn":
        new = GroupNorm(groups, channels, eps=eps, affine=affine, activation=spec.activation, **factory)
    else:
        new = _BCN_BY_DIMS[spec.dims](channels, num_groups=groups, eps=eps, momentum=momentum,
                                      estimate=spec.estimate, affine=affine, activation=spec.activation,
                                      process_group=spec.process_group,
                                      track_running_stats=track_running_stats or switched_off, **factory)
        with torch.no_grad():
            if running_mean is not None:
                new.running_mean.copy_(running_mean)
                new.running_var.copy_(running_var)
            if num_batches_tracked is not None and new.num_batches_tracked is not None:
                new.num_batches_tracked.copy_(num_batches_tracked)
        if switched_off:
            new.track_running_stats = False
            new._check_untracked(" (set to False after construction)")
    if affine:
        new.weight, new.bias = _as_parameter(weight), _as_parameter(bias)
        if spec.norm == "bcn":  # a frozen scale (shift) stays frozen, the channel stage's new one with it
            for source, made in ((weight, new.group_weight), (bias, new.group_bias)):
                if isinstance(source, nn.Parameter) and not source.requires_grad:
                    made.requires_grad_(False)
            if is_zero_scale(weight, bias):
                # a zero-initialised residual branch: its zero goes to the channel stage's scale
                # (modules/norm.py, is_zero_scale); a new Parameter, the source layer untouched
                new.weight = nn.Parameter(torch.empty_like(weight), requires_grad=new.weight.requires_grad)
                new._zero_scale_to_channel_stage()
    return new


def _batch_norm(layer, spec):
    return bn_like_norm(spec, layer.num_features, weight=layer.weight, bias=layer.bias,
                        running_mean=layer.running_mean, running_var=layer.running_var,
                        num_batches_tracked=layer.num_batches_tracked, eps=layer.eps, momentum=layer.momentum,
                        factory=_factory(layer), track_running_stats=layer.track_running_stats)


def _sync_batch_norm(layer, spec):
    """An nn.SyncBatchNorm keeps synchronizing: its BCN replacement combines statistics
    over the layer's own process group; a layer on the default group (process_group=None)
    over convert's ``process_group=`` when given, else over the default group of the
    moment it runs (``collectives.WORLD``: as nn.SyncBatchNorm, nothing is combined
    while torch.distributed is not initialized or has one process)."""
    group = layer.process_group
    if group is None:
        group = spec.process_group if spec.process_group is not None else WORLD
    return _batch_norm(layer, dataclasses.replace(spec, process_group=group))


def _frozen_batch_norm(layer, spec):
    return bn_like_norm(spec, layer.weight.shape[0], weight=layer.weight, bias=layer.bias,
                        running_mean=layer.running_mean, running_var=layer.running_var, eps=layer.eps,
                        factory=_factory(layer))


def _group_norm(layer, spec):
    """A GroupNorm keeps its group count. As BCN, its per-channel affine is the channel
    stage's (group_affine=False) and the BN stage starts as the identity's statistics;
    a frozen affine stays frozen (the BN stage's too), and without a bias the channel
    stage's stays 0."""
    c, factory = layer.num_channels, _factory(layer)
    affine = layer.weight is not None
    if spec.norm == "gn":
        new = GroupNorm(layer.num_groups, c, eps=layer.eps, affine=affine, activation=spec.activation, **factory)
        if affine:
            new.weight, new.bias = layer.weight, layer.bias
        return new
    new = _BCN_BY_DIMS[spec.dims](c, num_groups=layer.num_groups, eps=layer.eps, estimate=spec.estimate,
                                  affine=affine, group_affine=False, activation=spec.activation,
                                  process_group=spec.process_group, **factory)
    new._from_group_norm = True  # a GroupNorm checkpoint loaded after convert: its affine where convert puts it
    if affine:
        with torch.no_grad():
            new.group_weight.copy_(layer.weight.reshape(1, c, 1))
            if layer.bias is not None:
                new.group_bias.copy_(layer.bias.reshape(1, c, 1))
        # what the GroupNorm did not train, the BCN does not either: a frozen scale or shift, a
        # missing bias (nn.GroupNorm(bias=False): it stays 0); the new BN stage's affine is
        # frozen with the whole affine
        scale, shift = layer.weight.requires_grad, layer.bias is not None and layer.bias.requires_grad
        new.group_weight.requires_grad_(scale)
        new.group_bias.requires_grad_(shift)
        for p in (new.weight, new.bias):
            p.requires_grad_(scale or shift)
    return new


def _ws_conv(layer, **ws):
    cls = _WS_BY_DIMS[layer.weight.dim() - 2]
    new = cls(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride, padding=layer.padding,
              dilation=layer.dilation, groups=layer.groups, bias=layer.bias is not None,
              padding_mode=layer.padding_mode, device=layer.weight.device, dtype=layer.weight.dtype, **ws)
    new.weight = layer.weight  # the same Parameter objects: optimizers keep working
    if layer.bias is not None:
        new.bias = layer.bias
    return new


def _conv_norm_act(layer):
    """detectron2's Conv2d: a WSConvNormAct2d holding the layer's norm (convert swaps it in
    turn when it converts it) and activation."""
    new = WSConvNormAct2d(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
                          padding=layer.padding, dilation=layer.dilation, groups=layer.groups,
                          bias=layer.bias is not None, device=layer.weight.device, dtype=layer.weight.dtype,
                          norm=layer.norm, activation=layer.activation)
    new.weight = layer.weight
    if layer.bias is not None:
        new.bias = layer.bias
    return new


def _naive_sync_batch_norm(layer, spec):
    """detectron2's NaiveSyncBatchNorm: a BatchChannelNorm combining over convert's
    ``process_group=``, else over the default group of the moment it runs (exact
    statistics of all processes' samples, as nn.SyncBatchNorm)."""
    group = spec.process_group if spec.process_group is not None else WORLD
    return _batch_norm(layer, dataclasses.replace(spec, process_group=group))


def _std_conv(layer):
    return _ws_conv(layer, eps=layer.eps, correction=0, eps_mode="var")


def _scaled_std_conv(layer):
    new = ScaledWSConv2d(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
                         padding=layer.padding, dilation=layer.dilation, groups=layer.groups,
                         bias=layer.bias is not None, device=layer.weight.device, dtype=layer.weight.dtype,
                         eps=layer.eps, correction=0, eps_mode="var", scale=layer.scale)
    new.weight, new.gain = layer.weight, layer.gain
    if layer.bias is not None:
        new.bias = layer.bias
    return new


def _aws_conv(layer):
    """mmcv's ConvAWS2d: (W - mean) / sqrt(unbiased var + 1e-5), then its per-channel
    weight_gamma and weight_beta."""
    new = AffineWSConv2d(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
                         padding=layer.padding, dilation=layer.dilation, groups=layer.groups,
                         bias=layer.bias is not None, device=layer.weight.device, dtype=layer.weight.dtype,
                         eps=1e-5, correction=1, eps_mode="var")
    new.weight = layer.weight  # the same Parameters: optimizers keep working
    if layer.bias is not None:
        new.bias = layer.bias
    with torch.no_grad():
        new.weight_gamma.copy_(layer.weight_gamma)
        new.weight_beta.copy_(layer.weight_beta)
    return new


def _ignores_padding_mode(library):
    """A skip for layers whose forward calls F.conv2d itself: WSConv would apply a padding_mode."""
    def skip(layer):
        if getattr(layer, "padding_mode", "zeros") != "zeros":
            return f"padding_mode={layer.padding_mode!r}, which {library}'s forward ignores and WSConv2d would apply"
        return None
    return skip


_std_conv_skip = _ignores_padding_mode("timm")


def _act_name(act):
    """"relu"/"silu" for an activation wsbcn fuses, None for nn.Identity, False otherwise."""
    if type(act) is nn.Identity:
        return None
    return _ACT_MODULES.get(type(act), False)


def _drop_act(layer):
    """A timm norm+act layer's drop and act modules. timm's SyncBatchNormAct has them only
    when timm's convert_sync_batchnorm set them (its forward skips a missing one): an
    nn.Identity stands in for a missing one."""
    drop, act = getattr(layer, "drop", None), getattr(layer, "act", None)
    return (nn.Identity() if drop is None else drop), (nn.Identity() if act is None else act)


def _fuses_own_act(layer) -> bool:
    drop, act = _drop_act(layer)
    return type(drop) is nn.Identity and _act_name(act) is not False


def _takes_following_act(layer) -> bool:
    """Nothing of the layer's own after the norm: a following ReLU/SiLU may fuse."""
    drop, act = _drop_act(layer)
    return type(drop) is nn.Identity and type(act) is nn.Identity


def _with_drop_act(build_norm):
    """A norm+act rule's build: the layer's activation fused when wsbcn has it and no drop
    layer sits between; otherwise the norm, then the layer's drop and act (``NormAct``)."""

    def build(layer, spec):
        drop, act = _drop_act(layer)
        if _fuses_own_act(layer):
            return build_norm(layer, dataclasses.replace(spec, activation=_act_name(act) or spec.activation))
        return NormAct(build_norm(layer, dataclasses.replace(spec, activation=None)), drop, act)

    return build


_FOLLOWING = "a following ReLU/SiLU"
_OWN = "its own ReLU/SiLU if no drop precedes it; a following one if it has no act"
_BN = dict(becomes=_NORM_TARGET, carries="weight, bias, eps; BCN also running stats, momentum", fuses=_FOLLOWING)
_GN = dict(becomes=_NORM_TARGET + ", keeping its num_groups",
           carries="num_groups, eps, weight, bias (BCN: as its channel-stage affine)", fuses=_FOLLOWING,
           default_dims=None)  # any rank, as nn.GroupNorm: the dims convert finds around it
_KEPT = "; unchanged with `keep_frozen=True`"
_FROZEN = dict(becomes=_NORM_TARGET + _KEPT,
               carries="weight, bias (now trainable), eps; BCN also running stats", frozen=True,
               channels=lambda m: m.weight.shape[0])
_THEN = ", then its drop/act unless fused"
_AND = "; its drop and act modules"

BUILTIN_RULES = {
    nn.BatchNorm1d: ConvertRule("norm", _batch_norm, **_BN, default_dims=1),
    nn.BatchNorm2d: ConvertRule("norm", _batch_norm, **_BN, default_dims=2),
    nn.BatchNorm3d: ConvertRule("norm", _batch_norm, **_BN, default_dims=3),
    # keeps its process group (convert's process_group= for one on the default group); mmengine's
    # subclass (mmcv's norm_cfg type "SyncBN") only changes the input check
    **{sync: ConvertRule("norm", _sync_batch_norm, **_BN, default_dims=None, synchronizes=True)  # any rank
       for sync in (nn.SyncBatchNorm, "mmengine.utils.dl_utils.parrots_wrapper.SyncBatchNorm")},
    nn.GroupNorm: ConvertRule("norm", _group_norm, **_GN, keeps_groups=True),
    # torchvision's video ResNets' convs (r3d_18, mc3_18): nn.Conv3d with a fixed geometry and its forward
    **{conv: ConvertRule("conv", _ws_conv, becomes="WSConvNd, when its output feeds a norm",
                         carries="geometry, weight, bias (the same Parameters)")
       for conv in (nn.Conv1d, nn.Conv2d, nn.Conv3d, "torchvision.models.video.resnet.Conv3DSimple",
                    "torchvision.models.video.resnet.Conv3DNoTemporal")},
    "torchvision.ops.misc.FrozenBatchNorm2d": ConvertRule("norm", _frozen_batch_norm, **_FROZEN, fuses=_FOLLOWING),
    # timm's nn.GroupNorm subclasses with nn.GroupNorm's forward (F.group_norm; in low
    # precision under autocast with timm's fast_norm, where wsbcn keeps fp32 statistics)
    **{gn: ConvertRule("norm", _group_norm, **_GN, keeps_groups=True)
       for gn in ("timm.layers.norm.GroupNorm", "timm.layers.norm.GroupNorm1")},
    **{bn_act: ConvertRule(
        "norm", _with_drop_act(build), becomes=_BN["becomes"] + _THEN, carries=_BN["carries"] + _AND,
        fuses=_OWN, takes_activation=_takes_following_act, synchronizes=build is _sync_batch_norm)
       for bn_act, build in (("timm.layers.norm_act.BatchNormAct2d", _batch_norm),
                             # timm's convert_sync_batchnorm of a BatchNormAct2d: keeps synchronizing
                             ("timm.layers.norm_act.SyncBatchNormAct", _sync_batch_norm))},
    **{gn_act: ConvertRule(
        "norm", _with_drop_act(_group_norm), becomes=_GN["becomes"] + _THEN, carries=_GN["carries"] + _AND,
        fuses=_OWN, takes_activation=_takes_following_act, keeps_groups=True, default_dims=None)
       for gn_act in ("timm.layers.norm_act.GroupNormAct", "timm.layers.norm_act.GroupNorm1Act")},
    "timm.layers.norm_act.FrozenBatchNormAct2d": ConvertRule(
        "norm", _with_drop_act(_frozen_batch_norm), **dict(_FROZEN, becomes=_NORM_TARGET + _THEN + _KEPT,
                                                           carries=_FROZEN["carries"] + _AND),
        fuses=_OWN, takes_activation=_takes_following_act),
    "timm.layers.std_conv.StdConv2d": ConvertRule(
        "conv", _std_conv, becomes="WSConv2d (eps_mode=\"var\", correction=0), whatever its output feeds "
        "(padding_mode \"zeros\" only)", carries="geometry, eps, weight, bias", needs_norm=False, skip=_std_conv_skip),
    "timm.layers.std_conv.ScaledStdConv2d": ConvertRule(
        "conv", _scaled_std_conv, becomes="ScaledWSConv2d (that WSConv2d, times gain * scale), whatever its output "
        "feeds (padding_mode \"zeros\" only)",
        carries="geometry, eps, scale, weight, gain, bias", needs_norm=False, skip=_std_conv_skip),
    "detectron2.layers.wrappers.Conv2d": ConvertRule(
        "conv", _conv_norm_act, becomes="WSConvNormAct2d, its norm converted in turn; when that norm converts "
        "(without one: when its output feeds a norm)", carries="geometry, weight, bias (the same Parameters), its "
        "norm and activation", fuses="its own ReLU/SiLU, into its norm", norm_inside=("norm", "activation"),
        skip=_ignores_padding_mode("detectron2")),
    "detectron2.layers.batch_norm.FrozenBatchNorm2d": ConvertRule("norm", _frozen_batch_norm, **_FROZEN,
                                                                  fuses=_FOLLOWING),
    "detectron2.layers.batch_norm.NaiveSyncBatchNorm": ConvertRule("norm", _naive_sync_batch_norm, **_BN,
                                                                   default_dims=2, synchronizes=True),
    "mmcv.cnn.bricks.conv_ws.ConvWS2d": ConvertRule(
        "conv", lambda layer: _ws_conv(layer, eps=layer.eps, correction=1, eps_mode="std"),
        becomes="WSConv2d (eps_mode=\"std\", correction=1), whatever its output feeds (padding_mode \"zeros\" "
        "only)", carries="geometry, eps, weight, bias",
        needs_norm=False, skip=_ignores_padding_mode("mmcv")),
    "mmcv.cnn.bricks.conv_ws.ConvAWS2d": ConvertRule(
        "conv", _aws_conv, becomes="AffineWSConv2d (WSConv2d eps_mode=\"var\", correction=1, then weight_gamma * "
        "W_hat + weight_beta), whatever its output feeds (padding_mode \"zeros\" only)",
        carries="geometry, weight, bias (the same Parameters), weight_gamma, weight_beta", needs_norm=False,
        skip=_ignores_padding_mode("mmcv")),
}

# timm before 0.9 defined the same classes under timm.models.layers
_TIMM_OLD_PATHS = {name: name.replace("timm.layers.", "timm.models.layers.")
                   for name in BUILTIN_RULES if isinstance(name, str) and name.startswith("timm.layers.")}


def register_builtin_rules() -> None:
    for layer_type, rule in BUILTIN_RULES.items():
        register_convert_rule(layer_type, rule, replace=True)
        if layer_type in _TIMM_OLD_PATHS:
            register_convert_rule(_TIMM_OLD_PATHS[layer_type], rule, replace=True)


register_builtin_rules()
