"""Input validation shared by every public entry point.

Each check raises a ValueError/TypeError that names the argument, and runs before
any kernel launch or buffer update, so a rejected call changes nothing.
"""
import math
import numbers

import torch
from torch.fx import Proxy

from . import _compat

MAX_CACHED_SIGNATURES = 4096  # per cache; a model has a few dozen layer signatures

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
ACTIVATIONS = (None, "relu", "silu")


def check_float_tensor(name: str, t, min_dim: int = 1) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating-point tensor (float16, bfloat16, float32 or "
            f"float64), got {t.dtype}"
        )
    if t.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimensions, got shape {tuple(t.shape)}")


def check_factory_dtype(what: str, dtype) -> None:
    """A layer constructor's ``dtype=`` for ``what`` (its parameters): a floating-point
    one, else a TypeError before anything is allocated."""
    if dtype is not None and isinstance(dtype, torch.dtype) and dtype not in FLOAT_DTYPES:
        raise TypeError(f"{what} must be floating-point (float16, bfloat16, float32 or float64), got dtype={dtype}")


def check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a positive float, got {type(eps).__name__}")
    eps = float(eps)
    # NaN fails too; comparisons only, so a symbolic float (compile, dynamic=True) passes
    if not _SMALLEST_NORMAL_FP32 <= eps < math.inf:
        raise ValueError(f"eps must be a positive finite float of at least {_SMALLEST_NORMAL_FP32:.6g} (the smallest "
                         f"normal float32: the statistics of float16, bfloat16 and float32 tensors are fp32, where a "
                         f"smaller eps is subnormal or zero, so a constant group or filter would give NaN; one floor "
                         f"for every dtype, as a layer may change dtype), got {eps}")
    return eps


_SMALLEST_NORMAL_FP32 = 2.0 ** -126


def check_ws_args(weight, eps, correction, eps_mode) -> tuple:
    check_float_tensor("weight", weight, min_dim=2)
    return check_ws_scalars(eps, correction, eps_mode, tuple(weight.shape))


def check_ws_scalars(eps, correction, eps_mode, shape=None) -> tuple:
    """(eps, correction) of a WS call checked, for a weight of ``shape`` (None: not
    known yet, so the fan-in checks wait for it)."""
    eps = check_eps(eps)
    if eps_mode not in ("var", "std"):
        raise ValueError(f"eps_mode must be 'var' or 'std', got {eps_mode!r}")
    if isinstance(correction, bool) or not isinstance(correction, numbers.Integral):
        raise TypeError(f"correction must be a non-negative int, got {type(correction).__name__}")
    correction = int(correction)
    fan_in = None if shape is None else math.prod(shape[1:])
    if fan_in == 0:
        raise ValueError(f"weight has an empty fan-in: shape {shape}")
    if correction < 0:
        raise ValueError(f"correction must be >= 0, got {correction}")
    if fan_in is not None and correction >= fan_in:
        raise ValueError(
            f"correction ({correction}) must be smaller than the fan-in of each filter "
            f"({fan_in}); the variance divides by fan_in - correction"
        )
    return eps, correction


def check_activation(activation):
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of None, 'relu', 'silu', got {activation!r}")
    return activation


def check_momentum(momentum):
    if momentum is None:
        return None
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):
        raise TypeError(f"momentum must be a float in [0, 1] or None, got {type(momentum).__name__}")
    momentum = float(momentum)
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    return momentum


