"""Which activations ``wsbcn.convert`` fuses into the norm before them, and why not the rest.

A fused activation becomes the norm's ``activation=`` and its module is replaced by
``nn.Identity``, as ``torch.ao.quantization.fuse_modules`` does: the model keeps its own
class, methods and forward code, so whatever the forward decides when it runs (a
``self.training`` branch, ``F.dropout(training=self.training)``, a checkpointing flag
set later) still decides. convert never rewrites a forward. So an activation fuses
only where replacing its module changes nothing else:

- it is a module call (a function call in a forward, ``F.relu(x)``, would need the
  forward rewritten);
- every call of that module object takes the output of a norm being converted, which
  feeds nothing else (a module shared with other inputs, like the one ReLU of
  torchvision's ResNet blocks that also follows the residual addition, must keep
  acting there);
- that holds in the forward traced in the model's current mode and in train and in
  eval mode (a forward may call its modules differently in each);
- no module whose forward is not traced (an fx leaf) holds it.
"""
from typing import Dict, List, Tuple

import torch.fx as fx
from torch import nn


def module_paths(model: nn.Module) -> Dict[int, List[str]]:
    """id of each module -> every path it is registered at (a shared module has several)."""
    paths: Dict[int, List[str]] = {}
    for path, m in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(m), []).append(path)
    return paths


def traces_in_modes(model: nn.Module, trace) -> List[Tuple[str, object]]:
    """(mode, graph or the exception raised) of ``trace()`` with every module in train
    mode and in eval mode, as ``model.train(...)`` sets them (an override that keeps some
    layers frozen counts); a state the current one already is, or another traced one,
    is not traced again. The modules' training flags are restored afterwards."""
    modules = list(model.modules())
    saved = [m.training for m in modules]
    seen, found = {tuple(saved)}, []
    try:
        for mode, training in (("train", True), ("eval", False)):
            model.train(training)
            state = tuple(m.training for m in modules)
            if state in seen:
                continue
            seen.add(state)
            try:
                found.append((mode, trace()))
            except Exception as exc:  # noqa: BLE001  (tracing fails on data-dependent control flow)
                found.append((mode, exc))
    finally:
        for m, training in zip(modules, saved):
            m.training = training
    return found


def _unsafe(graph, pairs, modules, act_module, act_paths, norm_paths, mode) -> str:
    """Why replacing ``act_module`` (fused after the norms at ``norm_paths``) is unsafe
    in ``graph``, the forward in ``mode`` ("" for the current one), or "" when it is safe
    there. ``pairs``: the (norm path, activation path) fusions that graph allows."""
    where = f" in {mode} mode" if mode else ""
    for norm_path in norm_paths:
        if not any((norm_path, p) in pairs for p in act_paths):
            return f"the forward{where} does not feed {norm_path}'s output to {act_paths[0]} alone"
    for node in graph.nodes:
        if node.op == "call_module" and modules.get(node.target) is act_module:
            source = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
            if source is None or (source.target, node.target) not in pairs:
                return (f"{node.target} is also called{where} on other inputs, which must keep their "
                        f"{type(act_module).__name__}")
    leaves = {n.target for n in graph.nodes if n.op == "call_module"}
    for path in act_paths:
        holder = next((t for t in leaves if path.startswith(t + ".")), None)
        if holder is not None:
            return f"{holder}, whose forward is not traced, holds it as {path}"
    return ""


def checked_fusions(model, fusions, graph, other_graphs, pairs_of) -> Tuple[list, List[str]]:
    """The fusions (norm node, activation node, act) of ``graph`` that are safe (see the
    module docstring), each with the activation module to replace, and a line for each
    one that is not, saying why. The fusions of one activation module are kept or left
    together: its module is replaced for all of them or for none. ``other_graphs``:
    ``traces_in_modes``'s; ``pairs_of(g)``: the (norm path, activation path) pairs that
    graph ``g`` would fuse."""
    modules = dict(model.named_modules())
    paths = module_paths(model)
    traced = [("", graph, pairs_of(graph))] + [
        (mode, g, None if isinstance(g, Exception) else pairs_of(g)) for mode, g in other_graphs]
    by_module: Dict[int, list] = {}
    why: Dict[int, str] = {}
    for fusion in fusions:
        _, act_node, act = fusion
        if act_node.op == "call_module":
            by_module.setdefault(id(modules[act_node.target]), []).append(fusion)
        else:
            name = getattr(act_node.target, "__name__", str(act_node.target))
            why[id(fusion)] = (f"it is a function call ({name}) in a forward, which convert does not rewrite "
                               f"(an nn.{'ReLU' if act == 'relu' else 'SiLU'} module there would fuse)")
            by_module[id(fusion)] = [fusion]
    for key, group in by_module.items():
        if key in why:
            continue
        act_module = modules[group[0][1].target]
        norm_paths = [norm_node.target for norm_node, _, _ in group]
        for mode, g, pairs in traced:
            if pairs is None:
                why[key] = f"torch.fx could not trace the forward in {mode} mode ({type(g).__name__}: {g})"
            else:
                why[key] = _unsafe(g, pairs, modules, act_module, paths[id(act_module)], norm_paths, mode)
            if why[key]:
                break
    safe, lines = [], []
    for key, group in by_module.items():
        for norm_node, act_node, act in group:
            if why[key]:
                lines.append(f"{norm_node.target}: the following {act} not fused: {why[key]}")
            else:
                safe.append((norm_node, act_node, act, modules[act_node.target]))
    return safe, lines


def replace_activations(model, safe, done: list) -> None:
    """Replace each fused activation module of ``safe``, at every path it is registered
    at, by one nn.Identity; appends (parent, name, old module) to ``done`` per swap, to
    undo them."""
    replaced = set()
    paths = module_paths(model)
    for _, _, _, act_module in safe:
        if id(act_module) in replaced:
            continue
        replaced.add(id(act_module))
        identity = nn.Identity()
        identity.train(act_module.training)
        for path in paths[id(act_module)]:
            parent_path, _, name = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            setattr(parent, name, identity)
            done.append((parent, name, act_module))
