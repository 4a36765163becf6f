"""BCN and GroupNorm: validation, the autograd Function, the ``wsbcn::norm_*`` ops and
the functional API.

The math (DESIGN.md sections 3-4) lives in kernels/norm.py (Triton) and
backends/torch_closed_form.py (torch); this file validates a call once per
signature (``_Call``), picks its backend and wires autograd. One Function serves
every path: the eager Triton launch plan, the torch closed form, the ops that
torch.compile traces, and BCN across processes (``process_group``).
"""
import collections
import contextlib
import weakref
from typing import Optional

import torch
from torch.utils.weak import WeakIdKeyDictionary
from torch.autograd import forward_ad as _forward_ad  # _current_level: the dual level (wsbcn/_compat.py)

from .. import _compat, backends, checks, tuning
from ..backends.torch_closed_form import acc_dtype, norm_backward_torch, norm_forward_torch
from ..kernels import norm as kernels
from ..kernels.layout import channels_fastest, contiguous, nsc_strides
from ..kernels.norm import MODE_BATCH, MODE_ESTIMATE, MODE_GN, MODE_RUNNING
from ..kernels.norm_plan import NormPlan
from . import collectives, library, norm_distributed

__all__ = ["batch_channel_norm", "group_norm", "NormFunction"]


def _shape_nsc(x):
    n, c = x.shape[0], x.shape[1]
    return n, c, (x.numel() // (n * c) if n * c else 1)


def _stat_shapes(x, num_groups):
    n, c = x.shape[0], x.shape[1]
    return (6, n, c), (c,), (n, num_groups)


def _grad_lengths(x, num_groups, gamma, omega, group_affine, mode):
    """Lengths of (d_gamma, d_beta, d_omega, d_eta); 0 for an absent parameter."""
    c = x.shape[1]
    bn = c if (gamma is not None and mode != MODE_GN) else 0
    aff = (num_groups if group_affine else c) if omega is not None else 0
    return bn, bn, aff, aff


_plans: dict = {}


def tensor_dtypes(*tensors):
    """The dtype of each tensor (None for an absent one): triton compiles a kernel for
    the dtypes of its pointer arguments, so a launch plan is one per dtypes."""
    return tuple(None if t is None else t.dtype for t in tensors)


def launch_plan(x, num_groups, mode, update_running, cumulative, activation, group_affine,
                has_bn_affine, has_affine, has_nbt, eps, momentum, dtypes):
    """The Triton launch plan of a call (kernels/norm_plan.py), cached on
    everything it derives from: the signature (``dtypes``: ``tensor_dtypes`` of gamma,
    beta, omega, eta and the running buffers as the kernels get them), the device (or
    emulated GPU), the tuned-config tables and the config function itself (tests
    replace it)."""
    key = (x.shape, x.stride(), x.dtype, x.device, num_groups, mode, update_running, cumulative, activation,
           group_affine, has_bn_affine, has_affine, has_nbt, eps, momentum, dtypes,
           tuning.config_for, tuning.generation(), backends.emulated_gpu())

    def build():
        nsc, layout = _shape_nsc(x), channels_fastest(x)
        return NormPlan(
            x, num_groups, mode, update_running, cumulative, activation, group_affine, has_bn_affine, has_affine,
            has_nbt, eps, momentum, tuning.config_for("norm_fwd", x, nsc, layout),
            tuning.config_for("norm_bwd", x, nsc, layout))

    return checks.cached(_plans, key, build)


def _like_y(x):
    """A tensor laid out as a launch plan allocates y and dx (kernels/norm_plan.py)."""
    y = torch.empty_like(x)
    return y if nsc_strides(y) is not None else torch.empty(x.shape, dtype=x.dtype, device=x.device)


def param_grads(d_gamma, d_beta, d_omega, d_eta, gamma, omega):
    """The op's fp32 parameter gradients in each parameter's shape (None where
    absent); beta and eta share gamma's and omega's shape."""
    return _as_param(d_gamma, gamma), _as_param(d_beta, gamma), _as_param(d_omega, omega), _as_param(d_eta, omega)


def _norm_forward_impl(x, gamma, beta, omega, eta, running_mean, running_var, num_batches_tracked,
                       num_groups, eps, momentum, cumulative, mode, update_running, activation, group_affine,
                       op=False, closed_form=False):
    """The forward on either backend: the eager body and, with ``op``, the body of the
    ``wsbcn::norm_forward`` op, traced by torch.compile and export (library.py).
    ``closed_form``: the torch closed form whatever the backend (a fake tensor among the
    call's: see _Call; the eager body also takes it under a FakeTensorMode)."""
    if x.numel() == 0:  # as nn.BatchNorm: the running estimates stay, the step is counted
        if update_running and num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        acc = dict(device=x.device, dtype=acc_dtype(x.dtype))
        s6, sc, sr = _stat_shapes(x, num_groups)
        return torch.empty_like(x), torch.zeros(s6, **acc), torch.zeros(sc, **acc), torch.zeros(sr, **acc)
    if closed_form or backends.backend_for(x) == "torch" or (not op and _fake_mode_active()):  # (see _Call)
        return norm_forward_torch(x, gamma, beta, omega, eta, running_mean, running_var, num_batches_tracked,
                                  num_groups, eps, momentum, cumulative, mode, update_running, activation, group_affine)
    if op and library.symbolic(x):  # shapes only: the op stays opaque (library.py) and runs on real tensors
        s6, sc, sr = _stat_shapes(x, num_groups)
        return _like_y(x), x.new_empty(s6, dtype=torch.float32), x.new_empty(sc, dtype=torch.float32), \
            x.new_empty(sr, dtype=torch.float32)
    plan = launch_plan(x, num_groups, mode, update_running, cumulative, activation, group_affine,
                       gamma is not None, omega is not None, num_batches_tracked is not None, eps, momentum,
                       tensor_dtypes(gamma, beta, omega, eta, running_mean, running_var, num_batches_tracked))
    if op:
        return plan.forward_op(x, gamma, beta, omega, eta, running_mean, running_var, num_batches_tracked,
                               traced=not library.plain(x))
    y, side = plan.forward(x, gamma, beta, omega, eta, running_mean, running_var, num_batches_tracked)
    return (y,) + plan.saved_views(side)


def _norm_backward_impl(dy, x, stats, rstd_c, rho, gamma, omega, eta, num_groups, mode, activation, group_affine,
                        op=False, closed_form=False):
    if x.numel() == 0:
        lengths = _grad_lengths(x, num_groups, gamma, omega, group_affine, mode)
        return (torch.zeros_like(x),) + tuple(torch.zeros(m, device=x.device, dtype=stats.dtype) for m in lengths)
    # (a backward outside the FakeTensorMode its forward ran in, or of a fake gradient)
    if closed_form or backends.backend_for(x) == "torch" or (not op and (_fake_mode_active() or any(
            type(t) is not torch.Tensor and _compat.is_fake(t) for t in (stats, dy)))):
        return norm_backward_torch(dy, x, stats, rstd_c, rho, gamma, omega, eta, num_groups, mode, activation, group_affine)
    # The backward reads no running buffer and no eps/momentum; the forward's flags
    # that shape its launches are the ones passed here.
    if op and library.symbolic(x):  # shapes only, as in the forward
        lengths = _grad_lengths(x, num_groups, gamma, omega, group_affine, mode)
        return (_like_y(x),) + tuple(x.new_empty((m,), dtype=torch.float32) for m in lengths)
    plan = launch_plan(x, num_groups, mode, False, False, activation, group_affine,
                       gamma is not None, omega is not None, False, 1e-5, 0.0,
                       tensor_dtypes(gamma, None, omega, eta, None, None, None))
    if op:
        return plan.backward_op(dy, x, stats, rstd_c, rho, gamma, omega, eta, traced=not library.plain(x))
    return plan.backward(dy, x, (stats, rstd_c, rho), gamma, None, omega, eta, fp32_grads=True)


def _forward_kernels():
    return kernels._norm_stats_kernel, kernels._norm_combine_kernel, kernels._norm_apply_kernel


def _backward_kernels():
    return kernels._norm_bwd_reduce_kernel, kernels._norm_bwd_combine_kernel, kernels._norm_bwd_apply_kernel


def _estimate_mode(args, kwargs):
    """A norm_forward call in estimate mode (its ``norm_mode``): opaque on the torch
    backend under compile (ops/library.py)."""
    mode = args[12] if len(args) > 12 else kwargs.get("norm_mode")
    return mode == MODE_ESTIMATE


@library.triton_op("wsbcn::norm_forward", ("running_mean", "running_var", "num_batches_tracked"), _forward_kernels,
                   opaque_on_torch=_estimate_mode)
def norm_forward_op(
    x: torch.Tensor, gamma: Optional[torch.Tensor], beta: Optional[torch.Tensor],
    omega: Optional[torch.Tensor], eta: Optional[torch.Tensor],
    running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
    num_batches_tracked: Optional[torch.Tensor], num_groups: int, eps: float, momentum: float,
    cumulative: bool, norm_mode: int, update_running: bool, activation: Optional[str], group_affine: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # (an argument called "mode" would clash with torch's own dispatch helpers)
    return _norm_forward_impl(x, gamma, beta, omega, eta, running_mean, running_var, num_batches_tracked,
                              num_groups, eps, momentum, cumulative, norm_mode, update_running, activation, group_affine,
                              op=True)


@library.triton_op("wsbcn::norm_backward", (), _backward_kernels)
def norm_backward_op(
    dy: torch.Tensor, x: torch.Tensor, stats: torch.Tensor, rstd_c: torch.Tensor, rho: torch.Tensor,
    gamma: Optional[torch.Tensor], omega: Optional[torch.Tensor], eta: Optional[torch.Tensor],
    num_groups: int, norm_mode: int, activation: Optional[str], group_affine: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _norm_backward_impl(dy, x, stats, rstd_c, rho, gamma, omega, eta, num_groups, norm_mode, activation,
                               group_affine, op=True)


def _check_param(name, t, numels, x):
    if t is None:
        return
    checks.check_float_tensor(name, t, min_dim=0)
    if not any(t.numel() == n for n in numels):  # ==, not `in`: a symbolic channel count (dynamic=True) compares
        raise ValueError(f"{name} must have {' or '.join(map(str, sorted(set(numels))))} elements, got shape {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but the input is on {x.device}")


def _validate_common(x, num_groups, eps, activation):
    checks.check_float_tensor("input", x, min_dim=2)
    checks.check_num_groups(x.shape[1], num_groups)
    return checks.check_eps(eps), checks.check_activation(activation)


class _Call:
    """A validated call signature: what the checks derived from it, the backend that
    runs it, and the launch plans of its Triton path, so that a repeat call skips all
    of it (recalled per call site, else one dict lookup). ``forward``/``backward`` are
    the op bodies behind ``NormFunction``; ``saved`` is what the forward keeps for the
    backward."""

    __slots__ = ("num_groups", "eps", "momentum", "cumulative", "mode", "update_running", "activation",
                 "group_affine", "dtypes", "dense", "eager", "group", "plans", "untraced", "c_apply", "recompute",
                 "fast", "keeps_estimates", "fake")

    def __init__(self, x, num_groups, eps, momentum, cumulative, mode, update_running, activation, group_affine,
                 dtypes, group=None, dense=True, fake=False):
        self.num_groups, self.eps, self.momentum, self.cumulative = num_groups, eps, momentum, cumulative
        self.mode, self.update_running, self.activation, self.group_affine = mode, update_running, activation, group_affine
        self.group = group  # a process group: statistics combined across its ranks
        self.dtypes = dtypes  # tensor_dtypes of the tensors the kernels get besides x
        self.dense = dense  # every parameter and running buffer is contiguous (else: call_dense)
        # The eager Triton path takes non-empty inputs whose spatial dims one stride walks.
        # A call built under torch.compile is never cached (checks.validated) and
        # takes the torch.library ops.
        # A fake tensor among the call's (shape propagation outside torch.compile) has no
        # memory to launch on: the call takes the torch closed form (``fake``; the key holds
        # every tensor's type), as does a call while a FakeTensorMode is active (whose
        # allocations are fake: checked per call).
        self.fake = fake
        self.eager = x.numel() > 0 and nsc_strides(x) is not None and not torch.compiler.is_compiling() \
            and not fake
        self.plans = {}
        # outside tracing (dynamo knows NormFunction.apply): the no-grad shortcut, and
        # NormFunction.apply's C half or None (wsbcn/_compat.py)
        self.untraced = not torch.compiler.is_compiling()
        self.c_apply = _compat.function_c_apply(NormFunction) if self.untraced else None
        self.recompute = None  # recomputed(): built on the first recompute
        # call_plain's hot path applies: eager, one process, the C apply, a readable dual level
        self.fast = self.c_apply is not None and group is None and _compat.dual_level_readable
        # micro-batch BCN normalizes with the estimates it just updated: checkpoint's recompute needs those
        self.keeps_estimates = mode == MODE_ESTIMATE and update_running and self.untraced

    def recomputed(self, x):
        """The call that replaces this one when torch.utils.checkpoint recomputes it (a
        forward during a backward, ``_compat.in_backward``): the same output, no running
        buffer updated again. Batch mode: the same batch statistics; estimate mode: the
        estimates the first forward updated and normalized with, now in the buffers
        (running mode), which holds while no other forward of the layer updated them before
        this backward. None across processes in batch mode: that recompute combines the
        ranks' statistics again and updates the buffers again, as nn.SyncBatchNorm does."""
        if self.recompute is None:
            if self.group is not None and self.mode == MODE_BATCH:
                return None
            self.recompute = _Call(x, self.num_groups, self.eps, self.momentum, self.cumulative,
                                   MODE_RUNNING if self.mode == MODE_ESTIMATE else self.mode, False, self.activation,
                                   self.group_affine, self.dtypes[:6] + (None,), None, self.dense, self.fake)
        return self.recompute

    def plan(self, x, gamma, omega, nbt):
        key = (tuning.config_for, tuning._generation[0], backends._emulated_gpu)  # what a plan derives from
        plan = self.plans.get(key)
        if plan is None:
            plan = self.plans[key] = launch_plan(
                x, self.num_groups, self.mode, self.update_running, self.cumulative, self.activation,
                self.group_affine, gamma is not None, omega is not None, nbt is not None, self.eps, self.momentum,
                self.dtypes)
        return plan

    def forward(self, x, gamma, beta, omega, eta, running_mean, running_var, nbt):
        """(y, saved): eager Triton saves its one fp32 side buffer, the other paths
        (stats, rstd_c, rho), across processes also the batch count."""
        if self.group is not None:  # across processes (norm_distributed.py)
            return norm_distributed.forward(self, x, gamma, beta, omega, eta, running_mean, running_var, nbt)
        if self.eager and backends.backend_for(x) == "triton" and not (_dispatch_modes() and _fake_mode_active()):
            y, side = self.plan(x, gamma, omega, nbt).forward(x, gamma, beta, omega, eta, running_mean, running_var,
                                                              nbt)
            return y, (side,)
        if nsc_strides(x) is None:
            x = x.contiguous()  # spatial dims that one stride cannot walk
        args = (x, gamma, beta, omega, eta, running_mean, running_var, nbt, self.num_groups, self.eps, self.momentum,
                self.cumulative, self.mode, self.update_running, self.activation, self.group_affine)
        if torch.compiler.is_compiling():
            y, *saved = norm_forward_op(*args)
        else:
            with _fake_mode_of(x):  # (a fake x: its mode makes the closed form's tensors)
                y, *saved = _norm_forward_impl(*args, closed_form=self.fake)
        return y, tuple(saved)

    def backward(self, dy, x, saved, gamma, beta, omega, eta):
        """dx and the gradients (d_gamma, d_beta, d_omega, d_eta), each in its
        parameter's shape (None for an absent one). The eager Triton path writes each
        like its parameter (its dtype, rounded as autograd casts); the others give fp32
        gradients, which autograd casts."""
        if len(saved) == 1 and self.group is None:  # the eager Triton path's side buffer
            plan = self.plan(x, gamma, omega, None)
            # (a gradient of another type: a fake one, made under a FakeTensorMode)
            if type(dy) is torch.Tensor and not torch.compiler.is_compiling() and not (
                    _dispatch_modes() and _fake_mode_active()):
                side = saved[0]
                # a saved-tensor hook may give one back strided: the kernels index them densely
                if not (side.is_contiguous() and (gamma is None or gamma.is_contiguous()) and
                        (omega is None or omega.is_contiguous()) and (eta is None or eta.is_contiguous())):
                    side, gamma, omega, eta = contiguous(side, gamma, omega, eta)
                return plan.backward(dy, x, side, gamma, beta, omega, eta)
            # compiled autograd traces this backward: the op, as compile's (or, under a
            # FakeTensorMode, the closed form)
            saved = plan.saved_views(saved[0])
        if self.group is not None:  # across processes (norm_distributed.py)
            dx, *grads = norm_distributed.backward(self, dy, x, saved, gamma, beta, omega, eta)
        else:
            if nsc_strides(x) is None:
                x = x.contiguous()
            args = (dy, x, *saved, gamma, omega, eta, self.num_groups, self.mode, self.activation, self.group_affine)
            if torch.compiler.is_compiling():
                dx, *grads = norm_backward_op(*args)
            else:  # (a fake gradient into a real call: its mode makes the closed form's tensors)
                with _fake_mode_of(x if self.fake else dy):
                    dx, *grads = _norm_backward_impl(*args, closed_form=self.fake)
        return (dx, *param_grads(*grads, gamma, omega))

    def in_torch_ops(self, x, gamma, beta, omega, eta, running_mean, running_var, nbt=None):
        """The call under torch.func.vmap (and under any torch.func transform that
        torch.compile traces): the forward in differentiable torch ops
        (ops/differentiable.py), which vmap batches and the other transforms see through.
        A call that updates running buffers (training, batch or estimate mode) does so
        when they are batched as x is, one set per vmapped instance (a model ensemble's,
        from torch.func.stack_module_state), as nn.BatchNorm does; with buffers shared by
        every instance it raises before anything runs, as nn.BatchNorm does too."""
        if self.group is not None or (self.update_running and not _batched_like(x, running_mean, running_var, nbt)):
            raise RuntimeError(
                "wsbcn BatchChannelNorm in training with running statistics cannot run under torch.func.vmap "
                "(vmap, jacfwd, hessian, per-sample gradients) with running buffers shared by every vmapped "
                "instance (nor with a process_group): one update would stand for all of them. Use eval mode, "
                "track_running_stats=False (batch statistics of each instance), or buffers batched as the input "
                "is (a model ensemble's, torch.func.stack_module_state), as for nn.BatchNorm under vmap.")
        from . import differentiable
        bn_mean = bn_rstd = None
        if self.update_running:
            bn_mean, bn_rstd = self._update_batched_buffers(x, running_mean, running_var, nbt)
        if x.numel() == 0:
            return torch.empty_like(x)
        if self.mode == MODE_RUNNING:  # eval: the running estimates, as the kernels read them
            bn_mean, bn_rstd = running_mean, torch.rsqrt(running_var.to(acc_dtype(x.dtype)) + self.eps)
        return differentiable.norm_forward_differentiable(x, gamma, beta, omega, eta, self.num_groups, self.eps,
                                                          self.mode, self.activation, self.group_affine, bn_mean,
                                                          bn_rstd)

    def _update_batched_buffers(self, x, running_mean, running_var, nbt):
        """The running buffers' update under vmap, per instance, in torch ops
        (docs/conventions.md): batch mode the batch mean and unbiased variance, estimate
        mode the mean and the mean square deviation from the old estimate, at ``momentum``
        or the cumulative average; num_batches_tracked + 1. Returns estimate mode's BN
        constants (the updated estimates as the buffers hold them), else (None, None)."""
        with torch.no_grad():
            acc = acc_dtype(x.dtype)
            shape_c = (1, x.shape[1]) + (1,) * (x.dim() - 2)
            dims = [0] + list(range(2, x.dim()))
            count = x.numel() // x.shape[1]
            rm, rv = running_mean.to(acc), running_var.to(acc)
            factor = 1.0 / (nbt.to(acc) + 1.0) if self.cumulative else self.momentum
            updates = []
            if count > 0:
                xf = x.detach().to(acc)
                if self.mode == MODE_BATCH:
                    var, mean = torch.var_mean(xf, dim=dims, correction=0)
                    var = var * (count / (count - 1))
                else:
                    mean = xf.mean(dim=dims)
                    var = (xf - rm.view(shape_c)).square().mean(dim=dims)
                updates = [(running_mean, rm + factor * (mean - rm)), (running_var, rv + factor * (var - rv))]
            for buffer, value in updates:  # computed first: a failure above leaves the buffers as they were
                buffer.copy_(value)
            if nbt is not None:
                nbt.add_(1)
        if self.mode != MODE_ESTIMATE:
            return None, None
        return running_mean, torch.rsqrt(running_var.to(acc) + self.eps)

    def call_dense(self, x, gamma, beta, omega, eta, running_mean, running_var, nbt):
        """The call with contiguous copies of parameters and running buffers that are not
        (views with gaps or repeats: the kernels and the closed form index them densely);
        the running buffers' updates are copied back."""
        if self.update_running:
            for name, t in (("running_mean", running_mean), ("running_var", running_var)):
                if _overlaps(t):  # before anything runs: its update could not be copied back
                    raise ValueError(f"{name} has elements sharing memory (an expanded tensor, stride "
                                     f"{t.stride()}): it cannot hold per-channel running statistics")
        dense = contiguous(gamma, beta, omega, eta, running_mean, running_var)
        if self.keeps_estimates and dense[4] is not running_mean:  # the copy keeps and finds the buffer's
            _share_kept_estimates(running_mean, dense[4])
        y = self(x, *dense, nbt)
        if self.update_running:
            with torch.no_grad():
                for t, d in zip((running_mean, running_var), dense[4:]):
                    if d is not t:
                        t.copy_(d)
        return y

    def __call__(self, x, gamma, beta, omega, eta, running_mean, running_var, nbt):
        if self.untraced and not _compat.functorch_transforms_active():
            u = _compat.unwrap_if_dead  # what NormFunction.apply does first (wsbcn/_compat.py)
            x, gamma, beta = u(x), gamma if gamma is None else u(gamma), beta if beta is None else u(beta)
            omega, eta = omega if omega is None else u(omega), eta if eta is None else u(eta)
        return self.call_plain(x, gamma, beta, omega, eta, running_mean, running_var, nbt)

    def call_plain(self, x, gamma, beta, omega, eta, running_mean, running_var, nbt):
        """The call of tensors that are no functorch wrappers: ``__call__`` after it
        unwraps, or a call ``checks.recalled`` found."""
        if self.fast and not _transforms_active() and _forward_ad._current_level < 0 and (
                not self.update_running or _graph_task_id() == -1):
            # the hot path: no functorch transform, no dual level, not checkpoint's recompute.
            # The same as the general path below, which tests these one by one.
            if _grad_enabled():
                y = self.c_apply(x, gamma, beta, omega, eta, self, (running_mean, running_var, nbt))
                if self.keeps_estimates and _saved_hooks(False) is not None:  # maybe non-reentrant checkpoint
                    _keep_estimates(x, running_mean, running_var)
                return y
            y = self.forward(x, gamma, beta, omega, eta, running_mean, running_var, nbt)[0]  # nothing to record
            if self.keeps_estimates:  # maybe a reentrant checkpoint's forward (it runs without grad)
                _keep_estimates(x, running_mean, running_var)
            return y
        if self.update_running and self.untraced and _graph_task_id() != -1:  # in a backward: checkpoint's recompute
            recompute = self.recomputed(x)
            if recompute is not None:
                if self.keeps_estimates:  # what that forward normalized with, if kept
                    running_mean, running_var = _kept_estimates(x, running_mean, running_var)
                return recompute.call_plain(x, gamma, beta, omega, eta, running_mean, running_var, None)
        if self.keeps_estimates and (not torch.is_grad_enabled() or _saved_hooks(False) is not None):
            # (a call here missed the hot path, though it may be ``fast``: inside a dual level)
            y = self._general(x, gamma, beta, omega, eta, running_mean, running_var, nbt)
            _keep_estimates(x, running_mean, running_var)
            return y
        return self._general(x, gamma, beta, omega, eta, running_mean, running_var, nbt)

    def _general(self, x, gamma, beta, omega, eta, running_mean, running_var, nbt):
        """call_plain past its hot path and checkpoint's recompute: every other case, in turn."""
        buffers = (running_mean, running_var, nbt)
        if self.group is not None and self.untraced and _compat.has_forward_tangents((x, gamma, beta, omega, eta)):
            raise RuntimeError(  # before anything runs (not traced by dynamo)
                "wsbcn BatchChannelNorm with a process_group does not support forward-mode AD "
                "(torch.autograd.forward_ad, torch.func.jvp): its statistics are combined across processes. "
                "Use it without process_group for the jvp.")
        if not self.untraced:  # dynamo knows NormFunction.apply
            if _compat.functorch_transforms_active() and not self.update_running:
                # torch.func under torch.compile: the ops have no functorch rules, torch ops trace
                return self.in_torch_ops(x, gamma, beta, omega, eta, running_mean, running_var)
            return NormFunction.apply(x, gamma, beta, omega, eta, self, buffers)
        if _compat.functorch_transforms_active():  # torch.func.grad, vjp, jvp, ...
            if _compat.vmap_active():  # torch.func.vmap, jacfwd, hessian, per-sample gradients: torch ops
                return self.in_torch_ops(x, gamma, beta, omega, eta, running_mean, running_var, nbt)
            return FunctorchNormFunction.apply(x, gamma, beta, omega, eta, self, buffers)[0]
        if _compat.forward_ad_active():  # inside a dual level (torch.autograd.forward_ad), under no_grad too
            return DualNormFunction.apply(x, gamma, beta, omega, eta, self, buffers)
        if not torch.is_grad_enabled():  # nothing for autograd to record: the op body alone
            return self.forward(x, gamma, beta, omega, eta, *buffers)[0]
        if self.c_apply is None:
            return NormFunction.apply(x, gamma, beta, omega, eta, self, buffers)
        return self.c_apply(x, gamma, beta, omega, eta, self, buffers)


def _batched_like(x, *buffers) -> bool:
    """Whether every buffer given is wrapped at each torch.func level ``x`` is (batched
    by each vmap, an input of each grad transform): then an in-place update of each
    vmapped instance's own buffers can take x's statistics."""
    levels = _compat.functorch_levels(x)
    return all(b is None or levels <= _compat.functorch_levels(b) for b in buffers)


class NormFunction(torch.autograd.Function):
    """Autograd for BCN / GroupNorm on every path (``_Call`` picks it). Saves x and
    O(N*C) fp32 statistics only; backward recomputes the pre-activation from x (y is
    never saved). Running buffers travel in a tuple: they are updated in place and
    take no gradient."""

    @staticmethod
    def forward(ctx, x, gamma, beta, omega, eta, call, buffers):
        y, saved = call.forward(x, gamma, beta, omega, eta, *buffers)
        ctx.save_for_backward(x, gamma, beta, omega, eta, *saved)  # beta: for double backward only
        ctx.call = call
        return y

    @staticmethod
    def backward(ctx, dy):
        x, gamma, beta, omega, eta, *saved = ctx.saved_tensors
        # create_graph=True or a batched gradient (_compat.py): differentiable torch ops (across
        # processes it raises, on a rank without images too: before the backward's
        # collective, which the others never reach)
        if (torch.is_grad_enabled() or _batched_gradient(dy)) and (x.numel() or ctx.call.group is not None):
            from . import differentiable
            return (*differentiable.norm_double_backward(ctx, dy, x, gamma, beta, omega, eta, saved), None, None)
        return (*ctx.call.backward(dy, x, saved, gamma, beta, omega, eta), None, None)


class DualNormFunction(NormFunction):
    """NormFunction inside a forward-mode AD dual level (torch.autograd.forward_ad): also
    pushes tangents (``jvp``, differentiable torch ops: ops/differentiable.py). Apart,
    because dynamo cannot trace a Function that defines ``jvp``."""

    @staticmethod
    def forward(ctx, x, gamma, beta, omega, eta, call, buffers):
        y, saved = call.forward(x, gamma, beta, omega, eta, *buffers)
        ctx.save_for_backward(x, gamma, beta, omega, eta, *saved)
        ctx.save_for_forward(x, gamma, beta, omega, eta, *saved)  # what jvp reads as ctx.saved_tensors
        ctx.call = call
        return y

    @staticmethod
    def jvp(ctx, x_t, gamma_t, beta_t, omega_t, eta_t, *_):
        from . import differentiable
        return differentiable.norm_jvp(ctx, (x_t, gamma_t, beta_t, omega_t, eta_t))


class FunctorchNormFunction(torch.autograd.Function):
    """NormFunction under a functorch transform (torch.func.grad, vjp, jacrev, ...), which
    requires ``setup_context``; NormFunction has none, so that eager calls can take the C
    apply (wsbcn/_compat.py). The saved statistics are extra outputs, not differentiable;
    the backward differentiates the forward written in torch ops (ops/differentiable.py),
    so the transforms compose (grad of grad). Not vmap-able (the kernels take no batch of
    layers): under vmap the layers compute with torch ops instead (``_Call.in_torch_ops``)."""

    @staticmethod
    def forward(x, gamma, beta, omega, eta, call, buffers):
        y, saved = call.forward(x, gamma, beta, omega, eta, *buffers)
        return (y, *saved)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, gamma, beta, omega, eta, call, _ = inputs
        saved = output[1:]
        ctx.mark_non_differentiable(*saved)
        ctx.save_for_backward(x, gamma, beta, omega, eta, *saved)
        ctx.save_for_forward(x, gamma, beta, omega, eta, *saved)  # for jvp (torch.func.jvp)
        ctx.call = call

    @staticmethod
    def jvp(ctx, x_t, gamma_t, beta_t, omega_t, eta_t, *_):  # differentiable torch ops (ops/differentiable.py)
        from . import differentiable
        return (differentiable.norm_jvp(ctx, (x_t, gamma_t, beta_t, omega_t, eta_t), functorch=True),
                *(None for _ in ctx.saved_tensors[5:]))

    @staticmethod
    def backward(ctx, dy, *saved_grads):  # differentiable torch ops (ops/differentiable.py)
        x, gamma, beta, omega, eta, *saved = ctx.saved_tensors
        if not x.numel():
            return NormFunction.backward(ctx, dy)
        from . import differentiable
        return (*differentiable.norm_double_backward(ctx, dy, x, gamma, beta, omega, eta, saved, functorch=True),
                None, None)


def _as_param(grad, param):
    """A 1-d fp32 gradient in its parameter's shape (None when absent). Its dtype is
    left to autograd, which casts a gradient to its input's dtype in C++ (the same
    ``to`` as in Python, without the Python call)."""
    if param is None:
        return None
    return grad if grad.dim() == param.dim() else grad.view(param.shape)


_graph_task_id = _compat.graph_task_id  # != -1: a backward runs (_compat.in_backward)
_batched_gradient = _compat.is_batched_gradient
_transforms_active, _grad_enabled = _compat.functorch_transforms_active, torch.is_grad_enabled
_cache = checks.CallCache()  # validated call signatures -> _Call; call sites -> their newest (checks.recalled)
_meta = checks.tensor_meta
_fake_mode_active, _dispatch_modes = _compat.fake_mode_active, _compat.dispatch_modes
_saved_hooks = _compat.top_saved_tensors_hooks  # None: no saved-tensor hooks active (wsbcn/_compat.py)

# Micro-batch BCN (estimate=True) normalizes with the running estimates its forward just
# updated. Under torch.utils.checkpoint that forward runs with saved-tensor hooks
# (non-reentrant) or without grad (reentrant), and its recompute, during the backward,
# must normalize with the same estimates, though another forward of the layer may have
# updated the buffers since (two micro-batches, then one backward). Such forwards keep a
# copy of them, per running_mean buffer (the newest 16), for a recompute of the same
# input: the very tensor, or (a reentrant recompute's detached copy) a tensor of the same
# memory, shape and strides while the kept one is alive (so its memory is not reused).
# A layer whose input the region computes gets a new tensor in the recompute: it reads
# the buffers, as does a recompute that finds nothing.
_estimates_kept = WeakIdKeyDictionary()  # (by identity: a tensor's == compares values)
_KEPT_PER_LAYER = 16


def _keep_estimates(x, running_mean, running_var):
    kept = _estimates_kept.get(running_mean)
    if kept is None:
        kept = _estimates_kept[running_mean] = collections.deque(maxlen=_KEPT_PER_LAYER)
    kept.append((weakref.ref(x), running_mean.detach().clone(), running_var.detach().clone()))


def _share_kept_estimates(running_mean, copy):
    """A strided running_mean's dense copy (``_Call.call_dense``, a new one per call) keeps
    and finds the estimates kept for the buffer itself: one record under both."""
    kept = _estimates_kept.get(running_mean)
    if kept is None:
        kept = _estimates_kept[running_mean] = collections.deque(maxlen=_KEPT_PER_LAYER)
    _estimates_kept[copy] = kept


def _kept_estimates(x, running_mean, running_var):
    """The estimates the newest kept forward of ``x`` normalized with, else the buffers."""
    for input_ref, mean, var in reversed(_estimates_kept.get(running_mean, ())):
        kept = input_ref()
        if kept is x or (kept is not None and kept.data_ptr() == x.data_ptr() and kept.shape == x.shape
                         and kept.stride() == x.stride() and kept.dtype == x.dtype):
            return mean, var
    return running_mean, running_var


def _fake_mode_of(x):
    """The FakeTensorMode of a fake ``x`` used outside it, to enter: the closed form's own
    tensors (zeros, ones) are then fake too, as torch's layers' are; else nothing to enter."""
    if type(x) is not torch.Tensor and _compat.is_fake(x) and not _fake_mode_active() and \
            getattr(x, "fake_mode", None) is not None:
        return x.fake_mode
    return contextlib.nullcontext()


def _has_fake(*tensors) -> bool:
    """A fake tensor among a call's (outside torch.compile, which traces with them)."""
    return not torch.compiler.is_compiling() and any(t is not None and _compat.is_fake(t) for t in tensors)


def _overlaps(t) -> bool:
    """Whether elements of ``t`` share memory (a stride 0 over a size > 1, or what torch's
    overlap check finds)."""
    if any(st == 0 and sz > 1 for st, sz in zip(t.stride(), t.shape)):
        return True
    check = getattr(torch, "_debug_has_internal_overlap", None)
    return check is not None and check(t) == 1


def _requires_grad(t) -> bool:
    return t is not None and t.requires_grad


def _owner_key(owner):
    """What a calling module's ``_check_input`` reads besides x: its class and channels."""
    return None if owner is None else (owner.__class__, owner.num_channels)


def batch_channel_norm(
    x: torch.Tensor, num_groups: int = 32, running_mean: Optional[torch.Tensor] = None,
    running_var: Optional[torch.Tensor] = None, weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None, group_weight: Optional[torch.Tensor] = None,
    group_bias: Optional[torch.Tensor] = None, training: bool = False, estimate: bool = False,
    momentum: Optional[float] = 0.1, eps: float = 1e-5, activation: Optional[str] = None,
    num_batches_tracked: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Batch-Channel Normalization of x (N, C, *spatial); see DESIGN.md section 3.

    BN stage with ``weight``/``bias`` (gamma, beta per channel) and running
    buffers; channel stage with ``group_weight``/``group_bias`` (omega, eta: one
    per group, or one per channel); then ``activation``. ``training`` with
    ``estimate=False`` uses batch statistics (and updates the running buffers
    if given, like F.batch_norm); ``estimate=True`` updates the running
    estimates and normalizes with them (micro-batch BCN); otherwise the running
    estimates are used. ``momentum=None`` is the cumulative average, as in nn.BatchNorm.

    The checks run once per call signature (shapes, strides, dtypes, devices and
    arguments); repeat calls reuse what they derived.
    """
    return _batch_channel_norm(x, num_groups, running_mean, running_var, weight, bias, group_weight, group_bias,
                               training, estimate, momentum, eps, activation, num_batches_tracked)


def _batch_channel_norm(x, num_groups, running_mean, running_var, weight, bias, group_weight, group_bias, training,
                        estimate, momentum, eps, activation, num_batches_tracked, owner=None, group=None):
    """batch_channel_norm; ``owner``: the calling module, whose own input checks
    (``_check_input``) join the ones cached per signature; ``group``: a process group
    whose ranks' batch statistics are combined (training only)."""
    if group is collectives.WORLD:  # the default group of the moment it runs, as nn.SyncBatchNorm's: per call
        group = collectives.world_group()
    compiling = torch.compiler.is_compiling()  # asked once: the eager hot path below reads it too
    if compiling and (group is not None or (training and running_mean is not None and _compat.vmap_active())):
        # across processes, and updating running buffers under vmap (a model ensemble's: in
        # torch ops, ``_Call.in_torch_ops``; the ops have no batching rule), compile runs it eagerly
        return _batch_channel_norm_eagerly(x, num_groups, running_mean, running_var, weight, bias, group_weight,
                                           group_bias, training, estimate, momentum, eps, activation,
                                           num_batches_tracked, owner, group)
    # a repeat call at the same site (module, else weight) is recognised by a tensor guard
    tensors = (x, running_mean, running_var, weight, bias, group_weight, group_bias, num_batches_tracked)
    scalars = (None if owner is None else owner.__class__, None if owner is None else owner.num_channels,
               type(num_groups), type(momentum), type(eps),  # the types the key reads, first: see checks.recalled
               num_groups, training, estimate, momentum, eps, activation, group)
    site = weight if owner is None else owner
    call = None if compiling else checks.recalled(_cache, site, scalars, tensors)
    if call is not None:  # no functorch wrapper among the tensors (checks.remember): nothing to unwrap
        run = call.call_plain if call.dense else call.call_dense
    else:  # a new site or signature (or tracing): by the key, checked on a miss
        proxy = checks.fx_proxy(tensors) if owner is None else None
        if proxy is not None:  # torch.fx.symbolic_trace: one node calling the public function
            return proxy.tracer.create_proxy("call_function", batch_channel_norm, (
                x, num_groups, running_mean, running_var, weight, bias, group_weight, group_bias, training, estimate,
                momentum, eps, activation, num_batches_tracked), {})
        if checks.has_negated_view(tensors):  # the call again, with what it reads materialized
            updated = dict(running_mean=running_mean, running_var=running_var,
                           num_batches_tracked=num_batches_tracked) if training else {}
            x, weight, bias, group_weight, group_bias, *buffers = checks.resolve_negated_views(
                (x, weight, bias, group_weight, group_bias) + (() if training else (running_mean, running_var)),
                updated)
            if not training:  # eval reads the running buffers only
                running_mean, running_var = buffers
            return _batch_channel_norm(x, num_groups, running_mean, running_var, weight, bias, group_weight,
                                       group_bias, training, estimate, momentum, eps, activation, num_batches_tracked,
                                       owner, group)
        call = checks.keyed(_cache, site, scalars, tensors, lambda: (
            "bcn", _owner_key(owner), x.shape, x.stride(), x.dtype, x.device, num_groups, type(num_groups),
            _meta(running_mean), _meta(running_var), _meta(weight), _meta(bias), _meta(group_weight),
            _meta(group_bias), _meta(num_batches_tracked), bool(training), bool(estimate), momentum, type(momentum),
            eps, type(eps), activation, group, _requires_grad(running_mean), _requires_grad(running_var), type(x)),
            lambda: _validate_bcn(
            owner, x, num_groups, running_mean, running_var, weight, bias, group_weight, group_bias, training,
            estimate, momentum, eps, activation, num_batches_tracked, group))
        # (never recalled outside inference mode; dynamo cannot trace is_inference, and
        # compiled code checks what it saves itself)
        if not torch.compiler.is_compiling() and any(t is not None and t.is_inference() for t in tensors):
            checks.refuse_inference_tensors((x, weight, bias, group_weight, group_bias),
                                            (running_mean, running_var, num_batches_tracked) if call.update_running
                                            else ())
        run = call if call.dense else call.call_dense
    return run(x, weight, bias, group_weight, group_bias, running_mean, running_var,
               num_batches_tracked if call.update_running else None)


# A BCN across processes under torch.compile: a graph break, then the eager call (its
# plan's direct launches and collectives). Traced by torch 2.11's dynamo, the closed form
# with its collectives gave a wrong dx (tests/test_distributed.py). Before, only CUDA
# calls were traced: for CPU tensors a host read of the ranks' headers broke the graph.
_batch_channel_norm_eagerly = torch.compiler.disable(_batch_channel_norm)


def _validate_bcn(owner, x, num_groups, running_mean, running_var, weight, bias, group_weight, group_bias, training,
                  estimate, momentum, eps, activation, num_batches_tracked, group=None) -> _Call:
    if owner is not None:
        owner._check_input(x)
    eps, activation = _validate_common(x, num_groups, eps, activation)
    if group is not None:  # (collectives.WORLD became world_group() in _batch_channel_norm)
        group = collectives.resolve(group, x)
    momentum = checks.check_momentum(momentum)
    c = x.shape[1]
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)):
        _check_param(name, t, (c,), x)
    for name, t in (("group_weight", group_weight), ("group_bias", group_bias)):
        _check_param(name, t, (num_groups, c), x)
    if (weight is None) != (bias is None):
        raise ValueError("weight and bias must be given together")
    if (group_weight is None) != (group_bias is None):
        raise ValueError("group_weight and group_bias must be given together")
    if group_weight is not None and group_weight.numel() != group_bias.numel():
        raise ValueError("group_weight and group_bias must have the same number of elements")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together")
    has_running = running_mean is not None
    if training and not estimate:
        mode = MODE_BATCH
        # values per channel: N * prod(spatial) (across processes, of the whole batch: not known here)
        if 0 < x.numel() // c <= 1 and (group is None or group.size == 1):
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}")
    elif training:
        mode = MODE_ESTIMATE
        if not has_running:
            raise ValueError("estimate=True needs running_mean and running_var")
    else:
        mode = MODE_RUNNING
        if not has_running:
            raise ValueError("evaluation (training=False) needs running_mean and running_var")
    if x.numel() > 0 and x.numel() // x.shape[0] // num_groups == 1:  # (GroupNorm gives its bias there, as torch's)
        raise ValueError(
            f"the channel stage would normalize one value per group (num_groups={num_groups}, input shape "
            f"{tuple(x.shape)}: C / num_groups channels of one element each): its output would be group_bias "
            "whatever the input, with no gradient; use fewer groups, or a norm of another kind for (N, C) features")
    update_running = bool(training) and has_running
    cumulative = momentum is None
    if cumulative and update_running and num_batches_tracked is None:
        raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
    if num_batches_tracked is not None and not isinstance(num_batches_tracked, torch.Tensor):
        raise TypeError(f"num_batches_tracked must be a one-element integer tensor or None, got "
                        f"{type(num_batches_tracked).__name__}")
    nbt_dtype = None if num_batches_tracked is None else num_batches_tracked.dtype
    if num_batches_tracked is not None and (num_batches_tracked.numel() != 1 or nbt_dtype in (torch.bool, torch.uint8)
                                            or nbt_dtype.is_floating_point or nbt_dtype.is_complex):
        raise ValueError("num_batches_tracked must be a one-element integer tensor, got "
                         f"{num_batches_tracked.dtype} of shape {tuple(num_batches_tracked.shape)}")
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if t is not None and t.requires_grad:  # nn.BatchNorm's raises too (no derivative for it)
            raise ValueError(f"{name} requires grad: the running statistics are buffers updated in place, "
                             f"with no gradient; call {name}.requires_grad_(False)")
    if num_batches_tracked is not None and num_batches_tracked.device != x.device:
        raise ValueError(f"num_batches_tracked is on {num_batches_tracked.device} but the input is on {x.device}")
    group_affine = group_weight is not None and group_weight.numel() == num_groups
    if group is not None and not (training and has_running):
        raise ValueError("a process_group combines statistics in training, with running buffers")
    dtypes = tensor_dtypes(weight, bias, group_weight, group_bias, running_mean, running_var,
                           num_batches_tracked if update_running else None)
    dense = all(t is None or t.is_contiguous()
                for t in (weight, bias, group_weight, group_bias, running_mean, running_var))
    fake = _has_fake(x, weight, bias, group_weight, group_bias, running_mean, running_var, num_batches_tracked)
    return _Call(x, num_groups, eps, 0.0 if cumulative else momentum, cumulative, mode, update_running, activation,
                 group_affine, dtypes, group, dense, fake)


def group_norm(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor] = None,
               bias: Optional[torch.Tensor] = None, eps: float = 1e-5,
               activation: Optional[str] = None) -> torch.Tensor:
    """F.group_norm with an optional fused ``activation`` ("relu" or "silu")."""
    return _group_norm(x, num_groups, weight, bias, eps, activation)


