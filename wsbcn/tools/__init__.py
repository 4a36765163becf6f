"""wsbcn's tooling, apart from the library: the ``wsbcn`` command (benchmarks,
autotuning, plots, the training demo, the kernel report). Nothing in the library
imports from here, and nothing here is imported by ``import wsbcn``; pandas and
matplotlib are imported by the commands that use them.

``wsbcn.tools.stub_driver``, ``.launch_recorder`` and ``.static_compile`` are the
repository's developer instruments (perf/wsbcn_dev/, not installed): they resolve
in a checkout, found from the package source or the current directory, and raise
``DevToolsMissing`` (one line: what to do) elsewhere.
"""
import importlib
import sys
from pathlib import Path

DEV_MODULES = ("stub_driver", "launch_recorder", "static_compile")


class DevToolsMissing(RuntimeError):
    """A command needs perf/wsbcn_dev/ of a repository checkout, and there is none."""


def dev_tools_dir():
    """The checkout's ``perf/`` folder holding ``wsbcn_dev/``, or None."""
    for root in (Path(__file__).resolve().parents[2], Path.cwd()):
        if (root / "perf" / "wsbcn_dev" / "__init__.py").is_file():
            return root / "perf"
    return None


def __getattr__(name):
    if name not in DEV_MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    perf = dev_tools_dir()
    if perf is None:
        raise DevToolsMissing(f"{name} is a development tool of the wsbcn repository (perf/wsbcn_dev/), not "
                              "installed with the package: run this from a clone of the repository")
    if str(perf) not in sys.path:
        sys.path.insert(0, str(perf))
    return importlib.import_module(f"wsbcn_dev.{name}")
