"""Kernel launch configs: lookup, cache and the autotuning sweep (DESIGN.md section 6).

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

from . import backend, heuristics

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
    emulated GPU (``backend.emulate_gpu``) for CPU tensors while it is on."""
    if t.is_cuda:
        return (True,) + _cuda_facts(t.device.index or 0)
    emulated = backend.emulated_gpu()
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
        return f"f{heuristics.next_pow2(shape[1])}"
    n, c, s = shape
    return f"n{heuristics.next_pow2(n)}-c{heuristics.next_pow2(c)}-s{heuristics.next_pow2(s)}"


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


def heuristic_config(kernel: str, t: torch.Tensor, shape: tuple, channels_last: bool = False) -> dict:
    on_gpu, _, sm = device_facts(t)
    if kernel in ("ws_fwd", "ws_bwd"):
        return dict(heuristics.ws_config(shape[1], on_gpu))
    n, c, s = shape
    return dict(heuristics.norm_tile(n, c, s, channels_last, on_gpu, sm, element_size=t.element_size()))


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
