"""Compile every wsbcn kernel for a real GPU target (sm_90 by default) without a GPU.

The Triton interpreter that CI uses checks what kernels compute, not that they
compile: type rules, loop-carried values and layouts are only checked by the real
compiler. This script runs the launch wrappers on CPU tensors while
the repository's launch recorder (perf/wsbcn_dev/) records every ``kernel[grid](...)``,
specialises each launch with triton's own binder (integers equal to 1 become constexprs,
integers and pointers divisible by 16 get ``tt.divisibility``: its static_compile)
and compiles it with triton.compile for the target, down to cubin.

Run in its own process, with TRITON_INTERPRET unset:
    python tests/aot_compile.py [ARCH]
Prints one line per compiled specialisation and exits non-zero on the first failure.
"""
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402

import wsbcn.kernels.norm_plan as knorm  # noqa: E402
import wsbcn.kernels.ws_plan as kws  # noqa: E402
from wsbcn.tuning import norm_tile, ws_config  # noqa: E402
from wsbcn.tools import launch_recorder, static_compile  # noqa: E402


def shipped_norm_configs(dtype):
    """(config, channels_last) of every norm config shipped in wsbcn/configs for
    ``dtype``: its tuned part on the plan of the (2, 16, 6, 6) input it is compiled for."""
    import json
    from importlib import resources

    out = []
    for f in resources.files("wsbcn.configs").iterdir():
        if f.name.endswith(".json"):
            for key, cfg in json.loads(f.read_text())["configs"].items():
                kernel, kind, layout, _ = key.split("|")
                if kernel.startswith("norm") and kind == str(dtype).replace("torch.", ""):
                    channels_last = layout == "channels_last"
                    plan = norm_tile(2, 16, 36, channels_last, True, 132, element_size=dtype.itemsize)
                    out.append((dict(plan, **cfg), channels_last))
    return out


