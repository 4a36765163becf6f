"""BCN's host time across processes (wsbcn/tools/dist_bench.py): 2 gloo ranks over the
stub CUDA driver.

The benchmark must run where TRITON_INTERPRET is unset, which this test process is
not (conftest), so it runs in a subprocess, which spawns the ranks. One small shape,
one round of one call: the rows, their launch counts (the benchmark itself checks
each call's launches against its floor's over the stub) and that every ratio is a
positive number. No timing is asserted. NCCL on 2 GPUs: tests/gpu/test_dist_bench.py.
"""
import math
import os
import subprocess
import sys

import pandas as pd
import pytest

from wsbcn import backends
from wsbcn.tools import dist_bench, stub_driver

SHAPE, N = (64, 8, 8), 2  # test_host_bench's shape: its kernels may already be compiled
MODES = ("fwd", "fwdbwd")
# launches of one call (forward, forward + backward): across processes
# (DistNormPlan) and in one process (NormPlan)
LAUNCHES = {("wsbcn", "bcn"): (5, 9), ("wsbcn", "bcn_estimate"): (5, 8),
            ("wsbcn_single", "bcn"): (3, 6), ("wsbcn_single", "bcn_estimate"): (3, 6)}


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "WSBCN_BACKEND")}
    env.update(extra)
    return env


# slow: two ranks compiling their kernels for sm_90 (15-35 s); CI's slow pass runs it
@pytest.mark.slow
def test_two_gloo_ranks_over_the_stub_driver(tmp_path):
    c, h, w = SHAPE
    done = subprocess.run(
        [sys.executable, "-m", "wsbcn.tools.dist_bench", "--driver", "stub", "--world-size", "2",
         "--shapes", f"{c}x{h}x{w}", "--batch-sizes", str(N), "--modes", *MODES, "--rounds", "1", "--calls", "1",
         "--warmup", "1", "--out", str(tmp_path / "results")],
        env=_env(WSBCN_CACHE_DIR=str(tmp_path / "cache")), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "8 distributed host-time rows" in done.stdout

    rows = pd.read_csv(tmp_path / "results" / "cpu" / "bench.csv", dtype={"spatial": str})
    assert len(rows) == 8
    assert set(rows.variant) == {"host_dist2"} and set(rows.provider) == {"wsbcn", "wsbcn_single"}
    assert set(rows.device) == {f"cpu (stub driver, emulating {stub_driver.GPU_NAME})"}
    assert set(rows.N) == {N} and set(rows.C) == {c} and set(rows.spatial) == {f"{h}x{w}"}
    assert set(rows.dtype) == {"bfloat16"} and set(rows.layout) == {"contiguous"}
    assert sorted(zip(rows.provider, rows.op, rows["mode"])) == sorted(
        (p, op, m) for p, op in LAUNCHES for m in MODES)
    for row in rows.itertuples():
        assert row.launches == LAUNCHES[row.provider, row.op][MODES.index(row.mode)], row
    for column in ("ms_p50", "ms_p20", "ms_p80", "floor_ms_p50", "ratio_to_floor"):
        assert all(math.isfinite(v) and v > 0 for v in rows[column]), column
    assert (rows.ratio_to_floor - rows.ms_p50 / rows.floor_ms_p50).abs().max() < 1e-9
    # the cost of the process group: each distributed row against the single-process call
    both = rows.pivot_table(index=["op", "mode"], columns="provider", values="ms_p50")
    to_single = both["wsbcn"] / both["wsbcn_single"]
    assert len(to_single) == 4 and all(math.isfinite(v) and v > 0 for v in to_single)


def test_bad_options_are_refused_before_anything_runs(tmp_path):
    # this process runs with TRITON_INTERPRET=1 (conftest)
    before = backends.emulated_gpu()
    run = dist_bench.run_dist_bench
    with pytest.raises(ValueError, match="world_size must be an int >= 2"):
        run(world_size=1, out_dir=tmp_path)
    with pytest.raises(ValueError, match="BCN only.*'gn'"):
        run(ops=["gn"], out_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown mode"):
        run(modes=["sideways"], out_dir=tmp_path)
    with pytest.raises(ValueError, match="rounds must be a positive int"):
        run(rounds=0, out_dir=tmp_path)
    with pytest.raises(ValueError, match=r"batch sizes \(per rank\)"):
        run(batch_sizes=[0], out_dir=tmp_path)
    with pytest.raises(ValueError, match="clock"):
        run(clock="sundial", out_dir=tmp_path)
    with pytest.raises(ValueError, match="bad shape '256x14'"):
        run(shapes=["256x14"], out_dir=tmp_path)
    with pytest.raises(ValueError, match="48 channels"):
        run(shapes=["48x4x4"], out_dir=tmp_path)
    import torch

    if torch.cuda.device_count() < 2:
        with pytest.raises(ValueError, match="needs (a CUDA device|2 CUDA devices)"):
            run(driver="cuda", out_dir=tmp_path)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        run(shapes=["64x8x8"], driver="stub", out_dir=tmp_path)
    assert backends.emulated_gpu() == before
    assert not any(tmp_path.iterdir())


def test_variant_names_the_world_size():
    assert dist_bench.variant_name(2) == "host_dist2" and dist_bench.variant_name(8) == "host_dist8"
