"""Run every docstring example in the package as a doctest.

One test per module of ``refimpl`` (``doctest`` with NORMALIZE_WHITESPACE and
ELLIPSIS, as a reader would type the examples), and one that the examples
exist at all: a refactoring that drops every ``>>>`` line must not pass
silently.
"""

import doctest
import importlib
import pkgutil
from functools import cache

import pytest

import refimpl

FLAGS = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS
MODULES = sorted(m.name for m in pkgutil.walk_packages(refimpl.__path__, "refimpl."))
# The modules whose docstrings carry examples today (each operator module, the
# matsqrt package's modules, and the harnesses); a module losing all of its examples fails test_examples_exist.
WITH_EXAMPLES = ["refimpl.check", "refimpl.combinatorial", "refimpl.deq", "refimpl.linsolve",
                 "refimpl.matsqrt", "refimpl.matsqrt.coefficients", "refimpl.matsqrt.forward",
                 "refimpl.matsqrt.sign", "refimpl.sinkhorn", "refimpl.topk", "refimpl.validate",
                 "refimpl.vectors"]


@cache
def _run(name: str) -> tuple[int, int, str]:
    """(failed, attempted, report) of the examples in module ``name``."""
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    lines: list[str] = []
    runner = doctest.DocTestRunner(optionflags=FLAGS, verbose=False)
    for test in finder.find(module, name):
        runner.run(test, out=lines.append)
    failed, attempted = runner.summarize(verbose=False)
    return failed, attempted, "".join(lines)


def test_modules_found():
    assert set(WITH_EXAMPLES) <= set(MODULES), set(WITH_EXAMPLES) - set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name):
    failed, attempted, report = _run(name)
    assert failed == 0, f"{failed} of {attempted} examples in {name} failed:\n{report}"


def test_examples_exist():
    counts = {name: _run(name)[1] for name in MODULES}
    empty = [name for name in WITH_EXAMPLES if counts[name] == 0]
    assert not empty, f"no docstring examples left in {empty}"
    assert sum(counts.values()) > 0
