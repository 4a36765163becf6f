"""Numerical edge cases: offsets, tiny variances, constant channels and filters,
values near the half-precision range limits, NaN/Inf, and no lost state."""
import contextlib
import copy
import os
import sys

import pytest
import torch

import wsbcn
import wsbcn.kernels
from wsbcn.functional import batch_channel_norm, group_norm, weight_standardize
from conftest import DEVICE, config_overrides, rel_err
from reference import bcn_reference, gn_reference, ws_reference


def _bcn_pair(x, mode="batch", **kw):
    training, estimate = {"batch": (True, False), "estimate": (True, True), "eval": (False, False)}[mode]
    c = x.shape[1]
    rm = kw.pop("running_mean", torch.zeros(c, device=x.device))
    rv = kw.pop("running_var", torch.ones(c, device=x.device))
    xs = x.detach().requires_grad_(True)
    x64 = x.detach().double().requires_grad_(True)
    y = batch_channel_norm(xs, 4, rm.clone(), rv.clone(), training=training, estimate=estimate, **kw)
    yr = bcn_reference(x64, 4, running_mean=rm.double().clone(), running_var=rv.double().clone(),
                       training=training, estimate=estimate, **kw)
    g = torch.randn_like(yr)
    y.backward(g.to(y.dtype))
    yr.backward(g)
    return y, yr, xs.grad, x64.grad


def test_tiny_variances_stay_accurate(backend):
    torch.manual_seed(0)
    x = 1.0 + 1e-3 * torch.randn(2, 8, 5, 5, device=DEVICE)  # variance 1e-6, below eps
    for mode in ("batch", "eval"):
        rm = torch.ones(8, device=DEVICE)
        y, yr, dx, dxr = _bcn_pair(x, mode, running_mean=rm, running_var=torch.full((8,), 1e-6, device=DEVICE))
        assert rel_err(y, yr) <= 1e-3 and rel_err(dx, dxr) <= 1e-3
    yg = group_norm(x, 4)
    assert rel_err(yg, gn_reference(x.double(), 4)) <= 1e-3
    w = 0.5 + 1e-4 * torch.randn(4, 3, 3, 3, device=DEVICE)
    assert rel_err(weight_standardize(w), ws_reference(w.double())) <= 1e-3


def test_constant_channels_give_finite_outputs_and_gradients(backend):
    x = torch.randn(2, 8, 4, 4, device=DEVICE)
    x[:, 2] = 3.0  # a constant channel across the batch
    x[1, 4:8] = -1.5  # a constant group in one sample
    for mode in ("batch", "estimate", "eval"):
        y, yr, dx, dxr = _bcn_pair(x, mode, activation="relu")
        assert torch.isfinite(y).all() and torch.isfinite(dx).all(), mode
        assert rel_err(y, yr) <= 1e-4
    xs = x.detach().requires_grad_(True)
    yg = group_norm(xs, 2)
    yg.sum().backward()
    assert torch.isfinite(yg).all() and torch.isfinite(xs.grad).all()


@pytest.mark.parametrize("dtype,scale", [(torch.float16, 3e4), (torch.bfloat16, 1e18)])
def test_values_near_half_precision_limits_do_not_overflow_statistics(backend, dtype, scale):
    """Squares of fp16's largest values pass fp16's range, and squares of 1e18
    pass 1e36: statistics are fp32 and centred, so neither overflows."""
    torch.manual_seed(1)
    x = (torch.randn(2, 8, 4, 4, device=DEVICE).clamp(-2, 2) * scale).to(dtype)
    for mode in ("batch", "estimate"):
        rm = torch.full((8,), 0.0, device=DEVICE)
        rv = torch.full((8,), scale * scale if scale * scale < 3e38 else 1.0, device=DEVICE)
        y, yr, dx, dxr = _bcn_pair(x, mode, running_mean=rm, running_var=rv)
        assert torch.isfinite(y).all(), mode
        assert rel_err(y, yr) <= 3e-2
    assert torch.isfinite(group_norm(x, 4)).all()
    assert rel_err(group_norm(x, 4), gn_reference(x.double(), 4)) <= 3e-2


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_and_inf_propagate_like_the_reference(backend, bad):
    torch.manual_seed(2)
    x = torch.randn(3, 8, 3, 3, device=DEVICE)
    x[1, 5, 1, 1] = bad
    for mode in ("batch", "estimate", "eval"):
        training, estimate = {"batch": (True, False), "estimate": (True, True), "eval": (False, False)}[mode]
        rm, rv = torch.zeros(8, device=DEVICE), torch.ones(8, device=DEVICE)
        ours = batch_channel_norm(x, 4, rm.clone(), rv.clone(), training=training, estimate=estimate)
        ref = bcn_reference(x, 4, running_mean=rm.double(), running_var=rv.double(), training=training,
                            estimate=estimate)
        assert torch.equal(torch.isnan(ours), torch.isnan(ref)), mode
        assert torch.equal(torch.isinf(ours), torch.isinf(ref)), mode
        ok = torch.isfinite(ref)
        assert rel_err(ours[ok], ref[ok]) <= 1e-5, mode
    ours = group_norm(x, 4)
    ref = gn_reference(x, 4)
    assert torch.equal(torch.isnan(ours), torch.isnan(ref)) and torch.equal(torch.isinf(ours), torch.isinf(ref))


