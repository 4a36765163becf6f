"""PyTorch's own module tests, run against wsbcn's drop-in layers.

Every sample of the ``module_db`` entries of nn.GroupNorm and nn.Conv1d/2d/3d
(torch.testing._internal.common_modules, as torch's test/test_modules.py runs them)
and every Conv entry of ``common_nn`` (stride, padding, dilation, groups, padding
modes, zero batch), on wsbcn.GroupNorm and WSConv1d/2d/3d: wsbcn's layer is built
with the torch layer's constructor arguments and loads the torch layer's state dict.

The reference is float64: nn.GroupNorm itself, and for WSConvNd nn.ConvNd whose
weight is standardized in float64 (tests/reference.py) before every convolution,
so parametrizations, pruning and hooks act on the reference exactly as on the torch
layer. Memory formats are compared with the torch layer's own (nn.ConvNd,
nn.GroupNorm), for outputs and for every gradient.

The torch backend runs every sample (plain torch on tiny inputs: fast); the Triton
interpreter a fixed sample of them (TRITON_SAMPLES), which keeps CI in its budget.
float64 always takes the torch backend, so gradcheck and gradgradcheck run there
only; the Triton path's double backward is checked in float32 against the float64
reference (test_double_backward). SKIPS lists what is left out, with the reason.
"""
import copy
import io
import pickle
import sys
import types
import unittest
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize, prune

import wsbcn
from conftest import TOL, rel_err
from reference import ws_reference


def _torch_test_definitions():
    """torch's module_db and common_nn, with their import's side effects undone.

    They live in torch's test helpers (torch.testing._internal), whose import needs
    ``expecttest`` (only its TestCase base class and ACCEPT flag are used: a stand-in
    serves when the package is absent), switches off setting torch.backends flags
    and wraps TorchScript calls; both are restored here for the rest of the run."""
    try:
        import expecttest  # noqa: F401
    except ImportError:
        stand_in = types.ModuleType("expecttest")
        stand_in.TestCase, stand_in.ACCEPT = unittest.TestCase, False
        sys.modules["expecttest"] = stand_in
    script_calls = torch._C.ScriptFunction.__call__, torch._C.ScriptMethod.__call__
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.testing._internal import common_modules, common_nn
    torch._C.ScriptFunction.__call__, torch._C.ScriptMethod.__call__ = script_calls
    setattr(torch.backends, "__allow_nonbracketed_mutation_flag", True)
    return common_modules, common_nn


common_modules, common_nn = _torch_test_definitions()

LAYERS = {nn.Conv1d: wsbcn.WSConv1d, nn.Conv2d: wsbcn.WSConv2d, nn.Conv3d: wsbcn.WSConv3d,
          nn.GroupNorm: wsbcn.GroupNorm}
CONV_NAMES = {"Conv1d": nn.Conv1d, "Conv2d": nn.Conv2d, "Conv3d": nn.Conv3d}
CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


class Sample:
    """One sample: ``make(dtype)`` -> (torch layer, wsbcn layer holding its state
    dict, input), the same values every call."""

    def __init__(self, sid, torch_cls, dtypes, make_torch, make_ours, make_input):
        self.id, self.torch_cls, self.dtypes = sid, torch_cls, tuple(dtypes)
        self._make_torch, self._make_ours, self._make_input = make_torch, make_ours, make_input
        self.is_conv = torch_cls is not nn.GroupNorm

    def make(self, dtype, seed=0):
        torch.manual_seed(seed)
        theirs = self._make_torch(dtype).to(dtype)
        if not self.is_conv and theirs.affine:  # nn.GroupNorm starts at ones and zeros
            with torch.no_grad():
                theirs.weight.uniform_(0.5, 1.5)
                if theirs.bias is not None:
                    theirs.bias.normal_()
        ours = self._make_ours(dtype, theirs).to(dtype)
        ours.load_state_dict(theirs.state_dict())
        x = self._make_input(dtype).detach()
        return theirs, ours, x

    def __repr__(self):
        return self.id


