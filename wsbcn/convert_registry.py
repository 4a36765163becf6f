"""The table of layer types ``wsbcn.convert`` knows: source type -> conversion rule.

A rule says how one source layer becomes a wsbcn layer (``build``), and, for the
summary and the docs, what carries over and which activation fuses. Built-in rules
(torch.nn, torchvision, timm) are registered by ``convert_builtin``; users add their
own with ``register_convert_rule``.

Third-party types are registered by name ("package.module.Class"), never imported:
a layer matches when its class's ``__module__`` and ``__qualname__`` spell that name,
so convert recognizes torchvision's and timm's classes when a model holds them and
costs nothing (no import) when it does not. Types registered as classes match by
identity. Either way the match is on the exact type: a subclass may compute
something else, so it needs a rule of its own.
"""
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from torch import nn

KINDS = ("norm", "conv")


@dataclass(frozen=True)
class NormSpec:
    """What convert asks of one norm layer's replacement (the ``spec`` a norm rule's
    ``build(layer, spec)`` gets)."""

    norm: str                     # "bcn" (BatchChannelNorm) or "gn" (wsbcn.GroupNorm)
    num_groups: int               # convert's num_groups= (a rule may keep the layer's own count)
    estimate: bool                # BatchChannelNorm's micro-batch mode
    activation: Optional[str]     # a following "relu"/"silu" that convert fuses into this layer, or None
    dims: int                     # spatial dims: of the convolution feeding the layer, else the rule's default
    process_group: Any = None

    def groups_for(self, channels: int) -> int:
        """num_groups, or the largest count that divides both it and ``channels``
        (BCN and GroupNorm need equal groups; convert's summary reports the change)."""
        return math.gcd(channels, self.num_groups)


def _default_channels(layer) -> int:
    for name in ("num_features", "num_channels", "out_channels"):
        value = getattr(layer, name, None)
        if isinstance(value, int):
            return value
    weight = getattr(layer, "weight", None)
    if weight is not None:
        return weight.shape[0]
    raise TypeError(f"cannot tell how many channels a {type(layer).__name__} has: give its rule channels=")


@dataclass(frozen=True)
class ConvertRule:
    """How one source layer type becomes a wsbcn layer.

    kind: "norm" or "conv".
    build: norm rules ``build(layer, spec: NormSpec) -> nn.Module``; conv rules
        ``build(layer) -> nn.Module``. Must not modify ``layer`` (a failed convert
        leaves the model as it was only if no rule wrote to it).
    becomes, carries, fuses: the docs' table columns (what the layer becomes, which
        parameters/buffers carry over, which activation fuses).
    channels: the layer's channel count (norm: C, conv: out_channels); the built
        layer must have the same. Default: num_features / num_channels / out_channels.
    frozen: a layer with fixed statistics and affine (FrozenBatchNorm2d); kept as it is,
        and the convolution feeding it not standardized, under ``keep_frozen=True``.
    needs_norm: conv only: standardize it only when its output feeds a norm (WS without
        a norm after it hurts); False for layers already weight-standardized.
    takes_activation: norm only: whether a following ReLU/SiLU may be fused into the
        built layer (False when the layer applies something of its own after the norm).
    keeps_groups: norm only: the layer keeps its own group count (a GroupNorm source),
        so convert's num_groups does not apply and no adjustment is reported.
    default_dims: norm only: spatial dims when no convolution feeds it; None for a layer
        that takes inputs of any rank (nn.GroupNorm): then the dims of the convolution
        convert finds around it in the traced graph (convert_rank.py); else it is left
        alone, with the reason.
    norm_inside: conv only: ``(norm attribute, activation attribute)`` of a layer that
        applies its own norm, then its own activation (a module, a function or None), to
        the convolution's output (detectron2's ``Conv2d``). Convert plans that norm as the
        one the conv feeds, under the conv's path (``conv.norm``); the built conv keeps
        both attributes (the norm is then swapped inside it), and a ReLU/SiLU activation
        is fused into a converted norm when the conv is converted too.
    skip: ``skip(layer) -> reason or None``: leave this instance alone, for that reason.
    synchronizes: norm only: the BatchChannelNorm it builds combines statistics across
        processes whatever convert's ``process_group`` (nn.SyncBatchNorm), so, as one built
        with ``process_group``, it needs the layer's running statistics.
    """

    kind: str
    build: Callable[..., nn.Module]
    becomes: str = ""
    carries: str = ""
    fuses: str = "-"
    channels: Callable[[nn.Module], int] = _default_channels
    frozen: bool = False
    needs_norm: bool = True
    takes_activation: Callable[[nn.Module], bool] = field(default=lambda layer: True)
    keeps_groups: bool = False
    default_dims: Optional[int] = 2
    norm_inside: Optional[Tuple[str, str]] = None
    skip: Optional[Callable[[nn.Module], Optional[str]]] = None
    synchronizes: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"ConvertRule kind must be one of {KINDS}, got {self.kind!r}")
        for name in ("build", "channels", "takes_activation"):
            if not callable(getattr(self, name)):
                raise TypeError(f"ConvertRule {name} must be callable, got {type(getattr(self, name)).__name__}")
        if self.skip is not None and not callable(self.skip):
            raise TypeError(f"ConvertRule skip must be callable or None, got {type(self.skip).__name__}")
        if self.default_dims not in (None, 1, 2, 3):
            raise ValueError(f"ConvertRule default_dims must be None, 1, 2 or 3, got {self.default_dims!r}")
        inside = self.norm_inside
        if inside is not None and (self.kind != "conv" or not isinstance(inside, tuple) or len(inside) != 2
                                   or not all(isinstance(name, str) for name in inside)):
            raise ValueError("ConvertRule norm_inside must be None or, for a conv rule, a (norm attribute, "
                             f"activation attribute) pair of strings, got {inside!r}")


