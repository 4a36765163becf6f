"""What ``wsbcn.convert`` will change in a model, and why it leaves the rest alone.

1. ``census``: every layer of the model, with its role: a registered type (its rule),
   an already converted wsbcn layer, or a conv/norm-like layer convert has no rule for.
   The walk does not go inside a layer (timm's BatchNormAct2d holds its act).
2. The data flow: which convolution feeds which norm, which activation consumes only
   a norm's output. From torch.fx (``trace``), else from module order (``by_module_order``).
3. ``decide``: the convs and norms to convert, the fusions, and a reason for every
   layer left alone.

The graph is only read: the model keeps its own forward. The tracer keeps layers as
modules (fx leaves): registered types, wsbcn layers, conv/norm-like layers without a
rule, and any module holding parameters or buffers of its own (a hand-written layer,
whose forward need not be traceable); one that also has children is "kept whole": its
children are planned by module order instead, without fusion. Stateless modules
(Sequential, a ResNet block, a functional helper) are traced through. When a stateful
module cannot be a leaf (it returns a tuple its caller iterates over), convert traces
again with only the conv/norm layers as leaves.
"""
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from .convert_layers import NormAct
from .convert_rank import cat_along_channels, norm_input, tensor_args
from .convert_registry import ConvertRule, convert_rule_for, type_name
from .modules import (BatchChannelNorm1d, BatchChannelNorm2d, BatchChannelNorm3d, GroupNorm, WSConv1d, WSConv2d,
                      WSConv3d)

_WSBCN_CONVS = (WSConv1d, WSConv2d, WSConv3d)
# between a conv and the norm it feeds: an Identity, a dropout (the norm still normalizes the conv's output)
_PASS_THROUGH = (nn.Identity, nn.modules.dropout._DropoutNd)
_WSBCN_NORMS = (BatchChannelNorm1d, BatchChannelNorm2d, BatchChannelNorm3d, GroupNorm, NormAct)
_TORCH_NORMS = tuple(c for c in (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm,
                                 getattr(nn, "RMSNorm", None)) if c is not None)
_ACT_MODULES = {nn.ReLU: "relu", nn.SiLU: "silu"}
_ACT_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", F.silu: "silu"}


@dataclass(frozen=True)
class Role:
    kind: str                           # "norm" or "conv"
    rule: Optional[ConvertRule] = None  # None: already wsbcn (converted) or unknown
    converted: bool = False             # a wsbcn layer: never converted again


def _has_own_state(m) -> bool:
    return next(m.parameters(recurse=False), None) is not None or next(m.buffers(recurse=False), None) is not None


def role_of(m) -> Optional[Role]:
    """The layer's role for convert, or None for anything that is not a conv or norm."""
    if isinstance(m, _WSBCN_CONVS):
        return Role("conv", converted=True)
    if isinstance(m, _WSBCN_NORMS):
        return Role("norm", converted=True)
    rule = convert_rule_for(m)
    if rule is not None:
        return Role(rule.kind, rule)
    name = type(m).__name__.lower()
    weight = m._parameters.get("weight") if hasattr(m, "_parameters") else None
    if isinstance(m, nn.modules.conv._ConvNd) or ("conv" in name and weight is not None and weight.dim() >= 3):
        return Role("conv")
    if isinstance(m, _TORCH_NORMS) or ("running_mean" in m._buffers and "running_var" in m._buffers) or (
            "norm" in name and _has_own_state(m) and not _holds_layers(m)):
        return Role("norm")
    return None


def _holds_layers(m) -> bool:
    """Whether a module holds convs or norms: then it is a block (timm's NormFreeBlock, a
    "PreNorm" block with a layer scale), whatever its name, and convert looks inside."""
    return any(role_of(child) is not None for child in m.modules() if child is not m)


def norm_inside(layer, role) -> Optional[Tuple[str, str]]:
    """(norm attribute, activation attribute) of a conv that applies its own norm and
    activation (its rule's ``norm_inside``; a converted ``WSConvNormAct2d``'s), else None."""
    if role.kind != "conv":
        return None
    return role.rule.norm_inside if role.rule is not None else getattr(layer, "norm_inside", None)


def activation_name(act) -> Optional[str]:
    """"relu"/"silu" for an activation module or function wsbcn's kernels apply, else None."""
    if isinstance(act, nn.Module):
        return _ACT_MODULES.get(type(act))
    try:
        return _ACT_FUNCTIONS.get(act)
    except TypeError:  # an unhashable callable
        return None


