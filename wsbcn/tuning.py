"""Kernel launch configs: lookup, cache and the autotuning sweep (DESIGN.md section 5).

Lookup order for a (kernel, dtype, layout, shape bucket) key:
user cache (``$WSBCN_CACHE_DIR`` or ~/.cache/wsbcn, ``<device-slug>.json``) ->
configs shipped in ``wsbcn/configs/<device-slug>.json`` -> a shape heuristic.

A config has two parts. The plan (BLOCK_S and split of the norm kernels, BLOCK
of WS) fixes the order of every floating-point reduction (kernels/reduce.py), so
it always comes from the shape heuristic. Tuning sets only the rest (BLOCK_C,
num_warps, num_stages), which never changes a bit of any result: a tuned and an
untuned machine compute the same numbers.

Tuned configs are data, never code: JSON with schema_version, device and the
torch/triton versions they were measured with. Writes are atomic (temp file +
os.replace), so a crash never leaves a half-written cache.
"""
import functools
import json
import os
import tempfile
from importlib import resources
from pathlib import Path

import torch

from . import backends
from .kernels.layout import cdiv, next_pow2

SCHEMA_VERSION = 2  # 1 stored whole configs, plan included
KERNELS = ("ws_fwd", "ws_bwd", "norm_fwd", "norm_bwd")
# The launch parameters tuning may set: none of them changes a result.
TUNABLE_KEYS = {
    "ws_fwd": ("num_warps",),
    "ws_bwd": ("num_warps",),
    "norm_fwd": ("BLOCK_C", "num_warps", "num_stages"),
    "norm_bwd": ("BLOCK_C", "num_warps", "num_stages"),
}
_tables: dict = {}  # device slug -> merged {key: config}, built once per process
_generation = [0]  # bumped whenever the tables are dropped: cached launch plans key on it


def cache_dir() -> Path:
    env = os.environ.get("WSBCN_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "wsbcn"


def slugify(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    cleaned = "".join(ch if ch.isalnum() else "-" for ch in name.lower())
    return "-".join(part for part in cleaned.split("-") if part)


@functools.lru_cache(maxsize=None)
def _cuda_facts(index: int) -> tuple:
    """(device slug, SM count) of a CUDA device, asked once per process."""
    props = torch.cuda.get_device_properties(index)
    return slugify(props.name), props.multi_processor_count


def device_facts(t: torch.Tensor) -> tuple:
    """(GPU path?, device slug, SM count) for launches on ``t``'s device; an
    emulated GPU (``backends.emulate_gpu``) for CPU tensors while it is on."""
    if t.is_cuda:
        return (True,) + _cuda_facts(t.device.index or 0)
    emulated = backends.emulated_gpu()
    if emulated is not None:
        return True, slugify(emulated[0]), emulated[1]
    return False, "cpu", 1


def _slug(t: torch.Tensor) -> str:
    return device_facts(t)[1]


def layout_name(channels_last: bool) -> str:
    return "channels_last" if channels_last else "contiguous"


def shape_bucket(kernel: str, shape: tuple) -> str:
    """Shapes that share a bucket share a config: powers of two per dimension."""
    if kernel.startswith("ws"):
        return f"f{next_pow2(shape[1])}"
    n, c, s = shape
    return f"n{next_pow2(n)}-c{next_pow2(c)}-s{next_pow2(s)}"


def config_key(kernel: str, dtype: torch.dtype, channels_last: bool, shape: tuple) -> str:
    return "|".join((kernel, str(dtype).replace("torch.", ""), layout_name(channels_last), shape_bucket(kernel, shape)))


def valid_config(kernel: str, config) -> bool:
    """A cache entry: exactly the kernel's tunable keys, positive ints, blocks powers
    of two (as tl.arange needs)."""
    keys = TUNABLE_KEYS.get(kernel)
    if keys is None or not isinstance(config, dict) or set(config) != set(keys):
        return False
    if any(not isinstance(config[k], int) or isinstance(config[k], bool) or config[k] < 1 for k in keys):
        return False
    return all(config[k] & (config[k] - 1) == 0 for k in keys if k.startswith("BLOCK"))


def tunable_part(kernel: str, config: dict) -> dict:
    """The part of a full launch config that a cache stores."""
    return {k: config[k] for k in TUNABLE_KEYS[kernel]}


def read_cache_file(path) -> dict:
    """The configs of one cache file, or {} when it is missing, unreadable or of
    another schema (a stale cache must never break a forward pass)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("schema_version") != SCHEMA_VERSION:
        return {}
    configs = data.get("configs", {})
    return {k: v for k, v in configs.items() if isinstance(k, str) and valid_config(k.split("|")[0], v)}


def _shipped(slug: str) -> dict:
    try:
        ref = resources.files("wsbcn.configs").joinpath(f"{slug}.json")
        with resources.as_file(ref) as path:
            return read_cache_file(path)
    except (FileNotFoundError, ModuleNotFoundError):
        return {}


def table_for(slug: str) -> dict:
    if slug not in _tables:
        merged = dict(_shipped(slug))
        merged.update(read_cache_file(cache_dir() / f"{slug}.json"))  # the user's own tuning wins
        _tables[slug] = merged
    return _tables[slug]


def forget_loaded_tables() -> None:
    """Drop the in-memory tables so the next lookup rereads the files (and every
    launch plan built from them is rebuilt)."""
    _tables.clear()
    _generation[0] += 1


def generation() -> int:
    """How many times the tables were dropped: part of every launch plan's key."""
    return _generation[0]


# --- Shape heuristics: the config a kernel uses when no tuned one is cached ---------
# Results are cached per shape (callers get copies): eager micro-batch layers are
# host-bound. On the CPU interpreter the aim is different from the GPU's: programs
# run one after the other at ~1 ms each, so there we prefer few, large programs.
#
# The GPU plans are sized with the static kernel report (perf/kernel_report;
# docs/kernels.md): a tile is one
# load vector per thread (16 bytes where the rows allow), which keeps the passes over
# x at about 64 registers or fewer, so 7-16 programs of 4 warps fit an SM, and the
# spatial split asks for WAVES waves of RESIDENT_CTAS of them where the tensor has
# that many tiles. Where it has fewer (one tile per program), the waves can only grow
# with less work per thread, and one vector is the least that keeps loads full width.
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


def heuristic_config(kernel: str, t: torch.Tensor, shape: tuple, channels_last: bool = False) -> dict:
    on_gpu, _, sm = device_facts(t)
    if kernel in ("ws_fwd", "ws_bwd"):
        return dict(ws_config(shape[1], on_gpu))
    n, c, s = shape
    return dict(norm_tile(n, c, s, channels_last, on_gpu, sm, element_size=t.element_size()))


def config_for(kernel: str, t: torch.Tensor, shape: tuple, channels_last: bool = False) -> dict:
    """The launch config for ``kernel`` on tensor ``t`` of logical ``shape``: the
    heuristic's plan, with the tuned parameters of a cache entry when there is one."""
    config = heuristic_config(kernel, t, shape, channels_last)
    found = table_for(_slug(t)).get(config_key(kernel, t.dtype, channels_last, shape))
    if found is not None:
        config.update(found)
    return config


def write_cache(path, device: str, configs: dict) -> None:
    """Merge ``configs`` (tunable parts, see ``tunable_part``) into the cache file at
    ``path`` atomically."""
    import triton

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    merged = read_cache_file(path)
    merged.update(configs)
    payload = {
        "schema_version": SCHEMA_VERSION,
        "device": device,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "configs": dict(sorted(merged.items())),
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    forget_loaded_tables()
