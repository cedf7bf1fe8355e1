"""Set-up files agree: pyproject.toml and environment.yml pin the same packages, and CI
runs the README's test command."""

from __future__ import annotations

import re
import tomllib

from mpc.runinfo import REPO_ROOT


def _pyproject_pins() -> set[str]:
    data = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    deps = data["dependencies"] + [d for extra in data["optional-dependencies"].values() for d in extra]
    return {d.replace(" ", "").lower() for d in deps}


def _environment_pins() -> tuple[set[str], str]:
    text = (REPO_ROOT / "environment.yml").read_text()
    pip_block = text.split("- pip:", 1)[1]
    pins = {m.group(1).lower() for m in re.finditer(r"^\s+-\s+([A-Za-z0-9_.\-]+==[^\s#]+)", pip_block, re.M)}
    python = re.search(r"-\s*python=(\S+)", text).group(1)
    return pins, python


def test_environment_yml_pins_the_same_packages_as_pyproject():
    """Dependencies and extras of pyproject.toml == the pip list of environment.yml."""
    env, python = _environment_pins()
    assert env == _pyproject_pins()
    assert python == "3.11"
    assert "torch==2.13.0" in env  # the CPU build on the machine's disk; looser pulls CUDA


def test_every_dependency_is_pinned_exactly():
    for dep in _pyproject_pins():
        assert re.fullmatch(r"[a-z0-9_.\-]+==[0-9][0-9a-z.]*", dep), dep


def test_ci_runs_the_readme_test_command():
    readme = (REPO_ROOT / "README.md").read_text()
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    commands = re.findall(r"^\s*(bash scripts/\S+\.sh)\s*$", readme.split("## Quick start", 1)[1].split("\n## ", 1)[0], re.M)
    assert commands == ["bash scripts/run.sh", "bash scripts/test.sh"]
    assert "bash scripts/test.sh" in ci
