"""Facts about the machine and the wsbcn set-up (``wsbcn info``)."""
import platform

import torch

from .. import backends, tuning


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.processor() or platform.machine()})"


def device_slug() -> str:
    """A folder-safe name for the device: 'nvidia-h100-80gb-hbm3', or 'cpu'."""
    return tuning.slugify(torch.cuda.get_device_name(0)) if torch.cuda.is_available() else "cpu"


def triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except Exception as exc:  # triton missing or broken: say so rather than fail
        return f"unavailable ({type(exc).__name__})"


def collect() -> dict:
    requested = backends.requested_backend()
    cuda = torch.cuda.is_available()
    on_cpu = "torch" if requested == "auto" else requested
    return {
        "device": device_name(),
        "cuda": torch.version.cuda if cuda else "not available",
        "torch": torch.__version__,
        "triton": triton_version(),
        "WSBCN_BACKEND": requested,
        "backend (cuda)": ("triton" if requested == "auto" else requested) if cuda else "n/a",
        "backend (cpu)": on_cpu,
        "interpreter": "on" if backends.interpreter_enabled() else "off",
        "tuning cache": str(tuning.cache_dir()),
    }


CODE_PATHS = ("wsbcn", "kernels", "pyproject.toml")  # what a result depends on; not perf/'s results and plots


def git_commit(paths=CODE_PATHS) -> str:
    """Short commit of the working tree wsbcn runs from, '+dirty' when it has
    uncommitted changes to ``paths`` (the code, by default: a benchmark's own output
    does not make it dirty); 'unknown' outside a git checkout. A copy of the tree
    without .git (a lent GPU machine) names its commit in WSBCN_COMMIT."""
    import os
    import subprocess
    from pathlib import Path

    if os.environ.get("WSBCN_COMMIT"):
        return os.environ["WSBCN_COMMIT"]
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", *paths], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("+dirty" if dirty else "")


def run_metadata(device: str = None) -> dict:
    """Columns every result row carries; ``device`` names the device instead of
    asking torch (the stub driver's runs must not touch torch.cuda)."""
    import datetime

    return {
        "device": device or device_name(),
        "torch": torch.__version__,
        "triton": triton_version(),
        "commit": git_commit(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