@pytest.mark.parametrize("layer", ["bcn", "gn"])
def test_nan_propagates_through_a_fused_relu(backend, layer):
    """torch.relu(NaN) is NaN, and its backward passes the gradient at a NaN: the fused
    ReLU does the same (triton's maximum returned the number, 0, for a NaN)."""
    torch.manual_seed(3)
    x = torch.randn(2, 8, 3, 3, device=DEVICE)
    x[1, 2, 1, 1] = float("nan")
    xs, x64 = x.clone().requires_grad_(True), x.double().requires_grad_(True)
    if layer == "bcn":
        y = batch_channel_norm(xs, 4, training=True, activation="relu")
        yr = bcn_reference(x64, 4, training=True, activation="relu")
    else:
        y, yr = group_norm(xs, 4, activation="relu"), gn_reference(x64, 4, activation="relu")
    assert torch.isnan(yr).any()
    assert torch.equal(torch.isnan(y), torch.isnan(yr))
    g = torch.randn(x.shape, dtype=torch.float64)
    y.backward(g.float())
    yr.backward(g)
    assert torch.equal(torch.isnan(xs.grad), torch.isnan(x64.grad))


def test_large_offsets_keep_their_precision_in_the_torch_op_paths(backend):
    """Double backward, forward-mode AD and vmap compute the norms with torch ops
    (ops/differentiable.py): their statistics are taken about a pivot, as the kernels',
    so a large common offset keeps fp32 precision there too (they were off by 1e-2)."""
    from torch.autograd import forward_ad

    torch.manual_seed(4)
    x = 1e4 + 1e-3 * torch.randn(2, 8, 4, 4, device=DEVICE)
    dy, tangent = torch.randn_like(x), torch.randn_like(x)
    layers = {"bcn": (lambda t: batch_channel_norm(t, 4, training=True),
                      lambda t: bcn_reference(t, 4, training=True)),
              "gn": (lambda t: group_norm(t, 4), lambda t: gn_reference(t, 4))}
    for name, (ours, ref) in layers.items():
        x64 = x.double().requires_grad_(True)
        dx_ref, = torch.autograd.grad(ref(x64), x64, dy.double())
        _, jvp_ref = torch.func.jvp(ref, (x.double(),), (tangent.double(),))
        xs = x.clone().requires_grad_(True)
        dx, = torch.autograd.grad(ours(xs), xs, dy, create_graph=True)
        with forward_ad.dual_level():
            jvp = forward_ad.unpack_dual(ours(forward_ad.make_dual(x, tangent))).tangent
        y_vmap = torch.func.vmap(ours)(x.unsqueeze(0))[0]
        assert rel_err(dx, dx_ref) <= 1e-5, name
        assert rel_err(jvp, jvp_ref) <= 1e-5, name
        assert rel_err(y_vmap, ref(x.double())) <= 1e-5, name


_FACTORIES = ("empty", "empty_like", "zeros", "zeros_like", "ones", "ones_like", "full", "full_like", "empty_strided")


@contextlib.contextmanager
def _allocations(monkeypatch, fail_at=None):
    """Counts the tensor allocations wsbcn's own code makes through torch's factory
    functions (calls from triton's interpreter and from torch are not wsbcn's); the
    ``fail_at``-th raises torch.OutOfMemoryError. Yields the list of call sites."""
    roots = tuple(os.path.dirname(m.__file__) + os.sep for m in (wsbcn, wsbcn.kernels))
    sites = []
    with monkeypatch.context() as mp:
        for name in _FACTORIES:
            real = getattr(torch, name)

            def factory(*args, _real=real, _name=name, **kwargs):
                caller = sys._getframe(1).f_code.co_filename
                if caller.startswith(roots):
                    sites.append(f"{_name} at {os.path.basename(caller)}:{sys._getframe(1).f_lineno}")
                    if len(sites) == fail_at:
                        raise torch.OutOfMemoryError(f"simulated, at {sites[-1]}")
                return _real(*args, **kwargs)

            mp.setattr(torch, name, factory)
        yield sites