def census(model) -> List[Tuple[str, nn.Module, Role]]:
    """(path, layer, role) of every conv/norm-like layer, in registration order; the
    walk stops at layers (their children are theirs), except for the norm a conv applies
    itself (``norm_inside``), which follows that conv."""
    found: list = []
    _walk(model, "", found, set())
    return found


def _walk(module, prefix, found, seen) -> None:
    """census's walk below ``module`` (a function of its own: a nested recursive one is a
    reference cycle that kept the replaced layers alive until the cyclic collector ran)."""
    for name, child in module.named_children():
        if id(child) in seen:  # a shared module: its first path, as named_modules gives
            continue
        seen.add(id(child))
        path = f"{prefix}{name}"
        role = role_of(child)
        if role is None:
            _walk(child, path + ".", found, seen)
            continue
        found.append((path, child, role))
        attrs = norm_inside(child, role)
        inner = getattr(child, attrs[0], None) if attrs is not None else None
        inner_role = role_of(inner) if isinstance(inner, nn.Module) and id(inner) not in seen else None
        if inner_role is not None and inner_role.kind == "norm":  # the conv's own norm, planned with it
            seen.add(id(inner))
            found.append((f"{path}.{attrs[0]}", inner, inner_role))


class Tracer(fx.Tracer):
    """torch.fx tracer that keeps layers as modules (see the module docstring) and
    records the modules it kept whole. ``keep_stateful=False`` keeps only conv/norm-like
    and wsbcn layers (and torch.nn's leaves): the retry for a model whose stateful
    modules cannot be leaves (one returning a tuple its caller iterates over)."""

    def __init__(self, keep_stateful: bool = True):
        super().__init__()
        self.keep_stateful = keep_stateful
        self.kept_whole: Dict[str, nn.Module] = {}

    def is_leaf_module(self, m, qualname):
        if role_of(m) is not None:
            return True
        # stateless custom modules (containers, functional helpers) hold nothing to lose
        if super().is_leaf_module(m, qualname) or (self.keep_stateful and _has_own_state(m)):
            if next(m.children(), None) is not None:
                self.kept_whole[qualname] = m
            return True
        return False


@dataclass
class Flow:
    """The data flow convert needs: which conv feeds which norm, which layers run."""

    feeds: Dict[str, str] = field(default_factory=dict)   # conv path -> norm path its output goes to
    called: Optional[set] = None                          # layer paths the forward runs (None: all)
    candidates: list = field(default_factory=list)        # (norm node, act node, "relu"/"silu")
    unfusable: list = field(default_factory=list)         # (norm path, act, why): an activation after it stays
    own_norm: Dict[str, str] = field(default_factory=dict)  # conv path -> the norm only it applies (norm_inside)
    features: Dict[str, str] = field(default_factory=dict)  # norm path -> what made its input one value per channel
    input_dims: Dict[str, int] = field(default_factory=dict)  # norm path -> spatial dims of its input (convert_rank)
    functional_norms: Dict[str, int] = field(default_factory=dict)  # F.batch_norm / F.group_norm -> calls traced
    kept_whole: Dict[str, nn.Module] = field(default_factory=dict)


def _act_of(node, modules):
    if node.op == "call_module" and type(modules.get(node.target)) in _ACT_MODULES:
        return _ACT_MODULES[type(modules[node.target])]
    if node.op == "call_function":
        return _ACT_FUNCTIONS.get(node.target)
    return None


# norms a forward calls as functions: convert swaps modules, so it cannot convert these
_NORM_FUNCTIONS = {F.batch_norm: "F.batch_norm", F.group_norm: "F.group_norm", torch.batch_norm: "torch.batch_norm",
                   torch.group_norm: "torch.group_norm"}


def _is_cat_along_channels(node, modules) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is torch.cat and \
        cat_along_channels(node, modules)


def _is_call_of(node, modules, types) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_module" and isinstance(modules.get(node.target), types)


