"""Every private torch and triton interface wsbcn uses, in one place.

Each entry says what it is for, checks that the interface is there in the shape
we know, and falls back to a public path when it is not. Tested with torch 2.11,
2.13, 2.14 and 2.15, triton 3.6, 3.7, 3.8 and 3.9 (pyproject.toml's lower bounds are
the oldest of those); a newer release that changes one of these loses speed, never
results.
"""
import functools
import inspect

import torch
import triton

# --- triton: the compiled kernel's launcher ------------------------------------------
# A CompiledKernel's ``run`` is the NVIDIA driver's launcher object (CudaLauncher). Its
# Python ``__call__(gridX, gridY, gridZ, stream, function, packed_metadata,
# launch_metadata, launch_enter_hook, launch_exit_hook, *kernel_args)`` allocates the
# kernel's scratch buffers, if it has any, and calls ``launcher.launch``, the C function
# that packs the arguments and calls cuLaunchKernelEx. For a kernel with no scratch
# (no global or profile scratch, no sanitizer), that wrapper adds ~3 us per launch and
# nothing else, so we call the C function directly, with the arguments the wrapper
# would hand it. Its argument list differs between triton versions:
#   3.6: (gx, gy, gz, stream, function, cooperative, pdl, global_scratch,
#         profile_scratch, packed_metadata, launch_metadata, enter_hook, exit_hook, *args)
#   3.7-3.9: (gx, gy, gz, stream, function, cooperative, pdl, packed_metadata,
#         launch_metadata, enter_hook, exit_hook, global_scratch, profile_scratch,
#         arg_annotations, kernel_signature, args)
# (3.7, 3.8 and 3.9 have the same C launch function, called alike by ``run``; torch 2.14
# installs 3.8, 2.15 3.9.) Kernels with scratch go through ``run``; where even ``run``'s
# form is not known (outside 3.6-3.9), every launch goes through ``kernel[grid]``.
DIRECT_LAUNCH_TRITON = ((3, 6), (3, 9))  # oldest and newest triton (major, minor) checked


def _version(text: str) -> tuple:
    parts = []
    for piece in text.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


_TRITON = _version(triton.__version__)
direct_launch_enabled = DIRECT_LAUNCH_TRITON[0] <= _TRITON <= DIRECT_LAUNCH_TRITON[1]
c_launch_enabled = True  # tests turn these off to check the slower paths give the same launches


def direct_launcher(compiled):
    """``f(grid, stream, args)`` launching ``compiled`` (a triton CompiledKernel) with
    integer addresses for pointers, or None when this triton's launcher is not one we
    know (then every launch goes through ``kernel[grid]``)."""
    if not direct_launch_enabled or not hasattr(compiled, "packed_metadata"):
        return None
    run = compiled.run
    function, metadata = compiled.function, compiled.packed_metadata
    c_launch = _c_launcher(compiled)
    if c_launch is not None:
        return c_launch

    def launch(grid, stream, args):
        run(grid[0], grid[1], grid[2], stream, function, metadata, None, None, None, *args)

    return launch


def c_launch_form(compiled):
    """``(c, fixed, spread)``: the C launch of ``compiled`` (a CompiledKernel without
    scratch buffers) is ``c(gx, gy, gz, stream, *fixed, *args)`` when ``spread``, else
    ``c(gx, gy, gz, stream, *fixed, args)`` with ``args`` a tuple; None when this
    triton's launcher is not one we know. For code that writes the call out
    (kernels/launch.py ``DirectLaunches``); ``direct_launcher`` wraps it."""
    if not direct_launch_enabled or not c_launch_enabled or not hasattr(compiled, "packed_metadata"):
        return None
    run = compiled.run
    c = getattr(run, "launch", None)
    if (c is None or getattr(run, "global_scratch_size", 1) or getattr(run, "profile_scratch_size", 1)
            or getattr(run, "gsan_enabled", False)):
        return None
    function, metadata = compiled.function, compiled.packed_metadata
    coop, pdl = run.launch_cooperative_grid, run.launch_pdl
    if _TRITON == (3, 6):
        return c, (function, coop, pdl, None, None, metadata, None, None, None), True
    if (3, 7) <= _TRITON <= (3, 9) and hasattr(run, "arg_annotations") and hasattr(run, "kernel_signature"):
        return c, (function, coop, pdl, metadata, None, None, None, None, None, run.arg_annotations,
                   run.kernel_signature), False
    return None


