"""Every kernel specialisation compiles for Hopper (sm_90) down to cubin, checked
without a GPU by tests/aot_compile.py in a process of its own (the
interpreter that the other CPU tests use never runs the real compiler)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parent / "aot_compile.py"


# every specialisation through ptxas (the int64-offset LARGE variants of the bf16 ones): 334
# of them; 418 with fp32's LARGE variants too took 219 s alone with a cold triton cache (d085521)
@pytest.mark.slow
def test_all_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(TOOL), "90"], capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    compiled = [line for line in out.stdout.splitlines() if line.startswith("sm_90 ok ")]
    kernels = {line.split()[2].split("(")[0] for line in compiled}
    assert kernels == {"_norm_stats_kernel", "_norm_combine_kernel", "_norm_apply_kernel", "_norm_bwd_reduce_kernel",
                       "_norm_bwd_combine_kernel", "_norm_bwd_apply_kernel", "_ws_fwd_kernel", "_ws_bwd_kernel"}
    assert any("LARGE=True" in line for line in compiled)
    # the loops over S at every pipelining depth autotune tries
    stages = {re.search(r"NUM_STAGES=(\d+)", line).group(1) for line in compiled if "_norm_stats_kernel(" in line}
    assert stages >= {"1", "2", "3"}
