"""Weight Standardization: torch.library ops, autograd Function, functional API.

    W_hat = (W - mean) / D   per output channel, over its fan-in
    eps_mode="var": D = sqrt(var + eps)       (the paper, timm, BiT)
    eps_mode="std": D = std + eps              (the authors' released code, mmcv)
    var = sum((W - mean)^2) / (fan_in - correction)

Backward (g = dL/dW_hat):  dW = (g - mean(g)) / D - k * W_hat * sum(g * W_hat)
with k = 1 / (D (fan_in - correction)) for "var" and k = 1 / (std (fan_in - correction))
for "std" (0 for a constant filter, whose std has no spread to undo).
"""
import torch

from . import backend, checks, tuning
from .torch_ws import acc_dtype, ws_backward_torch, ws_forward_torch


def row_dense(w: torch.Tensor) -> torch.Tensor:
    """``w`` itself when each output channel's fan-in is one dense block in memory
    (contiguous, channels_last, ...), else a contiguous copy."""
    order = sorted(range(1, w.dim()), key=lambda d: -w.stride(d))
    if w.permute(0, *order).is_contiguous():
        return w
    return w.contiguous()


def _ws_forward_impl(weight: torch.Tensor, eps: float, correction: int, std_mode: bool):
    if weight.shape[0] == 0:
        return torch.empty_like(weight), weight.new_empty((3, 0), dtype=acc_dtype(weight.dtype))
    if backend.backend_for(weight) == "torch":
        return ws_forward_torch(weight, eps, correction, std_mode)
    fan_in = weight.numel() // weight.shape[0]
    config = tuning.config_for("ws_fwd", weight, (weight.shape[0], fan_in))
    return backend.kernels().ws.ws_forward(weight, eps, correction, std_mode, config)


def _ws_backward_impl(grad: torch.Tensor, weight: torch.Tensor, stats: torch.Tensor):
    if weight.shape[0] == 0:
        return torch.zeros_like(weight)
    if backend.backend_for(weight) == "torch":
        return ws_backward_torch(grad, weight, stats)
    if grad.stride() != weight.stride():
        grad = torch.empty_like(weight).copy_(grad)  # the kernel walks both with W's strides
    fan_in = weight.numel() // weight.shape[0]
    config = tuning.config_for("ws_bwd", weight, (weight.shape[0], fan_in))
    return backend.kernels().ws.ws_backward(grad, weight, stats, config)


@torch.library.custom_op("wsbcn::ws_forward", mutates_args=())
def ws_forward_op(weight: torch.Tensor, eps: float, correction: int, std_mode: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _ws_forward_impl(weight, eps, correction, std_mode)


@ws_forward_op.register_fake
def _(weight, eps, correction, std_mode):
    return torch.empty_like(weight), weight.new_empty((3, weight.shape[0]), dtype=acc_dtype(weight.dtype))


@torch.library.custom_op("wsbcn::ws_backward", mutates_args=())
def ws_backward_op(grad: torch.Tensor, weight: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
    return _ws_backward_impl(grad, weight, stats)


@ws_backward_op.register_fake
def _(grad, weight, stats):
    return torch.empty_like(weight)


def _compiling() -> bool:
    return torch.compiler.is_compiling()


class WeightStandardizeFunction(torch.autograd.Function):
    """Autograd for W_hat; saves only W and three fp32 numbers per output channel."""

    @staticmethod
    def forward(ctx, weight, eps, correction, std_mode):
        weight = row_dense(weight)
        # Eager calls skip the op dispatcher (tens of microseconds a call); traced
        # calls go through it so torch.compile sees one opaque op.
        fwd = ws_forward_op if _compiling() else _ws_forward_impl
        w_hat, stats = fwd(weight, eps, correction, std_mode)
        ctx.save_for_backward(weight, stats)
        return w_hat

    @staticmethod
    def backward(ctx, grad):
        weight, stats = ctx.saved_tensors
        bwd = ws_backward_op if _compiling() else _ws_backward_impl
        return bwd(grad, weight, stats), None, None, None


def weight_standardize(weight: torch.Tensor, eps: float = 1e-5, correction: int = 0, eps_mode: str = "var") -> torch.Tensor:
    """Standardize each output channel of ``weight`` over its fan-in (dims 1..).

    See the module docstring for the two ``eps_mode`` conventions.
    """
    eps, correction = checks.check_ws_args(weight, eps, correction, eps_mode)
    return WeightStandardizeFunction.apply(weight, eps, correction, eps_mode == "std")
