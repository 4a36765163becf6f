"""A repeat call at the same site (a module, else a parameter) is recognised by a tensor
guard instead of its signature key (wsbcn/checks.py ``recalled``). Every call below is
checked against the float64 reference: a guard that let a call through with another
signature's checks and plan would give wrong values or skip an error."""
import pytest
import torch

import wsbcn
from wsbcn import _compat, checks
from wsbcn.functional import batch_channel_norm, group_norm, weight_standardize
from wsbcn.ops import norm, ws
from conftest import DEVICE, TOL, dead_functorch_wrapper, rel_err
from reference import bcn_reference, gn_reference, ws_reference

C, G = 8, 4


def _bcn_params():
    torch.manual_seed(0)
    gen = dict(device=DEVICE)
    return dict(weight=torch.rand(C, **gen) + 0.5, bias=torch.randn(C, **gen),
                group_weight=torch.rand(1, G, 1, **gen) + 0.5, group_bias=torch.randn(1, G, 1, **gen),
                running_mean=torch.randn(C, **gen) * 0.3, running_var=torch.rand(C, **gen) + 0.5)


def _x(n=2, dtype=torch.float32, channels_last=False, requires_grad=True):
    x = torch.randn(n, C, 3, 3, device=DEVICE, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    return x.requires_grad_(requires_grad)


# variants of one functional BCN call, all at one site (the same weight object); each
# differs from the base call in one thing the signature key reads
BCN_VARIANTS = {
    "base": dict(),
    "another batch size": dict(x=dict(n=3)),
    "channels_last": dict(x=dict(channels_last=True)),
    "x without grad": dict(x=dict(requires_grad=False)),
    "float64": dict(x=dict(dtype=torch.float64)),
    # the same number of tensors absent, other ones: a guard of the present ones alone would pass
    "no group affine": dict(drop=("group_weight", "group_bias")),
    "no running buffers": dict(drop=("running_mean", "running_var")),
    "neither": dict(drop=("running_mean", "running_var", "group_weight", "group_bias")),
    "eval": dict(kw=dict(training=False)),
    # a value equal to the base call's (the eval call's), of another type the key does not
    # read: the same call, recalled
    "training given as 1": dict(kw=dict(training=1)),
    "eval given as 0": dict(kw=dict(training=0)),
    "estimate": dict(kw=dict(estimate=True)),
    "momentum 0.5": dict(kw=dict(momentum=0.5)),
    "eps 1e-2": dict(kw=dict(eps=1e-2)),
    "relu": dict(kw=dict(activation="relu")),
    "2 groups": dict(kw=dict(num_groups=2)),
}


def _run_bcn(params, variant):
    spec = BCN_VARIANTS[variant]
    kw = dict(num_groups=G, training=True, estimate=False, momentum=0.1, eps=1e-5, activation=None)
    kw.update(spec.get("kw", {}))
    drop = spec.get("drop", ()) + (("group_weight", "group_bias") if kw["num_groups"] != G else ())
    ours = {k: (None if k in drop else v) for k, v in params.items()}  # a per-group affine fits G groups
    x = _x(**spec.get("x", {}))
    ref = {k: (None if v is None else v.detach().double().clone()) for k, v in ours.items()}
    buffers = [ours[k] for k in ("running_mean", "running_var") if ours[k] is not None]
    nbt, nbt_ref = torch.zeros((), dtype=torch.long, device=DEVICE), torch.zeros((), dtype=torch.long)
    if not buffers:  # counted with the running buffers only
        nbt = nbt_ref = None
    before = [b.clone() for b in buffers]
    y = batch_channel_norm(x, num_batches_tracked=nbt, **kw, **ours)
    updated = [b.clone() for b in buffers]
    for b, value in zip(buffers, before):  # the site's buffers: each call starts from the same values
        b.copy_(value)
    y_ref = bcn_reference(x.detach().double(), num_batches_tracked=nbt_ref, **kw, **ref)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert rel_err(y, y_ref) <= TOL[x.dtype], variant
    refs = [ref[k] for k in ("running_mean", "running_var") if ref[k] is not None]
    for ours_b, ref_b in zip(updated, refs):
        assert rel_err(ours_b, ref_b) <= 1e-6, variant
    assert nbt is None or int(nbt) == int(nbt_ref), variant


@pytest.mark.parametrize("variant", [v for v in BCN_VARIANTS if v != "base"])
def test_bcn_calls_at_one_site_alternating_with_the_base_call_match_the_reference(backend, variant, monkeypatch):
    """The base call and a variant, alternately, twice: the second round's calls find
    remembered entries, and each must be its own call's, not the other's."""
    monkeypatch.setattr(norm._cache, "sites", {})  # the site's entries only (ids of dead objects are reused)
    params = _bcn_params()
    for _ in range(2):
        _run_bcn(params, "base")
        _run_bcn(params, variant)
    if _compat._TENSOR_GUARDS is not None:
        entries = norm._cache.sites[id(params["weight"])]
        if variant == "training given as 1":  # the base call's signature: recalled, not remembered again
            assert len(entries) == 1
        else:
            assert len(entries) >= 2  # both calls were remembered at the site


@pytest.mark.parametrize("order", [("no group affine", "no running buffers", "neither"),
                                   ("neither", "no running buffers", "base", "no group affine")])
def test_bcn_calls_with_other_tensors_absent_at_one_site_match_the_reference(backend, order):
    """Calls with the same number of absent tensors but other ones (no group affine; no
    running buffers), with more of them absent (neither), with none, in turn at one site."""
    params = _bcn_params()
    for _ in range(2):
        for variant in order:
            _run_bcn(params, variant)


def test_a_call_the_checks_reject_is_rejected_at_a_site_with_remembered_calls(backend):
    """A rejected call (nothing changed) after remembered ones, then the base call again."""
    params = _bcn_params()
    _run_bcn(params, "base")
    before = {k: v.clone() for k, v in params.items()}
    x = torch.randn(2, 6, 3, 3, device=DEVICE)  # 6 channels: the weight has 8 elements
    with pytest.raises(ValueError, match="channels|elements"):
        batch_channel_norm(x, G, training=True, **params)
    with pytest.raises(ValueError, match="divisible"):
        batch_channel_norm(_x(), 3, training=True, **params)
    with pytest.raises(ValueError, match="momentum"):
        batch_channel_norm(_x(), G, training=True, momentum=2.0, **params)
    assert all(torch.equal(before[k], v) for k, v in params.items())
    _run_bcn(params, "base")


def test_a_tensor_given_for_a_scalar_gets_the_checks_error_at_a_site_with_remembered_calls(backend):
    """The remembered scalars are compared with the call's: a tensor of several elements
    given for eps, momentum or num_groups (whose == gives a tensor) must reach the checks
    and their TypeError, not fail in the comparison."""
    params = _bcn_params()
    _run_bcn(params, "base")
    w = torch.randn(6, 4, 3, 3, device=DEVICE)
    weight_standardize(w)
    two = torch.tensor([1e-5, 1e-5])
    for kw, name in ((dict(eps=two), "eps"), (dict(momentum=two), "momentum"),
                     (dict(num_groups=torch.tensor([G, G])), "num_groups")):
        kw = dict(dict(num_groups=G, training=True), **kw)
        with pytest.raises(TypeError, match=name):
            batch_channel_norm(_x(), **kw, **params)
    with pytest.raises(TypeError, match="eps"):
        group_norm(_x(), G, params["weight"], params["bias"], eps=two)
    with pytest.raises(TypeError, match="eps"):
        weight_standardize(w, eps=two)
    _run_bcn(params, "base")


def test_the_same_tensor_given_twice_is_never_remembered(backend, monkeypatch):
    """A guard cannot pass when one tensor is given for two arguments: such a call is
    not remembered, and checked by its key each time."""
    monkeypatch.setattr(norm._cache, "sites", {})
    torch.manual_seed(1)
    x = _x()
    w = torch.rand(C, device=DEVICE) + 0.5
    for _ in range(2):
        y = group_norm(x, G, w, w)
        assert rel_err(y, gn_reference(x.detach().double(), G, w.double(), w.double())) <= TOL[torch.float32]
    assert id(w) not in norm._cache.sites


@pytest.mark.parametrize("layer", ["bcn", "group norm", "ws"])
def test_a_dead_functorch_wrapper_is_unwrapped_at_a_site_with_remembered_calls(backend, layer, monkeypatch):
    """A recalled call skips the unwrap, which is sound only because a functorch wrapper
    is never remembered (checks.remember): a dead wrapper given at a site that remembered
    plain calls, twice, is unwrapped each time (the Triton path cannot read a wrapper's
    address) and matches the reference."""
    monkeypatch.setattr(norm._cache, "sites", {})  # no entries of dead objects whose ids live on
    monkeypatch.setattr(ws._cache, "sites", {})
    torch.manual_seed(6)
    if layer == "ws":
        w = torch.randn(6, 4, 3, 3, device=DEVICE, requires_grad=True)
        dead = dead_functorch_wrapper(w)
        for t in (w, w, dead, dead):
            assert rel_err(weight_standardize(t), ws_reference(w.detach().double())) <= TOL[torch.float32]
        assert id(w) in ws._cache.sites and id(dead) not in ws._cache.sites
        return
    params = _bcn_params()
    if layer == "bcn":  # evaluation: the running buffers stay as they are
        m = wsbcn.BatchChannelNorm2d(C, G).to(DEVICE).eval()
        with torch.no_grad():
            for name in ("weight", "bias", "group_weight", "group_bias", "running_mean", "running_var"):
                getattr(m, name).copy_(params[name])
        ref = {k: v.double() for k, v in params.items()}

        def reference(x):
            return bcn_reference(x.double(), G, training=False, **ref)
    else:
        m = wsbcn.GroupNorm(G, C).to(DEVICE)
        with torch.no_grad():
            m.weight.copy_(params["weight"])
            m.bias.copy_(params["bias"])

        def reference(x):
            return gn_reference(x.double(), G, params["weight"].double(), params["bias"].double())
    x = _x(requires_grad=False)
    dy = torch.randn_like(x)  # (sum(y^2) cancels: each group of y is normalized)
    dead = dead_functorch_wrapper(x)
    for t in (x, x, dead, dead):
        y = m(t)
        assert not _compat.is_functorch_wrapped(y)
        assert rel_err(y, reference(x)) <= TOL[torch.float32]
        d_weight, = torch.autograd.grad(y, [m.weight], dy)
        w64 = m.weight.detach().double().requires_grad_(True)
        ref_y = (bcn_reference(x.double(), G, training=False, **{**ref, "weight": w64}) if layer == "bcn"
                 else gn_reference(x.double(), G, w64, params["bias"].double()))
        d_ref, = torch.autograd.grad(ref_y, [w64], dy.double())
        assert rel_err(d_weight, d_ref) <= 1e-5
    assert len(norm._cache.sites[id(m)]) == 1  # the plain call's signature only


def test_nothing_is_remembered_where_torch_cannot_tell_a_functorch_wrapper(backend, monkeypatch):
    """Without ``is_functorch_wrapped_tensor`` a remembered call could be a wrapper that a
    recalled call would not unwrap: then nothing is remembered, and the results are the
    reference's."""
    monkeypatch.setattr(_compat, "is_functorch_wrapped", None)
    monkeypatch.setattr(norm._cache, "sites", {})
    monkeypatch.setattr(ws._cache, "sites", {})
    torch.manual_seed(7)
    m = wsbcn.GroupNorm(G, C).to(DEVICE)
    w = torch.randn(6, 4, 3, 3, device=DEVICE)
    x = _x()
    for _ in range(2):
        assert rel_err(m(x), gn_reference(x.detach().double(), G)) <= TOL[torch.float32]
        assert rel_err(weight_standardize(w), ws_reference(w.double())) <= TOL[torch.float32]
    assert not norm._cache.sites and not ws._cache.sites


@pytest.mark.parametrize("layer", ["bcn", "group norm"])
def test_a_module_changed_between_calls_gets_its_new_checks(backend, layer):
    """Module attributes the checks read (training, eps, num_groups, momentum) changed
    between calls, and parameters swapped for plain tensors and back: each call matches
    the reference of what the module then is."""
    torch.manual_seed(2)
    # a per-channel group affine: it fits any number of groups
    m = (wsbcn.GroupNorm(G, C) if layer == "group norm" else wsbcn.BatchChannelNorm2d(C, G, group_affine=False))
    m = m.to(DEVICE)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.rand_like(p) + 0.5)

    def check():
        x = _x()
        names = ["weight", "bias"] + ([] if layer == "group norm" else
                                      ["group_weight", "group_bias", "running_mean", "running_var"])
        state = {k: getattr(m, k).detach().double().clone() for k in names}
        if layer != "group norm":
            state["num_batches_tracked"] = m.num_batches_tracked.clone()
        y = m(x)
        if layer == "group norm":
            y_ref = gn_reference(x.detach().double(), m.num_groups, state["weight"], state["bias"], m.eps)
        else:
            nbt = state["num_batches_tracked"].long()
            y_ref = bcn_reference(x.detach().double(), m.num_groups, state["weight"], state["bias"],
                                  state["group_weight"].view(1, -1, 1), state["group_bias"].view(1, -1, 1),
                                  state["running_mean"], state["running_var"], m.training, m.estimate,
                                  m.momentum, m.eps, num_batches_tracked=nbt)
        assert rel_err(y, y_ref) <= TOL[torch.float32]

    def weight_as(kind):  # the weight made a plain tensor (not a Parameter), or a Parameter again
        value = m.weight.detach() * 1.5
        del m.weight
        m.weight = kind(value)

    changes = [lambda: None, lambda: setattr(m, "eps", 1e-2), lambda: setattr(m, "num_groups", 2),
               lambda: weight_as(torch.Tensor.clone), lambda: weight_as(torch.nn.Parameter)]
    if layer == "bcn":
        changes += [lambda: m.eval(), lambda: m.train(), lambda: setattr(m, "momentum", 0.5),
                    lambda: setattr(m, "estimate", True)]
    for change in changes:
        change()
        check()
        check()


