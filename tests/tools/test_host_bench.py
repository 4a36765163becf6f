"""The host-time benchmark (wsbcn/tools/host_bench.py) over the stub CUDA driver.

The benchmark must run where TRITON_INTERPRET is unset, which this test process is
not (conftest), so it runs in a subprocess. Its launch counts (the stub's
cuLaunchKernelEx counter) are checked against an independent count: the
`kernel[grid](...)` launches the same calls make through the Triton interpreter,
counted at triton's entry point in a second subprocess. The benchmark itself checks
that each case's floor makes the launches the call makes (over the stub). No timing
is asserted.
"""
import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from wsbcn import backends
from wsbcn.tools import host_bench, stub_driver
from wsbcn.tools.bench import OPS

NORM_SHAPE, N, WEIGHT = (64, 8, 8), 2, (64, 64, 3, 3)  # small: quick compiles, quick interpreter runs
MODES = ("fwd", "fwdbwd")

# Counts the kernel launches of one call of each (op, mode), with every kernel run
# by the interpreter on CPU tensors that take the emulated GPU's path (its plans).
COUNT_LAUNCHES = r"""
import json, sys
import torch
from triton.runtime.interpreter import InterpretedFunction
from wsbcn import backends
from wsbcn.tools import stub_driver
from wsbcn.tools.bench import NormInputs, norm_fn, timed_callable, ws_fn

launches = [0]
interpreted_run = InterpretedFunction.run

def counting_run(self, *args, warmup, **kwargs):  # what kernel[grid](...) calls
    launches[0] += not warmup
    return interpreted_run(self, *args, warmup=warmup, **kwargs)

InterpretedFunction.run = counting_run
backends.emulate_gpu(stub_driver.GPU_NAME, stub_driver.SM_COUNT)
(c, h, w), n, weight, modes = json.loads(sys.argv[1])
counts = {}
for op in ("ws", "bcn", "bcn_estimate", "gn"):
    if op == "ws":
        forward, leaves = ws_fn("wsbcn", torch.randn(weight, requires_grad=True))
    else:
        inputs = NormInputs(n, c, h, w, torch.bfloat16, "contiguous", "cpu", 32)
        forward, leaves = norm_fn(op, "wsbcn", inputs)
    for mode in modes:
        fn = timed_callable(forward, leaves, mode)
        before = launches[0]
        fn()
        counts[op + " " + mode] = launches[0] - before
print(json.dumps(counts))
"""


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "WSBCN_BACKEND")}
    env.update(extra)
    return env


def _run(args, env, cwd):
    done = subprocess.run([sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


# slow: ~40 s, mostly cold sm_90 compiles of every kernel the four ops launch; CI's slow pass runs it
@pytest.mark.slow
def test_host_bench_rows_over_the_stub_driver(tmp_path):
    cache = tmp_path / "wsbcn_cache"
    c, h, w = NORM_SHAPE
    _run(["-m", "wsbcn.tools.host_bench", "--driver", "stub", "--shapes", f"{c}x{h}x{w}",
          "--weights", "x".join(map(str, WEIGHT)), "--batch-sizes", str(N), "--modes", *MODES, "--quick",
          "--out", str(tmp_path / "results")], _env(WSBCN_CACHE_DIR=str(cache)), tmp_path)
    expected = json.loads(_run(["-c", COUNT_LAUNCHES, json.dumps([NORM_SHAPE, N, WEIGHT, MODES])],
                               _env(TRITON_INTERPRET="1"), tmp_path).strip().splitlines()[-1])

    rows = pd.read_csv(tmp_path / "results" / "cpu" / "bench.csv", dtype={"spatial": str})
    assert sorted(zip(rows.op, rows["mode"])) == sorted((op, m) for op in OPS for m in MODES)
    assert set(rows.variant) == {"host"} and set(rows.provider) == {"wsbcn"}
    assert set(rows.device) == {f"cpu (stub driver, emulating {stub_driver.GPU_NAME})"}
    norms = rows[rows.op != "ws"]
    assert set(norms.N) == {N} and set(norms.C) == {c} and set(norms.spatial) == {f"{h}x{w}"}
    assert set(norms.dtype) == {"bfloat16"}
    ws = rows[rows.op == "ws"]
    assert set(ws.C) == {WEIGHT[0]} and set(ws.spatial) == {"x".join(map(str, WEIGHT[1:]))}
    assert (rows.ms_p50 > 0).all()
    assert (rows.ms_p20 <= rows.ms_p50).all() and (rows.ms_p50 <= rows.ms_p80).all()
    # every row carries its floor, timed in the same run, and the ratio to it
    assert (rows.floor_ms_p50 > 0).all()
    assert (rows.ratio_to_floor - rows.ms_p50 / rows.floor_ms_p50).abs().max() < 1e-9
    for row in rows.itertuples():
        assert row.launches == expected[f"{row.op} {row.mode}"], (row.op, row.mode, expected)
    assert all(count > 0 for count in expected.values())
    # the stub was built into the wsbcn user cache given, not next to the package
    assert list(cache.glob("stub_driver/*/libcuda.so.1"))


def test_host_bench_refuses_the_interpreter(tmp_path):
    done = subprocess.run([sys.executable, "-m", "wsbcn.tools.host_bench", "--quick", "--out", str(tmp_path)],
                          env=_env(TRITON_INTERPRET="1"), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "TRITON_INTERPRET" in done.stderr
    assert not any(tmp_path.iterdir())  # nothing written


def test_bad_arguments_and_the_interpreter_are_refused_before_anything_runs(tmp_path):
    # this process runs with TRITON_INTERPRET=1 (conftest), on any machine
    assert backends.interpreter_enabled()
    before = backends.emulated_gpu()
    with pytest.raises(ValueError, match="bad shape '256x14'"):
        host_bench.run_host_bench(shapes=["256x14"], out_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown op"):
        host_bench.run_host_bench(ops=["bn"], out_dir=tmp_path)
    with pytest.raises(ValueError, match="rounds"):
        host_bench.run_host_bench(rounds=0, out_dir=tmp_path)
    with pytest.raises(ValueError, match="clock"):
        host_bench.run_host_bench(clock="sundial", out_dir=tmp_path)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        host_bench.run_host_bench(shapes=["256x14x14"], ops=["gn"], driver="stub", out_dir=tmp_path)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        stub_driver.install()
    assert not stub_driver.installed()
    assert backends.emulated_gpu() == before
    assert not any(tmp_path.iterdir())


def test_stub_build_names_a_missing_compiler(tmp_path, monkeypatch):
    monkeypatch.setenv("WSBCN_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "no-such-c-compiler-for-wsbcn")
    with pytest.raises(RuntimeError, match="no-such-c-compiler-for-wsbcn.*not found"):
        stub_driver.build()
    assert not list(tmp_path.glob("stub_driver/*/libcuda.so.1"))
