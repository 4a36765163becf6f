"""Launching a Triton kernel for the host cost of one C call.

``kernel[grid](*args)`` (triton's ``JITFunction.run``) binds, specialises and hashes
every argument on every call: ~6 us plus ~0.3 us per argument, 11-18 us for our
kernels, which at micro-batch sizes is more than the kernel itself runs. A
``Launch`` is one launch of a kernel whose grid, integer arguments and constexprs
are all fixed (a launch plan holds them, keyed on everything they derive from).
Its first call goes through ``kernel[grid]``, which compiles and returns the
``CompiledKernel``; later calls hand the arguments straight to that kernel's C
launcher, with pointers passed as integer addresses.

Why this launches exactly the kernel ``kernel[grid]`` would: triton specialises a
launch on the constexprs, the options (num_warps, num_stages), each integer
argument (== 1, divisible by 16, 32 or 64 bits), each pointer's dtype and whether
its address is 16-byte aligned, and the device. A plan fixes all of these but the
addresses, so a ``Launch`` only remembers the kernel compiled for all-aligned
pointers, and any call with a misaligned pointer, another device, launch hooks
(profilers) or the interpreter goes through ``kernel[grid]`` again. Floats are
never specialised.
"""
import functools
import operator
import os

from triton.runtime import driver

from .._compat import c_launch_form, direct_launcher, is_fake, launch_hooks_set

# Counters a test reads to see which path each launch took.
stats = {"direct": 0, "jit": 0}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def all_aligned(addresses) -> bool:
    """True when every address is a multiple of 16 (triton's pointer specialisation)."""
    return not functools.reduce(operator.or_, addresses, 0) & 15


class Launch:
    """One kernel launch of a plan: ``kernel``, ``grid``, ``options`` (num_warps,
    num_stages) and, for each kernel parameter in order, the index of its value in
    the call's value list (``picks``; constexprs included, which the C launcher
    skips). Through ``kernel[grid]`` the constexprs go by name, the rest by position."""

    __slots__ = ("kernel", "grid", "picks", "pick_indices", "runtime_picks", "constexpr_picks", "options", "compiled",
                 "launcher", "c_form", "device")
    # compiled: the CompiledKernel for all-aligned pointers, launcher: its C launcher
    # (None until the first aligned kernel[grid] launch, always under the interpreter,
    # and where this triton's launcher is not the one we know: wsbcn/_compat.py),
    # c_form: the launcher's C call, for code that writes it out (c_launch_form)

    def __init__(self, kernel, grid, picks, options):
        self.kernel = kernel
        self.grid = tuple(grid) + (1,) * (3 - len(grid))
        self.picks = operator.itemgetter(*picks)
        self.pick_indices = tuple(picks)
        # kernel[grid] takes the runtime arguments by position and the constexprs by name
        constexprs = _constexpr_names(kernel)
        names = kernel.arg_names
        self.runtime_picks = [i for name, i in zip(names, picks) if name not in constexprs]
        self.constexpr_picks = {name: i for name, i in zip(names, picks) if name in constexprs}
        self.options = options
        self.compiled = self.launcher = self.c_form = None
        self.device = None  # the device it was loaded on

    def jit(self, values, aligned: bool):
        """Launch through ``kernel[grid]`` with tensors in ``values``."""
        stats["jit"] += 1
        constexprs = {name: values[i] for name, i in self.constexpr_picks.items()}
        compiled = self.kernel[self.grid](*[values[i] for i in self.runtime_picks], **constexprs, **self.options)
        if aligned and not _interpreting() and compiled is not None:
            device = driver.active.get_current_device()
            if compiled is not self.compiled or device != self.device:  # keep the launcher DirectLaunches holds
                self.compiled, self.launcher = compiled, direct_launcher(compiled)
                self.c_form = c_launch_form(compiled) if self.launcher is not None else None
                self.device = device

    def traced(self, values):
        """Launch through ``torch.library.wrap_triton`` with tensors in ``values``: inside a
        ``triton_op`` traced by torch.compile or export this records the launch (a
        ``triton_kernel_wrapper`` node) instead of running it; called eagerly it is
        ``kernel[grid]``. The interpreter's kernels cannot be traced: on fake tensors
        (shape propagation) they are skipped, on real ones run as ``kernel[grid]``."""
        constexprs = {name: values[i] for name, i in self.constexpr_picks.items()}
        args = [values[i] for i in self.runtime_picks]
        if _interpreting():
            if not is_fake(values[0]):
                self.kernel[self.grid](*args, **constexprs, **self.options)
            return
        from torch.library import wrap_triton

        wrap_triton(self.kernel)[self.grid](*args, **constexprs, **self.options)

    def direct(self, values, stream):
        """Launch the compiled kernel with ``values`` holding integer addresses."""
        stats["direct"] += 1
        self.launcher(self.grid, stream, self.picks(values))


