"""A stub CUDA driver for triton: real launches on a machine with no GPU.

``install()`` makes triton's NVIDIA backend the active driver in this process, over
a stub ``libcuda.so.1`` (``stub_libcuda.c``, built with gcc on first use) that
answers as one H100 (compute capability 9.0, 132 SMs) and does nothing. Then
``kernel[grid](...)`` on CPU tensors runs triton's whole host path for real:
JITFunction.run (binder, specialisation, cache key), a real compile to an sm_90
cubin on a kernel's first call (triton's bundled ptxas), triton's own launcher and
its C argument packing, down to ``cuLaunchKernelEx``, which only counts
(``launch_count()``). No kernel runs: outputs hold whatever memory held.

What stands in for torch.cuda (the CPU build of torch raises in all of it): the
current device is 0, the current stream 0, the capability (9, 0); setting the
device does nothing. Each costs less than the torch.cuda call it replaces.

Use it in a fresh process, with ``TRITON_INTERPRET`` unset (triton decides between
the interpreter and the compiler when kernels are defined) and before anything
loads a real libcuda. For wsbcn's own calls to take the GPU path on CPU tensors,
also turn on ``wsbcn.backends.emulate_gpu(GPU_NAME, SM_COUNT)``.

Ported from ../shared/tools/hostmeter (fakecuda.py, fake_libcuda.c), which first
measured triton's host path this way; works with triton 3.6 to 3.9. A development
tool of the repository (perf/wsbcn_dev/), not installed with wsbcn.
"""
import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("stub_libcuda.c")
from . import GPU_NAME, SM_COUNT  # noqa: F401 (what the stub answers as; callers emulate it)

CAPABILITY = (9, 0)
_DEFINES = {"STUB_CC_MAJOR": CAPABILITY[0], "STUB_CC_MINOR": CAPABILITY[1], "STUB_SM_COUNT": SM_COUNT}

_library = None  # the loaded stub, once installed


def _triton_include_dir() -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "include"


def _compiler() -> str:
    """$CC when set, else gcc; a clear error when neither is there."""
    name = os.environ.get("CC") or "gcc"
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(
            f"the stub CUDA driver is built from C source on first use and needs a C compiler: "
            f"{name!r} was not found on PATH (install gcc, or point CC at a C compiler)")
    return path


def build_dir() -> Path:
    """Where the stub library lives: the wsbcn user cache (``$WSBCN_CACHE_DIR``,
    else ``~/.cache/wsbcn``) / stub_driver / a hash of everything the build reads,
    so an edit of the source or another triton's cuda.h gets its own build."""
    from wsbcn.tuning import cache_dir

    digest = hashlib.sha256(SOURCE.read_bytes())
    digest.update((_triton_include_dir() / "cuda.h").read_bytes())
    digest.update(repr(sorted(_DEFINES.items())).encode())
    return cache_dir() / "stub_driver" / digest.hexdigest()[:16]


def build() -> Path:
    """Compile the stub to ``build_dir()/libcuda.so.1`` unless it is there already."""
    target = build_dir() / "libcuda.so.1"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    cc = _compiler()
    # Compile to a temporary name, then rename: two processes building at once
    # both end with a whole library, never a half-written one.
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so.tmp")
    os.close(fd)
    command = [cc, "-O2", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", f"-I{_triton_include_dir()}",
               *(f"-D{k}={v}" for k, v in _DEFINES.items()), str(SOURCE), "-o", tmp]
    try:
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"building the stub CUDA driver failed ({' '.join(command)}):\n{done.stderr}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target


def _loaded_libcuda() -> list:
    """Paths of the libcuda objects mapped into this process (Linux)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return []
    return sorted({line.split()[-1] for line in maps.splitlines() if "libcuda.so" in line})


def _refuse_if_interpreted() -> None:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):  # as triton reads it
        raise RuntimeError(
            "TRITON_INTERPRET is set: triton defines kernels for its interpreter and never reaches a "
            "driver; run in a fresh process with TRITON_INTERPRET unset")


def _refuse_if_other_libcuda(library: Path) -> None:
    other = [p for p in _loaded_libcuda() if Path(p).resolve() != library.resolve()]
    if other:
        raise RuntimeError(
            f"a CUDA driver is already loaded in this process ({', '.join(other)}): the stub must be "
            "installed in a fresh process before anything initialises CUDA")


def install() -> None:
    """Make triton launch over the stub driver in this process (idempotent)."""
    global _library
    if _library is not None:
        return
    _refuse_if_interpreted()
    library = build()
    _refuse_if_other_libcuda(library)
    # triton links its launcher modules against the libcuda.so.1 in
    # TRITON_LIBCUDA_PATH; loading the stub RTLD_GLOBAL first means that the loader,
    # and driver.c's own dlopen("libcuda.so.1"), find it by its soname.
    os.environ["TRITON_LIBCUDA_PATH"] = str(library.parent)
    loaded = ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL)
    loaded.stub_cuda_launch_count.restype = ctypes.c_uint64

    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia import driver as nvidia
    from triton.runtime.driver import driver

    for cached in ("libcuda_dirs", "library_dirs"):  # read TRITON_LIBCUDA_PATH anew
        getattr(getattr(nvidia, cached, None), "cache_clear", lambda: None)()
    target = GPUTarget("cuda", CAPABILITY[0] * 10 + CAPABILITY[1], 32)

    class StubCudaDriver(nvidia.CudaDriver):
        """triton's CudaDriver over the stub library, minus torch.cuda."""

        def __init__(self):
            # CudaDriver.__init__ would bind torch.cuda's device/stream functions
            # (GPUDriver); everything else is triton's own.
            self.utils = nvidia.CudaUtils()  # triton's driver.c, built against the stub
            self.launcher_cls = nvidia.CudaLauncher
            self.get_device_capability = lambda device=0: CAPABILITY
            self.get_current_device = lambda: 0
            self.get_current_stream = lambda device=None: 0
            self.set_current_device = lambda device: None

        def get_current_target(self):
            return target

    driver.set_active(StubCudaDriver())
    _library = loaded


def installed() -> bool:
    return _library is not None


def launch_count() -> int:
    """Launches that reached the stub's cuLaunchKernelEx since install()."""
    if _library is None:
        raise RuntimeError("the stub CUDA driver is not installed: call install() first")
    return int(_library.stub_cuda_launch_count())
