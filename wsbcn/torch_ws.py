"""Weight Standardization in plain torch: the CPU backend (same math as kernels/ws.py).

Works on (O, fan_in) rows in fp32 (float64 for float64 weights); statistics of
``w - w[:, :1]`` as in the kernel, so a constant filter gives exact zeros.
"""
import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def ws_forward_torch(w: torch.Tensor, eps: float, correction: int, std_mode: bool):
    rows = w.reshape(w.shape[0], -1).to(acc_dtype(w.dtype))
    denom = rows.shape[1] - correction
    d = rows - rows[:, :1]
    mean = d.mean(dim=1)
    d = d - mean[:, None]
    var = d.square().sum(dim=1) / denom
    if std_mode:
        std = var.sqrt()
        rstd = 1.0 / (std + eps)
        gcoef = torch.where(std > 0, 1.0 / (std.clamp_min(1e-30) * denom), torch.zeros_like(std))
    else:
        rstd = torch.rsqrt(var + eps)
        gcoef = rstd / denom
    w_hat = (d * rstd[:, None]).to(w.dtype).reshape(w.shape)
    return w_hat, torch.stack([mean, rstd, gcoef])


def ws_backward_torch(grad: torch.Tensor, w: torch.Tensor, stats: torch.Tensor):
    acc = acc_dtype(w.dtype)
    rows = w.reshape(w.shape[0], -1).to(acc)
    g = grad.reshape(w.shape[0], -1).to(acc)
    mean, rstd, gcoef = stats[0, :, None], stats[1, :, None], stats[2, :, None]
    w_hat = (rows - rows[:, :1] - mean) * rstd
    dw = rstd * (g - g.mean(dim=1, keepdim=True)) - gcoef * w_hat * (g * w_hat).sum(dim=1, keepdim=True)
    return dw.to(w.dtype).reshape(w.shape)
