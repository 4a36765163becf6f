"""The ``wsbcn`` command (wsbcn/tools/cli.py, commands.py): every subcommand's help,
which suite and end-to-end runs ``wsbcn bench`` asks for, its printed summary against
its CSV, ``--host`` handed to a fresh process, the repository-only tools refused with
one line outside a checkout, and the subcommands end to end on CPU (Triton through
the interpreter, injected or real CPU timers; no timing is asserted)."""
import argparse
import math
import pathlib
import re
import subprocess

import numpy as np
import pandas as pd
import pytest
import torch

from wsbcn import tuning
from wsbcn.tools import bench, cli, commands, e2e, suites, timing
from wsbcn.tools.results import COLUMNS

SUBCOMMANDS = ("info", "bench", "autotune", "plot", "train", "report-kernels")


def parse(argv):
    return cli.build_parser().parse_args(["bench", *argv])


@pytest.mark.parametrize("argv", [[], *([name] for name in SUBCOMMANDS)])
def test_every_subcommand_has_help(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([*argv, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: wsbcn") and (argv or all(name in out for name in SUBCOMMANDS))


def test_cli_info_and_errors(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "interpreter" in out and "backend (cpu)" in out
    with pytest.raises(SystemExit):
        cli.main(["bench", "--ops", "nope"])


def test_which_suite_bench_runs():
    assert commands.bench_suite(parse([]), on_gpu=True) is None  # run_bench's default: resnet50_sample
    assert commands.bench_suite(parse(["--full"]), on_gpu=True) == "resnet50"
    assert commands.bench_suite(parse(["--batch-sizes", "8"]), on_gpu=True) == "resnet50"  # narrows the grid
    assert commands.bench_suite(parse(["--batch-sizes", "2"]), on_gpu=False) is None  # CPU: the cpu suite
    assert commands.bench_suite(parse(["--suite", "tiny", "--dtypes", "float32"]), on_gpu=True) == "tiny"
    for bad in (["--full", "--suite", "tiny"], ["--graph", "--timings", "eager"], ["--threads", "0"]):
        with pytest.raises(SystemExit):
            parse(bad)


def test_positive_int_names_the_bad_value():
    with pytest.raises(argparse.ArgumentTypeError, match="'-3'"):
        commands.positive_int("-3")


@pytest.mark.parametrize("argv", [["--batch-sizes", "0"], ["--batch-sizes", "2", "-3"], ["--max-minutes", "-1"],
                                  ["--max-minutes", "nan"]])
def test_meaningless_bench_values_are_argparse_errors(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", *argv])
    assert exit_.value.code == 2 and "expected a positive" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="graph timing runs on a GPU")
@pytest.mark.parametrize("argv", [["--graph"], ["--timings", "graph"], ["--timings", "eager", "graph"]])
def test_graph_timing_without_cuda_is_one_line(argv, capsys, tmp_path):
    assert cli.main(["bench", *argv, "--out", str(tmp_path)]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err and not any(tmp_path.iterdir())


def test_plot_without_results_is_one_line(capsys, tmp_path):
    assert cli.main(["plot", "--results", str(tmp_path / "none"), "--plots", str(tmp_path / "plots")]) == 2
    assert "run `wsbcn bench` first" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert cli.main(["plot", "--results", str(tmp_path / "file"), "--plots", str(tmp_path / "plots")]) == 2
    assert "is a file" in capsys.readouterr().err
    (tmp_path / "results" / "cpu").mkdir(parents=True)
    (tmp_path / "results" / "cpu" / "bench.csv").write_text("")  # a run stopped before writing
    (tmp_path / "results" / "cpu" / "autotune.csv").write_text("\n")
    assert cli.main(["plot", "--results", str(tmp_path / "results"), "--plots", str(tmp_path / "plots")]) == 2
    err = capsys.readouterr().err
    assert "bench.csv holds no results (run `wsbcn bench`" in err and "autotune.csv holds no results" in err


def test_plot_skips_an_empty_csv_and_plots_the_rest(capsys, tmp_path):
    """An empty CSV (a run stopped before writing) is skipped with a line; the other
    files and device folders are still plotted."""
    import shutil

    results = tmp_path / "results"
    shutil.copytree(pathlib.Path(__file__).resolve().parents[2] / "perf" / "results" / "cpu", results / "cpu")
    (results / "cpu" / "autotune.csv").write_text("")
    (results / "empty-device").mkdir()
    (results / "empty-device" / "bench.csv").write_text("")
    assert cli.main(["plot", "--results", str(results), "--plots", str(tmp_path / "plots")]) == 0
    out = capsys.readouterr().out
    assert "skipped:" in out and "autotune.csv holds no results (run `wsbcn autotune`" in out
    assert (tmp_path / "plots" / "cpu" / "speedup.png").exists()


@pytest.mark.parametrize("argv", [["autotune", "--max-configs", "0"], ["report-kernels", "--arch", "0"],
                                  ["report-kernels", "--max-compile-s", "-1"]])
def test_meaningless_tool_values_are_argparse_errors(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2 and "expected a positive" in capsys.readouterr().err


def planned_e2e_runs(options):
    """{(case, variant, mode, N)} run_e2e makes on a GPU with these options."""
    runs = set()
    for case in e2e.default_cases(True, detection_batch_sizes=options.get("detection_batch_sizes")):
        modes = e2e.case_graph_modes(case, True, options.get("graph_modes"))
        runs |= {(case.name, v, m, n) for v, m in e2e._runs(case, e2e.VARIANTS, modes, options["with_compiled"])
                 for n in case.batch_sizes}
    return runs


def test_the_default_e2e_runs_compile_nothing_and_full_runs_more_of_everything():
    default = planned_e2e_runs(commands.e2e_options(parse(["--e2e"]), on_gpu=True))
    full = planned_e2e_runs(commands.e2e_options(parse(["--full", "--e2e"]), on_gpu=True))
    assert default < full and not any(m == "compiled" for _, _, m, _ in default)
    for runs in (default, full):  # every variant in every case
        assert {(c, v) for c, v, _, _ in runs} == {(c, v) for c in e2e.CASES for v in e2e.VARIANTS}
    # --full: every graph mode of every variant in every case at each of its batch sizes,
    # and the compiled steps of exactly the compiled variants
    for case in e2e.CASES:
        sizes = {n for c, _, _, n in full if c == case}
        assert {n for c, _, _, n in default if c == case} <= sizes
        assert {(v, m, n) for c, v, m, n in full if c == case and m != "compiled"} == {
            (v, m, n) for v in e2e.VARIANTS for m in e2e.GRAPH_MODES for n in sizes}
        assert {(v, n) for c, v, m, n in full if c == case and m == "compiled"} == {
            (v, n) for v in e2e.COMPILED_VARIANTS for n in sizes}
    # the compiled steps on request, never with --no-compiled, never by --full on CPU
    assert commands.e2e_options(parse(["--e2e-compile"]), on_gpu=True) == {"with_compiled": True}
    assert commands.e2e_options(parse(["--full", "--e2e", "--no-compiled"]), on_gpu=True)["with_compiled"] is False
    assert commands.e2e_options(parse(["--full", "--e2e"]), on_gpu=False) == {"with_compiled": False}


def test_bench_passes_the_e2e_options_to_run_e2e(tmp_path, monkeypatch):
    seen, micro = [], []
    monkeypatch.setattr(e2e, "run_e2e", lambda **kwargs: seen.append(kwargs) or fake_e2e())
    monkeypatch.setattr(bench, "run_bench", lambda *a, **kw: micro.append(a) or pd.DataFrame(columns=COLUMNS))
    for argv in (["--e2e-only"], ["--e2e-compile"], ["--e2e-only", "--e2e-compile", "--no-compiled"], []):
        assert cli.main(["bench", *argv, "--out", str(tmp_path)]) == 0
    assert [kw["with_compiled"] for kw in seen] == [False, True, False]  # --e2e-compile implies --e2e
    assert len(micro) == 2  # --e2e-compile alone keeps the micro-benchmarks, as --e2e does


def test_bench_help_describes_the_default_run_from_the_code(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    sample = suites.cases(bench.DEFAULT_GPU_SUITE, bench.OPS)
    for part in (bench.DEFAULT_GPU_SUITE, f"{len(sample)} cases", "modes " + " and ".join(suites.SAMPLE_MODES),
                 "detection at N = " + " and ".join(map(str, e2e.FULL_DETECTION_BATCH_SIZES_GPU)),
                 "%g + %g ms" % timing.SAMPLE_BUDGET_MS, "--e2e-compile"):
        assert part in text, part


class ScriptedTimer:
    """Runs each callable once and reports times from a fixed cycle, so that the
    speedups differ from case to case. (Made as bench_timer(suite) is.)"""

    def __init__(self, suite=None):
        self.times = iter([0.3, 1.7, 0.9, 2.3, 1.1, 0.5, 3.1] * 1000)

    def __call__(self, fn):
        fn()
        ms = next(self.times)
        return ms, ms * 0.9, ms * 1.1


def fake_e2e(**kwargs):
    rows = [dict(suite="e2e", op="resnet50_step", provider=p, variant="eager", mode="fwdbwd", dtype="float32",
                 layout="contiguous", N=2, C=math.nan, spatial="64x64", ms_p50=ms, ms_p20=ms, ms_p80=ms,
                 gbps=math.nan, pct_copy_bw=math.nan, peak_mem_mb=math.nan, launches=math.nan,
                 images_per_s=2 / (ms * 1e-3), device="cpu", torch="t", triton="t", commit="abc",
                 timestamp="2026-01-01T00:00:00Z")
            for p, ms in (("plain_bn", 90.0), ("wsbcn_ws_bcn", 230.0))]
    return pd.DataFrame(rows, columns=COLUMNS)


def test_cli_summary_matches_the_csv(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(timing, "bench_timer", ScriptedTimer)
    monkeypatch.setattr(e2e, "run_e2e", fake_e2e)
    out = tmp_path / "results"
    assert cli.main(["bench", "--suite", "tiny", "--ops", "bcn", "gn", "--modes", "fwd", "fwdbwd", "--e2e",
                     "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    path = next(out.glob("*/bench.csv"))
    assert str(path) in printed
    table = {}
    for op, mode, kind, baseline, value, cases in re.findall(
            r"^\| (\w+) \| (\w+) \| (\w+) \| (\w+) \| ([\d.]+)x \| (\d+) \|$", printed, flags=re.M):
        table[(op, mode, kind, baseline)] = (float(value), int(cases))
    # the reference: per case baseline time / wsbcn time, geometric mean with numpy
    frame = pd.read_csv(path)
    micro = frame[frame["op"].isin(bench.OPS)]
    case = ["op", "mode", "dtype", "layout", "N", "C", "spatial"]
    ours = micro[micro["provider"] == "wsbcn"].set_index(case)["ms_p50"]
    expected = {}
    for (op, mode, provider), group in micro[micro["provider"] != "wsbcn"].groupby(["op", "mode", "provider"]):
        ratios = group.set_index(case)["ms_p50"] / ours
        ratios = ratios.dropna()
        expected[(op, mode, "eager", provider)] = (float(np.exp(np.log(ratios).mean())), len(ratios))
    assert table.keys() == expected.keys() and len(table) == 2 * 4  # bcn: 3 baselines, gn: 1; 2 modes
    for key, (value, cases) in table.items():
        assert cases == expected[key][1]
        assert value == pytest.approx(expected[key][0], abs=0.0051)
    images = re.findall(r"^\| resnet50_step \| 64x64 \| 2 \| (\w+) \| eager \| ([\d.]+) \|", printed, flags=re.M)
    e2e_rows = frame[frame["op"] == "resnet50_step"].set_index("provider")["images_per_s"]
    assert {p: float(v) for p, v in images} == pytest.approx(e2e_rows.round(1).to_dict())


def test_bench_runs_cpu_single_threaded_by_default_and_restores_the_setting(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(commands, "_bench_parts", lambda args: seen.append(torch.get_num_threads()) or 0)
    before = torch.get_num_threads()
    assert cli.main(["bench", "--out", str(tmp_path)]) == 0
    assert cli.main(["bench", "--threads", "2", "--out", str(tmp_path)]) == 0
    assert seen == ([1, 2] if not torch.cuda.is_available() else [before, 2])
    assert torch.get_num_threads() == before


@pytest.fixture
def subprocess_calls(monkeypatch):
    """The command and environment of the last ``subprocess.run``, which runs nothing;
    TRITON_INTERPRET is set, as in this test process."""
    seen = {}

    def fake_run(command, env):
        seen["command"], seen["env"] = command, env
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return seen


def test_cli_bench_host_runs_the_host_benchmark_in_a_fresh_process(tmp_path, subprocess_calls, capsys):
    """`wsbcn bench --host` hands its narrowing options to `python -m wsbcn.tools.host_bench`
    in a process without TRITON_INTERPRET (the benchmark itself: test_host_bench.py),
    and refuses options that only the device benchmark takes."""
    seen = subprocess_calls
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


def test_cli_bench_distributed_runs_the_distributed_benchmark_in_a_fresh_process(tmp_path, subprocess_calls, capsys):
    """`wsbcn bench --distributed` hands the world size and its narrowing options to
    `python -m wsbcn.tools.dist_bench` in a process without TRITON_INTERPRET (the
    benchmark itself: test_dist_bench.py); its ops default to BCN's two modes."""
    seen = subprocess_calls
    assert cli.main(["bench", "--host", "--distributed", "--world-size", "3", "--batch-sizes", "2", "--modes", "fwd",
                     "--quick", "--out", str(tmp_path)]) == 0
    command = seen["command"]
    assert command[1:3] == ["-m", "wsbcn.tools.dist_bench"]
    joined = " ".join(command)
    for part in ("--ops bcn bcn_estimate", "--world-size 3", "--batch-sizes 2", "--modes fwd", "--quick",
                 f"--out {tmp_path}"):
        assert part in joined, part
    assert "TRITON_INTERPRET" not in seen["env"] and "WSBCN_BACKEND" not in seen["env"]
    assert cli.main(["bench", "--distributed", "--ops", "bcn"]) == 0  # --host implied; an --ops given is kept
    command = seen["command"]
    assert command[command.index("--ops") + 1:] == ["bcn"] and "--world-size" not in command
    seen.clear()
    assert cli.main(["bench", "--distributed", "--e2e"]) == 2
    assert cli.main(["bench", "--host", "--world-size", "2"]) == 2
    err = capsys.readouterr().err
    assert not seen and "--distributed times eager calls only" in err and "--world-size goes with --distributed" in err


def test_the_repository_only_tools_are_refused_in_one_line_outside_a_checkout(tmp_path, monkeypatch, capsys):
    import wsbcn.tools as tools

    monkeypatch.setattr(tools, "dev_tools_dir", lambda: None)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("started a process"))
    with pytest.raises(tools.DevToolsMissing, match="clone of the repository"):
        tools.stub_driver  # noqa: B018
    if not torch.cuda.is_available():  # a GPU runs --host over the real driver, without the stub
        assert cli.main(["bench", "--host", "--out", str(tmp_path)]) == 2
    assert cli.main(["report-kernels", "--suite", "ci"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line]
    assert errors and all("perf/wsbcn_dev/" in line and "clone of the repository" in line for line in errors)
    assert not any(tmp_path.iterdir())


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