def flow_from_graph(graph, model, layers, kept_whole) -> Flow:
    modules = dict(model.named_modules())
    roles = {path: role for path, _, role in layers}
    flow = Flow(called=set(), kept_whole=dict(kept_whole))
    calls: Dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_function" and node.target in _NORM_FUNCTIONS:
            name = _NORM_FUNCTIONS[node.target]
            flow.functional_norms[name] = flow.functional_norms.get(name, 0) + 1
        if node.op != "call_module":
            continue
        calls[node.target] = calls.get(node.target, 0) + 1
        role = roles.get(node.target)
        if role is None:
            continue
        flow.called.add(node.target)
        if role.kind != "norm":
            continue
        src = node.args[0] if node.args else None
        # convs concatenated along the batch or channels (timm's MixedConv2d, Inception
        # branches): the norm normalizes each one's channels
        for src in tensor_args(src) if _is_cat_along_channels(src, modules) else (src,):
            while _is_call_of(src, modules, _PASS_THROUGH) and src.args:  # (they keep what the conv gave)
                src = src.args[0]
            src_role = roles.get(src.target) if isinstance(src, fx.Node) and src.op == "call_module" else None
            if src_role is not None and src_role.kind == "conv":
                flow.feeds.setdefault(src.target, node.target)
        dims, features = norm_input(node, modules, channels_of(modules[node.target], role))
        if features is not None:
            flow.features.setdefault(node.target, features)
        if dims is not None:
            flow.input_dims.setdefault(node.target, dims)
    for node in graph.nodes:
        role = roles.get(node.target) if node.op == "call_module" else None
        if role is None or role.rule is None or role.kind != "norm":
            continue
        users = list(node.users)
        acts = [(user, _act_of(user, modules)) for user in users if _act_of(user, modules) is not None]
        if not acts:
            continue
        # the activation must consume the norm's output and nothing else, and the norm run once
        if calls[node.target] != 1:
            why = f"{node.target} is called {calls[node.target]} times, and a fused activation would apply to each"
        elif len(users) != 1:
            why = "the norm's output also goes elsewhere, without the activation"
        elif tuple(users[0].args) != (node,):
            why = "the activation takes other inputs too"
        else:
            flow.candidates.append((node, users[0], acts[0][1]))
            continue
        for _, act in acts:
            if (node.target, act, why) not in flow.unfusable:
                flow.unfusable.append((node.target, act, why))
    # inside a module kept whole, only module order tells
    for scope in kept_whole:
        inner = [item for item in layers if item[0].startswith(scope + ".")]
        flow.feeds.update(by_module_order(inner).feeds)
        flow.called.update(path for path, _, _ in inner)
    return flow


def with_norms_inside(flow: Flow, layers, registered_paths) -> Flow:
    """A conv that applies its own norm feeds that norm (found by identity: the census may
    list it under another path it is registered at), and runs it when it runs; one whose
    own norm is no norm convert knows of feeds none (its output is that layer's). Its own
    activation may fuse into that norm only when nothing else can call the norm: registered
    at that one path, and not called by the traced forward itself (``flow.own_norm``)."""
    path_of = {id(layer): path for path, layer, _ in layers}
    for path, layer, role in layers:
        attrs = norm_inside(layer, role)
        inner = getattr(layer, attrs[0], None) if attrs is not None else None
        if inner is None:
            continue
        norm = path_of.get(id(inner))
        if norm is None:
            flow.feeds.pop(path, None)
            continue
        flow.feeds[path] = norm
        direct = flow.called is not None and norm in flow.called
        if len(registered_paths.get(id(inner), ())) == 1 and not direct:
            flow.own_norm[path] = norm
        if flow.called is not None and path in flow.called:
            flow.called.add(norm)
    return flow


def channels_of(layer, role) -> Optional[int]:
    try:
        if role.rule is not None:
            return role.rule.channels(layer)
        if role.kind == "conv":
            return layer.out_channels
        # a norm without a rule: GroupNorm-like or BatchNorm/InstanceNorm-like
        return layer.num_channels if hasattr(layer, "num_channels") else layer.num_features
    except (AttributeError, TypeError, IndexError):
        return None


def by_module_order(layers) -> Flow:
    """A conv directly followed, in registration order, by a norm of its width feeds it."""
    flow = Flow()
    for (path_a, a, role_a), (path_b, b, role_b) in zip(layers, layers[1:]):
        if role_a.kind == "conv" and role_b.kind == "norm" and channels_of(a, role_a) == channels_of(b, role_b):
            flow.feeds[path_a] = path_b
    return flow


@dataclass
class Plan:
    convs: List[str] = field(default_factory=list)         # conv paths to convert
    norms: Dict[str, int] = field(default_factory=dict)     # norm path -> spatial dims for its NormSpec
    fusions: list = field(default_factory=list)             # (norm node, act node, act)
    inner_fusions: Dict[str, Tuple[str, str]] = field(default_factory=dict)  # norm path -> (its conv, act)
    unfused: List[str] = field(default_factory=list)        # a line per activation after a norm that stays
    reasons: Dict[str, str] = field(default_factory=dict)   # left-alone path -> why


def uninitialized_lazy(layer) -> bool:
    """A lazy module (nn.LazyConv2d, ...) before its first forward, which gives it its
    shapes and its class (``cls_to_become``)."""
    return (isinstance(layer, nn.modules.lazy.LazyModuleMixin) and layer.has_uninitialized_params()
            and getattr(layer, "cls_to_become", None) is not None)


