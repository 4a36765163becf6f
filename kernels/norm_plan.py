"""Launch plans of the BCN / GroupNorm kernels (kernels/norm.py).

A ``NormPlan`` holds everything a call derives from its signature (shape,
strides, dtypes, mode, the launch config): the integers each kernel gets, the
grids, the layout of the fp32 side buffers and one ``Launch`` per kernel
(kernels/launch.py). Building it is the slow part of a call; a repeat call with
the same signature allocates y and one fp32 side buffer (backward: dx and the gradients)
and makes 3 + 3 launches.
This file is the one place where the kernels' arguments are written down: the
eager path, the torch.library ops and the autotuner all launch through it.

Buffers. A call allocates what the floor of an autograd op allocates (its output, and
in backward a gradient per input) plus one fp32 side buffer, kept for the backward:
    stats [6, N, C] (pivot, mean, dm, P, y_hat mean, M2) | rstd_c [C] | rho [N, G]
    | coefficients [3, N, C] (the backward's dx coefficients: its scratch)
The partial sums [2, N, C, n_split] of either pass are scratch too, and live in the
pass's output (y, dx) when it has the bytes: the stats / reduce launch writes them, the
combine reads them, and only then the apply launch writes the output over them (one
stream orders the three). The backward writes each parameter gradient into a tensor
like its parameter (its dtype, rounded as autograd casts), so autograd casts and
reshapes nothing. An allocation is ~2 us of host time, as much as a view of one.
"""
import math

import torch

from . import norm as K
from .launch import ArgTable, DirectLaunches, Slot, all_aligned, direct_stream
from .layout import cdiv, next_pow2, nsc_strides, with_strides

# Value slots a call fills (tensors on the kernel[grid] path, addresses on the
# direct path); the plan's integers and constexprs follow them.
_FWD_SLOTS = ("x", "y", "pivot", "mean", "dm", "p", "ym", "m2", "rstd_c", "rho", "part_a", "part_b",
              "gamma", "beta", "omega", "eta", "rm", "rv", "nbt")
_BWD_SLOTS = ("dy", "x", "dx", "pivot", "mean", "dm", "p", "ym", "m2", "rstd_c", "rho", "part_a", "part_b",
              "ca", "ce", "cc", "d_gamma", "d_beta", "d_omega", "d_eta", "gamma", "omega", "eta")


def _large(c, s, *strides):
    """True when an offset inside one sample can pass 2^31 - 1."""
    return max((c - 1) * abs(sc) + (s - 1) * abs(ss) for sc, ss in strides) >= 2**31 - 1


def _chunking(s, config):
    block_s = config["BLOCK_S"]
    chunk = cdiv(cdiv(s, config["split"]), block_s) * block_s
    return chunk, cdiv(s, chunk)


