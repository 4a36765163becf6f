"""wsbcn.convert: swap the convolutions and norms of an existing model.

What convert knows is one table, ``convert_registry``: source layer type -> rule
(what it becomes, what carries over, which activation fuses). Built in
(``convert_builtin``): torch.nn BatchNorm1d/2d/3d, SyncBatchNorm, GroupNorm,
Conv1d/2d/3d; torchvision FrozenBatchNorm2d and the video ResNets' convs; timm's
norm+act layers, group norms and standardized convs; detectron2 Conv2d (a conv that
applies its own norm and activation), FrozenBatchNorm2d, NaiveSyncBatchNorm; mmcv
ConvWS2d (recognized by class name: convert never imports those packages).
``register_convert_rule`` adds a type.

- a convolution whose output feeds a norm becomes a WSConv (WS without a following
  norm hurts, so other convolutions are left alone); timm's StdConv2d/ScaledStdConv2d,
  already standardized, always become the WSConv of the same formula;
- norm layers become BatchChannelNorm (norm="bcn") or wsbcn.GroupNorm (norm="gn"),
  weights and buffers carried over; a FrozenBatchNorm2d too, its BN stage starting
  from the frozen statistics and affine, unless ``keep_frozen=True`` (then it stays,
  and so does the convolution feeding it);
- a ReLU/SiLU module that takes only a norm's output is fused as ``activation=`` and
  replaced by ``nn.Identity`` (``convert_fusion``: only where that changes nothing else).

The data flow is read with torch.fx; layers stay modules (fx leaves, see
``convert_plan``). When tracing fails, a module-order fallback (a conv directly
followed, in registration order, by a norm of matching width) is used, with a
warning, and nothing is fused. Layers are swapped in place on the model, reusing the
Parameter objects (optimizers keep working), and the model returned is ``model``
itself: its class, methods and forward code are kept (convert never rewrites a forward).
Every replacement is built and checked before the first swap, and a failure while
swapping puts the old layers back: a convert that raises leaves the model as it was.
A layer the forward calls from a plain list, tuple or dict attribute (detectron2's FPN)
is replaced there too (``_rebind``).

The summary lists what changed and every conv/norm-like layer left alone, with its
path and why (no rule for its type, its output feeds no norm, kept frozen, ...); it
is logged on the ``wsbcn`` logger, at WARNING for a changed group count, for layer
types without a rule, and for a model with nothing convertible.

wsbcn layers are never converted again: they are leaves to torch.fx, and count as
the norm a plain convolution feeds. So converting a converted model is a no-op
that says so (a model converted with ``ws=False`` gets its WSConv on a second call
with ``ws=True``). A BatchNorm's channels must split into equal groups: when
``num_groups`` does not divide them, the largest count that divides both (their gcd)
is used, and the summary and the log (at WARNING) say so.

``ws="model"``: as ``ws=True``, and the returned model standardizes every WSConv
weight at once on each forward (``wsbcn.ModelWeightStandardizer``: one launch forward
and one backward, bitwise the per-layer results; every WS weight's gradient is then
ready only at the end of the backward, which delays DDP's all-reduce of those weights).
"""
import contextlib
import copy
import functools
import itertools
import inspect
import logging
import warnings
import weakref
from collections import Counter

import torch
from torch import nn

from . import convert_builtin  # noqa: F401  (registers the built-in rules)
from .convert_builtin import bn_like_norm  # noqa: F401  (public: a helper for user rules)
from .convert_fusion import checked_fusions, module_paths, replace_activations, traces_in_modes
from .convert_layers import AffineWSConv2d, ConvNormAct2d, NormAct, ScaledWSConv2d, WSConvNormAct2d  # noqa: F401
from .convert_plan import (Flow, Tracer, by_module_order, census, decide, flow_from_graph, role_of,
                           uninitialized_lazy, with_norms_inside)
from .convert_registry import (ConvertRule, NormSpec, convert_rule_for, convert_rules,  # noqa: F401
                               convert_rules_table, register_convert_rule, unregister_convert_rule)
from .modules import WSConv1d, WSConv2d, WSConv3d
from .modules.norm import _all_equal, _BatchChannelNorm, is_zero_scale
from .ops import collectives

