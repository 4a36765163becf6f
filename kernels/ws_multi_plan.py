"""Launch plan of model-wide Weight Standardization (kernels/ws_multi.py).

A ``WSMultiPlan`` covers one pack: row-dense weights of one dtype on one device, in
a fixed order, each with its own eps, correction, mode and per-layer BLOCK (the
BLOCK its own ``WSPlan`` would take). It holds everything their signature fixes:

- the launches: usually one each way. A weight whose rows loop (fan_in > B) with
  a B below the largest B of the pack goes into a launch of its own B (never on a
  GPU, where every looping row has the cap as its B; tests force it);
- the outputs: W_hat (and dW) of every weight in one flat buffer, each weight a
  view laid out as the weight (same strides), made by one ``split_with_sizes`` per
  run of weights with the same trailing shape and layout (fewer Python calls than a
  view per weight: at micro-batch sizes the eager path is host time);
- the per-weight tables (fp32 denom/eps, int32 weight of each program, int64 meta).

The kernels reach weight i at an element offset from the first weight (``W``): the
offsets depend on where the weights live, so the meta table is built per set of
addresses, and kept (weights do not move between steps). The backward's gradients
are new tensors every step: their offsets from the first gradient are a table of
their own, kept per set of addresses too (a caching allocator hands a training
loop the same addresses step after step). Tables reach a GPU by a non-blocking copy
from pinned memory (no host sync, and a CUDA graph capture can record it).

Traced (torch.compile, export), the weights and gradients are packed into one flat
tensor each first (torch.cat): a traced launch cannot take addresses.
"""
import operator

import torch

from . import ws_multi as K
from .launch import ArgTable, Slot, all_aligned, direct_stream

_CACHED_ADDRESS_SETS = 8  # address tables kept per plan (and per direction)


def memory_order(shape, stride):
    """Dims 1.. by decreasing stride (ties in order): the order in which a row-dense
    weight lays out each row (as ops/ws.py's ``row_dense`` reads it)."""
    return tuple(sorted(range(1, len(shape)), key=lambda d: -stride[d]))


class _Group:
    """One launch each way over some of the pack's weights."""

    def __init__(self, indices, block):
        self.indices, self.block = indices, block


def _groups(fan_ins, blocks):
    """Weights per launch: one launch of the largest B, plus one per other B of a
    weight whose rows loop (fan_in > B)."""
    top = max(blocks)
    by_block = {}
    for i, (fan_in, block) in enumerate(zip(fan_ins, blocks)):
        key = block if fan_in > block and block != top else top
        by_block.setdefault(key, []).append(i)
    return [_Group(by_block[b], b) for b in sorted(by_block, reverse=True)]


class PackLayout:
    """Where each weight of a pack lies in the flat buffers (W_hat, dW; the packed copy
    of the traced path), each in its memory order. ``grouped``: weights of one trailing
    shape and layout side by side, so that one ``as_strided`` and one
    ``split_with_sizes`` per run make all their views (the eager path: fewer Python
    calls); else in order, one ``as_strided`` each (the ops' layout: it never compares
    sizes, which may be symbolic under torch.compile). Plain Python on shapes and
    strides: torch.compile traces it where it makes the views of an op's outputs."""

    def __init__(self, shapes, strides, grouped=True):
        n = len(shapes)
        outs = [shape[0] for shape in shapes]
        numels = [_prod(shape) for shape in shapes]
        self.numel = sum(numels)
        self.orders = [memory_order(shape, stride) for shape, stride in zip(shapes, strides)]
        runs = {}
        for i in range(n):
            key = (tuple(shapes[i][d] for d in self.orders[i]), self.orders[i]) if grouped else i
            runs.setdefault(key, []).append(i)
        self.out_offset = [0] * n
        self.runs = []  # (shape, strides, start, sizes along dim 0): one as_strided view per run
        self.run_numels = []  # elements of each run
        self.flat_order = []  # the weights in their order in the flat buffer
        start = 0
        for members in runs.values():
            order = self.orders[members[0]]
            trailing = tuple(shapes[members[0]][d] for d in order)
            stop = start
            for i in members:
                self.out_offset[i] = stop
                stop += numels[i]
            # the run is one tensor (sum of outs, *trailing) in memory order, seen in the
            # weights' dim order: strides of the memory order, permuted back
            memory_shape = (sum(outs[i] for i in members),) + trailing
            memory_stride = _contiguous_strides(memory_shape)
            shape, stride = [0] * len(memory_shape), [0] * len(memory_shape)
            for position, d in enumerate((0,) + order):
                shape[d], stride[d] = memory_shape[position], memory_stride[position]
            self.runs.append((tuple(shape), tuple(stride), start, [outs[i] for i in members]))
            self.run_numels.append(stop - start)
            self.flat_order += members
            start = stop
        self.gather = [self.flat_order.index(i) for i in range(n)]
        self._pick = operator.itemgetter(*self.gather) if n > 1 else None

    def views(self, flat):
        """Each weight's part of ``flat``, shaped and strided as the weight, in pack order.
        Traced, ``flat`` (all of it: an op's output) is split first and each run viewed
        in its own part: torch 2.11's compiled autograd.Function gives zero gradients
        to outputs that are ``as_strided`` views (or slices) of one tensor, but not to
        ``split``'s (fixed by 2.13; model-wide WS returns these views as its W_hat)."""
        if torch.compiler.is_compiling():
            parts = []
            for (shape, stride, _, sizes), part in zip(self.runs, flat.split_with_sizes(self.run_numels)):
                v = part.as_strided(shape, stride)
                parts += v.split_with_sizes(sizes) if len(sizes) > 1 else [v]
            return tuple(parts[k] for k in self.gather)
        parts = []
        for shape, stride, start, sizes in self.runs:
            v = flat.as_strided(shape, stride, start)
            if len(sizes) > 1:
                parts += v.split_with_sizes(sizes)
            else:
                parts.append(v)
        return self._pick(parts) if self._pick is not None else tuple(parts)

    def pack(self, tensors):
        """One flat tensor of ``tensors`` (one per weight, shaped as it), each in its
        weight's memory order at its offset: the traced path's input."""
        return torch.cat([tensors[i].permute((0,) + self.orders[i]).reshape(-1) for i in self.flat_order])


