"""Compile a recorded launch for a GPU target without a GPU, and read what the
compiler made of it: registers, spills, shared memory, the width of global loads
and stores, asynchronous copies, compile time; and from those the occupancy and
waves on an H100.

The specialisation is triton's own: the launch's arguments go through the binder
that ``JITFunction.run`` uses (integers equal to 1 become constexprs, integers and
pointers divisible by 16 get ``tt.divisibility``), so the code is the code a real
first launch would compile. CPU tensors are as aligned as CUDA ones (64 vs 256
bytes), and views keep their offsets, so pointer specialisation matches too.
"""
import contextlib
import io
import re
import time
from dataclasses import dataclass

from . import SM_COUNT as SMS  # noqa: F401 (the report's waves: programs / (CTAs per SM x SMS))

# NVIDIA H100 (SXM and PCIe, compute capability 9.0): per-SM limits from the CUDA
# occupancy calculator.
REGS_PER_SM = 65536
REG_ALLOC_PER_WARP = 256  # registers are handed to warps in blocks of 256 (8 per thread)
SMEM_PER_SM = 228 * 1024
SMEM_RESERVED_PER_CTA = 1024  # the driver keeps 1 KB of shared memory per resident CTA
MAX_THREADS_PER_SM = 2048
MAX_CTAS_PER_SM = 32


@dataclass
class Specialisation:
    name: str
    signature: dict
    constexprs: dict  # {(arg index,): value}
    attrs: dict  # {(arg index,): [["tt.divisibility", 16]]}
    options: object  # the backend's parsed options (num_warps, num_stages, ...)

    def key(self) -> tuple:
        return (self.name, tuple(self.signature.items()), tuple(sorted(self.constexprs.items())),
                repr(sorted(self.attrs.items())), self.options.num_warps, self.options.num_stages)

    def constexpr_values(self, kernel) -> dict:
        return {kernel.arg_names[k[0]]: v for k, v in self.constexprs.items()}


def specialise(launch, backend) -> Specialisation:
    """The signature, constexprs, attributes and options triton would compile
    ``launch`` (a RecordedLaunch) with on ``backend``'s target."""
    from triton import knobs
    from triton.runtime.jit import create_function_from_signature

    kernel, kwargs = launch.kernel, dict(launch.kwargs)
    # the options JITFunction.run adds before binding
    kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug
    for name in ("instrumentation_mode", "fpsan_homomorphic_casts"):
        if hasattr(knobs.compilation, name):
            kwargs[name] = getattr(knobs.compilation, name)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return Specialisation(kernel.fn.__name__, signature, constexprs, attrs, options)


_GLOBAL_ACCESS = re.compile(r"\b(ld|st)\.global((?:\.[\w:]+)*)")
_ASYNC_COPY = re.compile(r"\bcp\.async\.(?:ca|cg|bulk)\b")
# cp.async.cg.shared.global [dst], [src], cp-size(, src-size): a global -> shared copy
# of 4, 8 or 16 bytes, the loads of a loop software-pipelined by triton
_ASYNC_GLOBAL = re.compile(r"\bcp\.async\.(?:ca|cg)\.shared(?:::cta)?\.global(?:\.[\w:]+)*\s+\[[^\]]*\],\s*\[[^\]]*\],"
                           r"\s*(0x[0-9a-fA-F]+|\d+)")


def access_widths(ptx: str) -> dict:
    """{"ld": {bytes: count}, "st": {bytes: count}, "cp": {bytes: count}} over the
    global loads and stores of a PTX listing (ld.global.v4.b32 moves 16 bytes,
    ld.global.b16 2) and its asynchronous global -> shared copies (cp.async, 4-16
    bytes each)."""
    widths = {"ld": {}, "st": {}, "cp": {}}
    for size in _ASYNC_GLOBAL.findall(ptx):
        nbytes = int(size, 0)
        widths["cp"][nbytes] = widths["cp"].get(nbytes, 0) + 1
    for op, suffix in _GLOBAL_ACCESS.findall(ptx):
        lanes, bits = 1, None
        for part in suffix.split(".")[1:]:
            if re.fullmatch(r"v\d", part):
                lanes = int(part[1])
            elif re.fullmatch(r"[bfsu]\d+", part):
                bits = int(part[1:])
        if bits is None:
            continue
        nbytes = lanes * bits // 8
        widths[op][nbytes] = widths[op].get(nbytes, 0) + 1
    return widths


_LABEL = re.compile(r"^(\$L__BB\d+_\d+):", re.M)
_BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$L__BB\d+_\d+);")


def loop_bodies(ptx: str) -> str:
    """The PTX of the kernel's innermost loops (from a label to the branch back to
    it), or the whole listing when it has no loop: where the streaming accesses are."""
    labels = {m.group(1): m.start() for m in _LABEL.finditer(ptx)}
    spans = [(labels[m.group(1)], m.end()) for m in _BRANCH.finditer(ptx)
             if labels.get(m.group(1), len(ptx)) < m.start()]
    # innermost loops only, so that a nested loop's accesses count once per step
    inner = [(a, b) for a, b in spans if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in spans)]
    return "\n".join(ptx[a:b] for a, b in inner) if inner else ptx


def ptxas_resources(log: str) -> dict:
    """Registers, spill bytes and stack frame from ptxas -v (which triton runs)."""
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stack = re.search(r"(\d+) bytes stack frame", log)
    if regs is None or spills is None:
        raise RuntimeError(f"no resource usage in the ptxas log:\n{log}")
    return {"registers": int(regs.group(1)), "spill_store_bytes": int(spills.group(1)),
            "spill_load_bytes": int(spills.group(2)), "stack_bytes": int(stack.group(1)) if stack else 0}


def compile_static(spec: Specialisation, kernel, target) -> dict:
    """Compile ``spec`` for ``target`` down to cubin (no GPU needed) and return its
    static facts. The triton cache must be empty for the compile time to mean
    anything (kernel_report points TRITON_CACHE_DIR at a fresh directory)."""
    import triton
    from triton import knobs
    from triton.compiler import ASTSource

    log = io.StringIO()
    previous = knobs.nvidia.dump_ptxas_log
    knobs.nvidia.dump_ptxas_log = True  # triton prints ptxas -v's report to stdout
    try:
        start = time.perf_counter()
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(kernel, spec.signature, spec.constexprs, spec.attrs), target=target,
                                      options=spec.options.__dict__)
        seconds = time.perf_counter() - start
    finally:
        knobs.nvidia.dump_ptxas_log = previous
    ptx = compiled.asm["ptx"]
    facts = ptxas_resources(log.getvalue())
    facts.update(shared_bytes=int(compiled.metadata.shared), widths=access_widths(ptx),
                 loop_widths=access_widths(loop_bodies(ptx)),
                 async_copies=len(_ASYNC_COPY.findall(ptx)), compile_s=seconds)
    return facts


def ctas_per_sm(registers: int, shared_bytes: int, num_warps: int) -> tuple:
    """(resident CTAs per SM, what limits them) on an H100."""
    per_warp = -(-registers * 32 // REG_ALLOC_PER_WARP) * REG_ALLOC_PER_WARP
    limits = {
        "threads": MAX_THREADS_PER_SM // (32 * num_warps),
        "registers": (REGS_PER_SM // per_warp) // num_warps,
        "shared": SMEM_PER_SM // (shared_bytes + SMEM_RESERVED_PER_CTA),
        "ctas": MAX_CTAS_PER_SM,
    }
    limiter = min(limits, key=limits.get)
    return limits[limiter], limiter