def _module_db_samples():
    samples = []
    for info in common_modules.module_db:
        if info.module_cls not in LAYERS:
            continue
        ours_cls = LAYERS[info.module_cls]
        listed = info.module_inputs_func(info, device="cpu", dtype=torch.float64, requires_grad=False,
                                         training=True)
        dtypes = [d for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64) if d in info.dtypes]
        for i, entry in enumerate(listed):
            kwargs = entry.constructor_input.kwargs
            sid = "-".join([info.name, entry.desc or "batched"] + [f"{k}_{v}" for k, v in kwargs.items()])

            def inputs(dtype, info=info, i=i):
                return info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=False,
                                               training=True)[i]

            def make_torch(dtype, info=info, inputs=inputs):
                c = inputs(dtype).constructor_input
                return info.module_cls(*c.args, **c.kwargs)

            def make_ours(dtype, theirs, ours_cls=ours_cls, inputs=inputs):
                c = inputs(dtype).constructor_input
                return ours_cls(*c.args, **c.kwargs)

            def make_input(dtype, inputs=inputs):
                f = inputs(dtype).forward_input
                return f.args[0] if f.args else f.kwargs["input"]

            samples.append(Sample(sid, info.module_cls, dtypes, make_torch, make_ours, make_input))
    return samples


def _conv_like(ours_cls, conv):
    """A WSConv with ``conv``'s geometry (for the common_nn entries that build their
    layer in a lambda)."""
    return ours_cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode)


def _common_nn_samples():
    samples = []
    for entry in common_nn.module_tests + common_nn.get_new_module_tests():
        name = entry.get("module_name")
        if name is not None:
            full = name + ("_" + entry["desc"] if entry.get("desc") else "")
        else:
            full = entry.get("fullname", "")
            name = full.split("_")[0]
        if name not in CONV_NAMES:
            continue
        torch_cls = CONV_NAMES[name]
        ours_cls = LAYERS[torch_cls]
        if "constructor_args" in entry:
            args = entry["constructor_args"]

            def make_torch(dtype, torch_cls=torch_cls, args=args):
                return torch_cls(*args)

            def make_ours(dtype, theirs, ours_cls=ours_cls, args=args):
                return ours_cls(*args)
        else:
            def make_torch(dtype, constructor=entry["constructor"]):
                return constructor()

            def make_ours(dtype, theirs, ours_cls=ours_cls):
                return _conv_like(ours_cls, theirs)

        def make_input(dtype, size=entry["input_size"]):
            return torch.randn(size, dtype=dtype)

        samples.append(Sample("common_nn-" + full, torch_cls, (torch.float32, torch.float64), make_torch,
                              make_ours, make_input))
    return samples


SAMPLES = _module_db_samples() + _common_nn_samples()
BY_ID = {s.id: s for s in SAMPLES}
for _s in SAMPLES:  # what each check needs of a sample: read once, at collection
    _theirs, _, _x = _s.make(torch.float32)
    _s.has_weight = getattr(_theirs, "weight", None) is not None  # GroupNorm(affine=False) has none
    _s.empty = _x.numel() == 0
    _s.batched = not _s.is_conv or _x.dim() == _theirs.weight.dim()  # an unbatched conv input is one dim short
assert len(BY_ID) == len(SAMPLES), "sample ids must be unique"