def record_launches(launches):
    """Run the wrappers over every mode, layout and dtype (inside recording_launches)."""
    f32 = torch.float32
    for dtype in (torch.float32, torch.bfloat16):
        # N = 1 with several spatial chunks: Triton specialises N = 1, which removes the
        # combine kernels' sample loop (that once broke triton 3.6's thread-locality pass)
        for shape, channels_last in (((2, 8, 5, 5), False), ((2, 8, 5, 5), True), ((1, 4, 3), False),
                                     ((1, 8, 40, 40), False), ((1, 8, 40, 40), True)):
            x = torch.randn(shape, dtype=dtype)
            if channels_last:
                x = x.to(memory_format=torch.channels_last)
            n, c = x.shape[:2]
            s = x[0, 0].numel()
            cfg = norm_tile(n, c, s, channels_last, on_gpu=True, sm_count=132, element_size=x.element_size())
            params = dict(gamma=torch.ones(c), beta=torch.zeros(c), omega=torch.ones(2), eta=torch.zeros(2))
            nbt = torch.zeros((), dtype=torch.long)
            for mode, act, cumulative in ((0, None, False), (1, "relu", False), (1, "silu", True), (2, None, False),
                                          (3, "silu", False)):
                y = torch.empty_like(x)
                bn = mode != 0
                stats, rstd_c, rho = knorm.norm_forward(
                    x, y, params["gamma"] if bn else None, params["beta"] if bn else None, params["omega"],
                    params["eta"], torch.zeros(c) if bn else None, torch.ones(c) if bn else None, nbt if bn else None,
                    2, 1e-5, 0.1, cumulative, mode, mode in (1, 2), act, True, cfg)
                stats = torch.zeros(6, n, c, dtype=f32)
                knorm.norm_backward(torch.randn_like(x), x, torch.empty_like(x), stats, torch.ones(c), torch.ones(n, 2),
                                    params["gamma"] if bn else None, params["omega"], params["eta"], 2, mode, act,
                                    mode != 3, cfg)
        # One sample split into 256 chunks: BLOCK_J = 256 in the backward combine (the
        # shape of a ResNet-50 stem layer at N = 1, which failed to compile on triton 3.6)
        x = torch.randn(1, 8, 64, 64, dtype=dtype).to(memory_format=torch.channels_last)
        wide = dict(BLOCK_C=8, BLOCK_S=16, split=256, num_warps=4, num_stages=2)
        knorm.norm_forward(x, torch.empty_like(x), torch.ones(8), torch.zeros(8), torch.ones(2), torch.zeros(2),
                           torch.zeros(8), torch.ones(8), torch.zeros((), dtype=torch.long), 2, 1e-5, 0.1, False, 1,
                           True, "relu", True, wide)
        knorm.norm_backward(torch.randn_like(x), x, torch.empty_like(x), torch.zeros(6, 1, 8, dtype=f32), torch.ones(8),
                            torch.ones(1, 2), torch.ones(8), torch.ones(2), torch.zeros(2), 2, 1, "relu", True, wide)
        # The pipelining depth of the loops over S (num_stages -> NUM_STAGES) that autotune
        # tries and no plan has (plans have 1 and 3): cp.async copies into one shared buffer
        for channels_last in ((False, True) if dtype == torch.bfloat16 else ()):
            x = torch.randn(2, 16, 16, 16, dtype=dtype)
            if channels_last:
                x = x.to(memory_format=torch.channels_last)
            for stages in (2,):
                plan = norm_tile(2, 16, 256, channels_last, True, 132, element_size=dtype.itemsize)
                cfg = dict(plan, num_stages=stages)
                knorm.norm_forward(x, torch.empty_like(x), torch.ones(16), torch.zeros(16), torch.ones(4),
                                   torch.zeros(4), torch.zeros(16), torch.ones(16), torch.zeros((), dtype=torch.long),
                                   4, 1e-5, 0.1, False, 1, True, "relu", True, cfg)
                knorm.norm_backward(torch.randn_like(x), x, torch.empty_like(x), torch.zeros(6, 2, 16, dtype=f32),
                                    torch.ones(16), torch.ones(2, 4), torch.ones(16), torch.ones(4), torch.zeros(4), 4,
                                    1, "relu", True, cfg)
        # Every shipped (autotuned) norm config, in the dtype and layout it was tuned for
        for cfg, channels_last in shipped_norm_configs(dtype):
            x = torch.randn(2, 16, 6, 6, dtype=dtype)
            if channels_last:
                x = x.to(memory_format=torch.channels_last)
            stats, rstd_c, rho = knorm.norm_forward(
                x, torch.empty_like(x), torch.ones(16), torch.zeros(16), torch.ones(4), torch.zeros(4), torch.zeros(16),
                torch.ones(16), torch.zeros((), dtype=torch.long), 4, 1e-5, 0.1, False, 1, True, "relu", True, cfg)
            knorm.norm_backward(torch.randn_like(x), x, torch.empty_like(x), torch.zeros(6, 2, 16, dtype=f32),
                                torch.ones(16), torch.ones(2, 4), torch.ones(16), torch.ones(4), torch.zeros(4), 4, 1,
                                "relu", True, cfg)
        for shape in ((8, 4, 3, 3), (4, 5000)):
            w = torch.randn(shape, dtype=dtype)
            fan_in = w[0].numel()
            for std_mode in (False, True):
                for cfg in (ws_config(fan_in, True), {"BLOCK": 1024, "num_warps": 4}):
                    w_hat, st = kws.ws_forward(w, 1e-5, 0, std_mode, cfg)
                    kws.ws_backward(torch.randn_like(w), w, torch.zeros(3, shape[0]), cfg)


def _has_bf16(launch) -> bool:
    return any(isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 for a in launch.args)


def main(arch: int = 90) -> int:
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    seen = set()
    with launch_recorder.recording_launches(target) as launches:
        record_launches(launches)
    # int64 offsets (a sample of >= 2^31 elements) cannot be reached with CPU tensors
    # of a sane size: compile those variants from the recorded launches, of the bf16
    # inputs (the offset arithmetic does not depend on the element type; fp32 doubled
    # the compile time for nothing it could find)
    launches += [launch_recorder.RecordedLaunch(r.kernel, r.grid, r.args, dict(r.kwargs, LARGE=True))
                 for r in launches if r.kwargs.get("LARGE") is False and _has_bf16(r)]
    for launch in launches:
        spec = static_compile.specialise(launch, backend)
        if spec.key() in seen:
            continue
        seen.add(spec.key())
        compiled = triton.compile(ASTSource(launch.kernel, spec.signature, spec.constexprs, spec.attrs),
                                  target=target, options=spec.options.__dict__)
        assert "cubin" in compiled.asm
        const = ", ".join(f"{k}={v}" for k, v in sorted(spec.constexpr_values(launch.kernel).items()) if k.isupper())
        print(f"sm_{arch} ok {spec.name}({const})")
    print(f"{len(seen)} specialisations compiled")
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 90))
