"""How wsbcn's ops are registered with torch.library (DESIGN.md section 8).

Each op (``wsbcn::norm_forward``, ``norm_backward``, ``ws_forward``, ``ws_backward``)
is a ``torch.library.triton_op``. torch.compile traces into its body: on the Triton
backend that is the launch plan's traced launches (NormPlan's ``forward_op``/``backward_op``,
WSPlan's ``forward_traced``/``backward_traced``), which launch through
``torch.library.wrap_triton``, so inductor emits the kernels in its generated code
and launches them itself; on the torch backend it is the torch closed form, traced
like any torch code. torch.export keeps each op as one node, and AOTInductor
compiles the kernels into its package. Eager calls never come here: they launch
through the plans directly (kernels/launch.py), which costs a fraction of an op
dispatch.

Some calls stay one opaque node in compiled graphs (as a ``torch.library.custom_op``
would), whose body then runs eagerly through the plans: under the Triton interpreter
(TRITON_INTERPRET=1, for testing on CPU), whose kernels run on host memory and
cannot be traced; with symbolic input sizes (``dynamic=True``, or dynamo's automatic
dynamic shapes after a second input size), because a launch plan is per shape and
tracing in would compile the graph anew for every size; and, on the torch backend,
the calls an op's ``opaque_on_torch`` names: estimate mode's forward, whose closed
form reads the running buffers it then updates. Traced in, its cheap elementwise
reads of them were recomputed in the backward by the min-cut partitioner (inductor's,
aot_eager's), after the update: wrong gradients (tests/test_compile.py). Opaque, the
op's outputs are what the backward gets. The Triton path reads them in kernel launches
the partitioner keeps in the forward (its backward graph over the stub driver holds
backward kernels only).
"""
import torch

from .. import _compat, backends


def triton_op(name: str, mutates_args, kernels, opaque_on_torch=None):
    """``torch.library.triton_op(name, mutates_args=...)`` for a body that launches the
    Triton ``kernels`` (a callable returning them, imported on first use);
    ``opaque_on_torch(args, kwargs)``: True for a call that stays opaque on the torch
    backend too (see the module docstring)."""

    def rule(decompose, mode, op, types, args, kwargs):  # a function: _compat binds decompose first
        return _functionalize(opaque_on_torch, decompose, mode, op, types, args, kwargs)

    def register(fn):
        op = torch.library.triton_op(name, mutates_args=mutates_args)(fn)
        _compat.register_op_kernels(name, kernels())
        _compat.functionalize_rule(op, rule)
        return op

    return register


def _functionalize(opaque_on_torch, decompose, mode, op, types, args, kwargs):
    """How compile's functionalization sees an op call whose first argument is the
    input (x, dy, the weight or its gradient): traced into on the torch backend (but
    for ``opaque_on_torch``'s calls) and for Triton at static shapes; one opaque node,
    run eagerly, for Triton under the interpreter (not traceable) or at symbolic shapes
    (a launch plan is per shape: tracing in would recompile the graph for every input
    size)."""
    t = args[0]
    if backends.backend_for(t) == "torch":
        opaque = opaque_on_torch is not None and opaque_on_torch(args, kwargs)
    else:
        opaque = backends.interpreter_enabled() or symbolic(t)
    if opaque:
        return mode.__torch_dispatch__(op, types, args, kwargs)
    return decompose(mode, op, types, args, kwargs)


def symbolic(t: torch.Tensor) -> bool:
    """True when a size or stride of ``t`` is symbolic (torch.compile, dynamic shapes)."""
    return not all(type(d) is int for d in (*t.shape, *t.stride()))


def plain(t: torch.Tensor) -> bool:
    """True for a real tensor (not fake, not functional): an eager call of the op, or
    an opaque op running inside a compiled graph; then the body launches directly."""
    return type(t) in (torch.Tensor, torch.nn.Parameter)
