"""BCN and GroupNorm: torch.library ops, autograd Function, functional API.

The math (DESIGN.md sections 3-4) lives in kernels/norm.py (Triton) and
wsbcn/torch_norm.py (torch); this file validates, dispatches and wires autograd.
"""
from typing import Optional

import torch

from . import backend, checks, tuning
from .kernels.layout import channels_fastest, nsc_strides
from .torch_norm import (MODE_BATCH, MODE_ESTIMATE, MODE_GN, MODE_RUNNING,
                         norm_backward_torch, norm_forward_torch)
from .torch_ws import acc_dtype

__all__ = ["batch_channel_norm", "group_norm", "BatchChannelNormFunction"]


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


def _empty_walkable(x):
    """An empty tensor shaped like x whose strides the kernels can walk (x's own
    layout when dense, else contiguous)."""
    out = torch.empty_like(x)
    return out if nsc_strides(out) is not None else torch.empty(x.shape, dtype=x.dtype, device=x.device)


def param_grads(d_gamma, d_beta, d_omega, d_eta, gamma, omega):
    """The op's fp32 parameter gradients in each parameter's dtype and shape (None
    where absent); beta and eta share gamma's and omega's shape and dtype."""
    def cast(grad, param):
        return None if param is None else grad.to(param.dtype).reshape(param.shape)

    return cast(d_gamma, gamma), cast(d_beta, gamma), cast(d_omega, omega), cast(d_eta, omega)


def _norm_forward_impl(x, gamma, beta, omega, eta, running_mean, running_var, num_batches_tracked,
                       num_groups, eps, momentum, cumulative, mode, update_running, activation, group_affine):
    if x.numel() == 0:
        acc = dict(device=x.device, dtype=acc_dtype(x.dtype))
        s6, sc, sr = _stat_shapes(x, num_groups)
        return torch.empty_like(x), torch.zeros(s6, **acc), torch.zeros(sc, **acc), torch.zeros(sr, **acc)
    if backend.backend_for(x) == "torch":
        return norm_forward_torch(x, gamma, beta, omega, eta, running_mean, running_var, num_batches_tracked,
                                  num_groups, eps, momentum, cumulative, mode, update_running, activation, group_affine)
    y = _empty_walkable(x)
    config = tuning.config_for("norm_fwd", x, _shape_nsc(x), channels_fastest(x))
    stats, rstd_c, rho = backend.kernels().norm.norm_forward(
        x, y, gamma, beta, omega, eta, running_mean, running_var, num_batches_tracked,
        num_groups, eps, momentum, cumulative, mode, update_running, activation, group_affine, config)
    return y, stats, rstd_c, rho


def _norm_backward_impl(dy, x, stats, rstd_c, rho, gamma, omega, eta, num_groups, mode, activation, group_affine):
    if x.numel() == 0:
        lengths = _grad_lengths(x, num_groups, gamma, omega, group_affine, mode)
        return (torch.zeros_like(x),) + tuple(torch.zeros(m, device=x.device, dtype=stats.dtype) for m in lengths)
    if backend.backend_for(x) == "torch":
        return norm_backward_torch(dy, x, stats, rstd_c, rho, gamma, omega, eta, num_groups, mode, activation, group_affine)
    if nsc_strides(dy) is None:
        dy = dy.contiguous()
    dx = _empty_walkable(x)
    config = tuning.config_for("norm_bwd", x, _shape_nsc(x), channels_fastest(x))
    grads = backend.kernels().norm.norm_backward(
        dy, x, dx, stats, rstd_c, rho, gamma, omega, eta, num_groups, mode, activation, group_affine, config)
    return (dx,) + tuple(grads)


@torch.library.custom_op(
    "wsbcn::norm_forward", mutates_args=("running_mean", "running_var", "num_batches_tracked"))
