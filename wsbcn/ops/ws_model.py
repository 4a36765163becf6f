"""Model-wide Weight Standardization: every WSConv weight of a model in one launch
forward and one launch backward (per dtype and device), like fused optimizers.

    standardizer = wsbcn.ModelWeightStandardizer(model)   # or wsbcn.convert(model, ws="model")
    loss = model(x).sum()   # a forward pre-hook standardizes every WSConv weight at once;
    loss.backward()         # each WSConv takes its W_hat; one backward launch for all

Bitwise the same W_hat and weight gradients as per-layer WS (kernels/ws_multi.py
computes each row exactly as the per-layer kernels do). The cost: the one backward
launch runs when autograd has the gradients of every W_hat, i.e. when the backward
reaches the first conv, so every WS weight's gradient becomes ready at the end of
the backward, which delays DDP's bucketed all-reduce of those weights (README).

What runs where:
- eager, Triton: one ``WSMultiPlan`` per pack (dtype, device): 1 forward and 1
  backward launch (more only for a looping weight whose BLOCK is not the pack's,
  which the GPU plans never give);
- the torch backend (CPU, float64), empty weights and weights whose rows are not
  dense: the per-layer op body of each weight (ops/ws.py ``_Call``), bitwise the
  per-layer result by construction, inside the same autograd Function;
- torch.compile / export: the ``wsbcn::ws_model_forward`` / ``ws_model_backward``
  ops (torch.library triton_ops over lists of weights), traced into (the weights
  packed by one torch.cat, then the same kernels through ``wrap_triton``) or opaque
  under the Triton interpreter and at symbolic shapes, as the per-layer ops are
  (ops/library.py); torch-backend weights take the per-layer ops.

The module side: ``ModelWeightStandardizer(model)`` registers a forward pre-hook on
``model`` that standardizes the weights of its WSConv layers and hands each layer its
W_hat for this forward; a layer takes it once (a second call in the same forward
standardizes per layer again, so gradients accumulate as per-layer WS's do), and the
hand-over ends with the forward (a forward hook), so a W_hat is never reused.
Layers not called in a forward had their W_hat computed and ignored; their weights
get no gradient (None), as with per-layer WS, DDP with find_unused_parameters=True
included: though the one node holds every weight, DDP trains such a model as it trains
per-layer WS (tests/test_distributed.py, gloo).
One exception: a torch.compile'd graph hands an autograd.Function zeros for the
gradient of an output it did not use, so there such a weight gets a zero gradient.
"""
import copy
import itertools
import operator
import weakref

import torch

from .. import _compat, backends, checks, tuning
from ..backends.torch_closed_form import ws_backward_torch, ws_forward_torch
from ..kernels.layout import with_strides
from ..kernels.ws_multi_plan import PackLayout, WSMultiPlan
from . import library
from .ws import _Call, row_dense, weight_standardize

_data_ptr = torch.Tensor.data_ptr


def _layout_check(weights):
    """A test of whether weights keep the sizes and strides (and dtypes, devices) of
    ``weights``: one TensorGuards over each weight object once (the guard fails a tensor
    given twice, and tied weights are), else, where torch has no TensorGuards, their
    (sizes, strides) compared."""
    first = {}
    for i, w in enumerate(weights):
        first.setdefault(id(w), i)
    once = None if len(first) == len(weights) else tuple(first.values())
    guard = _compat.tensor_guards(weights if once is None else [weights[i] for i in once])
    if guard is None:
        layout = [(w.shape, w.stride()) for w in weights]
        return lambda ws: [(w.shape, w.stride()) for w in ws] == layout
    if once is None:
        return lambda ws: guard.check(*ws)
    return lambda ws: guard.check(*[ws[i] for i in once])


_saved_hooks = _compat.top_saved_tensors_hooks  # None: no saved-tensor hooks active (wsbcn/_compat.py)
_is_contiguous = torch.Tensor.is_contiguous


def _has_none(values) -> bool:
    return not all(map(operator.is_not, values, itertools.repeat(None)))


# --- packs and plans ---------------------------------------------------------------

def _dense_stride(w):
    """The strides a row-dense weight has (its own), else the contiguous ones (the
    per-layer path standardizes a contiguous copy of such a weight)."""
    if row_dense(w) is w:
        return tuple(w.stride())
    stride, step = [], 1
    for size in reversed(w.shape):
        stride.append(step)
        step *= size
    return tuple(reversed(stride))


def _aligned(w) -> bool:
    """The weight's address is a whole number of elements (any two such weights of a
    dtype are a whole number of elements apart, as the kernels' offsets need)."""
    return w.data_ptr() % w.element_size() == 0