def check_num_groups(num_channels, num_groups) -> None:
    for name, v in (("num_channels", num_channels), ("num_groups", num_groups)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if num_groups <= 0:
        raise ValueError(f"num_groups must be positive, got {num_groups}")
    if num_channels <= 0:
        raise ValueError(f"num_channels must be positive, got {num_channels}")
    if num_channels % num_groups != 0:
        raise ValueError(
            f"num_channels ({num_channels}) must be divisible by num_groups ({num_groups})"
        )


class CallCache:
    """The validated calls of one op: ``calls`` (signature key -> validated call,
    ``validated``) and ``sites`` (id of a call site -> its newest signatures,
    ``recalled``/``remember``). One object, and the functions below read its dicts only
    outside torch.compile: dynamo guards what a traced call reads, and a module-level
    dict handed to them was guarded on its length by torch 2.11, so every eager call of
    a new signature (another model, an input size) recompiled every compiled graph. The
    object is guarded by its identity only."""

    __slots__ = ("calls", "sites")

    def __init__(self):
        self.calls, self.sites = {}, {}

    def clear(self) -> None:
        self.calls.clear()
        self.sites.clear()


def validated(cache: CallCache, key, validate):
    """What ``validate()`` derives for a call signature ``key``, computed once: a
    repeat call with the same signature (shapes, strides, dtypes, devices and
    scalar arguments, their types included) skips the checks. ``key`` None or
    unhashable, or a call under torch.compile (dynamo traces the checks), validates
    every time. Under torch.jit.trace: ``refuse_jit_trace`` (a recalled call never gets
    here, nor does it run under a trace: see ``recalled``)."""
    refuse_jit_trace()
    if key is None or torch.compiler.is_compiling():
        return validate()
    calls = cache.calls
    try:
        found = calls.get(key)
    except TypeError:  # an unhashable argument: the checks will name it
        return validate()
    return found if found is not None else cached(calls, key, validate)


def fx_proxy(tensors: tuple):
    """The torch.fx ``Proxy`` among a call's tensor arguments, or None: under
    torch.fx.symbolic_trace a functional call becomes one ``call_function`` node (as
    torch.nn.functional's do), run at call time on real tensors. Asked on the checks'
    path only (a proxy is no tensor: no remembered call matches it)."""
    for t in tensors:
        if isinstance(t, Proxy):
            return t
    return None


# what to use instead of TorchScript (jit.trace here, jit.script: modules/tracing.py)
ALTERNATIVES = ("torch.export.export (each wsbcn layer one torch.ops.wsbcn op in the graph) "
                "or torch.compile")


def refuse_jit_trace() -> None:
    """TypeError under torch.jit.trace, before anything runs: a trace records aten ops,
    not the Triton launches a wsbcn call makes from Python, so it would keep their
    outputs as constants (modules/tracing.py)."""
    if torch.jit.is_tracing():
        raise TypeError(f"torch.jit.trace cannot record wsbcn's layers and functions: they launch Triton "
                        f"kernels from Python, outside what TorchScript records. Use {ALTERNATIVES}.")


def refuse_inference_tensors(saved: tuple, updated: tuple) -> None:
    """torch's errors for inference tensors (made under ``torch.inference_mode``) used
    outside inference mode, raised before anything runs, as torch's layers raise them
    (autograd saves a layer's inputs before it computes): one of ``saved`` when autograd
    records the call (grad mode on, one of them requires grad), one of ``updated`` (the
    running buffers the call updates in place) always. Asked per call on the checks'
    path, which such calls take (``remember`` keeps none of them)."""
    if torch.is_inference_mode_enabled():
        return
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in saved) and \
            any(t is not None and t.is_inference() for t in saved):
        raise RuntimeError("Inference tensors cannot be saved for backward. To work around you can make a "
                           "clone to get a normal tensor and use it in autograd.")
    if any(t is not None and t.is_inference() for t in updated):
        raise RuntimeError("Inplace update to inference tensor outside InferenceMode is not allowed. You can "
                           "make a clone to get a normal tensor before doing inplace update (wsbcn: a running "
                           "buffer made under torch.inference_mode)")


def has_negated_view(tensors: tuple) -> bool:
    """Whether one of ``tensors`` (None ones skipped) is a lazily negated view (its
    negative bit set: ``torch._neg_view``, the imaginary part of a conjugate): its
    memory holds -value, which a kernel reading memory would take for the value."""
    return not torch.compiler.is_compiling() and any(isinstance(t, torch.Tensor) and t.is_neg() for t in tensors)


def resolve_negated_views(read: tuple, updated: dict) -> tuple:
    """The tensors of a call with a negated view among them (``has_negated_view``): those
    it reads materialized (Tensor.resolve_neg, differentiable), in order; one it would
    update in place (``updated``: name -> tensor) refused, before anything runs. Asked
    per call on the checks' path, which such calls take (``remember`` keeps none)."""
    for name, t in updated.items():
        if isinstance(t, torch.Tensor) and t.is_neg():
            raise ValueError(f"{name} is a negated view (Tensor.is_neg()): it is updated in place, which the kernels "
                             f"cannot do through the negative bit; give {name}.resolve_neg() instead")
    return tuple(t.resolve_neg() if isinstance(t, torch.Tensor) and t.is_neg() else t for t in read)


MAX_RECALLED_PER_SITE = 8  # signatures a call site keeps (a shared FPN head: one per level)
# signatures a site may drop before it stops remembering: a site whose inputs keep
# changing shape (multi-scale training) would pay the scan and a new guard on every call
MAX_DROPPED_PER_SITE = 32


class _SiteEntries(list):
    """A site's remembered signatures, oldest first; ``dropped`` counts the ones it
    dropped for newer ones, -1 once it stopped remembering."""
    dropped = 0


