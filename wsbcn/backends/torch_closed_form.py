"""The torch backend: the closed forms of kernels/norm.py and kernels/ws.py
written with tensor ops (same pivots, same saved statistics). CPU tensors and
float64 run here.

BCN / GroupNorm: modes and saved statistics are those of kernels/norm.py: stats
[6, N, C] holds pivot, mean, dm, P, y_hat mean and M2 per (n, c); rstd_c [C]; rho
[N, G]. As there, every pass works with e = (x - pivot) - mean_nc.

WS: works on (O, fan_in) rows in fp32 (float64 for float64 weights), each row the
fan-in in memory order as the kernel walks it (W_hat and dW keep the weight's memory
format); statistics of ``w - w[:, :1]`` (the row's first element in memory) as in the
kernel, so a constant filter gives exact zeros.
"""
import torch
import torch.nn.functional as F

from ..kernels.norm import MODE_BATCH, MODE_ESTIMATE, MODE_GN, MODE_RUNNING


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _vecdot_runs_in_fp32(t: torch.Tensor) -> bool:
    """``torch.linalg.vecdot`` of fp32 rows gives fp32 here: not under autocast, which
    runs it in bfloat16/float16 (it is on autocast's lower-precision list; a product and
    a sum are not)."""
    return t.device.type not in ("cpu", "cuda") or not torch.is_autocast_enabled(t.device.type)


