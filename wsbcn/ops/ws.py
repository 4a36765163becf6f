"""Weight Standardization: validation, the autograd Function, the ``wsbcn::ws_*`` ops
and the functional API.

    W_hat = (W - mean) / D   per output channel, over its fan-in
    eps_mode="var": D = sqrt(var + eps)       (the paper, timm, BiT)
    eps_mode="std": D = std + eps              (the authors' released code, mmcv)
    var = sum((W - mean)^2) / (fan_in - correction)

Backward (g = dL/dW_hat):  dW = (g - mean(g)) / D - k * W_hat * sum(g * W_hat)
with k = 1 / (D (fan_in - correction)) for "var" and k = 1 / (std (fan_in - correction))
for "std" (0 for a constant filter, whose std has no spread to undo).

standardize="center" (centering only, the paper's ablation of WS):
    W_hat = W - mean,  dW = g - mean(g)   (eps, correction and eps_mode unused)
"""
import torch

from .. import _compat, backends, checks, tuning
from ..backends.torch_closed_form import acc_dtype, ws_backward_torch, ws_forward_torch
from ..kernels import ws as kernels
from ..kernels.ws_plan import WSPlan
from . import library


def row_dense(w: torch.Tensor) -> torch.Tensor:
    """``w`` itself when each output channel's fan-in is one dense block in memory
    (contiguous, channels_last, ...), else a contiguous copy."""
    if w.is_contiguous():
        return w
    if torch.compiler.is_compiling():  # strides may be symbolic, which dynamo cannot sort by
        cl = {4: torch.channels_last, 5: torch.channels_last_3d}.get(w.dim())
        return w if cl is not None and w.is_contiguous(memory_format=cl) else w.contiguous()
    order = sorted(range(1, w.dim()), key=lambda d: -w.stride(d))
    if w.permute(0, *order).is_contiguous():
        return w
    return w.contiguous()


def _ws_forward_impl(weight: torch.Tensor, eps: float, correction: int, std_mode: bool, center_only: bool = False,
                     op=False):
    """W_hat and its fp32 statistics on either backend: the eager body and, with
    ``op``, the body of the ``wsbcn::ws_forward`` op, traced by torch.compile and
    export (library.py)."""
    if weight.shape[0] == 0:
        return torch.empty_like(weight), weight.new_empty((3, 0), dtype=acc_dtype(weight.dtype))
    if backends.backend_for(weight) == "torch" or (not op and _compat.without_memory(weight)):  # (fake: see _Call)
        return ws_forward_torch(weight, eps, correction, std_mode, center_only)
    if op and library.symbolic(weight):  # shapes only: the op stays opaque (library.py)
        return torch.empty_like(weight), weight.new_empty((3, weight.shape[0]), dtype=torch.float32)
    plan = ws_plan(weight, eps, correction, std_mode, center_only)
    return plan.forward_traced(weight) if op and not library.plain(weight) else plan.forward(weight)


def _ws_backward_impl(grad: torch.Tensor, weight: torch.Tensor, stats: torch.Tensor, center_only: bool = False,
                      op=False):
    if weight.shape[0] == 0:
        return torch.zeros_like(weight)
    if backends.backend_for(weight) == "torch" or (
            not op and (_compat.without_memory(weight) or _compat.is_fake(stats) or _compat.is_fake(grad))):
        return ws_backward_torch(grad, weight, stats, center_only)
    # eps and correction only enter the forward: any values give the same backward launch
    if op and library.symbolic(weight):
        return torch.empty_like(weight)
    plan = ws_plan(weight, 1e-5, 0, False, center_only)
    if op and not library.plain(weight):
        return plan.backward_traced(grad, weight, stats.contiguous())
    return plan.backward(grad, weight, stats.contiguous())


_plans: dict = {}


