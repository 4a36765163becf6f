"""Helpers of the convert tests (test_convert.py, test_convert_detection_libraries.py):
stand-in naming, optional imports, randomized layers, and the float64 twin of a
converted model that the converted model is checked against."""
import copy
import importlib
from collections import Counter

import pytest
import torch
from torch import nn

import wsbcn
from wsbcn.convert import AffineWSConv2d, NormAct, ScaledWSConv2d
from wsbcn.convert_layers import WSConvNormAct2d
from conftest import rel_err
from reference import bcn_reference, conv_nd, gn_reference, ws_reference


def census(model):
    """Counts of the model's module class names."""
    return Counter(type(m).__name__ for m in model.modules())


def import_or_skip(*names):
    """The modules, or a skip naming the one that does not import (torchvision fails with
    RuntimeError, not ImportError, when it does not match the installed torch)."""
    modules = []
    for name in names:
        try:
            modules.append(importlib.import_module(name))
        except Exception as exc:  # noqa: BLE001
            pytest.skip(f"{name} is not importable ({type(exc).__name__}: {exc})")
    return modules


def named_as(full_name):
    """A class decorator: the class under another module and class name (how convert
    recognizes a third-party layer), for stand-ins of torchvision's, timm's, ... layers."""
    def rename(cls):
        cls.__module__, _, cls.__qualname__ = full_name.rpartition(".")
        cls.__name__ = cls.__qualname__
        return cls
    return rename


def randomize(model):
    """Non-trivial statistics and affine in every norm-like layer, and gains."""
    with torch.no_grad():
        for m in model.modules():
            for name, t in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
                if name in ("weight", "running_var", "gain") and t.dim() == 1 or name == "gain":
                    t.uniform_(0.5, 1.5)
                elif name in ("bias", "running_mean") and t.dim() == 1:
                    t.normal_(0, 0.2)
    return model


class Reference(nn.Module):
    """A converted layer computed from the paper's formulas (tests/reference.py, float64)
    with the converted layer's current parameters, then the source layer's own drop and
    act (timm's norm+act layers); a fused activation from after the layer stays in the
    model's forward. A conv that applies its own norm (detectron2's Conv2d): the conv, its
    norm so computed, then the source's own activation."""

    def __init__(self, converted, source):
        super().__init__()
        self.converted = (converted,)  # not submodules: the reference must not own them
        self.source = (source,)
        self.tail = nn.Sequential(source.drop, source.act) if hasattr(source, "act") else nn.Identity()

    def forward(self, x):
        m = self.converted[0]
        m = m.norm if isinstance(m, NormAct) else m
        if isinstance(m, (wsbcn.WSConv1d, wsbcn.WSConv2d, wsbcn.WSConv3d)):
            w = ws_reference(m.weight, m.eps, m.correction, m.eps_mode)
            if isinstance(m, ScaledWSConv2d):
                w = w * (m.gain.double() * m.scale)
            if isinstance(m, AffineWSConv2d):
                w = w * m.weight_gamma.double() + m.weight_beta.double()
            y = conv_nd(x, w, None if m.bias is None else m.bias.double(), m)
            if isinstance(m, WSConvNormAct2d):
                source = self.source[0]
                y = y if m.norm is None else Reference(m.norm, source.norm)(y)
                y = y if source.activation is None else source.activation(y)
            return y
        if isinstance(m, wsbcn.GroupNorm):
            y = gn_reference(x, m.num_groups, m.weight, m.bias, m.eps)
        else:
            assert not m.training
            y = bcn_reference(x, m.num_groups, m.weight, m.bias, m.group_weight, m.group_bias,
                              m.running_mean.double().clone(), m.running_var.double().clone(), training=False,
                              eps=m.eps)
        return self.tail(y)


def reference_model(original, converted):
    """``original`` (a copy taken before convert) with every layer convert replaced
    computed by ``Reference``: an independent twin of the converted model."""
    twin = copy.deepcopy(original)
    done = []
    for path, m in converted.named_modules():
        if isinstance(m, (wsbcn.WSConv1d, wsbcn.WSConv2d, wsbcn.WSConv3d, wsbcn.BatchChannelNorm1d,
                          wsbcn.BatchChannelNorm2d, wsbcn.BatchChannelNorm3d, wsbcn.GroupNorm, NormAct)) and not any(
                path.startswith(p + ".") for p in done):
            parent, _, leaf = path.rpartition(".")
            holder = twin.get_submodule(parent) if parent else twin
            source = getattr(holder, leaf)
            setattr(holder, leaf, Reference(m, source))
            for owner in twin.modules():  # a forward calling it from a plain list (detectron2's FPN)
                for value in vars(owner).values():
                    if type(value) is list:
                        value[:] = [holder.get_submodule(leaf) if v is source else v for v in value]
            done.append(path)
    assert done, "nothing was converted"
    return twin.eval()


def matches_reference(original, converted, x, tol=1e-10):
    twin = reference_model(original, converted)
    converted.eval()
    with torch.no_grad():
        got, want = converted(x), twin(x)
    if isinstance(got, dict):
        assert got.keys() == want.keys()
        return max(rel_err(got[k], want[k]) for k in got) <= tol
    return rel_err(got, want) <= tol


def train_step(model, x):
    """One SGD step on a loss of the output; every trainable parameter gets a finite gradient."""
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    out = model(x)
    loss = sum(o.float().square().mean() for o in out.values()) if isinstance(out, dict) else out.square().mean()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    opt.step()
