"""Tuned configs (wsbcn/tuning.py): the lookup order user cache -> shipped -> heuristic,
caches that are broken or foreign ignored, and every shipped config valid and computing
like the float64 reference (Triton through the interpreter on CPU)."""
import json

import pytest
import torch

from conftest import DEVICE, config_overrides
from wsbcn import tuning


def test_cache_lookup_order_user_then_shipped_then_heuristic(tmp_path, monkeypatch):
    monkeypatch.setenv("WSBCN_CACHE_DIR", str(tmp_path))
    tuning.forget_loaded_tables()
    x = torch.empty(2, 8, 16)
    key = tuning.config_key("norm_fwd", torch.float32, False, (2, 8, 16))
    heuristic = tuning.config_for("norm_fwd", x, (2, 8, 16))
    assert heuristic == tuning.heuristic_config("norm_fwd", x, (2, 8, 16))
    shipped = {"BLOCK_C": 2, "num_warps": 2, "num_stages": 1}
    monkeypatch.setattr(tuning, "_shipped", lambda slug: {key: shipped})
    tuning.forget_loaded_tables()
    assert tuning.config_for("norm_fwd", x, (2, 8, 16)) == dict(heuristic, **shipped)
    mine = dict(shipped, BLOCK_C=4, num_warps=4)
    tuning.write_cache(tmp_path / "cpu.json", "cpu", {key: mine})
    assert tuning.config_for("norm_fwd", x, (2, 8, 16)) == dict(heuristic, **mine)  # the plan stays the heuristic's
    data = json.loads((tmp_path / "cpu.json").read_text())
    assert data["schema_version"] == tuning.SCHEMA_VERSION and data["torch"] == torch.__version__
    assert not list(tmp_path.glob("*.tmp"))  # atomic write leaves no temp file
    tuning.forget_loaded_tables()


def test_broken_or_foreign_cache_is_ignored(tmp_path, monkeypatch):
    monkeypatch.setenv("WSBCN_CACHE_DIR", str(tmp_path))
    (tmp_path / "cpu.json").write_text("{not json")
    tuning.forget_loaded_tables()
    x = torch.empty(2, 8, 16)
    assert tuning.config_for("norm_fwd", x, (2, 8, 16)) == tuning.heuristic_config("norm_fwd", x, (2, 8, 16))
    key = tuning.config_key("norm_fwd", torch.float32, False, (2, 8, 16))
    (tmp_path / "cpu.json").write_text(json.dumps({"schema_version": 999, "configs": {key: {"BLOCK_C": 1}}}))
    tuning.forget_loaded_tables()
    assert tuning.config_for("norm_fwd", x, (2, 8, 16)) == tuning.heuristic_config("norm_fwd", x, (2, 8, 16))
    for bad in ({"BLOCK_C": 3, "num_warps": 2, "num_stages": 1},  # not a power of two
                {"BLOCK_C": 2, "BLOCK_S": 8, "split": 1, "num_warps": 2, "num_stages": 1}):  # carries a plan
        (tmp_path / "cpu.json").write_text(json.dumps({"schema_version": tuning.SCHEMA_VERSION, "configs": {key: bad}}))
        tuning.forget_loaded_tables()
        assert tuning.config_for("norm_fwd", x, (2, 8, 16)) == tuning.heuristic_config("norm_fwd", x, (2, 8, 16))
    tuning.forget_loaded_tables()


def _shipped_configs():
    from importlib import resources

    files = [json.loads(f.read_text()) for f in resources.files("wsbcn.configs").iterdir() if f.name.endswith(".json")]
    return [(data["schema_version"], key, cfg) for data in files for key, cfg in data["configs"].items()]


@pytest.mark.parametrize("schema,key,cfg", _shipped_configs())
def test_every_shipped_config_is_valid_and_computes_like_the_reference(schema, key, cfg, monkeypatch):
    """Shipped (autotuned) configs load, and each computes its op and gradient like
    the float64 reference, in the layout it was tuned for."""
    from reference import bcn_reference, ws_reference
    from wsbcn.functional import batch_channel_norm, weight_standardize

    kernel, dtype, layout, _ = key.split("|")
    assert schema == tuning.SCHEMA_VERSION and tuning.valid_config(kernel, cfg)
    assert dtype in ("float32", "bfloat16", "float16")
    monkeypatch.setenv("WSBCN_BACKEND", "triton")
    with config_overrides(cfg, kernel):
        torch.manual_seed(0)
        if kernel.startswith("ws"):
            x = torch.randn(8, 6, 3, 3, device=DEVICE) * 2 + 1
            op, reference = weight_standardize, ws_reference
        else:
            x = torch.randn(2, 16, 5, 7, device=DEVICE) * 2 + 1
            if layout == "channels_last":
                x = x.to(memory_format=torch.channels_last)
            op = lambda t: batch_channel_norm(t, 4, training=True, activation="relu")  # noqa: E731
            reference = lambda t: bcn_reference(t, 4, activation="relu")  # noqa: E731
        x64 = x.double().requires_grad_(True)
        expected = reference(x64)
        dy = torch.linspace(-1, 1, x.numel(), dtype=torch.float64, device=DEVICE).reshape(x.shape)
        (expected_dx,) = torch.autograd.grad(expected, x64, dy)
        xg = x.detach().requires_grad_(True)
        got = op(xg)
        (dx,) = torch.autograd.grad(got, xg, dy.float())
        assert (got - expected).abs().max().item() <= 1e-5
        assert (dx - expected_dx).abs().max().item() <= 1e-5
