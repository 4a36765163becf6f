"""The wsbcn::* ops as torch.library.triton_op (wsbcn/ops.py): what torch.compile and
torch.export see, and that the op bodies compute what the float64 reference does.

In this process triton runs its interpreter (conftest), which cannot be traced, so
here the ops stay opaque under torch.compile on the Triton backend. What compile
traces on the Triton backend is checked in a subprocess over the stub CUDA driver
(wsbcn.tools.stub_driver: triton's real JIT and sm_90 compile, nothing executes):
the graphs' kernel nodes, their mutated arguments, dynamic shapes, and inductor's
generated launches. Numbers come from the interpreter, against float64.
"""
import copy
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import wsbcn
from wsbcn.ops import norm, ws
from wsbcn.kernels.norm import MODE_BATCH, MODE_ESTIMATE, MODE_GN, MODE_RUNNING
from compiled_graphs import refuses_cpu_triton
from conftest import DEVICE, rel_err
from reference import bcn_reference, gn_reference, ws_reference
from test_compile import layer_kinds_model

CASES = {  # name -> (mode, update_running, cumulative, has_bn_affine, group_affine)
    "gn": (MODE_GN, False, False, False, False),
    "batch": (MODE_BATCH, True, False, True, True),
    "estimate_cumulative": (MODE_ESTIMATE, True, True, True, False),
    "running": (MODE_RUNNING, False, False, False, True),
}


def _norm_inputs(case, layout, seed=0):
    mode, update, cumulative, bn_affine, group_affine = CASES[case]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 8, 5, 3, generator=g) * 2 + 0.5
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    c, groups = 8, 4
    aff = groups if group_affine else c
    return dict(
        x=x.to(DEVICE), gamma=(torch.rand(c, generator=g) + 0.5).to(DEVICE) if bn_affine else None,
        beta=torch.randn(c, generator=g).to(DEVICE) if bn_affine else None,
        omega=(torch.rand(aff, generator=g) + 0.5).to(DEVICE), eta=torch.randn(aff, generator=g).to(DEVICE),
        running_mean=(torch.randn(c, generator=g) * 0.3).to(DEVICE) if mode != MODE_GN else None,
        running_var=(torch.rand(c, generator=g) + 0.5).to(DEVICE) if mode != MODE_GN else None,
        num_batches_tracked=torch.tensor(3, device=DEVICE) if update else None,
    ), (groups, 1e-5, 0.0 if cumulative else 0.1, cumulative, mode, update, "silu", group_affine)


def _fresh(inputs):
    return {k: (None if v is None else v.clone()) for k, v in inputs.items()}


