"""Shape heuristics: the config a kernel uses when no tuned one is cached.

A config is a plain dict of launch parameters. Its plan (BLOCK_S and split of
the norm kernels, BLOCK of WS) fixes the order of the reductions, so it always
comes from here; the tuning layer (wsbcn.tuning) may replace only the rest.
Results are cached per shape (callers get copies): eager micro-batch layers are
host-bound. On the CPU interpreter the aim is different from the GPU's: programs
run one after the other at ~1 ms each, so there we prefer few, large programs.
"""
import functools

from .kernels.layout import cdiv, next_pow2  # noqa: F401 (re-exported for the tuning layer)


def _warps(elements: int) -> int:
    if elements >= 4096:
        return 8
    if elements >= 1024:
        return 4
    return 2


@functools.lru_cache(maxsize=4096)
def ws_config(fan_in: int, on_gpu: bool) -> dict:
    cap = 4096 if on_gpu else 16384
    block = min(next_pow2(fan_in), cap)
    return {"BLOCK": block, "num_warps": _warps(block)}


@functools.lru_cache(maxsize=4096)
def norm_tile(n: int, c: int, s: int, channels_last: bool, on_gpu: bool, sm_count: int = 132) -> dict:
    """Tile and split for the passes over x (stats, apply, backward reduce/apply).

    The tile is [BLOCK_C, BLOCK_S]: for NCHW the spatial axis is contiguous and
    gets the long side; for channels_last the channel axis does. ``split``
    divides the spatial axis so that micro-batches (N = 1-2) still fill the GPU.
    BLOCK_S (the lanes of the reductions) and split are the plan; BLOCK_C and the
    rest are the tunable defaults.
    """
    tile = 4096 if on_gpu else 16384
    if channels_last:
        block_c = min(next_pow2(c), 128 if on_gpu else 1024)
        block_s = max(1, min(next_pow2(s), tile // block_c))
    else:
        block_s = min(next_pow2(s), 2048 if on_gpu else tile)
        block_c = max(1, min(next_pow2(c), tile // block_s))
    programs = n * cdiv(c, block_c)
    s_blocks = cdiv(s, block_s)
    if on_gpu:
        split = max(1, min(s_blocks, cdiv(4 * sm_count, programs)))
    else:
        split = 1
    return {
        "BLOCK_C": block_c,
        "BLOCK_S": block_s,
        "split": split,
        "num_warps": _warps(block_c * block_s),
        "num_stages": 2,
    }
