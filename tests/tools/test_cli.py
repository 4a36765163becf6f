"""The tuning cache, the autotune sweep, bench, plot and the CLI, on CPU with an
injected timer (Triton kernels through the interpreter)."""
import json
import math

import pandas as pd
import pytest
import torch

from wsbcn import tuning
from wsbcn.tools import autotune, bench, cli, plot
from conftest import DEVICE, config_overrides


class CountingTimer:
    """Runs the callable for real (so every config is exercised) and returns a
    deterministic time that favours larger blocks, so the winner is known."""

    def __init__(self):
        self.calls = 0

    def __call__(self, fn):
        fn()
        self.calls += 1
        return 1.0, 0.9, 1.1


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


def test_autotune_flow_on_cpu_with_injected_timer(tmp_path, monkeypatch):
    monkeypatch.setenv("WSBCN_CACHE_DIR", str(tmp_path / "cache"))
    timer = CountingTimer()
    frame, winners = autotune.run_autotune("tiny", timer=timer, out_dir=tmp_path / "results", max_configs=3,
                                           num_groups=4, progress=False)
    assert timer.calls == len(frame) > 0
    assert set(frame["kernel"]) == set(tuning.KERNELS)
    csv = pd.read_csv(next((tmp_path / "results").glob("*/autotune.csv")))
    assert len(csv) == len(frame)
    assert {"device", "torch", "triton", "commit", "timestamp", "config", "ms_p50"} <= set(csv.columns)
    cache = json.loads(next((tmp_path / "cache").glob("*.json")).read_text())
    assert set(cache["configs"]) == set(winners) and winners
    for key, cfg in winners.items():
        assert tuning.valid_config(key.split("|")[0], cfg)


def test_pick_winners_prefers_fastest_relative_config():
    rows = []
    for shape, times in (((1, 8, 16), {"a": 2.0, "b": 1.0}), ((2, 8, 16), {"a": 1.0, "b": 1.5})):
        for cfg, ms in times.items():
            rows.append(dict(key="k", config=json.dumps({"name": cfg}), N=shape[0], C=shape[1], spatial=shape[2], ms_p50=ms))
    # a: relative (2.0, 1.0) mean 1.5; b: (1.0, 1.5) mean 1.25 -> b
    assert autotune.pick_winners(pd.DataFrame(rows)) == {"k": {"name": "b"}}


def test_bench_rows_columns_and_upsert(tmp_path):
    timer = CountingTimer()
    frame = bench.run_bench("tiny", ops=("bcn", "ws"), modes=("fwd", "bwd"), timer=timer, out_dir=tmp_path,
                            with_compiled=False, progress=False, log=lambda *a: None)
    assert list(frame.columns) == bench.COLUMNS
    # on CPU the vendor baselines are torch's own kernels, named for what runs
    expected = {"wsbcn", "reference_bcn", "reference_ws", *bench.BASELINES[DEVICE].values()}
    assert expected <= set(frame["provider"])
    assert (frame["gbps"] > 0).all() and (frame["pct_copy_bw"] > 0).all()
    path = next(tmp_path.glob("*/bench.csv"))
    first = pd.read_csv(path)
    bench.run_bench("tiny", ops=("bcn",), modes=("fwd",), timer=timer, out_dir=tmp_path, with_compiled=False,
                    progress=False, log=lambda *a: None)
    second = pd.read_csv(path)
    assert len(second) == len(first)  # same cases replaced, not appended
    assert list(second.columns) == bench.COLUMNS


def test_bench_never_advances_running_statistics():
    inp = bench.NormInputs(2, 8, 3, 3, torch.float32, "contiguous", "cpu", 4)
    before = [b.clone() for b in inp.buffers()]
    forward, leaves = bench.norm_fn("bcn", "wsbcn", inp)
    bench.measure(bench.timed_callable(forward, leaves, "fwdbwd"), CountingTimer(), inp.restore)
    for b, s in zip(inp.buffers(), before):
        assert torch.equal(b, s)


def test_plot_writes_pngs_and_summary(tmp_path):
    timer = CountingTimer()
    results = tmp_path / "results"
    bench.run_bench("tiny", ops=("bcn", "gn"), modes=("fwd",), timer=timer, out_dir=results, with_compiled=False,
                    progress=False, log=lambda *a: None)
    autotune.run_autotune("tiny", timer=timer, out_dir=results, cache_path=tmp_path / "c.json", max_configs=2,
                          kernels=("norm_fwd",), num_groups=4, progress=False)
    written = plot.run_plot(results, tmp_path / "plots", log=lambda *a: None)
    names = {p.name for p in written}
    assert {"gbps_bcn.png", "gbps_gn.png", "speedup.png", "pct_copy_bw.png", "autotune_norm_fwd.png", "summary.md"} <= names
    for p in written:
        assert p.stat().st_size > 0
    summary = next(p for p in written if p.name == "summary.md").read_text()
    assert f"| bcn | fwd | eager | {bench.BASELINES[DEVICE]['bn']} |" in summary


def test_geomean():
    assert plot.geomean([2.0, 8.0]) == pytest.approx(4.0)
    assert math.isnan(plot.geomean([]))


