"""What a norm's input is, read from the traced graph, where the norm's own type does not
say: its rank (nn.GroupNorm and nn.SyncBatchNorm take any; a BatchChannelNormNd takes
one), and whether it is (N, C) features, pooled and flattened or a Linear's, where a
channel stage would normalize each sample's C / num_groups values on their own.

From the norm's input the walk goes up through ops that keep a tensor's rank
(activations, dropout, pooling, padding, resampling, norms, elementwise arithmetic,
concatenation) to the nearest convolution, whose spatial dims are the input's, or to an
op that makes features: a flatten from dim 1, or an nn.Linear of the norm's width (one
over a length dimension has another). When that finds nothing, the walk goes down from
the norm's output to the convolution it reaches. Any other op ends the walk there:
nothing is inferred through an op that may change the rank (a view, a reshape).
"""
import operator
from typing import Optional, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .modules import BatchChannelNorm1d, BatchChannelNorm2d, BatchChannelNorm3d, GroupNorm

_ACTIVATIONS = tuple(getattr(nn.modules.activation, name) for name in nn.modules.activation.__all__
                     if name != "MultiheadAttention")
_KEEP_RANK_MODULES = _ACTIVATIONS + (
    nn.Identity, nn.modules.dropout._DropoutNd, nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd, nn.modules.padding._ReflectionPadNd,
    nn.modules.padding._ReplicationPadNd, nn.modules.padding._ConstantPadNd, nn.Upsample,
    nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LocalResponseNorm, BatchChannelNorm1d, BatchChannelNorm2d,
    BatchChannelNorm3d, GroupNorm)
_KEEP_RANK_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub, operator.imul,
    operator.neg, torch.add, torch.sub, torch.mul, torch.cat, torch.relu, torch.sigmoid, torch.tanh, F.relu,
    F.relu6, F.silu, F.gelu, F.leaky_relu, F.hardswish, F.hardsigmoid, F.elu, F.mish, F.dropout, F.dropout1d,
    F.dropout2d, F.dropout3d, F.interpolate, F.pad, F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d,
    F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d}
_KEEP_RANK_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "relu", "relu_", "sigmoid",
                      "sigmoid_", "contiguous", "clone", "float", "half", "bfloat16", "to", "type_as"}
_WALK_LIMIT = 64  # nodes looked at per walk: the nearest convolution is a few ops away


def _flattens_to_features(node: fx.Node, modules) -> bool:
    """A flatten from dim 1 (or 0) to the last: (N, features)."""
    if node.op == "call_module":
        m = modules.get(node.target)
        return isinstance(m, nn.Flatten) and m.start_dim <= 1 and m.end_dim == -1
    if node.target not in (torch.flatten, "flatten") or node.op not in ("call_function", "call_method"):
        return False
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
    return isinstance(start, int) and start <= 1 and end == -1


def _name(node: fx.Node) -> str:
    if node.op == "call_module":
        return node.target
    return f".{node.target}()" if node.op == "call_method" else f"torch.{getattr(node.target, '__name__', node.target)}"


def _keeps_rank(node: fx.Node, modules) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(node.target), _KEEP_RANK_MODULES)
    if node.op == "call_function":
        return node.target in _KEEP_RANK_FUNCTIONS
    return node.op == "call_method" and node.target in _KEEP_RANK_METHODS


def _tensor_args(node: fx.Node):
    """The fx nodes among a node's arguments (torch.cat's are in a list)."""
    out = []
    for a in list(node.args) + list(node.kwargs.values()):
        for b in (a if isinstance(a, (list, tuple)) else (a,)):
            if isinstance(b, fx.Node):
                out.append(b)
    return out


def _conv_dims(node: fx.Node, modules) -> Optional[int]:
    m = modules.get(node.target) if node.op == "call_module" else None
    if isinstance(m, nn.modules.conv._ConvNd) and not isinstance(m.weight, nn.parameter.UninitializedParameter) \
            and m.weight.dim() in (3, 4, 5):
        return m.weight.dim() - 2
    return None


def norm_input(node: fx.Node, modules, channels: Optional[int]) -> Tuple[Optional[int], Optional[str]]:
    """(spatial dims of the norm's input, or None if not found; a description of what
    made it (N, C) features, or None) for the norm called at ``node``."""
    queue, seen = [a for a in node.args[:1] if isinstance(a, fx.Node)], set()
    while queue and len(seen) < _WALK_LIMIT:
        src = queue.pop(0)
        if src in seen:
            continue
        seen.add(src)
        dims = _conv_dims(src, modules)
        if dims is not None:
            return dims, None
        m = modules.get(src.target) if src.op == "call_module" else None
        if isinstance(m, nn.Linear):
            if m.out_features == channels:
                return None, f"the output of {src.target} (nn.Linear)"
            continue
        if _flattens_to_features(src, modules):
            return None, f"flattened by {_name(src)}"
        if _keeps_rank(src, modules):
            queue.extend(_tensor_args(src) if src.op != "call_module" else [a for a in src.args[:1]
                                                                              if isinstance(a, fx.Node)])
    queue, seen = list(node.users), set()
    while queue and len(seen) < _WALK_LIMIT:
        dst = queue.pop(0)
        if dst in seen:
            continue
        seen.add(dst)
        dims = _conv_dims(dst, modules)
        if dims is not None:
            return dims, None
        if _keeps_rank(dst, modules):
            queue.extend(dst.users)
    return None, None