def test_weight_standardize_calls_with_one_weight_match_the_reference(backend):
    """One weight object standardized with each convention, in another dtype and layout
    (same object, data replaced), alternately with the base call."""
    torch.manual_seed(3)
    w = torch.randn(6, 4, 3, 3, device=DEVICE, requires_grad=True)
    variants = [dict(), dict(eps_mode="std"), dict(correction=1), dict(eps=1e-2), dict(standardize="center")]

    def check(kw):
        w_hat = weight_standardize(w, **kw)
        w64 = w.detach().double()
        if kw.get("standardize") == "center":
            ref = w64 - w64.mean(dim=(1, 2, 3), keepdim=True)
        else:
            ref = ws_reference(w64, kw.get("eps", 1e-5), kw.get("correction", 0), kw.get("eps_mode", "var"))
        assert w_hat.dtype == w.dtype and rel_err(w_hat, ref) <= TOL[w.dtype], kw

    for _ in range(2):
        for kw in variants:
            check({})
            check(kw)
    w.data = w.data.to(memory_format=torch.channels_last)
    check({})
    w.data = w.data.double()
    check({})


def test_results_are_the_same_without_tensor_guards(backend, monkeypatch):
    """Where torch has no tensor guards every call builds its key: the same bits."""
    def step():
        torch.manual_seed(4)
        model = torch.nn.Sequential(wsbcn.WSConv2d(4, C, 3, padding=1), wsbcn.BatchChannelNorm2d(C, G),
                                    wsbcn.GroupNorm(G, C)).to(DEVICE)
        x = torch.randn(2, 4, 5, 5, device=DEVICE, requires_grad=True)
        out = []
        for _ in range(2):
            y = model(x)
            out += [y, *torch.autograd.grad(y.square().sum(), [x, *model.parameters()]), *model.buffers()]
        return out

    with_guards = step()
    monkeypatch.setattr(_compat, "_TENSOR_GUARDS", None)
    monkeypatch.setattr(norm._cache, "sites", {})
    monkeypatch.setattr(ws._cache, "sites", {})
    without = step()
    assert not norm._cache.sites and not ws._cache.sites
    for a, b in zip(with_guards, without):
        assert torch.equal(a, b)