log = logging.getLogger("wsbcn")

__all__ = ["convert", "register_convert_rule", "unregister_convert_rule", "convert_rule_for", "convert_rules",
           "convert_rules_table", "ConvertRule", "NormSpec", "bn_like_norm", "NormAct", "ScaledWSConv2d",
           "AffineWSConv2d", "WSConvNormAct2d", "ConvNormAct2d"]


def _check_arguments(model, norm, num_groups, ws, process_group, flags):
    if norm not in ("bcn", "gn"):
        raise ValueError(f"norm must be 'bcn' or 'gn', got {norm!r}")
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups <= 0:
        raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
    if not (ws is True or ws is False or (isinstance(ws, str) and ws == "model")):
        raise ValueError(f"ws must be True, False or 'model', got {ws!r}")
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    collectives.check_group_type(process_group)
    if norm == "gn" and process_group is not None:
        raise ValueError("process_group combines a BatchChannelNorm's batch statistics across processes: "
                         "norm='gn' makes GroupNorms, which have none")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    wrapper = _data_parallel_wrapper(model)
    if wrapper is not None:
        raise ValueError(f"model holds {wrapper}: convert before wrapping the model (DDP(wsbcn.convert(model))). "
                         "The wrapper set itself up for the parameters it found; a BatchChannelNorm's new "
                         "channel-stage affine would not be synchronized across processes")


def _data_parallel_wrapper(model):
    """What wraps ``model`` or a module in it for data parallelism across processes (DDP,
    FSDP, FSDP2's fully_shard), by name; None without one. Such a wrapper registers the
    parameters it finds when it is made: parameters convert adds later stay per process."""
    if not torch.distributed.is_available():
        return None
    wrappers = [(nn.parallel.DistributedDataParallel, "DistributedDataParallel")]
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
        wrappers.append((FullyShardedDataParallel, "FullyShardedDataParallel"))
        from torch.distributed.fsdp import FSDPModule
        wrappers.append((FSDPModule, "a module sharded by fully_shard (FSDP2)"))
    except ImportError:  # (a torch without FSDP2's public class)
        pass
    for m in model.modules():
        for cls, name in wrappers:
            if isinstance(m, cls):
                return name
    return None


def _flow(model, layers):
    """The data flow (with the norms convs apply themselves, ``with_norms_inside``) and
    the rest of ``_traced_flow``."""
    flow, *rest = _traced_flow(model, layers)
    return (with_norms_inside(flow, layers, module_paths(model)), *rest)


def _traced_flow(model, layers):
    """The data flow, from torch.fx or module order; the graph (None without one) and
    the tracing that made it, which checks fusions in other modes (convert_fusion.py);
    and a note when tracing needed the retry that traces through stateful modules."""
    if not any(role.rule is not None for _, _, role in layers):
        return Flow(called=None), None, None, None  # nothing can change: no tracing, so no fallback warning
    note, error = None, None
    # last, with the forward's bool flags at their defaults (mmcv's ConvModule.forward(x,
    # activate=True, norm=True): as proxies, its branches on them cannot trace)
    flags = _bool_defaults(model)
    for keep_stateful, concrete in [(True, None), (False, None)] + ([(True, flags), (False, flags)] if flags else []):
        tracer = Tracer(keep_stateful)
        try:
            graph = tracer.trace(model, concrete_args=concrete)
            break
        except Exception as exc:  # tracing fails on data-dependent control flow
            error = error or f"{type(exc).__name__}: {exc}"
    else:
        warnings.warn(f"wsbcn.convert: torch.fx could not trace the model ({error}); "
                      "falling back to module order, without activation fusion", stacklevel=4)
        return by_module_order(layers), None, None, (
            f"torch.fx could not trace the model ({error}): each conv was paired with the norm right after it in "
            "registration order, if of its width, and no activation was fused")
    if not keep_stateful:
        note = (f"torch.fx could not trace the model with its stateful modules as leaves ({error}); traced through "
                "them instead")
    kept = {path: m for path, m in tracer.kept_whole.items()
            if any(p.startswith(path + ".") and role.rule is not None for p, _, role in layers)}
    flow = flow_from_graph(graph, model, layers, kept)
    if not concrete:  # a layer the forward runs in the other mode only (googlenet's aux heads in training)
        for _, other in traces_in_modes(model, lambda: Tracer(keep_stateful).trace(model)):
            if not isinstance(other, BaseException):
                other_flow = flow_from_graph(other, model, layers, kept)
                flow.called |= other_flow.called
                for conv, norm in other_flow.feeds.items():
                    flow.feeds.setdefault(conv, norm)
    if concrete:  # a call with other flags may run other layers, or skip an activation: pairs only
        note = (note + "; " if note else "") + "traced with the forward's flags at their defaults (" + ", ".join(
            f"{name}={value}" for name, value in concrete.items()) + "), which other calls may change: convs " \
            "paired with their norms from that trace, and no activation fused"
        flow.called, flow.candidates, flow.unfusable = None, [], []
        return flow, None, None, note
    return flow, graph, (lambda: Tracer(keep_stateful).trace(model)), note