def _group_norm(x, num_groups, weight, bias, eps, activation, owner=None):
    """group_norm; ``owner``: the calling module, whose input checks
    (``_check_input``) join the ones cached per signature."""
    tensors = (x, weight, bias)  # a repeat call at the same site (module, else weight): see _batch_channel_norm
    scalars = (None if owner is None else owner.__class__, None if owner is None else owner.num_channels,
               type(num_groups), type(eps), num_groups, eps, activation)  # types first: see checks.recalled
    site = weight if owner is None else owner
    call = None if torch.compiler.is_compiling() else checks.recalled(_cache, site, scalars, tensors)
    if call is not None:  # no functorch wrapper among the tensors (checks.remember): nothing to unwrap
        run = call.call_plain if call.dense else call.call_dense
    else:  # a new site or signature (or tracing): by the key, checked on a miss
        proxy = checks.fx_proxy(tensors) if owner is None else None
        if proxy is not None:  # torch.fx.symbolic_trace: one node calling the public function
            return proxy.tracer.create_proxy("call_function", group_norm, (x, num_groups, weight, bias, eps, activation),
                                             {})
        if checks.has_negated_view(tensors):  # the call again, with what it reads materialized
            x, weight, bias = checks.resolve_negated_views(tensors, {})
            return _group_norm(x, num_groups, weight, bias, eps, activation, owner)
        call = checks.keyed(_cache, site, scalars, tensors, lambda: (
            "gn", _owner_key(owner), x.shape, x.stride(), x.dtype, x.device, num_groups, type(num_groups),
            _meta(weight), _meta(bias), eps, type(eps), activation, type(x)),
            lambda: _validate_gn(owner, x, num_groups, weight, bias, eps, activation))
        run = call if call.dense else call.call_dense
    if weight is not None and bias is None:  # as F.group_norm allows
        bias = torch.zeros_like(weight)
    elif bias is not None and weight is None:
        weight = torch.ones_like(bias)
    return run(x, None, None, weight, bias, None, None, None)


def _validate_gn(owner, x, num_groups, weight, bias, eps, activation) -> _Call:
    if owner is not None:
        owner._check_input(x)
    eps, activation = _validate_common(x, num_groups, eps, activation)
    c = x.shape[1]
    # nn.GroupNorm's check (F.group_norm): N * C/G * prod(spatial) == 1 is refused, in eval too
    if x.numel() // num_groups == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {list(x.shape)}")
    _check_param("weight", weight, (c,), x)
    _check_param("bias", bias, (c,), x)
    # a missing one of weight and bias is made like the other (_group_norm)
    dtypes = tensor_dtypes(None, None, bias if weight is None else weight, weight if bias is None else bias, None,
                           None, None)
    return _Call(x, num_groups, eps, 0.0, False, MODE_GN, False, activation, False, dtypes,
                 dense=all(t is None or t.is_contiguous() for t in (weight, bias)),
                 fake=_has_fake(x, weight, bias))


# the entries below a layer's forward: run eagerly where dynamo starts a frame (_compat.py)
_compat.eager_when_a_frame(_batch_channel_norm, _group_norm, _Call.__call__, _Call.call_plain, _Call.call_dense)
