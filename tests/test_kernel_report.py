"""The static kernel report (wsbcn/tools/kernel_report.py): its occupancy model
against the CUDA occupancy rules worked by hand, its PTX and ptxas readers on
listings written out here, and the CI gate: the few-shapes suite compiled for
sm_90 in a process of its own must show no spill and no compile above 30 s."""
import os
import subprocess
import sys

import pandas as pd
import pytest

from wsbcn.tools.kernel_report import check
from wsbcn.tools.static_compile import access_widths, ctas_per_sm, loop_bodies, ptxas_resources


@pytest.mark.parametrize("registers,shared,warps,expected", [
    # 64 regs x 32 = 2048 per warp -> 32 warps -> 8 CTAs of 4 warps
    (64, 0, 4, (8, "registers")),
    # 65 regs round up to 72 per thread (256 per warp): 2304 per warp -> 28 warps -> 7 CTAs
    (65, 0, 4, (7, "registers")),
    # 96 regs, 8 warps: 3072 per warp -> 21 warps -> 2 CTAs
    (96, 8192, 8, (2, "registers")),
    # 32 regs, 4 warps: registers allow 16 CTAs, 2048 threads allow 16: threads first in the table
    (32, 0, 4, (16, "threads")),
    # 100 KB of shared memory + 1 KB reserved: 233472 // 103424 = 2
    (32, 100 * 1024, 4, (2, "shared")),
    # 1 warp of 16 registers: the 32-CTA limit
    (16, 0, 1, (32, "ctas")),
])
def test_ctas_per_sm_follows_the_h100_occupancy_rules(registers, shared, warps, expected):
    assert ctas_per_sm(registers, shared, warps) == expected


PTX = """
\tld.param.b64 \t%rd1, [k_param_0];
\t@%p1 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];
$L__BB0_1:
\t@%p2 ld.global.L1::evict_last.b16 { %rs1 }, [ %rd2 + 0 ];
$L__BB0_2:
\tld.global.v2.b32 { %r5, %r6 }, [ %rd3 + 0 ];
\tst.global.v4.b32 [ %rd4 + 0 ], { %r1, %r2, %r3, %r4 };
\t@%p3 bra \t$L__BB0_2;
\tst.global.b32 [ %rd5 + 0 ], { %r7 };
\t@%p4 bra \t$L__BB0_1;
\tcp.async.cg.shared.global [ %r8 + 0 ], [ %rd6 + 0 ], 0x10, %r9;
"""


def test_access_widths_count_bytes_per_instruction():
    assert access_widths(PTX) == {"ld": {16: 1, 2: 1, 8: 1}, "st": {16: 1, 4: 1}}


def test_loop_bodies_keep_only_the_innermost_loop():
    assert access_widths(loop_bodies(PTX)) == {"ld": {8: 1}, "st": {16: 1}}
    assert loop_bodies("ld.global.b32 { %r1 }, [ %rd1 + 0 ];") == "ld.global.b32 { %r1 }, [ %rd1 + 0 ];"


def test_ptxas_resources_reads_the_verbose_log():
    log = ("ptxas info    : Function properties for k\n"
           "    24 bytes stack frame, 16 bytes spill stores, 12 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 24 bytes cumulative stack size\n")
    assert ptxas_resources(log) == {"registers": 255, "spill_store_bytes": 16, "spill_load_bytes": 12,
                                    "stack_bytes": 24}
    with pytest.raises(RuntimeError, match="no resource usage"):
        ptxas_resources("ptxas fatal")


def test_check_names_spills_and_slow_compiles():
    row = dict(op="bcn", dtype="bfloat16", layout="channels_last", n=32.0, shape="256x56x56", constexprs="BLOCK_J=16",
               num_warps=4, kernel="_norm_combine_kernel", spill_store_bytes=0, spill_load_bytes=0, compile_s=1.0,
               spec_id=0)
    frame = pd.DataFrame([row, dict(row, spill_store_bytes=264, spill_load_bytes=264, spec_id=1), dict(row, compile_s=31.0, spec_id=2)])
    problems = check(frame, 30.0)
    assert len(problems) == 2
    assert "spills 264 B" in problems[0] and "n=32 256x56x56" in problems[0]
    assert "31.0 s" in problems[1]


def test_ci_suite_compiles_for_sm90_without_spills_or_slow_compiles(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "WSBCN_BACKEND")}
    csv, png = tmp_path / "kernels.csv", tmp_path / "kernels.png"
    out = subprocess.run([sys.executable, "-m", "wsbcn.tools.kernel_report", "--suite", "ci", "--check", "--quiet",
                          "--out", str(csv), "--plot", str(png)], capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    frame = pd.read_csv(csv)
    assert set(frame.kernel) == {"_norm_stats_kernel", "_norm_combine_kernel", "_norm_apply_kernel",
                                 "_norm_bwd_reduce_kernel", "_norm_bwd_combine_kernel", "_norm_bwd_apply_kernel",
                                 "_ws_fwd_kernel", "_ws_bwd_kernel"}
    # 3 launches each way per BCN/GN case, one per WS case
    norm = frame[frame.op != "ws"]
    assert (norm.groupby(["op", "dtype", "layout", "n", "shape", "pass"]).size() == 3).all()
    assert (frame[frame.op == "ws"].groupby(["dtype", "layout", "shape", "pass"]).size() == 1).all()
    assert (frame.registers > 0).all() and (frame.spill_store_bytes == 0).all()
    assert png.stat().st_size > 10_000
