"""Shape heuristics: the config a kernel uses when no tuned one is cached.

A config is a plain dict of launch parameters. Its plan (BLOCK_S and split of
the norm kernels, BLOCK of WS) fixes the order of the reductions, so it always
comes from here; the tuning layer (wsbcn.tuning) may replace only the rest.
Results are cached per shape (callers get copies): eager micro-batch layers are
host-bound. On the CPU interpreter the aim is different from the GPU's: programs
run one after the other at ~1 ms each, so there we prefer few, large programs.

The GPU plans are sized with the static kernel report (python -m
wsbcn.tools.kernel_report; perf/NOTES.md, "Static kernel report"): a tile is one
load vector per thread (16 bytes where the rows allow), which keeps the passes over
x at about 64 registers or fewer, so 7-16 programs of 4 warps fit an SM, and the
spatial split asks for WAVES waves of RESIDENT_CTAS of them where the tensor has
that many tiles. Where it has fewer (one tile per program), the waves can only grow
with less work per thread, and one vector is the least that keeps loads full width.
"""
import functools

from .kernels.layout import cdiv, next_pow2  # noqa: F401 (re-exported for the tuning layer)

GPU_WARPS = 4  # warps per program of the passes over x (tunable; the plan assumes it)
# 4-warp programs an SM can hold: 16 by threads (2048 / 128); the report finds 7-16
# at 40-72 registers, so sizing for 16 gives >= WAVES waves at any of them
RESIDENT_CTAS = 16
WAVES = 4  # programs the split aims for: WAVES x RESIDENT_CTAS x SMs
# Software pipelining of the loops over S (num_stages, the kernels' NUM_STAGES; 1: a
# plain loop). Triton turns a pipelined loop's loads into cp.async copies into
# NUM_STAGES - 1 shared buffers: at 2 stages the next step's copy is issued at the end
# of a step and waited for at the top of the next, so no more is in flight than in a
# plain loop; 3 keeps two steps in flight. The static report (perf/NOTES.md) has the
# plain loops of channels_last tiles (bf16 stats: 14-16 KB per SM) and of NCHW rows
# that are no multiple of 16 (2-8-byte loads: 9-16 KB) below the ~15-20 KB an H100
# needs; NCHW rows of 16-byte loads hold 16-80 KB without it.
PIPELINED_STAGES = 3
VECTOR_BYTES = 16  # the widest global load (ld.global.v4.b32)
# values per thread of an NCHW tile whose rows allow no vector loads (S = 49): scalar
# loads each carry their own 64-bit address, and 4 of them stay within 64 registers
MIN_VALUES_PER_THREAD = 4
WS_GPU_BLOCK = 512  # lanes of a WS row on GPU: longer rows loop over chunks of this


def _warps(elements: int) -> int:
    if elements >= 4096:
        return 8
    if elements >= 1024:
        return 4
    return 2


@functools.lru_cache(maxsize=4096)
def ws_config(fan_in: int, on_gpu: bool) -> dict:
    # On GPU a whole row in one block of 2048-4096 lanes took triton 3.6 45-200 s
    # to compile, the looped 4096-lane backward spilled, and triton 3.6 spilled the
    # one-block backward at 1024 lanes: rows longer than 512 loop instead.
    cap = WS_GPU_BLOCK if on_gpu else 16384
    block = min(next_pow2(fan_in), cap)
    return {"BLOCK": block, "num_warps": _warps(block)}


@functools.lru_cache(maxsize=4096)
def norm_tile(n: int, c: int, s: int, channels_last: bool, on_gpu: bool, sm_count: int = 132, *,
              element_size: int) -> dict:
    """Tile and split for the passes over x (stats, apply, backward reduce/apply).

    The tile is [BLOCK_C, BLOCK_S]: for NCHW the spatial axis is contiguous and
    gets the long side; for channels_last the channel axis does. ``split``
    divides the spatial axis so that programs reach WAVES waves; a tensor with
    fewer tiles than that gets one program per tile. ``element_size``: bytes per
    value of x.
    BLOCK_S (the lanes of the reductions) and split are the plan; BLOCK_C,
    num_warps and num_stages (PIPELINED_STAGES or 1) are the tunable defaults.
    """
    if not on_gpu:
        tile = 16384
        if channels_last:
            block_c = min(next_pow2(c), 1024)
            block_s = max(1, min(next_pow2(s), tile // block_c))
        else:
            block_s = min(next_pow2(s), tile)
            block_c = max(1, min(next_pow2(c), tile // block_s))
        return {"BLOCK_C": block_c, "BLOCK_S": block_s, "split": 1, "num_warps": _warps(block_c * block_s),
                "num_stages": 2}
    threads = 32 * GPU_WARPS
    vector = max(1, VECTOR_BYTES // element_size)  # values in one 16-byte load
    if channels_last:
        # rows of 32 contiguous bytes (one sector: 16 bf16 or 8 fp32 channels) by 64
        # positions, two threads per row: one 16-byte load per thread
        block_s = min(next_pow2(s), 64)
        block_c = min(next_pow2(c), 2 * vector)
    else:
        # 128 lanes along the contiguous spatial axis. A row's loads are as wide as the
        # largest power of two dividing S allows (the plan's ALIGN): 16 bytes when S is
        # a multiple of 16, 8 bytes for bf16 S = 196, scalars for S = 49. One such
        # load per thread, but at least MIN_VALUES_PER_THREAD values.
        row_vector = min(vector, s & -s)
        block_s = min(next_pow2(s), 128)
        block_c = max(1, min(next_pow2(c), threads * max(row_vector, MIN_VALUES_PER_THREAD) // block_s))
    # chunks wanted; a chunk is a whole number of tiles, rounded down so that the
    # chunks (kernels/norm.py _chunking) are at least as many as wanted
    wanted = cdiv(WAVES * RESIDENT_CTAS * sm_count, n * cdiv(c, block_c))
    s_blocks = cdiv(s, block_s)
    split = cdiv(s_blocks, max(1, s_blocks // wanted))
    stages = PIPELINED_STAGES if channels_last or s % 16 else 1
    return {"BLOCK_C": block_c, "BLOCK_S": block_s, "split": split, "num_warps": GPU_WARPS, "num_stages": stages}
