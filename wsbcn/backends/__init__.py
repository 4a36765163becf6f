"""Which implementation runs a call: the Triton kernels or the torch closed form.

``WSBCN_BACKEND``: ``auto`` (default: Triton for CUDA tensors, torch for CPU
tensors), ``triton`` (Triton everywhere; on CPU through the Triton interpreter,
``TRITON_INTERPRET=1``) or ``torch``. float64 always takes the torch backend: the
kernels compute in fp32, and float64 is what gradcheck needs.

``emulate_gpu(name, sm_count)`` sends CPU tensors down the GPU (Triton) path, with
the launch plans that GPU would get, for measuring host time on a machine without
one: triton must then run over a stub CUDA driver (``perf/wsbcn_dev/stub_driver.py``),
under which no kernel runs and outputs hold garbage. Never for real work.
"""
import os

import torch

BACKENDS = ("auto", "triton", "torch")
_emulated_gpu = None  # (device name, SM count) while CPU tensors take the GPU path


# Read on every call (a process may change it between calls), so read cheaply:
# os.environ.get costs ~1.5 us when the variable is unset (os._Environ's KeyError path);
# its own dict of encoded names and values (POSIX and Windows alike) costs ~0.05 us.
_ENVIRON_DATA = getattr(os.environ, "_data", None)
_BACKEND_KEY = os.environ.encodekey("WSBCN_BACKEND") if hasattr(os.environ, "encodekey") else None
_parsed_requests: dict = {}  # the variable's raw value (None: unset) -> a valid choice


def requested_backend() -> str:
    if _ENVIRON_DATA is not None and _BACKEND_KEY is not None:
        raw = _ENVIRON_DATA.get(_BACKEND_KEY)
    else:
        raw = os.environ.get("WSBCN_BACKEND")
    choice = _parsed_requests.get(raw)
    if choice is None:
        text = os.environ.get("WSBCN_BACKEND", "auto")
        choice = text.strip().lower() or "auto"
        if choice not in BACKENDS:
            raise ValueError(f"WSBCN_BACKEND must be one of {BACKENDS}, got {choice!r}")
        # not while dynamo traces: a traced write to module state is replayed after the
        # graph, and inside a traced autograd.Function it failed the trace (seen across processes)
        if len(_parsed_requests) < 64 and not torch.compiler.is_compiling():
            _parsed_requests[raw] = choice
    return choice


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def prepare_interpreter() -> None:
    """Turn the Triton interpreter on when Triton is forced without a GPU.

    Must run before triton is first imported: triton reads the variable when it
    defines kernels. ``import wsbcn`` calls this.
    """
    if requested_backend() == "triton" and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


def emulate_gpu(name="NVIDIA H100 80GB HBM3", sm_count: int = 132) -> None:
    """From now on, CPU tensors take the GPU path as if on ``name`` with ``sm_count``
    SMs (its launch plans and its tuned configs); ``emulate_gpu(None)`` turns this
    off. Only meaningful with triton running over a stub driver: see the module
    docstring."""
    global _emulated_gpu
    if name is not None and (not isinstance(sm_count, int) or sm_count < 1):
        raise ValueError(f"sm_count must be a positive int, got {sm_count!r}")
    _emulated_gpu = None if name is None else (str(name), sm_count)


def emulated_gpu():
    """(device name, SM count) while ``emulate_gpu`` is on, else None."""
    return _emulated_gpu


def backend_for(t: torch.Tensor) -> str:
    """'triton' or 'torch' for a call whose main tensor is ``t``."""
    if t.dtype == torch.float64:
        return "torch"
    choice = requested_backend()  # read first also when emulating, so the host benchmark pays it as a GPU does
    if _emulated_gpu is not None:
        return "triton"
    if choice == "auto":
        return "triton" if t.is_cuda else "torch"
    if choice == "triton" and not t.is_cuda and t.is_meta:
        return "torch"  # no kernel runs on meta tensors: the closed form propagates shapes
    if choice == "triton" and not t.is_cuda and not interpreter_enabled():
        raise RuntimeError(
            "WSBCN_BACKEND=triton on a CPU tensor needs TRITON_INTERPRET=1 set before "
            "triton is imported"
        )
    return choice
