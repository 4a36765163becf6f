"""wsbcn/_compat.py: every private torch/triton interface has a public fallback, and the
fallback computes the same thing.

Triton's launcher: the direct C launch, the launcher object's Python ``run`` and the
public ``kernel[grid]`` must hand triton's C launch function the same kernels, grids and
arguments (checked over the stub CUDA driver in a subprocess, where triton's real host
path runs; the same kernel with the same arguments computes the same bits). torch's
functionalization rule: with triton_op's own rule in place of wsbcn's, a compiled step
gives bitwise the same results.
"""
import inspect
import json
import os
import subprocess
import sys
import types

import pytest
import torch

import wsbcn
from wsbcn import _compat
from conftest import dead_functorch_wrapper

LAUNCH_PATHS = r"""
import json
import torch
import stub_launches
from wsbcn import _compat, backends, tuning
from wsbcn.functional import batch_channel_norm, weight_standardize
from wsbcn.kernels import launch
from wsbcn.tools import stub_driver

stub_driver.install()
backends.emulate_gpu(stub_driver.GPU_NAME, stub_driver.SM_COUNT)

seen = []  # every launch: (kernel hash, grid, arguments), tensors as addresses (stub_launches.py)
stub_launches.record(seen)
forms = []  # whether each launcher made has its C launch written out (_compat.c_launch_form)
known_form = launch.c_launch_form
launch.c_launch_form = lambda compiled: forms.append(known_form(compiled) is not None) or known_form(compiled)

torch.manual_seed(0)
x = torch.randn(2, 64, 6, 6, dtype=torch.bfloat16, requires_grad=True)
w = torch.randn(16, 8, 3, 3, requires_grad=True)
params = [torch.ones(64, requires_grad=True), torch.zeros(64, requires_grad=True),
          torch.ones(1, 8, 1, requires_grad=True), torch.zeros(1, 8, 1, requires_grad=True)]
rm, rv = torch.zeros(64), torch.ones(64)

def step():
    y = batch_channel_norm(x, 8, rm, rv, *params, training=True)
    torch.autograd.grad(y, [x] + params, torch.ones_like(y))
    torch.autograd.grad(weight_standardize(w), [w], torch.ones_like(w))

out = {}
for name, direct, c_launch in (("c launch", True, True), ("run", True, False), ("kernel[grid]", False, False)):
    _compat.direct_launch_enabled, _compat.c_launch_enabled = direct, c_launch
    tuning.forget_loaded_tables()  # new plans: their launchers are made under these settings
    forms.clear()
    step()  # compiles (kernel[grid]) and keeps the launchers
    seen.clear()
    before = dict(launch.stats)
    step()
    launches = [[h, g, [a for a in args if not (isinstance(a, int) and a > 1 << 20)]] for h, g, args in seen]
    out[name] = {"launches": launches, "direct": launch.stats["direct"] - before["direct"], "c forms": forms[:]}
print("RESULT" + json.dumps(out))
"""