def recalled(cache: CallCache, site, scalars: tuple, tensors: tuple):
    """What a repeat call at ``site`` got from ``validated``, recognised without building
    its key: ``site`` is an object that lives across calls (the calling module, else a
    parameter), ``scalars`` every non-tensor part of the key, ``tensors`` every tensor
    argument (None for an absent one). A remembered entry matches when its scalars are
    equal and its tensor guard (wsbcn/_compat.py) passes: each tensor of the same type,
    dispatch keys (so device type), dtype, device index, requires_grad, sizes and strides,
    which is more than the key reads, so a match is a call with the same key (and with
    no functorch wrapper: ``remember``). The dispatch keys are read with the thread's
    included and excluded keys: under torch.jit.trace, which includes its own, no entry
    made outside a trace matches. None when nothing matches, or where torch has no tensor
    guards. Not asked under torch.compile: the callers ask ``is_compiling`` first (BCN's
    once for its whole call), and dynamo traces the key path. Sites are kept by ``id``: a
    new object may get a dead site's id and find its entries, which match only as any
    entry does, by scalars and guard.

    ``scalars`` holds the types the key reads (eps is keyed with its type: 1 and 1.0
    are checked apart) before the values, so that a value of another type (a tensor
    given for eps) ends the comparison before its ``==`` runs; a comparison that raises
    all the same is no match (the checks then name the argument). A scalar the key reads
    as a value only (``bool(training)``, an activation's name) needs no type: equal values
    give the key's validated call."""
    entries = cache.sites.get(id(site))
    if entries is None:
        return None
    for known, guard, absent, present, found in entries:
        try:
            same = known == scalars
        except Exception:  # a value whose == raises (a tensor of several elements): not a repeat call
            return None
        if same:
            if absent:  # the entry's absent tensors absent again; its present ones checked (None fails)
                if any(tensors[i] is not None for i in absent):
                    continue
                if guard.check(*[tensors[i] for i in present]):
                    return found
            elif guard.check(*tensors):
                return found
    return None


def remember(cache: CallCache, site, scalars: tuple, tensors: tuple, found) -> None:
    """Let ``recalled`` find ``found`` for calls like this one at ``site`` (a site keeps
    its MAX_RECALLED_PER_SITE newest, and stops remembering once it has dropped
    MAX_DROPPED_PER_SITE for newer ones; ``sites`` is emptied at MAX_CACHED_SIGNATURES
    sites, as ``cached`` does). Nothing is kept under torch.compile, for tensor
    subclasses (fake tensors among them) and functorch wrappers, where torch has no
    tensor guards, or when a guard could not pass (one tensor given twice). So a recalled
    call's tensors are plain tensors, none of them a functorch wrapper: the caller has
    nothing to unwrap (wsbcn/_compat.py). Nor a call outside inference mode with an
    inference tensor, whose checks depend on grad mode (``refuse_inference_tensors``)."""
    if torch.compiler.is_compiling() or site is None or getattr(site, "grad_fn", None) is not None:
        return  # tracing, no site, or a tensor made anew for each call (a parametrized weight)
    sites = cache.sites
    entries = sites.get(id(site))
    if entries is not None and entries.dropped < 0:  # its signatures kept changing: it builds its keys
        return
    present = [t for t in tensors if t is not None]
    wrapped = _compat.is_functorch_wrapped
    inference_mode = torch.is_inference_mode_enabled()
    for t in present:  # plain tensors only: a subclass (a fake tensor's sizes may be symbolic) builds its key
        if type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter:
            return
        if not inference_mode and t.is_inference():  # each call is checked (refuse_inference_tensors)
            return
        if t.is_neg():  # each call resolves it (resolve_negated_views)
            return
        if wrapped is None or wrapped(t):  # a functorch wrapper: the caller unwraps it (_compat.py)
            return
    guard = _compat.tensor_guards(present)
    if guard is None or not guard.check(*present):
        return
    if entries is None:
        if len(sites) >= MAX_CACHED_SIGNATURES:
            sites.clear()
        entries = sites[id(site)] = _SiteEntries()
    elif len(entries) >= MAX_RECALLED_PER_SITE:
        del entries[0]
        entries.dropped += 1
        if entries.dropped > MAX_DROPPED_PER_SITE:
            entries.clear()
            entries.dropped = -1
            return
    absent = tuple(i for i, t in enumerate(tensors) if t is None)
    entries.append((scalars, guard, absent, tuple(i for i, t in enumerate(tensors) if t is not None), found))


def keyed(cache: CallCache, site, scalars: tuple, tensors: tuple, key, validate):
    """The validated call of a call ``recalled`` did not find: looked up by its signature
    key (``key()``; no key when an argument is not a tensor, the checks will name it),
    ``validate()`` on a miss (``validated``), then remembered at ``site`` (``remember``).
    ``key`` and ``validate`` are closures: built only on this path, not on a recalled call."""
    try:
        k = key()
    except AttributeError:  # not a tensor somewhere
        k = None
    found = validated(cache, k, validate)
    remember(cache, site, scalars, tensors, found)
    return found


def cached(cache: dict, key, build):
    """``cache[key]``, built by ``build()`` on a miss; the cache is emptied when it
    reaches MAX_CACHED_SIGNATURES entries (a model has a few dozen signatures)."""
    found = cache.get(key)
    if found is None:
        found = build()
        if len(cache) >= MAX_CACHED_SIGNATURES:
            cache.clear()
        cache[key] = found
    return found


def tensor_meta(t):
    """The part of an optional parameter or buffer its checks and kernels read: dtype,
    number of elements (their checks read no other part of the shape, and the gradients
    are shaped per call), device, whether it is contiguous (kernels index them densely)
    and its type (a fake tensor's call takes the closed form). Read on every call, so the
    cheapest reads that say it: an int, not a Size."""
    return None if t is None else (t.dtype, t.numel(), t.device, t.is_contiguous(), type(t))
