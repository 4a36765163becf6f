"""Record the kernel launches the launch wrappers make, on a machine without a GPU.

Inside ``recording_launches()``, CPU tensors take the GPU path of an emulated device
(``backends.emulate_gpu``: its plans and shipped configs), and every
``kernel[grid](...)`` is recorded instead of compiled and run. The record is
taken at triton's own entry point (``JITFunction.run``, which ``kernel[grid]``
calls), so it sees exactly what the wrappers pass, whichever way they compute it.
Nothing runs: outputs hold garbage, so use it only to look at launches.
"""
import contextlib
import os
import tempfile
from dataclasses import dataclass

from . import GPU_NAME, SM_COUNT


@dataclass
class RecordedLaunch:
    kernel: object  # the triton JITFunction
    grid: tuple  # (x, y, z) programs
    args: tuple  # positional arguments, as the wrapper passed them
    kwargs: dict  # keyword arguments: constexprs and launch options (num_warps, num_stages)

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__

    @property
    def programs(self) -> int:
        x, y, z = self.grid
        return x * y * z


class _NoDevice:
    """What triton's runtime asks the driver while a launch is recorded: device 0,
    stream 0, and the target the launches are meant for."""

    def __init__(self, target):
        self.target = target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


def _canonical_grid(kernel, grid, args, kwargs) -> tuple:
    if callable(grid):  # a grid function gets the bound arguments, as in JITFunction.run
        grid = grid(dict(zip(kernel.arg_names, args), **kwargs))
    grid = tuple(int(g) for g in grid)
    return grid + (1,) * (3 - len(grid))


@contextlib.contextmanager
def recording_launches(target, device_name: str = GPU_NAME, sm_count: int = SM_COUNT):
    """Yield a list that fills with a ``RecordedLaunch`` per kernel launch made in
    the block. The user's tuning cache is left out (an empty cache directory), so
    the launches are those of the heuristics and the configs shipped for
    ``device_name``."""
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    from wsbcn import backends, tuning

    if backends.interpreter_enabled():
        raise RuntimeError("recording launches needs the real triton JIT: unset TRITON_INTERPRET before "
                           "triton is imported (run in a process of its own)")
    launches = []

    def record(self, *args, grid, warmup, **kwargs):
        launches.append(RecordedLaunch(self, _canonical_grid(self, grid, args, kwargs), args, kwargs))
        return None  # no CompiledKernel: wrappers that cache one for direct launches keep using kernel[grid]

    saved = JITFunction.run, driver._active, backends.emulated_gpu(), os.environ.get("WSBCN_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="wsbcn-no-user-cache-") as empty:
        JITFunction.run = record
        driver.set_active(_NoDevice(target))
        backends.emulate_gpu(device_name, sm_count)
        os.environ["WSBCN_CACHE_DIR"] = empty
        tuning.forget_loaded_tables()
        try:
            yield launches
        finally:
            JITFunction.run = saved[0]
            driver.set_active(saved[1])
            backends.emulate_gpu(*(saved[2] or (None,)))
            if saved[3] is None:
                os.environ.pop("WSBCN_CACHE_DIR", None)
            else:
                os.environ["WSBCN_CACHE_DIR"] = saved[3]
            tuning.forget_loaded_tables()