@pytest.mark.skipif(_compat._TENSOR_GUARDS is None, reason="this torch has no dynamo tensor guards")
def test_a_repeat_call_is_recalled_without_building_its_key(backend, monkeypatch):
    """What makes it cheap: after the first call, a module's repeat calls (forward and
    backward) and a weight's repeat standardization never reach the key lookup."""
    torch.manual_seed(5)
    model = torch.nn.Sequential(wsbcn.WSConv2d(4, C, 3, padding=1), wsbcn.BatchChannelNorm2d(C, G),
                                wsbcn.GroupNorm(G, C)).to(DEVICE)
    x = torch.randn(2, 4, 5, 5, device=DEVICE, requires_grad=True)
    y_first = model(x)

    def refuse(*args):
        raise AssertionError("a repeat call built its key")

    monkeypatch.setattr(checks, "keyed", refuse)
    y = model(x)
    assert torch.equal(y, y_first)
    y.sum().backward()
    monkeypatch.undo()
    bigger = torch.randn(3, 4, 5, 5, device=DEVICE)
    model(bigger)  # a new signature at the same sites: looked up by its key, then remembered
    monkeypatch.setattr(checks, "keyed", refuse)
    model(bigger)
    model(x)


def test_remember_keeps_a_bounded_number_of_entries_per_site():
    """A site keeps its MAX_RECALLED_PER_SITE newest signatures (a shared head sees one
    per input size); an older one is looked up by its key again."""
    cache, site = checks.CallCache(), object()
    for n in range(checks.MAX_RECALLED_PER_SITE + 2):
        t = torch.empty(n + 1)
        checks.remember(cache, site, (), (t,), n)
    if _compat._TENSOR_GUARDS is None:
        assert not cache.sites
        return
    assert len(cache.sites[id(site)]) == checks.MAX_RECALLED_PER_SITE
    assert checks.recalled(cache, site, (), (torch.empty(1),)) is None  # the oldest, dropped
    assert checks.recalled(cache, site, (), (torch.empty(checks.MAX_RECALLED_PER_SITE + 2),)) == \
        checks.MAX_RECALLED_PER_SITE + 1
    assert checks.recalled(cache, site, ("other",), (torch.empty(3),)) is None  # other scalars
    # a tensor made anew per call (it has a grad_fn) is no site to remember
    made = torch.ones(2, requires_grad=True) * 2
    checks.remember(cache, made, (), (made,), "x")
    assert id(made) not in cache.sites
    # nor is a call with a tensor subclass (a fake tensor's sizes may be symbolic)
    class Sub(torch.Tensor):
        pass

    other_site = object()
    checks.remember(cache, other_site, (), (torch.empty(2).as_subclass(Sub),), "x")
    assert id(other_site) not in cache.sites