def _bool_defaults(model):
    """The forward's parameters with a bool default, at that default."""
    try:
        parameters = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return {}
    return {p.name: p.default for p in parameters if isinstance(p.default, bool)}


def _safe_fusions(model, layers, plan, graph, trace):
    """plan.fusions that replacing the activation module leaves right in every mode, each
    with that module, and a line for each other one (convert_fusion.py)."""
    if not plan.fusions:
        return [], []
    fused_norms = {node.target for node, _, _ in plan.fusions}

    def pairs_of(g):  # the traced graph's are plan.fusions themselves (each norm is called once)
        candidates = plan.fusions if g is graph else flow_from_graph(g, model, layers, {}).candidates
        return {(node.target, act_node.target) for node, act_node, _ in candidates if node.target in fused_norms}

    return checked_fusions(model, plan.fusions, graph, traces_in_modes(model, trace), pairs_of)


def _add_note(exc, note):
    if hasattr(exc, "add_note"):  # Python 3.11+
        exc.add_note(note)


def _built_channels(new):
    for name in ("num_channels", "num_features", "out_channels"):
        value = getattr(new, name, None)
        if isinstance(value, int):
            return value
    return None


def _build(path, old, rule, *args):
    """rule.build(old, *args), checked: an nn.Module of the layer's channel count."""
    what = f"the {type(old).__name__} rule's build for layer {path!r}"
    try:
        new = rule.build(old, *args)
    except Exception as exc:
        _add_note(exc, f"wsbcn.convert: raised by {what}; the model is unchanged")
        raise
    if not isinstance(new, nn.Module):
        raise TypeError(f"wsbcn.convert: {what} returned a {type(new).__name__}, not an nn.Module; "
                        "the model is unchanged")
    want, got = rule.channels(old), _built_channels(new)
    if got is None:
        raise TypeError(f"wsbcn.convert: {what} returned a {type(new).__name__} with no num_channels, "
                        "num_features or out_channels to check its width against; the model is unchanged")
    if got != want:
        raise ValueError(f"wsbcn.convert: {what} returned a {type(new).__name__} with {got} channels, but "
                         f"{path!r} has {want}; the model is unchanged")
    want_in, got_in = getattr(old, "in_channels", None), getattr(new, "in_channels", None)
    if rule.kind == "conv" and None not in (want_in, got_in) and got_in != want_in:
        raise ValueError(f"wsbcn.convert: {what} returned a {type(new).__name__} with {got_in} input "
                         f"channels, but {path!r} has {want_in}; the model is unchanged")
    inside = rule.norm_inside if rule.kind == "conv" else None
    if inside is not None and (getattr(new, inside[0], None) is not getattr(old, inside[0], None)
                               or getattr(new, inside[1], None) is not getattr(old, inside[1], None)):
        raise TypeError(f"wsbcn.convert: {what} returned a {type(new).__name__} that does not hold the layer's "
                        f"norm as .{inside[0]} and its activation as .{inside[1]} (the rule's norm_inside); the model "
                        "is unchanged")
    # the new layer's own modules take the old layer's mode; modules it took over keep theirs
    # (a conv that applies its own norm holds the old norm until that is swapped in turn)
    taken = {id(m) for m in old.modules()}
    for m in new.modules():
        if id(m) not in taken:
            m.training = old.training
    return new