_plans: dict = {}


def multi_plan(weights, args, grouped=True):
    """The WSMultiPlan of a pack (``weights`` of one dtype and device, non-empty;
    ``args`` per weight (eps, correction, std_mode); ``grouped``: the flat layout, see
    PackLayout), cached on its signature and on everything the per-layer configs
    derive from."""
    w0 = weights[0]
    specs = tuple((tuple(w.shape), _dense_stride(w), *a) for w, a in zip(weights, args))
    key = (specs, w0.dtype, w0.device, grouped, tuning.config_for, tuning.generation(), backends.emulated_gpu())

    def build():
        configs = {"ws_fwd": [], "ws_bwd": []}
        for w in weights:
            shape = (w.shape[0], w.numel() // w.shape[0])
            for kernel, found in configs.items():
                found.append(tuning.config_for(kernel, w, shape))
        return WSMultiPlan(specs, w0.dtype, w0.device, configs["ws_fwd"], configs["ws_bwd"], grouped)

    return checks.cached(_plans, key, build)


def _pack_indices(weights):
    """Indices of the weights per (device, dtype), in order of first appearance."""
    packs = {}
    for i, w in enumerate(weights):
        packs.setdefault((w.device, w.dtype), []).append(i)
    return list(packs.values())


def _usable(w):
    """``w`` as the eager kernels take it: row dense, at a whole-element address."""
    w = row_dense(w)
    return w if _aligned(w) else w.clone()


def _zero_grads(grads, weights):
    return [torch.zeros_like(w) if g is None else g for g, w in zip(grads, weights)]


def _laid_out(grads, plan, weights):
    """``grads`` laid out as the weights (the kernels walk both with the weights'
    strides); a copy only for one that is not."""
    if plan.contiguous and all(map(_is_contiguous, grads)):
        return grads
    return [g if g.stride() == s else torch.empty_like(w).copy_(g) for g, s, w in zip(grads, plan.strides, weights)]


# --- the torch.library ops (torch.compile, export) ---------------------------------

def _layout(ws):
    """The flat layout of a pack in the ops' outputs (kernels/ws_multi_plan.py, not
    grouped): from shapes and strides only, so the caller's views match the op's body
    whatever path runs it."""
    return PackLayout([tuple(w.shape) for w in ws], [_dense_stride(w) for w in ws], grouped=False)


def _model_forward_impl(weights, eps, correction, std_mode, op=False):
    """The body of ``wsbcn::ws_model_forward``: per pack (weights of one device and
    dtype, in order of first appearance) one flat W_hat (``_layout``), then per pack
    its stats fp32 [3, rows]. Flat buffers, not views: an op's outputs may not alias
    one another; the caller makes the views (``ModelCall``)."""
    flats, stats = [], []
    for indices in _pack_indices(weights):
        ws = [weights[i] for i in indices]
        args = [(float(eps[i]), int(correction[i]), bool(std_mode[i])) for i in indices]
        if backends.backend_for(ws[0]) == "torch":  # the per-layer closed form, weight by weight
            found = [ws_forward_torch(row_dense(w), *a) for w, a in zip(ws, args)]
            flat, st = _layout(ws).pack([h for h, _ in found]), torch.cat([s for _, s in found], dim=1)
        elif op and library.symbolic(ws[0]):  # shapes only: the op stays opaque (library.py)
            flat = ws[0].new_empty((sum(w.numel() for w in ws),))
            st = ws[0].new_empty((3, sum(w.shape[0] for w in ws)), dtype=torch.float32)
        else:
            plan = multi_plan(ws, args, grouped=False)
            if op and not library.plain(ws[0]):
                flat, st = plan.forward_traced(ws)
            else:
                ws = [_usable(w) for w in ws]
                flat, st = plan.forward_flat(ws, tuple(map(_data_ptr, ws)))
        flats.append(flat)
        stats.append(st)
    return flats + stats


def _model_backward_impl(grads, weights, stats, op=False):
    """The body of ``wsbcn::ws_model_backward``: per pack one flat dW."""
    flats = []
    for indices, st in zip(_pack_indices(weights), stats):
        ws = [weights[i] for i in indices]
        gs = [grads[i] for i in indices]
        if backends.backend_for(ws[0]) == "torch":
            rows = list(itertools.accumulate([0] + [w.shape[0] for w in ws]))
            dws = [ws_backward_torch(g, row_dense(w), st[:, a:b]) for g, w, a, b in zip(gs, ws, rows, rows[1:])]
            flat = _layout(ws).pack(dws)
        elif op and library.symbolic(ws[0]):
            flat = ws[0].new_empty((sum(w.numel() for w in ws),))
        else:
            # eps, correction and the mode only enter the forward: any values give the
            # same backward launches (the backward reads no scalar of the plan)
            plan = multi_plan(ws, [(1e-5, 0, False)] * len(ws), grouped=False)
            if op and not library.plain(ws[0]):
                flat = plan.backward_traced(gs, ws, st)
            else:
                ws = [_usable(w) for w in ws]
                flat = plan.backward_flat(_laid_out(gs, plan, ws), ws, tuple(map(_data_ptr, ws)), st.contiguous())
        flats.append(flat)
    return flats


def _functionalize(decompose, mode, op, types, args, kwargs):
    """library._functionalize for ops whose first argument is a list of tensors."""
    t = args[0][0]
    if backends.backend_for(t) == "torch" or not (backends.interpreter_enabled() or library.symbolic(t)):
        return decompose(mode, op, types, args, kwargs)
    return mode.__torch_dispatch__(op, types, args, kwargs)


def _register(name, kernels):
    from .. import _compat

    def register(fn):
        op = torch.library.triton_op(name, mutates_args=())(fn)
        _compat.register_op_kernels(name, kernels())
        _compat.functionalize_rule(op, _functionalize)
        return op

    return register


def _kernels_fwd():
    from ..kernels import ws_multi
    return (ws_multi._ws_multi_fwd_kernel,)


def _kernels_bwd():
    from ..kernels import ws_multi
    return (ws_multi._ws_multi_bwd_kernel,)


@_register("wsbcn::ws_model_forward", _kernels_fwd)
def ws_model_forward_op(weights: list[torch.Tensor], eps: list[float], correction: list[int],
                        std_mode: list[bool]) -> list[torch.Tensor]:
    return _model_forward_impl(weights, eps, correction, std_mode, op=True)


@_register("wsbcn::ws_model_backward", _kernels_bwd)
def ws_model_backward_op(grads: list[torch.Tensor], weights: list[torch.Tensor],
                         stats: list[torch.Tensor]) -> list[torch.Tensor]:
    return _model_backward_impl(grads, weights, stats, op=True)


# --- the validated call and its autograd Function ------------------------------------

class ModelCall:
    """A validated list of weights with their (eps, correction, std_mode): how each is
    standardized (packs of the eager Triton path, the model op under compile, or a
    per-layer ``_Call``) and the plans. ``forward``/``backward`` are the bodies of
    ``ModelWeightStandardizeFunction``."""

    def __init__(self, weights, args):
        self.n = len(weights)
        self.args = [tuple(a) for a in args]
        self.compiling = torch.compiler.is_compiling()
        # ModelWeightStandardizeFunction.apply's C half, or None (wsbcn/_compat.py; under tracing)
        self.c_apply = None if self.compiling else _compat.function_c_apply(ModelWeightStandardizeFunction)
        self.packs = []  # eager: (indices, itemgetter, plan); compiling: [(indices, None, None)]
        self.singles = []  # (index, per-layer _Call)
        self.traced_layouts = []  # compiling: each op output's PackLayout, set by the forward
        multi = []
        for i, (w, a) in enumerate(zip(weights, self.args)):
            if backends.backend_for(w) == "triton" and w.shape[0] > 0 and (
                    self.compiling or (row_dense(w) is w and _aligned(w))):
                multi.append(i)
            else:
                self.singles.append((i, _Call(w, *a)))
        if self.compiling:
            if multi:
                self.packs.append((multi, operator.itemgetter(*multi), None))
        else:
            for pack in _pack_indices([weights[i] for i in multi]):
                indices = [multi[j] for j in pack]
                self.packs.append((indices, operator.itemgetter(*indices),
                                   multi_plan([weights[i] for i in indices], [self.args[i] for i in indices])))
        # eager, one pack of every weight in order: the Function's fast path
        self.whole = not self.compiling and len(self.packs) == 1 and not self.singles
        self.key = (tuning.config_for, tuning._generation[0], backends._emulated_gpu)  # what the plans derive from
        self.addresses = None  # the weights' data_ptr()s, when the caller has just read them (``whole`` only)
        self.last_addresses = None  # those the last forward used (``whole`` only)
        self.on_backward = None  # when the eager backward starts: a weak reference to the standardizer's _release
        self.same_layout = None  # the standardizer's layout check of these weights, when it made this call

    def current(self) -> bool:
        """False when a plan would now be built differently (a new tuned table, another
        config function, an emulated GPU turned on or off)."""
        return self.key == (tuning.config_for, tuning._generation[0], backends._emulated_gpu)

    def launches(self) -> tuple:
        """(forward, backward) launches of the eager Triton packs."""
        return (sum(len(p.fwd) for _, _, p in self.packs if p is not None),
                sum(len(p.bwd) for _, _, p in self.packs if p is not None))

    def forward(self, weights):
        """(W_hat of every weight, tensors the backward needs)."""
        if self.compiling:
            return self._forward_op(weights)
        if self.whole:
            addresses = self.addresses  # read by the caller just now, or None
            if addresses is None:
                addresses = tuple(map(_data_ptr, weights))
            self.addresses = None
            self.last_addresses = addresses
            found = self.packs[0][2].forward(weights, addresses)
            return found[0], (found[1],)
        outs = [None] * self.n
        saved = []
        for indices, pick, plan in self.packs:
            ws = pick(weights) if len(indices) > 1 else (weights[indices[0]],)
            found = plan.forward(ws, tuple(map(_data_ptr, ws)))
            for i, h in zip(indices, found[0]):
                outs[i] = h
            saved.append(found[1])
        for i, call in self.singles:
            outs[i], (w, st) = call.forward(weights[i])
            saved += [w, st]
        return tuple(outs), tuple(saved)

    def _forward_op(self, weights):
        outs = [None] * self.n
        saved = []
        # each op output's layout, kept for the backward: torch 2.14's dynamo refuses to
        # read strides while it traces an autograd.Function's backward
        self.traced_layouts = layouts = []
        for indices, pick, _ in self.packs:
            ws = [weights[i] for i in indices]
            eps, correction, std = (list(x) for x in zip(*[self.args[i] for i in indices]))
            found = ws_model_forward_op(ws, eps, correction, std)
            packs = _pack_indices(ws)
            for j, pack in enumerate(packs):
                layout = _layout([ws[k] for k in pack])
                layouts.append(layout)
                for k, h in zip(pack, layout.views(found[j])):
                    outs[indices[k]] = h
            saved += found[len(packs):]
        for i, call in self.singles:
            outs[i], (w, st) = call.forward(weights[i])
            saved += [w, st]
        return tuple(outs), tuple(saved)

    def as_planned(self, weights):
        """``weights`` laid out as the eager packs' plans walk them (the forward's strides):
        a copy of one whose layout changed since the forward."""
        if self.compiling:
            return weights
        weights = list(weights)
        for indices, _, plan in self.packs:
            for i, stride in zip(indices, plan.strides):
                w = weights[i]
                if w.stride() != stride:
                    weights[i] = with_strides(w, stride)
        return weights

    def backward(self, grads, weights, saved):
        """dW of every weight (None where its W_hat got no gradient)."""
        dws = [None] * self.n
        k = 0
        layouts = iter(self.traced_layouts) if self.compiling else None  # the traced forward's, in order
        for indices, pick, plan in self.packs:
            ws = pick(weights) if len(indices) > 1 else (weights[indices[0]],)
            n_stats = len(_pack_indices(ws)) if self.compiling else 1  # the op makes one per (device, dtype)
            stats = saved[k:k + n_stats]
            k += n_stats
            pack_layouts = [next(layouts) for _ in range(n_stats)] if self.compiling else None
            gs = pick(grads) if len(indices) > 1 else (grads[indices[0]],)
            if all(g is None for g in gs):
                continue
            gs = _zero_grads(gs, ws) if _has_none(gs) else gs
            if self.compiling:
                found = [None] * len(ws)
                flats = ws_model_backward_op(list(gs), list(ws), list(stats))
                for pack, flat, layout in zip(_pack_indices(ws), flats, pack_layouts):
                    for j, d in zip(pack, layout.views(flat)):
                        found[j] = d
            else:
                found = plan.backward(_laid_out(gs, plan, ws), ws, tuple(map(_data_ptr, ws)), stats[0])
            for i, d in zip(indices, found):
                if grads[i] is not None:
                    dws[i] = d
        for i, call in self.singles:
            w, st = saved[k], saved[k + 1]
            k += 2
            if grads[i] is not None:
                dws[i] = call.backward(grads[i], w, st)
        return dws

    def __call__(self, weights):
        if not self.compiling and not _compat.functorch_transforms_active():
            weights = tuple(map(_compat.unwrap_if_dead, weights))  # what the apply does first (wsbcn/_compat.py)
        return self.call_plain(weights)

    def call_plain(self, weights):
        """The call of weights that are no functorch wrappers (``__call__`` after it
        unwraps; ModelWeightStandardizer's validated weights): 53 unwraps cost ~14 µs."""
        transformed = _compat.functorch_transforms_active()
        if self.compiling and not transformed:  # dynamo knows ModelWeightStandardizeFunction.apply
            return ModelWeightStandardizeFunction.apply(self, *weights)
        if transformed or _compat.forward_ad_active():
            # torch.func.grad, vjp, jvp, ... (under torch.compile too: there in torch ops), or a
            # dual level: per weight (ops/ws.py), whose Functions push tangents (this one's
            # node holds every weight: it has no jvp)
            return tuple(_Call(w, *a)(w) for w, a in zip(weights, self.args))
        if not torch.is_grad_enabled():  # nothing for autograd to record: the op body alone
            return tuple(self.forward(weights)[0])
        if self.c_apply is None:
            return ModelWeightStandardizeFunction.apply(self, *weights)
        return self.c_apply(self, *weights)


class ModelWeightStandardizeFunction(torch.autograd.Function):
    """W_hat of many weights, one autograd node: its backward runs once autograd has
    the gradient of every W_hat that got one."""

    @staticmethod
    def forward(ctx, call, *weights):
        outs, saved = call.forward(weights)
        ctx.set_materialize_grads(False)
        ctx.call = call
        ctx.addresses = call.last_addresses if call.whole else None
        ctx.save_for_backward(*weights, *saved)
        # a frozen weight's W_hat needs no gradient, as per layer (else a frozen backbone's
        # features would require grad, and the backward would run through it)
        needs = ctx.needs_input_grad[1:]
        if not all(needs) and any(needs):
            ctx.mark_non_differentiable(*[h for h, needed in zip(outs, needs) if not needed])
        return outs

    @staticmethod
    def backward(ctx, *grads):
        call = ctx.call
        if torch.compiler.is_compiling() and not call.compiling and call.packs:
            # compiled autograd tracing the backward of an eager forward, whose packs (each with
            # its plan) launch directly: a graph break, and this backward eagerly
            return _model_backward_eagerly(ctx, *grads)
        return _model_backward(ctx, *grads)


def _model_backward(ctx, *grads):
    """ModelWeightStandardizeFunction's backward."""
    call = ctx.call
    release = call.on_backward and call.on_backward()
    if release is not None:
        release()
    saved = ctx.saved_tensors
    weights, rest = saved[:call.n], saved[call.n:]
    if torch.is_grad_enabled() or _compat.is_batched_gradient(next((g for g in grads if g is not None), None)):
        # create_graph=True or batched gradients (_compat.py): differentiable torch ops
        return (None, *_double_backward(call, weights, grads))
    if call.whole and not _has_none(grads):
        plan = call.packs[0][2]
        addresses = tuple(map(_data_ptr, weights))
        same = call.same_layout
        if addresses == ctx.addresses and (same(weights) if same is not None else all(
                w.stride() == st for w, st in zip(weights, plan.strides))):  # where and as the forward read them
            return (None, *plan.backward(_laid_out(grads, plan, weights), weights, addresses, rest[0]))
    # the saved weights moved since the forward (a saved-tensor hook such as save_on_cpu, a
    # reshard, a .data swap), maybe into another layout: the plans walk the forward's
    return (None, *call.backward(grads, call.as_planned(weights), rest))


_model_backward_eagerly = torch.compiler.disable(_model_backward)


def _double_backward(call, weights, grads):
    """dW of every weight as a differentiable graph: per weight, the per-layer double
    backward (ops/differentiable.py), whose W_hat in torch ops is the one per-layer WS
    differentiates. A weight that needs no gradient (a frozen one in the pack, whose
    W_hat got one through the shared node) is differentiated as a leaf of its own."""
    from . import differentiable

    out = []
    for w, g, a in zip(weights, grads, call.args):
        if g is None:
            out.append(None)
            continue
        leaf = w if w.requires_grad else w.detach().requires_grad_(True)
        out.append(differentiable.ws_double_backward(_Call(w, *a), leaf, g.to(w.dtype)))
    return out


# --- the functional API -----------------------------------------------------------

_cache = checks.CallCache()  # validated weight lists -> ModelCall (sites unused)


def _validate(weights, args) -> ModelCall:
    checked = []
    for w, (eps, correction, eps_mode) in zip(weights, args):
        eps, correction = checks.check_ws_args(w, eps, correction, eps_mode)
        checked.append((eps, correction, eps_mode == "std"))
    return ModelCall(weights, checked)


def _per_weight(value, n, name):
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name}: {len(value)} values for {n} weights")
        return list(value)
    return [value] * n


