"""The package builds as a wheel that carries kernels/ as wsbcn.kernels and the
library's rooms, but none of the repository's developer tools (perf/wsbcn_dev/:
the C stub driver, the static-compile harness), and works when installed from it
(not only as an editable checkout): ``import wsbcn`` imports none of the tooling or
its dependencies, and a command that needs the developer tools says so in one line.
The wheel carries ``py.typed`` (PEP 561): type checkers read an installed wsbcn's annotations."""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import sys, torch, triton
before = set(sys.modules)
import wsbcn, wsbcn.kernels.layout as L
assert wsbcn.__file__.startswith(%r), wsbcn.__file__
new = set(sys.modules) - before
tooling = sorted(m for m in new if m.split(".")[0] in ("pandas", "matplotlib", "tqdm", "wsbcn_dev")
                 or m.startswith("wsbcn.tools"))
assert not tooling, tooling
print(L.nsc_strides(torch.empty(2, 3, 4, 5)))
"""


def test_wheel_holds_the_library_not_the_developer_tools_and_imports_without_the_tooling(tmp_path):
    # built from a copy of what the build reads: setuptools leaves build/ in the source
    # tree, and files deleted since an earlier build would linger there
    source = tmp_path / "source"
    for folder in ("wsbcn", "kernels", "perf"):
        shutil.copytree(ROOT / folder, source / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "results", "plots"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist"), str(source)], check=True)
    wheel = next((tmp_path / "dist").glob("wsbcn-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in ("wsbcn/modules/norm.py", "wsbcn/ops/norm.py", "wsbcn/ops/ws.py", "wsbcn/backends/__init__.py",
                     "wsbcn/kernels/norm.py", "wsbcn/kernels/norm_plan.py", "wsbcn/kernels/ws_plan.py",
                     "wsbcn/kernels/launch.py", "wsbcn/tuning.py", "wsbcn/configs/__init__.py", "wsbcn/tools/cli.py",
                     "wsbcn/py.typed"):
        assert required in names, required
    assert not [n for n in names if n.endswith((".c", ".so")) or n.startswith(("kernels/", "tests/", "perf/"))
                or "wsbcn_dev" in n or "stub_driver" in n or "static_compile" in n or "launch_recorder" in n]
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True)
    env = {"PYTHONPATH": str(target), "PATH": ""}
    out = subprocess.run([sys.executable, "-c", PROBE % str(target)], env=env, capture_output=True, text=True,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(60, 20, 1)"
    # outside a checkout the kernel report, which needs perf/wsbcn_dev/, refuses in one line
    out = subprocess.run([sys.executable, "-m", "wsbcn.tools.kernel_report", "--suite", "ci"], env=env,
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 2 and not out.stdout
    assert len(out.stderr.strip().splitlines()) == 1 and "clone of the repository" in out.stderr, out.stderr