def _floating_tensors(*modules):
    return (t for m in modules for t in itertools.chain(m.parameters(), m.buffers()) if t.is_floating_point())


def _placed(new, old, feeding, model):
    """A norm without tensors of its own (nn.GroupNorm(affine=False)) tells its rule no
    dtype or device: its new layer's buffers take those of the conv feeding it, else of
    the model's first tensor (not torch's defaults)."""
    if next(_floating_tensors(old), None) is None:
        like = next(_floating_tensors(*feeding, model), None)
        if like is not None:
            new.to(device=like.device, dtype=like.dtype)
    return new


def _describe(new):
    if isinstance(new, NormAct):
        return f"{new.norm!r}, then its {new.drop!r} and {new.act!r} (not fused)"
    return type(new).__name__ if isinstance(new, (WSConv1d, WSConv2d, WSConv3d)) else repr(new)


def _set_module(root, path, module):
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


_MODULE_STATE = frozenset(vars(nn.Module()))  # nn.Module's own bookkeeping attributes


def _plain_containers(model):
    """(path of the holder.attribute, container) for each plain list, tuple and dict a module
    of the model keeps as an attribute (not a registered child)."""
    for path, m in model.named_modules():
        for name, value in list(vars(m).items()):
            if name not in _MODULE_STATE and type(value) in (list, tuple, dict):
                yield f"{path + '.' if path else ''}{name}", m, name, value


def _unheld_fusions(model, fusions):
    """The fusions whose activation module no plain container holds (what calls it from
    there is not in the traced graph), and a line for each other one."""
    held = {}
    for where, _, _, value in _plain_containers(model):
        for item in (value.values() if type(value) is dict else value):
            held.setdefault(id(item), where)
    kept, lines = [], []
    for fusion in fusions:
        node, _, act, act_module = fusion
        if id(act_module) in held:
            lines.append(f"{node.target}: the following {act} not fused: {held[id(act_module)]} also holds it, "
                         "in a plain container whose calls convert cannot see")
        else:
            kept.append(fusion)
    return kept, lines


_OUTPUT_HOOKED = "the norm has forward or backward hooks, which would see its output activated"


def _fusions_hooks_allow(fusions, inner_fusions, by_path):
    """The fusions and the inner fusions (a conv's own activation into its norm) that no
    hook stands against, and a line for each other one: an activation with hooks would not
    run fused; a norm's forward or backward hooks would see its output activated."""
    kept, inner, lines = [], {}, []
    for fusion in fusions:
        node, _, act, act_module = fusion
        if has_hooks(act_module):
            lines.append(f"{node.target}: the following {act} not fused: it has hooks, which would not run")
        elif _has_output_hooks(by_path[node.target]):
            lines.append(f"{node.target}: the following {act} not fused: {_OUTPUT_HOOKED}")
        else:
            kept.append(fusion)
    for norm, (conv, act) in inner_fusions.items():
        if _has_output_hooks(by_path[norm]):
            lines.append(f"{norm}: the {act} its convolution {conv} applies not fused: {_OUTPUT_HOOKED}")
        else:
            inner[norm] = (conv, act)
    return kept, inner, lines


def _rebind(model, new_of, undo):
    """Point the plain lists, tuples and dicts that modules keep as attributes at the new
    layers too (detectron2's FPN calls its convs from ``self.lateral_convs``, a list beside
    the registered modules): ``new_of`` maps id(old) to (old, new); ``undo`` gets the calls
    that put the old ones back. Returns a summary line per container. (A fused activation
    held in one is not fused: ``_unheld_fusions``.)"""
    lines = []
    for where, m, name, value in list(_plain_containers(model)):
        keys = list(value) if type(value) is dict else range(len(value))
        hits = [k for k in keys if id(value[k]) in new_of and new_of[id(value[k])][0] is value[k]]
        if not hits:
            continue
        if type(value) is tuple:
            m.__dict__[name] = tuple(new_of[id(v)][1] if i in hits else v for i, v in enumerate(value))
            undo.append(functools.partial(m.__dict__.__setitem__, name, value))
        else:
            for k in hits:
                undo.append(functools.partial(value.__setitem__, k, value[k]))
                value[k] = new_of[id(value[k])][1]
        lines.append(f"{where}: {len(hits)} entr{'ies' if len(hits) > 1 else 'y'} of this plain "
                     f"{type(value).__name__} replaced by the new layers too")
    return lines


