"""``wsbcn bench --e2e``: one ResNet-50 training step (forward, backward, SGD) per
variant, eager and CUDA-graphed, in images/s and peak memory."""
import math

import torch
import torch.nn.functional as F

from . import info
from .models import VARIANTS, resnet50


def _step_fn(model, opt, x, target, autocast_dtype):
    def step():
        with torch.autocast(x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = F.cross_entropy(model(x), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
        return loss

    return step


def run_e2e(batch_sizes=None, image_size=None, variants=VARIANTS, graph_modes=None, timer=None, log=print,
            num_classes=1000):
    """Rows (dicts with bench.COLUMNS) for each variant, batch size and graph mode.

    GPU: 224^2, bf16 autocast, channels_last, eager and CUDA graphs.
    CPU: a reduced run (small images, fp32, eager) that proves the step works.
    """
    from .bench import COLUMNS
    from .timing import cuda_graphed, default_timer

    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    batch_sizes = batch_sizes or ((2, 32) if on_gpu else (2,))
    image_size = image_size or (224 if on_gpu else 64)
    graph_modes = graph_modes or (("eager", "cudagraph") if on_gpu else ("eager",))
    timer = timer or default_timer()
    if not on_gpu:
        log(f"no CUDA device: end-to-end step on CPU at {image_size}^2, fp32, eager only")
    autocast_dtype = torch.bfloat16 if on_gpu else None
    layout = "channels_last" if on_gpu else "contiguous"
    meta = info.run_metadata()
    rows = []
    for variant in variants:
        for n in batch_sizes:
            for graph_mode in graph_modes:
                torch.manual_seed(0)
                model = resnet50(variant, num_classes=num_classes).to(device)
                x = torch.randn(n, 3, image_size, image_size, device=device)
                if layout == "channels_last":
                    model = model.to(memory_format=torch.channels_last)
                    x = x.to(memory_format=torch.channels_last)
                target = torch.randint(0, num_classes, (n,), device=device)
                opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
                step = _step_fn(model, opt, x, target, autocast_dtype)
                fn = cuda_graphed(step) if graph_mode == "cudagraph" else step
                if on_gpu:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                p50, p20, p80 = timer(fn)
                peak = torch.cuda.max_memory_allocated() / 2**20 if on_gpu else math.nan
                rows.append(dict(
                    suite="e2e", op="resnet50_step", provider=variant, variant=graph_mode, mode="fwdbwd",
                    dtype="bf16_autocast" if autocast_dtype else "float32", layout=layout, N=n, C=math.nan,
                    spatial=f"{image_size}x{image_size}", ms_p50=p50, ms_p20=p20, ms_p80=p80, gbps=math.nan,
                    pct_copy_bw=math.nan, peak_mem_mb=peak, launches=math.nan, images_per_s=n / (p50 * 1e-3),
                    **meta))
                log(f"{variant:>18} N={n:<3} {graph_mode:<9} {n / (p50 * 1e-3):9.1f} images/s")
                del model, opt, fn, step
    import pandas as pd

    return pd.DataFrame(rows, columns=COLUMNS)
