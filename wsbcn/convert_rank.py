"""What a norm's input is, read from the traced graph, where the norm's own type does not
say: its rank (nn.GroupNorm and nn.SyncBatchNorm take any; a BatchChannelNormNd takes
one), and whether it holds one value per channel and sample: (N, C) features, pooled
and flattened or a Linear's, or a map pooled to one element per channel (a squeeze-and-
excitation block's), where a channel stage would normalize each sample's C / num_groups
values on their own.

One value per channel and sample: the norm's input comes from a global pooling (an
adaptive pool to 1; a mean, amax or sum over every spatial dim, kept or dropped, also
one dim at a time, the input's rank read from the graph, else a kept one over dims 2
and on; a pooling window as large as the map), a flatten from dim 1, a view to (N, -1)
or to (N, C, 1, ...), or an nn.Linear of the norm's width (one over a length
dimension has another), followed only by ops that keep it so: 1x1 convolutions without
padding, activations, dropout, norms, concatenations along the batch or channels, and
elementwise ops all of whose inputs are such (an SE block's gate times the block's map
is a map).

The rank: from the norm's input the walk goes up through ops that keep a tensor's rank
(activations, dropout, pooling, padding, resampling, norms, elementwise arithmetic,
concatenation, reductions that keep their dims) to the nearest convolution or layer of
one rank (BatchNorm2d, MaxPool3d, ...), whose spatial dims are the input's, or to a
flatten or reduction of some spatial dims of a known rank; when that finds none, down
from the norm's output. Any other op ends the walk there: nothing is inferred through
an op that may change the rank (a view, a reshape).
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


def _flatten_span(node: fx.Node, modules):
    """(start_dim, end_dim) of a flatten (nn.Flatten, torch.flatten, .flatten()), or None."""
    m = modules.get(node.target) if node.op == "call_module" else None
    if isinstance(m, nn.Flatten):
        return m.start_dim, m.end_dim
    if node.op in ("call_function", "call_method") and node.target in (torch.flatten, "flatten"):
        return (node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0),
                node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1))
    return None


def _view_shape(node: fx.Node):
    """The shape a view / reshape (method or torch.reshape) asks for, or None."""
    if node.target not in ("view", "reshape", torch.reshape) or node.op not in ("call_function", "call_method"):
        return None
    shape = node.args[1:] if node.op == "call_method" else node.args[1:2]
    return tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else tuple(shape)


def _flattens_to_features(node: fx.Node, modules) -> bool:
    """A flatten from dim 1 (or 0) to the last, or a view / reshape to (N, -1): (N, features)."""
    span, shape = _flatten_span(node, modules), _view_shape(node)
    if span is not None:
        return type(span[0]) is int and span[0] in (0, 1) and span[1] == -1
    return shape is not None and len(shape) == 2 and shape[1] == -1


def _name(node: fx.Node) -> str:
    if node.op == "call_module":
        return node.target
    return f".{node.target}()" if node.op == "call_method" else f"torch.{getattr(node.target, '__name__', node.target)}"


def _reduction(node: fx.Node, modules) -> Optional[Tuple[Optional[int], str]]:
    """(spatial dims kept, each of size 1, or None when they are dropped: (N, C); its
    name) of a pooling of every spatial dim of its input, or None: an adaptive pool to 1
    (squeeze-and-excitation blocks), a mean / amax / sum over all the spatial dims (the
    input's rank from the graph: ``_rank_above``)."""
    def ones(size):
        return size == 1 or isinstance(size, (tuple, list)) and all(v == 1 for v in size)
    m = modules.get(node.target) if node.op == "call_module" else None
    if m is not None:
        if isinstance(m, (nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd)) \
                and ones(m.output_size) and type(m) in _RANKED:
            return _RANKED[type(m)], node.target
        return None
    name = getattr(node.target, "__name__", "")
    if node.op == "call_function" and name.startswith(("adaptive_avg_pool", "adaptive_max_pool")):
        size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
        return (int(name[-2]), _name(node)) if ones(size) and name[-2:] in ("1d", "2d", "3d") else None
    if node.op == "call_function" and node.target in _WINDOW_POOLS:  # a window as large as the map
        kernel = node.args[1] if len(node.args) > 1 else node.kwargs.get("kernel_size")
        source = node.args[0] if node.args else node.kwargs.get("input")
        return (_WINDOW_POOLS[node.target], _name(node)) if _spatial_size_of(kernel, source) else None
    reduced = _reduced(node)
    if reduced is None:
        return None
    source, dims, keep = reduced
    spatial = _rank_above(source, modules, include=True)
    if spatial is None:  # the input's rank not known: a kept mean over dims 2 and on (an SE block's)
        return (len(dims), _name(node)) if keep and all(d >= 2 for d in dims) else None
    dims = {d % (spatial + 2) for d in dims}
    while keep:  # kept reductions one dim at a time (x.mean(2, keepdim=True).mean(3, keepdim=True))
        inner = _reduced(source)
        if inner is None or not inner[2]:
            break
        source, dims = inner[0], dims | {d % (spatial + 2) for d in inner[1]}
    if sorted(dims) != list(range(2, spatial + 2)):
        return None  # not every spatial dim (or the batch or channel dim too)
    return (spatial if keep else None), _name(node)


_WINDOW_POOLS = {F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3, F.max_pool1d: 1, F.max_pool2d: 2,
                 F.max_pool3d: 3}


def _spatial_size_of(kernel, source) -> bool:
    """``kernel`` is ``source.size()[2:]`` or ``source.shape[2:]`` (BiSeNet's attention
    refinement: F.avg_pool2d(feat, feat.size()[2:]))."""
    if not isinstance(kernel, fx.Node) or kernel.target is not operator.getitem or len(kernel.args) != 2:
        return False
    sizes, index = kernel.args
    if index != slice(2, None, None) or not isinstance(sizes, fx.Node) or not sizes.args:
        return False
    return sizes.args[0] is source and (sizes.target == "size" and len(sizes.args) == 1 or
                                        sizes.op == "call_function" and sizes.target is getattr
                                        and sizes.args[1:] == ("shape",))


def cat_along_channels(node: fx.Node, modules) -> bool:
    """A torch.cat along the batch or channel dim (a negative one by its rank)."""
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if type(dim) is not int:
        return False
    if dim < 0:
        spatial = _rank_above(node, modules, include=True)
        return spatial is not None and dim % (spatial + 2) in (0, 1)
    return dim in (0, 1)


def _viewed_to_ones(node: fx.Node) -> Optional[int]:
    """The spatial dims of a view / reshape to (N, C, 1, ...): each of size 1, or None."""
    shape = _view_shape(node)
    return None if shape is None or not 3 <= len(shape) <= 5 or not all(
        v == 1 and type(v) is int for v in shape[2:]) else len(shape) - 2


def _reduced(node: fx.Node):
    """(input, dims as a tuple, keepdim) of a mean / amax / sum over given dims, or None."""
    if node.target not in _REDUCTIONS or node.op == "call_module":
        return None
    source = node.args[0] if node.args else node.kwargs.get("input")
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keep = _keepdim(node)
    dims = (dims,) if type(dims) is int else dims
    if not isinstance(source, fx.Node) or not isinstance(dims, (tuple, list)) or not dims or \
            not all(type(d) is int for d in dims):
        return None
    return source, tuple(dims), keep


def _reduced_dims(node: fx.Node, modules) -> Optional[int]:
    """The spatial dims a reduction over some spatial dims, not kept, leaves
    ((N, C, H, W).mean(3): 1), from its input's rank; None otherwise."""
    reduced = _reduced(node)
    if reduced is None or reduced[2]:
        return None
    spatial = _rank_above(reduced[0], modules, include=True)
    if spatial is None or not all(2 <= d % (spatial + 2) for d in reduced[1]) or len(reduced[1]) >= spatial:
        return None
    return spatial - len(reduced[1])


def _rank_above(node: fx.Node, modules, include: bool = False) -> Optional[int]:
    """The spatial dims of ``node``'s output (``include``) or input, from the nearest
    convolution or layer of one rank above it through ops that keep the rank, or None."""
    def rank(n):
        dims = _conv_dims(n, modules)
        dims = _flattened_dims(n, modules) if dims is None else dims
        return _reduced_dims(n, modules) if dims is None else dims
    return _nearest([node] if include else _inputs(node), _inputs, rank, modules)


def _nearest(start, step, look, modules):
    """The first answer ``look`` gives, breadth first from the nodes ``start`` along
    ``step`` (a node's inputs or users) through ops that keep the rank, or None."""
    queue, seen = list(start), set()
    while queue and len(seen) < _WALK_LIMIT:
        other = queue.pop(0)
        if other in seen:
            continue
        seen.add(other)
        found = look(other)
        if found is not None:
            return found
        if _keeps_rank(other, modules):
            queue.extend(step(other))
    return None


def _flattened_dims(node: fx.Node, modules) -> Optional[int]:
    """The spatial dims a flatten of the spatial dims leaves ((N, C, H, W).flatten(2): 1),
    from its input's rank; None for another node or an unknown rank."""
    span = _flatten_span(node, modules)
    if span is None:
        return None
    start, end = span
    source = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    spatial = None if source is None or type(start) is not int or end != -1 else \
        _rank_above(source, modules, include=True)
    if spatial is None or not 2 <= start % (spatial + 2):
        return None
    return start % (spatial + 2) - 1


def _inputs(node: fx.Node):
    """The tensors a node computes from: a module's first argument, a function's all."""
    return [a for a in node.args[:1] if isinstance(a, fx.Node)] if node.op == "call_module" else tensor_args(node)


# ops that keep one element per channel where every input has one (a binary op broadcasts
# such an input against a full map: an SE block's gate times its block's output)
_KEEP_SIZE_MODULES = _ACTIVATIONS + (nn.Identity, nn.modules.dropout._DropoutNd, nn.modules.batchnorm._NormBase,
                                     nn.GroupNorm, BatchChannelNorm1d, BatchChannelNorm2d, BatchChannelNorm3d,
                                     GroupNorm)
_RESIZING = {F.interpolate, F.pad}


def _one_per_channel(node: fx.Node, modules, channels, memo, depth: int = 0) -> Optional[Tuple[str, Optional[int]]]:
    """(what made ``node`` one value per channel and sample, the spatial dims it keeps
    (each of size 1), None for (N, C)), or None: a global pooling, a flatten from dim 1,
    a view to (N, -1) or an nn.Linear of ``channels`` outputs, followed only by ops that
    keep it so (rank-keeping ones that do not resize, all of whose inputs are such; 1x1
    convs without padding). ``memo``: node -> answer, so that each node is looked at once."""
    if node in memo:
        return memo[node]
    memo[node] = None  # (a cycle cannot occur in a graph)
    if depth > _WALK_LIMIT:  # a deep chain of pointwise layers: not this far (no recursion limit)
        return None
    m = modules.get(node.target) if node.op == "call_module" else None
    found = None
    reduced = _reduction(node, modules)
    if reduced is not None:
        found = (f"pooled by {reduced[1]}", reduced[0])
    elif (ones := _viewed_to_ones(node)) is not None:
        found = (f"viewed by {_name(node)} to one element per channel", ones)
    elif _flattens_to_features(node, modules):
        found = (f"flattened by {_name(node)}", None)
    elif isinstance(m, nn.Linear):
        found = (f"the output of {node.target} (nn.Linear)", None) if m.out_features == channels else None
    elif isinstance(m, nn.modules.conv._ConvNd) and all(k == 1 for k in m.kernel_size) and (
            m.padding == "valid" or not isinstance(m.padding, str) and all(p == 0 for p in m.padding)):
        source = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        inner = None if source is None else _one_per_channel(source, modules, None, memo, depth + 1)
        found = None if inner is None else (f"{inner[0]}, then {node.target}", len(m.kernel_size))
    elif isinstance(m, _KEEP_SIZE_MODULES) if m is not None else (
            _keeps_rank(node, modules) and node.target not in _RESIZING and "pool" not in getattr(
                node.target, "__name__", "") and (node.target is not torch.cat or cat_along_channels(node, modules))):
        for a in _inputs(node):  # every input one value per channel (stops at the first that is not)
            found = _one_per_channel(a, modules, channels, memo, depth + 1)
            if found is None:
                break
    memo[node] = found
    return found


def _keeps_rank(node: fx.Node, modules) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(node.target), _KEEP_RANK_MODULES)
    if node.target in _REDUCTIONS and node.op != "call_module":  # a reduction that keeps its dims
        return _keepdim(node)
    if node.op == "call_function":
        return node.target in _KEEP_RANK_FUNCTIONS
    return node.op == "call_method" and node.target in _KEEP_RANK_METHODS