def weight_standardize_all(weights, eps=1e-5, correction=0, eps_mode="var") -> tuple:
    """``wsbcn.functional.weight_standardize`` of every tensor in ``weights`` at once:
    one launch forward and one backward per (dtype, device) on the Triton path,
    bitwise the per-weight results. ``eps``, ``correction`` and ``eps_mode``: one value
    for all, or a list with one per weight. Returns a tuple of W_hat."""
    weights = list(weights)
    if not weights:
        return ()
    n = len(weights)
    args = list(zip(_per_weight(eps, n, "eps"), _per_weight(correction, n, "correction"),
                    _per_weight(eps_mode, n, "eps_mode")))
    if _compat.functorch_transforms_active():  # torch.func.grad, vjp, ...: wrappers have no address
        return tuple(weight_standardize(w, *a) for w, a in zip(weights, args))
    compiling = torch.compiler.is_compiling()
    if not compiling:  # a dead functorch wrapper becomes its tensor first (wsbcn/_compat.py), as the apply does
        weights = [_compat.unwrap_if_dead(w) if isinstance(w, torch.Tensor) else w for w in weights]
    key = None  # not cached under torch.compile (dynamo traces the checks), nor for non-tensors
    if not compiling and all(isinstance(w, torch.Tensor) for w in weights):
        key = tuple((w.shape, w.stride(), w.dtype, w.device, _aligned(w), a, type(a[0]), type(a[1]))
                    for w, a in zip(weights, args))
    call = checks.validated(_cache, key, lambda: _validate(weights, args))
    if not call.current():
        _cache.calls.pop(key, None)
        call = checks.validated(_cache, key, lambda: _validate(weights, args))
    return call.call_plain(weights)