# mmcv's ConvModule(efficient_conv_bn_eval=True) folds its norm into its conv's weight in
# eval mode, taking both for plain layers (torch's conv, a _BatchNorm)
_FOLDING = "efficient_conv_bn_eval_forward"


@contextlib.contextmanager
def _folding_suspended(model):
    """Plan on the forward convert leaves behind: the folding (turned off where a layer is
    swapped) calls neither the conv nor the norm, so a trace would miss both."""
    folding = [(m, getattr(m, _FOLDING)) for m in model.modules() if getattr(m, _FOLDING, None) is not None]
    for m, _ in folding:
        setattr(m, _FOLDING, None)
    try:
        yield
    finally:
        for m, forward in folding:
            setattr(m, _FOLDING, forward)


def _turn_off_folding(model, new_ids, undo):
    """Turn the folding off in every module holding a swapped layer (mmcv's own
    turn_on_efficient_conv_bn_eval leaves it off for a norm that is no _BatchNorm)."""
    lines = []
    for path, m in model.named_modules():
        if getattr(m, _FOLDING, None) is not None and any(id(child) in new_ids for child in m.children()):
            undo.append(functools.partial(setattr, m, _FOLDING, getattr(m, _FOLDING)))
            setattr(m, _FOLDING, None)
            lines.append(f"{path or '(the model itself)'}: efficient_conv_bn_eval turned off: it folds a plain "
                         "BatchNorm into a plain conv's weight in eval mode, which a WSConv and a wsbcn norm are not")
    return lines


# nn.Module's hook dicts: forward, pre-forward, backward, state dict (and their kwargs variants)
_HOOK_DICTS = tuple(k for k, v in vars(nn.Module()).items() if "hook" in k and isinstance(v, dict))


def has_hooks(m: nn.Module) -> bool:
    return any(m.__dict__.get(name) for name in _HOOK_DICTS)


def _computes_the_weight(hook) -> bool:
    """A hook of torch's pruning or of the hook form of weight_norm/spectral_norm (its
    state-dict hooks included): it makes a weight from tensors only the old layer has."""
    from torch.nn.utils.prune import BasePruningMethod
    from torch.nn.utils.spectral_norm import SpectralNorm, SpectralNormLoadStateDictPreHook, SpectralNormStateDictHook
    from torch.nn.utils.weight_norm import WeightNorm
    kinds = (BasePruningMethod, WeightNorm, SpectralNorm, SpectralNormStateDictHook, SpectralNormLoadStateDictPreHook)
    return any(isinstance(h, kinds) for h in (hook, getattr(hook, "hook", None), getattr(hook, "__self__", None)))


def _has_output_hooks(m: nn.Module) -> bool:
    return any(m.__dict__.get(name) for name in ("_forward_hooks", "_backward_hooks", "_backward_pre_hooks"))


def carry_hooks(old: nn.Module, new: nn.Module, undo=None) -> bool:
    """The hooks registered on ``old`` run on ``new`` (the same dicts where nothing is left
    out: their handles still remove them), except those computing its weight (pruning,
    the hook form of weight_norm/spectral_norm: ``new`` holds the weight they computed).
    Returns whether any were carried; ``undo`` gets what puts ``old``'s hooks back."""
    carried = False
    for name in _HOOK_DICTS:
        hooks = old.__dict__.get(name)
        kept = {k: h for k, h in hooks.items() if not _computes_the_weight(h)} if hooks else {}
        if not kept:
            continue
        carried = True
        for k, h in kept.items():  # in place too: ``old`` is going, and the handles hold this dict
            kept[k] = hooks[k] = _bound_to(h, old, new)
            if undo is not None and kept[k] is not h:
                undo.append(functools.partial(hooks.__setitem__, k, h))
        if new.__dict__.get(name) or len(kept) < len(hooks):  # hooks of its own, or some left out: a copy
            new.__dict__[name] = type(hooks)({**new.__dict__.get(name, {}), **kept})
        else:
            new.__dict__[name] = hooks
    if carried and old.__dict__.get("_is_full_backward_hook") is not None:
        new._is_full_backward_hook = old._is_full_backward_hook
    return carried


