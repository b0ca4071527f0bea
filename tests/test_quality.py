"""Lint and type checks as part of the suite: ``ruff check`` and ``mypy`` are clean.

Both read their configuration from the repository (``[tool.ruff]`` in
pyproject.toml, ``[mypy]`` in setup.cfg) and both are in the ``test`` extra:
a missing tool is a failure, not a skip.
"""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(tool: str, *args: str) -> subprocess.CompletedProcess:
    assert importlib.util.find_spec(tool) is not None, (
        f"{tool} is not installed; it is in the test extra (pip install -e '.[test]')")
    return subprocess.run([sys.executable, "-m", tool, *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def test_ruff_clean():
    """refimpl/, tests/, benchmarks/, derivations/, examples/ (notebooks excluded)."""
    out = _run("ruff", "check", "--no-cache", "--output-format", "concise", ".")
    assert out.returncode == 0, out.stdout + out.stderr
    for folder in ("refimpl", "tests", "benchmarks", "derivations", "examples"):
        assert (ROOT / folder).is_dir()


@pytest.mark.slow
def test_mypy_clean():
    """The package (``files = refimpl`` in setup.cfg)."""
    out = _run("mypy")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Success: no issues found" in out.stdout, out.stdout
