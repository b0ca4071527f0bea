"""Run every sympy derivation in derivations/.

Convention: each ``derivations/<operator>.py`` defines top-level functions
named ``check_*`` that derive or verify one identity with sympy and raise
``AssertionError`` when it does not hold.  Each one is a test here.  Each one
also states in its docstring what it establishes (the identity and its
assumptions); the first paragraph is what ``python derivations/_run.py``
prints after PASS.
"""

import importlib.util
from pathlib import Path

import pytest

DERIVATIONS = Path(__file__).resolve().parent.parent / "derivations"


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(f"derivations_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _checks():
    params = []
    for path in sorted(DERIVATIONS.glob("*.py")):
        if path.name.startswith("_"):
            continue
        module = _load(path)
        names = [n for n in dir(module) if n.startswith("check_") and callable(getattr(module, n))]
        assert names, f"{path.name} defines no check_* function"
        params += [pytest.param(module, n, id=f"{path.stem}.{n}") for n in sorted(names)]
    return params


CHECKS = _checks()
# One derivation per operator module; a tree without them (e.g. an archive
# that left derivations/ out) must fail here, not skip every check silently.
EXPECTED = {"deq", "identity", "matsqrt", "sinkhorn", "topk"}


def test_derivations_present():
    assert DERIVATIONS.is_dir(), f"{DERIVATIONS} is missing"
    found = {p.stem for p in DERIVATIONS.glob("*.py") if not p.name.startswith("_")}
    assert EXPECTED <= found, f"derivations missing for {sorted(EXPECTED - found)}"
    assert CHECKS, "no check_* functions found"


@pytest.mark.parametrize("module, name", CHECKS)
def test_derivation(module, name):
    getattr(module, name)()


@pytest.mark.skipif(not CHECKS, reason="no derivations yet")
@pytest.mark.parametrize("module, name", CHECKS)
def test_derivation_states_what_it_establishes(module, name):
    doc = (getattr(module, name).__doc__ or "").strip()
    summary = " ".join(doc.split("\n\n")[0].split())
    assert len(summary) >= 20, f"{name} needs a docstring saying what it establishes"
