"""What torch.compile makes of a model, for the tests that look at it over the stub CUDA
driver in a subprocess (test_triton_ops, test_ws_model; their scripts import this file
with the tests folder on PYTHONPATH).

``capture(graphs)``: a torch.compile backend that appends each forward and backward
graph AOTAutograd makes to ``graphs`` and runs it as it is. ``calls(g)``: the graph's
calls, ``(node, kernel name)`` for a Triton launch (a triton_kernel_wrapper node) and
``(node, None)`` for any other function. ``inductor_code(model, x)``: {"output code":
the Python code inductor generates for ``model(x)``} and, when an error ends the
compile, {"inductor error": its name} (the code's own compile for a CPU target fails
afterwards: there is no GPU).
"""
import torch
from functorch.compile import make_boxed_func
from torch._functorch.aot_autograd import aot_module_simplified
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table


def capture(graphs):
    def backend(gm, example_inputs):
        def keep(g, _):
            graphs.append(g)
            return make_boxed_func(g)
        return aot_module_simplified(gm, example_inputs, fw_compiler=keep, bw_compiler=keep)
    return backend


def calls(g):
    for n in g.graph.nodes:
        if n.op != "call_function":
            continue
        if "triton_kernel_wrapper" in str(n.target):
            yield n, kernel_side_table.get_kernel(n.kwargs["kernel_idx"]).fn.__name__
        else:
            yield n, None


def inductor_code(model, x):
    from torch._inductor.graph import GraphLowering

    torch._dynamo.reset()
    code, result = [], {}
    saved = GraphLowering.save_output_code
    GraphLowering.save_output_code = code.append  # the hook torch's run_and_get_code uses
    try:
        torch.compile(model, fullgraph=True)(x)
    except Exception as exc:
        result["inductor error"] = f"{type(exc).__name__}: {exc}"[:2000]
    finally:
        GraphLowering.save_output_code = saved
    result["output code"] = "\n".join(code)
    return result


def refuses_cpu_triton(result) -> bool:
    """Whether ``inductor_code`` wrote no code because inductor writes no user Triton launch
    for CPU tensors, which the stub's emulated GPU uses: torch 2.15 asks triton for a "cpu"
    backend before it writes one (TritonUnavailableError, or no compatible backend).
    torch 2.13's inductor writes the code over the stub (and fails only after, compiling
    it); a GPU's tensors get it written on both."""
    error = result.get("inductor error", "")
    return not result.get("output code") and (
        "triton not built with the 'cpu' backend" in error or "compatible backends for target (cpu)" in error)
