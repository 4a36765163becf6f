"""Double backward and forward-mode AD of NormFunction and WeightStandardizeFunction.

The first-order backwards (Triton kernels, or the torch closed form) compute the
gradients from statistics the forward saved as constants, so the graph they would
record under ``create_graph=True`` misses every path through those statistics (and
the closed form works in place). Inside an autograd Function's backward,
``torch.is_grad_enabled()`` is True exactly when ``create_graph=True``; the two
Functions then call these instead: the forward written out again with differentiable
torch ops, from the saved input and parameters, and differentiated with
``torch.autograd.grad(..., create_graph=True)``. The result is a graph of plain torch
ops, differentiable to any order. The first-order path (grad mode off) is untouched.
Under a functorch transform (torch.func.grad, vjp, jacrev) the two Functions' functorch
variants always take this path, differentiated with ``torch.func.vjp`` instead: there
the saved tensors carry no autograd history (functorch tracks its own), and the outer
transforms see every op, so grad of grad is right too.

Forward-mode AD (``torch.autograd.forward_ad``, ``torch.func.jvp``, and with them
forward-over-reverse Hessian-vector products) has no kernel: the ``jvp`` of the
Functions the layers take there (``DualNormFunction``, ``DualWeightStandardizeFunction``
inside a dual level, the functorch variants under torch.func.jvp) pushes the input
tangents through the same torch-op forward, with the same constants, from what the
forward saved for it (``ctx.save_for_forward``). The output itself is the kernels'.

What is recomputed and what is a constant, as in the forward:
- BCN, training with batch statistics: mean and variance of x per channel, with
  gradients through them;
- BCN in estimate mode and in eval: the BN stage's mean and 1/sqrt(var + eps) per
  channel are constants, read from the saved statistics (kernels/norm.py: for every
  (n, c), pivot + mean - dm is the mean the forward normalized with; rstd_c its r);
- the channel stage (and GroupNorm): group statistics of u, with gradients.
"""
import torch
from torch.autograd import forward_ad

from .. import _compat
from ..backends.torch_closed_form import _activate, acc_dtype
from ..kernels.norm import MODE_BATCH, MODE_GN


def _bn_constants(call, x, gamma, omega, saved):
    """(mean, rstd) per channel of the BN stage in estimate mode and eval: the
    forward's, from its saved statistics (the running buffers have moved since)."""
    if len(saved) == 1:  # the eager Triton path: one fp32 side buffer
        stats, rstd_c, _ = call.plan(x, gamma, omega, None).saved_views(saved[0])
    else:
        stats, rstd_c = saved[0], saved[1]
    pivot, mean, dm = stats[0, 0], stats[1, 0], stats[2, 0]
    return pivot + (mean - dm), rstd_c