def _constexpr_names(kernel) -> set:
    """Names of the ``tl.constexpr`` parameters of a @triton.jit function (JIT or interpreted)."""
    import inspect

    params = inspect.signature(kernel.fn).parameters
    return {name for name, p in params.items() if "constexpr" in str(p.annotation)}


def direct_stream(launches):
    """The current stream when every launch in ``launches`` can go direct on the
    current device, else None (then launch through ``kernel[grid]``)."""
    for launch in launches:
        if launch.launcher is None:  # not compiled yet, the interpreter, or an unknown triton
            return None
    return _direct_stream(launches)


class DirectLaunches:
    """The direct path of one pass of a plan (its ``launches``, made by one ``ArgTable``)
    as one generated function, so that a call costs one Python call, the address reads,
    one alignment test and the C launches, and no per-call list of values.

    ``params``: the names of the generated function's arguments (the call's tensors, or
    None for an absent one); ``prelude``: lines of code run first (e.g. a buffer's base
    address); ``slot_code``: for each slot of the ArgTable, in order, an expression of
    its address. ``call(*args)`` launches and returns True, or returns False when a
    launch cannot go direct (not compiled yet, launch hooks, another device, a
    misaligned address): then the caller goes through ``kernel[grid]``, which is what
    decides (and the function checks) every case in which triton would pick another
    compiled kernel.

    The function checks first that each launch still has the C launcher it was made
    with (``Launch.jit`` replaces it after a compile on another device), and is made
    again when not; then the launch hooks, the current device (the one every launch
    was compiled on) and the current stream, as ``direct_stream`` does.

    ``tables``: launches made by several ArgTables whose slots begin alike (one
    table's slots a prefix of the next's, as DistNormPlan's extend NormPlan's): per
    launch, (its table's number of slots, its table's constants); by default every
    launch has ``slot_code``'s slots and ``constants``."""

    def __init__(self, launches, params, prelude, slot_code, constants, tables=None):
        self.launches, self.params, self.prelude = launches, params, prelude
        self.slot_code, self.constants = slot_code, constants
        self.tables = tables or [(len(slot_code), constants)] * len(launches)
        if len(self.tables) != len(launches) or any(n > len(slot_code) for n, _ in self.tables):
            raise ValueError("DirectLaunches: one table per launch, each with at most slot_code's slots")
        self.call = self._first_call

    def _first_call(self, *args) -> bool:
        """``call`` until every launch is compiled (then, and whenever a launcher
        changed, ``call`` is a newly generated function)."""
        if any(launch.launcher is None for launch in self.launches):  # not compiled, the interpreter, ...
            return False
        devices = {launch.device for launch in self.launches}
        self.call = self._generate(devices.pop() if len(devices) == 1 else None)
        return self.call(*args)

    def _generate(self, device):
        scope = {"launch_stats": stats, "driver": driver, "hooks_set": launch_hooks_set, "DEVICE": device,
                 "STALE": self._first_call}
        launch_names = [f"l{i}" for i in range(len(self.launches))]
        lines = [f"def launch_all({', '.join(self.params)}):"]
        for i, launch in enumerate(self.launches):
            scope[f"l{i}"], scope[f"L{i}"], scope[f"G{i}"] = launch, launch.launcher, launch.grid
        stale = " or ".join(f"{name}.launcher is not L{name[1:]}" for name in launch_names)
        lines.append(f"    if {stale}:")
        lines.append(f"        return STALE({', '.join(self.params)})")
        lines.append("    active = driver.active")
        lines.append("    device = active.get_current_device()")
        lines.append("    if device != DEVICE or hooks_set():")
        lines.append("        return False")
        lines.append("    stream = active.get_current_stream(device)")
        lines += [f"    {line}" for line in self.prelude]
        lines += [f"    s{i} = {code}" for i, code in enumerate(self.slot_code)]
        lines.append(f"    if ({' | '.join(_alignment_terms(self.slot_code))}) & 15:")
        lines.append("        return False")
        tables = {}  # id of a constants list -> the name prefix of its values
        for table_slots, constants in self.tables:
            if id(constants) not in tables:
                prefix = tables[id(constants)] = f"k{len(tables)}_"
                for j, value in enumerate(constants):
                    scope[f"{prefix}{j}"] = value
        for i, launch in enumerate(self.launches):
            table_slots, constants = self.tables[i]
            prefix = tables[id(constants)]
            names = [f"s{k}" if k < table_slots else f"{prefix}{k - table_slots}" for k in launch.pick_indices]
            # the launcher's argument tuple: the slots, then the constants that end it (a
            # kernel's pointers come first, its integers and constexprs last) as one tuple
            # made here, which costs less per call than loading each of them (triton 3.6's
            # spread form takes it as *T)
            tail = len(names)
            while tail and names[tail - 1][0] == "k":
                tail -= 1
            scope[f"T{i}"] = tuple(scope[name] for name in names[tail:])
            arg_tuple = f"({', '.join(names[:tail])},) + T{i}" if tail else f"T{i}"
            if launch.c_form is None:
                lines.append(f"    L{i}(G{i}, stream, {arg_tuple})")
                continue
            # the C launch itself, written out (wsbcn/_compat.py c_launch_form): no wrapper frame
            c, fixed, spread = launch.c_form
            scope[f"C{i}"] = c
            for j, value in enumerate(fixed):
                scope[f"F{i}_{j}"] = value
            head = ", ".join([str(g) for g in launch.grid] + ["stream"] + [f"F{i}_{j}" for j in range(len(fixed))])
            if spread:
                args = ", ".join(names[:tail] + ([f"*T{i}"] if tail < len(names) else []))
                lines.append(f"    C{i}({head}, {args})")
            else:
                lines.append(f"    C{i}({head}, {arg_tuple})")
        lines.append(f"    launch_stats['direct'] += {len(self.launches)}")
        lines.append("    return True")
        exec(compile("\n".join(lines), "<wsbcn direct launches>", "exec"), scope)
        return scope["launch_all"]