def _norm_reference(inputs, scalars, dy):
    """The naive float64 composition of a case: y, the gradients of (x, gamma, beta,
    omega, eta) flattened (None where absent), and the running buffers after the call."""
    groups, eps, momentum, cumulative, mode, update, act, group_affine = scalars
    x64 = inputs["x"].double().requires_grad_(True)
    p64 = {k: (None if v is None else v.double().requires_grad_(k in ("gamma", "beta", "omega", "eta")))
           for k, v in inputs.items() if k != "x"}
    om, et = p64["omega"], p64["eta"]
    buffers = {k: (None if p64[k] is None else p64[k].detach().clone())
               for k in ("running_mean", "running_var", "num_batches_tracked")}
    if mode == MODE_GN:
        k = inputs["x"].shape[1] // groups
        y = gn_reference(x64, groups, om.repeat_interleave(k) if group_affine else om,
                         et.repeat_interleave(k) if group_affine else et, eps, act)
    else:
        y = bcn_reference(x64, groups, p64["gamma"], p64["beta"], om.view(1, -1, 1), et.view(1, -1, 1),
                          buffers["running_mean"], buffers["running_var"], training=mode != MODE_RUNNING,
                          estimate=mode == MODE_ESTIMATE, momentum=None if cumulative else momentum, eps=eps,
                          activation=act, num_batches_tracked=buffers["num_batches_tracked"])
    y.backward(dy.double())
    grads = [x64.grad] + [None if p64[k] is None else p64[k].grad.reshape(-1) for k in ("gamma", "beta", "omega", "eta")]
    return y, grads, buffers


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("case", list(CASES))
def test_op_bodies_compute_the_float64_reference(monkeypatch, case, layout):
    """The op bodies (direct, and through wrap_triton as compile traces them) and the
    eager plan each against the naive float64 composition: output, every gradient,
    running buffers and batch count; and the ops give the eager plan's bits."""
    monkeypatch.setenv("WSBCN_BACKEND", "triton")
    inputs, scalars = _norm_inputs(case, layout)
    groups, eps, momentum, cumulative, mode, update, act, group_affine = scalars
    x = inputs["x"]
    dy = torch.randn_like(x)
    y_ref, grads_ref, buffers_ref = _norm_reference(inputs, scalars, dy)
    plan = norm.launch_plan(x, groups, mode, update, cumulative, act, group_affine, inputs["gamma"] is not None,
                            True, inputs["num_batches_tracked"] is not None, eps, momentum,
                            norm.tensor_dtypes(*list(inputs.values())[1:]))
    results = {}
    for path in ("eager", "op", "op traced"):
        state = _fresh(inputs)
        if path == "eager":
            y, side = plan.forward(*state.values())
            grads = plan.backward(dy, x, side, state["gamma"], state["beta"], state["omega"], state["eta"])
        else:
            traced = path == "op traced"
            y, stats, rstd_c, rho = plan.forward_op(*state.values(), traced=traced)
            if mode == MODE_GN:  # unused by GN, and defined: the torch closed form's ones
                assert torch.equal(rstd_c, torch.ones_like(rstd_c))
            grads = plan.backward_op(dy, x, stats, rstd_c, rho, state["gamma"], state["omega"], state["eta"],
                                     traced=traced)
        assert rel_err(y, y_ref) <= 1e-5, path
        assert len(grads) == len(grads_ref) == 5
        for name, g, g_ref in zip(("dx", "d_gamma", "d_beta", "d_omega", "d_eta"), grads, grads_ref):
            if g_ref is None or mode == MODE_GN and name in ("d_gamma", "d_beta"):
                assert (g is None) if path == "eager" else (g.numel() == 0), (path, name)
            else:
                assert g.shape == g_ref.shape and rel_err(g, g_ref) <= 1e-4, (path, name, rel_err(g, g_ref))
        for name, b_ref in buffers_ref.items():
            if b_ref is None:
                continue
            if name == "num_batches_tracked":
                assert int(state[name]) == int(b_ref), (path, name)
            else:
                assert rel_err(state[name], b_ref) <= 1e-6, (path, name, rel_err(state[name], b_ref))
        results[path] = [y, *(g for g in grads if g is not None and g.numel())] + [
            state[k] for k in buffers_ref if state[k] is not None]
    for path in ("op", "op traced"):  # one op body: the same launches give the same bits
        for a, b in zip(results[path], results["eager"]):
            assert torch.equal(a, b), path


def test_ws_op_bodies_compute_the_float64_reference(monkeypatch):
    monkeypatch.setenv("WSBCN_BACKEND", "triton")
    torch.manual_seed(0)
    w = torch.randn(6, 4, 3, 3, device=DEVICE) * 0.1 + 0.02
    g = torch.randn_like(w)
    w64 = w.double().requires_grad_(True)
    ref = ws_reference(w64, 1e-5, 1, "std")
    ref.backward(g.double())
    plan = ws.ws_plan(w, 1e-5, 1, True)
    results = []
    for path in ("eager", "op traced"):
        w_hat, stats = plan.forward(w) if path == "eager" else plan.forward_traced(w)
        dw = plan.backward(g, w, stats) if path == "eager" else plan.backward_traced(g, w, stats)
        assert rel_err(w_hat, ref) <= 1e-5 and rel_err(dw, w64.grad) <= 1e-4, path
        results.append((w_hat, dw))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("case", list(CASES))
