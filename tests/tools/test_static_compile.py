"""The static-compile harness (perf/wsbcn_dev/static_compile.py, reached as
wsbcn.tools.static_compile in a checkout): its occupancy model against the CUDA
occupancy rules worked by hand, and its PTX and ptxas readers on listings written
out here."""
import pytest

from wsbcn.tools import static_compile

access_widths, ctas_per_sm = static_compile.access_widths, static_compile.ctas_per_sm
loop_bodies, ptxas_resources = static_compile.loop_bodies, static_compile.ptxas_resources


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
    assert access_widths(PTX) == {"ld": {16: 1, 2: 1, 8: 1}, "st": {16: 1, 4: 1}, "cp": {16: 1}}
    assert access_widths("cp.async.ca.shared.global [ %r1 + 0 ], [ %rd2 + 0 ], 4, %r3;")["cp"] == {4: 1}


def test_loop_bodies_keep_only_the_innermost_loop():
    assert access_widths(loop_bodies(PTX)) == {"ld": {8: 1}, "st": {16: 1}, "cp": {}}
    assert loop_bodies("ld.global.b32 { %r1 }, [ %rd1 + 0 ];") == "ld.global.b32 { %r1 }, [ %rd1 + 0 ];"


def test_ptxas_resources_reads_the_verbose_log():
    log = ("ptxas info    : Function properties for k\n"
           "    24 bytes stack frame, 16 bytes spill stores, 12 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 24 bytes cumulative stack size\n")
    assert ptxas_resources(log) == {"registers": 255, "spill_store_bytes": 16, "spill_load_bytes": 12,
                                    "stack_bytes": 24}
    with pytest.raises(RuntimeError, match="no resource usage"):
        ptxas_resources("ptxas fatal")