def _c_launcher(compiled):
    """The C launch of a kernel without scratch buffers, skipping ``run``'s Python
    wrapper (see above), or None."""
    form = c_launch_form(compiled)
    if form is None:
        return None
    c, fixed, spread = form
    if spread:
        def launch(grid, stream, args):
            c(grid[0], grid[1], grid[2], stream, *fixed, *args)
        return launch

    def launch(grid, stream, args):
        c(grid[0], grid[1], grid[2], stream, *fixed, args)
    return launch


try:  # launch hooks (profilers): triton >= 3.4 keeps them in knobs
    from triton import knobs as _knobs
except ImportError:
    _knobs = None
_HOOK_CHAIN = getattr(_knobs, "HookChain", None)  # triton 3.7-3.9's hook type


def launch_hooks_set() -> bool:
    """A launch enter/exit hook is installed (a callable in triton 3.6, a non-empty
    HookChain in 3.7-3.9): direct launches would bypass it. Checked on every direct
    launch, so written out in one function, the two HookChains first."""
    if _knobs is None:
        return False
    runtime = _knobs.runtime
    enter, leave = runtime.launch_enter_hook, runtime.launch_exit_hook
    if enter.__class__ is _HOOK_CHAIN and leave.__class__ is _HOOK_CHAIN:
        return bool(enter.calls or leave.calls)
    return ((enter is not None and bool(getattr(enter, "calls", True)))
            or (leave is not None and bool(getattr(leave, "calls", True))))


# --- torch: autograd.Function.apply ---------------------------------------------------
# Through torch 2.13, ``Function.apply`` (torch/autograd/function.py) is a Python
# classmethod. For a Function without ``setup_context`` and with no functorch transform
# (vmap, grad, ...) active, all it does is pass each tensor argument through
# ``unwrap_if_dead`` (a functorch wrapper that outlived its transform becomes the tensor
# it wraps) and call the C ``_FunctionBase.apply`` it inherits. That Python costs about
# 2 us a call (torch 2.13, CPU machine), an eighth of an eager BCN forward's host time,
# so the eager layers take those two steps themselves. torch 2.14 moved ``apply`` to C
# (``Function.apply`` is ``_FunctionBase.apply``, which unwraps in C): there
# ``function_c_apply`` gives the class's ``apply``, so the eager hot path runs there too.
# Wherever ``apply`` is neither form, it gives None and the layers call
# ``Function.apply`` on their general path. So does anything dynamo traces: it knows
# ``Function.apply``.
# The same two steps let a call under no_grad skip the Function: with nothing for
# autograd to record, the layers run the op body alone.
_TRANSFORMS_ACTIVE = getattr(torch._C, "_are_functorch_transforms_active", None)
_UNWRAP_IF_DEAD = getattr(getattr(torch._C, "_functorch", None), "unwrap_if_dead", None)
# where this torch lacks them, every call counts as under a transform (Function.apply)
functorch_transforms_active = _TRANSFORMS_ACTIVE or (lambda: True)
unwrap_if_dead = _UNWRAP_IF_DEAD or (lambda t: t)
# A functorch wrapper (live or dead) has dispatch keys of its own, so a tensor guard made
# on plain tensors fails on it: a call recalled by such a guard (checks.recalled) has no
# wrapper to unwrap. ``checks.remember`` therefore remembers no wrapper; where this torch
# cannot tell a wrapper, it remembers nothing.
is_functorch_wrapped = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", None)
_is_legacy_batched = getattr(getattr(torch._C, "_functorch", None), "is_legacy_batchedtensor", None) or (
    lambda t: False)


