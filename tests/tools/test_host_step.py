"""perf/wsbcn_dev/host_step.py: a ResNet training step's host time over the stub driver.

The tool must run where TRITON_INTERPRET is unset, which this test process is not
(conftest), so it runs in a subprocess, on a small ResNet (one block per stage: 17
convs and 17 norms), 3 rounds of 2 steps. Checked: the result's structure, the
launches per step the stub counted against the layers' (the tool also exits 1 on a
mismatch), and that the derived figures are finite and positive (medians of 3 rounds:
the floor's and wsbcn's layers add ~2 and ~5 ms to a ~7 ms step; WS alone only
finite: its differences to base, even the floor's, can fall within the noise of 3
rounds). No timing is asserted. Slow: with a cold triton cache it compiles some 60 kernels for sm_90
(~40 s of CPU); warm, it takes a few seconds.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[2] / "perf" / "wsbcn_dev" / "host_step.py"
MODELS = ("base", "floor", "wsbcn_ws_bcn", "wsbcn_ws_bcn_modelws", "ws_floor", "wsbcn_ws", "wsbcn_ws_modelws",
          "ws_node_floor")


@pytest.mark.slow
def test_host_step_over_the_stub_driver(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "WSBCN_BACKEND")}
    out = tmp_path / "result.json"
    done = subprocess.run([sys.executable, str(TOOL), "--layers", "1", "1", "1", "1", "--rounds", "3", "--calls", "2",
                           "--warmup", "2", "--json", str(out)], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(out.read_text())
    n = result["layer_count"]
    assert n == 1 + 3 * 4 + 4  # the stem, 3 per block, 4 downsamples
    assert tuple(result["models"]) == MODELS
    conv = n * (1 + 2)  # the stub convs: 1 launch forward, 2 backward
    expected = {"base": conv, "floor": conv + n * (1 + 1) + n * (3 + 3),
                "wsbcn_ws_bcn": conv + n * (1 + 1) + n * (3 + 3), "wsbcn_ws_bcn_modelws": conv + 2 + n * (3 + 3),
                "ws_floor": conv + n * (1 + 1), "wsbcn_ws": conv + n * (1 + 1), "wsbcn_ws_modelws": conv + 2,
                "ws_node_floor": conv + 2}
    for name, row in result["models"].items():
        assert row["launches"] == row["expected_launches"] == expected[name], name
        assert math.isfinite(row["step_ms"]) and row["step_ms"] > 0
    floor_per_layer = None
    for name in MODELS[2:4]:
        row = result["models"][name]
        for key in ("per_layer_us", "floor_per_layer_us", "ratio_to_floor", "step_ratio_to_floor"):
            assert math.isfinite(row[key]) and row[key] > 0, (name, key, row[key])
        assert floor_per_layer in (None, row["floor_per_layer_us"])
        floor_per_layer = row["floor_per_layer_us"]
    ws_floor = None  # WS alone: differences to base, which 3 rounds of a small model may not resolve
    for name in MODELS[5:]:
        row = result["models"][name]
        assert math.isfinite(row["ws_us"]) and math.isfinite(row["ws_floor_us"]), name
        assert ws_floor in (None, row["ws_floor_us"])  # one floor for the three
        ws_floor = row["ws_floor_us"]
        if ws_floor > 0:
            assert math.isclose(row["ws_floors"], row["ws_us"] / ws_floor), name
        else:
            assert math.isnan(row["ws_floors"]), name
    for name in MODELS:
        assert any(line.startswith(name + " ") for line in done.stdout.splitlines()), done.stdout
