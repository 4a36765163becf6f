"""Every private torch and triton interface wsbcn uses, in one place.

Each entry says what it is for, checks that the interface is there in the shape
we know, and falls back to a public path when it is not. Tested with torch 2.11
and 2.13, triton 3.6 and 3.9 (pyproject.toml's lower bounds are the oldest of
those); a newer release that changes one of these loses speed, never results.
"""
import functools

import torch
import triton

# --- triton: the compiled kernel's launcher ------------------------------------------
# A CompiledKernel's ``run`` (the driver's launcher object) takes
# (gridX, gridY, gridZ, stream, function, packed_metadata, launch_metadata,
# launch_enter_hook, launch_exit_hook, *kernel_args). Calling it directly skips
# JITFunction.run's binder (kernels/launch.py). The public path is ``kernel[grid]``.
# Checked on triton 3.6 and 3.9; any other version launches through the public path.
DIRECT_LAUNCH_TRITON = ((3, 6), (3, 9))  # oldest and newest triton (major, minor)


def _version(text: str) -> tuple:
    parts = []
    for piece in text.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


_triton_known = DIRECT_LAUNCH_TRITON[0] <= _version(triton.__version__) <= DIRECT_LAUNCH_TRITON[1]
direct_launch_enabled = _triton_known  # tests turn it off to check the public path gives the same bits


def direct_launcher(compiled):
    """``f(grid, stream, args)`` launching ``compiled`` (a triton CompiledKernel) with
    integer addresses for pointers, or None when this triton's launcher is not the
    one we know (then every launch goes through ``kernel[grid]``)."""
    if not direct_launch_enabled or not hasattr(compiled, "packed_metadata"):
        return None
    run = compiled.run
    function, metadata = compiled.function, compiled.packed_metadata

    def launch(grid, stream, args):
        run(grid[0], grid[1], grid[2], stream, function, metadata, None, None, None, *args)

    return launch


try:  # launch hooks (profilers): triton >= 3.4 keeps them in knobs
    from triton import knobs as _knobs
except ImportError:
    _knobs = None


def _hooked(hook) -> bool:
    """A hook is set: a callable (triton 3.6) or a non-empty HookChain (3.9)."""
    return hook is not None and bool(getattr(hook, "calls", True))


def launch_hooks_set() -> bool:
    """A launch enter/exit hook is installed: direct launches would bypass it."""
    if _knobs is None:
        return False
    runtime = _knobs.runtime
    return _hooked(runtime.launch_enter_hook) or _hooked(runtime.launch_exit_hook)


# --- torch: fake tensors ----------------------------------------------------------
try:
    from torch._subclasses.fake_tensor import is_fake
except ImportError:  # fallback: FakeTensor's public class name
    def is_fake(t) -> bool:
        return type(t).__name__ == "FakeTensor"


# --- torch.library: triton_op registration ---------------------------------------------
try:
    from torch._subclasses.functional_tensor import FunctionalTensorMode
except ImportError:
    FunctionalTensorMode = None


def register_op_kernels(name: str, kernels) -> None:
    """Tell torch which Triton kernels the op ``name`` launches. torch finds an op's
    kernels by reading its body's source, which cannot see kernels launched through a
    plan; AOTAutograd's cache key hashes their source, so that an edited kernel never
    reuses a stale compiled graph. Without the registry (another torch), a compiled
    graph cached on disk could outlive an edited kernel: only developers edit kernels."""
    registry = getattr(getattr(torch._library, "triton", None), "triton_ops_to_kernels", None)
    if registry is not None:
        registry[name] = list(kernels)


def functionalize_rule(op, rule) -> bool:
    """Replace how compile's functionalization sees calls of ``op`` (a triton_op):
    ``rule(decompose, mode, op, types, args, kwargs)``, where ``decompose`` is
    triton_op's own rule (trace into the body). False when this torch keeps that rule
    elsewhere: then triton_op's default (always trace in) stays."""
    fns = getattr(op, "_torch_dispatch_fns", None)
    if FunctionalTensorMode is None or not isinstance(fns, dict) or FunctionalTensorMode not in fns:
        return False
    op.register_torch_dispatch(FunctionalTensorMode, functools.partial(rule, fns[FunctionalTensorMode]))
    return True