def _combine_blocks(n, k, n_split, config):
    """(BLOCK_N, BLOCK_K, BLOCK_J) of the combine kernels: the whole group, then as
    many samples and chunks as fit a tile of ~512 values (8 per thread at the 2 warps
    such a tile gets). 4096 values on 128 threads took 255 registers and spilled
    (perf/NOTES.md, "Static kernel report")."""
    block_k = next_pow2(k)
    block_n = max(1, min(next_pow2(n), 512 // block_k))
    block_j = max(1, min(next_pow2(n_split), 512 // (block_k * block_n)))
    return block_n, block_k, config.get("BLOCK_J", block_j)


def _views(buffer, offsets, shapes):
    return [buffer[o:o + _numel(shape)].view(shape) for o, shape in zip(offsets, shapes)]


def _numel(shape):
    total = 1
    for d in shape:
        total *= d
    return total


class NormPlan:
    """The launches of one BCN/GN signature (forward, and backward per dy layout)."""

    def __init__(self, x, num_groups, mode, update_running, cumulative, activation, group_affine,
                 has_bn_affine, has_affine, has_nbt, eps, momentum, config, config_bwd):
        n, c = x.shape[0], x.shape[1]
        s = x.numel() // (n * c)
        k = c // num_groups
        y = torch.empty_like(x)
        self.y_contiguous = nsc_strides(y) is None  # empty_like could not keep a walkable layout
        if self.y_contiguous:
            y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        self.y_stride = y.stride()
        sx, sy = nsc_strides(x), nsc_strides(y)
        self.x_stride = x.stride()  # the backward's launches walk x as the forward did
        self.n, self.c, self.s, self.k, self.num_groups = n, c, s, k, num_groups
        self.sx, self.sy = sx, sy
        self.mode, self.activation, self.group_affine = mode, activation, group_affine
        self.has_bn_affine, self.has_affine = has_bn_affine, has_affine
        self.config_bwd = config_bwd
        self.chunk, self.n_split = _chunking(s, config)
        self.grid = (n * cdiv(c, config["BLOCK_C"]), self.n_split)
        bn, bk, bj = _combine_blocks(n, k, self.n_split, config)
        # the side buffer: saved statistics (fwd_shapes), then the backward's coefficients
        nc = n * c
        self.fwd_shapes = [(nc,)] * 6 + [(c,), (n, num_groups)]
        offsets, self.fwd_size = _layout(self.fwd_shapes + [(nc,)] * 3, blocks=(6, 1, 1, 3))
        self.fwd_offsets, self.coef_offsets = offsets[:8], offsets[8:]
        self.fwd_byte_offsets = [4 * o for o in self.fwd_offsets]
        self.part_size = n * c * self.n_split  # each of the two partial-sum buffers (scratch)
        self.part_stride = _part_stride(self.part_size)
        self.y_bytes = y.numel() * y.element_size()  # y's and dx's: dense, allocated by the plan
        self.f32 = dict(device=x.device, dtype=torch.float32)  # a plan is one device's
        self.part_in_y = _fits(self.part_stride, self.y_bytes)
        t = ArgTable(_FWD_SLOTS)
        S = Slot
        tile = dict(BLOCK_C=config["BLOCK_C"], BLOCK_S=config["BLOCK_S"], NUM_STAGES=config["num_stages"])
        opts = dict(num_warps=config["num_warps"], num_stages=config["num_stages"])
        large = _large(c, s, sx[1:], sy[1:])
        # the combine's arguments but DIST and its buffers: DistNormPlan launches it again with them
        self.combine_options = dict(num_warps=4 if bn * bk * bj >= 1024 else 2)
        self.combine_args = dict(
            Part_mean=S("part_a"), Part_m2=S("part_b"), Pivot=S("pivot"), Gamma=S("gamma"), Beta=S("beta"),
            Running_mean=S("rm"), Running_var=S("rv"), Num_batches=S("nbt"), Mean=S("mean"), Dm=S("dm"),
            Rstd_c=S("rstd_c"), Rho=S("rho"), P=S("p"), Ym=S("ym"), M2=S("m2"),
            N=n, C=c, S=s, K=k, chunk=self.chunk, n_split=self.n_split, momentum=float(momentum),
            eps=float(eps), MODE=mode, HAS_BN_AFFINE=has_bn_affine, UPDATE_RUNNING=update_running,
            CUMULATIVE=cumulative, BLOCK_N=bn, BLOCK_K=bk, BLOCK_J=bj)
        align_x, align_xy = _align(s, self.chunk, sx[0], sx[1]), _align(s, self.chunk, sx[0], sx[1], sy[0], sy[1])
        self.fwd = [
            t.launch(K._norm_stats_kernel, self.grid, opts,
                     X=S("x"), Pivot=S("pivot"), Running_mean=S("rm"), Part_mean=S("part_a"), Part_m2=S("part_b"),
                     C=c, S=s, K=k, stride_xn=sx[0], stride_xc=sx[1], stride_xs=sx[2], chunk=self.chunk,
                     n_split=self.n_split, PIVOT_MODE=0 if mode == K.MODE_GN else (2 if mode == K.MODE_RUNNING else 1),
                     LARGE=large, ALIGN=align_x, **tile),
            t.launch(K._norm_combine_kernel, (num_groups,), self.combine_options, Local=S("part_a"),
                     Glob=S("part_a"), DIST=0, **self.combine_args),
            t.launch(K._norm_apply_kernel, self.grid, opts,
                     X=S("x"), Y=S("y"), Pivot=S("pivot"), Mean=S("mean"), P=S("p"), Ym=S("ym"), Omega=S("omega"),
                     Eta=S("eta"), Num_batches=S("nbt"), C=c, S=s, K=k,
                     stride_xn=sx[0], stride_xc=sx[1], stride_xs=sx[2],
                     stride_yn=sy[0], stride_yc=sy[1], stride_ys=sy[2], chunk=self.chunk,
                     ACT=K.ACTIVATIONS[activation], HAS_AFFINE=has_affine, GROUP_AFFINE=group_affine,
                     INCREMENT=update_running and has_nbt, LARGE=large, ALIGN=align_xy, **tile),
        ]
        self.fwd_constants = t.constants
        dummy = 4 * self.fwd_offsets[6]  # rstd_c: any valid fp32 address, for an absent tensor
        self.fwd_direct = DirectLaunches(
            self.fwd, ("x", "y", "side", "part", "gamma", "beta", "omega", "eta", "rm", "rv", "nbt"),
            ["base = side.data_ptr()", f"dummy = base + {dummy}", "out = y.data_ptr()",
             "part_a = out if part is y else part.data_ptr()"],  # the partial sums in y: one address read
            ["x.data_ptr()", "out"] + [f"base + {o}" for o in self.fwd_byte_offsets]
            + ["part_a", f"part_a + {4 * self.part_stride}"]
            + [f"dummy if {t} is None else {t}.data_ptr()" for t in ("gamma", "beta", "omega", "eta", "rm", "rv", "nbt")],
            t.constants)
        self._bwd = {}  # (dy strides, fp32 gradients or not) -> its _BackwardPlan

    # -- forward -------------------------------------------------------------------
    def alloc_y(self, x):
        if self.y_contiguous:
            return torch.empty(x.shape, dtype=x.dtype, device=x.device)
        return torch.empty_like(x)

    def _output(self, x, out, part_in_out, part_stride):
        """(the pass's output, where its partial sums go): a new output like y holds them
        when they fit (``part_in_out``); a given one (laid out like y) does not."""
        if out is None:
            out = self.alloc_y(x)
            return out, (out if part_in_out else _new_part(x, part_stride))
        if out.stride() != self.y_stride:
            raise RuntimeError("wsbcn: an output's layout differs from the launch plan's")
        return out, _new_part(x, part_stride)

    def forward(self, x, gamma, beta, omega, eta, running_mean, running_var, num_batches, y=None):
        """y and the side buffer (stats | rstd_c | rho | coefficients). The running buffers
        (and num_batches) are updated in place as the mode says. ``y``: write there
        (allocated like x) instead of a new tensor."""
        if y is None and not self.y_contiguous:  # _output's common case, written out: the hot path
            y = torch.empty_like(x)
            part = y if self.part_in_y else _new_part(x, self.part_stride)
        else:
            y, part = self._output(x, y, self.part_in_y, self.part_stride)
        side = torch.empty(self.fwd_size, **self.f32)
        if self.fwd_direct.call(x, y, side, part, gamma, beta, omega, eta, running_mean, running_var, num_batches):
            return y, side
        views = _views(side, self.fwd_offsets, self.fwd_shapes) + list(_part_view(part, self.part_stride).unbind(0))
        dummy = views[6]
        values = [x, y] + views + [dummy if t is None else t
                                   for t in (gamma, beta, omega, eta, running_mean, running_var, num_batches)]
        _run(self.fwd, values, self.fwd_constants, traced=False)
        return y, side

    def forward_op(self, x, gamma, beta, omega, eta, running_mean, running_var, num_batches, traced):
        """The forward of the ``wsbcn::norm_forward`` op: y, stats [6, N, C], rstd_c [C],
        rho [N, G], each a tensor of its own (an op's outputs may not alias). ``traced``
        (torch.compile, export): the launches go through ``wrap_triton``
        (``Launch.traced``) with every buffer a separate tensor, so the tracer sees no
        addresses and no aliasing views; else as ``forward`` launches."""
        n, c = self.n, self.c
        y = self.alloc_y(x)
        f32 = dict(device=x.device, dtype=torch.float32)
        if traced:
            rows = [torch.empty((n * c,), **f32) for _ in range(6)]  # pivot, mean, dm, p, ym, m2
        else:
            stats = torch.empty((6, n, c), **f32)
            rows = list(stats.view(6, n * c).unbind(0))
        # GN has no BN stage and leaves rstd_c unwritten; an op's output holds defined
        # values: 1, as in the torch closed form
        rstd_c = (torch.ones if self.mode == K.MODE_GN else torch.empty)((c,), **f32)
        rho = torch.empty((n, self.num_groups), **f32)
        parts = [torch.empty((self.part_stride,), **f32) for _ in range(2)]
        dummy = torch.empty((1,), **f32) if traced else rstd_c  # for an absent tensor: never accessed
        values = [x, y] + rows + [rstd_c, rho] + parts
        values += [dummy if t is None else t for t in (gamma, beta, omega, eta, running_mean, running_var, num_batches)]
        _run(self.fwd, values, self.fwd_constants, traced)
        return y, torch.stack(rows).view(6, n, c) if traced else stats, rstd_c, rho

    def saved_views(self, side):
        """(stats [6, N, C], rstd_c [C], rho [N, G]) of a forward's side buffer."""
        n, c = self.n, self.c
        o = self.fwd_offsets
        return (side[:6 * n * c].view(6, n, c), side[o[6]:o[6] + c],
                side[o[7]:o[7] + n * self.num_groups].view(n, self.num_groups))

    # -- backward ------------------------------------------------------------------
    def _backward_plan(self, dy, fp32_grads=False):
        """The backward's launches for ``dy``'s layout, writing the parameter gradients
        like the parameters (the eager path) or, with ``fp32_grads``, as fp32 vectors
        (the op's outputs). Triton compiles a kernel per pointer dtype, and the plan's
        parameters have one dtype each (the plan's signature), so one plan per both
        suffices."""
        key = (dy.stride(), fp32_grads)
        found = self._bwd.get(key)
        if found is None:
            found = self._bwd[key] = _BackwardPlan(self, dy)
        return found

    def backward(self, dy, x, saved, gamma, beta, omega, eta, dx=None, fp32_grads=False):
        """dx and the parameter gradients (d_gamma, d_beta, d_omega, d_eta; None for an
        absent parameter): each a new tensor like its parameter (``beta``, ``eta``: None
        for one like gamma's, omega's), or with ``fp32_grads`` fp32 vectors. ``saved``
        is the forward's side buffer (whose coefficient rows the backward uses as
        scratch) or its (stats, rstd_c, rho). A ``dy`` whose spatial dims one stride
        cannot walk is copied first, an x in another layout than the forward's too."""
        if x.stride() != self.x_stride:  # a saved-tensor hook's x (save_on_cpu gives channels_last back as NCHW)
            x = with_strides(x, self.x_stride)
        stride = dy.stride()
        if stride != self.y_stride and nsc_strides(dy) is None:
            dy = dy.contiguous()
            stride = dy.stride()
        plan = self._bwd.get((stride, fp32_grads)) or self._backward_plan(dy, fp32_grads)
        dx, part = self._output(x, dx, plan.part_in_dx, plan.part_stride)
        d_gamma, d_beta, d_omega, d_eta = plan.fp32_grads(x) if fp32_grads else _grads_like(gamma, beta, omega, eta)
        if not isinstance(saved, tuple) and plan.direct.call(dy, x, dx, saved, part, d_gamma, d_beta, d_omega, d_eta,
                                                             gamma, omega, eta):
            return dx, d_gamma, d_beta, d_omega, d_eta
        f32 = dict(device=x.device, dtype=torch.float32)
        if isinstance(saved, tuple):
            stats, rstd_c, rho = saved
            saved_views = list(stats.unbind(0)) + [rstd_c, rho]
            coefs = list(torch.empty((3, self.n * self.c), **f32).unbind(0))
        else:
            saved_views = _views(saved, self.fwd_offsets, self.fwd_shapes)
            coefs = _views(saved, self.coef_offsets, [(self.n * self.c,)] * 3)
        dummy = saved_views[6]
        grads = [dummy if g is None else g for g in (d_gamma, d_beta, d_omega, d_eta)]
        values = ([dy, x, dx] + saved_views + list(_part_view(part, plan.part_stride).unbind(0)) + coefs + grads
                  + [dummy if t is None else t for t in (gamma, omega, eta)])
        _run(plan.launches, values, plan.constants, traced=False)
        return dx, d_gamma, d_beta, d_omega, d_eta

    def backward_op(self, dy, x, stats, rstd_c, rho, gamma, omega, eta, traced):
        """The backward of the ``wsbcn::norm_backward`` op: ``backward``'s launches with
        every buffer a tensor of its own (``traced``: through ``wrap_triton``). Returns
        dx and the fp32 parameter gradients (empty for absent parameters)."""
        if dy.stride() != self.y_stride and nsc_strides(dy) is None:
            dy = dy.contiguous()
        plan = self._backward_plan(dy, fp32_grads=True)
        dx = self.alloc_y(x)
        f32 = dict(device=x.device, dtype=torch.float32)
        nc = self.n * self.c
        scratch = [torch.empty((plan.part_stride,), **f32) for _ in range(2)] + [torch.empty((nc,), **f32)
                                                                                 for _ in range(3)]
        grads = [torch.empty((m,), **f32) for m in plan.grad_lengths]
        dummy = torch.empty((1,), **f32) if traced else rstd_c  # for an absent tensor: never accessed
        values = [dy, x, dx] + list(stats.unbind(0)) + [rstd_c, rho] + scratch
        values += [g if g.numel() else dummy for g in grads]
        values += [dummy if t is None else t for t in (gamma, omega, eta)]
        _run(plan.launches, values, plan.constants, traced)
        return (dx,) + tuple(grads)


class _BackwardPlan:
    """The backward launches of a NormPlan for one dy layout: ``launches``,
    ``constants``, the direct path (``direct``: the call's tensors, partial sums in
    ``part``) and where the partial sums go (``part_in_dx``, ``part_stride``)."""

    __slots__ = ("launches", "constants", "direct", "part_stride", "part_in_dx", "grad_lengths")

    def __init__(self, plan, dy):
        n, c, s, k, num_groups = plan.n, plan.c, plan.s, plan.k, plan.num_groups
        sx, sd, so = plan.sx, nsc_strides(dy), plan.sy  # dx is allocated like y
        large = _large(c, s, sx[1:], sd[1:], so[1:])
        config = plan.config_bwd
        chunk, n_split = _chunking(s, config)
        grid = (n * cdiv(c, config["BLOCK_C"]), n_split)
        bn, bk, bj = _combine_blocks(n, k, n_split, config)
        aff = num_groups if plan.group_affine else c
        bn_len = c if plan.has_bn_affine else 0
        aff_len = aff if plan.has_affine else 0
        self.grad_lengths = (bn_len, bn_len, aff_len, aff_len)
        self.part_stride = _part_stride(n * c * n_split)
        self.part_in_dx = _fits(self.part_stride, plan.y_bytes)
        t = ArgTable(_BWD_SLOTS)
        S = Slot
        tile = dict(BLOCK_C=config["BLOCK_C"], BLOCK_S=config["BLOCK_S"], NUM_STAGES=config["num_stages"])
        opts = dict(num_warps=config["num_warps"], num_stages=config["num_stages"])
        act = K.ACTIVATIONS[plan.activation]
        common = dict(ACT=act, HAS_AFFINE=plan.has_affine, GROUP_AFFINE=plan.group_affine, LARGE=large, **tile)
        # the backward combine's arguments but DIST and its buffers (the same for every dy layout):
        # DistNormPlan launches it again with them
        plan.bwd_combine_options = dict(num_warps=4 if bn * bk * bj >= 1024 else 2)
        plan.bwd_combine_args = dict(
            Part_d1=S("part_a"), Part_de=S("part_b"), Rstd_c=S("rstd_c"), Rho=S("rho"), Dm=S("dm"), P=S("p"),
            Ym=S("ym"), M2=S("m2"), Gamma=S("gamma"), Omega=S("omega"), Dgamma=S("d_gamma"),
            Dbeta=S("d_beta"), Domega=S("d_omega"), Deta=S("d_eta"), CA=S("ca"), CE=S("ce"), CC=S("cc"),
            N=n, C=c, S=s, K=k, n_split=n_split, MODE=plan.mode, HAS_BN_AFFINE=plan.has_bn_affine,
            HAS_AFFINE=plan.has_affine, GROUP_AFFINE=plan.group_affine, BLOCK_N=bn, BLOCK_K=bk, BLOCK_J=bj)
        align_xd = _align(s, chunk, sx[0], sx[1], sd[0], sd[1])
        align_xdo = _align(s, chunk, sx[0], sx[1], sd[0], sd[1], so[0], so[1])
        self.launches = [
            t.launch(K._norm_bwd_reduce_kernel, grid, opts,
                     Dy=S("dy"), X=S("x"), Pivot=S("pivot"), Mean=S("mean"), P=S("p"), Ym=S("ym"), Omega=S("omega"),
                     Eta=S("eta"), Part_d1=S("part_a"), Part_de=S("part_b"), C=c, S=s, K=k,
                     stride_xn=sx[0], stride_xc=sx[1], stride_xs=sx[2],
                     stride_dn=sd[0], stride_dc=sd[1], stride_ds=sd[2], chunk=chunk, n_split=n_split,
                     ALIGN=align_xd, **common),
            t.launch(K._norm_bwd_combine_kernel, (num_groups,), plan.bwd_combine_options, Gsum=S("part_a"),
                     Glob=S("part_a"), DIST=0, **plan.bwd_combine_args),
            t.launch(K._norm_bwd_apply_kernel, grid, opts,
                     Dy=S("dy"), X=S("x"), Dx=S("dx"), Pivot=S("pivot"), Mean=S("mean"), P=S("p"), Ym=S("ym"),
                     Omega=S("omega"), Eta=S("eta"), CA=S("ca"), CE=S("ce"), CC=S("cc"), C=c, S=s, K=k,
                     stride_xn=sx[0], stride_xc=sx[1], stride_xs=sx[2],
                     stride_dn=sd[0], stride_dc=sd[1], stride_ds=sd[2],
                     stride_on=so[0], stride_oc=so[1], stride_os=so[2], chunk=chunk, ALIGN=align_xdo, **common),
        ]
        self.constants = t.constants
        # the direct path: saved statistics and coefficients in the side buffer, an absent
        # tensor at rstd_c (any valid fp32 address: its HAS_* flag is off, never accessed)
        self.direct = DirectLaunches(
            self.launches, ("dy", "x", "dx", "side", "part", "d_gamma", "d_beta", "d_omega", "d_eta", "gamma", "omega",
                            "eta"),
            ["saved = side.data_ptr()", "out = dx.data_ptr()", "part_a = out if part is dx else part.data_ptr()",
             f"dummy = saved + {4 * plan.fwd_offsets[6]}"],
            ["dy.data_ptr()", "x.data_ptr()", "out"] + [f"saved + {o}" for o in plan.fwd_byte_offsets]
            + ["part_a", f"part_a + {4 * self.part_stride}"] + [f"saved + {4 * o}" for o in plan.coef_offsets]
            + [f"dummy if {t} is None else {t}.data_ptr()"
               for t in ("d_gamma", "d_beta", "d_omega", "d_eta", "gamma", "omega", "eta")],
            t.constants)

    def fp32_grads(self, x):
        """fp32 (d_gamma, d_beta, d_omega, d_eta) vectors, None for an absent parameter."""
        return tuple(torch.empty((m,), device=x.device, dtype=torch.float32) if m else None
                     for m in self.grad_lengths)


def _part_stride(size):
    """Elements from one partial-sum buffer to the next: ``size`` rounded up to 16 bytes,
    so that both start aligned (triton specialises pointers on 16-byte alignment)."""
    return cdiv(size, 4) * 4


def _fits(part_stride, nbytes):
    """Whether the two fp32 partial-sum buffers fit in ``nbytes``."""
    return 8 * part_stride <= nbytes


def _grads_like(gamma, beta, omega, eta):
    """A new gradient like each parameter (its dtype and shape; None where absent):
    ``beta`` and ``eta`` None give ones like gamma's and omega's."""
    d_gamma = d_beta = d_omega = d_eta = None
    if gamma is not None:
        d_gamma, d_beta = torch.empty_like(gamma), torch.empty_like(gamma if beta is None else beta)
    if omega is not None:
        d_omega, d_eta = torch.empty_like(omega), torch.empty_like(omega if eta is None else eta)
    return d_gamma, d_beta, d_omega, d_eta


def _new_part(x, part_stride):
    return torch.empty((2, part_stride), device=x.device, dtype=torch.float32)


def _part_view(part, part_stride):
    """The partial sums [2, part_stride] as an fp32 tensor: ``part`` itself, or a view
    of the bytes of the output that holds them (the kernel[grid] path)."""
    if part.dtype == torch.float32 and part.shape == (2, part_stride):
        return part
    flat = torch.empty((0,), device=part.device, dtype=torch.float32)
    return flat.set_(part.untyped_storage(), 0, (2, part_stride), (part_stride, 1))


def _run(launches, values, constants, traced):
    """Launch ``launches`` with the tensors ``values``: through ``wrap_triton`` when
    ``traced``, else directly when every pointer is aligned (``kernel[grid]`` if not).
    The eager ``forward``/``backward`` try the direct launch first with addresses
    computed from their one side buffer, and come here when they cannot."""
    if traced:
        for launch in launches:
            launch.traced(values + constants)
        return
    stream = direct_stream(launches)
    addresses = [v.data_ptr() for v in values]
    aligned = all_aligned(addresses)
    if stream is not None and aligned:
        for launch in launches:
            launch.direct(addresses + constants, stream)
        return
    for launch in launches:
        launch.jit(values + constants, aligned)


def _align(*lengths) -> int:
    """The largest power of two, at most 16, dividing every one of ``lengths`` (S,
    the chunk, the element strides over samples and channels): the tiled kernels'
    ALIGN, a promise that every per-sample and per-channel offset and both ends of
    every chunk are multiples of it."""
    g = 0
    for st in lengths:
        g = math.gcd(g, abs(st))
    return 16 if g == 0 else min(16, g & -g)


def _layout(shapes, blocks):
    """(start of each buffer in fp32 elements, total) for ``shapes`` packed in
    groups of ``blocks`` buffers: buffers of a group lie back to back (stats is one
    [6, N, C] tensor), each group starts on a 16-byte boundary."""
    offsets, at, i = [], 0, 0
    for count in blocks:
        at = cdiv(at, 4) * 4
        for shape in shapes[i:i + count]:
            offsets.append(at)
            at += _numel(shape)
        i += count
    return offsets, at


def norm_forward(x, y, gamma, beta, omega, eta, running_mean, running_var, num_batches,
                 num_groups, eps, momentum, cumulative, mode, update_running, activation,
                 group_affine, config):
    """The 3 forward launches with one ``config`` (the autotuner and the AOT tool),
    writing ``y`` (allocated like x). Returns (stats [6, N, C], rstd_c [C], rho [N, G]);
    the running buffers and ``num_batches`` are updated in place. The arguments are
    those of kernels/norm_plan.py, the one place that writes them down."""
    plan = NormPlan(x, num_groups, mode, update_running, cumulative, activation, group_affine, gamma is not None,
                    omega is not None, num_batches is not None, eps, momentum, config, config)
    _, side = plan.forward(x, gamma, beta, omega, eta, running_mean, running_var, num_batches, y=y)
    return plan.saved_views(side)


def norm_backward(dy, x, dx, stats, rstd_c, rho, gamma, omega, eta, num_groups, mode,
                  activation, group_affine, config):
    """The 3 backward launches with one ``config``, writing ``dx`` (allocated like x).
    Returns fp32 (d_gamma, d_beta, d_omega, d_eta); None for absent parameters."""
    plan = NormPlan(x, num_groups, mode, False, False, activation, group_affine, gamma is not None,
                    omega is not None, False, 1e-5, 0.0, config, config)
    return plan.backward(dy, x, (stats, rstd_c, rho), gamma, None, omega, eta, dx=dx, fp32_grads=True)[1:]


# -- across processes ----------------------------------------------------------------

_DIST_FWD_SLOTS = _FWD_SLOTS + ("local", "gathered", "glob")
_DIST_BWD_SLOTS = _BWD_SLOTS + ("gsum", "glob")


class DistNormPlan:
    """The launches of BCN across processes (a ``process_group``; MODE_BATCH or
    MODE_ESTIMATE), built on the ``NormPlan`` of the same signature, whose stats and
    apply launches (and the backward's reduce and apply) run as they are. The
    collectives are the caller's (wsbcn/ops/norm_distributed.py), passed in as
    functions: kernels never call torch.distributed.

    Forward, 5 launches around one all_gather: stats | combine DIST 1 (this rank's
    moments per channel: a fp64 row, kernels/norm.py LOCAL_ROWS) | ``gather(row)`` ->
    [R, row] | _norm_rank_merge_kernel (the whole batch's statistics, the running
    buffers) | combine DIST 2 (group statistics and coefficients, as in one process)
    | apply. Backward with batch statistics, 4 launches around one all_reduce: reduce |
    combine DIST 1 (this rank's parameter gradients; d_gamma, d_beta sums, fp64 [2, C])
    | ``all_reduce(sums)`` | combine DIST 2 (the dx coefficients) | apply. With
    estimates the backward needs no collective: ``NormPlan.backward`` on the side buffer.

    The side buffer is the NormPlan's followed by ``glob``, fp32 [2 C + 1] at a 16-byte
    boundary (shift_c and r_c per channel, then the whole batch's count of values per
    channel), so ``NormPlan.backward`` and ``saved_views`` read it as their own.

    Repeat calls launch directly (kernels/launch.py ``DirectLaunches``), as NormPlan's
    do: each way one generated function before the collective and one after, with
    NormPlan's slots and address code followed by this plan's (row, rows, glob; sums,
    glob), so a call builds no views and no value lists."""

    def __init__(self, plan, world):
        self.plan, self.world = plan, world
        c = plan.c
        self.row_len = K.local_row_len(c)
        self.glob_offset = cdiv(plan.fwd_size, 4) * 4
        self.side_size = self.glob_offset + 2 * c + 1
        self.header_checked = False  # set by the caller once it compared the ranks' headers
        args = plan.combine_args
        block = min(256, next_pow2(c))
        t = ArgTable(_DIST_FWD_SLOTS)
        S = Slot
        self.fwd_local = [t.launch(K._norm_combine_kernel, (plan.num_groups,), plan.combine_options,
                                   Local=S("local"), Glob=S("glob"), DIST=1, **args)]
        self.fwd_merge = [
            t.launch(K._norm_rank_merge_kernel, (cdiv(c, block),), dict(num_warps=4 if block >= 256 else 2),
                     Gathered=S("gathered"), Local=S("local"), Running_mean=S("rm"), Running_var=S("rv"),
                     Num_batches=S("nbt"), Glob=S("glob"), C=c, R=world, momentum=args["momentum"], eps=args["eps"],
                     MODE=args["MODE"], UPDATE_RUNNING=args["UPDATE_RUNNING"], CUMULATIVE=args["CUMULATIVE"],
                     BLOCK=block),
            t.launch(K._norm_combine_kernel, (plan.num_groups,), plan.combine_options,
                     Local=S("local"), Glob=S("glob"), DIST=2, **args),
        ]
        self.fwd_constants = t.constants
        # the direct path (NormPlan's): two generated functions, before and after the
        # collective, with NormPlan's slots and addresses and then local, gathered, glob
        fd, glob = plan.fwd_direct, 4 * self.glob_offset
        ours, theirs = (len(_DIST_FWD_SLOTS), self.fwd_constants), (len(_FWD_SLOTS), plan.fwd_constants)
        prelude = fd.prelude + [f"glob = base + {glob}"]
        self.fwd_direct_local = DirectLaunches(
            plan.fwd[:1] + self.fwd_local, fd.params + ("row",), prelude,
            fd.slot_code + ["row.data_ptr()", "row.data_ptr()", "glob"], None, [theirs, ours])
        self.fwd_direct_merged = DirectLaunches(
            self.fwd_merge + plan.fwd[2:], fd.params + ("row", "rows"), prelude,
            fd.slot_code + ["row.data_ptr()", "rows.data_ptr()", "glob"], None, [ours, ours, theirs])
        self.bwd = None  # (combine DIST 1, combine DIST 2, constants): built with the first backward
        self._bwd_direct = {}  # dy strides -> the backward's two direct functions

    def _forward_values(self, x, y, side, part, gamma, beta, omega, eta, running_mean, running_var, num_batches):
        """The kernel[grid] path's values (NormPlan's slots) and the glob view."""
        plan = self.plan
        views = _views(side, plan.fwd_offsets, plan.fwd_shapes) + list(_part_view(part, plan.part_stride).unbind(0))
        dummy = views[6]
        values = [x, y] + views + [dummy if t is None else t
                                   for t in (gamma, beta, omega, eta, running_mean, running_var, num_batches)]
        return values, side[self.glob_offset:]

    def forward(self, x, gamma, beta, omega, eta, running_mean, running_var, num_batches, gather):
        """y and the side buffer; ``gather(row)`` returns every rank's row [R, row_len]
        (this rank's included) in rank order. The running buffers and ``num_batches``
        are updated in place, the same on every rank. Launches go direct as
        NormPlan's do (kernels/launch.py), else through ``kernel[grid]``."""
        plan = self.plan
        y = plan.alloc_y(x)
        side = torch.empty((self.side_size,), device=x.device, dtype=torch.float32)
        part = y if plan.part_in_y else _new_part(x, plan.part_stride)
        row = torch.empty((self.row_len,), device=x.device, dtype=torch.float64)
        tensors = (x, y, side, part, gamma, beta, omega, eta, running_mean, running_var, num_batches)
        values = None
        if not self.fwd_direct_local.call(*tensors, row):
            values, glob = self._forward_values(*tensors)
            _run(plan.fwd[:1], values, plan.fwd_constants, traced=False)
            _run(self.fwd_local, values + [row, row, glob], self.fwd_constants, traced=False)
        rows = gather(row)
        if self.fwd_direct_merged.call(*tensors, row, rows):
            return y, side
        if values is None:
            values, glob = self._forward_values(*tensors)
        _run(self.fwd_merge, values + [row, rows, glob], self.fwd_constants, traced=False)
        _run(plan.fwd[2:], values, plan.fwd_constants, traced=False)
        return y, side

    def _backward_direct(self, dy, backward_plan):
        """The backward's two direct functions for this dy layout (NormPlan's slots and
        addresses, then gsum, glob), before and after the all_reduce."""
        key = dy.stride()
        found = self._bwd_direct.get(key)
        if found is None:
            launches, constants, direct = backward_plan.launches, backward_plan.constants, backward_plan.direct
            local, merged, my_constants = self.bwd
            ours, theirs = (len(_DIST_BWD_SLOTS), my_constants), (len(_BWD_SLOTS), constants)
            prelude = direct.prelude + [f"glob = saved + {4 * self.glob_offset}"]
            slot_code = direct.slot_code + ["sums.data_ptr()", "glob"]
            found = self._bwd_direct[key] = (
                DirectLaunches(launches[:1] + local, direct.params + ("sums",), prelude, slot_code, None,
                               [theirs, ours]),
                DirectLaunches(merged + launches[2:], direct.params + ("sums",), prelude, slot_code, None,
                               [ours, theirs]))
        return found

    def backward(self, dy, x, side, gamma, beta, omega, eta, all_reduce):
        """dx and the parameter gradients of this rank's batch, as ``NormPlan.backward``
        (each like its parameter); ``all_reduce(sums)`` sums a fp64 [2, C] tensor over
        the ranks (in place or not) and returns it. Batch statistics only."""
        plan = self.plan
        if x.stride() != plan.x_stride:  # a saved-tensor hook's x
            x = with_strides(x, plan.x_stride)
        if dy.stride() != plan.y_stride and nsc_strides(dy) is None:
            dy = dy.contiguous()
        backward_plan = plan._backward_plan(dy)
        launches, constants = backward_plan.launches, backward_plan.constants
        if self.bwd is None:
            t = ArgTable(_DIST_BWD_SLOTS)
            S = Slot
            local, merged = (t.launch(K._norm_bwd_combine_kernel, (plan.num_groups,), plan.bwd_combine_options,
                                      Gsum=S("gsum"), Glob=S("glob"), DIST=dist, **plan.bwd_combine_args)
                             for dist in (1, 2))
            self.bwd = [local], [merged], t.constants
        local, merged, my_constants = self.bwd
        direct_local, direct_merged = self._backward_direct(dy, backward_plan)
        dx = plan.alloc_y(x)
        part = dx if backward_plan.part_in_dx else _new_part(x, backward_plan.part_stride)
        d_gamma, d_beta, d_omega, d_eta = _grads_like(gamma, beta, omega, eta)
        sums = torch.empty((2, plan.c), device=x.device, dtype=torch.float64)
        tensors = (dy, x, dx, side, part, d_gamma, d_beta, d_omega, d_eta, gamma, omega, eta)
        values = None
        if not direct_local.call(*tensors, sums):
            values, glob = self._backward_values(tensors, backward_plan.part_stride)
            _run(launches[:1], values, constants, traced=False)
            _run(local, values + [sums, glob], my_constants, traced=False)
        sums = all_reduce(sums)
        if not direct_merged.call(*tensors, sums):
            if values is None:
                values, glob = self._backward_values(tensors, backward_plan.part_stride)
            _run(merged, values + [sums, glob], my_constants, traced=False)
            _run(launches[2:], values, constants, traced=False)
        return dx, d_gamma, d_beta, d_omega, d_eta

    def _backward_values(self, tensors, part_stride):
        """The kernel[grid] path's values (NormPlan's backward slots) and the glob view."""
        plan = self.plan
        dy, x, dx, side, part, d_gamma, d_beta, d_omega, d_eta, gamma, omega, eta = tensors
        saved = _views(side, plan.fwd_offsets, plan.fwd_shapes)
        dummy = saved[6]
        coefs = _views(side, plan.coef_offsets, [(plan.n * plan.c,)] * 3)
        values = ([dy, x, dx] + saved + list(_part_view(part, part_stride).unbind(0)) + coefs
                  + [dummy if t is None else t for t in (d_gamma, d_beta, d_omega, d_eta, gamma, omega, eta)])
        return values, side[self.glob_offset:]
