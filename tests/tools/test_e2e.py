"""The end-to-end benchmark (``wsbcn bench --e2e``): its rows, and the networks it
times — the ResNet-50 trunk's output stride, and reference_ws_bcn and
wsbcn_ws_bcn computing the same function."""
import math
import time

import pytest
import torch

from conftest import TOL, rel_err
from wsbcn.tools import e2e
from wsbcn.tools.bench import COLUMNS
from wsbcn.tools.models import VARIANTS, resnet50_trunk

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


class CountingTimer:
    """Runs the step once for real and reports a fixed time."""

    def __call__(self, fn):
        fn()
        return 1.0, 0.9, 1.1


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


def test_default_runs_leave_out_the_trunk_compile_and_trim_detection_on_gpu():
    # what run_e2e does by default on a GPU (no GPU needed to ask): detection at N = 2,
    # eagerly, nothing compiled; classification eager and CUDA-graphed at N = 2 and 32
    import inspect

    assert inspect.signature(e2e.run_e2e).parameters["with_compiled"].default is False
    cases = {c.name: c for c in e2e.default_cases(True)}
    assert cases["classification"].batch_sizes == (2, 32) and cases["detection"].batch_sizes == (2,)
    assert e2e.case_graph_modes(cases["classification"], True) == ("eager", "cudagraph")
    assert e2e.case_graph_modes(cases["detection"], True) == ("eager",)
    assert e2e.case_graph_modes(cases["detection"], False) == ("eager",)
    assert e2e.case_graph_modes(cases["detection"], True, ("eager", "cudagraph")) == ("eager", "cudagraph")
    det = cases["detection"]
    assert not any(m == "compiled" for _, m in e2e._runs(det, VARIANTS, ("eager",), with_compiled=False))
    compiled = [v for v, m in e2e._runs(det, VARIANTS, ("eager",), with_compiled=True) if m == "compiled"]
    assert compiled == list(e2e.COMPILED_VARIANTS)
    # --full's detection batch sizes hold the default's
    assert set(e2e.DETECTION_BATCH_SIZES_GPU) < set(e2e.FULL_DETECTION_BATCH_SIZES_GPU)
    assert e2e.default_cases(True, detection_batch_sizes=e2e.FULL_DETECTION_BATCH_SIZES_GPU)[1].batch_sizes == (1, 2)


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


def test_trunk_has_torchvision_strides_and_no_head():
    # Shapes only, on the meta device: no memory, no arithmetic. torchvision's
    # resnet50 (and detectron's C2..C5) at 800 x 1216: strides 4, 8, 16, 32 with
    # 256, 512, 1024, 2048 channels; every stride-2 step rounds up, so 801 x 1217
    # gives ceil(801 / 32) x ceil(1217 / 32) = 26 x 39 at layer4.
    with torch.device("meta"):
        trunk = resnet50_trunk("plain_bn")
        assert not any(name.startswith(("fc", "avgpool")) for name, _ in trunk.named_modules() if name)
        shapes = {}
        for name in ("layer1", "layer2", "layer3", "layer4"):
            getattr(trunk, name).register_forward_hook(lambda m, i, o, name=name: shapes.__setitem__(name, o.shape))
        out = trunk(torch.empty(2, 3, 800, 1216))
        assert shapes == {"layer1": (2, 256, 200, 304), "layer2": (2, 512, 100, 152),
                          "layer3": (2, 1024, 50, 76), "layer4": (2, 2048, 25, 38)}
        assert out.shape == (2, 2048, 25, 38)
        assert trunk(torch.empty(1, 3, 801, 1217)).shape == (1, 2048, 26, 39)


def _randomize_norm_affines(model, gen):
    """Non-trivial BN-stage and channel-stage affines, so that a parameter landing in
    the wrong place on the other network changes the result."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("bn1.weight", "bn2.weight", "bn3.weight", "downsample.1.weight", "group_weight")):
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
            elif name.endswith(("bn1.bias", "bn2.bias", "bn3.bias", "downsample.1.bias", "group_bias")):
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))


def test_wsbcn_ws_bcn_trunk_is_the_reference_ws_bcn_trunk_in_float64():
    # reference_ws_bcn is the naive eager composition (the released WS formula, then
    # F.batch_norm over channels and over (sample, group)); wsbcn_ws_bcn must be the
    # same network: same state dict, same loss, same gradients, same running stats.
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    ref = resnet50_trunk("reference_ws_bcn")
    _randomize_norm_affines(ref, gen)
    ours = resnet50_trunk("wsbcn_ws_bcn")
    result = ours.load_state_dict(ref.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert result.missing_keys and all(k.endswith("num_batches_tracked") for k in result.missing_keys)
    ref, ours = ref.double().train(), ours.double().train()
    x = torch.randn(2, 3, 48, 72, dtype=torch.float64, generator=gen)
    losses, outs = [], []
    for model in (ref, ours):
        out = model(x)
        loss = out.square().mean()  # the detection case's loss
        loss.backward()
        losses.append(loss.item())
        outs.append(out.detach())
    assert outs[1].shape == (2, 2048, 2, 3)
    # Seen: loss 1e-15, output 2e-13, gradients < 1e-12 apart. The BN stage after
    # each conv cancels a per-channel scale, so another WS formula (biased variance,
    # eps inside the root) moves the loss by only ~1e-9 but the gradients by ~2e-7:
    # the gradients are the sharp check.
    assert abs(losses[1] - losses[0]) <= 1e-12 * abs(losses[0])
    assert rel_err(outs[1], outs[0]) < 1e-11
    ref_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        assert rel_err(p.grad, ref_params[name].grad) < TOL[torch.float64], name
    ref_buffers = dict(ref.named_buffers())
    for name, b in ours.named_buffers():
        if name.endswith(("running_mean", "running_var")):
            assert rel_err(b, ref_buffers[name]) < TOL[torch.float64], name
