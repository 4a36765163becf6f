"""The end-to-end benchmark (``wsbcn bench --e2e``, wsbcn/tools/e2e.py): its rows,
and which runs it makes by default and on request (the networks it times:
test_models.py)."""
import math
import time

import pytest
import torch

from wsbcn.tools import e2e
from wsbcn.tools.bench import COLUMNS
from wsbcn.tools.models import VARIANTS
from .test_bench import CountingTimer  # runs each callable for real, reports a fixed time

MODES = ["eager", "cudagraph"] if torch.cuda.is_available() else ["eager"]
QUIET = dict(log=lambda *a: None)


@pytest.fixture(autouse=True)
def one_cpu_thread():
    """One torch thread, as `wsbcn bench` uses on CPU: on 2 cores shared with other
    processes, 2 threads made a ResNet-50 step ~20x slower (spinning at barriers)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def one_step_timer(fn):
    """The wall-clock time of one real step (ms), as (p50, p20, p80)."""
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    ms = (time.perf_counter() - start) * 1e3
    return ms, ms, ms


def test_classification_step_runs_every_variant():
    # Moved from test_cli_and_harness.py (test_e2e_step_runs_every_variant), narrowed to its case.
    frame = e2e.run_e2e(batch_sizes=(2,), image_size=32, timer=CountingTimer(), num_classes=10,
                        cases=("classification",), **QUIET)
    assert list(zip(frame["provider"], frame["variant"])) == [(v, m) for v in VARIANTS for m in MODES]
    assert (frame["op"] == "resnet50_step").all() and (frame["suite"] == "e2e").all()
    assert (frame["images_per_s"] > 0).all()


def test_detection_case_has_a_measured_row_per_provider_mode_and_batch_size():
    frame = e2e.run_e2e(cases=("detection",), detection_size=(32, 48), detection_batch_sizes=(1, 2),
                        graph_modes=MODES, timer=one_step_timer, with_compiled=False, **QUIET)
    assert list(frame.columns) == COLUMNS
    expected = [(v, m, n) for v in VARIANTS for m in MODES for n in (1, 2)]
    assert list(zip(frame["provider"], frame["variant"], frame["N"])) == expected
    assert (frame["suite"] == "e2e_detection").all() and (frame["op"] == "resnet50_trunk_step").all()
    assert (frame["spatial"] == "32x48").all() and (frame["mode"] == "fwdbwd").all()
    assert frame["dtype"].isin(["float32", "bf16_autocast"]).all()
    assert frame["layout"].isin(["contiguous", "channels_last"]).all()
    for column in ("ms_p50", "ms_p20", "ms_p80", "images_per_s"):
        assert frame[column].map(lambda v: math.isfinite(v) and v > 0).all(), column
    assert (frame["ms_p20"] <= frame["ms_p80"]).all()
    # images/s is N over the median step time
    assert ((frame["images_per_s"] * frame["ms_p50"] * 1e-3 - frame["N"]).abs() < 1e-9).all()
    for column in ("device", "torch", "commit", "timestamp"):
        assert frame[column].astype(str).str.len().gt(0).all(), column


def test_default_runs_compile_nothing_and_detection_runs_less_than_classification_on_gpu():
    # what run_e2e does by default on a GPU (no GPU needed to ask): nothing compiled;
    # the detection trunk, 20x the pixels, at fewer batch sizes and in fewer graph
    # modes than classification; --full's detection batch sizes hold the default's
    import inspect

    assert inspect.signature(e2e.run_e2e).parameters["with_compiled"].default is False
    cases = {c.name: c for c in e2e.default_cases(True)}
    cls, det = cases["classification"], cases["detection"]
    assert len(det.batch_sizes) < len(cls.batch_sizes) and set(det.batch_sizes) <= set(cls.batch_sizes)
    assert e2e.case_graph_modes(cls, True) == e2e.GRAPH_MODES
    assert set(e2e.case_graph_modes(det, True)) < set(e2e.GRAPH_MODES)
    assert e2e.case_graph_modes(det, False) == ("eager",)  # CPU: eager only
    assert e2e.case_graph_modes(det, True, e2e.GRAPH_MODES) == e2e.GRAPH_MODES  # asked for: given
    assert not any(m == "compiled" for _, m in e2e._runs(det, VARIANTS, ("eager",), with_compiled=False))
    compiled = [v for v, m in e2e._runs(det, VARIANTS, ("eager",), with_compiled=True) if m == "compiled"]
    assert compiled == list(e2e.COMPILED_VARIANTS)
    assert set(e2e.DETECTION_BATCH_SIZES_GPU) < set(e2e.FULL_DETECTION_BATCH_SIZES_GPU)
    full = e2e.default_cases(True, detection_batch_sizes=e2e.FULL_DETECTION_BATCH_SIZES_GPU)
    assert full[1].batch_sizes == e2e.FULL_DETECTION_BATCH_SIZES_GPU


@pytest.mark.slow  # two dynamo traces of a ResNet-50 trunk, forward and backward
def test_compiled_providers_on_request_and_off_by_default_on_cpu():
    calls = []

    def compile_fn(model):  # dynamo + AOT autograd without inductor's codegen: seconds, not minutes
        calls.append(type(model).__name__)
        return torch.compile(model, backend="aot_eager", dynamic=False)

    # wsbcn_ws_bcn's ops must trace (forward and backward); reference_ws_bcn is never compiled.
    frame = e2e.run_e2e(cases=("detection",), detection_size=(32, 48), detection_batch_sizes=(1,),
                        timer=CountingTimer(), with_compiled=True, compile_fn=compile_fn,
                        variants=("reference_ws_bcn", "wsbcn_ws_bcn"), **QUIET)
    compiled = frame[frame["variant"] == "compiled"]
    assert list(compiled["provider"]) == ["wsbcn_ws_bcn"] and calls == ["ResNet"]
    assert (compiled["images_per_s"] > 0).all()
    if not torch.cuda.is_available():
        plain = e2e.run_e2e(cases=("detection",), detection_size=(32, 48), timer=CountingTimer(),
                            variants=("plain_bn",), compile_fn=compile_fn, **QUIET)
        assert list(plain["variant"]) == ["eager"] and len(calls) == 1


def test_bad_arguments_are_rejected_before_any_step():
    with pytest.raises(ValueError, match="cases"):
        e2e.run_e2e(cases=("segmentation",), timer=CountingTimer(), **QUIET)
    with pytest.raises(ValueError, match="variants"):
        e2e.run_e2e(variants=("plain_gn",), timer=CountingTimer(), **QUIET)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cudagraph"):
            e2e.run_e2e(graph_modes=("cudagraph",), timer=CountingTimer(), **QUIET)