def test_cli_info_and_errors(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "interpreter" in out and "backend (cpu)" in out
    with pytest.raises(SystemExit):
        cli.main(["bench", "--ops", "nope"])


def test_cli_bench_host_runs_the_host_benchmark_in_a_fresh_process(tmp_path, monkeypatch, capsys):
    """`wsbcn bench --host` hands its narrowing options to `python -m wsbcn.tools.host_bench`
    in a process without TRITON_INTERPRET (the benchmark itself: tests/test_host_bench.py),
    and refuses options that only the device benchmark takes."""
    import subprocess

    seen = {}

    def fake_run(command, env):
        seen["command"], seen["env"] = command, env
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    args = ["bench", "--host", "--ops", "bcn", "gn", "--batch-sizes", "2", "--dtypes", "bfloat16", "--quick",
            "--out", str(tmp_path)]
    assert cli.main(args) == 0
    command = seen["command"]
    assert command[1:3] == ["-m", "wsbcn.tools.host_bench"]
    joined = " ".join(command)
    for part in ("--ops bcn gn", "--batch-sizes 2", "--dtypes bfloat16", "--quick", f"--out {tmp_path}"):
        assert part in joined, part
    assert "--modes" not in command  # bench's default modes: host_bench's own (fwd, fwdbwd)
    assert "TRITON_INTERPRET" not in seen["env"] and "WSBCN_BACKEND" not in seen["env"]
    seen.clear()
    assert cli.main(["bench", "--host", "--e2e"]) == 2
    assert not seen and "--host times eager calls only" in capsys.readouterr().err


def test_cli_autotune_bench_plot_on_cpu(tmp_path, monkeypatch, capsys):
    """The subcommands end to end (Triton through the interpreter, real CPU timers)."""
    monkeypatch.setenv("WSBCN_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "results"
    assert cli.main(["autotune", "--suite", "tiny", "--kernels", "ws_fwd", "norm_bwd", "--max-configs", "1",
                     "--out", str(out)]) == 0
    assert "tuned keys" in capsys.readouterr().out
    assert list((tmp_path / "cache").glob("*.json"))
    assert cli.main(["bench", "--suite", "tiny", "--ops", "gn", "--modes", "fwd", "--out", str(out)]) == 0
    assert cli.main(["plot", "--results", str(out), "--plots", str(tmp_path / "plots")]) == 0
    assert list((tmp_path / "plots").rglob("gbps_gn.png"))
    tuning.forget_loaded_tables()


def test_narrowed_suite_and_time_budget(tmp_path):
    from wsbcn.tools import suites

    norms, convs, batches, dtypes, layouts = suites.suite("resnet50", batch_sizes=[2, 32], dtypes=["bfloat16"],
                                                          layouts=["channels_last"])
    assert batches == (2, 32) and dtypes == ("bfloat16",) and layouts == ("channels_last",) and len(norms) == 12
    timer = CountingTimer()
    lines = []
    frame = bench.run_bench("tiny", ops=("gn",), modes=("fwd",), timer=timer, out_dir=None, with_compiled=False,
                            progress=False, log=lines.append, layouts=["contiguous"], max_minutes=0)
    assert frame.empty and any("stopped after" in line for line in lines)
    frame = bench.run_bench("tiny", ops=("gn",), modes=("fwd",), timer=timer, out_dir=None, with_compiled=False,
                            progress=False, log=lines.append, layouts=["contiguous"])
    assert set(frame["layout"]) == {"contiguous"} and len(frame) == 2 * 2  # 2 shapes x 2 providers


def test_commit_override_for_a_tree_without_git(monkeypatch):
    from wsbcn.tools.info import git_commit, run_metadata

    monkeypatch.delenv("WSBCN_COMMIT", raising=False)
    assert git_commit() != "abc123def456"
    monkeypatch.setenv("WSBCN_COMMIT", "abc123def456")
    assert run_metadata()["commit"] == "abc123def456"


def test_bench_graph_needs_cuda(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA device"):
        bench.run_bench("tiny", ops=("bcn",), timer=CountingTimer(), out_dir=tmp_path, graph=True, progress=False,
                        log=lambda *a: None)
    assert not any(tmp_path.iterdir())


def _shipped_configs():
    from importlib import resources

    files = [json.loads(f.read_text()) for f in resources.files("wsbcn.configs").iterdir() if f.name.endswith(".json")]
    return [(data["schema_version"], key, cfg) for data in files for key, cfg in data["configs"].items()]


@pytest.mark.parametrize("schema,key,cfg", _shipped_configs())
def test_every_shipped_config_is_valid_and_computes_like_the_reference(schema, key, cfg, monkeypatch):
    """Shipped (autotuned) configs load, and each computes its op and gradient like
    the float64 reference, in the layout it was tuned for (Triton through the
    interpreter on CPU)."""
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


def test_speedups_never_mix_eager_and_graph_timings():
    base = dict(op="bcn", mode="fwd", dtype="bfloat16", layout="contiguous", N=2, C=8, spatial="4x4")
    rows = [dict(base, provider="wsbcn", variant="eager", ms_p50=2.0),
            dict(base, provider="cudnn_bn", variant="eager", ms_p50=1.0),
            dict(base, provider="wsbcn", variant="cudagraph", ms_p50=0.1),
            dict(base, provider="cudnn_bn", variant="cudagraph", ms_p50=0.4),
            dict(base, provider="compiled_bcn", variant="compiled_cudagraph", ms_p50=0.3)]
    table = plot.speedups(pd.DataFrame(rows)).set_index(["timing", "baseline"])["speedup"]
    assert table.to_dict() == {("eager", "cudnn_bn"): 0.5, ("graph", "compiled_bcn"): pytest.approx(3.0),
                               ("graph", "cudnn_bn"): pytest.approx(4.0)}
