"""wsbcn.convert: swap the convolutions and norms of an existing model.

- a convolution whose output feeds a normalization layer becomes a WSConv (WS
  without a following norm hurts, so other convolutions are left alone);
- BatchNorm / GroupNorm layers become BatchChannelNorm (norm="bcn") or
  wsbcn.GroupNorm (norm="gn"), weights and buffers carried over;
- a ReLU/SiLU that consumes only a norm's output is fused as ``activation=``.

The data flow is read with torch.fx. When tracing fails, a module-order fallback
(a conv directly followed, in registration order, by a norm of matching width)
is used, with a warning, and nothing is fused. Convolutions and norms are swapped
in place on the model, reusing the Parameter objects (optimizers keep working);
when an activation is fused the model returned is an ``fx.GraphModule`` with the
activation call removed from the graph.

wsbcn layers are never converted again: they are leaves to torch.fx, and count as
the norm a plain convolution feeds. So converting a converted model is a no-op
that says so (a model converted with ``ws=False`` gets its WSConv on a second call
with ``ws=True``). A BatchNorm's channels must split into equal groups: when
``num_groups`` does not divide them, the largest count that divides both (their gcd)
is used, and the summary and the log (at WARNING) say so.
"""
import logging
import math
import warnings

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .modules.norm import BatchChannelNorm1d, BatchChannelNorm2d, BatchChannelNorm3d, GroupNorm
from .modules.ws_conv import WSConv1d, WSConv2d, WSConv3d

log = logging.getLogger("wsbcn")

_WS = {nn.Conv1d: WSConv1d, nn.Conv2d: WSConv2d, nn.Conv3d: WSConv3d}
_BCN_BY_DIMS = {1: BatchChannelNorm1d, 2: BatchChannelNorm2d, 3: BatchChannelNorm3d}
_BN_DIMS = {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3, nn.SyncBatchNorm: 2}
_ACT_MODULES = {nn.ReLU: "relu", nn.SiLU: "silu"}
_ACT_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", F.silu: "silu"}
_WSBCN_CONVS = (WSConv1d, WSConv2d, WSConv3d)
_WSBCN_NORMS = (BatchChannelNorm1d, BatchChannelNorm2d, BatchChannelNorm3d, GroupNorm)


def _is_norm(m) -> bool:
    """A norm layer that convert swaps."""
    return type(m) in _BN_DIMS or type(m) is nn.GroupNorm


def _is_any_norm(m) -> bool:
    """A norm layer that makes the convolution feeding it a WSConv: swappable or already wsbcn."""
    return _is_norm(m) or isinstance(m, _WSBCN_NORMS)


def _width(norm) -> int:
    return norm.num_features if type(norm) in _BN_DIMS else norm.num_channels


class _Tracer(fx.Tracer):
    """Treats wsbcn layers as leaves, like torch.nn's own: their input checks branch
    on shapes, which symbolic tracing cannot follow."""

    def is_leaf_module(self, m, qualname):
        return isinstance(m, _WSBCN_CONVS + _WSBCN_NORMS) or super().is_leaf_module(m, qualname)


def _ws_conv(conv):
    ws = _WS[type(conv)](conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                         padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                         bias=conv.bias is not None, padding_mode=conv.padding_mode,
                         device=conv.weight.device, dtype=conv.weight.dtype)
    ws.weight = conv.weight  # the same Parameter objects: optimizers keep working
    if conv.bias is not None:
        ws.bias = conv.bias
    ws.train(conv.training)
    return ws


def _groups_for(channels, num_groups):
    return math.gcd(channels, num_groups)


def _new_norm(old, norm, num_groups, estimate, activation, dims, process_group):
    c = old.num_features if type(old) in _BN_DIMS else old.num_channels
    ref = next(iter(old.parameters()), None)
    factory = dict(device=ref.device if ref is not None else None, dtype=ref.dtype if ref is not None else None)
    if norm == "gn":
        g = old.num_groups if type(old) is nn.GroupNorm else _groups_for(c, num_groups)
        new = GroupNorm(g, c, eps=old.eps, affine=old.weight is not None, activation=activation, **factory)
        if old.weight is not None:
            new.weight, new.bias = old.weight, old.bias
    elif type(old) is nn.GroupNorm:
        cls = _BCN_BY_DIMS[dims or 2]
        new = cls(c, num_groups=old.num_groups, eps=old.eps, estimate=estimate, affine=old.weight is not None,
                  group_affine=False, activation=activation, process_group=process_group, **factory)
        if old.weight is not None:  # GN's per-channel affine is the channel stage's
            with torch.no_grad():
                new.group_weight.copy_(old.weight.reshape(1, c, 1))
                new.group_bias.copy_(old.bias.reshape(1, c, 1))
    else:
        cls = _BCN_BY_DIMS[dims or _BN_DIMS[type(old)]]
        new = cls(c, num_groups=_groups_for(c, num_groups), eps=old.eps, momentum=old.momentum, estimate=estimate,
                  affine=old.affine, activation=activation, process_group=process_group, **factory)
        if old.affine:
            new.weight, new.bias = old.weight, old.bias
        if old.track_running_stats:
            with torch.no_grad():
                new.running_mean.copy_(old.running_mean)
                new.running_var.copy_(old.running_var)
                new.num_batches_tracked.copy_(old.num_batches_tracked)
    new.train(old.training)
    return new


