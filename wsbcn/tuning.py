"""Where kernels get their launch config (DESIGN.md section 6).

Lookup order: user cache -> configs shipped for the device -> shape heuristic.
"""
import torch

from . import heuristics


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def heuristic_config(kernel: str, t: torch.Tensor, shape: tuple, channels_last: bool = False) -> dict:
    on_gpu = t.is_cuda
    if kernel in ("ws_fwd", "ws_bwd"):
        return heuristics.ws_config(shape[1], on_gpu)
    n, c, s = shape
    sm = _sm_count(t.device) if on_gpu else 1
    return heuristics.norm_tile(n, c, s, channels_last, on_gpu, sm)


def config_for(kernel: str, t: torch.Tensor, shape: tuple, channels_last: bool = False) -> dict:
    return heuristic_config(kernel, t, shape, channels_last)