_COMPUTED_WEIGHT = ("convert cannot move that to a new layer; convert the layer without it, then apply it to the "
                    "wsbcn layer")


def _fan_in_of(conv):
    """Elements per filter of a conv's weight (None when it has no weight of known shape)."""
    weight = getattr(conv, "weight", None)
    if not isinstance(weight, torch.Tensor) or uninitialized_lazy(conv) or weight.dim() < 2:
        return None
    return weight[0].numel()


def _why_unknown(layer) -> str:
    if uninitialized_lazy(layer):
        return (f"{type(layer).__name__} is not initialized yet: run one forward first (it then becomes "
                f"{layer.cls_to_become.__name__}), then convert")
    if parametrize.is_parametrized(layer):
        names = list(layer.parametrizations)
        return (f"its {', '.join(names)} {'is' if len(names) == 1 else 'are'} parametrized "
                f"(torch.nn.utils.parametrize: parametrizations.spectral_norm, weight_norm, ...): {_COMPUTED_WEIGHT}")
    known = next((base for base in type(layer).__mro__[1:] if convert_rule_for(base) is not None), None)
    name, known_name = type(layer).__name__, getattr(known, "__name__", None)
    if known_name == name:  # the same short name (mmengine's SyncBatchNorm of nn.SyncBatchNorm): say which
        name, known_name = type_name(type(layer)), type_name(known)
    hint = (f" (a subclass of {known_name}: its forward may differ; register it if it computes the same)"
            if known else "")
    return f"no convert rule for {name}{hint}"


def _computed_weight(layer) -> Optional[str]:
    """Why a layer whose weight a forward pre-hook computes (the hook form of
    torch.nn.utils.spectral_norm / weight_norm: weight_orig, weight_g and weight_v are the
    Parameters) is left alone, else None."""
    own = {**getattr(layer, "_parameters", {}), **getattr(layer, "_buffers", {})}  # FrozenBatchNorm2d: buffers
    if "weight" not in own and isinstance(getattr(layer, "weight", None), torch.Tensor):
        return ("its weight is computed by a forward pre-hook (torch.nn.utils.spectral_norm or weight_norm): "
                + _COMPUTED_WEIGHT)
    return None


_FEEDS_NO_NORM = "its output feeds no norm (WS without a norm after it hurts training)"


def _groups(layer, role, num_groups) -> Optional[int]:
    """The group count the built norm would have (convert_registry.NormSpec.groups_for)."""
    channels = channels_of(layer, role)
    if role.rule.keeps_groups:
        return getattr(layer, "num_groups", None)
    return None if channels is None else math.gcd(channels, num_groups)


def _channel_stage_degenerate(path, layer, role, flow, fed_by, num_groups) -> Optional[str]:
    """Why the built norm's channel stage would normalize next to nothing, or None. On one
    value per channel and sample it normalizes each sample's C / G values per group: one
    gives the bias whatever the input, two give +-1 (the sign of their difference). A
    BatchNorm1d whose input no conv or length-keeping op shows may take (N, C) too."""
    channels, groups = channels_of(layer, role), _groups(layer, role, num_groups)
    if channels is None or not groups:
        return None
    per_group = channels // groups
    kept = "" if role.rule.keeps_groups else " (as a BatchNorm it still needs more than one sample in training)"
    if path in flow.features and per_group <= 2:
        return (f"its input is one value per channel and sample ({flow.features[path]}), and its groups would hold "
                f"{'one channel' if per_group == 1 else 'two channels'} each: a channel stage (BCN's, GroupNorm's) "
                f"would give {'the bias whatever the input' if per_group == 1 else '+-1, the sign of two values'}"
                + kept)
    if (per_group == 1 and role.rule.default_dims == 1 and path not in fed_by and path not in flow.features
            and path not in flow.input_dims):
        return ("nothing shows whether its input has a length dimension, and its groups would hold one channel "
                "each: on (N, C) features a channel stage would give the bias whatever the input" + kept)
    return None


def _unsynchronizable(layer, role, estimate: bool) -> Optional[str]:
    """Why a synchronizing BatchNorm without running statistics (nn.SyncBatchNorm with
    ``track_running_stats=False``) is left alone, or None: a BatchChannelNorm combining
    statistics across processes updates running statistics, and refuses to run without
    them (modules/norm.py). What convert is asked for and such a layer cannot give
    (``estimate=True``, a ``process_group`` for a plain BatchNorm without them) is refused
    instead, naming the layer."""
    if role.rule.synchronizes and not estimate and getattr(layer, "track_running_stats", True) is False:
        return ("it keeps no running statistics (track_running_stats=False), which a BatchChannelNorm "
                "combining statistics across processes updates")
    return None