def _bound_to(hook, old: nn.Module, new: nn.Module):
    """``hook``, called with ``new`` where it was called with ``old``: torch wraps a
    ``register_load_state_dict_pre_hook`` hook with a weak reference to its module
    (``_WrappedHook``), which would call it with the old layer, and once that is freed
    fail in load_state_dict, deepcopy and pickle ("a dead Module")."""
    module = getattr(hook, "module", None)
    if getattr(hook, "with_module", False) is True and callable(module) and module() is old:
        hook = copy.copy(hook)
        hook.module = weakref.ref(new)
    return hook


def _swap(model, replacements, fusions):
    """Put the new layers in, at every path a shared layer is registered at, and replace
    the fused activations' modules (convert_fusion.py), also in plain containers
    (``_rebind``), and turn off conv-norm folding that would read them as plain layers
    (``_turn_off_folding``); on any failure put everything back and re-raise. Returns a
    line per other path, per folding turned off and per container."""
    done, swapped, undo, lines = [], [], [], []
    paths = module_paths(model)
    try:
        for path, old, new in replacements:
            for at in [path] + [p for p in paths.get(id(old), ()) if p != path]:  # a shared layer: everywhere
                _set_module(model, at, new)
                done.append((at, old))
                if at != path:
                    lines.append(f"{at}: the same {type(old).__name__} as {path}, replaced there too")
        replace_activations(model, fusions, swapped)
        new_of = {id(old): (old, new) for _, old, new in replacements}
        lines += [f"{path}: its hooks run on the new layer" for path, old, new in replacements
                  if carry_hooks(old, new, undo)]
        lines += _turn_off_folding(model, {id(new) for _, _, new in replacements}, undo)
        return lines + _rebind(model, new_of, undo)
    except BaseException:
        for put_back in reversed(undo):
            put_back()
        for parent, name, old in reversed(swapped):
            setattr(parent, name, old)
        for path, old in reversed(done):
            _set_module(model, path, old)
        raise