def norm_forward_op(
    x: torch.Tensor, gamma: Optional[torch.Tensor], beta: Optional[torch.Tensor],
    omega: Optional[torch.Tensor], eta: Optional[torch.Tensor],
    running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
    num_batches_tracked: Optional[torch.Tensor], num_groups: int, eps: float, momentum: float,
    cumulative: bool, norm_mode: int, update_running: bool, activation: Optional[str], group_affine: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # (an argument called "mode" would clash with torch's own dispatch helpers)
    return _norm_forward_impl(x, gamma, beta, omega, eta, running_mean, running_var, num_batches_tracked,
                              num_groups, eps, momentum, cumulative, norm_mode, update_running, activation, group_affine)


@norm_forward_op.register_fake
def _(x, gamma, beta, omega, eta, running_mean, running_var, num_batches_tracked, num_groups, eps,
      momentum, cumulative, norm_mode, update_running, activation, group_affine):
    s6, sc, sr = _stat_shapes(x, num_groups)
    acc = acc_dtype(x.dtype)
    return torch.empty_like(x), x.new_empty(s6, dtype=acc), x.new_empty(sc, dtype=acc), x.new_empty(sr, dtype=acc)


@torch.library.custom_op("wsbcn::norm_backward", mutates_args=())
def norm_backward_op(
    dy: torch.Tensor, x: torch.Tensor, stats: torch.Tensor, rstd_c: torch.Tensor, rho: torch.Tensor,
    gamma: Optional[torch.Tensor], omega: Optional[torch.Tensor], eta: Optional[torch.Tensor],
    num_groups: int, norm_mode: int, activation: Optional[str], group_affine: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _norm_backward_impl(dy, x, stats, rstd_c, rho, gamma, omega, eta, num_groups, norm_mode, activation,
                               group_affine)


@norm_backward_op.register_fake
def _(dy, x, stats, rstd_c, rho, gamma, omega, eta, num_groups, norm_mode, activation, group_affine):
    lengths = _grad_lengths(x, num_groups, gamma, omega, group_affine, norm_mode)
    return (torch.empty_like(x),) + tuple(x.new_empty((m,), dtype=stats.dtype) for m in lengths)


class BatchChannelNormFunction(torch.autograd.Function):
    """Autograd for BCN / GroupNorm. Saves x and O(N*C) fp32 statistics only;
    backward recomputes the pre-activation from x (y is never saved)."""

    @staticmethod
    def forward(ctx, x, gamma, beta, omega, eta, running_mean, running_var, num_batches_tracked,
                num_groups, eps, momentum, cumulative, mode, update_running, activation, group_affine):
        if nsc_strides(x) is None:
            x = x.contiguous()  # spatial dims that one stride cannot walk
        fwd = norm_forward_op if torch.compiler.is_compiling() else _norm_forward_impl
        y, stats, rstd_c, rho = fwd(x, gamma, beta, omega, eta, running_mean, running_var, num_batches_tracked,
                                    num_groups, eps, momentum, cumulative, mode, update_running, activation, group_affine)
        ctx.save_for_backward(x, stats, rstd_c, rho, gamma, omega, eta)
        ctx.config = (num_groups, mode, activation, group_affine)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, stats, rstd_c, rho, gamma, omega, eta = ctx.saved_tensors
        num_groups, mode, activation, group_affine = ctx.config
        bwd = norm_backward_op if torch.compiler.is_compiling() else _norm_backward_impl
        dx, *grads = bwd(dy, x, stats, rstd_c, rho, gamma, omega, eta, num_groups, mode, activation, group_affine)
        return (dx, *param_grads(*grads, gamma, omega)) + (None,) * 11


def _check_param(name, t, numels, x):
    if t is None:
        return
    checks.check_float_tensor(name, t, min_dim=0)
    if t.numel() not in numels:
        raise ValueError(f"{name} must have {' or '.join(map(str, sorted(set(numels))))} elements, got shape {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but the input is on {x.device}")


def _validate_common(x, num_groups, eps, activation):
    checks.check_float_tensor("input", x, min_dim=2)
    checks.check_num_groups(x.shape[1], num_groups)
    return checks.check_eps(eps), checks.check_activation(activation)


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
    """
    eps, activation = _validate_common(x, num_groups, eps, activation)
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
        if 0 < x.numel() // c <= 1:  # values per channel: N * prod(spatial)
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}")
    elif training:
        mode = MODE_ESTIMATE
        if not has_running:
            raise ValueError("estimate=True needs running_mean and running_var")
    else:
        mode = MODE_RUNNING
        if not has_running:
            raise ValueError("evaluation (training=False) needs running_mean and running_var")
    update_running = training and has_running
    cumulative = momentum is None
    if cumulative and update_running and num_batches_tracked is None:
        raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
    if num_batches_tracked is not None and (num_batches_tracked.numel() != 1 or num_batches_tracked.dtype.is_floating_point):
        raise ValueError("num_batches_tracked must be a one-element integer tensor")
    group_affine = group_weight is not None and group_weight.numel() == num_groups
    return BatchChannelNormFunction.apply(
        x, weight, bias, group_weight, group_bias, running_mean, running_var,
        num_batches_tracked if update_running else None, num_groups, eps,
        0.0 if cumulative else momentum, cumulative, mode, update_running, activation, group_affine)


def group_norm(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor] = None,
               bias: Optional[torch.Tensor] = None, eps: float = 1e-5,
               activation: Optional[str] = None) -> torch.Tensor:
    """F.group_norm with an optional fused ``activation`` ("relu" or "silu")."""
    eps, activation = _validate_common(x, num_groups, eps, activation)
    c = x.shape[1]
    _check_param("weight", weight, (c,), x)
    _check_param("bias", bias, (c,), x)
    if weight is not None and bias is None:  # as F.group_norm allows
        bias = torch.zeros_like(weight)
    elif bias is not None and weight is None:
        weight = torch.ones_like(bias)
    return BatchChannelNormFunction.apply(
        x, None, None, weight, bias, None, None, None, num_groups, eps, 0.0, False,
        MODE_GN, False, activation, False)