# What the default run covers (every layer; batched, unbatched and empty inputs;
# groups and depthwise; a padding mode; with and without bias and affine); the rest
# of the sweep is marked slow (CI runs it in its second pass).
DEFAULT_SAMPLES = [
    "nn.GroupNorm-2d_affine", "nn.GroupNorm-1d_affine_not_bias-bias_False", "nn.GroupNorm-1d_no_affine_LN",
    "nn.Conv1d-no_batch_dim-padding_same", "nn.Conv2d-batched", "common_nn-Conv2d_depthwise",
    "common_nn-Conv2d_circular_stride2_pad2", "common_nn-Conv3d_no_bias", "common_nn-Conv1d_zero_batch",
]
# The fixed sample the Triton interpreter runs (kernels on the host are slow), and the
# part of it in the default run.
TRITON_SAMPLES = [
    "nn.GroupNorm-2d_affine", "nn.GroupNorm-1d_affine_not_bias-bias_False", "nn.GroupNorm-1d_no_affine_LN",
    "nn.Conv1d-no_batch_dim-padding_same", "nn.Conv2d-batched", "common_nn-Conv2d_groups",
    "common_nn-Conv2d_circular_stride2_pad2", "common_nn-Conv3d_no_bias",
]
TRITON_DEFAULT = {"nn.GroupNorm-2d_affine", "nn.Conv2d-batched"}
TRITON_DEFAULT_CHECKS = {None, "parametrize"}
# Samples an older torch's module_db lacks (torch 2.11 has no GroupNorm bias=False ones):
# left out there; any other name missing from this torch's is a typo or a rename.
LATER_TORCH_SAMPLES = {"nn.GroupNorm-1d_affine_not_bias-bias_False"}
DEFAULT_SAMPLES = [s for s in DEFAULT_SAMPLES if s in BY_ID or s not in LATER_TORCH_SAMPLES]
TRITON_SAMPLES = [s for s in TRITON_SAMPLES if s in BY_ID or s not in LATER_TORCH_SAMPLES]
assert set(DEFAULT_SAMPLES + TRITON_SAMPLES) <= set(BY_ID), set(DEFAULT_SAMPLES + TRITON_SAMPLES) - set(BY_ID)

# Explicit skips: (backend, sample id or "*", check) -> reason.
SKIPS = {
    ("triton", "*", "meta"): "meta tensors run no kernel: a meta forward is checked on the torch backend, "
                             "which is what WSBCN_BACKEND=auto picks for them (forcing triton sends them "
                             "to the interpreter, which cannot read them)",
}


def _applies(sample, check):
    """Whether ``check`` means something for ``sample`` (not a skip: there is nothing
    to check)."""
    if check in REWEIGHTS or check == "wrong_shape":
        return sample.has_weight
    if check == "zero_batch":
        return sample.batched
    if check in ("non_contiguous", "gradcheck", "gradgradcheck", "double_backward"):
        return not sample.empty  # an empty input is contiguous in every view and has no derivative
    return True


def _cases(with_dtypes=False, triton=True, checks=None, dtypes_filter=None, needs=None):
    """pytest params (backend, sample[, dtype][, check]) with readable ids, for the
    samples ``check`` (or ``needs``) applies to; what is not in the default run is
    marked slow."""
    out = []
    for backend in ("torch", "triton") if triton else ("torch",):
        for s in SAMPLES:
            if backend == "triton" and s.id not in TRITON_SAMPLES:
                continue
            if needs is not None and not _applies(s, needs):
                continue
            dtypes = [d for d in s.dtypes if dtypes_filter is None or dtypes_filter(backend, d)] \
                if with_dtypes else [None]
            for dtype in dtypes:
                for check in checks or [None]:
                    if check is not None and not _applies(s, check):
                        continue
                    values = [backend, s] + ([dtype] if with_dtypes else []) + ([check] if checks else [])
                    sid = "-".join([backend, s.id] + ([str(dtype).replace("torch.", "")] if with_dtypes else [])
                                   + ([check] if checks else []))
                    if backend == "torch":
                        default = s.id in DEFAULT_SAMPLES
                    else:
                        default = s.id in TRITON_DEFAULT and check in TRITON_DEFAULT_CHECKS and \
                            dtype in (None, torch.float32, torch.float16)
                    marks = [] if default else [pytest.mark.slow]
                    skip = SKIPS.get((backend, s.id, check)) or SKIPS.get((backend, "*", check))
                    if skip:
                        marks.append(pytest.mark.skip(reason=skip))
                    out.append(pytest.param(*values, id=sid, marks=marks))
    return out


@pytest.fixture
def use_backend(monkeypatch):
    def use(backend):
        monkeypatch.setenv("WSBCN_BACKEND", backend)
    return use


# -- references and helpers ----------------------------------------------------------

def _reference(theirs, ours):
    """The float64 reference: a copy of the torch layer in float64; for a WSConv,
    nn.ConvNd whose weight is standardized in float64 before each convolution."""
    ref = copy.deepcopy(theirs).double()
    if isinstance(ours, nn.GroupNorm):
        return ref
    conv_forward = ref._conv_forward

    def standardized_conv(x, weight, bias):
        return conv_forward(x, ws_reference(weight, ours.eps, ours.correction, ours.eps_mode), bias)

    ref._conv_forward = standardized_conv
    return ref