def _set_module(root, name, module):
    parent_name, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, leaf, module)


def _act_of(node, modules):
    if node.op == "call_module" and type(modules.get(node.target)) in _ACT_MODULES:
        return _ACT_MODULES[type(modules[node.target])]
    if node.op == "call_function" and node.target in _ACT_FUNCTIONS:
        return _ACT_FUNCTIONS[node.target]
    return None


def _plan_from_graph(graph, modules, fuse_activation):
    """(convs to standardize, norms to swap with their conv dims, fusions)."""
    calls = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    convs, norms, fusions = [], {}, []
    for node in graph.nodes:
        if node.op != "call_module" or not _is_any_norm(modules[node.target]):
            continue
        src = node.args[0] if node.args else None
        dims = None
        if isinstance(src, fx.Node) and src.op == "call_module" and type(modules.get(src.target)) in _WS:
            convs.append(src.target)
            dims = modules[src.target].weight.dim() - 2
        if not _is_norm(modules[node.target]):
            continue  # already a wsbcn layer: only its convolution is converted
        norms[node.target] = dims
        users = list(node.users)
        if fuse_activation and calls[node.target] == 1 and len(users) == 1:
            act_node = users[0]
            act = _act_of(act_node, modules)
            # the activation must consume the norm's output and nothing else
            if act is not None and tuple(act_node.args) == (node,):
                fusions.append((node, act_node, act))
    return list(dict.fromkeys(convs)), norms, fusions


def _plan_by_module_order(model):
    named = list(model.named_modules())
    convs, norms = [], {}
    for (name_a, a), (name_b, b) in zip(named, named[1:]):
        if type(a) in _WS and _is_any_norm(b) and _width(b) == a.out_channels:
            convs.append(name_a)
            if _is_norm(b):
                norms[name_b] = a.weight.dim() - 2
    for name, m in named:
        if _is_norm(m) and name not in norms:
            norms[name] = None
    return convs, norms


def convert(model: nn.Module, norm: str = "bcn", num_groups: int = 32, estimate: bool = False, ws: bool = True,
            fuse_activation: bool = True, process_group=None, return_summary: bool = False):
    """Convert ``model`` (see the module docstring). Returns the converted model,
    and with ``return_summary=True`` also a list of lines saying what changed."""
    if norm not in ("bcn", "gn"):
        raise ValueError(f"norm must be 'bcn' or 'gn', got {norm!r}")
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups <= 0:
        raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    summary, adjusted = [], set()
    modules = dict(model.named_modules())
    has_work = any(_is_norm(m) for m in modules.values()) or (
        ws and any(type(m) in _WS for m in modules.values()) and any(map(_is_any_norm, modules.values())))
    graph, convs, norms, fusions = None, [], {}, []
    if has_work:  # else nothing can change: no tracing, so no fallback warning either
        try:
            graph = _Tracer().trace(model)
            convs, norms, fusions = _plan_from_graph(graph, modules, fuse_activation)
        except Exception as exc:  # tracing fails on data-dependent control flow
            warnings.warn(f"wsbcn.convert: torch.fx could not trace the model ({type(exc).__name__}: {exc}); "
                          "falling back to module order, without activation fusion", stacklevel=2)
            graph, fusions = None, []
            convs, norms = _plan_by_module_order(model)
    fused_act = {n.target: act for n, _, act in fusions}
    if ws:
        for name in convs:
            old = model.get_submodule(name)
            new = _ws_conv(old)
            _set_module(model, name, new)
            summary.append(f"{name}: {type(old).__name__} -> {type(new).__name__}")
    for name, dims in norms.items():
        old = model.get_submodule(name)
        new = _new_norm(old, norm, num_groups, estimate, fused_act.get(name), dims, process_group)
        _set_module(model, name, new)
        summary.append(f"{name}: {type(old).__name__} -> {new!r}")
        if type(old) in _BN_DIMS and new.num_groups != num_groups:
            summary.append(f"{name}: num_groups={num_groups} does not divide its {_width(old)} channels; "
                           f"it has {new.num_groups} groups (the greatest common divisor)")
            adjusted.add(summary[-1])
    result = model
    if fusions:
        for norm_node, act_node, act in fusions:
            act_node.replace_all_uses_with(norm_node)
            graph.erase_node(act_node)
            summary.append(f"{norm_node.target}: fused the following {act}")
        graph.lint()
        result = fx.GraphModule(model, graph, class_name=type(model).__name__)
    if not summary:
        n_ws = sum(isinstance(m, _WSBCN_CONVS) for m in modules.values())
        n_norms = sum(isinstance(m, _WSBCN_NORMS) for m in modules.values())
        summary.append("nothing to convert: no BatchNorm/GroupNorm layer"
                       + (", and no nn.ConvNd feeding a norm" if ws else "")
                       + (f" (already converted: {n_ws} WSConv and {n_norms} wsbcn norm layers)"
                          if n_ws or n_norms else ""))
    for line in summary:
        log.log(logging.WARNING if line in adjusted else logging.INFO, "wsbcn.convert: %s", line)
    return (result, summary) if return_summary else result

