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
