"""The distributions: the sdist carries what the tests need and its tests run.

Builds the sdist and, from it, the wheel (``python -m build --no-isolation``:
no network; setuptools, wheel and build are in the ``test`` extra), unpacks
the sdist and

* checks that it holds every file of the folders the test suite reads
  (tests/ with conftest.py, derivations/, notebooks/, benchmarks/,
  examples/, docs/) and the project's top-level documents, as found in the
  tree the test runs from;
* runs a small part of the suite from the unpacked archive, against the
  archive's own copy of the package: the derivation runner (which fails when
  derivations/ is missing), two quick derivation checks, and a test file
  that needs conftest.py's ``backend`` fixture;
* checks that the wheel ships LICENSE and ``py.typed`` and no tests;
* checks that the version agrees between the package, CITATION.cff and the
  changelog's top section.
"""

import os
import re
import shutil
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import pytest

import refimpl

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = ("README.md", "LICENSE", "CITATION.cff", "CHANGELOG.md", "CONTRIBUTING.md",
             "setup.cfg", "pyproject.toml", "MANIFEST.in")
FOLDERS = ("tests", "derivations", "notebooks", "benchmarks", "examples", "docs")
SKIP_PARTS = {"__pycache__", ".ipynb_checkpoints", ".pytest_cache", ".mypy_cache", ".ruff_cache"}
# Quick sympy checks (well under a second each); the full set runs in test_derivations.py.
QUICK_DERIVATIONS = ("deq.check_scalar_deq_gradient", "sinkhorn.check_kappa",
                     "topk.check_schur_complement_two_anchors")


def _files_under(folder: Path) -> set[str]:
    return {p.relative_to(ROOT).as_posix() for p in folder.rglob("*")
            if p.is_file() and not SKIP_PARTS & set(p.relative_to(ROOT).parts)
            and not any(part.startswith(".") for part in p.relative_to(ROOT).parts)
            and p.suffix not in (".pyc", ".pyo")}


def _needed() -> set[str]:
    """The files the archive must hold, from the tree on disk."""
    need = set(DOCUMENTS) | {"refimpl/py.typed"}
    need |= {p.relative_to(ROOT).as_posix() for p in (ROOT / "refimpl").rglob("*.py")}
    for folder in FOLDERS:
        assert (ROOT / folder).is_dir(), f"{folder}/ is missing from {ROOT}"
        need |= _files_under(ROOT / folder)
    assert "tests/conftest.py" in need
    return need


def _ignore(folder: str, names: list[str]) -> set[str]:
    """Hidden entries, caches and build output: what a clean checkout lacks.

    A stale ``*.egg-info/SOURCES.txt`` in particular would put files into the
    sdist that MANIFEST.in no longer names."""
    return {n for n in names if n.startswith(".") or n in SKIP_PARTS
            or n in ("build", "dist", "bench-results", "venv") or n.endswith(".egg-info")}


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    """(sdist, wheel) built from a clean copy of this tree into a temporary folder."""
    src = tmp_path_factory.mktemp("src") / "refimpl-src"
    shutil.copytree(ROOT, src, ignore=_ignore)
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out),
                           str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sdists, wheels = sorted(out.glob("*.tar.gz")), sorted(out.glob("*.whl"))
    assert len(sdists) == 1 and len(wheels) == 1, sorted(p.name for p in out.iterdir())
    return sdists[0], wheels[0]


@pytest.fixture(scope="module")
def unpacked(dists, tmp_path_factory):
    """The sdist unpacked: the path of its top folder."""
    sdist, _ = dists
    dest = tmp_path_factory.mktemp("sdist")
    with tarfile.open(sdist) as tar:
        if hasattr(tarfile, "data_filter"):        # Python >= 3.10.12 / 3.11.4
            tar.extractall(dest, filter="data")
        else:
            tar.extractall(dest)
    (top,) = dest.iterdir()
    assert top.name == f"refimpl-{refimpl.__version__}"
    return top


@pytest.mark.slow
def test_sdist_holds_what_the_tests_need(unpacked):
    have = {p.relative_to(unpacked).as_posix() for p in unpacked.rglob("*") if p.is_file()}
    missing = _needed() - have
    assert not missing, f"the sdist lacks {sorted(missing)}"


@pytest.mark.slow
def test_tests_run_from_the_sdist(unpacked, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(unpacked), PYTHONDONTWRITEBYTECODE="1")
    # The archive's own package is the one imported, not this tree's.
    where = subprocess.run([sys.executable, "-c", "import refimpl; print(refimpl.__file__)"],
                           cwd=unpacked, env=env, capture_output=True, text=True, timeout=120)
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).resolve().is_relative_to(unpacked.resolve()), where.stdout

    report = tmp_path / "junit.xml"
    selected = ["tests/test_derivations.py::test_derivations_present",
                *(f"tests/test_derivations.py::test_derivation[{c}]" for c in QUICK_DERIVATIONS),
                "tests/test_linsolve.py"]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           f"--junitxml={report}", *selected],
                          cwd=unpacked, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]

    outcome = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        kids = {child.tag for child in case}
        state = ("failed" if kids & {"failure", "error"} else
                 "skipped" if "skipped" in kids else "passed")
        outcome[f"{case.get('classname')}::{case.get('name')}"] = state
    derivations = {k: v for k, v in outcome.items() if "test_derivations" in k}
    assert len(derivations) == 1 + len(QUICK_DERIVATIONS), derivations
    assert set(derivations.values()) == {"passed"}, derivations
    linsolve = [v for k, v in outcome.items() if "test_linsolve" in k]
    assert linsolve.count("passed") >= 5, outcome          # the NumPy/strict half of the grid


@pytest.mark.slow
def test_wheel_ships_license_and_py_typed(dists):
    _, wheel = dists
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        licenses = [n for n in names if n.endswith("/LICENSE") and ".dist-info/" in n]
        assert licenses, names
        assert b"Copyright (c) 2026 The refimpl authors" in zf.read(licenses[0])
        metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "refimpl/py.typed" in names
    assert not [n for n in names if n.startswith(("tests/", "derivations/"))], names
    assert f"\nVersion: {refimpl.__version__}\n" in metadata
    assert "Classifier: Typing :: Typed" in metadata
    assert "License-File: LICENSE" in metadata


def test_version_agrees_across_files():
    """refimpl.__version__ == CITATION.cff's version == the changelog's top section."""
    version = refimpl.__version__
    assert re.fullmatch(r"\d+\.\d+\.\d+", version), version
    cff = re.search(r"^version:\s*['\"]?([^'\"\s]+)", (ROOT / "CITATION.cff").read_text(), re.M)
    assert cff is not None and cff.group(1) == version
    sections = re.findall(r"^## \[([^\]]+)\]", (ROOT / "CHANGELOG.md").read_text(), re.M)
    assert sections and sections[0] == version, sections