LayerType = Union[type, str]
_by_class: Dict[type, ConvertRule] = {}
_by_name: Dict[str, ConvertRule] = {}
_order: List[Tuple[str, ConvertRule]] = []  # registration order, for the docs' table


def type_name(cls: type) -> str:
    """"module.Qualname": the key a class registered by name is matched with."""
    return f"{cls.__module__}.{cls.__qualname__}"


def _key(layer_type: LayerType):
    if isinstance(layer_type, type):
        if not issubclass(layer_type, nn.Module):
            raise TypeError(f"layer_type must be an nn.Module subclass, got {layer_type.__name__}")
        return layer_type
    if isinstance(layer_type, str):
        module, _, name = layer_type.rpartition(".")
        if not module or not name:
            raise ValueError(f"layer_type given by name must be 'package.module.Class', got {layer_type!r}")
        return layer_type
    raise TypeError(f"layer_type must be an nn.Module class or a 'package.module.Class' string, "
                    f"got {type(layer_type).__name__}")


def register_convert_rule(layer_type: LayerType, rule: ConvertRule, replace: bool = False) -> None:
    """Teach ``wsbcn.convert`` a layer type.

    ``layer_type``: the class, or its "package.module.Class" name (matched without
    importing the package). ``rule``: a ``ConvertRule``, e.g. one of the built-in rules
    (``convert_rule_for("torchvision.ops.misc.FrozenBatchNorm2d")``) for a layer that
    computes the same. ``replace=True`` overrides an existing rule.
    """
    key = _key(layer_type)
    if not isinstance(rule, ConvertRule):
        raise TypeError(f"rule must be a ConvertRule, got {type(rule).__name__}")
    table = _by_class if isinstance(key, type) else _by_name
    if key in table and not replace:
        raise ValueError(f"{_label(key)} already has a convert rule; pass replace=True to override it")
    table[key] = rule
    label = _label(key)
    _order[:] = [(k, r) for k, r in _order if k != label] + [(label, rule)]


def unregister_convert_rule(layer_type: LayerType) -> None:
    """Forget the rule for ``layer_type`` (its layers are then left alone, and reported)."""
    key = _key(layer_type)
    table = _by_class if isinstance(key, type) else _by_name
    if key not in table:
        raise KeyError(f"{_label(key)} has no convert rule")
    del table[key]
    _order[:] = [(k, r) for k, r in _order if k != _label(key)]


def _label(key) -> str:
    return type_name(key) if isinstance(key, type) else key


def convert_rule_for(layer: Union[nn.Module, LayerType]) -> Optional[ConvertRule]:
    """The rule for a layer (or a layer type, or a registered name), or None."""
    if isinstance(layer, str):
        return _by_name.get(layer)
    cls = layer if isinstance(layer, type) else type(layer)
    rule = _by_class.get(cls)
    return rule if rule is not None else _by_name.get(type_name(cls))


def convert_rules() -> List[Tuple[str, ConvertRule]]:
    """(type name, rule) for every registered type, in registration order."""
    return list(_order)


def convert_rules_table() -> str:
    """The rules as a markdown table (docs/convert.md holds it; a test keeps them equal).
    Types with the same columns share a row."""
    rows: Dict[tuple, List[str]] = {}
    for name, rule in _order:
        short = name.rpartition(".")[2]
        if not name.startswith("torch.nn."):
            short = f"{short} ({name.split('.')[0]})"
        rows.setdefault((rule.kind, rule.becomes, rule.carries, rule.fuses), []).append(short)
    lines = ["| source layer | becomes | carries over | activation fused |", "|---|---|---|---|"]
    for (_, becomes, carries, fuses), names in rows.items():
        lines.append(f"| {', '.join(dict.fromkeys(names))} | {becomes} | {carries} | {fuses} |")
    return "\n".join(lines)
