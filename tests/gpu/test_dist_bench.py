"""``wsbcn bench --distributed`` on 2 GPUs: NCCL, one GPU per rank, the real driver
(the same benchmark over the stub driver with gloo: tests/tools/test_dist_bench.py).
Rows and positive ratios only; no timing is asserted."""
import math
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (one per rank)")]


def test_two_nccl_ranks_time_the_distributed_call(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "WSBCN_BACKEND")}
    done = subprocess.run(
        [sys.executable, "-m", "wsbcn.tools.dist_bench", "--driver", "cuda", "--world-size", "2",
         "--shapes", "256x14x14", "--batch-sizes", "2", "--quick", "--out", str(tmp_path)],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    (csv,) = tmp_path.glob("*/bench.csv")
    rows = pd.read_csv(csv, dtype={"spatial": str})
    assert len(rows) == 8 and set(rows.variant) == {"host_dist2"}
    assert set(rows.provider) == {"wsbcn", "wsbcn_single"}
    for column in ("ms_p50", "floor_ms_p50", "ratio_to_floor"):
        assert all(math.isfinite(v) and v > 0 for v in rows[column]), column
    # the profiler counts the collectives' kernels too: at least DistNormPlan's 5 (+ 4) launches
    across = rows[rows.provider == "wsbcn"]
    assert (across[across["mode"] == "fwd"].launches >= 5).all()
