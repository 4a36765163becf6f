"""The static kernel report (wsbcn/tools/kernel_report.py): its rows' loads in flight,
what --check fails on, the ci suite's cases, and the CI gate: the few-shapes suite
compiled for sm_90 in a process of its own must show no spill and no compile above 30 s."""
import os
import subprocess
import sys

import pandas as pd
import pytest

from wsbcn.tools.kernel_report import (BCN_MODES, CI_CONV_SHAPES, CI_MODE_SHAPES, OPS, check, short_of_waves,
                                      suite_cases)


@pytest.mark.parametrize("loop,stages,step_kb,in_flight_kb", [
    # a plain loop: one 16-byte load per thread and step, 128 threads, 8 CTAs -> 16 KB
    ({"ld": {16: 1}, "st": {}, "cp": {}}, 3, 16.0, 16.0),
    # pipelined over 3 stages: the copies of 2 steps outstanding at the wait
    ({"ld": {}, "st": {16: 1}, "cp": {16: 1}}, 3, 16.0, 32.0),
    # 2 stages: one buffer, one step, as in a plain loop
    ({"ld": {}, "st": {}, "cp": {16: 1}}, 2, 16.0, 16.0),
])
def test_loads_in_flight_count_the_pipeline_depth(loop, stages, step_kb, in_flight_kb):
    from types import SimpleNamespace

    from wsbcn.tools.kernel_report import launch_row

    spec = SimpleNamespace(options=SimpleNamespace(num_warps=4, num_stages=stages),
                           constexpr_values=lambda kernel: {"NUM_STAGES": stages})
    launch = SimpleNamespace(name="_norm_stats_kernel", kernel=None, grid=(264, 1, 1), programs=264)
    facts = dict(registers=64, shared_bytes=4096, spill_store_bytes=0, spill_load_bytes=0, stack_bytes=0,
                 loop_widths=loop, widths=loop, async_copies=sum(loop["cp"].values()), compile_s=0.5)
    case = dict(op="bcn", shape=(256, 28, 28), n=32, dtype="bfloat16", layout="channels_last")
    row = launch_row(case, "fwd", launch, spec, facts, 0)
    assert row["ctas_per_sm"] == 8
    assert (row["step_load_kb_per_sm"], row["loads_in_flight_kb_per_sm"]) == (step_kb, in_flight_kb)
    assert row["load_bytes"] == 16


def test_check_names_spills_and_slow_compiles():
    row = dict(op="bcn", dtype="bfloat16", layout="channels_last", n=32.0, shape="256x56x56", constexprs="BLOCK_J=16",
               num_warps=4, kernel="_norm_combine_kernel", spill_store_bytes=0, spill_load_bytes=0, compile_s=1.0,
               spec_id=0)
    frame = pd.DataFrame([row, dict(row, spill_store_bytes=264, spill_load_bytes=264, spec_id=1), dict(row, compile_s=31.0, spec_id=2)])
    problems = check(frame, 30.0)
    assert len(problems) == 2
    assert "spills 264 B" in problems[0] and "n=32 256x56x56" in problems[0]
    assert "31.0 s" in problems[1]


def test_check_names_passes_short_of_waves_that_smaller_tiles_or_a_larger_split_would_fix():
    row = dict(op="bcn", dtype="float32", layout="channels_last", n=32.0, shape="2048x7x7", constexprs="BLOCK_C=16",
               num_warps=4, kernel="_norm_stats_kernel", spill_store_bytes=0, spill_load_bytes=0, compile_s=1.0,
               spec_id=0, waves=3.88, tiles_per_program=1.0, values_per_thread=8.0, values_per_load=4.0)
    ok = [dict(row, values_per_thread=4.0),  # one 16-byte load per thread, one tile per program: the limit
          dict(row, waves=4.5),  # enough waves
          dict(row, n=2.0, tiles_per_program=3.0),  # N = 2 is latency-bound: not held to it
          dict(row, values_per_thread=4.0, values_per_load=1.0),  # scalar rows keep 4 values per thread
          dict(row, kernel="_norm_combine_kernel", waves=0.2, tiles_per_program=float("nan"))]
    short = [row,  # two loads' values per thread: a tile half as large doubles the programs
             dict(row, values_per_thread=4.0, tiles_per_program=2.0)]  # a larger split would add programs
    assert short_of_waves(pd.DataFrame(ok)).empty
    assert len(short_of_waves(pd.DataFrame(short))) == 2
    problems = check(pd.DataFrame(ok + short), 30.0)
    assert len(problems) == 2 and "3.88 waves at 1 tiles per program and 8 values per thread" in problems[0]
    assert "2 tiles per program" in problems[1]