# --- the module side ---------------------------------------------------------------

def _freed():  # the model reference of a standardizer copied after its model was freed
    return None


def _conv_weight_shape(conv) -> tuple:
    return (conv.out_channels, conv.in_channels // conv.groups, *conv.kernel_size)


class ModelWeightStandardizer:
    """Standardizes every WSConv weight of ``model`` at once on each forward of
    ``model`` and hands each WSConv its W_hat (see the module docstring).

    ``model``: the module whose forward runs the layers (the hooks go on it);
    ``modules``: the WSConv layers to cover (default: every WSConv in ``model`` whose
    weight is a plain Parameter; a parametrized weight stays per layer). ``remove()``
    detaches it. The layers' eps, correction and eps_mode are read when it attaches
    and checked when a layer takes its W_hat: a layer changed since takes the
    per-layer path for that forward, and the next forward reads them again."""

    def __init__(self, model: torch.nn.Module, modules=None):
        from ..modules.ws_conv import _WSConvMixin

        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if modules is None:
            modules = [m for m in model.modules() if isinstance(m, _WSConvMixin)]
        for m in modules:
            if not isinstance(m, _WSConvMixin):
                raise TypeError(f"not a WSConv layer: {type(m).__name__}")
            previous = m._ws_model
            if previous is not None and previous is not self:
                raise ValueError(f"{type(m).__name__} already has a ModelWeightStandardizer: remove() it first")
        # weak references back (the model's hooks and the layers hold the standardizer), so
        # that ``del model`` frees the model, its layers and the standardizer at once
        self._model = weakref.ref(model)
        self._all = list(modules)
        self._hats = None  # W_hat per layer while a forward of ``model`` runs
        self._taken_from = None  # the weights they were computed from
        # the W_hat each layer took with gradients on under saved-tensor hooks: kept from the
        # forward until the model's backward reaches the standardizer, for checkpoint's
        # recompute (retake)
        self._kept = None
        self._call = None
        self._convs = []
        self._refresh()
        self._handles = (model.register_forward_pre_hook(self._before),
                         model.register_forward_hook(self._after, always_call=True))

    def _refresh(self):
        """Read the layers again: which are covered, their parameters and arguments."""
        for m in self._convs:
            m.__dict__.pop("_ws_model_ref", None)
        # a Parameter weight (a parametrized one is computed per forward: per layer), and
        # full WS (a layer that only centers, ``standardize="center"``, stays per layer)
        self._convs = [m for m in self._all if isinstance(m._parameters.get("weight"), torch.Tensor)
                       and getattr(m, "standardize", "full") == "full"]
        self._link_layers()
        self._args = [(m.eps, m.correction, m.eps_mode) for m in self._convs]
        self._checked = [(a[0], a[1], a[2] == "std") for a in self._args]
        self._weights = None
        self._addresses = None
        self._stale = False

    @classmethod
    def attach(cls, model: torch.nn.Module) -> "ModelWeightStandardizer":
        """The standardizer of every WSConv in ``model``: the one already attached to
        ``model`` when it covers them all, else a new one (standardizers attached
        elsewhere to these layers are removed first). ``wsbcn.convert(ws="model")``."""
        from ..modules.ws_conv import _WSConvMixin

        convs = [m for m in model.modules() if isinstance(m, _WSConvMixin)]
        found = {id(m._ws_model): m._ws_model for m in convs if m._ws_model is not None}
        if len(found) == 1:
            existing = next(iter(found.values()))
            if existing.model is model and set(map(id, existing._all)) == set(map(id, convs)):
                return existing
        for standardizer in found.values():
            standardizer.remove()
        return cls(model, convs)

    def __getstate__(self):  # deepcopy and pickle: the validated call and plans are rebuilt on use
        state = dict(self.__dict__)
        model = self.model  # the model itself (a copy's is the copied model)
        state.update(_call=None, _weights=None, _addresses=None, _hats=None, _taken_from=None,
                     _kept=None, _model=model)
        state.pop("_owned_model", None)
        if model is None:  # freed, and its hooks with it (torch's handles cannot copy a dead hook dict)
            state["_handles"] = ()
        return state

    def __setstate__(self, state):  # pickle: the layers' link back (their own state leaves it out)
        state = dict(state)
        model = state.pop("_model", state.pop("model", None))  # (older pickles hold "model")
        self.__dict__.update(state)
        self._model = _freed if model is None else weakref.ref(model)
        self._link_layers()

    def __copy__(self):
        """A shallow copy, linked to nothing: the layers stay with this standardizer."""
        new = type(self).__new__(type(self))
        new.__dict__.update(self.__getstate__(), _model=self._model)
        return new

    def __deepcopy__(self, memo):
        """A copy of the model copies its standardizer (through its hooks), which links
        the copied layers to the copy. A layer's own state leaves its standardizer out
        (``_WSConvMixin.__getstate__``): a copy of some layers alone
        (``copy.deepcopy(model.head)``, whichever it reaches first) standardizes per
        layer and may join another standardizer, with no copy of the whole model."""
        new = memo[id(self)] = type(self).__new__(type(self))
        model = self.model
        alone = model is not None and id(model) not in memo  # the copy starts here, not at the model
        new.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        if alone:  # nothing else holds the copied model: this copy does (a cycle, as before)
            new._owned_model = new.model
        return new

    def _link_layers(self):
        link = weakref.ref(self)
        for i, m in enumerate(self._convs):
            m.__dict__["_ws_model_ref"], m.__dict__["_ws_model_index"] = link, i

    @property
    def model(self) -> torch.nn.Module:
        """The module whose forward hooks standardize the layers (None once it is freed)."""
        return self._model()

    @property
    def layers(self) -> list:
        """The WSConv layers standardized model-wide."""
        return list(self._convs)

    def remove(self):
        """Detach: the hooks go, and every layer standardizes its own weight again."""
        for h in self._handles:
            h.remove()
        for m in self._convs:
            m.__dict__.pop("_ws_model_ref", None)
            m.__dict__.pop("_ws_model_index", None)
        self._convs, self._hats, self._kept = [], None, None

    def _weights_now(self):
        try:
            return [m._parameters["weight"] for m in self._convs]
        except KeyError:  # a weight was parametrized or removed since: those layers leave
            self._refresh()
            return [m._parameters["weight"] for m in self._convs]

    def _call_for(self, weights):
        """The validated call for ``weights``: kept while the Parameter objects, their
        addresses and what the plans derive from stay the same (a change of shape,
        dtype or device moves a weight). None when a weight is a functorch wrapper (one
        that outlived its transform, left in ``_parameters``): the layers then
        standardize per layer for this forward, which unwraps it. None too for a tensor
        subclass: FSDP2's ``fully_shard`` keeps each weight as a sharded DTensor
        between forwards and hands the layer a whole one only in its own forward, so a
        pack made here would standardize shards that no layer takes; and for a weight not
        of its conv's shape, as the flat 1-D shards FSDP's FullyShardedDataParallel keeps
        (use_orig_params=True). None under a FakeTensorMode, whose allocations are fake."""
        if torch.compiler.is_compiling():
            return ModelCall(weights, self._checked)
        if _compat.fake_mode_active():  # shape propagation: per layer, in the closed form (ops/ws.py)
            return None
        call, known = self._call, self._weights
        if (call is not None and known is not None and len(known) == len(weights)
                and all(map(operator.is_, weights, known))):  # the validated objects: plain tensors
            addresses = tuple(map(_data_ptr, weights))
            if addresses == self._addresses and call.same_layout(weights) and call.current():
                call.addresses = addresses
                return call
        if not all(type(w) is torch.nn.Parameter or type(w) is torch.Tensor for w in weights):
            return None
        if any(w.shape != _conv_weight_shape(m) or w.is_neg() for m, w in zip(self._convs, weights)):
            # FSDP's FullyShardedDataParallel: a flat shard until the layer's own forward gathers it; a
            # negated view (Tensor.is_neg()), which the layer's call materializes
            return None
        wrapped = _compat.is_functorch_wrapped
        if wrapped is not None and any(map(wrapped, weights)):
            return None
        addresses = tuple(map(_data_ptr, weights))
        for m, w in zip(self._convs, weights):
            checks.check_ws_args(w, m.eps, m.correction, m.eps_mode)
        self._call = call = ModelCall(weights, self._checked)
        call.on_backward = weakref.WeakMethod(self._release)  # the call is the standardizer's
        # a ``weight.data = w.transpose(2, 3)`` keeps the Parameter object and its address,
        # not its layout: the validated call holds while the layout does too (and its
        # backward's fast path)
        call.same_layout = _layout_check(weights)
        self._weights, self._addresses = weights, addresses
        call.addresses = addresses
        return call

    def _before(self, module, args):
        if torch.is_grad_enabled():  # a new forward: what the last one kept is no longer recomputed
            self._kept = None  # (a forward without gradients records nothing a checkpoint recomputes)
        if self._stale:
            self._refresh()
        if not self._convs:
            return
        checks.refuse_jit_trace()  # a recorded forward would keep every W_hat as a constant
        weights = self._weights_now()
        call = self._call_for(weights)
        if call is None:  # a functorch wrapper or a DTensor among the weights: every layer per layer
            return
        # where torch can tell a functorch wrapper, _call_for returned none for weights with
        # one, and a tensor object never becomes one: no unwrap (wsbcn/_compat.py)
        self._hats = list((call.call_plain if _compat.is_functorch_wrapped is not None else call)(weights))
        self._taken_from = weights

    def _after(self, module, args, output):
        self._hats = self._taken_from = None

    def take(self, conv, weight):
        """The W_hat computed for ``conv`` in this forward (once), or None: outside a
        forward of the model, on a second call, or when the layer's weight or arguments
        changed since (then it standardizes per layer). During a backward, the W_hat the
        layer took in a non-reentrant checkpoint's forward (``retake``)."""
        hats = self._hats
        if hats is None:
            return self.retake(conv, weight) if self._kept is not None else None
        i = conv._ws_model_index
        w_hat = hats[i]
        if w_hat is None:
            return None
        hats[i] = None
        if self._taken_from[i] is not weight:
            return None
        if (conv.eps, conv.correction, conv.eps_mode) != self._args[i]:
            self._stale = True
            return None
        if not torch.compiler.is_compiling() and _saved_hooks(False) is not None and torch.is_grad_enabled():
            # under saved-tensor hooks (a non-reentrant checkpoint): for its recompute
            kept = self._kept
            if kept is None:
                kept = self._kept = [None] * len(hats)
            kept[i] = (w_hat, weight)
        return w_hat

    def retake(self, conv, weight):
        """For torch.utils.checkpoint's recompute (a forward during a backward,
        ``_compat.in_backward``): the very W_hat ``conv`` took in the forward, with
        gradients on under the checkpoint's saved-tensor hooks, once, so that the
        recompute saves for the backward what the forward saved (the non-reentrant
        checkpoint checks that; per layer, the layer would save its weight first). A layer
        that took its W_hat with gradients off (a reentrant checkpoint's forward, whose
        recompute autograd differentiates) takes none: it standardizes per layer, and its
        gradient reaches its weight that way."""
        if not _compat.in_backward():
            return None
        i = conv._ws_model_index
        kept = self._kept[i]
        if kept is None or kept[1] is not weight or (conv.eps, conv.correction, conv.eps_mode) != self._args[i]:
            return None  # (the weight it was computed from: a compiled forward validates none, _weights)
        w_hat = kept[0]
        self._kept[i] = None
        return w_hat

    def _release(self):
        """The model's backward reached the standardizer: every recompute is done."""
        self._kept = None


# the hooks and the layers' take: run eagerly where dynamo starts a frame (_compat.py)
_compat.eager_when_a_frame(ModelWeightStandardizer._before, ModelWeightStandardizer._after,
                           ModelWeightStandardizer.take)
