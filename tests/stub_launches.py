"""What reaches triton's C launch function, for the tests that run wsbcn over the stub
CUDA driver in a subprocess (test_launch_plans, test_compat).

kernel[grid] calls the CompiledKernel's launcher object, which calls its C ``launch``;
wsbcn's direct path calls that C function itself (wsbcn/_compat.py). ``record(seen)``
wraps each compiled kernel's ``launch`` so that every launch, on either path, appends
(kernel hash, grid, kernel arguments) to ``seen``, tensors given as their addresses. The
kernel arguments are the last argument (a tuple, triton 3.9) or those after the 13th
(3.6).
"""
from triton.compiler.compiler import CompiledKernel


def record(seen: list) -> None:
    real_run = CompiledKernel.run

    def recording_run(self):
        launcher = real_run.fget(self)
        if not getattr(launcher, "recorded", False):
            c_launch = launcher.launch

            def launch(*args):
                kernel_args = args[-1] if isinstance(args[-1], tuple) else args[13:]
                seen.append((self.hash, list(args[:3]),
                             [a.data_ptr() if hasattr(a, "data_ptr") else a for a in kernel_args]))
                return c_launch(*args)

            launcher.launch = launch
            launcher.recorded = True
        return launcher

    CompiledKernel.run = property(recording_run)