def convert(model: nn.Module, norm: str = "bcn", num_groups: int = 32, estimate: bool = False, ws=True,
            fuse_activation: bool = True, process_group=None, return_summary: bool = False,
            keep_frozen: bool = False):
    """Convert ``model`` (see the module docstring). Returns the converted model,
    and with ``return_summary=True`` also a list of lines saying what changed and
    what was left alone, and why. ``keep_frozen=True`` leaves frozen layers
    (FrozenBatchNorm2d) and the convolutions feeding them as they are.
    ``process_group``: the BatchChannelNorm layers made from BatchNorms combine their
    batch statistics over it in training. An ``nn.SyncBatchNorm`` keeps synchronizing:
    over its own process group, or, on the default group (its ``process_group=None``),
    over ``process_group`` when given, else over the default group (looked up when the
    layer runs: nothing is combined without torch.distributed, as nn.SyncBatchNorm)."""
    _check_arguments(model, norm, num_groups, ws, process_group, dict(
        estimate=estimate, fuse_activation=fuse_activation, return_summary=return_summary, keep_frozen=keep_frozen))
    with _folding_suspended(model):
        layers = census(model)
        flow, graph, trace, trace_note = _flow(model, layers)
        plan = decide(layers, flow, bool(ws), keep_frozen, fuse_activation, norm, num_groups, estimate)
        fusions, not_fused = _safe_fusions(model, layers, plan, graph, trace)
    fusions, held = _unheld_fusions(model, fusions)
    by_path = {path: layer for path, layer, _ in layers}
    fusions, plan.inner_fusions, hooked = _fusions_hooks_allow(fusions, plan.inner_fusions, by_path)
    not_fused += held + hooked
    fused_act = {node.target: act for node, _, act, _ in fusions}

    replacements, changed, warned = [], [], set()
    act_fused_by = {conv: act for conv, act in plan.inner_fusions.values()}
    for path in plan.convs:
        old = by_path[path]
        rule = convert_rule_for(old)
        new = _build(path, old, rule)
        if path in act_fused_by:  # its activation goes into its own norm
            setattr(new, rule.norm_inside[1], None)
        replacements.append((path, old, new))
        changed.append(f"{path}: {type(old).__name__} -> {_describe(new)}")
    for path, dims in plan.norms.items():
        old = by_path[path]
        rule = convert_rule_for(old)
        act = plan.inner_fusions[path][1] if path in plan.inner_fusions else fused_act.get(path)
        spec = NormSpec(norm, num_groups, estimate, act, dims, process_group)
        feeding = [by_path[c] for c, n in flow.feeds.items() if n == path and c in by_path]
        new = _placed(_build(path, old, rule, spec), old, feeding, model)
        replacements.append((path, old, new))
        changed.append(f"{path}: {type(old).__name__} -> {_describe(new)}")
        if any(getattr(m, "_zero_scale_on_channel_stage", False) for m in new.modules()):
            changed.append(f"{path}: its scale is all zero (a zero-initialised residual branch): the zero is the "
                           "channel stage's scale (group_weight), the BN stage's is 1 (docs/convert.md)")
        channels = rule.channels(old)
        if not rule.keeps_groups and spec.groups_for(channels) != num_groups:
            changed.append(f"{path}: num_groups={num_groups} does not divide its {channels} channels; "
                           f"it has {spec.groups_for(channels)} group{'s' if spec.groups_for(channels) != 1 else ''} "
                           "(the greatest common divisor)")
            warned.add(changed[-1])
    zero_scaled = _zero_scaled(model)  # read before anything changes
    rebound = _swap(model, replacements, fusions)
    changed += _move_zero_scales(zero_scaled)
    if ws == "model":  # every WSConv weight standardized at once (ops/ws_model.py)
        from .ops.ws_model import ModelWeightStandardizer
        ModelWeightStandardizer.attach(model)
    changed += [f"{node.target}: fused the following {act}" for node, _, act, _ in fusions]
    changed += [f"{path}: fused the {act} its convolution {conv} applied" for path, (conv, act)
                in plan.inner_fusions.items()] + rebound

    functional = [f"the forward calls {name} {n} time{'s' if n > 1 else ''}: a function, which convert cannot swap "
                  "(it swaps norm modules); its inputs stay as they are" for name, n in flow.functional_norms.items()]
    unfoldable = _reparameterizable_lines(model, layers, plan)
    warned.update(unfoldable)
    summary = (changed + plan.unfused + not_fused + ([trace_note] if trace_note else []) + functional
               + unfoldable + _left_alone_lines(model, layers, plan, flow, warned))
    if not changed:
        summary.insert(0, _nothing_line(model, layers, ws))
        if not any(role.converted or role.rule is not None for _, _, role in layers):
            warned.add(summary[0])  # nothing convertible (not merely kept by option): the user should know
    for line in summary:
        log.log(logging.WARNING if line in warned else logging.INFO, "wsbcn.convert: %s", line)
    return (model, summary) if return_summary else model


_REPARAMETERIZE = ("reparameterize", "switch_to_deploy", "fuse_reparam")  # timm (RepVGG, MobileOne), mmdet/YOLO


def _reparameterizable_lines(model, layers, plan) -> list:
    """A line per kind of block with a method, taking no arguments, that folds its
    branches (and their BatchNorms) into one conv for deployment, and whose BatchNorms
    convert swapped: a wsbcn norm normalizes each sample, which no conv absorbs, so the
    fold now fails. (A VAE's ``reparameterize(mu, logvar)`` takes arguments: not one.)"""
    swapped_bns = [path for path, layer, _ in layers if path in plan.norms and "BatchNorm" in type(layer).__name__]
    found = {}  # (class name, method) -> paths
    for path, m in model.named_modules():
        name = next((a for a in _REPARAMETERIZE if _takes_no_arguments(getattr(m, a, None))), None)
        if name is not None and any(not path or n.startswith(path + ".") for n in swapped_bns):
            found.setdefault((type(m).__name__, name), []).append(path or "(the model itself)")
    return [f"{paths[0]}{f' and {len(paths) - 1} more' if len(paths) > 1 else ''}: {cls} has {name}(), which "
            "folds its branches' BatchNorms into one conv; the wsbcn norms they became normalize each sample, which "
            "no conv absorbs, so it cannot fold them now (the blocks train and run unfolded)"
            for (cls, name), paths in found.items()]