def test_ci_suite_takes_every_bn_mode_and_keeps_the_others_in_one_dtype():
    cases = list(suite_cases("ci", [2, 32], ["bfloat16", "float32"], ["contiguous", "channels_last"], OPS))
    for op in ("bcn", "gn"):
        assert {c["dtype"] for c in cases if c["op"] == op} == {"bfloat16", "float32"}
    for op in ("bcn_estimate", "bcn_eval", "bcn_relu"):
        mine = [c for c in cases if c["op"] == op]
        assert {c["dtype"] for c in mine} == {"bfloat16"} and {c["shape"] for c in mine} == set(CI_MODE_SHAPES)
        assert len(mine) == 2 * 2 * len(CI_MODE_SHAPES)
    assert BCN_MODES["bcn_eval"] == dict(training=False, estimate=False)
    assert BCN_MODES["bcn_estimate"] == dict(training=True, estimate=True)
    assert BCN_MODES["bcn_relu"] == dict(training=True, estimate=False, activation="relu")
    # model-wide WS: one case of every conv weight per dtype and layout
    model_wide = [c for c in cases if c["op"] == "ws_model"]
    assert len(model_wide) == 4 and all(c["shape"] == tuple(CI_CONV_SHAPES) for c in model_wide)


@pytest.mark.slow  # the CI gate: ~1.5 min of sm_90 compiles on 2 cores; CI runs it in its slow pass
def test_ci_suite_compiles_for_sm90_without_spills_or_slow_compiles(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "WSBCN_BACKEND")}
    csv, png = tmp_path / "kernels.csv", tmp_path / "kernels.png"
    out = subprocess.run([sys.executable, "-m", "wsbcn.tools.kernel_report", "--suite", "ci", "--check", "--quiet",
                          "--out", str(csv), "--plot", str(png)], capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    frame = pd.read_csv(csv)
    assert set(frame.kernel) == {"_norm_stats_kernel", "_norm_combine_kernel", "_norm_apply_kernel",
                                 "_norm_bwd_reduce_kernel", "_norm_bwd_combine_kernel", "_norm_bwd_apply_kernel",
                                 "_ws_fwd_kernel", "_ws_bwd_kernel", "_ws_multi_fwd_kernel", "_ws_multi_bwd_kernel"}
    # 3 launches each way per BCN/GN case, one per WS case, one or more (BLOCKs apart) per model-wide case
    norm = frame[~frame.op.str.startswith("ws")]
    assert (norm.groupby(["op", "dtype", "layout", "n", "shape", "pass"]).size() == 3).all()
    assert (frame[frame.op == "ws"].groupby(["dtype", "layout", "shape", "pass"]).size() == 1).all()
    model_wide = frame[frame.op == "ws_model"]
    assert set(model_wide.kernel) == {"_ws_multi_fwd_kernel", "_ws_multi_bwd_kernel"}
    assert (model_wide["shape"] == f"{len(CI_CONV_SHAPES)} weights").all()
    assert (model_wide.groupby(["dtype", "layout", "pass"]).size() >= 1).all() and len(model_wide) >= 8
    assert (frame.registers > 0).all() and (frame.spill_store_bytes == 0).all()
    assert png.stat().st_size > 10_000
    # the three BN modes, each with its own combine kernels (MODE 1-3; GN is MODE 0)
    assert set(frame.op) == {"bcn", "bcn_estimate", "bcn_eval", "bcn_relu", "gn", "ws", "ws_model"}
    # the fused ReLU is the apply pass's and the backward's (ACT=1), not the statistics pass's
    relu = frame[frame.op == "bcn_relu"]
    for kernel in ("_norm_apply_kernel", "_norm_bwd_reduce_kernel", "_norm_bwd_apply_kernel"):
        assert relu[relu.kernel == kernel].constexprs.str.contains("ACT=1").all(), kernel
    assert not frame[frame.op != "bcn_relu"].constexprs.str.contains("ACT=1").any()
    combines = frame[frame.kernel.str.contains("combine")]
    for op, mode in (("gn", 0), ("bcn", 1), ("bcn_estimate", 2), ("bcn_eval", 3)):
        rows = combines[combines.op == op]
        assert set(rows.kernel) == {"_norm_combine_kernel", "_norm_bwd_combine_kernel"}
        assert rows.constexprs.str.contains(f"MODE={mode}").all()
    # the specialisations that once spilled: the estimate-mode forward combine at
    # 13 chunks per sample (triton 3.6), the estimate/eval backward combine at 49 (3.9)
    est = combines[(combines.op == "bcn_estimate") & (combines.n == 2)]
    assert ((est.layout == "channels_last") & (est["shape"] == "256x28x28")).any()
    for op in ("bcn_estimate", "bcn_eval"):
        assert ((combines.op == op) & (combines.n == 2) & (combines.layout == "contiguous")
                & (combines["shape"] == "256x56x56") & (combines.kernel == "_norm_bwd_combine_kernel")).any()