def test_norm_ops_pass_opcheck(backend, case):
    """torch.library.opcheck: schema and mutations, fake kernel, autograd
    registration, and AOTAutograd tracing (static and dynamic shapes)."""
    inputs, scalars = _norm_inputs(case, "channels_last" if case == "batch" else "contiguous")
    args = tuple(inputs.values()) + scalars
    torch.library.opcheck(torch.ops.wsbcn.norm_forward.default, args)
    y, stats, rstd_c, rho = torch.ops.wsbcn.norm_forward(*_fresh(inputs).values(), *scalars)
    groups, _, _, _, mode, _, act, group_affine = scalars
    torch.library.opcheck(torch.ops.wsbcn.norm_backward.default,
                          (torch.randn_like(y), inputs["x"], stats, rstd_c, rho, inputs["gamma"], inputs["omega"],
                           inputs["eta"], groups, mode, act, group_affine))


def test_ws_ops_pass_opcheck(backend):
    w = torch.randn(6, 4, 3, 3, device=DEVICE)
    for std_mode in (False, True):
        torch.library.opcheck(torch.ops.wsbcn.ws_forward.default, (w, 1e-5, 1, std_mode))
        _, stats = torch.ops.wsbcn.ws_forward(w, 1e-5, 1, std_mode)
        torch.library.opcheck(torch.ops.wsbcn.ws_backward.default, (torch.randn_like(w), w, stats))


@pytest.mark.parametrize("training", [True, False])
def test_export_keeps_the_ops_and_runs_like_eager(backend, training):
    """torch.export.export of a model with every layer kind: its graph holds the
    wsbcn ops, and the exported program computes what eager does (running buffers
    included, in training)."""
    model = layer_kinds_model().train(training)
    if not training:  # eval with running statistics that are not the initial ones
        with torch.no_grad():
            model.train()(torch.randn(4, 3, 8, 8, device=DEVICE))
        model.eval()
    eager = copy.deepcopy(model)
    x = torch.randn(2, 3, 8, 8, device=DEVICE)
    program = torch.export.export(model, (x,))
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert [t for t in targets if t.startswith("wsbcn.")] == ["wsbcn.ws_forward.default",
                                                              "wsbcn.norm_forward.default"] * 3
    exported = program.module()
    before = {k: v.clone() for k, v in eager.named_buffers()}
    y, y_eager = exported(x), eager(x)
    torch.testing.assert_close(y, y_eager, rtol=0, atol=0)
    for (name, b), b_eager in zip(exported.named_buffers(), eager.buffers()):
        torch.testing.assert_close(b, b_eager, rtol=0, atol=0, msg=name)
    changed = [k for k, v in eager.named_buffers() if not torch.equal(v, before[k])]
    assert changed == ([k for k in before] if training else [])


CHECK_TRACED = r"""
import json
import torch
from wsbcn.tools import stub_driver
stub_driver.install()
import wsbcn
from wsbcn import backends
from compiled_graphs import calls, capture, inductor_code
backends.emulate_gpu(stub_driver.GPU_NAME, stub_driver.SM_COUNT)

def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        wsbcn.WSConv2d(3, 16, 3, padding=1),
        wsbcn.BatchChannelNorm2d(16, num_groups=4, activation="relu"),
        wsbcn.GroupNorm(4, 16, activation="silu"),
        wsbcn.BatchChannelNorm2d(16, num_groups=2, estimate=True))

graphs = []

def describe(g):
    out = []
    for n, kernel in calls(g):
        if kernel is not None:
            out.append([str(n.target), kernel, sorted(n.kwargs["tensors_to_clone"])])
        elif "wsbcn" in str(n.target) or "auto_functionalized" in str(n.target):
            out.append([str(n.target), str(n.args[0]) if n.args else "", []])
    return out

result = {}
compiled = torch.compile(model(), fullgraph=True, backend=capture(graphs))
for size in (8, 10, 12):  # a second size makes dynamo compile for dynamic shapes
    y = compiled(torch.randn(2, 3, size, size))
    y.square().mean().backward()
    result[f"graphs after {size}"] = len(graphs)
result["graphs"] = [describe(g) for g in graphs]

# inductor's generated code launches the kernels itself
result.update(inductor_code(model(), torch.randn(2, 3, 8, 8)))
print("RESULT" + json.dumps(result))
"""