def is_batched_gradient(grad) -> bool:
    """Whether a backward got a batched gradient, which the kernels cannot read: a legacy
    BatchedTensor, without storage (``torch.autograd.grad(..., is_grads_batched=True)``,
    ``torch.autograd.functional.jacobian/hessian(vectorize=True)``), or a gradient under
    an active functorch transform (``torch.func.vmap`` over ``autograd.grad`` of a graph
    made outside it). The Functions' backwards then differentiate their torch-op forward,
    which torch's batching batches. Not under dynamo (it cannot trace the query; nor does
    such a gradient reach a compiled graph). ~0.25 µs per backward (two C queries)."""
    return grad is not None and not torch.compiler.is_compiling() and (
        _is_legacy_batched(grad) or functorch_transforms_active())


def _python_apply_known() -> bool:
    """``Function.apply`` is the Python wrapper described above."""
    apply = inspect.getattr_static(torch.autograd.Function, "apply", None)
    if not isinstance(apply, classmethod) or _TRANSFORMS_ACTIVE is None or _UNWRAP_IF_DEAD is None:
        return False
    return {"_are_functorch_transforms_active", "unwrap_dead_wrappers"} <= set(apply.__func__.__code__.co_names)


_PYTHON_APPLY = _python_apply_known()
# torch >= 2.14: Function.apply is the C _FunctionBase.apply itself
_C_APPLY = inspect.getattr_static(torch.autograd.Function, "apply", None) is inspect.getattr_static(
    torch._C._FunctionBase, "apply", object())
c_apply_enabled = True  # tests turn it off to compare with Function.apply


def function_c_apply(cls):
    """The C ``apply`` under ``cls.apply`` (a ``torch.autograd.Function`` without
    ``setup_context``): where ``cls.apply`` is the Python wrapper above, the C
    ``_FunctionBase.apply`` it calls; where it is that C method itself (torch >= 2.14),
    ``cls.apply``; else None. Call it only outside dynamo's tracing, when
    ``functorch_transforms_active()`` is False, with each tensor argument passed through
    ``unwrap_if_dead``: then it is ``cls.apply``."""
    if not c_apply_enabled or cls.setup_context != torch.autograd.Function.setup_context:
        return None
    if _C_APPLY:
        return cls.apply
    return super(torch.autograd.Function, cls).apply if _PYTHON_APPLY else None


# --- torch: forward-mode AD -------------------------------------------------------
# torch.autograd.forward_ad keeps the dual level it is inside in ``_current_level``
# (-1 outside ``dual_level()``); tangents exist only inside one. There the layers take
# Functions that define ``jvp`` (ops/differentiable.py), under no_grad too (the no-grad
# shortcut would skip the jvp); dynamo cannot trace such a Function, so the others have
# none. Where this torch keeps no such variable, every call counts as inside a dual level.
from torch.autograd import forward_ad as _forward_ad

dual_level_readable = isinstance(getattr(_forward_ad, "_current_level", None), int)
if dual_level_readable:
    def forward_ad_active() -> bool:
        return _forward_ad._current_level >= 0
else:
    def forward_ad_active() -> bool:
        return True


# --- torch: a forward run during a backward ----------------------------------------
# The autograd engine sets the thread's current graph task while it runs a backward (-1
# otherwise). A BatchChannelNorm forward then is torch.utils.checkpoint recomputing the
# forward (reentrant or not): it must give what the first forward gave and update no
# running buffer again (ops/norm.py ``_Call.recomputed``). Where this torch does not tell,
# no forward counts as recomputed (the buffers are updated twice, as nn.BatchNorm's).
# ``graph_task_id() != -1`` is ``in_backward()`` without its Python frame (the BCN hot path).
graph_task_id = getattr(torch._C, "_current_graph_task_id", None) or (lambda: -1)


