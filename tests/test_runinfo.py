"""Provenance: the commit recorded with every result, and when it is marked dirty."""

from __future__ import annotations

import subprocess

from mpc.runinfo import git_commit


def _git(root, *args):
    subprocess.run(["git", *args], cwd=root, check=True, capture_output=True)


def test_dirty_means_uncommitted_code_not_rewritten_results(tmp_path):
    _git(tmp_path, "init", "-q")
    (tmp_path / "results").mkdir()
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "results" / "r.json").write_text("{}\n")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    sha = git_commit(tmp_path)
    assert len(sha) == 40
    (tmp_path / "results" / "r.json").write_text('{"new": 1}\n')  # a benchmark rewrote its record
    assert git_commit(tmp_path) == sha
    (tmp_path / "code.py").write_text("x = 2\n")                   # the code changed
    assert git_commit(tmp_path) == sha + "-dirty"