@pytest.mark.skipif(_compat._TENSOR_GUARDS is None, reason="this torch has no dynamo tensor guards")
def test_a_site_whose_inputs_keep_changing_shape_stops_remembering(backend, monkeypatch):
    """A module fed more input shapes in turn than it keeps (multi-scale training) drops
    entries; past MAX_DROPPED_PER_SITE it stops remembering and every call builds its
    key, as before recall existed. Each call matches the float64 reference throughout."""
    monkeypatch.setattr(norm._cache, "sites", {})
    torch.manual_seed(6)
    m = wsbcn.GroupNorm(G, C).to(DEVICE)
    sizes = range(2, checks.MAX_RECALLED_PER_SITE + 4)  # one more shape than a site keeps, and some
    def dropped():
        entries = norm._cache.sites.get(id(m))
        return 0 if entries is None else entries.dropped

    calls = 0
    while dropped() >= 0:
        for size in sizes:
            x = torch.randn(1, C, size, device=DEVICE)
            y = m(x)
            y_ref = gn_reference(x.double(), G, m.weight.double(), m.bias.double())
            assert rel_err(y, y_ref) <= TOL[torch.float32]
            calls += 1
        assert calls < 10 * checks.MAX_DROPPED_PER_SITE
    assert not norm._cache.sites[id(m)]
    x = torch.randn(1, C, 2, device=DEVICE)
    m(x)
    assert not norm._cache.sites[id(m)]  # it stays a site that builds its keys


def test_nothing_is_remembered_under_torch_compile(monkeypatch):
    """dynamo traces the key path (checks.recalled and remember step aside while it
    traces), and the compiled graph calls the wsbcn ops: no site is remembered, and the
    compiled module gives the eager one's outputs."""
    monkeypatch.setattr(norm._cache, "sites", {})
    monkeypatch.setattr(ws._cache, "sites", {})
    torch.manual_seed(7)
    model = torch.nn.Sequential(wsbcn.WSConv2d(4, C, 3, padding=1), wsbcn.BatchChannelNorm2d(C, G),
                                wsbcn.GroupNorm(G, C)).to(DEVICE)
    x = torch.randn(2, 4, 5, 5, device=DEVICE)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    y = compiled(x)
    assert not norm._cache.sites and not ws._cache.sites
    torch.testing.assert_close(y, model(x), rtol=1e-5, atol=1e-5)  # batch statistics: the same output
