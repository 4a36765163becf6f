"""``wsbcn bench --e2e``: one ResNet-50 training step (forward, backward, SGD) per
variant, in images/s and peak memory, for the two kinds of users we serve:

classification  the whole network at 224^2, cross-entropy on the logits;
                rows: suite "e2e", op "resnet50_step"
detection       the trunk (stem to layer4, no avgpool/fc) at 800 x 1216, the
                short side 800 of detectors' training images, N = 2 per GPU
                (N = 1 and 2 with ``wsbcn bench --full``); the loss is the mean
                square of layer4's features, standing in for the FPN and heads;
                rows: suite "e2e_detection", op "resnet50_trunk_step"

Each runs eager and CUDA-graphed ("variant" column: eager | cudagraph), except that
by default the detection case runs eagerly only (CUDA-graphed too with --full). On request
(``with_compiled``: ``wsbcn bench --full`` on a GPU, or ``--e2e-compile``) both cases
add ``torch.compile`` (default mode) of plain_bn and wsbcn_ws_bcn (variant
"compiled"): a cold compile of the network, forward and backward, per variant and
batch size, which the default run leaves out to stay within a few minutes.
GPU: bf16 autocast, channels_last.
CPU: a reduced run (smaller inputs of the same aspect ratio, fp32, eager) that
proves the steps work and keeps ``wsbcn bench --e2e`` short.
"""
import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from . import info
from .models import VARIANTS, resnet50

CASES = ("classification", "detection")
COMPILED_VARIANTS = ("plain_bn", "wsbcn_ws_bcn")  # the variants also timed under torch.compile
DETECTION_SIZE_GPU = (800, 1216)
DETECTION_SIZE_CPU = (128, 192)  # the same 800:1216 aspect ratio, ~40x fewer pixels
# The detection case of the default GPU run: N = 2, eager steps (a detector's training
# loop runs eagerly unless it captures graphs). `wsbcn bench --full` adds N = 1 and the
# CUDA-graphed steps: each new batch size is another set of cold kernel compiles, and
# each mode 4 more runs per batch size.
DETECTION_BATCH_SIZES_GPU = (2,)
FULL_DETECTION_BATCH_SIZES_GPU = (1, 2)
GRAPH_MODES = ("eager", "cudagraph")
DETECTION_GRAPH_MODES_GPU = ("eager",)


@dataclass(frozen=True)
class Case:
    """One end-to-end workload: which model, on which input, with which loss."""

    name: str          # "classification" or "detection"
    suite: str         # the CSV's suite and op columns
    op: str
    height: int
    width: int
    batch_sizes: tuple
    num_classes: object  # None: the trunk alone (detection)

    @property
    def spatial(self) -> str:
        return f"{self.height}x{self.width}"


def default_cases(on_gpu, cases=CASES, batch_sizes=None, image_size=None, detection_batch_sizes=None,
                  detection_size=None, num_classes=1000):
    """The Case objects of ``cases``, with the GPU or the reduced CPU defaults."""
    unknown = set(cases) - set(CASES)
    if unknown:
        raise ValueError(f"cases must be among {CASES}, got {sorted(unknown)}")
    out = []
    if "classification" in cases:
        size = image_size or (224 if on_gpu else 64)
        out.append(Case("classification", "e2e", "resnet50_step", size, size,
                        tuple(batch_sizes or ((2, 32) if on_gpu else (2,))), num_classes))
    if "detection" in cases:
        h, w = detection_size or (DETECTION_SIZE_GPU if on_gpu else DETECTION_SIZE_CPU)
        out.append(Case("detection", "e2e_detection", "resnet50_trunk_step", h, w,
                        tuple(detection_batch_sizes or (DETECTION_BATCH_SIZES_GPU if on_gpu else (1,))), None))
    return out


def _loss(case, out, target):
    if case.num_classes is None:
        # Trunk: a simple reduction of the (N, 2048, H/32, W/32) features in fp32;
        # the square gives every feature a gradient, as a detector's heads would.
        return out.float().square().mean()
    return F.cross_entropy(out, target)