def in_backward() -> bool:
    return graph_task_id() != -1


# --- torch: saved-tensor hooks ------------------------------------------------------
# torch.utils.checkpoint(use_reentrant=False) runs its forward under saved-tensor hooks
# (so does activation offloading, save_on_cpu). The model-wide standardizer keeps a W_hat
# for the recompute only then (ops/ws_model.py ``take``): kept otherwise, after a forward
# with no backward it would hold that forward's graph, and with it the weights, which
# torch.utils.swap_tensors (module.to() under set_swap_module_params_on_conversion) then
# refuses. ``top_saved_tensors_hooks(False)`` is None when none are active; where this
# torch does not tell, it answers as if some were.
top_saved_tensors_hooks = (getattr(getattr(torch._C, "_autograd", None), "_top_saved_tensors_default_hooks", None)
                           or (lambda ignore_is_tracing: True))


# A Function's jvp runs with forward grad off; pushing tangents through dual tensors of
# the caller's level (ops/differentiable.py) turns it on for the call. None where this
# torch has no such switch: then only torch.func.jvp pushes tangents through wsbcn.
forward_grad_on = getattr(_forward_ad, "_set_fwd_grad_enabled", None)


def _functorch_transform_active(kind: str) -> bool:
    """Whether a functorch transform of ``kind`` ("Jvp", "Vmap", ...: the names of
    ``torch._C._functorch.TransformType``) is active, at any level."""
    if not functorch_transforms_active():
        return False
    try:
        from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
        from torch._C._functorch import TransformType
    except ImportError:  # no functorch: no such transform
        return False
    return any(i.key() == getattr(TransformType, kind) for i in retrieve_all_functorch_interpreters())


def has_forward_tangents(tensors) -> bool:
    """Whether a forward-mode tangent reaches any of ``tensors`` (None ones skipped): one
    attached inside a dual level, or a torch.func.jvp transform active (whose tangents
    live in its wrappers). For calls that must refuse forward AD before they run."""
    if forward_ad_active() and any(t is not None and _forward_ad.unpack_dual(t).tangent is not None
                                   for t in tensors):
        return True
    return _functorch_transform_active("Jvp")


def vmap_active() -> bool:
    """Whether torch.func.vmap is active (so also jacfwd and hessian, and per-sample
    gradients, vmap of grad): the layers then compute with torch ops, which vmap batches
    (the kernels take no batch of layers; ops/differentiable.py)."""
    return _functorch_transform_active("Vmap")


def functorch_levels(t) -> set:
    """The torch.func transform levels that wrap ``t``: vmap's batching and the grad
    transforms' (grad, vjp, jvp) tracking; empty for a plain tensor or where this torch
    has no functorch. A tensor may be updated in place under a transform only where it
    is wrapped at every level its new value is (else torch.func refuses the mutation)."""
    f = getattr(torch._C, "_functorch", None)
    levels = set()
    if f is None or not all(hasattr(f, n) for n in ("is_batchedtensor", "is_gradtrackingtensor", "get_unwrapped")):
        return levels
    while t is not None and f.is_functorch_wrapped_tensor(t):
        if not (f.is_batchedtensor(t) or f.is_gradtrackingtensor(t)):
            break  # a wrapper of another kind (functionalization)
        levels.add(f.maybe_get_level(t))
        t = f.get_unwrapped(t)
    return levels


