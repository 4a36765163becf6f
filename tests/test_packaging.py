"""The package builds as a wheel that carries kernels/ as wsbcn.kernels and works
when installed from it (not only as an editable checkout)."""
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_contains_and_imports_the_kernels(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist"), str(ROOT)], check=True)
    wheel = next((tmp_path / "dist").glob("wsbcn-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in ("wsbcn/kernels/norm.py", "wsbcn/kernels/ws.py", "wsbcn/kernels/layout.py",
                     "wsbcn/modules/norm.py", "wsbcn/configs/__init__.py", "wsbcn/tools/cli.py"):
        assert required in names
    assert not any(n.startswith("kernels/") or n.startswith("tests/") for n in names)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True)
    probe = ("import wsbcn, wsbcn.kernels.layout as L, torch; "
             "assert wsbcn.__file__.startswith(%r); "
             "print(L.nsc_strides(torch.empty(2, 3, 4, 5)))" % str(target))
    out = subprocess.run([sys.executable, "-c", probe], env={"PYTHONPATH": str(target), "PATH": ""},
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(60, 20, 1)"