def _takes_no_arguments(method) -> bool:
    if not callable(method):
        return False
    try:
        return all(p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
                   for p in inspect.signature(method).parameters.values())
    except (TypeError, ValueError):  # no signature to read
        return False


def _zero_scaled(model) -> list:
    """(path, layer) of the BatchChannelNorms the model holds whose BN stage has a zero
    scale and shift (is_zero_scale) and whose channel stage's scale is trainable and at its
    initial 1: what a model builder's zero init of a residual branch leaves in a model
    built with norm_layer=BatchChannelNorm2d (torchvision's zero_init_residual, timm's
    zero_init_last write the BN stage's ``weight``)."""
    return [(path, m) for path, m in model.named_modules()
            if isinstance(m, _BatchChannelNorm) and m.group_weight is not None and m.group_weight.requires_grad
            and is_zero_scale(m.weight, m.bias) and _all_equal(m.group_weight, 1)]


def _move_zero_scales(zero_scaled) -> list:
    """The zero of each ``_zero_scaled`` layer moved to the channel stage's scale, in place
    (the same Parameters), as convert makes a BatchChannelNorm of a zero-initialised
    BatchNorm: the output is the same (group_bias), the gradients BatchNorm's. A line each."""
    lines = []
    for path, m in zero_scaled:
        m._zero_scale_to_channel_stage()
        lines.append(f"{path or '(the model itself)'}: its BN-stage scale (weight) was all zero (a zero-initialised "
                     "residual branch): the zero is now the channel stage's scale (group_weight), weight is 1 "
                     "(docs/convert.md)")
    return lines


def _left_alone_lines(model, layers, plan, flow, warned):
    lines = []
    role = role_of(model)
    if role is not None:
        why = ("it is a wsbcn layer already" if role.converted else "no convert rule for it" if role.rule is None
               else "wrap the layer (nn.Sequential(layer)) to convert it")
        lines.append(f"(the model itself): {type(model).__name__} left alone: convert swaps the layers inside a "
                     f"model; {why}")
        warned.add(lines[-1])
    for path, scope in flow.kept_whole.items():
        lines.append(f"{path}: {type(scope).__name__} kept as one module (it holds parameters or buffers of its "
                     "own besides sub-modules, and tracing through it would dissolve it): the layers inside it "
                     "were paired by module order, with nothing fused")
    unknown = Counter()
    for path, layer, role in layers:
        if path in plan.reasons:
            lines.append(f"{path}: {type(layer).__name__} left alone: {plan.reasons[path]}")
            if "parametrized (torch.nn.utils.parametrize" in plan.reasons[path] or \
                    "not initialized yet: run one forward first" in plan.reasons[path]:  # it says what to do: WARNING
                warned.add(lines[-1])
            elif plan.reasons[path].startswith("no convert rule"):  # a lazy one says what to do instead
                unknown[type(layer).__name__] += 1
    for name, n in unknown.items():
        lines.append(f"{n} {name} layer{'s' if n > 1 else ''} left alone: no convert rule for {name} "
                     "(wsbcn.convert_registry.register_convert_rule adds one)")
        warned.add(lines[-1])
    return lines


def _nothing_line(model, layers, ws):
    if role_of(model) is not None:  # the model is a layer: the line after this says so
        return f"nothing to convert: the model is itself a layer ({type(model).__name__})"
    n_ws = sum(isinstance(layer, (WSConv1d, WSConv2d, WSConv3d)) for _, layer, _ in layers)
    n_norms = sum(role.converted and role.kind == "norm" for _, _, role in layers)
    n_left = sum(not role.converted for _, _, role in layers)
    what = (f"{n_left} conv/norm layer{'s' if n_left > 1 else ''} left alone, listed below" if n_left else
            "no norm layer with a convert rule" + (", and no convolution feeding a norm" if ws else ""))
    done = f" (already converted: {n_ws} WSConv and {n_norms} wsbcn norm layers)" if n_ws or n_norms else ""
    return f"nothing to convert: {what}{done}"
