"""What torch.fx and TorchScript make of wsbcn's layers.

torch.fx.symbolic_trace keeps torch's own layers (nn.BatchNorm2d, nn.GroupNorm,
nn.Conv2d) as leaf modules: one ``call_module`` node, whose forward runs at call time
on real tensors. wsbcn's layers are leaves too (``fx_leaf``): traced through, their
checks would meet proxies, and a WSConv's W_hat, computed from the real weight, would
become a constant of the graph (the weight then gets no gradient and later updates
are never seen).

TorchScript can neither compile (``torch.jit.script``) nor record
(``torch.jit.trace``) a Triton launch made from Python: both raise ``TypeError``
before anything runs (``refuse_script`` here; ``checks.refuse_jit_trace`` on the
checks' path of every call).
"""
from torch.fx import Proxy

from ..checks import ALTERNATIVES


def fx_leaf(module, x: Proxy) -> Proxy:
    """``module``'s node in the graph ``x`` is being traced into: a call of the module."""
    tracer = x.tracer
    if module is getattr(tracer, "root", None):
        raise TypeError(
            f"torch.fx: {type(module).__name__} is a leaf module, as torch's own layers are: trace a "
            f"model that holds it (e.g. nn.Sequential(layer)), not the layer alone")
    return tracer.create_proxy("call_module", tracer.path_of_module(module), (x,), {})


def refuse_script(module):
    """``__prepare_scriptable__``: torch.jit.script calls it on every submodule first."""
    raise TypeError(
        f"torch.jit.script cannot compile {type(module).__name__}: it launches Triton kernels from "
        f"Python, which TorchScript cannot run. Use {ALTERNATIVES}.")
