"""Compile every wsbcn kernel for a real GPU target (sm_90 by default) without a GPU.

The Triton interpreter that CI uses checks what kernels compute, not that they
compile: type rules, loop-carried values and layouts are only checked by the real
compiler. This script runs the launch wrappers on CPU tensors with each kernel
replaced by a recorder, turns every recorded launch into a signature (pointer
dtypes, integer widths, Triton's specialisation of integers equal to 1, the
constexprs) and compiles it with triton.compile for the target, down to cubin.

Run in its own process, with TRITON_INTERPRET unset:
    python tests/tools/aot_compile.py [ARCH]
Prints one line per compiled specialisation and exits non-zero on the first failure.
"""
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import wsbcn.kernels.norm as knorm  # noqa: E402
import wsbcn.kernels.ws as kws  # noqa: E402
from wsbcn.heuristics import norm_tile, ws_config  # noqa: E402

POINTER = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.int64: "*i64"}
LAUNCH_OPTIONS = ("num_warps", "num_stages")


class Recorder:
    def __init__(self, kernel, launches):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((self.kernel, args, kwargs))
        return launch

    def __getattr__(self, name):  # arg_names, fn: what the launch plans read
        return getattr(self.kernel, name)


def signature_of(kernel, args, kwargs):
    names = kernel.arg_names
    sig, constexprs = {}, {}
    for name, value in zip(names, args):
        if isinstance(value, torch.Tensor):
            sig[name] = POINTER[value.dtype]
        elif isinstance(value, bool):
            sig[name] = "i1"
        elif isinstance(value, int):
            if value == 1:  # Triton specialises integer arguments equal to 1
                sig[name], constexprs[name] = "constexpr", 1
            else:
                sig[name] = "i64" if abs(value) >= 2**31 else "i32"
        elif isinstance(value, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{kernel.fn.__name__}: cannot type argument {name}={value!r}")
    for name, value in kwargs.items():
        if name in LAUNCH_OPTIONS:
            continue
        sig[name], constexprs[name] = "constexpr", value
    options = {k: kwargs[k] for k in LAUNCH_OPTIONS if k in kwargs}
    return sig, constexprs, options


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
                    out.append((dict(norm_tile(2, 16, 36, channels_last, True, 132), **cfg), channels_last))
    return out


def record_launches():
    launches = []
    for module in (knorm, kws):
        for name in dir(module):
            obj = getattr(module, name)
            if isinstance(obj, triton.runtime.jit.JITFunction) and name.endswith("_kernel"):
                setattr(module, name, Recorder(obj, launches))
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
            cfg = norm_tile(n, c, s, channels_last, on_gpu=True, sm_count=132)
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
    return launches


def main(arch: int = 90) -> int:
    target = GPUTarget("cuda", arch, 32)
    seen = set()
    launches = record_launches()
    # int64 offsets (a sample of >= 2^31 elements) cannot be reached with CPU tensors
    # of a sane size: compile those variants from the recorded launches.
    launches += [(k, a, dict(kw, LARGE=True)) for k, a, kw in launches if kw.get("LARGE") is False]
    for kernel, args, kwargs in launches:
        sig, constexprs, options = signature_of(kernel, args, kwargs)
        key = (kernel.fn.__name__, tuple(sorted(sig.items())), tuple(sorted(constexprs.items())),
               tuple(sorted(options.items())))
        if key in seen:
            continue
        seen.add(key)
        compiled = triton.compile(ASTSource(kernel, sig, constexprs), target=target, options=options)
        assert "cubin" in compiled.asm
        const = ", ".join(f"{k}={v}" for k, v in sorted(constexprs.items()) if k.isupper())
        print(f"sm_{arch} ok {kernel.fn.__name__}({const})")
    print(f"{len(seen)} specialisations compiled")
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 90))