def _grad_output(y, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(y.shape, generator=g, dtype=torch.float64)


def _run(layer, x, dtype=None):
    """(output, {name: gradient}) of ``layer`` at x: the input's gradient under "input"."""
    x = x.detach().to(dtype or x.dtype).requires_grad_(True)
    y = layer(x)
    names, params = zip(*[("input", x)] + [(n, p) for n, p in layer.named_parameters() if p.requires_grad])
    grads = torch.autograd.grad(y, params, _grad_output(y).to(y.dtype), allow_unused=True)
    return y, dict(zip(names, grads))


def _assert_close_to_reference(ours, ref, x, dtype, what="", tol=None):
    y, grads = _run(ours, x)
    y_ref, grads_ref = _run(ref, x, torch.float64)
    tol = tol or TOL[dtype]
    assert y.dtype == dtype and y.shape == y_ref.shape, what
    assert rel_err(y, y_ref) <= tol, (what, "output", rel_err(y, y_ref))
    assert grads.keys() == grads_ref.keys(), what
    # The tensors one parametrization splits a weight into are compared on their common
    # scale: weight_norm's g of a WSConv and v of a 1-d GroupNorm weight have gradients
    # that vanish exactly (WS undoes a per-filter scale; g * v / |v| is g * sign(v)), so
    # float32 returns rounding noise of the size of the other tensor's gradient.
    originals = [g.norm().item() for n, g in grads_ref.items() if ".original" in n and g is not None]
    for name, g in grads.items():
        g_ref = grads_ref[name]
        if g_ref is None:
            assert g is None or not g.any(), (what, name)
            continue
        assert g is not None and g.shape == g_ref.shape, (what, name)
        err = rel_err(g, g_ref)
        if ".original" in name and err > tol:
            err = (g.double() - g_ref).norm().item() / max(originals)
        assert err <= tol, (what, name, err)
    return y, grads


# -- outputs and gradients ------------------------------------------------------------

def _dtype_ok(backend, dtype):
    return backend == "torch" or dtype != torch.float64  # float64 always takes the torch backend


@pytest.mark.parametrize("backend,sample,dtype", _cases(with_dtypes=True, dtypes_filter=_dtype_ok))
def test_outputs_and_gradients_match_the_float64_reference(use_backend, backend, sample, dtype):
    """Output, input gradient and every parameter gradient, in every dtype the
    ModuleInfo lists, against the float64 reference; training and eval agree."""
    use_backend(backend)
    theirs, ours, x = sample.make(dtype)
    ref = _reference(theirs, ours)
    y, _ = _assert_close_to_reference(ours, ref, x, dtype)
    with torch.no_grad():
        assert torch.equal(ours.eval()(x), y.detach())  # no train/eval difference, as in torch


def _layout(t):
    if t is None:
        return None
    fmt = CHANNELS_LAST.get(t.dim())
    return t.is_contiguous(), fmt is not None and t.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("backend,sample", _cases())
def test_memory_formats_are_the_torch_layers(use_backend, backend, sample):
    """Input and module in contiguous / channels_last (as torch's test_memory_format):
    outputs and every gradient are laid out as the torch layer lays out its own, and
    their values do not depend on the layouts."""
    use_backend(backend)
    dtype = torch.float32
    theirs, ours, x = sample.make(dtype)
    ref = _reference(theirs, ours)
    in_formats = [torch.contiguous_format] + ([CHANNELS_LAST[x.dim()]] if x.dim() in CHANNELS_LAST else [])
    # the module's by its weight (an unbatched Conv3d input is 4-d, its weight 5-d)
    w_dim = theirs.weight.dim() if sample.is_conv else x.dim()
    mod_formats = [torch.contiguous_format] + ([CHANNELS_LAST[w_dim]] if w_dim in CHANNELS_LAST else [])
    for in_fmt in in_formats:
        xf = x.clone(memory_format=in_fmt)
        for mod_fmt in mod_formats:
            what = f"input {in_fmt}, module {mod_fmt}"
            t, o = theirs.to(memory_format=mod_fmt), ours.to(memory_format=mod_fmt)
            y_t, g_t = _run(t, xf)
            y_o, g_o = _assert_close_to_reference(o, ref, xf, dtype, what)
            assert _layout(y_o) == _layout(y_t), (what, "output", y_o.stride(), y_t.stride())
            for name in g_t:
                assert _layout(g_o[name]) == _layout(g_t[name]), (what, name, g_o[name].stride(), g_t[name].stride())


# -- state dict, repr and the generic module checks ----------------------------------

def test_every_layer_and_sample_is_covered():
    """The sweep sees what it should: 4 layers, module_db's samples and common_nn's
    Conv entries (a torch upgrade that drops entries fails here, not silently)."""
    kinds = {s.torch_cls for s in SAMPLES}
    assert kinds == set(LAYERS)
    later = LATER_TORCH_SAMPLES <= set(BY_ID)  # torch 2.11 has 8 GroupNorm samples, no bias=False ones
    assert sum(s.id.startswith("nn.GroupNorm") for s in SAMPLES) >= (10 if later else 8)
    assert sum(s.id.startswith("nn.Conv") for s in SAMPLES) >= 12
    assert sum(s.id.startswith("common_nn-") for s in SAMPLES) >= 40


@pytest.mark.parametrize("backend,sample", _cases(triton=False))
def test_state_dict_and_repr_are_the_torch_layers(use_backend, backend, sample):
    use_backend(backend)
    theirs, ours, x = sample.make(torch.float32)
    sd_t, sd_o = theirs.state_dict(), ours.state_dict()
    assert list(sd_o) == list(sd_t)
    for k in sd_t:
        assert torch.equal(sd_o[k], sd_t[k]) and sd_o[k].dtype == sd_t[k].dtype, k
    back = copy.deepcopy(theirs)
    back.load_state_dict(ours.state_dict())  # and back into the torch layer
    assert isinstance(ours, sample.torch_cls)
    if sample.is_conv:
        assert repr(ours) == repr(theirs)[:-1].replace(type(theirs).__name__, type(ours).__name__, 1) + \
            f", eps={ours.eps}, correction={ours.correction}, eps_mode={ours.eps_mode!r})"
    else:
        assert repr(ours) == repr(theirs)


class _Mix(nn.Module):
    """A parametrization that keeps the shape, mixes output channels and is not
    affine per channel (WS would undo a per-channel scale and shift)."""

    def forward(self, w):
        return torch.roll(w, 1, 0) + 0.5 * w.square()


def _parametrize(m):
    for name in ("weight", "bias"):
        if getattr(m, name, None) is not None:
            parametrize.register_parametrization(m, name, _Mix())


def _prune(m):
    prune.l1_unstructured(m, "weight", amount=0.3)


def _weight_norm(m):
    nn.utils.parametrizations.weight_norm(m, "weight")


def _spectral_norm(m):
    torch.manual_seed(7)  # the power iteration's starting vectors
    nn.utils.parametrizations.spectral_norm(m, "weight")


def _spectral_norm_hook(m):  # the older API: weight_orig plus a forward pre-hook, like pruning
    torch.manual_seed(7)
    nn.utils.spectral_norm(m, "weight")


REWEIGHTS = {"parametrize": _parametrize, "prune": _prune, "weight_norm": _weight_norm,
             "spectral_norm": _spectral_norm, "spectral_norm_hook": _spectral_norm_hook}


@pytest.mark.parametrize("backend,sample,check", _cases(checks=list(REWEIGHTS)))
def test_parametrizations_and_pruning_act_on_the_weight(use_backend, backend, sample, check):
    """register_parametrization, pruning, weight_norm and spectral_norm (both APIs) on
    wsbcn's layer and on the reference: same outputs and gradients (those of the
    parametrization's original tensors included), twice (the power iteration moves)."""
    use_backend(backend)
    theirs, ours, x = sample.make(torch.float32)
    ref = _reference(theirs, ours)
    REWEIGHTS[check](ours)
    REWEIGHTS[check](ref)
    ref.load_state_dict(ours.state_dict())  # the same float32 state (spectral_norm's u and v)
    assert "weight" not in ours._parameters  # the slow path is the one under test
    for step in range(2):
        # spectral_norm's power iteration runs in float32 on wsbcn's side (its sigma
        # differs in the last bits), which a 1x1x1 filter's fan-in of 2 amplifies
        tol = 4e-5 if "spectral" in check else None
        _assert_close_to_reference(ours, ref, x, torch.float32, f"{check} call {step}", tol)
    if check == "parametrize":
        parametrize.remove_parametrizations(ours, "weight")  # back to a Parameter: the fast path
        parametrize.remove_parametrizations(ref, "weight")
        assert "weight" in ours._parameters
        _assert_close_to_reference(ours, ref, x, torch.float32, "parametrization removed")


def _wrong_shape(w):
    return w[:-1] if w.dim() == 1 else w[:, :-1] if w.shape[1] > 1 else w[:-1]


@pytest.mark.parametrize("backend,sample", _cases(triton=False, needs="wrong_shape"))
def test_a_wrong_shaped_parametrization_gets_torchs_error(use_backend, backend, sample):
    """torch refuses to register it; registered anyway (unsafe=True), the forward
    raises the torch layer's own error, not a KeyError from wsbcn."""
    use_backend(backend)
    theirs, ours, x = sample.make(torch.float32)

    class Wrong(nn.Module):
        def forward(self, w):
            return _wrong_shape(w)

    errors = []
    for m in (theirs, ours):
        with pytest.raises(ValueError, match="may not change the shape") as info:
            parametrize.register_parametrization(m, "weight", Wrong())
        errors.append(str(info.value))
        parametrize.register_parametrization(m, "weight", Wrong(), unsafe=True)
        with pytest.raises(Exception) as info:
            m(x)
        errors.append((type(info.value), str(info.value)))
    assert errors[0] == errors[2] and errors[1] == errors[3], errors


GENERIC = ["pickle", "torch_save", "deepcopy", "meta", "to_dtype", "zero_batch", "non_contiguous"]


@pytest.mark.parametrize("backend,sample,check", _cases(checks=GENERIC))
def test_generic_module_checks(use_backend, backend, sample, check):
    use_backend(backend)
    dtype = torch.float32
    theirs, ours, x = sample.make(dtype)
    ref = _reference(theirs, ours)
    if check in ("pickle", "torch_save", "deepcopy"):
        if check == "pickle":
            other = pickle.loads(pickle.dumps(ours))
        elif check == "torch_save":
            buf = io.BytesIO()
            torch.save(ours, buf)
            buf.seek(0)
            other = torch.load(buf, weights_only=False)
        else:
            other = copy.deepcopy(ours)
        assert type(other) is type(ours) and repr(other) == repr(ours)
        assert all(p is not q for p, q in zip(other.parameters(), ours.parameters()))
        _assert_close_to_reference(other, ref, x, dtype, check)
        with torch.no_grad():
            assert torch.equal(other(x), ours(x))
    elif check == "meta":
        with torch.device("meta"):
            on_meta = copy.deepcopy(theirs).to("meta")
            built = sample._make_ours(dtype, on_meta).to(dtype)  # the sample's constructor arguments
        assert all(p.is_meta for p in built.parameters())
        y = built(x.to("meta"))
        assert y.is_meta and y.shape == on_meta(x.to("meta")).shape and y.dtype == dtype
        built.to_empty(device="cpu").load_state_dict(ours.state_dict())
        _assert_close_to_reference(built, ref, x, dtype, check)
    elif check == "to_dtype":
        for other in (torch.float64, torch.float32):
            ours.to(other)
            assert all(p.dtype == other for p in ours.parameters())
            _assert_close_to_reference(ours, ref, x.to(other), other, f"to({other})")
    elif check == "zero_batch":
        x0 = x[:0]
        y0, g0 = _run(ours, x0)
        y0_t, g0_t = _run(theirs, x0)
        assert y0.shape == y0_t.shape and y0.dtype == y0_t.dtype
        for name, g in g0_t.items():
            assert g0[name] is not None and torch.equal(g0[name], g), name
    elif check == "non_contiguous":
        # a strided view of the input and of the output gradient give the same results
        wide = torch.stack([x, torch.full_like(x, float("nan"))], dim=-1)
        xs = wide[..., 0]
        assert not xs.is_contiguous()
        y, grads = _run(ours, x)
        y_s, grads_s = _run(ours, xs)
        torch.testing.assert_close(y_s, y, rtol=1e-6, atol=1e-6)
        for name in grads:
            torch.testing.assert_close(grads_s[name], grads[name], rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_module_error_inputs_raise_as_torch_does(use_backend, backend):
    """module_error_inputs_func of each ModuleInfo (GroupNorm's: num_channels not
    divisible by num_groups), and the conv constructor errors, on wsbcn's layers."""
    use_backend(backend)
    checked = 0
    for info in common_modules.module_db:
        if info.module_cls not in LAYERS or info.module_error_inputs_func is None:
            continue
        for err in info.module_error_inputs_func(info, device="cpu", dtype=torch.float32, requires_grad=False,
                                                 training=True):
            c = err.module_error_input.constructor_input
            if err.error_on == common_modules.ModuleErrorEnum.CONSTRUCTION_ERROR:
                with pytest.raises(err.error_type, match=err.error_regex):
                    LAYERS[info.module_cls](*c.args, **c.kwargs)
            else:
                m = LAYERS[info.module_cls](*c.args, **c.kwargs)
                f = err.module_error_input.forward_input
                with pytest.raises(err.error_type, match=err.error_regex):
                    m(*f.args, **f.kwargs)
            checked += 1
    assert checked >= 2
    for cls in (wsbcn.WSConv1d, wsbcn.WSConv2d, wsbcn.WSConv3d):
        torch_cls = next(k for k, v in LAYERS.items() if v is cls)
        for kwargs in (dict(groups=3), dict(padding="same", stride=2), dict(padding_mode="bogus")):
            with pytest.raises(ValueError) as theirs:
                torch_cls(4, 6, 3, **kwargs)
            with pytest.raises(ValueError) as ours:
                cls(4, 6, 3, **kwargs)
            assert str(ours.value) == str(theirs.value)


# -- gradcheck, gradgradcheck and double backward ------------------------------------

def _check_gradients(ours, x, check):
    """torch's _test_gradients_helper: the total derivative, then each parameter with
    the input (the others frozen)."""
    params = list(ours.parameters())
    x = x.detach().requires_grad_(True)

    def fn(*inputs):
        return ours(inputs[0])

    assert check(fn, (x, *params), fast_mode=True)
    for p in params:
        p.requires_grad_(True)
        for q in params:
            if q is not p:
                q.requires_grad_(False)
        assert check(fn, (x, *params), fast_mode=True)
    for p in params:
        p.requires_grad_(True)
    x.requires_grad_(False)  # parameters only
    if params:
        assert check(fn, (x, *params), fast_mode=True)


@pytest.mark.parametrize("backend,sample,check", _cases(triton=False, checks=["gradcheck", "gradgradcheck"]))
def test_gradcheck_and_gradgradcheck_in_float64(use_backend, backend, sample, check):
    use_backend(backend)
    theirs, ours, x = sample.make(torch.float64)
    _check_gradients(ours, x, getattr(torch.autograd, check))


def _second_order(layer, x, dtype):
    """Gradients of a gradient penalty: L = sum(u * dy/d(x, params) . v) differentiated
    again, with respect to the input and every parameter."""
    x = x.detach().to(dtype).requires_grad_(True)
    params = [p for p in layer.parameters()]
    y = layer(x)
    first = torch.autograd.grad(y, [x] + params, _grad_output(y).to(dtype), create_graph=True)
    g = torch.Generator().manual_seed(3)
    penalty = sum((f * torch.randn(f.shape, generator=g, dtype=torch.float64).to(dtype)).sum() for f in first)
    second = torch.autograd.grad(penalty, [x] + params, allow_unused=True)
    return first, second


@pytest.mark.parametrize("backend,sample", _cases(needs="double_backward"))
def test_double_backward_matches_the_float64_reference(use_backend, backend, sample):
    """A gradient penalty's gradients in float32 (on the Triton path: its kernels
    forward and first backward) against the float64 reference's."""
    use_backend(backend)
    theirs, ours, x = sample.make(torch.float32)
    ref = _reference(theirs, ours)
    first, second = _second_order(ours, x, torch.float32)
    first_ref, second_ref = _second_order(ref, x, torch.float64)
    for a, b in zip(first, first_ref):
        assert rel_err(a, b) <= 1e-5
    for i, (a, b) in enumerate(zip(second, second_ref)):
        if b is None or not b.any():  # not connected, or zero (GroupNorm's bias): torch 2.14 gives zeros
            assert a is None or not a.any(), i
        else:
            assert a is not None and rel_err(a, b) <= 1e-4, (i, rel_err(a, b))


# -- BatchChannelNorm: not in torch's module_db, the same reweighting checks ---------

def _bcn_cases():
    """Every mode and reweighting on the torch backend; one of each on Triton (the
    rest marked slow)."""
    out = []
    for backend in ("torch", "triton"):
        for mode in ("batch", "estimate", "eval"):
            for check in ("parametrize", "prune", "spectral_norm_hook"):
                slow = backend == "triton" and (mode, check) not in (("batch", "parametrize"), ("eval", "prune"))
                out.append(pytest.param(backend, mode, check, id=f"{backend}-{mode}-{check}",
                                        marks=[pytest.mark.slow] if slow else []))
    return out


@pytest.mark.parametrize("backend,mode,check", _bcn_cases())
def test_batch_channel_norm_takes_parametrized_and_pruned_parameters(use_backend, backend, mode, check):
    """wsbcn.BatchChannelNorm2d with its parameters parametrized (all four), pruned or
    spectral-normed: output and the gradients of every original tensor against the
    float64 BCN reference computed from the same parametrized values."""
    from reference import bcn_reference

    use_backend(backend)
    torch.manual_seed(0)
    m = wsbcn.BatchChannelNorm2d(8, num_groups=4, estimate=mode == "estimate", activation="silu")
    with torch.no_grad():
        for p in m.parameters():
            p.uniform_(0.5, 1.5)
        # pruning (30%) zeroes gamma of channels 0 and 4, in two groups: a group whose
        # gammas are all 0 is constant per channel, where float32 keeps d_beta to 3e-5 only
        m.weight.copy_(torch.tensor([0.5, 1.0, 1.2, 0.9, 0.6, 1.3, 1.1, 1.4]))
        m.running_mean.normal_()
    m.train(mode != "eval")
    ref = copy.deepcopy(m).double()
    if check == "parametrize":
        for mod in (m, ref):
            for name in ("weight", "bias", "group_weight", "group_bias"):
                parametrize.register_parametrization(mod, name, _Mix())
    else:
        for mod in (m, ref):
            REWEIGHTS[check](mod)
        ref.load_state_dict(m.state_dict())
    assert "weight" not in m._parameters
    x = torch.randn(2, 8, 3, 4) * 2 + 1
    x64 = x.double().requires_grad_(True)
    for hook in ref._forward_pre_hooks.values():  # pruning and the hook API set the attribute here
        hook(ref, (x64,))
    y_ref = bcn_reference(x64, 4, ref.weight, ref.bias, ref.group_weight, ref.group_bias,
                          ref.running_mean.clone(), ref.running_var.clone(), training=mode != "eval",
                          estimate=mode == "estimate", momentum=m.momentum, eps=m.eps, activation="silu")
    names, leaves = zip(*[(n, p) for n, p in ref.named_parameters()])
    g = _grad_output(y_ref)
    grads_ref = torch.autograd.grad(y_ref, (x64,) + leaves, g)
    xs = x.requires_grad_(True)
    y = m(xs)
    grads = torch.autograd.grad(y, (xs,) + tuple(p for _, p in m.named_parameters()), g.float())
    assert [n for n, _ in m.named_parameters()] == list(names)
    assert rel_err(y, y_ref) <= TOL[torch.float32]
    for name, a, b in zip(("input",) + names, grads, grads_ref):
        assert rel_err(a, b) <= 1e-4, (name, rel_err(a, b))