class WSMultiPlan:
    """Forward and backward launches of a pack (see the module docstring).

    ``specs``: per weight (shape, stride, eps, correction, std_mode); ``configs_fwd``
    / ``configs_bwd``: per weight the launch config its own WSPlan gets (BLOCK,
    num_warps); all weights of ``dtype`` on ``device``, row dense, non-empty."""

    def __init__(self, specs, dtype, device, configs_fwd, configs_bwd, grouped=True):
        self.n = n = len(specs)
        self.dtype, self.device = dtype, device
        self.element_size = torch.empty((), dtype=dtype).element_size()
        shapes = [tuple(s[0]) for s in specs]
        strides = [tuple(s[1]) for s in specs]
        outs = [shape[0] for shape in shapes]
        numels = [operator.mul(o, _prod(shape[1:])) for o, shape in zip(outs, shapes)]
        fan_ins = [numel // o for numel, o in zip(numels, outs)]
        self.rows = sum(outs)
        self.numel = sum(numels)
        self.contiguous = all(_is_contiguous(shape, stride) for shape, stride in zip(shapes, strides))
        self.strides = strides

        self.layout = PackLayout(shapes, strides, grouped)
        self.out_offset = self.layout.out_offset

        # Statistics rows in pack order.
        self.stat_row = [sum(outs[:i]) for i in range(n)]
        # Tables are Python lists here, tensors when first needed: a plan may be built
        # inside a traced op body, where every tensor made is a fake one.
        self.scal = [[float(f - s[3]), float(s[2])] for f, s in zip(fan_ins, specs)]
        std = [int(bool(s[4])) for s in specs]

        self.passes = {}
        for name, configs in (("fwd", configs_fwd), ("bwd", configs_bwd)):
            blocks = [c["BLOCK"] for c in configs]
            groups = _groups(fan_ins, blocks)
            first_prog = [0] * n
            for g in groups:
                prog, count = [], 0
                for i in g.indices:
                    first_prog[i] = count
                    prog += [i] * outs[i]
                    count += outs[i]
                g.prog = prog
                g.programs = count
                widest = max(g.indices, key=lambda i: blocks[i])
                g.options = dict(num_warps=configs[widest]["num_warps"])
            # meta without the weight offsets (column M_W_OFF): filled per set of addresses
            meta = [[0, self.out_offset[i], first_prog[i], self.stat_row[i], fan_ins[i], blocks[i].bit_length() - 1,
                     std[i]] for i in range(n)]
            self.passes[name] = (groups, meta)
        self._device_tables = None
        self._meta = {}  # weight addresses -> (meta_fwd, meta_bwd) on the device
        self._grad_offsets = {}  # gradient addresses -> int64 [n] on the device

        t = ArgTable(("w", "w_hat", "stats", "prog", "meta", "scal"))
        self.fwd = [t.launch(K._ws_multi_fwd_kernel, (g.programs,), g.options, W=Slot("w"), W_hat=Slot("w_hat"),
                             Stats=Slot("stats"), Prog=Slot("prog"), Meta=Slot("meta"), Scal=Slot("scal"),
                             total_rows=self.rows, BLOCK=g.block) for g in self.passes["fwd"][0]]
        self.fwd_constants = t.constants
        t = ArgTable(("grad", "w", "dw", "stats", "prog", "meta", "g_off"))
        self.bwd = [t.launch(K._ws_multi_bwd_kernel, (g.programs,), g.options, Grad=Slot("grad"), W=Slot("w"),
                             Dw=Slot("dw"), Stats=Slot("stats"), Prog=Slot("prog"), Meta=Slot("meta"),
                             G_off=Slot("g_off"), total_rows=self.rows, BLOCK=g.block)
                    for g in self.passes["bwd"][0]]
        self.bwd_constants = t.constants

    # --- tables ----------------------------------------------------------------------

    def _upload(self, t):
        """``t`` (a CPU tensor) on the plan's device: from pinned memory, non-blocking,
        on a GPU. The pinned copy is dropped at once: torch's pinned-memory cache hands
        its block out again only after the copy ran (an event), and never one taken and
        used while a CUDA graph is captured (a replay copies from it again; torch >= 2.11,
        at::CachingHostAllocator)."""
        if self.device.type == "cpu":
            return t
        return t.pin_memory().to(self.device, non_blocking=True)

    def _static_tables(self):
        if self._device_tables is None:
            self._device_tables = (self._upload(torch.tensor(self.scal, dtype=torch.float32)),
                                   {name: [self._upload(torch.tensor(g.prog, dtype=torch.int32)) for g in groups]
                                    for name, (groups, _) in self.passes.items()})
        return self._device_tables

    def _offsets(self, addresses):
        """Element offsets of ``addresses`` from the first, or None when one is not a
        whole number of elements away (then the caller copies)."""
        first, size = addresses[0], self.element_size
        offsets = [a - first for a in addresses]
        if any(o % size for o in offsets):
            return None
        return [o // size for o in offsets]

    def meta_for(self, addresses):
        """(meta_fwd, meta_bwd) on the device for weights at ``addresses`` (a tuple),
        or None when their offsets are not whole elements."""
        found = self._meta.get(addresses)
        if found is None:
            offsets = self._offsets(addresses)
            if offsets is None:
                return None
            found = tuple(self._upload(torch.tensor([[o] + row[1:] for o, row in zip(offsets, meta)],
                                                    dtype=torch.int64))
                          for _, meta in (self.passes["fwd"], self.passes["bwd"]))
            if len(self._meta) >= _CACHED_ADDRESS_SETS:
                self._meta.clear()
            self._meta[addresses] = found
        return found

    def grad_offsets_for(self, addresses):
        found = self._grad_offsets.get(addresses)
        if found is None:
            offsets = self._offsets(addresses)
            if offsets is None:
                return None
            found = self._upload(torch.tensor(offsets, dtype=torch.int64))
            if len(self._grad_offsets) >= _CACHED_ADDRESS_SETS:
                self._grad_offsets.clear()
            self._grad_offsets[addresses] = found
        return found

    def traced_tables(self, device):
        """The tables for a packed copy (weight offsets = output offsets), made inside
        the traced graph (torch.tensor of constants)."""
        scal = torch.tensor(self.scal, dtype=torch.float32, device=device)
        metas, progs = {}, {}
        for name, (groups, meta) in self.passes.items():
            metas[name] = torch.tensor([[self.out_offset[i]] + row[1:] for i, row in enumerate(meta)],
                                       dtype=torch.int64, device=device)
            progs[name] = [torch.tensor(g.prog, dtype=torch.int32, device=device) for g in groups]
        return scal, metas, progs

    # --- launches --------------------------------------------------------------------

    def forward(self, weights, addresses):
        """(W_hat of each weight, stats fp32 [3, rows]) for row-dense ``weights`` at
        ``addresses`` (their data_ptr()s, each a whole number of elements)."""
        w_hat, stats = self.forward_flat(weights, addresses)
        return self.layout.views(w_hat), stats

    def forward_flat(self, weights, addresses):
        """``forward`` with W_hat as one flat buffer (see ``layout``)."""
        metas = self.meta_for(addresses)
        scal, progs = self._static_tables()
        meta = metas[0]
        w_hat = torch.empty(self.numel, dtype=self.dtype, device=self.device)
        stats = torch.empty((3, self.rows), dtype=torch.float32, device=self.device)
        stream = direct_stream(self.fwd)
        values = [addresses[0], w_hat.data_ptr(), stats.data_ptr(), 0, meta.data_ptr(), scal.data_ptr()]
        if stream is not None and all_aligned(values + [p.data_ptr() for p in progs["fwd"]]):
            for launch, prog in zip(self.fwd, progs["fwd"]):
                values[3] = prog.data_ptr()
                launch.direct(values + self.fwd_constants, stream)
        else:
            values = [weights[0], w_hat, stats, None, meta, scal]
            for launch, prog in zip(self.fwd, progs["fwd"]):
                values[3] = prog
                launch.jit(values + self.fwd_constants, all_aligned(v.data_ptr() for v in values))
        return w_hat, stats

    def backward(self, grads, weights, addresses, stats):
        """dW of each weight (views of one flat buffer, laid out as the weights), from
        ``grads`` (dL/dW_hat) laid out as the weights, at ``addresses``."""
        return self.layout.views(self.backward_flat(grads, weights, addresses, stats))

    def backward_flat(self, grads, weights, addresses, stats):
        """``backward`` with dW as one flat buffer."""
        stats = stats.contiguous()  # (a saved-tensor hook may give the statistics back strided)
        metas = self.meta_for(addresses)
        g_addresses = tuple(map(torch.Tensor.data_ptr, grads))
        g_off = self.grad_offsets_for(g_addresses)
        if g_off is None:  # a gradient at an odd address: copies (fresh, aligned) instead
            grads = [g.clone() for g in grads]
            g_addresses = tuple(map(torch.Tensor.data_ptr, grads))
            g_off = self.grad_offsets_for(g_addresses)
        scal, progs = self._static_tables()
        meta = metas[1]
        dw = torch.empty(self.numel, dtype=self.dtype, device=self.device)
        stream = direct_stream(self.bwd)
        values = [g_addresses[0], addresses[0], dw.data_ptr(), stats.data_ptr(), 0, meta.data_ptr(), g_off.data_ptr()]
        if stream is not None and all_aligned(values + [p.data_ptr() for p in progs["bwd"]]):
            for launch, prog in zip(self.bwd, progs["bwd"]):
                values[4] = prog.data_ptr()
                launch.direct(values + self.bwd_constants, stream)
        else:
            values = [grads[0], weights[0], dw, stats, None, meta, g_off]
            for launch, prog in zip(self.bwd, progs["bwd"]):
                values[4] = prog
                launch.jit(values + self.bwd_constants, all_aligned(v.data_ptr() for v in values))
        return dw

    def forward_traced(self, weights):
        """``forward_flat`` inside a traced op: the weights packed into one flat tensor
        first, the launches through ``wrap_triton``."""
        device = weights[0].device
        scal, metas, progs = self.traced_tables(device)
        flat = self.layout.pack(weights)
        w_hat = torch.empty(self.numel, dtype=self.dtype, device=device)
        stats = torch.empty((3, self.rows), dtype=torch.float32, device=device)
        for launch, prog in zip(self.fwd, progs["fwd"]):
            launch.traced([flat, w_hat, stats, prog, metas["fwd"], scal] + self.fwd_constants)
        return w_hat, stats

    def backward_traced(self, grads, weights, stats):
        device = weights[0].device
        scal, metas, progs = self.traced_tables(device)
        flat_w, flat_g = self.layout.pack(weights), self.layout.pack(grads)
        g_off = metas["bwd"][:, K.M_OUT_OFF.value].contiguous()
        dw = torch.empty(self.numel, dtype=self.dtype, device=device)
        for launch, prog in zip(self.bwd, progs["bwd"]):
            launch.traced([flat_g, flat_w, dw, stats, prog, metas["bwd"], g_off] + self.bwd_constants)
        return dw


def _prod(values):
    out = 1
    for v in values:
        out *= v
    return out


def _contiguous_strides(shape):
    stride, step = [], 1
    for size in reversed(shape):
        stride.append(step)
        step *= size
    return tuple(reversed(stride))


def _is_contiguous(shape, stride):
    expected = 1
    for size, st in reversed(list(zip(shape, stride))):
        if size != 1 and st != expected:
            return False
        expected *= size
    return True
