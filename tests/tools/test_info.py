"""``wsbcn info``'s facts (wsbcn/tools/info.py): the commit every result row carries."""
import pytest

from wsbcn.tools import info


def test_commit_override_for_a_tree_without_git(monkeypatch):
    monkeypatch.delenv("WSBCN_COMMIT", raising=False)
    assert info.git_commit() != "abc123def456"
    monkeypatch.setenv("WSBCN_COMMIT", "abc123def456")
    assert info.run_metadata()["commit"] == "abc123def456"


def test_dirty_counts_only_the_paths_asked_about(monkeypatch):
    monkeypatch.delenv("WSBCN_COMMIT", raising=False)
    if info.git_commit() == "unknown":
        pytest.skip("not a git checkout (a copy of the tree)")
    clean = info.git_commit(paths=("no/such/path/in/the/repository",))
    assert not clean.endswith("+dirty")  # a checkout, nothing changed there
    assert info.git_commit().removesuffix("+dirty") == clean


def test_result_rows_are_dirty_for_code_changes_only(monkeypatch):
    """A benchmark rewrites perf/results (tracked): that must not mark its own rows
    '+dirty'; a change to the package, the kernels or pyproject.toml does."""
    import subprocess

    monkeypatch.delenv("WSBCN_COMMIT", raising=False)
    asked = []

    def fake_run(args, **kwargs):
        asked.append(args)
        changed = " M perf/results/cpu/bench.csv" if "status" in args and "perf" in args else ""
        return subprocess.CompletedProcess(args, 0, stdout="abc123def456" if "rev-parse" in args else changed)

    monkeypatch.setattr(subprocess, "run", fake_run)
    assert info.run_metadata()["commit"] == "abc123def456"
    status = next(a for a in asked if "status" in a)
    assert status[status.index("--") + 1:] == ["wsbcn", "kernels", "pyproject.toml"]