def test_failure_inside_forward_leaves_state_untouched(backend, monkeypatch):
    """An out-of-memory error anywhere in a forward changes no buffer. The Triton path:
    at each of the forward's allocations in turn (all of them must come before the
    first launch: its combine kernel writes the running buffers); the torch closed
    form: at its last steps before its deferred buffer writes. Training (which updates
    the buffers) and eval (which must not)."""
    from wsbcn.backends import torch_closed_form

    m = wsbcn.BatchChannelNorm2d(8, num_groups=4).to(DEVICE)
    with torch.no_grad():
        m.running_mean.normal_()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(2, 8, 3, 3, device=DEVICE)

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("simulated")

    def fails_and_changes_nothing(where):
        with pytest.raises(torch.OutOfMemoryError):
            m(x)
        for k, v in m.state_dict().items():
            assert torch.equal(v, before[k]), (k, where)

    for training in (True, False):
        m.train(training)
        copy.deepcopy(m)(x)  # the checks and plans of this signature, cached: what a repeat call runs
        if backend == "torch":
            for step in ("_apply_coefs", "_activate"):  # the output's coefficients, its last op
                with monkeypatch.context() as mp:
                    mp.setattr(torch_closed_form, step, oom)
                    fails_and_changes_nothing(step)
            continue
        other = copy.deepcopy(m)
        with _allocations(monkeypatch) as sites:
            other(x)
        assert len(sites) >= 3, sites  # y and the two fp32 buffers, at least
        for k in range(1, len(sites) + 1):
            with _allocations(monkeypatch, fail_at=k):
                fails_and_changes_nothing(sites[k - 1])


def test_determinism_repeated_runs_are_bitwise_identical(backend):
    torch.manual_seed(3)
    x = torch.randn(2, 8, 6, 6, device=DEVICE, requires_grad=True)
    results = []
    for _ in range(2):
        m = wsbcn.BatchChannelNorm2d(8, num_groups=4, activation="silu").to(DEVICE)
        y = m(x)
        (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
        results.append((y, gx, m.running_mean.clone(), m.running_var.clone()))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_public_entry_points_reject_non_modules_and_bad_types():
    with pytest.raises(TypeError, match="nn.Module"):
        wsbcn.freeze("model")
    with pytest.raises(TypeError, match="Tensor"):
        group_norm([[1.0]], 1)
    with pytest.raises(TypeError, match="eps"):
        weight_standardize(torch.ones(2, 3), eps="small")
    with pytest.raises(TypeError, match="momentum"):
        wsbcn.BatchChannelNorm2d(8, num_groups=4, momentum="fast")
    with pytest.raises(TypeError, match="num_groups"):
        wsbcn.BatchChannelNorm2d(8, num_groups=2.0)


@pytest.mark.parametrize("plan", [{"BLOCK_S": 2, "split": 3}, {"BLOCK_S": 8, "split": 2}, {"BLOCK": 16}],
                         ids=["2-lanes-3-chunks", "8-lanes-2-chunks", "ws-16-lanes"])
def test_many_steps_per_lane_keep_offsets_and_tiny_variances_accurate(monkeypatch, plan):
    """On CPU the heuristic gives each lane one element; GPU plans give each lane many
    (per-lane Welford, kernels/reduce.py). Large offsets and tiny variances through
    such plans, against the float64 reference."""
    monkeypatch.setenv("WSBCN_BACKEND", "triton")
    with config_overrides(plan):
        torch.manual_seed(9)
        if "BLOCK" in plan:
            for w in (1e4 + torch.randn(4, 9, 3, 3, device=DEVICE),
                      0.5 + 1e-4 * torch.randn(4, 9, 3, 3, device=DEVICE)):
                wg = w.detach().requires_grad_(True)
                w64 = w.detach().double().requires_grad_(True)
                g = torch.randn_like(w)
                got, expected = weight_standardize(wg), ws_reference(w64)
                got.backward(g)
                expected.backward(g.double())
                assert rel_err(got, expected) <= 1e-4 and rel_err(wg.grad, w64.grad) <= 1e-3
            return
        for x in (1e4 + torch.randn(2, 8, 5, 7, device=DEVICE),
                  1.0 + 1e-3 * torch.randn(2, 8, 5, 7, device=DEVICE)):
            y, yr, dx, dxr = _bcn_pair(x, "batch", activation="silu")
            assert rel_err(y, yr) <= 1e-5 and rel_err(dx, dxr) <= 1e-4
            rm = x.mean(dim=(0, 2, 3))  # estimates that track the data
            y, yr, dx, dxr = _bcn_pair(x, "estimate", running_mean=rm, running_var=x.var(dim=(0, 2, 3)))
            assert rel_err(y, yr) <= 1e-5 and rel_err(dx, dxr) <= 1e-4
            assert rel_err(group_norm(x, 4), gn_reference(x.double(), 4)) <= 1e-5