FORWARD = ["_ws_fwd_kernel", "_norm_stats_kernel", "_norm_combine_kernel", "_norm_apply_kernel"]


@pytest.mark.slow  # 70-80 s with a cold inductor cache; fast cousins: test_compile's fullgraph compiles
def test_compile_traces_the_triton_kernels_into_the_graph():
    """Over the stub driver (the Triton path of a GPU, nothing executes): with static
    shapes the compiled forward and backward graphs hold each layer's Triton launches
    (no opaque op), clone only fresh buffers and the running buffers, and inductor's
    code launches the kernels itself; with dynamic shapes the norm ops stay opaque
    and one graph serves every size."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "WSBCN_BACKEND")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (os.path.dirname(__file__), env.get("PYTHONPATH"))))  # compiled_graphs
    proc = subprocess.run([sys.executable, "-c", CHECK_TRACED], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert out["graphs after 8"] == 2 and out["graphs after 10"] == 4 and out["graphs after 12"] == 4
    static_fwd, static_bwd, dynamic_fwd, dynamic_bwd = out["graphs"]
    wrapper = "triton_kernel_wrapper_functional"
    assert [k for _, k, _ in static_fwd] == FORWARD + FORWARD[1:] * 2
    assert all(t == wrapper for t, _, _ in static_fwd + static_bwd)
    assert sorted(k for _, k, _ in static_bwd) == sorted(
        ["_ws_bwd_kernel"] + ["_norm_bwd_reduce_kernel", "_norm_bwd_combine_kernel", "_norm_bwd_apply_kernel"] * 3)
    # what each launch writes (torch's analysis of the kernel's IR): never an input of the op
    fwd_inputs = {"X", "W", "Gamma", "Beta", "Omega", "Eta"}
    bwd_inputs = {"Dy", "X", "Grad", "W", "Gamma", "Omega", "Eta", "Pivot", "Mean", "Dm", "P", "Ym", "M2", "Rstd_c",
                  "Rho", "Shifted_mean", "Rstd", "Gcoef"}
    for inputs, graph in ((fwd_inputs, static_fwd), (bwd_inputs, static_bwd)):
        for _, kernel, cloned in graph:
            assert cloned and not inputs & set(cloned), (kernel, cloned)
    combine = [c for _, k, c in static_fwd if k == "_norm_combine_kernel"]
    assert "Running_mean" in combine[0] and "Running_mean" not in combine[1]  # BCN updates, GN has none
    # dynamic shapes: WS (static weight shapes) still traced, the norm ops opaque
    assert [k for t, k, _ in dynamic_fwd if t == wrapper] == ["_ws_fwd_kernel"]
    assert sum("auto_functionalized" in t or "wsbcn.norm_forward" in t for t, _, _ in dynamic_fwd) == 3
    assert sum(t == "wsbcn.norm_backward.default" for t, _, _ in dynamic_bwd) == 3
    if refuses_cpu_triton(out):
        pytest.skip(f"torch {torch.__version__}'s inductor writes no Triton launch for CPU tensors (the stub's GPU)")
    code = out["output code"]
    for kernel in FORWARD:
        assert f"{kernel}_" in code and "async_compile.triton" in code, kernel
    for kernel in FORWARD:
        assert re.search(kernel + r"_\d+\.run\(", code), kernel


@pytest.mark.slow  # an AOTInductor C++ compile: ~20 s
def test_aoti_package_of_a_ws_bcn_model_matches_eager_on_cpu():
    """perf/tools/aoti_package.py on CPU: export, AOTInductor package (the ops' torch
    closed form; on a GPU their Triton kernels), load, same outputs as eager."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "WSBCN_BACKEND")}
    script = os.path.join(os.path.dirname(__file__), os.pardir, "perf", "tools", "aoti_package.py")
    proc = subprocess.run([sys.executable, script, "--model", "tiny", "--device", "cpu"], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "4 wsbcn op nodes" in proc.stdout and "-> OK" in proc.stdout