def test_every_launch_path_hands_triton_the_same_launches():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "WSBCN_BACKEND")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (os.path.dirname(__file__), env.get("PYTHONPATH"))))
    proc = subprocess.run([sys.executable, "-c", LAUNCH_PATHS], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert out["c launch"]["direct"] == 8 and out["run"]["direct"] == 8  # 3 + 3 BCN, 1 + 1 WS
    assert out["kernel[grid]"]["direct"] == 0
    # every triton with a direct launch (3.6-3.9) has its C launch written out
    assert len(out["c launch"]["c forms"]) == 8 and all(out["c launch"]["c forms"])
    assert not any(out["run"]["c forms"])
    assert len(out["c launch"]["launches"]) == 8
    assert out["c launch"]["launches"] == out["run"]["launches"] == out["kernel[grid]"]["launches"]


def test_the_triton_versions_with_a_direct_launch_are_the_checked_ones():
    import triton

    checked = _compat.DIRECT_LAUNCH_TRITON[0] <= _compat._version(triton.__version__) <= _compat.DIRECT_LAUNCH_TRITON[1]
    assert _compat.direct_launch_enabled == checked
    assert _compat._version("3.9.0+git1234") == (3, 9) and _compat._version("3.10.0") == (3, 10)
    assert not _compat.DIRECT_LAUNCH_TRITON[0] <= (3, 10) <= _compat.DIRECT_LAUNCH_TRITON[1]


def test_an_op_without_the_private_dispatch_table_keeps_triton_ops_rule():
    assert _compat.functionalize_rule(types.SimpleNamespace(), lambda *a: None) is False


@pytest.mark.skipif(_compat.FunctionalTensorMode is None, reason="this torch has no FunctionalTensorMode")
def test_compiled_results_are_the_same_with_triton_ops_own_rule(monkeypatch):
    """On the torch backend wsbcn's rule traces into the op body, as triton_op's own rule
    (the fallback) does: bitwise the same compiled forward and gradients."""
    from wsbcn.ops.norm import norm_backward_op, norm_forward_op

    monkeypatch.setenv("WSBCN_BACKEND", "torch")

    def run():
        torch.manual_seed(0)
        m = wsbcn.BatchChannelNorm2d(8, num_groups=4, activation="relu")
        x = torch.randn(2, 8, 5, 5, requires_grad=True)
        torch._dynamo.reset()
        y = torch.compile(m, backend="aot_eager", fullgraph=True)(x)
        grads = torch.autograd.grad(y, [x, *m.parameters()], torch.ones_like(y))
        return [y.detach(), *grads, m.running_mean, m.running_var]

    ours = run()
    for op in (norm_forward_op, norm_backward_op):
        fns = op._torch_dispatch_fns
        monkeypatch.setitem(fns, _compat.FunctionalTensorMode, fns[_compat.FunctionalTensorMode].args[0])
    fallback = run()
    for a, b in zip(ours, fallback):
        assert torch.equal(a, b)


def _small_model_step(c_apply_enabled, monkeypatch, x=None, model_wide=(False, True)):
    """Outputs, gradients and buffers of one training step of WSConv + BCN + GroupNorm,
    with per-layer and/or model-wide WS, the layers calling ``Function.apply``'s C half
    or not."""
    from wsbcn.ops import norm, ws, ws_model

    monkeypatch.setattr(_compat, "c_apply_enabled", c_apply_enabled)
    for cache in (norm._cache, ws._cache, ws_model._cache):
        cache.clear()  # new calls: each reads c_apply_enabled when it is made
    torch.manual_seed(0)
    model = torch.nn.Sequential(wsbcn.WSConv2d(4, 8, 3, padding=1), wsbcn.BatchChannelNorm2d(8, 4),
                                wsbcn.GroupNorm(4, 8), wsbcn.WSConv2d(8, 8, 1))
    inputs = list(model.parameters())  # and x, unless given
    if x is None:
        x = torch.randn(2, 4, 5, 5).requires_grad_(True)
        inputs.insert(0, x)
    results = []
    for whole in model_wide:
        standardizer = wsbcn.ModelWeightStandardizer(model) if whole else None
        y = model(x)
        results += [y, *torch.autograd.grad(y, inputs, torch.ones_like(y)), *model.buffers()]
        if standardizer is not None:
            standardizer.remove()
    return results


def test_function_apply_s_c_half_is_taken_where_apply_is_torch_s_python_wrapper(monkeypatch):
    """Through torch 2.13 the layers call the C half of ``Function.apply`` themselves;
    where apply is that C method already (torch 2.14 on) they call it on the same hot
    path; a Function with setup_context is called through apply."""
    from wsbcn.ops.norm import NormFunction

    apply = inspect.getattr_static(torch.autograd.Function, "apply")
    python_apply = isinstance(apply, classmethod)
    c_apply = _compat.function_c_apply(NormFunction)
    assert c_apply is not None  # one of the two forms, on every torch the project supports
    if not python_apply:  # torch >= 2.14
        assert apply is inspect.getattr_static(torch._C._FunctionBase, "apply") and c_apply == NormFunction.apply

    class WithSetupContext(torch.autograd.Function):
        @staticmethod
        def forward(x):
            return x

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

    assert _compat.function_c_apply(WithSetupContext) is None
    if python_apply:  # the layers never call the Python wrapper
        def refuse(*args):
            raise AssertionError("Function.apply called")

        monkeypatch.setattr(torch.autograd.Function, "apply", classmethod(refuse))
        _small_model_step(True, monkeypatch)


def test_a_repeat_training_call_takes_the_hot_path_on_every_torch(monkeypatch):
    """A repeat eager BCN or GroupNorm call with grad on (no transform, no dual level, no
    recompute) goes from the recalled call straight to the Function, never through the
    general path's checks one by one: on torch 2.14 and later, whose apply is C, too."""
    from wsbcn import checks
    from wsbcn.ops import norm, ws, ws_model

    def refuse(*args):
        raise AssertionError("the general path was taken")

    def not_recalled(*args):
        raise AssertionError("a repeat call was not recalled")

    for cache in (norm._cache, ws._cache, ws_model._cache):
        cache.clear()  # calls of this torch's apply (other tests make some with c_apply_enabled off)
    torch.manual_seed(0)
    model = torch.nn.Sequential(wsbcn.WSConv2d(4, 8, 3, padding=1), wsbcn.BatchChannelNorm2d(8, 4),
                                wsbcn.GroupNorm(4, 8))
    x = torch.randn(2, 4, 5, 5)
    model(x).sum().backward()  # the first calls: validated, remembered
    monkeypatch.setattr(norm._Call, "_general", refuse)
    monkeypatch.setattr(checks, "keyed", not_recalled)
    model(x).sum().backward()


def test_function_apply_s_c_half_gives_function_apply_s_results(backend, monkeypatch):
    # (the apply is the same on both backends: model-wide WS, slow on the interpreter, on one)
    model_wide = (False, True) if backend == "torch" else (False,)
    for ours, theirs in zip(_small_model_step(True, monkeypatch, model_wide=model_wide),
                            _small_model_step(False, monkeypatch, model_wide=model_wide)):
        assert torch.equal(ours, theirs)


def test_a_functorch_wrapper_that_outlived_its_transform_gives_the_plain_tensor_s_results(monkeypatch):
    monkeypatch.setenv("WSBCN_BACKEND", "torch")  # the apply is the same on both backends
    x = torch.randn(2, 4, 5, 5)
    dead = dead_functorch_wrapper(x)  # x wrapped by a transform that has ended
    expected = _small_model_step(False, monkeypatch, x.clone())
    for c_half in (True, False):
        for ours, theirs in zip(_small_model_step(c_half, monkeypatch, dead), expected):
            assert torch.equal(ours, theirs)


def test_is_fake_knows_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fake = torch.empty(3)
    assert _compat.is_fake(fake) and not _compat.is_fake(torch.empty(3))


@pytest.mark.parametrize("behaviour", ["passes everything", "raises", "missing"])
def test_tensor_guards_are_used_only_where_they_behave_as_known(monkeypatch, behaviour):
    """The guard class is checked at import: one that lets another tensor (or None, or a
    tensor given twice) pass, one whose constructor or check raises, or none at all, turns
    recall off (every call then builds its key, tests/test_recalled_calls.py)."""
    guards = torch._C._dynamo.guards

    class PassesEverything:
        def __init__(self, *tensors, dynamic_dims_sizes, dynamic_dims_strides):
            pass

        def check(self, *tensors):
            return True

    class Raises(PassesEverything):
        def check(self, *tensors):
            raise RuntimeError("another interface")

    if behaviour == "missing":
        monkeypatch.delattr(guards, "TensorGuards")
    else:
        monkeypatch.setattr(guards, "TensorGuards", PassesEverything if behaviour == "passes everything" else Raises)
    assert _compat._tensor_guards_class() is None
    monkeypatch.undo()
    assert _compat._tensor_guards_class() is torch._C._dynamo.guards.TensorGuards