# --- torch: dynamo's tensor guards ----------------------------------------------------
# ``torch._C._dynamo.guards.TensorGuards(*tensors, dynamic_dims_sizes=None,
# dynamic_dims_strides=None)`` records, per tensor, its Python type, dispatch key set
# (which holds the device type; TLS includes/excludes applied), dtype, device index,
# requires_grad, sizes and strides; ``check(*tensors)`` compares all of that in C++
# (about 0.15 us a tensor) and is False when a tensor differs, when an argument is not of
# the recorded type (None included), or when one object is given twice; it raises
# TypeError on another number of arguments. Dynamo guarded tensor inputs with it; wsbcn
# uses it to recognise a repeat call without building its signature key in Python
# (checks.recalled). It is checked here on a small tensor; where it is missing or
# behaves otherwise, ``tensor_guards`` gives None and every call builds its key.
def _tensor_guards_class():
    try:
        from torch._C._dynamo.guards import TensorGuards
    except ImportError:
        return None
    try:
        a, b = torch.zeros(2, 3), torch.zeros(3, dtype=torch.float64)
        guard = TensorGuards(a, b, dynamic_dims_sizes=None, dynamic_dims_strides=None)
        works = (guard.check(a, b) is True and guard.check(a, a.t()) is False and guard.check(a, None) is False
                 and guard.check(a, a) is False and guard.check(a, b.float()) is False)
    except Exception:  # another constructor or check: not the interface described above
        return None
    return TensorGuards if works else None


_TENSOR_GUARDS = _tensor_guards_class()


def tensor_guards(tensors):
    """A TensorGuards of ``tensors`` (all tensors), or None where this torch has none."""
    if _TENSOR_GUARDS is None:
        return None
    return _TENSOR_GUARDS(*tensors, dynamic_dims_sizes=None, dynamic_dims_strides=None)


# --- torch: fake tensors ----------------------------------------------------------
try:
    from torch._subclasses.fake_tensor import is_fake
except ImportError:  # fallback: FakeTensor's public class name
    def is_fake(t) -> bool:
        return type(t).__name__ == "FakeTensor"

_get_dispatch_mode = getattr(torch._C, "_get_dispatch_mode", None)
# the number of dispatch modes active (FakeTensorMode among them): 0 on the eager hot path,
# where it is read first (~0.03 us, one C call); without the query, 1 (always ask)
dispatch_modes = getattr(torch._C, "_len_torch_dispatch_stack", lambda: 1)
_FAKE_MODE_KEY = getattr(getattr(torch._C, "_TorchDispatchModeKey", None), "FAKE", None)


def fake_mode_active() -> bool:
    """Whether a FakeTensorMode is active (shape propagation: FLOP and memory estimators,
    fake initialization): every tensor it allocates is fake, so no kernel can be launched
    on what the eager path allocates. ~0.1 us (one C call). Where torch has no such
    query, False: fake inputs are still told by ``is_fake``."""
    return _get_dispatch_mode is not None and _FAKE_MODE_KEY is not None and \
        _get_dispatch_mode(_FAKE_MODE_KEY) is not None


def without_memory(t) -> bool:
    """An eager call on ``t`` that must not launch kernels: a FakeTensorMode is active or
    ``t`` is a fake tensor (the torch closed form propagates their shapes instead)."""
    return fake_mode_active() or is_fake(t)


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


# --- frames dynamo starts inside the library -----------------------------------------
try:
    from torch._C._dynamo.eval_frame import set_code_exec_strategy as _set_code_exec_strategy
    from torch._dynamo.types import FrameAction as _FrameAction, FrameExecStrategy as _FrameExecStrategy
except ImportError:
    _set_code_exec_strategy = None


def eager_when_a_frame(*functions) -> None:
    """Where dynamo starts a frame at one of ``functions`` (not where it inlines it,
    tracing a layer whole), run it and all it calls eagerly. Dynamo starts frames inside
    the library when it runs a frame that calls a layer eagerly: after that frame raised
    while traced (a compiled BatchChannelNorm given one value per channel), every later
    call runs it eagerly and traces each nested function as a frame of its own, which
    would trace an eager call's plan and launches. Without the private API (another
    torch), nothing is marked."""
    if _set_code_exec_strategy is None:
        return
    for fn in functions:
        _set_code_exec_strategy(fn.__code__, _FrameExecStrategy(_FrameAction.SKIP, _FrameAction.SKIP))