def ws_plan(weight, eps, correction, std_mode, center_only=False):
    """The Triton launch plan (kernels/ws_plan.py) of a row-dense weight, cached on
    everything it derives from: the signature, the device (or emulated GPU), the
    tuned-config tables and the config function itself (tests replace it)."""
    key = (weight.shape, weight.stride(), weight.dtype, weight.device, eps, correction, std_mode, center_only,
           tuning.config_for, tuning.generation(), backends.emulated_gpu())

    def build():
        shape = (weight.shape[0], weight.numel() // weight.shape[0])
        return WSPlan(weight, eps, correction, std_mode,
                                                  tuning.config_for("ws_fwd", weight, shape),
                                                  tuning.config_for("ws_bwd", weight, shape), center_only)

    return checks.cached(_plans, key, build)


@library.triton_op("wsbcn::ws_forward", (), lambda: (kernels._ws_fwd_kernel,))
def ws_forward_op(weight: torch.Tensor, eps: float, correction: int, std_mode: bool,
                  center_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    return _ws_forward_impl(weight, eps, correction, std_mode, center_only, op=True)


@library.triton_op("wsbcn::ws_backward", (), lambda: (kernels._ws_bwd_kernel,))
def ws_backward_op(grad: torch.Tensor, weight: torch.Tensor, stats: torch.Tensor,
                   center_only: bool = False) -> torch.Tensor:
    return _ws_backward_impl(grad, weight, stats, center_only, op=True)


class _Call:
    """A validated weight signature, its backend and its launch plans (see
    checks.validated); ``forward``/``backward`` are the op bodies behind
    ``WeightStandardizeFunction``."""

    __slots__ = ("eps", "correction", "std_mode", "center_only", "eager", "plans", "untraced", "c_apply")

    def __init__(self, weight, eps, correction, std_mode, center_only=False):
        self.eps, self.correction, self.std_mode, self.center_only = eps, correction, std_mode, center_only
        # the eager Triton path takes non-empty weights whose rows are dense already; a
        # call built under torch.compile is never cached and takes the torch.library ops;
        # a fake tensor (outside compile) takes the closed form (the key holds its type), as a
        # call under a FakeTensorMode does (checked per call)
        self.eager = weight.shape[0] > 0 and row_dense(weight) is weight and not torch.compiler.is_compiling() \
            and not _compat.is_fake(weight)
        self.plans = {}
        # outside tracing (dynamo knows the Function's apply): the no-grad shortcut, and
        # WeightStandardizeFunction.apply's C half or None (wsbcn/_compat.py)
        self.untraced = not torch.compiler.is_compiling()
        self.c_apply = _compat.function_c_apply(WeightStandardizeFunction) if self.untraced else None

    def plan(self, weight):
        key = (tuning.config_for, tuning._generation[0], backends._emulated_gpu)  # what a plan derives from
        plan = self.plans.get(key)
        if plan is None:
            plan = self.plans[key] = ws_plan(weight, self.eps, self.correction, self.std_mode, self.center_only)
        return plan

    def forward(self, weight):
        """(W_hat, saved): the weight as the backward reads it (row dense) and its fp32
        statistics [3, O]."""
        if self.eager and backends.backend_for(weight) == "triton" and not (
                _compat.dispatch_modes() and _compat.fake_mode_active()):
            w_hat, stats = self.plan(weight).forward(weight)
            return w_hat, (weight, stats)
        weight = row_dense(weight)
        # Eager calls skip the op dispatcher (tens of microseconds a call); traced
        # calls go through it so torch.compile sees one opaque op.
        fwd = ws_forward_op if torch.compiler.is_compiling() else _ws_forward_impl
        w_hat, stats = fwd(weight, self.eps, self.correction, self.std_mode, self.center_only)
        return w_hat, (weight, stats)

    def backward(self, grad, weight, stats):
        # (statistics or a gradient of another type: fake ones, made under a FakeTensorMode)
        if self.eager and type(stats) is torch.Tensor and type(grad) is torch.Tensor and \
                backends.backend_for(weight) == "triton" and \
                not torch.compiler.is_compiling() and not (_compat.dispatch_modes() and _compat.fake_mode_active()):
            # (compiled autograd traces the op below; a saved-tensor hook may give stats back strided)
            return self.plan(weight).backward(grad, weight, stats.contiguous())
        bwd = ws_backward_op if torch.compiler.is_compiling() else _ws_backward_impl
        return bwd(grad, weight, stats, self.center_only)

    def in_torch_ops(self, weight):
        """W_hat in differentiable torch ops (ops/differentiable.py): the call under
        torch.func.vmap, and under any torch.func transform that torch.compile traces."""
        from . import differentiable
        return differentiable.ws_forward_differentiable(weight, self.eps, self.correction, self.std_mode,
                                                        self.center_only)

    def __call__(self, weight):
        if self.untraced and not _compat.functorch_transforms_active():
            weight = _compat.unwrap_if_dead(weight)  # what the apply does first (wsbcn/_compat.py)
        return self.call_plain(weight)

    def call_plain(self, weight):
        """The call of a weight that is no functorch wrapper: ``__call__`` after it
        unwraps, or a call ``checks.recalled`` found."""
        if not self.untraced:  # dynamo knows WeightStandardizeFunction.apply
            if _compat.functorch_transforms_active():  # torch.func under torch.compile: torch ops trace
                return self.in_torch_ops(weight)
            return WeightStandardizeFunction.apply(weight, self)
        if _compat.functorch_transforms_active():  # torch.func.grad, vjp, jvp, ...
            if _compat.vmap_active():  # torch.func.vmap, jacfwd, hessian, per-sample gradients: torch ops
                return self.in_torch_ops(weight)
            return FunctorchWeightStandardizeFunction.apply(weight, self)[0]
        if _compat.forward_ad_active():  # inside a dual level (torch.autograd.forward_ad), under no_grad too
            return DualWeightStandardizeFunction.apply(weight, self)
        if not torch.is_grad_enabled():  # nothing for autograd to record: the op body alone
            return self.forward(weight)[0]
        if self.c_apply is None:
            return WeightStandardizeFunction.apply(weight, self)
        return self.c_apply(weight, self)


class WeightStandardizeFunction(torch.autograd.Function):
    """Autograd for W_hat on every path (``_Call`` picks it); saves only W and three
    fp32 numbers per output channel."""

    @staticmethod
    def forward(ctx, weight, call):
        w_hat, saved = call.forward(weight)
        ctx.save_for_backward(*saved)
        ctx.call = call
        if saved[0] is not weight:  # a row-dense copy: double backward differentiates the input
            ctx.copied_from = weight
        return w_hat

    @staticmethod
    def backward(ctx, grad):
        weight, stats = ctx.saved_tensors
        if torch.is_grad_enabled() or _compat.is_batched_gradient(grad):
            # create_graph=True or a batched gradient (_compat.py): differentiable torch ops
            from . import differentiable
            return differentiable.ws_double_backward(ctx.call, getattr(ctx, "copied_from", weight), grad), None
        dw = ctx.call.backward(grad, weight, stats)
        if dw.stride() != grad.stride() and row_dense(grad) is grad:
            # laid out like dW_hat, as nn.ConvNd lays out its weight gradient (channels_last
            # when only the input is): AccumulateGrad keeps it or copies it to the weight's
            dw = torch.empty_like(grad).copy_(dw)
        return dw, None


class DualWeightStandardizeFunction(WeightStandardizeFunction):
    """WeightStandardizeFunction inside a forward-mode AD dual level
    (torch.autograd.forward_ad): also pushes tangents (``jvp``, differentiable torch
    ops: ops/differentiable.py). Apart, because dynamo cannot trace a Function that
    defines ``jvp``."""

    @staticmethod
    def forward(ctx, weight, call):
        w_hat = WeightStandardizeFunction.forward(ctx, weight, call)
        ctx.save_for_forward(weight)  # what jvp reads as ctx.saved_tensors
        return w_hat

    @staticmethod
    def jvp(ctx, weight_t, _):
        from . import differentiable
        return differentiable.ws_jvp(ctx.call, ctx.saved_tensors[0], weight_t)


class FunctorchWeightStandardizeFunction(torch.autograd.Function):
    """WeightStandardizeFunction under a functorch transform (torch.func.grad, vjp, ...),
    which requires ``setup_context`` (see ops/norm.py FunctorchNormFunction). The
    statistics are an extra output, not differentiable; the backward differentiates W_hat
    written in torch ops (ops/differentiable.py)."""

    @staticmethod
    def forward(weight, call):
        w_hat, (_, stats) = call.forward(weight)
        return w_hat, stats

    @staticmethod
    def setup_context(ctx, inputs, output):
        weight, call = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(weight, output[1])
        ctx.save_for_forward(weight)  # for jvp (torch.func.jvp)
        ctx.call = call

    @staticmethod
    def jvp(ctx, weight_t, _):  # differentiable torch ops (ops/differentiable.py)
        from . import differentiable
        return differentiable.ws_jvp(ctx.call, ctx.saved_tensors[0], weight_t, functorch=True), None

    @staticmethod
    def backward(ctx, grad, stats_grad):  # differentiable torch ops (ops/differentiable.py)
        weight, _ = ctx.saved_tensors
        from . import differentiable
        return differentiable.ws_double_backward(ctx.call, weight, grad, functorch=True), None


_cache = checks.CallCache()  # validated weight signatures -> _Call; weights -> their newest (checks.recalled)


STANDARDIZE = ("full", "center")


def check_standardize(standardize) -> str:
    """``standardize`` itself when it is "full" (W_hat = (W - mean) / D) or "center"
    (W_hat = W - mean), else a ValueError."""
    if not isinstance(standardize, str) or standardize not in STANDARDIZE:
        raise ValueError(f"standardize must be one of {STANDARDIZE}, got {standardize!r}")
    return standardize


def _validate(weight, eps, correction, eps_mode, standardize="full") -> _Call:
    eps, correction = checks.check_ws_args(weight, eps, correction, eps_mode)
    return _Call(weight, eps, correction, eps_mode == "std", check_standardize(standardize) == "center")


def weight_standardize(weight: torch.Tensor, eps: float = 1e-5, correction: int = 0, eps_mode: str = "var",
                       standardize: str = "full") -> torch.Tensor:
    """Standardize each output channel of ``weight`` over its fan-in (dims 1..).

    See the module docstring for the two ``eps_mode`` conventions. ``standardize="center"``
    only centers: W_hat = W - mean (eps, correction and eps_mode are checked, not used).
    The checks run once per weight signature; repeat calls reuse what they derived.
    """
    # a repeat call with the same weight object is recognised by a tensor guard (checks.recalled)
    # the types the key reads first (checks.recalled)
    scalars = (type(eps), type(correction), type(standardize), eps, correction, eps_mode, standardize)
    call = None if torch.compiler.is_compiling() else checks.recalled(_cache, weight, scalars, (weight,))
    if call is not None:  # not a functorch wrapper (checks.remember): nothing to unwrap
        return call.call_plain(weight)
    # a new weight or signature (or tracing): by the key, checked on a miss
    if checks.fx_proxy((weight,)) is not None:  # torch.fx.symbolic_trace: one node calling this function
        return weight.tracer.create_proxy("call_function", weight_standardize,
                                          (weight, eps, correction, eps_mode, standardize), {})
    if checks.has_negated_view((weight,)):  # the call again, with the weight materialized
        return weight_standardize(weight.resolve_neg(), eps, correction, eps_mode, standardize)
    call = checks.keyed(_cache, weight, scalars, (weight,), lambda: (
        weight.shape, weight.stride(), weight.dtype, weight.device, eps, type(eps), correction, type(correction),
        eps_mode, standardize, type(standardize), type(weight)),
        lambda: _validate(weight, eps, correction, eps_mode, standardize))
    return call(weight)


# below weight_standardize: run eagerly where dynamo starts a frame (_compat.py)
_compat.eager_when_a_frame(_Call.__call__, _Call.call_plain)
