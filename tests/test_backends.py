"""Which implementation runs a call: WSBCN_BACKEND, read on every call."""
import pytest
import torch

from wsbcn import backends
from wsbcn.functional import batch_channel_norm
from conftest import HAS_CUDA


@pytest.mark.skipif(HAS_CUDA, reason="the choices below are those of a CPU tensor")
def test_wsbcn_backend_is_read_on_every_call(monkeypatch):
    """Set, changed, unset and invalid between calls: each call follows the variable as
    it is then (no stale choice from an earlier read); an invalid value is a ValueError
    naming it, before anything runs."""
    x = torch.zeros(2, 4, 3)
    monkeypatch.delenv("WSBCN_BACKEND", raising=False)
    assert backends.backend_for(x) == "torch"  # auto: torch for CPU tensors
    monkeypatch.setenv("WSBCN_BACKEND", " Triton ")
    assert backends.backend_for(x) == "triton"  # the tests run the interpreter
    monkeypatch.setenv("WSBCN_BACKEND", "torch")
    assert backends.backend_for(x) == "torch"
    monkeypatch.setenv("WSBCN_BACKEND", "triton")
    assert backends.backend_for(x) == "triton"
    assert backends.backend_for(x.double()) == "torch"  # float64 always
    monkeypatch.setenv("WSBCN_BACKEND", "cuda")
    running_mean, running_var = torch.zeros(4), torch.ones(4)
    for _ in range(2):
        with pytest.raises(ValueError, match="WSBCN_BACKEND must be one of .* got 'cuda'"):
            batch_channel_norm(torch.randn(2, 4, 3), 2, running_mean, running_var, training=True)
    assert torch.equal(running_mean, torch.zeros(4)) and torch.equal(running_var, torch.ones(4))
    monkeypatch.delenv("WSBCN_BACKEND")
    assert backends.backend_for(x) == "torch"
    try:  # emulating a GPU reads it too (the host benchmark pays the read a GPU call pays)
        backends.emulate_gpu("NVIDIA H100 80GB HBM3", 132)
        assert backends.backend_for(x) == "triton"
        monkeypatch.setenv("WSBCN_BACKEND", "cuda")
        with pytest.raises(ValueError, match="WSBCN_BACKEND"):
            backends.backend_for(x)
    finally:
        backends.emulate_gpu(None)
