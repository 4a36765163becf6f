"""wsbcn's developer instruments: they live in the repository, not in the wheel.

stub_driver      a stub CUDA driver (C, built with gcc on first use): triton's real
                 launch path on a machine without a GPU (``wsbcn bench --host``)
launch_recorder  records the ``kernel[grid]`` launches of wsbcn calls on CPU tensors
static_compile   compiles a recorded launch for sm_90 and reads registers, spills,
                 vector widths (``wsbcn report-kernels``, tests/aot_compile.py)

The ``wsbcn`` commands reach them as ``wsbcn.tools.<name>`` (wsbcn/tools/__init__.py
finds this folder from the package source or the current directory); scripts can put
``perf/`` on ``sys.path`` and ``import wsbcn_dev.<name>``.
"""
# The GPU the instruments stand for: what the stub answers as, whose launch plans they
# record, whose limits the occupancy model uses.
GPU_NAME = "NVIDIA H100 80GB HBM3"
SM_COUNT = 132