def _per_nc(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """[N, C] -> [N, C, 1, ...] to broadcast against x."""
    return t.reshape(t.shape + (1,) * (ndim - 2))


def _activate(z, activation):
    if activation == "relu":
        return F.relu(z)
    if activation == "silu":
        return F.silu(z)
    return z


def _activation_grad(dy, z, activation):
    if activation == "relu":
        return torch.where(z <= 0, torch.zeros_like(dy), dy)  # as threshold_backward: NaN z passes dy
    if activation == "silu":
        sig = torch.sigmoid(z)
        return dy * sig * (1 + z * (1 - sig))
    return dy


def _affine_per_channel(t, num_groups, c, group_affine):
    """omega / eta per channel, [C], from per-group or per-channel storage."""
    t = t.reshape(-1)
    return t.repeat_interleave(c // num_groups) if group_affine else t


def norm_forward_torch(x, gamma, beta, omega, eta, running_mean, running_var, num_batches,
                       num_groups, eps, momentum, cumulative, mode, update_running, activation,
                       group_affine, reduce_channel_stats=None):
    """``reduce_channel_stats(kind, pivot, mean, second, count) -> (mean, second, count,
    merged)`` (ops/collectives.py), when given, combines the per-channel batch
    statistics across processes (wsbcn.distributed): ``mean`` is the per-channel mean of
    the local batch about ``pivot``, ``second`` its centred M2 (kind "chan") or its sum
    of squares about the old running mean (kind "sum"), ``count`` its number of values
    per channel."""
    acc = acc_dtype(x.dtype)
    # per-channel tensors of any shape with C elements (as F.batch_norm takes them); the
    # running buffers come contiguous (ops/norm.py), so their views update them
    gamma, beta, running_mean, running_var = (t if t is None else t.reshape(-1)
                                              for t in (gamma, beta, running_mean, running_var))
    n, c = x.shape[:2]
    dims = tuple(range(2, x.dim()))
    s = x[0, 0].numel()
    k = c // num_groups
    xf = x.to(acc)
    if mode == MODE_GN:
        pivot = xf[:, ::k].reshape(n, num_groups, -1)[..., 0].repeat_interleave(k, dim=1)
    elif mode == MODE_RUNNING:
        pivot = running_mean.to(acc).expand(n, c)
    else:
        pivot = xf[0].reshape(c, -1)[:, 0].expand(n, c)
    xp = xf - _per_nc(pivot, x.dim())
    if dims:
        # mean, then the centred sum of squares: plain reductions are several times
        # faster on CPU than torch.var_mean's Welford kernel. e is reused below.
        m_keep = xp.mean(dim=dims, keepdim=True)
        e = xp.sub_(m_keep)
        if e.is_contiguous() and _vecdot_runs_in_fp32(e):
            m2 = torch.linalg.vecdot(e.flatten(2), e.flatten(2))
        else:
            m2 = e.square().sum(dim=dims)
        m = m_keep.reshape(n, c)
    else:
        m, m2 = xp, torch.zeros_like(xp)
        e = torch.zeros_like(xp)

    updates = []  # buffer writes, done last so a failure leaves the buffers untouched
    shift_c = torch.zeros(c, dtype=acc, device=x.device)
    r = torch.ones(c, dtype=acc, device=x.device)
    if update_running or mode == MODE_ESTIMATE:
        if cumulative:
            factor = 1.0 / (num_batches.to(acc) + 1.0)
        else:
            factor = momentum
    if mode in (MODE_BATCH, MODE_ESTIMATE):
        ns = n * s
        mean_c = m.mean(dim=0)
        if update_running:
            rm_old, rv_old = running_mean.to(acc), running_var.to(acc)
        else:
            rm_old = torch.zeros(c, dtype=acc, device=x.device)
            rv_old = torch.ones(c, dtype=acc, device=x.device)
        to_old = pivot[0] - rm_old
        if mode == MODE_BATCH:
            m2_c = m2.sum(dim=0) + s * (m - mean_c).square().sum(dim=0)
            if reduce_channel_stats is not None:
                mean_c, m2_c, ns, merged = reduce_channel_stats("chan", pivot[0], mean_c, m2_c, ns)
            shift_c = mean_c
            var = m2_c / ns
            if update_running and reduce_channel_stats is not None:  # the same bits on every rank
                new_mean, new_var, _ = merged_running_update(True, running_mean, running_var, merged,
                                                             merged_factor(cumulative, momentum, num_batches))
                updates += [(running_mean, new_mean), (running_var, new_var)]
            elif update_running:
                updates.append((running_mean, rm_old + factor * (to_old + mean_c)))
                updates.append((running_var, (1 - factor) * rv_old + factor * m2_c / (ns - 1)))
        else:
            dev_sum = m2.sum(dim=0) + s * (m + to_old).square().sum(dim=0)
            # normalize with the estimates as the buffers hold them (rounded in a narrower
            # buffer: what a recompute under activation checkpointing reads back)
            if reduce_channel_stats is not None:  # the same running buffers on every rank
                _, _, _, merged = reduce_channel_stats("sum", pivot[0], mean_c, dev_sum, ns)
                new_mean, var, q = merged_running_update(False, running_mean, running_var, merged,
                                                         merged_factor(cumulative, momentum, num_batches))
                pivot64 = pivot[0].to(torch.float64)
                if running_mean.dtype != acc:
                    shift_c = (new_mean.to(running_mean.dtype).to(torch.float64) - pivot64).to(acc)
                else:  # about this rank's pivot, in float64: no absolute mean rounded to fp32
                    shift_c = ((merged[0] - pivot64) + q).to(acc)
            else:
                var = (1 - factor) * rv_old + factor * (dev_sum / ns)
                shift_c = factor * mean_c - (1 - factor) * to_old
                if running_mean.dtype != acc:
                    shift_c = (pivot[0] + shift_c).to(running_mean.dtype).to(acc) - pivot[0]
                new_mean = pivot[0] + shift_c
            if running_var.dtype != acc:
                var = var.to(running_var.dtype)
            var = var.to(acc)  # (the merged one is float64)
            updates += [(running_mean, new_mean), (running_var, var)]
        r = torch.rsqrt(var + eps)
    elif mode == MODE_RUNNING:
        r = torch.rsqrt(running_var.to(acc) + eps)
    a, b = r, torch.zeros_like(r)
    if mode != MODE_GN and gamma is not None:
        a, b = r * gamma.to(acc), beta.to(acc)

    if mode == MODE_GN:
        shift = m.reshape(n, num_groups, k).mean(dim=2).repeat_interleave(k, dim=1)
    else:
        shift = shift_c.expand(n, c)
    dm = m - shift
    u_mean = a * dm + b
    u_var = a * a * m2 / s
    nu = u_mean.reshape(n, num_groups, k).mean(dim=2, keepdim=True)
    du = (u_mean.reshape(n, num_groups, k) - nu)
    tau = u_var.reshape(n, num_groups, k).mean(dim=2) + du.square().mean(dim=2)
    rho = torch.rsqrt(tau + eps)
    rho_c = rho.repeat_interleave(k, dim=1)
    stats = torch.stack([pivot, m, dm, rho_c * a, rho_c * du.reshape(n, c), m2]).to(acc)
    coef_a, coef_b = _apply_coefs(stats, omega, eta, num_groups, group_affine)
    z = e.mul_(_per_nc(coef_a, x.dim())).add_(_per_nc(coef_b, x.dim()))  # e is ours: in place
    y = _activate(z, activation).to(x.dtype)
    for buf, value in updates:
        buf.copy_(value)
    if update_running and num_batches is not None:
        num_batches.add_(1)
    return y, stats, r.to(acc), rho.to(acc)


def merged_factor(cumulative, momentum, num_batches):
    """The running-average factor of a merged update, in float64."""
    return 1.0 / (num_batches.to(torch.float64) + 1.0) if cumulative else momentum


def merged_running_update(batch, running_mean, running_var, merged, factor):
    """(running_mean, running_var, new mean - p0) updated from the statistics merged
    across processes, in float64 (``merged``: ``collectives.merge_rows``' p0, the mean
    about it, M2 (``batch``) or the sum of squares about the old running mean, and the
    values per channel): values and arithmetic the same on every rank, a rank without
    images included, so every rank writes the same bits. One value per channel in all
    has no unbiased variance: the running one stays."""
    p0, mean, second, count = merged
    rm_old, rv_old = running_mean.to(torch.float64), running_var.to(torch.float64)
    to_old = p0 - rm_old
    if batch:
        new_var = torch.where(count > 1, (1 - factor) * rv_old + factor * (second / (count - 1)), rv_old)
        return rm_old + factor * (to_old + mean), new_var, None
    q = factor * mean - (1 - factor) * to_old
    return p0 + q, (1 - factor) * rv_old + factor * (second / count), q


def _apply_coefs(stats, omega, eta, num_groups, group_affine):
    """z = A e + B, with A = omega P and B = omega y_hat_mean + eta."""
    p, ym = stats[3], stats[4]
    c = p.shape[1]
    if omega is None:
        return p, ym
    om = _affine_per_channel(omega, num_groups, c, group_affine).to(p.dtype)
    et = _affine_per_channel(eta, num_groups, c, group_affine).to(p.dtype)
    return om * p, om * ym + et


def norm_backward_torch(dy, x, stats, rstd_c, rho, gamma, omega, eta, num_groups, mode,
                        activation, group_affine, reduce_channel_grads=None, batch_count=None):
    """``reduce_channel_grads([2, C]) -> [2, C]`` sums (d_gamma, d_beta) across
    processes and ``batch_count`` is the values per channel of the whole
    (distributed) batch; both only matter with batch statistics."""
    acc = stats.dtype
    gamma = gamma if gamma is None else gamma.reshape(-1)
    n, c = x.shape[:2]
    dims = tuple(range(2, x.dim()))
    s = x[0, 0].numel()
    k = c // num_groups
    pivot, mean, dm, p, ym, m2 = stats.unbind(0)
    e = (x.to(acc) - _per_nc(pivot, x.dim())).sub_(_per_nc(mean, x.dim()))
    coef_a, coef_b = _apply_coefs(stats, omega, eta, num_groups, group_affine)
    dyf = dy.to(acc)
    dz = _activation_grad(dyf, _per_nc(coef_a, x.dim()) * e + _per_nc(coef_b, x.dim()), activation) if activation else dyf
    d1 = dz.sum(dim=dims) if dims else dz
    if dims and dz.is_contiguous() and e.is_contiguous() and _vecdot_runs_in_fp32(e):
        de = torch.linalg.vecdot(dz.flatten(2), e.flatten(2))
    else:
        de = (dz * e).sum(dim=dims) if dims else dz * e

    # The formulas of kernels/norm.py's _norm_bwd_combine_kernel.
    om = torch.ones(c, dtype=acc, device=x.device) if omega is None else _affine_per_channel(omega, num_groups, c, group_affine).to(acc)
    r = rstd_c if mode != MODE_GN else torch.ones(c, dtype=acc, device=x.device)
    gam = gamma.to(acc) if (gamma is not None and mode != MODE_GN) else torch.ones(c, dtype=acc, device=x.device)
    big_l = k * s
    t = ym * d1 + p * de
    e1 = (om * d1).reshape(n, num_groups, k).sum(dim=2).repeat_interleave(k, dim=1) / big_l
    e2 = (om * t).reshape(n, num_groups, k).sum(dim=2).repeat_interleave(k, dim=1) / big_l
    rho_c = rho.repeat_interleave(k, dim=1)
    alpha = rho_c * om
    sum_du = alpha * d1 - rho_c * s * (e1 + e2 * ym)
    sum_dux = alpha * (de + dm * d1) - rho_c * e1 * s * dm - rho_c * e2 * (s * ym * dm + p * m2)
    d_omega_c = t.sum(dim=0)
    d_eta_c = d1.sum(dim=0)
    d_gamma = (r * sum_dux).sum(dim=0)
    d_beta = sum_du.sum(dim=0)
    scale = r * gam
    ca = scale * alpha
    ce = -scale * rho_c * e2 * p
    cc = -scale * rho_c * (e1 + e2 * ym)
    if mode == MODE_BATCH:
        g_gamma, g_beta, count = d_gamma, d_beta, n * s
        if reduce_channel_grads is not None:
            g_gamma, g_beta = reduce_channel_grads(torch.stack([d_gamma, d_beta])).unbind(0)
            count = batch_count
        slope = r * g_gamma / count
        ce = ce - scale * slope
        cc = cc - scale * (g_beta / count + slope * dm)
    # dx = CA dz + CE e + CC, in place on e (a temporary of ours)
    dx = e.mul_(_per_nc(ce, x.dim())).add_(_per_nc(cc, x.dim())).addcmul_(dz, _per_nc(ca, x.dim())).to(x.dtype)

    def empty():  # a fresh tensor each: op outputs may not alias one another
        return torch.empty(0, dtype=acc, device=x.device)

    if omega is None:
        d_omega, d_eta = empty(), empty()
    elif group_affine:
        d_omega = d_omega_c.reshape(num_groups, k).sum(dim=1)
        d_eta = d_eta_c.reshape(num_groups, k).sum(dim=1)
    else:
        d_omega, d_eta = d_omega_c, d_eta_c
    if gamma is None or mode == MODE_GN:
        d_gamma, d_beta = empty(), empty()
    return dx, d_gamma, d_beta, d_omega, d_eta


# --- Weight Standardization ---------------------------------------------------------

def _fan_in_order(w: torch.Tensor) -> list:
    """Dims of w with each output channel's fan-in in memory order (dims 1.. by
    decreasing stride), as ops/ws.py's row_dense and the kernel walk it."""
    return [0] + sorted(range(1, w.dim()), key=lambda d: -w.stride(d))


def _rows(t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """t's (O, fan_in) rows in w's memory order: a view when t is row dense like w."""
    return t.permute(_fan_in_order(w)).reshape(w.shape[0], -1)


def _like(rows: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """(O, fan_in) rows in w's memory order (``_rows``) as a tensor shaped and strided
    like w, so W_hat and dW keep the weight's memory format, down to the strides of
    size-1 dims (they decide what channels_last means to a depthwise conv)."""
    order = _fan_in_order(w)
    if w.permute(order).is_contiguous():  # row dense: the rows are w's memory, in order
        return rows.contiguous().as_strided(w.shape, w.stride())
    return rows.reshape([w.shape[d] for d in order]).permute([order.index(d) for d in range(w.dim())])


def ws_forward_torch(w: torch.Tensor, eps: float, correction: int, std_mode: bool, center_only: bool = False):
    """(W_hat, stats [3, O]: shifted mean, rstd, gcoef); ``center_only``: W_hat = W - mean,
    rstd 1 and gcoef 0 (eps, correction and std_mode unused), as the kernel's CENTER_ONLY."""
    rows = _rows(w, w).to(acc_dtype(w.dtype))
    if center_only:
        d = rows - rows[:, :1]
        mean = d.mean(dim=1)
        ones = torch.ones_like(mean)
        return _like((d - mean[:, None]).to(w.dtype), w), torch.stack([mean, ones, torch.zeros_like(mean)])
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
    return _like((d * rstd[:, None]).to(w.dtype), w), torch.stack([mean, rstd, gcoef])


def ws_backward_torch(grad: torch.Tensor, w: torch.Tensor, stats: torch.Tensor, center_only: bool = False):
    """dW, laid out like w (as the kernel writes it); ``center_only``: dW = g - mean(g)."""
    acc = acc_dtype(w.dtype)
    if center_only:
        g = _rows(grad, w).to(acc)
        return _like((g - g.mean(dim=1, keepdim=True)).to(w.dtype), w)
    rows = _rows(w, w).to(acc)
    g = _rows(grad, w).to(acc)
    mean, rstd, gcoef = stats[0, :, None], stats[1, :, None], stats[2, :, None]
    w_hat = (rows - rows[:, :1] - mean) * rstd
    dw = rstd * (g - g.mean(dim=1, keepdim=True)) - gcoef * w_hat * (g * w_hat).sum(dim=1, keepdim=True)
    return _like(dw.to(w.dtype), w)