def norm_forward_differentiable(x, gamma, beta, omega, eta, num_groups, eps, mode, activation, group_affine,
                                bn_mean=None, bn_rstd=None):
    """BCN / GroupNorm (DESIGN.md section 3) with differentiable torch ops, in fp32
    (float64 for float64 inputs); ``bn_mean``/``bn_rstd``: the BN stage's constants
    outside batch statistics."""
    acc = acc_dtype(x.dtype)
    n, c = x.shape[:2]
    shape_c = (1, c) + (1,) * (x.dim() - 2)
    u = x.to(acc)
    if mode != MODE_GN:
        if mode == MODE_BATCH:
            dims = [0] + list(range(2, x.dim()))
            if u.numel():  # about a pivot, as the kernels: a large common offset keeps its precision
                u = u - u.detach()[(0, slice(None)) + (0,) * (x.dim() - 2)].view(shape_c)
            var, mean = torch.var_mean(u, dim=dims, correction=0)
            u = (u - mean.view(shape_c)) * torch.rsqrt(var + eps).view(shape_c)
        else:
            u = (u - bn_mean.to(acc).view(shape_c)) * bn_rstd.to(acc).view(shape_c)
        if gamma is not None:
            u = u * gamma.to(acc).view(shape_c) + beta.to(acc).view(shape_c)
    grouped = u.reshape(n, num_groups, -1)
    if grouped.numel():  # about a pivot per (n, group); the pivot is a constant: y does not depend on it
        grouped = grouped - grouped.detach()[:, :, :1]
    tau, nu = torch.var_mean(grouped, dim=2, correction=0, keepdim=True)
    y = ((grouped - nu) * torch.rsqrt(tau + eps)).reshape(x.shape)
    if omega is not None:
        om, et = omega.reshape(-1).to(acc), eta.reshape(-1).to(acc)
        if group_affine:
            om, et = om.repeat_interleave(c // num_groups), et.repeat_interleave(c // num_groups)
        y = y * om.view(shape_c) + et.view(shape_c)
    return _activate(y, activation).to(x.dtype)


def norm_double_backward(ctx, dy, x, gamma, beta, omega, eta, saved, functorch=False):
    """NormFunction's backward under create_graph=True or for a batched gradient
    (``is_grads_batched``) (``functorch``: its functorch variant's backward): (dx,
    d_gamma, d_beta, d_omega, d_eta), each None where not needed."""
    call = ctx.call
    if call.group is not None:
        raise RuntimeError(
            "wsbcn BatchChannelNorm with a process_group does not support double backward "
            "(create_graph=True, e.g. a gradient penalty) or batched gradients (is_grads_batched, "
            "jacobian/hessian with vectorize=True): its statistics are combined across processes. "
            "Use it without process_group, or sync statistics another way.")
    bn_mean = bn_rstd = None
    if call.mode not in (MODE_GN, MODE_BATCH):
        bn_mean, bn_rstd = _bn_constants(call, x, gamma, omega, saved)
    tensors = (x, gamma, beta, omega, eta)
    wanted = [i for i, t in enumerate(tensors) if t is not None and ctx.needs_input_grad[i]]

    def forward(*ts):
        return norm_forward_differentiable(*ts, call.num_groups, call.eps, call.mode, call.activation,
                                           call.group_affine, bn_mean, bn_rstd)

    grads = _pull_back(forward, tensors, wanted, dy, functorch)
    out = [None] * 5
    for i, g in zip(wanted, grads):
        out[i] = g
    return tuple(out)


def norm_jvp(ctx, tangents, functorch=False):
    """NormFunction's forward-mode derivative: the tangent of y given the tangents of
    (x, gamma, beta, omega, eta) (None for one without), through the same torch-op
    forward and the same constants as its double backward."""
    call = ctx.call  # never across processes: refused before the forward (ops/norm.py _Call.call_plain)
    x, gamma, beta, omega, eta, *saved = ctx.saved_tensors
    if x.numel() == 0:
        return torch.zeros_like(x)
    bn_mean = bn_rstd = None
    if call.mode not in (MODE_GN, MODE_BATCH):
        bn_mean, bn_rstd = _bn_constants(call, x, gamma, omega, saved)

    def forward(*ts):
        return norm_forward_differentiable(*ts, call.num_groups, call.eps, call.mode, call.activation,
                                           call.group_affine, bn_mean, bn_rstd)

    return _push_forward(forward, (x, gamma, beta, omega, eta), tangents, functorch)


def _of_wanted(forward, tensors, wanted):
    """``forward`` as a function of ``tensors[i]`` for i in ``wanted`` alone, the others
    held as they are (what torch.func's transforms differentiate)."""
    def of_wanted(*picked):
        ts = list(tensors)
        for i, t in zip(wanted, picked):
            ts[i] = t
        return forward(*ts)

    return of_wanted


def _push_forward(forward, tensors, tangents, functorch):
    """The tangent of ``forward(*tensors)`` given ``tangents`` (one per tensor, None for
    one without: it stays a constant), each in its tensor's dtype as torch keeps them.
    ``functorch``: under torch.func.jvp, which nests (it pushes through its own
    wrappers); else inside a ``torch.autograd.forward_ad`` dual level, which does not
    nest, and which runs a Function's jvp with forward grad off: the tangents are pushed
    through dual tensors of that level, forward grad on for the call."""
    wanted = [i for i, (t, d) in enumerate(zip(tensors, tangents)) if t is not None and d is not None]
    primals = [tensors[i] for i in wanted]
    pushed = [tangents[i].to(p.dtype) for i, p in zip(wanted, primals)]

    of_wanted = _of_wanted(forward, tensors, wanted)
    if functorch:
        return torch.func.jvp(of_wanted, tuple(primals), tuple(pushed))[1]
    if _compat.forward_grad_on is None:
        raise RuntimeError(f"torch {torch.__version__} cannot push tangents through wsbcn's layers inside a "
                           "torch.autograd.forward_ad dual level; use torch.func.jvp")
    with _compat.forward_grad_on(True):
        # A saved input that had a tangent still carries it (seen with forward grad on); the
        # others (torch hands zeros for them) become duals of that level. None is detached:
        # the tangent stays differentiable in the primals (reverse over forward), as torch's
        # own layers' tangents are.
        duals = [p if forward_ad.unpack_dual(p).tangent is not None else forward_ad.make_dual(p, d)
                 for p, d in zip(primals, pushed)]
        out = of_wanted(*duals)
        tangent = forward_ad.unpack_dual(out).tangent
    return torch.zeros_like(out) if tangent is None else tangent


def _pull_back(forward, tensors, wanted, grad, functorch):
    """The gradients of ``forward(*tensors)`` with respect to ``tensors[i]`` for i in
    ``wanted``, given the output's gradient, as a differentiable graph: through
    ``torch.autograd.grad(create_graph=True)``, or under a functorch transform through
    ``torch.func.vjp`` (autograd.grad cannot see what functorch tracks)."""
    if not functorch:  # (a batched gradient without create_graph: a graph to differentiate, none kept)
        create_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            out = forward(*tensors)
        return torch.autograd.grad(out, [tensors[i] for i in wanted], grad, create_graph=create_graph,
                                   allow_unused=True)

    _, pull = torch.func.vjp(_of_wanted(forward, tensors, wanted), *[tensors[i] for i in wanted])
    return pull(grad)


def ws_forward_differentiable(weight, eps, correction, std_mode, center_only=False):
    """W_hat with differentiable torch ops (fp32, float64 for float64 weights). As in
    the kernels, each row is first shifted by one of its elements (a constant: the
    shift cancels in W_hat and in its derivatives), so a constant filter gives exact
    zeros, W_hat = 0 and finite derivatives. ``center_only``: W_hat = W - mean."""
    acc = acc_dtype(weight.dtype)
    rows = weight.reshape(weight.shape[0], -1).to(acc)
    rows = rows - rows[:, :1].detach()
    centered = rows - rows.mean(dim=1, keepdim=True)
    if center_only:
        return centered.reshape(weight.shape).to(weight.dtype)
    var = centered.square().sum(dim=1, keepdim=True) / (rows.shape[1] - correction)
    if std_mode:
        tiny = torch.finfo(acc).tiny
        std = torch.where(var > 0, var.clamp_min(tiny).sqrt(), torch.zeros_like(var))
        w_hat = centered / (std + eps)
    else:
        w_hat = centered * torch.rsqrt(var + eps)
    return w_hat.reshape(weight.shape).to(weight.dtype)


def ws_double_backward(call, weight, grad, functorch=False):
    """WeightStandardizeFunction's backward under create_graph=True or for a batched
    gradient (``is_grads_batched``) (``functorch``: its functorch variant's backward): dW."""
    if weight.numel() == 0:
        return torch.zeros_like(weight)

    def forward(w):
        return ws_forward_differentiable(w, call.eps, call.correction, call.std_mode, call.center_only)

    (dw,) = _pull_back(forward, (weight,), [0], grad, functorch)
    return dw


def ws_jvp(call, weight, tangent, functorch=False):
    """WeightStandardizeFunction's forward-mode derivative: the tangent of W_hat."""
    if weight.numel() == 0:
        return torch.zeros_like(weight)

    def forward(w):
        return ws_forward_differentiable(w, call.eps, call.correction, call.std_mode, call.center_only)

    return _push_forward(forward, (weight,), (tangent,), functorch)
