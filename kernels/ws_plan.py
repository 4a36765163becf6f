"""Launch plans of the Weight Standardization kernels (kernels/ws.py).

A ``WSPlan`` holds what a weight's signature fixes (shape, strides, dtype, eps,
correction, mode, centering only or not, and the launch config): the integers, the grid and one
``Launch`` per kernel (kernels/launch.py), so a repeat call allocates its outputs
and makes one launch each way. The one place where the WS kernels' arguments are
written down.
"""
import torch

from . import ws as K
from .launch import ArgTable, DirectLaunches, Slot, all_aligned
from .layout import with_strides


class WSPlan:
    """Forward and backward launches of one weight signature. ``w`` must be row
    dense (each output channel's fan-in one block in memory)."""

    def __init__(self, w, eps, correction, std_mode, config_fwd, config_bwd, center_only=False):
        out_channels = w.shape[0]
        fan_in = w.numel() // out_channels
        row_stride = fan_in
        grid = (out_channels, 1, 1)
        self.out_channels = out_channels
        self.w_stride = w.stride()  # a plan is one weight signature: its strides included
        self.stats_shape, self.f32 = (3, out_channels), dict(device=w.device, dtype=torch.float32)
        stats = dict(Shifted_mean=Slot("mean"), Rstd=Slot("rstd"), Gcoef=Slot("gcoef"))
        block = config_fwd["BLOCK"]
        t = ArgTable(("w", "w_hat", "mean", "rstd", "gcoef"))
        self.fwd = t.launch(K._ws_fwd_kernel, grid, dict(num_warps=config_fwd["num_warps"]),
                            W=Slot("w"), W_hat=Slot("w_hat"), **stats, row_stride=row_stride, fan_in=fan_in,
                            denom=float(fan_in - correction), eps=float(eps), STD_MODE=std_mode,
                            ONE_BLOCK=fan_in <= block, BLOCK=block, CENTER_ONLY=center_only)
        self.fwd_constants = t.constants
        o = 4 * out_channels  # bytes between the three rows of the fp32 statistics
        stat_slots = ["base", f"base + {o}", f"base + {2 * o}"]
        self.fwd_direct = DirectLaunches([self.fwd], ("w", "w_hat", "stats"), ["base = stats.data_ptr()"],
                                         ["w.data_ptr()", "w_hat.data_ptr()"] + stat_slots, t.constants)
        block = config_bwd["BLOCK"]
        t = ArgTable(("grad", "w", "dw", "mean", "rstd", "gcoef"))
        self.bwd = t.launch(K._ws_bwd_kernel, grid, dict(num_warps=config_bwd["num_warps"]),
                            Grad=Slot("grad"), W=Slot("w"), Dw=Slot("dw"), **stats, row_stride=row_stride,
                            fan_in=fan_in, ONE_BLOCK=fan_in <= block, BLOCK=block, CENTER_ONLY=center_only)
        self.bwd_constants = t.constants
        self.bwd_direct = DirectLaunches([self.bwd], ("grad", "w", "dw", "stats"), ["base = stats.data_ptr()"],
                                         ["grad.data_ptr()", "w.data_ptr()", "dw.data_ptr()"] + stat_slots, t.constants)

    def forward(self, w):
        """(w_hat, stats) with stats fp32 [3, O]: shifted mean, rstd, gcoef."""
        w_hat = torch.empty_like(w)
        stats = torch.empty(self.stats_shape, **self.f32)
        if self.fwd_direct.call(w, w_hat, stats):
            return w_hat, stats
        values = [w, w_hat, stats[0], stats[1], stats[2]]
        self.fwd.jit(values + self.fwd_constants, all_aligned(v.data_ptr() for v in values))
        return w_hat, stats

    def forward_traced(self, w):
        """``forward`` for the ``wsbcn::ws_forward`` op (torch.compile, export): the launch
        through ``wrap_triton``, each statistic a tensor of its own."""
        w_hat = torch.empty_like(w)
        rows = [torch.empty((self.out_channels,), device=w.device, dtype=torch.float32) for _ in range(3)]
        self.fwd.traced([w, w_hat] + rows + self.fwd_constants)
        return w_hat, torch.stack(rows)

    def backward_traced(self, grad, w, stats):
        """``backward`` for the ``wsbcn::ws_backward`` op, through ``wrap_triton``."""
        grad = _strided_like(grad, w)
        dw = torch.empty_like(w)
        self.bwd.traced([grad, w, dw] + list(stats.unbind(0)) + self.bwd_constants)
        return dw

    def backward(self, grad, w, stats):
        """dW (``grad`` is copied to ``w``'s strides first when it has others: the
        kernel walks both with ``w``'s)."""
        if w.stride() != self.w_stride:  # given another layout since the forward (a .data swap): the plan's
            w = with_strides(w, self.w_stride)
        if grad.stride() != self.w_stride:
            grad = _strided_like(grad, w)
        dw = torch.empty_like(w)
        if stats.is_contiguous() and self.bwd_direct.call(grad, w, dw, stats):
            return dw
        values = [grad, w, dw, stats[0], stats[1], stats[2]]
        self.bwd.jit(values + self.bwd_constants, all_aligned(v.data_ptr() for v in values))
        return dw


def _strided_like(grad, w):
    """``grad``, copied to ``w``'s strides when it has others (the backward kernel walks
    both with ``w``'s)."""
    if grad.stride() != w.stride():
        grad = torch.empty_like(w).copy_(grad)
    return grad


def ws_forward(w, eps, correction, std_mode, config, center_only=False):
    """The WS forward on a row-dense weight ``w`` with one ``config`` (BLOCK,
    num_warps): the autotuner and the AOT tool. Returns (w_hat, stats), stats fp32
    [3, O]: shifted mean, rstd, gcoef. The arguments are those of
    kernels/ws_plan.py, the one place that writes them down."""
    return WSPlan(w, eps, correction, std_mode, config, config, center_only).forward(w)


def ws_backward(grad, w, stats, config, center_only=False):
    """The WS backward with one ``config``; ``grad`` must have the same strides as ``w``."""
    return WSPlan(w, 1e-5, 0, False, config, config, center_only).backward(grad, w, stats)