_REDUCTIONS = ("mean", "amax", "sum", torch.mean, torch.amax, torch.sum)


def _keepdim(node: fx.Node) -> bool:
    """A reduction's keepdim argument (positional or keyword) is True."""
    return (node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)) is True


def tensor_args(node: fx.Node):
    """The fx nodes among a node's arguments (torch.cat's are in a list)."""
    out = []
    for a in list(node.args) + list(node.kwargs.values()):
        for b in (a if isinstance(a, (list, tuple)) else (a,)):
            if isinstance(b, fx.Node):
                out.append(b)
    return out


# layers of one rank (a BatchNorm1d takes (N, C) and (N, C, L), as a BatchChannelNorm1d does)
_RANKED = {t: d for d, types in ((1, (nn.BatchNorm1d, nn.InstanceNorm1d, BatchChannelNorm1d, nn.MaxPool1d,
                                      nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d)),
                                 (2, (nn.BatchNorm2d, nn.InstanceNorm2d, BatchChannelNorm2d, nn.MaxPool2d,
                                      nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)),
                                 (3, (nn.BatchNorm3d, nn.InstanceNorm3d, BatchChannelNorm3d, nn.MaxPool3d,
                                      nn.AvgPool3d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d)))
           for t in types}


def _conv_dims(node: fx.Node, modules) -> Optional[int]:
    """The spatial dims of the input a convolution, or a layer that takes one rank, was given."""
    m = modules.get(node.target) if node.op == "call_module" else None
    if isinstance(m, nn.modules.conv._ConvNd) and not isinstance(m.weight, nn.parameter.UninitializedParameter) \
            and m.weight.dim() in (3, 4, 5):
        return m.weight.dim() - 2
    return _RANKED.get(type(m))


def norm_input(node: fx.Node, modules, channels: Optional[int]) -> Tuple[Optional[int], Optional[str]]:
    """(spatial dims of the norm's input, or None if not found; a description of what
    made it one value per channel and sample, or None) for the norm called at ``node``.
    (N, C) features have dims 1: a BatchChannelNorm1d takes them."""
    source = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    features = None if source is None else _one_per_channel(source, modules, channels, {})
    if features is not None:
        return (1 if features[1] is None else features[1]), features[0]
    dims = _rank_above(node, modules)
    if dims is None:  # down from its output
        dims = _nearest(node.users, lambda n: list(n.users), lambda n: _conv_dims(n, modules), modules)
    return dims, None