def _alignment_terms(slot_code):
    """What the alignment test ORs: a slot ``name + offset`` with the offset a multiple of
    16 is aligned exactly when ``name`` is, so the test reads ``name`` once for all."""
    terms = []
    for i, code in enumerate(slot_code):
        base, plus, offset = code.partition(" + ")
        term = base if plus and base.isidentifier() and offset.isdigit() and int(offset) % 16 == 0 else f"s{i}"
        if term not in terms:
            terms.append(term)
    return terms


def _direct_stream(launches):
    """The current stream when every launch (all compiled) can go direct on the current
    device, else None."""
    if launch_hooks_set():
        return None
    active = driver.active
    device = active.get_current_device()
    for launch in launches:
        if launch.device != device:
            return None
    return active.get_current_stream(device)


class Slot(str):
    """A kernel argument filled per call (a named value slot), not a constant."""


class ArgTable:
    """Builds the ``Launch``es of a plan. A call fills the named ``slots`` (tensors,
    or addresses on the direct path) and appends the plan's ``constants``; each
    kernel parameter, by name, is either a ``Slot`` or a constant of the plan."""

    def __init__(self, slots):
        self.index = {name: i for i, name in enumerate(slots)}
        self.constants = []

    def launch(self, kernel, grid, options, **args):
        picks = []
        for name in kernel.arg_names:
            value = args.pop(name)
            if isinstance(value, Slot):
                picks.append(self.index[value])
            else:
                picks.append(len(self.index) + len(self.constants))
                self.constants.append(value)
        if args:
            raise TypeError(f"{kernel}: no parameters named {sorted(args)}")
        return Launch(kernel, grid, picks, options)
