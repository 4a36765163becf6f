"""The autotuning sweep (wsbcn/tools/autotune.py) on CPU with an injected timer
(Triton kernels through the interpreter): its CSV, its cache, and how it picks."""
import json

import pandas as pd

from wsbcn import tuning
from wsbcn.tools import autotune
from .test_bench import CountingTimer  # runs each callable for real, reports a fixed time


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
    tuning.forget_loaded_tables()


def test_pick_winners_prefers_fastest_relative_config():
    rows = []
    for shape, times in (((1, 8, 16), {"a": 2.0, "b": 1.0}), ((2, 8, 16), {"a": 1.0, "b": 1.5})):
        for cfg, ms in times.items():
            rows.append(dict(key="k", config=json.dumps({"name": cfg}), N=shape[0], C=shape[1], spatial=shape[2],
                             ms_p50=ms))
    # a: relative (2.0, 1.0) mean 1.5; b: (1.0, 1.5) mean 1.25 -> b
    assert autotune.pick_winners(pd.DataFrame(rows)) == {"k": {"name": "b"}}