def _step_fn(case, model, opt, x, target, autocast_dtype):
    def step():
        with torch.autocast(x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = _loss(case, model(x), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
        return loss

    return step


def compile_model(model):
    """torch.compile in its default mode; static shapes, as each case has one size."""
    return torch.compile(model, dynamic=False)


def case_graph_modes(case, on_gpu, graph_modes=None) -> tuple:
    """The graph modes a case runs in: ``graph_modes`` when given; else on a GPU
    eager and cudagraph for classification, DETECTION_GRAPH_MODES_GPU for detection;
    eager on CPU."""
    if graph_modes:
        return tuple(graph_modes)
    if not on_gpu:
        return ("eager",)
    return DETECTION_GRAPH_MODES_GPU if case.name == "detection" else GRAPH_MODES


def _runs(case, variants, graph_modes, with_compiled):
    """(variant, execution mode) pairs of one case: every variant in every graph
    mode, then the compiled ones."""
    runs = [(v, m) for v in variants for m in graph_modes]
    if with_compiled:
        runs += [(v, "compiled") for v in variants if v in COMPILED_VARIANTS]
    return runs


def run_e2e(batch_sizes=None, image_size=None, variants=VARIANTS, graph_modes=None, timer=None, log=print,
            num_classes=1000, cases=CASES, detection_batch_sizes=None, detection_size=None, with_compiled=False,
            compile_fn=compile_model):
    """A DataFrame with bench.COLUMNS: one row per case, variant, batch size and
    execution mode (eager, cudagraph on GPU, compiled). ``graph_modes``: those of
    every case (default: ``case_graph_modes``).

    ``batch_sizes``/``image_size`` set the classification case, ``detection_batch_sizes``
    and ``detection_size`` (height, width) the detection case. ``with_compiled``:
    also time torch.compile of COMPILED_VARIANTS in each case (default: no;
    ``wsbcn bench`` asks for it with --full on a GPU, or with --e2e-compile; a CPU
    compile of ResNet-50 takes minutes). ``compile_fn`` is how a model gets compiled
    (tests pass a cheaper backend).
    """
    from .results import COLUMNS
    from .timing import cpu_timer, cuda_graphed, default_timer

    import pandas as pd

    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise ValueError(f"variants must be among {VARIANTS}, got {sorted(unknown)}")
    graph_modes = tuple(graph_modes or ())
    if "cudagraph" in graph_modes and not on_gpu:
        raise ValueError("graph mode 'cudagraph' needs a CUDA device")
    if set(graph_modes) - set(GRAPH_MODES):
        raise ValueError(f"graph_modes must be among {GRAPH_MODES}, got {graph_modes}")
    with_compiled = bool(with_compiled)
    todo = default_cases(on_gpu, cases, batch_sizes, image_size, detection_batch_sizes, detection_size, num_classes)
    # CPU: three timed steps after the warm-up keep the whole e2e part short.
    timer = timer or (default_timer() if on_gpu else partial(cpu_timer, reps=3, min_seconds=0))
    autocast_dtype = torch.bfloat16 if on_gpu else None
    layout = "channels_last" if on_gpu else "contiguous"
    if not on_gpu:
        log("no CUDA device: end-to-end steps on CPU at " + ", ".join(f"{c.spatial} ({c.name})" for c in todo)
            + ", fp32, eager" + (" and compiled" if with_compiled else "") + "; GPU figures need a GPU")
    meta = info.run_metadata()
    rows = []
    for case in todo:
        for variant, mode in _runs(case, variants, case_graph_modes(case, on_gpu, graph_modes), with_compiled):
            for n in case.batch_sizes:
                torch.manual_seed(0)
                model = resnet50(variant, num_classes=case.num_classes).to(device)
                x = torch.randn(n, 3, case.height, case.width, device=device)
                if layout == "channels_last":
                    model = model.to(memory_format=torch.channels_last)
                    x = x.to(memory_format=torch.channels_last)
                target = torch.randint(0, case.num_classes or 1, (n,), device=device)
                opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
                step = _step_fn(case, compile_fn(model) if mode == "compiled" else model, opt, x, target,
                                autocast_dtype)
                if mode == "compiled":
                    step()  # compile forward and backward here, not inside the timer's warm-up
                fn = cuda_graphed(step) if mode == "cudagraph" else step
                if on_gpu:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                p50, p20, p80 = timer(fn)
                peak = torch.cuda.max_memory_allocated() / 2**20 if on_gpu else math.nan
                rows.append(dict(
                    suite=case.suite, op=case.op, provider=variant, variant=mode, mode="fwdbwd",
                    dtype="bf16_autocast" if autocast_dtype else "float32", layout=layout, N=n, C=math.nan,
                    spatial=case.spatial, ms_p50=p50, ms_p20=p20, ms_p80=p80, gbps=math.nan,
                    pct_copy_bw=math.nan, peak_mem_mb=peak, launches=math.nan, images_per_s=n / (p50 * 1e-3),
                    **meta))
                log(f"{case.name:>14} {case.spatial:>9} {variant:>18} N={n:<3} {mode:<9} "
                    f"{n / (p50 * 1e-3):9.1f} images/s")
                del model, opt, fn, step
                if mode == "compiled":
                    torch._dynamo.reset()  # drop the compiled graphs and the memory they hold
    return pd.DataFrame(rows, columns=COLUMNS)