def decide(layers, flow: Flow, ws: bool, keep_frozen: bool, fuse_activation: bool, target: str = "bcn",
           num_groups: int = 32, estimate: bool = False) -> Plan:
    """``target``, ``num_groups``, ``estimate``: convert's ``norm`` ("bcn" or "gn"),
    ``num_groups`` and ``estimate``."""
    plan = Plan()
    roles = {path: (layer, role) for path, layer, role in layers}
    fed_by = {norm: conv for conv, norm in flow.feeds.items()}
    for path, layer, role in layers:
        if role.kind != "norm" or role.converted:
            continue
        if role.rule is None:
            plan.reasons[path] = _why_unknown(layer)
        elif flow.called is not None and path not in flow.called:
            plan.reasons[path] = "not called by the traced forward"
        elif role.rule.frozen and keep_frozen:
            plan.reasons[path] = "kept frozen (keep_frozen=True)"
        elif role.rule.skip is not None and role.rule.skip(layer):
            plan.reasons[path] = role.rule.skip(layer)
        elif computed := _computed_weight(layer):
            plan.reasons[path] = computed
        elif target == "bcn" and (why := _unsynchronizable(layer, role, estimate)) is not None:
            plan.reasons[path] = why
        elif (why := _channel_stage_degenerate(path, layer, role, flow, fed_by, num_groups)) is not None:
            plan.reasons[path] = why
        else:  # the spatial dims: of the conv feeding it, else its own type's, else found around it in the graph
            conv = roles.get(fed_by.get(path), (None, None))[0]
            dims = conv.weight.dim() - 2 if conv is not None and not uninitialized_lazy(conv) \
                and conv.weight.dim() in (3, 4, 5) else None
            dims = next((d for d in (dims, role.rule.default_dims, flow.input_dims.get(path)) if d is not None), None)
            if dims is None and target == "bcn":
                plan.reasons[path] = (f"the rank of its input is not known ({type(layer).__name__} takes any, a "
                                      "BatchChannelNormNd one): no convolution or layer of one rank reaches it "
                                      "through ops that keep the rank (in the traced graph; a model torch.fx cannot "
                                      "trace shows none)")
            else:
                plan.norms[path] = dims
    for path, layer, role in layers:
        if role.kind != "conv" or role.converted:
            continue
        norm = flow.feeds.get(path)
        if role.rule is None:  # feeding no norm, no rule would convert it: that is the reason, not the rule
            plan.reasons[path] = _FEEDS_NO_NORM if norm is None and not uninitialized_lazy(layer) else \
                _why_unknown(layer)
        elif flow.called is not None and path not in flow.called:
            plan.reasons[path] = "not called by the traced forward"
        elif not ws:
            plan.reasons[path] = "ws=False"
        elif role.rule.skip is not None and role.rule.skip(layer):
            plan.reasons[path] = role.rule.skip(layer)
        elif computed := _computed_weight(layer):
            plan.reasons[path] = computed
        elif _fan_in_of(layer) == 1:
            plan.reasons[path] = ("its fan-in is 1 (one weight per filter): standardized, every filter would be 0 "
                                  "and the conv would output its bias alone")
        elif not role.rule.needs_norm or norm in plan.norms or (norm is not None and roles[norm][1].converted):
            plan.convs.append(path)
        elif norm is None:
            plan.reasons[path] = _FEEDS_NO_NORM
        else:
            norm_layer = roles[norm][0]
            why = plan.reasons.get(norm, "left alone")
            plan.reasons[path] = (f"feeds {norm} ({type(norm_layer).__name__}), {why}: a standardized weight "
                                  "would change what that layer's fixed statistics see" if "frozen" in why
                                  else f"feeds {norm} ({type(norm_layer).__name__}), which is left alone")
    if fuse_activation:
        for path, layer, role in layers:  # a conv's own activation, into the norm only it applies (both converted)
            attrs, norm = norm_inside(layer, role), flow.own_norm.get(path)
            if attrs is None or path not in plan.convs or norm not in plan.norms:
                continue
            act = activation_name(getattr(layer, attrs[1], None))
            if act is not None and roles[norm][1].rule.takes_activation(roles[norm][0]):
                plan.inner_fusions[norm] = (path, act)
        plan.unfused = [f"{path}: the following {act} not fused: {why}" for path, act, why in flow.unfusable
                        if path in plan.norms]
        plan.fusions = [(node, act_node, act) for node, act_node, act in flow.candidates
                        if node.target in plan.norms and roles[node.target][1].rule.takes_activation(
                            roles[node.target][0])]
    return plan
